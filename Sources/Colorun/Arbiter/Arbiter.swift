import Etcd
import Logging
import NIOCore

/// The node's side of the pair's key in etcd (`/colorun/pairs/<pair>/active`): who may run
/// as primary. Patroni's rules, for VMs:
///
/// - The holder's key is attached to its lease; the holder renews the lease every
///   `renewInterval` (ttl/4), each request timing out after `requestTimeout` (ttl/4).
/// - If no renewal has succeeded for `fenceAfter` (ttl - margin = 3/4 ttl, counted from the
///   send time of the last renewal that succeeded: etcd restarts the TTL later than that), the
///   holder fences itself: every guarded domain is paused and refuses `cont`, checkpoints stop,
///   `on_fenced` handlers run, `colorun_fenced` is 1. Also when etcd says the lease expired or
///   the key names another lease. A fenced node runs nothing until it wins the key again.
/// - A node wins the key only in a transaction whose condition is the key's create revision
///   == 0 (no one holds it); the revision that creates it is the fencing token. Promotions
///   check `create revision == token and lease == ours` in the same transaction that records
///   them, so a node that lost the key cannot promote on a stale belief.
///
/// State is confined to the session's event loop; etcd requests run as tasks whose results
/// come back to the loop.
final class Arbiter: @unchecked Sendable {
    let options: ArbiterOptions
    let client: EtcdClient
    let eventLoop: any EventLoop
    let logger: Logger
    let metrics: ColorunMetrics

    /// What a try to win the key found.
    enum Attempt: Sendable {
        case won(token: Int64)
        /// Someone else holds it (the key as read in the same transaction, at `revision`).
        case held(by: EtcdKeyValue, revision: Int64)
    }

    // Loop-confined.
    private(set) var lease: Int64 = 0
    /// The key's create revision while this node holds the key; nil otherwise.
    private(set) var token: Int64?
    /// Why this node was fenced last (nil until it is, and again once it wins the key).
    private(set) var fencedReason: String?
    /// Send time of the last renewal (or grant) of the lease that succeeded.
    private(set) var lastRenewal: NIODeadline?
    /// Set by `cluster.override(reason)`: promotions go through without the key (logged, loudly).
    var overrideReason: String?
    private var fenceTimer: Scheduled<Void>?
    private var renewTimer: RepeatedTask?
    private var renewing = false
    /// A renew tick came while a renewal was still out (it timed out at the same moment):
    /// the next renewal starts as soon as that one ends, so two attempts fit before the fence.
    private var renewTickMissed = false
    private var stopped = false
    private var lastRenewWarning: NIODeadline?
    /// The session's part of a fence: pause the guarded domains, run the on_fenced handlers.
    /// Completes with true when every guarded domain is paused (or gone).
    var onFence: ((String) -> EventLoopFuture<Bool>)?
    /// The session's part of winning: lift the fence marks of the guarded domains.
    var onWin: (() -> Void)?

    var isHolding: Bool { token != nil }

    init(options: ArbiterOptions, eventLoop: any EventLoop, logger: Logger, metrics: ColorunMetrics) throws(EtcdError) {
        self.options = options
        self.eventLoop = eventLoop
        var logger = logger
        logger[metadataKey: "pair"] = .string(options.pair)
        logger[metadataKey: "node"] = .string(options.node)
        self.logger = logger
        self.metrics = metrics
        // One HTTP client on the session's loop: the arbiter's requests need no thread of their own.
        client = try EtcdClient(
            endpoints: options.endpoints, tls: options.tls, requestTimeout: options.requestTimeout,
            eventLoopGroup: eventLoop, logger: logger)
    }

    /// Starts renewing (a no-op until the node has a lease).
    func start() {
        eventLoop.preconditionInEventLoop()
        metrics.fenced(pair: options.pair, false)
        metrics.holding(pair: options.pair, false)
        renewTimer = eventLoop.scheduleRepeatedTask(initialDelay: options.renewInterval, delay: options.renewInterval) { [self] _ in
            renew()
        }
    }

    /// Runs `operation` as a task and `then` on the loop with its result.
    private func run<T: Sendable>(_ operation: @escaping @Sendable () async -> T, then: @escaping (T) -> Void) {
        let promise = eventLoop.makePromise(of: T.self)
        promise.completeWithTask(operation)
        let box = UncheckedSendable(then)
        promise.futureResult.whenSuccess { box.value($0) }
    }

    // MARK: - Renewing

    private enum Renewal: Sendable {
        case renewed(EtcdKeyValue?)
        case expired
        case failed(EtcdError)
    }

    private func renew() {
        if renewing { renewTickMissed = true }
        guard !renewing, !stopped, lease != 0 else { return }
        renewing = true
        renewTickMissed = false
        let lease = self.lease, token = self.token, client = self.client, key = options.key
        let sent = NIODeadline.now()
        run({ () async -> Renewal in
            do throws(EtcdError) {
                guard try await client.keepAlive(lease) > 0 else { return .expired }
                guard token != nil else { return .renewed(nil) }
                return .renewed(try await client.get(key))
            } catch {
                return .failed(error)
            }
        }) { [self] result in
            renewing = false
            defer {
                if renewTickMissed { renew() }
            }
            guard lease == self.lease, !stopped else { return }
            switch result {
            case .expired:
                self.lease = 0
                lastRenewal = nil
                if token != nil, self.token == token {
                    fence("etcd says the lease expired (no renewal reached it within the TTL)")
                }
            case .renewed(let keyValue):
                lastRenewal = sent
                guard let token, self.token == token else { return }
                guard let keyValue, keyValue.lease == lease, keyValue.createRevision == token, keyValue.value == options.node else {
                    fence("the key no longer names this node's lease: \(Self.describe(keyValue))")
                    return
                }
                armFence()
            case .failed(let error):
                guard token != nil, self.token == token else { return }
                let now = NIODeadline.now()
                if lastRenewWarning.map({ now - $0 >= options.renewInterval * 2 }) ?? true {
                    lastRenewWarning = now
                    let left = lastRenewal.map { Double(($0 + options.fenceAfter - now).nanoseconds) / 1e6 } ?? 0
                    logger.warning("cannot renew the lease: \(error); fencing in \(Int(max(0, left))) ms unless a renewal succeeds")
                }
            }
        }
    }

    /// (Re)schedules the fence at the last renewal + ttl - margin.
    private func armFence() {
        fenceTimer?.cancel()
        guard let lastRenewal else {
            fence("no renewal of the lease is known")
            return
        }
        let deadline = lastRenewal + options.fenceAfter
        fenceTimer = eventLoop.scheduleTask(deadline: deadline) { [self] in
            guard token != nil else { return }
            fence("no renewal of the lease succeeded for \(Self.text(options.fenceAfter)) (ttl \(options.ttlSeconds) s - margin \(Self.text(options.margin))): etcd unreachable or too slow")
        }
    }

    static func text(_ amount: TimeAmount) -> String {
        let ms = amount.nanoseconds / 1_000_000
        return ms % 1000 == 0 ? "\(ms / 1000) s" : "\(ms) ms"
    }

    static func describe(_ keyValue: EtcdKeyValue?) -> String {
        guard let keyValue else { return "the key is gone" }
        return "held by '\(keyValue.value)' (lease \(keyValue.lease), token \(keyValue.createRevision))"
    }

    // MARK: - Fencing

    /// Gives up the primary role at once: the lease is dropped (no more renewals; a later
    /// try to win takes a new lease, so the old key never counts as this node's again), the
    /// guarded domains are paused, and once they all are, the old lease is revoked: the key
    /// goes with it and the peer need not wait for the TTL. If a pause is not confirmed, the
    /// old lease is left to expire by itself.
    func fence(_ reason: String) {
        guard let held = token else { return }
        let oldLease = lease
        token = nil
        lease = 0
        lastRenewal = nil
        fencedReason = reason
        fenceTimer?.cancel()
        fenceTimer = nil
        metrics.fenced(pair: options.pair, true)
        metrics.holding(pair: options.pair, false)
        logger.critical("FENCED: \(reason); pausing the guarded domains and stopping checkpoints; they stay paused until this node wins the key again",
                        metadata: ["token": .stringConvertible(held)])
        let paused = onFence?(reason) ?? eventLoop.makeSucceededFuture(true)
        paused.whenSuccess { [self] allPaused in
            guard allPaused else {
                logger.critical("FENCED but a guarded domain did not confirm the pause: the key is left to expire with the lease")
                return
            }
            revoke(oldLease, token: held)
        }
    }

    /// Revokes a lease this node gave up (its key goes with it): a hand-over.
    private func revoke(_ oldLease: Int64, token held: Int64) {
        guard oldLease != 0 else { return }
        let client = self.client
        run({ () async -> EtcdError? in
            do throws(EtcdError) {
                try await client.revokeLease(oldLease)
                return nil
            } catch {
                return error
            }
        }) { [self] error in
            if let error {
                logger.info("could not revoke the old lease (the key expires with it): \(error)")
            } else {
                logger.notice("released the key (revoked the old lease) after pausing the guarded domains", metadata: ["token": .stringConvertible(held)])
            }
        }
    }

    // MARK: - Winning

    /// One try to win the key: renews (or grants) this node's lease, then the
    /// create-revision == 0 transaction.
    func tryAcquire() -> EventLoopFuture<Attempt> {
        eventLoop.preconditionInEventLoop()
        guard !stopped else { return eventLoop.makeFailedFuture(EtcdError(kind: .shutDown, endpoint: nil, message: "the run is ending")) }
        if let token { return eventLoop.makeSucceededFuture(.won(token: token)) }
        let promise = eventLoop.makePromise(of: Attempt.self)
        let lease = self.lease, client = self.client, options = self.options
        struct Acquired: Sendable {
            var lease: Int64
            var renewed: NIODeadline
            var result: EtcdTxnResult
        }
        run({ () async -> Result<Acquired, EtcdError> in
            do throws(EtcdError) {
                var lease = lease
                var renewed = NIODeadline.now()
                if lease != 0, try await client.keepAlive(lease) <= 0 { lease = 0 }
                if lease == 0 {
                    renewed = NIODeadline.now()
                    lease = try await client.grantLease(ttl: options.ttlSeconds).id
                }
                let result = try await client.txn(
                    compare: [.createRevision(options.key, .equal, 0)],
                    success: [.put(key: options.key, value: options.node, lease: lease)],
                    failure: [.range(key: options.key)])
                return .success(Acquired(lease: lease, renewed: renewed, result: result))
            } catch {
                return .failure(error)
            }
        }) { [self] outcome in
            switch outcome {
            case .failure(let error):
                promise.fail(error)
            case .success(let acquired):
                let newLease = acquired.lease, renewed = acquired.renewed, result = acquired.result
                self.lease = newLease
                lastRenewal = renewed
                if stopped {
                    promise.fail(EtcdError(kind: .shutDown, endpoint: nil, message: "the run is ending"))
                    return
                }
                if result.succeeded {
                    won(token: result.revision)
                    promise.succeed(.won(token: result.revision))
                    return
                }
                guard let holder = result.ranges.first?.first else {
                    // Deleted between the compare and the range: impossible in one txn; try again later.
                    promise.succeed(.held(by: EtcdKeyValue(key: options.key, value: "", createRevision: 0, modRevision: 0, version: 0, lease: 0), revision: result.revision))
                    return
                }
                if holder.value == options.node, holder.lease == lease {
                    won(token: holder.createRevision)
                    promise.succeed(.won(token: holder.createRevision))
                } else {
                    promise.succeed(.held(by: holder, revision: result.revision))
                }
            }
        }
        return promise.futureResult
    }

    private func won(token: Int64) {
        self.token = token
        fencedReason = nil
        metrics.fenced(pair: options.pair, false)
        metrics.holding(pair: options.pair, true)
        logger.notice("won the key: this node may run as primary", metadata: ["token": .stringConvertible(token), "key": .string(options.key)])
        onWin?()
        armFence()
    }

    /// Tries until this node wins the key (or `deadline` passes: then nil). Between tries it
    /// watches the key for its deletion (the holder's lease expired or was revoked), so it
    /// tries again at once; a watch is bounded by the renew interval, and etcd being
    /// unreachable just means trying again later.
    func waitToWin(until deadline: NIODeadline?) async -> Int64? {
        var loggedHolder: String?
        while !Task.isCancelled {
            let attempt: Attempt
            do {
                attempt = try await eventLoop.flatSubmit { self.tryAcquire() }.get()
            } catch {
                if let error = error as? EtcdError, error.kind == .shutDown { return nil }
                logger.warning("cannot try for the key: \(error)")
                if let deadline, NIODeadline.now() >= deadline { return nil }
                try? await Task.sleep(nanoseconds: UInt64(options.renewInterval.nanoseconds))
                continue
            }
            switch attempt {
            case .won(let token):
                return token
            case .held(let holder, let revision):
                let text = Self.describe(holder)
                if loggedHolder != text {
                    loggedHolder = text
                    logger.info("waiting for the key: \(text); promotion waits until its lease expires or it is released")
                }
                if let deadline, NIODeadline.now() >= deadline { return nil }
                var watchEnd = NIODeadline.now() + options.renewInterval * 4
                if let deadline { watchEnd = min(watchEnd, deadline) }
                do {
                    try await client.watch(options.key, fromRevision: revision + 1, until: watchEnd) { events in
                        !events.contains { $0.kind == .delete }
                    }
                } catch {
                    try? await Task.sleep(nanoseconds: UInt64(options.renewInterval.nanoseconds))
                }
            }
        }
        return nil
    }

    /// Checks, in the transaction that records the promotion, that this node still holds the
    /// key with its token and lease. Fences the node when it does not.
    func confirmPromotion(_ what: String) -> EventLoopFuture<Int64> {
        eventLoop.preconditionInEventLoop()
        guard let token else {
            return eventLoop.makeFailedFuture(EtcdError(kind: .usage, endpoint: nil, message: "\(what): this node does not hold \(options.key)"))
        }
        let promise = eventLoop.makePromise(of: Int64.self)
        let lease = self.lease, client = self.client, options = self.options
        run({ () async -> Result<EtcdTxnResult, EtcdError> in
            do throws(EtcdError) {
                return .success(try await client.txn(
                    compare: [.createRevision(options.key, .equal, token), .lease(options.key, .equal, lease), .value(options.key, .equal, options.node)],
                    success: [.put(key: options.promotionKey, value: "\(options.node) token=\(token) \(what)")],
                    failure: [.range(key: options.key)]))
            } catch {
                return .failure(error)
            }
        }) { [self] outcome in
            switch outcome {
            case .success(let result) where result.succeeded:
                logger.notice("promotion confirmed by etcd", metadata: ["what": .string(what), "token": .stringConvertible(token)])
                promise.succeed(token)
            case .success(let result):
                let holder = Self.describe(result.ranges.first?.first)
                if self.token == token { fence("lost the key before promoting (\(what)): \(holder)") }
                promise.fail(EtcdError(kind: .usage, endpoint: nil, message: "\(what): this node lost \(options.key) (\(holder)); not promoting"))
            case .failure(let error):
                promise.fail(error)
            }
        }
        return promise.futureResult
    }

    /// Reads who holds the key of `pair` (nil: nobody).
    func holder(pair: String) async throws(EtcdError) -> EtcdKeyValue? {
        var other = options
        other.pair = pair
        return try await client.get(other.key)
    }

    // MARK: - The end of the run

    /// At the end of the run: a holder pauses its guarded domains (`pause`) and, once they
    /// are paused, revokes its lease so the peer takes over at once; a node that does not
    /// hold the key revokes its lease. Then the HTTP client closes.
    func shutdown(pause: @escaping (String) -> EventLoopFuture<Bool>) -> EventLoopFuture<Void> {
        eventLoop.preconditionInEventLoop()
        guard !stopped else { return eventLoop.makeSucceededVoidFuture() }
        stopped = true
        renewTimer?.cancel()
        renewTimer = nil
        fenceTimer?.cancel()
        fenceTimer = nil
        let paused: EventLoopFuture<Bool>
        if let token {
            self.token = nil
            metrics.holding(pair: options.pair, false)
            logger.notice("the run ends while this node holds the key: pausing the guarded domains, then releasing the key (the peer takes over)",
                          metadata: ["token": .stringConvertible(token)])
            paused = pause("colorun is stopping")
        } else {
            paused = eventLoop.makeSucceededFuture(true)
        }
        let lease = self.lease, client = self.client, logger = self.logger
        return paused.flatMap { [self] allPaused in
            let promise = eventLoop.makePromise(of: Void.self)
            promise.completeWithTask {
                if lease != 0 {
                    if allPaused {
                        do { try await client.revokeLease(lease) } catch { logger.info("could not revoke the lease (it expires by itself): \(error)") }
                    } else {
                        logger.critical("a guarded domain did not confirm its pause: the lease is left to expire (the peer waits for the TTL)")
                    }
                }
                await client.shutdown()
            }
            return promise.futureResult
        }
    }
}
