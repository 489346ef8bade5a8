import Colorun
import CoreMetrics
import Etcd
import JSON
import Logging
import NIOCore
import NIOPosix

/// How a fleet instance runs (`colorun fleet run`).
public struct FleetOptions: Sendable {
    public var endpoints: [String]
    public var node: String
    /// Where the pairs' policies are (a declaration names a file in it).
    public var policyDirectory: String
    /// Each pair's state (generations, stop journal, fencing token) is in `DIR/pairs/PAIR`;
    /// on storage every instance shares, so a new owner continues where the old one stopped.
    public var stateDirectory: String
    public var prefix = "/colorun/fleet"
    /// The instance's lease TTL in seconds: its pairs are taken over within TTL + 1 s of its death.
    public var ttl: Int64 = 3
    /// At most this many pairs move away from this instance at a time (rebalance, drain).
    public var maxMoves = 8
    /// A full read of the fleet this often besides the watch.
    public var resync: Duration = .seconds(5)
    public var tls: EtcdTLS?

    public init(endpoints: [String], node: String, policyDirectory: String, stateDirectory: String) {
        self.endpoints = endpoints
        self.node = node
        self.policyDirectory = policyDirectory
        self.stateDirectory = stateDirectory
    }

    /// Renewal period and fencing margin: renew every TTL/4 with a TTL/4 timeout; an
    /// instance whose last successful renewal was sent more than TTL - TTL/4 ago stops
    /// driving its pairs (so it stops before etcd can expire the lease and hand them over).
    var renewEvery: Duration { .milliseconds(ttl * 250) }
    var fenceAfter: Duration { .milliseconds(ttl * 750) }
}

/// One pair this instance owns and runs.
final class PairRunner: Sendable {
    let declaration: PairDeclaration
    let token: FencingToken
    let session: PolicySession
    let ended: EventLoopFuture<PolicyReport>

    init(declaration: PairDeclaration, token: FencingToken, session: PolicySession, ended: EventLoopFuture<PolicyReport>) {
        self.declaration = declaration
        self.token = token
        self.session = session
        self.ended = ended
    }
}

/// A fleet instance: registers itself on its ONE lease (renewed every TTL/4, whatever the
/// number of pairs), claims pairs up to its even share in etcd transactions (the ownership
/// key's create revision is the pair's fencing token), runs each owned pair's policy in a
/// `PolicySession`, gives pairs away gradually when the fleet grows or it is drained, and
/// stops driving every pair when it cannot renew its lease in time.
public actor FleetNode {
    public let options: FleetOptions
    let store: FleetStore
    /// The lease's own client (its own connections, on its own event loop thread): a burst of
    /// claims or of pair sessions starting never delays a renewal.
    let leaseClient: EtcdClient
    let leaseGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let logger: Logger
    let group: any EventLoopGroup
    let io = NIOThreadPool(numberOfThreads: 8)
    private var lease: Int64 = 0
    private var lastRenewSent = ContinuousClock.now
    private var runners: [String: PairRunner] = [:]
    /// Pairs owned and being started (their sessions are created off the actor, in parallel).
    private var starting: Set<String> = []
    /// Runs being stopped cleanly: their tokens are renewed until they have ended.
    private var ending: [ObjectIdentifier: PairRunner] = [:]
    private var endedPairs: [String: ContinuousClock.Instant] = [:]
    private var pendingReleases: Set<String> = []
    private var reconcileWanted = false
    /// An ownership or node key vanished (a lease ended, a release): reconcile without the
    /// usual 50 ms pause, and when the change was first seen (for the claim's log line).
    private var urgentReconcile = false
    private var changeSeenAt: ContinuousClock.Instant?
    private var previousSnapshot: FleetStore.Snapshot?
    private var wakeup: CheckedContinuation<Void, Never>?
    private var stopping = false
    private var stopTask: Task<Void, Never>?
    private var tasks: [Task<Void, Never>] = []
    public private(set) var lastView = FleetView()
    /// Counts for the operator: claims won, pairs released, fences.
    public private(set) var claimsWon = 0
    public private(set) var released = 0
    public private(set) var fences = 0

    public init(options: FleetOptions, logger: Logger, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) throws(FleetError) {
        guard DomainSpec.isValidName(options.node) else { throw FleetError("--node '\(options.node)': use letters, digits, '-', '_' and '.'") }
        guard options.ttl >= 1 else { throw FleetError("--ttl must be at least 1 second") }
        guard options.maxMoves >= 1 else { throw FleetError("--max-moves must be at least 1") }
        let client: EtcdClient
        do {
            client = try EtcdClient(endpoints: options.endpoints, tls: options.tls, requestTimeout: .milliseconds(options.ttl * 250),
                                    eventLoopGroup: group, logger: logger)
            leaseClient = try EtcdClient(endpoints: options.endpoints, tls: options.tls, requestTimeout: .milliseconds(options.ttl * 250),
                                         eventLoopGroup: leaseGroup, logger: logger)
        } catch {
            throw FleetError("--etcd: \(error)")
        }
        self.options = options
        self.store = FleetStore(client: client, prefix: options.prefix)
        self.logger = logger
        self.group = group
    }

    /// The pairs this instance runs now, with their fencing tokens.
    public var owned: [String: Int64] { runners.mapValues(\.token.token) }

    // MARK: - Running

    /// Registers and runs until `stop()`. Throws when the instance cannot register at all.
    public func run() async throws(FleetError) {
        io.start()
        try await register()
        tasks.append(Task { await self.renewLoop() })
        tasks.append(Task { await self.fenceLoop() })
        tasks.append(Task { await self.watchLoop() })
        await reconcileLoop()
    }

    /// Stops every pair (in-flight checkpoints finish or roll back, domains resumed), then
    /// revokes the lease, so the other instances take the pairs at once.
    public func stop() async {
        if let stopTask { return await stopTask.value }
        stopping = true
        let task = Task { await self.shutdown() }
        stopTask = task
        await task.value
    }

    private func shutdown() async {
        wake()
        // The watch goes; renewals go on while the pairs stop (all at once).
        for task in tasks.dropFirst(2) { task.cancel() }
        await withTaskGroup(of: Void.self) { group in
            for pair in runners.keys {
                group.addTask { await self.stopRunner(pair, reason: "the instance is stopping", wait: true) }
            }
        }
        for task in tasks { task.cancel() }
        if lease != 0 {
            try? await leaseClient.revokeLease(lease)
            lease = 0
        }
        updateMetrics()
        try? await io.shutdownGracefully()
        await store.client.shutdown()
        await leaseClient.shutdown()
        try? await leaseGroup.shutdownGracefully()
    }

    private func register() async throws(FleetError) {
        let sent = ContinuousClock.now
        do {
            let granted = try await leaseClient.grantLease(ttl: options.ttl)
            let key = store.nodeKey(options.node)
            let result = try await store.client.txn(
                compare: [.createRevision(key, .equal, 0)],
                success: [.put(key: key, value: "{\"ttl\":\(granted.ttl)}", lease: granted.id)],
                failure: [.range(key: key)])
            guard result.succeeded else {
                try? await leaseClient.revokeLease(granted.id)
                throw FleetError("node '\(options.node)' is already running in the fleet (its key \(key) exists on lease \(result.ranges.first?.first?.lease ?? 0)); give each instance its own --node")
            }
            lease = granted.id
            lastRenewSent = sent
            logger.notice("joined the fleet", metadata: ["node": .string(options.node), "lease": .stringConvertible(granted.id), "ttl": .stringConvertible(granted.ttl)])
        } catch let error as FleetError {
            throw error
        } catch {
            throw FleetError("cannot join the fleet: \(error)")
        }
    }

    private func renewLoop() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: options.renewEvery)
            if Task.isCancelled { return }
            if lease == 0 {
                if stopping { continue }
                // Fenced earlier: join again with a new lease.
                do {
                    try await register()
                    requestReconcile()
                } catch {
                    logger.warning("cannot join the fleet again yet", metadata: ["error": .string(error.description)])
                }
                continue
            }
            // Each renewal is a request of its own, sent every TTL/4 whether or not the last
            // one has answered (a slow answer still counts from its send time): on a loaded
            // machine renewals overlap instead of falling behind.
            let sent = ContinuousClock.now
            let current = lease
            let client = leaseClient, timeout = TimeAmount.nanoseconds(Int64(options.fenceAfter.components.seconds) * 1_000_000_000 + options.fenceAfter.components.attoseconds / 1_000_000_000)
            Task {
                do {
                    let ttl = try await client.keepAlive(current, timeout: timeout)
                    self.renewed(current, sent: sent, ttl: ttl)
                } catch {
                    self.logger.warning("lease renewal failed", metadata: ["error": .string("\(error)")])
                }
            }
        }
    }

    private func renewed(_ renewedLease: Int64, sent: ContinuousClock.Instant, ttl: Int64) {
        guard renewedLease == lease else { return }
        if ttl <= 0 {
            fenceAll("the lease expired in etcd")
            return
        }
        guard sent > lastRenewSent else { return }
        lastRenewSent = sent
        let until = sent + options.fenceAfter
        for runner in runners.values { runner.token.extend(until: until) }
        for runner in ending.values { runner.token.extend(until: until) }
    }

    private func fenceLoop() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: .milliseconds(25))
            if lease != 0, ContinuousClock.now >= lastRenewSent + options.fenceAfter {
                fenceAll("the lease was not renewed for \(options.fenceAfter) (TTL \(options.ttl) s)")
            }
        }
    }

    /// Stops driving every pair now: tokens revoked (no commit from here on), sessions told
    /// to stop; the lease is given up and the instance joins again when etcd answers.
    private func fenceAll(_ reason: String) {
        guard lease != 0 else { return }
        fences += 1
        logger.error("fenced: stopping every pair this instance drives", metadata: ["reason": .string(reason), "pairs": .stringConvertible(runners.count)])
        let old = lease
        lease = 0
        for pair in Array(runners.keys) {
            if let runner = runners.removeValue(forKey: pair) {
                runner.token.revoke(reason)
                runner.session.stop()
            }
        }
        for runner in ending.values { runner.token.revoke(reason) }
        pendingReleases.removeAll()
        updateMetrics()
        let client = leaseClient
        Task { try? await client.revokeLease(old) }
    }

    /// Any change under the prefix asks for a reconcile (ends when its task is cancelled).
    private nonisolated func watchLoop() async {
        let store = self.store, logger = self.logger
        while !Task.isCancelled {
            do {
                try await store.client.watch(store.prefix + "/", prefix: true) { events in
                    await self.eventsArrived(events)
                    return !Task.isCancelled
                }
            } catch {
                if Task.isCancelled { return }
                logger.debug("fleet watch ended; watching again", metadata: ["error": .string(error.description)])
                try? await Task.sleep(for: .milliseconds(250))
            }
        }
    }

    func requestReconcile(urgent: Bool = false) {
        reconcileWanted = true
        if urgent { urgentReconcile = true }
        if changeSeenAt == nil { changeSeenAt = ContinuousClock.now }
        wake()
    }

    private func wake() {
        wakeup?.resume()
        wakeup = nil
    }

    private func reconcileLoop() async {
        var lastFull = ContinuousClock.now
        while !stopping {
            if !reconcileWanted && ContinuousClock.now < lastFull + options.resync {
                let timer = Task { [resync = options.resync] in
                    try? await Task.sleep(for: resync / 5)
                    self.wake()
                }
                await withCheckedContinuation { wakeup = $0 }
                timer.cancel()
                continue
            }
            reconcileWanted = false
            let urgent = urgentReconcile
            urgentReconcile = false
            let seen = changeSeenAt ?? ContinuousClock.now
            changeSeenAt = nil
            lastFull = ContinuousClock.now
            if urgent { await fastClaims(changeSeenAt: seen) }
            do {
                try await reconcile(changeSeenAt: seen)
            } catch {
                logger.warning("fleet reconcile failed", metadata: ["error": .string("\(error)")])
            }
            // At most one reconcile per 50 ms however many events arrive, except right after
            // keys vanished (a dead instance's pairs are claimed at once).
            if !urgentReconcile { try? await Task.sleep(for: .milliseconds(50)) }
        }
    }

    // MARK: - Reconciling

    private func reconcile(changeSeenAt: ContinuousClock.Instant) async throws(EtcdError) {
        guard lease != 0, !stopping else { return }
        let started = ContinuousClock.now
        let snapshot = try await store.snapshot(reusing: previousSnapshot)
        previousSnapshot = snapshot
        let read = ContinuousClock.now
        guard lease != 0, !stopping else { return }
        let view = snapshot.view
        lastView = view
        for (key, error) in snapshot.bad { logger.error("bad pair declaration in etcd; not run", metadata: ["key": .string(key), "error": .string(error)]) }

        // Pairs lost or removed.
        for (pair, runner) in runners {
            if snapshot.owners[pair]?.lease != lease {
                await stopRunner(pair, reason: "this instance no longer holds the pair's ownership key", wait: false)
            } else if let declaration = snapshot.declarations[pair], declaration != runner.declaration {
                logger.notice("pair declaration changed; restarting it", metadata: ["pair": .string(pair)])
                await stopRunner(pair, reason: "declaration changed", wait: true)
                startAll([(pair, declaration, snapshot.owners[pair]!.token)])
            } else if snapshot.declarations[pair] == nil {
                await stopRunner(pair, reason: "the pair was removed from the fleet", wait: true)
                await releaseKey(pair)
            }
        }
        // Owned in etcd but not running (a start that failed, a policy that ended): start again after 2 s.
        let current = self.lease
        starting = starting.filter { snapshot.owners[$0]?.lease == current && snapshot.declarations[$0] != nil }
        var toStart: [(String, PairDeclaration, Int64)] = []
        for (pair, ownership) in snapshot.owners where ownership.lease == lease && runners[pair] == nil && !starting.contains(pair) {
            guard let declaration = snapshot.declarations[pair] else { await releaseKey(pair); continue }
            if let ended = endedPairs[pair], ContinuousClock.now < ended + .seconds(2) { continue }
            toStart.append((pair, declaration, ownership.token))
        }
        if !toStart.isEmpty { startAll(toStart) }

        // Releases (rebalance, drain).
        pendingReleases = pendingReleases.filter { view.pairs.contains($0) && view.owners[$0] == nil }
        var busy: Set<String> = []
        if (view.counts[options.node] ?? 0) > FleetPlan.quota(of: options.node, in: view) {
            for (pair, runner) in runners {
                if let status = try? await runner.session.status().get(), status.inFlight > 0 { busy.insert(pair) }
            }
        }
        let releases = FleetPlan.releases(for: options.node, in: view, busy: busy, pending: pendingReleases, maxMoves: options.maxMoves)
        for pair in releases {
            await stopRunner(pair, reason: "rebalance: handed to another instance", wait: true)
            await releaseKey(pair)
            pendingReleases.insert(pair)
            released += 1
        }
        if !releases.isEmpty {
            logger.notice("released pairs for rebalance", metadata: ["count": .stringConvertible(releases.count)])
            updateMetrics()
            return
        }

        // Claims.
        let claims = FleetPlan.claims(for: options.node, in: view).filter { runners[$0] == nil && !starting.contains($0) }
        await claim(claims, declarations: snapshot.declarations, timing: (changeSeenAt, started, read, "read"))
        updateMetrics()
    }

    /// Claims the pairs (each ownership key created on this instance's lease only if it does
    /// not exist and the pair is declared) and starts those won.
    private func claim(_ claims: [String], declarations: [String: PairDeclaration],
                       timing: (seen: ContinuousClock.Instant, started: ContinuousClock.Instant, read: ContinuousClock.Instant, how: String)) async {
        guard !claims.isEmpty, lease != 0, !stopping else { return }
        let store = self.store, node = options.node, lease = self.lease
        var won: [(String, Int64)] = []
        var index = 0
        while index < claims.count {
            // A chunk in one transaction (the usual case: every node computes the same
            // assignment, so nobody else claims these); if any was taken meanwhile, one
            // transaction per pair. etcd allows 128 compares in a transaction: 2 per pair.
            let chunk = Array(claims[index..<min(index + 60, claims.count)])
            index += chunk.count
            let batch = try? await store.client.txn(
                compare: chunk.flatMap { [.createRevision(store.ownerKey($0), .equal, 0), .createRevision(store.pairKey($0), .greater, 0)] },
                success: chunk.map { .put(key: store.ownerKey($0), value: node, lease: lease) })
            if let batch, batch.succeeded {
                won += chunk.map { ($0, batch.revision) }
                continue
            }
            await withTaskGroup(of: (String, Int64?).self) { group in
                for pair in chunk {
                    group.addTask {
                        let key = store.ownerKey(pair)
                        let result = try? await store.client.txn(
                            compare: [.createRevision(key, .equal, 0), .createRevision(store.pairKey(pair), .greater, 0)],
                            success: [.put(key: key, value: node, lease: lease)])
                        return (pair, result?.succeeded == true ? result!.revision : nil)
                    }
                }
                for await (pair, token) in group { if let token { won.append((pair, token)) } }
            }
        }
        guard lease == self.lease, !stopping else { return }
        claimsWon += won.count
        if !won.isEmpty {
            // Where a take-over's time goes: the change seen on the watch -> this claim
            // started -> the fleet read (or the watch's events applied) -> the claims answered.
            let ms = { (d: Duration) in String(d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000) }
            logger.notice("claimed pairs", metadata: [
                "count": .stringConvertible(won.count), "view": .string(timing.how), "waited_ms": .string(ms(timing.started - timing.seen)),
                "read_ms": .string(ms(timing.read - timing.started)), "claim_ms": .string(ms(ContinuousClock.now - timing.read)),
            ])
        }
        startAll(won.compactMap { pair, token in declarations[pair].map { (pair, $0, token) } })
    }

    /// The watch's events, applied to the last read of the fleet: what the fast claim after
    /// an ownership key vanished works from (the next full read replaces it).
    func eventsArrived(_ events: [EtcdWatchEvent]) {
        if var snapshot = previousSnapshot {
            let base = store.prefix + "/"
            for event in events where event.keyValue.modRevision > snapshot.revision || event.keyValue.modRevision == 0 {
                let rest = event.keyValue.key.dropFirst(base.count)
                guard event.keyValue.key.hasPrefix(base), let slash = rest.firstIndex(of: "/") else { continue }
                let kind = rest[..<slash], name = String(rest[rest.index(after: slash)...])
                let put = event.kind == .put, kv = event.keyValue
                switch kind {
                case "owners": snapshot.owners[name] = put ? FleetStore.Ownership(node: kv.value, lease: kv.lease, token: kv.createRevision) : nil
                case "nodes": if put { snapshot.nodes.insert(name) } else { snapshot.nodes.remove(name) }
                case "drain": if put { snapshot.draining.insert(name) } else { snapshot.draining.remove(name) }
                case "pairs":
                    snapshot.declarationRevisions[name] = nil
                    snapshot.declarations[name] = put ? (try? JSONParser.parse(kv.value)).flatMap { try? PairDeclaration(name: name, json: $0, place: kv.key) } : nil
                default: continue
                }
            }
            snapshot.revision = max(snapshot.revision, events.map(\.keyValue.modRevision).max() ?? 0)
            previousSnapshot = snapshot
        }
        let base = store.prefix + "/"
        requestReconcile(urgent: events.contains { $0.kind == .delete && ($0.keyValue.key.hasPrefix(base + "owners/") || $0.keyValue.key.hasPrefix(base + "nodes/")) })
    }

    /// After ownership keys vanished: claims this instance's part of the unowned pairs from the
    /// watch's view at once, without waiting for a full read (the claim transactions settle
    /// any race; the full reconcile that follows corrects the rest).
    private func fastClaims(changeSeenAt: ContinuousClock.Instant) async {
        guard lease != 0, !stopping, let snapshot = previousSnapshot else { return }
        let started = ContinuousClock.now
        let claims = FleetPlan.claims(for: options.node, in: snapshot.view).filter { runners[$0] == nil && !starting.contains($0) }
        await claim(claims, declarations: snapshot.declarations, timing: (changeSeenAt, started, started, "watch"))
    }

    /// Starts the pairs' runs in parallel, without holding up the next reconcile (whose
    /// claims must not wait for sessions to start).
    private func startAll(_ pairs: [(String, PairDeclaration, Int64)]) {
        let lease = self.lease
        for (pair, _, _) in pairs { starting.insert(pair) }
        Task {
            // At most 16 sessions start at once: a take-over of a thousand pairs must not starve
            // the renewals (nor etcd) of CPU.
            await withTaskGroup(of: Void.self) { group in
                var running = 0
                for (pair, declaration, token) in pairs {
                    if running == 16 {
                        await group.next()
                        running -= 1
                    }
                    group.addTask { await self.start(pair, declaration: declaration, token: token, lease: lease) }
                    running += 1
                }
            }
            self.updateMetrics()
        }
    }

    private func releaseKey(_ pair: String) async {
        let key = store.ownerKey(pair)
        _ = try? await store.client.txn(compare: [.lease(key, .equal, lease)], success: [.delete(key: key)])
    }

    private func start(_ pair: String, declaration: PairDeclaration, token: Int64, lease claimed: Int64) async {
        guard lease == claimed, !stopping, starting.contains(pair) else { return }
        defer { starting.remove(pair) }
        let stateDirectory = "\(options.stateDirectory)/pairs/\(pair)"
        let fencing = FencingToken(token: token, path: stateDirectory + "/fencing-token", validUntil: lastRenewSent + options.fenceAfter)
        var pairLogger = logger
        pairLogger[metadataKey: "pair"] = .string(pair)
        do {
            try fencing.claim()
            var policy = PolicyOptions(policyPath: options.policyDirectory + "/" + declaration.policy)
            policy.arguments = declaration.arguments
            policy.domains = try declaration.domainSpecs()
            policy.stateDirectory = stateDirectory
            policy.fencing = fencing
            policy.sharedBlockingIO = io
            let loop = group.next()
            let sessionOptions = policy, sessionLogger = pairLogger
            let session = try await loop.submit { try PolicySession(options: sessionOptions, eventLoop: loop, logger: sessionLogger) }.get()
            guard !stopping, lease == claimed, starting.contains(pair), runners[pair] == nil else {
                // Stopped or fenced meanwhile: this session never runs.
                fencing.revoke("the instance stopped or was fenced before the pair started")
                session.stop()
                _ = try? await session.run().get()
                return
            }
            let ended = session.run()
            let runner = PairRunner(declaration: declaration, token: fencing, session: session, ended: ended)
            runners[pair] = runner
            ended.whenComplete { result in
                Task { await self.runnerEnded(pair, runner, result) }
            }
        } catch {
            pairLogger.error("cannot start the pair's policy", metadata: ["error": .string("\(error)")])
            endedPairs[pair] = ContinuousClock.now
        }
    }

    private func runnerEnded(_ pair: String, _ runner: PairRunner, _ result: Result<PolicyReport, any Error>) {
        guard runners[pair] === runner else { return }
        runners[pair] = nil
        endedPairs[pair] = ContinuousClock.now
        let outcome = (try? result.get()).map { "\($0.outcome)" } ?? "error"
        logger.warning("a pair's policy ended by itself; it is started again in 2 s while this instance owns the pair",
                       metadata: ["pair": .string(pair), "outcome": .string(outcome)])
        updateMetrics()
    }

    /// Stops a pair's run. `wait`: the ownership is still ours (a move, a removal, the
    /// instance stopping): the run ends cleanly, its in-flight checkpoint may still commit
    /// under the token (renewed meanwhile), and the token is given up after the end. Without
    /// `wait` the ownership is already lost: the token is given up at once.
    private func stopRunner(_ pair: String, reason: String, wait: Bool) async {
        guard let runner = runners.removeValue(forKey: pair) else { return }
        logger.info("stopping a pair", metadata: ["pair": .string(pair), "reason": .string(reason)])
        guard wait else {
            runner.token.revoke(reason)
            runner.session.stop()
            return
        }
        let id = ObjectIdentifier(runner)
        ending[id] = runner
        runner.session.stop()
        _ = try? await runner.ended.get()
        runner.token.revoke(reason)
        ending[id] = nil
    }

    // MARK: - Metrics

    private func updateMetrics() {
        let node = options.node
        Gauge(label: FleetMetrics.ownedPairs, dimensions: [("node", node)]).record(runners.count)
        Gauge(label: FleetMetrics.declaredPairs).record(lastView.pairs.count)
        Gauge(label: FleetMetrics.unownedPairs).record(lastView.unowned.count)
        Gauge(label: FleetMetrics.nodes).record(lastView.nodes.count)
        for (other, count) in lastView.counts { Gauge(label: FleetMetrics.nodePairs, dimensions: [("node", other)]).record(count) }
    }
}

/// The fleet's metric names (HELP texts in `ColorunMetrics.help`).
public enum FleetMetrics {
    public static let ownedPairs = "colorun_fleet_owned_pairs"
    public static let declaredPairs = "colorun_fleet_pairs"
    public static let unownedPairs = "colorun_fleet_unowned_pairs"
    public static let nodes = "colorun_fleet_nodes"
    public static let nodePairs = "colorun_fleet_node_pairs"
}
