import ColorunSystem
import JSON
import Logging
import LuaRuntime
import NIOCore
import NIOPosix
import QMP
import QMPClient

/// What a run did, for the summary and the exit code.
public struct PolicyReport: Sendable {
    public var outcome: LuaRunOutcome
    public var checkpoints = 0
    public var failedCheckpoints = 0
    public var skippedTicks = 0
    /// Pause of each good checkpoint, in milliseconds.
    public var pauseMilliseconds: [Double] = []
    public var failovers = 0
    /// The newest good generation per checkpoint series ("primary+secondary" or a Remus domain).
    public var lastGood: [String: Int] = [:]
    /// Domains left paused by an earlier, killed run and resumed before this one started.
    public var recovered: [String] = []
    /// Domains the policy left paused that colorun resumed when the run ended.
    public var resumedAtExit: [String] = []
    /// Domains that could not be resumed (with why): an operator must look at them.
    public var unresumed: [String] = []

    init(outcome: LuaRunOutcome) { self.outcome = outcome }
}

/// One run of one policy: the Lua runtime, the domains it drives, the checkpoint stores and
/// the house rules around them.
///
/// The Lua state, the domains' monitor connections and the timers live on one event loop, so
/// the reply to a plain QMP call from Lua (`qmp.execute`, `qmp.stop`, `qmp.resume`) resumes
/// the waiting Lua task with no thread hop, inside the reply's handler
/// (`LuaCompletion.completeNow`), so the task's next command goes out in the same turn of the
/// loop. A `colo.checkpoint` runs on the loop too, as one line of callbacks (each QMP reply
/// starts the next step where it arrives); only its commit leaves the loop, grouped with the
/// other pairs' commits on the blocking-I/O pool (`GroupCommitter`), and comes back once per
/// group. Remus checkpoints and restores, whose
/// steps wait for QEMU's migration and for qemu-img, run as Swift `Task`s that hop to the
/// loop for each QMP command.
///
/// Whatever ends the run (the policy finishing, `policy.stop()`, `stop()` on a signal, an
/// uncaught error), its end waits for in-flight checkpoints to finish or roll back, then
/// resumes every domain this run stopped and did not resume.
public final class PolicySession: @unchecked Sendable {
    let options: PolicyOptions
    public let eventLoop: any EventLoop
    let logger: Logger
    public let runtime: LuaRuntime
    let journal: StopJournal

    // Loop-confined state.
    var domains: [String: Domain] = [:]
    var domainOrder: [String] = []
    var stores: [String: GenerationStore] = [:]
    /// Series whose store is being opened on `blockingIO`, with who waits for it.
    var storesOpening: [String: [(Result<GenerationStore, LuaHostError>) -> Void]] = [:]
    /// This run's staging directory under `options.runtimeDirectory`, made with the first staged store.
    var stagingRun: String?
    var inFlight = 0
    var idleWaiters: [EventLoopPromise<Void>] = []
    var report = PolicyReport(outcome: .finished)
    /// Timers, event subscriptions and lost-domain watches, by the id Lua holds.
    var handles: [Int: any PolicyHandle] = [:]
    var nextHandleID = 1
    var tunedForRemus: Set<String> = []
    /// Remus domains' output buffers and layer names, by domain (RemusBindings.swift).
    var remusStates: [String: RemusDomainState] = [:]
    /// Threads for blocking file work: one drains the group commits of `colo.checkpoint`
    /// (however many pairs), the others serve Remus commits (fsync of a memory file and
    /// disk images) and `qemu-img` for standbys, a few at once.
    let blockingIO: NIOThreadPool
    /// False when the pool is `options.sharedBlockingIO` (its owner starts and stops it).
    let ownsBlockingIO: Bool
    /// Makes the generations of the pairs' checkpoints durable in groups (on `blockingIO`).
    let committer: GroupCommitter
    /// Domains in a checkpoint or restore now: a second one on the same domain is refused.
    var busyDomains: Set<String> = []
    /// Pipelined `colo.checkpoint`s answered before their commit, per series (at most `pipelineDepth`).
    var pipelinedCommits: [String: Int] = [:]
    /// A pipelined generation's failed commit, raised by the series' next call.
    var pipelinedCommitFailures: [String: CheckpointError] = [:]
    /// Domains a resume keeper is retrying `cont` on.
    var keepers: Set<String> = []
    /// The Lua half of `colo.policy` (set by the prelude).
    var declarative: LuaRef?
    var stopping = false
    /// Declarative failovers in progress: domain name -> window, and whether a window's
    /// failover has been counted (`countFailover(of:)`).
    var failoverWindows: [String: Int] = [:]
    var windowCounted: [Int: Bool] = [:]
    var nextFailoverWindow = 0
    /// Extra Lua modules and shutdown work (the lab adds its own).
    var extensions: [any PolicyExtension] = []
    /// Starts standbys for `remus.restore` specs marked `lab = true` (set by the lab).
    var labLauncher: (any StandbyLauncher)?
    let detachedLauncher = DetachedStandbyLauncher()
    /// The etcd arbiter of a two-host pair (`--etcd`), and the domains it fences when this
    /// node loses the key (`cluster.guard`, restored standbys).
    var arbiter: Arbiter?
    var guarded: Set<String> = []

    /// Creates the runtime and binds colorun's modules. Call on `eventLoop`.
    public init(options: PolicyOptions, eventLoop: any EventLoop, logger: Logger,
                extensions: [any PolicyExtension] = []) throws(PolicyError) {
        eventLoop.preconditionInEventLoop()
        self.options = options
        self.eventLoop = eventLoop
        self.logger = logger
        if let slice = options.loopSlice {
            let error = setThreadSlice(nanoseconds: UInt64(max(0, slice.nanoseconds)))
            if error != 0 {
                logger.debug("the kernel refused the event loop's time slice", metadata: ["slice-ns": "\(slice.nanoseconds)", "errno": "\(error)"])
            }
        }
        blockingIO = options.sharedBlockingIO ?? NIOThreadPool(numberOfThreads: 4)
        ownsBlockingIO = options.sharedBlockingIO == nil
        committer = GroupCommitter(pool: blockingIO, eventLoop: eventLoop)
        do {
            journal = try StopJournal(
                directory: options.journalDirectory,
                adopting: options.runtimeDirectory == nil ? nil : options.stateDirectory + "/journal")
        } catch {
            throw .setup("state directory: \(error)")
        }
        do {
            var luaLogger = logger
            luaLogger[metadataKey: "policy"] = .string(options.policyPath)
            runtime = try LuaRuntime(eventLoop: eventLoop, options: options.lua, logger: luaLogger)
        } catch {
            throw .setup("cannot create the Lua runtime: \(error)")
        }
        self.extensions = extensions
        for spec in options.domains {
            var domainOptions = options.domainOptions
            domainOptions.shared = spec.shared
            _ = try addDomain(name: spec.name, endpoint: spec.endpoint, options: domainOptions)
        }
        do {
            try registerBindings()
            for ext in extensions { try ext.register(in: self) }
        } catch {
            throw .setup("cannot bind colorun's Lua modules: \(error)")
        }
        try startArbiter()
        if ownsBlockingIO { blockingIO.start() }
        runtime.addShutdownHook { [self] outcome in self.shutdown(outcome) }
    }

    // MARK: - Domains

    /// Adds a named domain; adding the same name and endpoint again returns the existing one.
    func addDomain(name: String, endpoint: QMPEndpoint, options domainOptions: DomainOptions) throws(PolicyError) -> Domain {
        if let existing = domains[name] {
            guard existing.endpoint == endpoint else {
                throw .usage("domain '\(name)' is already bound to \(existing.endpoint), not \(endpoint)")
            }
            guard existing.isShared == domainOptions.shared else {
                let mode = { (shared: Bool) in shared ? "shared" : "not shared" }
                throw .usage("domain '\(name)' is already open \(mode(existing.isShared)), not \(mode(domainOptions.shared)) (--shared NAME, or shared = true)")
            }
            return existing
        }
        guard DomainSpec.isValidName(name) else {
            throw .usage("bad domain name '\(name)': use letters, digits, '-', '_' and '.'")
        }
        let domain = Domain(name: name, endpoint: endpoint, eventLoop: eventLoop, options: domainOptions,
                            journal: journal, logger: logger)
        domains[name] = domain
        domainOrder.append(name)
        return domain
    }

    /// Makes a domain the policy asks for by a name nobody gave (simulated domains of `--sim`).
    var domainProvider: ((String) throws(LuaHostError) -> Domain)?

    func domain(named name: String) throws(LuaHostError) -> Domain {
        if domains[name] == nil, DomainSpec.isValidName(name) {
            if let domainProvider {
                return try domainProvider(name)
            }
            if options.acceptAnyDomain, let dry = try? addDomain(
                name: name, endpoint: .unix(path: "/nonexistent/colorun-check/\(name)"), options: options.domainOptions) {
                return dry
            }
        }
        guard let domain = domains[name] else {
            let known = domainOrder.isEmpty ? "none" : domainOrder.joined(separator: ", ")
            throw LuaHostError.message("unknown domain '\(name)' (known: \(known); name domains with --domain NAME=unix:PATH)")
        }
        return domain
    }

    /// The domains of this run, in the order they were added. Callable from any thread.
    public func domainNames() -> EventLoopFuture<[String]> {
        eventLoop.submit { [self] in domainOrder }
    }

    /// The policy's global environment now (for `colorun check`). Callable from any thread.
    public func environmentSnapshot() -> EventLoopFuture<LuaEnvironmentSnapshot> {
        eventLoop.submit { [self] in runtime.environmentSnapshot() }
    }

    // MARK: - Running

    /// Repairs what an earlier, killed run left paused, runs the policy, and completes when
    /// the run has ended and every domain it stopped runs again. Callable from any thread.
    public func run() -> EventLoopFuture<PolicyReport> {
        eventLoop.flatSubmit { [self] in
            recoverJournal().flatMap { [self] () -> EventLoopFuture<LuaRunOutcome> in
                // stop() came first (a SIGTERM at start-up): the policy never starts, and the
                // end of the run still does its work (what the recovery connected is closed).
                if stopping {
                    return shutdown(.stopped).map { LuaRunOutcome.stopped }
                }
                if let duration = options.duration {
                    eventLoop.scheduleTask(in: duration) { [self] in
                        logger.info("--duration reached; stopping")
                        stop()
                    }
                }
                return runtime.start(policyAt: options.policyPath, arguments: options.arguments)
            }.map { [self] outcome in
                report.outcome = outcome
                return report
            }
        }
    }

    /// Ends the run cleanly: no new work starts, in-flight checkpoints finish or roll back,
    /// and every domain this run stopped is resumed. Callable from any thread.
    public func stop() {
        eventLoop.execute { [self] in
            stopping = true
            runtime.stop()
        }
    }

    /// Resumes domains an earlier run journaled as stopped by it and never resumed.
    func recoverJournal() -> EventLoopFuture<Void> {
        let entries = journal.entries().filter { !StopJournal.writerIsAlive($0) }
        guard !entries.isEmpty else { return eventLoop.makeSucceededVoidFuture() }
        if options.arbiter != nil {
            // A paused primary may resume only under the key: the policy decides once it has won it.
            for entry in entries {
                logger.warning("a previous run left this domain paused; with an arbiter it is not resumed here (the policy resumes it after winning the key)",
                               metadata: ["domain": .string(entry.domain), "previous-pid": .stringConvertible(entry.pid)])
            }
            return eventLoop.makeSucceededVoidFuture()
        }
        var futures: [EventLoopFuture<Void>] = []
        for entry in entries {
            guard let endpoint = try? QMPEndpoint(parsing: entry.endpoint) else {
                logger.error("stop journal entry with a bad endpoint; removing it", metadata: ["domain": .string(entry.domain)])
                journal.didResume(domain: entry.domain)
                continue
            }
            let domain: Domain
            if let known = domains[entry.domain], known.endpoint == endpoint {
                domain = known
            } else {
                domain = Domain(name: entry.domain, endpoint: endpoint, eventLoop: eventLoop, options: options.domainOptions,
                                journal: journal, logger: logger)
            }
            let recovered = recover(entry, domain: domain)
            if domains[entry.domain] !== domain {
                // A domain only the journal names: its monitor is not the run's to keep.
                recovered.assumeIsolated().whenComplete { _ in domain.dropConnection() }
            }
            futures.append(recovered)
        }
        return EventLoopFuture.andAllComplete(futures, on: eventLoop)
    }

    private func recover(_ entry: StopJournal.Entry, domain: Domain) -> EventLoopFuture<Void> {
        let metadata: Logger.Metadata = ["domain": .string(entry.domain), "previous-pid": .stringConvertible(entry.pid)]
        return domain.request("query-status").flatMap { [self] result -> EventLoopFuture<Void> in
            let status: JSONValue
            switch result {
            case .failure(let error):
                logger.error("a previous run left this domain stopped and its monitor does not answer; keeping the journal entry for the next run",
                             metadata: metadata.merging(["error": .string(error.description)]) { a, _ in a })
                report.unresumed.append("\(entry.domain): \(error)")
                return eventLoop.makeSucceededVoidFuture()
            case .success(let value):
                status = value
            }
            let state = status["status"]?.stringValue ?? ""
            guard ["paused", "postmigrate", "finish-migrate"].contains(state) else {
                logger.info("journal entry of a previous run: the domain is \(state), nothing to resume", metadata: metadata)
                journal.didResume(domain: entry.domain)
                return eventLoop.makeSucceededVoidFuture()
            }
            return domain.requestResume().map { [self] result in
                switch result {
                case .success:
                    logger.warning("resumed a domain that a previous colorun run left \(state)", metadata: metadata)
                    report.recovered.append(entry.domain)
                case .failure(let error):
                    logger.error("cannot resume a domain a previous run left \(state)",
                                 metadata: metadata.merging(["error": .string(error.description)]) { a, _ in a })
                    report.unresumed.append("\(entry.domain): \(error)")
                }
            }
        }
    }

    // MARK: - In-flight work

    /// Runs a multi-step operation (a checkpoint) that must finish or roll back even if the
    /// run ends meanwhile; the run's end waits for it.
    func track<T: Sendable>(_ operation: @escaping @Sendable () async -> T, then: @escaping (T) -> Void) {
        let box = UncheckedSendable(then)
        track({ [eventLoop] done in
            let finish = UncheckedSendable(done)
            Task {
                let value = await operation()
                eventLoop.execute { finish.value(value) }
            }
        }, then: { box.value($0) })
    }

    /// The same for an operation that runs on the loop: `start` is called now and calls its
    /// argument once, on the loop, with the outcome.
    func track<T>(_ start: (@escaping (T) -> Void) -> Void, then: @escaping (T) -> Void) {
        inFlight += 1
        start { [self] value in
            eventLoop.preconditionInEventLoop()
            inFlight -= 1
            then(value)
            if inFlight == 0 {
                let waiters = idleWaiters
                idleWaiters = []
                for waiter in waiters { waiter.succeed() }
            }
        }
    }

    func waitIdle() -> EventLoopFuture<Void> {
        if inFlight == 0 { return eventLoop.makeSucceededVoidFuture() }
        let promise = eventLoop.makePromise(of: Void.self)
        idleWaiters.append(promise)
        return promise.futureResult
    }

    // MARK: - Resume keepers

    /// Keeps sending `cont` (every `interval`) to a domain this run stopped and could not
    /// resume (a frozen QEMU, a monitor that hangs) until it runs again, its QEMU is gone, or
    /// the run ends (whose end tries once more).
    func keepResuming(_ domain: Domain, interval: TimeAmount = .milliseconds(500), attempt: Int = 1) {
        guard !stopping, domain.stoppedByUs else {
            keepers.remove(domain.name)
            return
        }
        if attempt == 1 {
            guard keepers.insert(domain.name).inserted else { return }
            logger.warning("a domain this run stopped could not be resumed; retrying until it runs", metadata: ["domain": .string(domain.name)])
        }
        eventLoop.assumeIsolated().scheduleTask(in: interval) { [self] in
            guard !stopping, domain.stoppedByUs else {
                keepers.remove(domain.name)
                return
            }
            domain.sendResume { [self] result in
                switch result {
                case .success:
                    keepers.remove(domain.name)
                    logger.warning("resumed a domain after \(attempt) retries", metadata: ["domain": .string(domain.name)])
                case .failure(let error) where error.monitorGone:
                    keepers.remove(domain.name)   // sendResume forgot the stop and logged it
                case .failure(let error):
                    if error.errorClass == DomainError.timeout || error.errorClass == DomainError.protocolError {
                        domain.dropConnection()
                    }
                    keepResuming(domain, interval: interval, attempt: attempt + 1)
                }
            }
        }
    }

    // MARK: - The end of a run

    func shutdown(_ outcome: LuaRunOutcome) -> EventLoopFuture<Void> {
        stopping = true
        for handle in handles.values { handle.cancel() }
        handles.removeAll()
        if inFlight > 0 {
            logger.info("waiting for \(inFlight) in-flight checkpoint(s) to finish or roll back")
        }
        return waitIdle().flatMap { [self] in
            resumeStoppedDomains()
        }.flatMap { [self] in
            removeOutputBuffers()
        }.flatMap { [self] in
            arbiter?.shutdown(pause: { [self] reason in fenceGuarded(reason) }) ?? eventLoop.makeSucceededVoidFuture()
        }.flatMap { [self] in
            for domain in domains.values { domain.dropConnection() }
            if let stagingRun { removeTree(stagingRun) }
            if ownsBlockingIO { blockingIO.shutdownGracefully { _ in } }
            return EventLoopFuture.andAllComplete(extensions.map { $0.shutdown(session: self) }, on: eventLoop)
        }
    }

    /// Resumes every domain this run stopped and did not resume.
    func resumeStoppedDomains() -> EventLoopFuture<Void> {
        var futures: [EventLoopFuture<Void>] = []
        for name in domainOrder {
            guard let domain = domains[name], domain.stoppedByUs else { continue }
            futures.append(domain.requestResume().map { [self] result in
                switch result {
                case .success:
                    logger.warning("resumed a domain the policy left stopped", metadata: ["domain": .string(name)])
                    report.resumedAtExit.append(name)
                case .failure(let error) where error.monitorGone:
                    break   // sendResume forgot the stop and logged it: nothing is paused
                case .failure(let error):
                    logger.error("could not resume a domain this run stopped", metadata: ["domain": .string(name), "error": .string(error.description)])
                    report.unresumed.append("\(name): \(error)")
                }
            })
        }
        return EventLoopFuture.andAllComplete(futures, on: eventLoop)
    }
}

/// Something that adds Lua modules to a session and work to its end (the lab, tests).
public protocol PolicyExtension: AnyObject {
    func register(in session: PolicySession) throws
    func shutdown(session: PolicySession) -> EventLoopFuture<Void>
}

struct UncheckedSendable<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}
