import JSON
import Logging
import NIOCore
import QMP
import QMPClient

/// Connection settings of a domain.
public struct DomainOptions: Sendable {
    /// How long to keep retrying a monitor socket that is not there yet.
    var connectTimeout: TimeAmount = .seconds(5)
    /// How long a command may go unanswered.
    var commandTimeout: TimeAmount = .seconds(5)
    /// Where QMP latency and connection state are recorded.
    public var metrics = ColorunMetrics()
    /// When set, no connection is ever opened: every command fails with class `DryRun` and
    /// this text (`colorun check` runs a policy's main chunk this way).
    public var refuseConnections: String?
    /// Commands this domain refuses, while this run has it stopped, before sending them
    /// (class `Refused`, the text as `desc`): the lab's plain QEMU refuses Xen's
    /// `xen-load-devices-state`, which aborts a paused QEMU's incoming state (on a running
    /// one QEMU answers an error and nothing breaks). `colo.checkpoint` and `colo.policy`
    /// refuse such a secondary before they stop anything.
    public var refusedCommands: [String: String] = [:]
    /// Shared mode: connect, negotiate, send and close for each command or burst of
    /// commands in flight together, as libxl does, so another client (xl, qm, libvirt) gets
    /// the monitor in between. Events arrive only while a command is in flight, and a lost
    /// monitor is seen by the next command (heartbeats become polls).
    var shared = false

    public init(connectTimeout: TimeAmount = .seconds(5), commandTimeout: TimeAmount = .seconds(5)) {
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
    }
}

/// Counters and timings one domain keeps for the summary and the metrics.
struct DomainStats: Sendable, Hashable {
    var commands = 0
    var failures = 0
    var connects = 0
    var disconnects = 0
    var totalLatencySeconds = 0.0
}

/// A VM as colorun sees it: a name, a QMP monitor and what this run did to it.
///
/// The monitor connection opens on first use, is shared by every task (QEMU serves one
/// client per monitor) and opens again after the peer comes back. Before colorun stops a
/// domain it journals the fact; after it resumes it, it clears the entry, so a run killed
/// in between is repaired by the next one.
///
/// A domain is confined to the run's event loop, like the Lua state: its callback API
/// (`send`, `sendStop`, `sendResume`, `onEvent`) must be called on that loop and calls back
/// on it, with no thread hop; the async API (`execute`, `stop`, `resume`) may be used from
/// anywhere and hops to the loop.
final class Domain: CheckpointTarget, @unchecked Sendable {
    let name: String
    let endpoint: QMPEndpoint
    let eventLoop: any EventLoop
    let options: DomainOptions
    let journal: StopJournal?
    let logger: Logger

    private var connection: QMPConnection?
    private var connectWaiters: [(Result<QMPConnection, DomainError>) -> Void]?
    /// Shared mode: commands sent on the current connection and not yet answered.
    private var sharedInFlight = 0
    /// Shared mode: when the current connection was opened.
    private var sharedOpenedAt: NIODeadline?
    /// Shared mode: the current connection has been held long enough: it closes once its
    /// commands are answered, and these callers wait for the next one.
    private var sharedRetiring = false
    private var sharedWaiters: [(Result<QMPConnection, DomainError>) -> Void] = []
    /// Shared mode: the longest a connection stays open while commands keep coming, so a
    /// policy that never pauses still lets other clients in.
    static let sharedBurstLimit = TimeAmount.milliseconds(200)
    private var eventHandlers: [(id: Int, event: String, handler: (QMPEvent) -> Void)] = []
    private var closeHandlers: [(id: Int, handler: (String) -> Void)] = []
    private var nextHandlerID = 1
    private var warnedSimulated = false
    /// The last connection ended without colorun closing it (QEMU died or dropped us).
    private var monitorLost = false
    static let reconnectTimeout = TimeAmount.milliseconds(500)
    /// True from the moment this run sends `stop` until a `cont` succeeds.
    private(set) var stoppedByUs = false
    /// Why the arbiter fenced this domain (its node lost the key): while set, `cont` is
    /// refused whoever sends it (a checkpoint's resume, the end of the run, the policy).
    private(set) var fencedReason: String?
    private(set) var stats = DomainStats()
    /// The greeting of the current (or last) connection.
    private(set) var greeting: QMPGreeting?
    /// Who started this domain's QEMU (the lab) says here what became of it, for a connect
    /// failure's message: exited with what on stderr, or running with its socket gone.
    var connectFailureContext: (@Sendable () -> String?)?

    init(name: String, endpoint: QMPEndpoint, eventLoop: any EventLoop, options: DomainOptions = DomainOptions(),
                journal: StopJournal? = nil, logger: Logger) {
        self.name = name
        self.endpoint = endpoint
        self.eventLoop = eventLoop
        self.options = options
        self.journal = journal
        var logger = logger
        logger[metadataKey: "domain"] = .string(name)
        self.logger = logger
    }

    var isConnected: Bool { connection?.isActive ?? false }
    var isShared: Bool { options.shared }

    // MARK: - The connection

    /// Calls `body` with an open connection, opening one if needed. `body` runs on the loop.
    /// A `timeout` (a command's) bounds the connect too: a command given 1 s does not wait the
    /// 5 s connect timeout for a monitor that is unreachable (the fencing path's `stop` of a
    /// peer whose host is cut off or dead).
    func withConnection(timeout: TimeAmount? = nil, _ body: @escaping (Result<QMPConnection, DomainError>) -> Void) {
        if let refusal = options.refuseConnections {
            body(.failure(DomainError(domain: name, command: "connect", errorClass: "DryRun", desc: refusal)))
            return
        }
        if let connection, connection.isActive {
            if options.shared {
                if sharedRetiring {
                    sharedWaiters.append(body)
                    return
                }
                scheduleSharedIdleCheck()
            }
            body(.success(connection))
            return
        }
        if connectWaiters != nil {
            connectWaiters!.append(body)
            return
        }
        connectWaiters = [body]
        // After the monitor was lost, do not wait the full connect timeout for a QEMU that
        // is gone: a monitor that comes back is there at once. A shared monitor that
        // answered before is treated alike (nothing else tells that its QEMU died), but may
        // keep colorun waiting for its greeting while the other program holds it. A command's
        // own timeout bounds its connect too.
        let known = monitorLost || (options.shared && stats.connects > 0)
        var connectTimeout = known ? min(options.connectTimeout, Self.reconnectTimeout) : options.connectTimeout
        if let timeout { connectTimeout = min(connectTimeout, timeout) }
        let greetingTimeout = options.shared ? options.connectTimeout : connectTimeout
        let future = QMPConnection.connect(
            QMPConnectOptions(
                endpoint: endpoint, connectTimeout: connectTimeout, greetingTimeout: greetingTimeout,
                commandTimeout: options.commandTimeout, logger: logger),
            on: eventLoop)
        future.assumeIsolated().whenComplete { result in
            self.connectFinished(result.mapError { error in
                var text = (error as? QMPClientError)?.description ?? "\(error)"
                if let context = self.connectFailureContext?() { text += "; \(context)" }
                return DomainError(domain: self.name, command: "connect", errorClass: DomainError.connectFailed, desc: text)
            })
        }
    }

    private func connectFinished(_ result: Result<QMPConnection, DomainError>) {
        let waiters = connectWaiters ?? []
        connectWaiters = nil
        if case .success(let connection) = result {
            self.connection = connection
            monitorLost = false
            if options.shared {
                sharedOpenedAt = .now()
                sharedRetiring = false
                sharedInFlight = 0
                // Closes the connection again unless a waiter sends a command now.
                scheduleSharedIdleCheck()
            }
            greeting = connection.greeting
            stats.connects += 1
            options.metrics.domain(name, up: true)
            if connection.greeting.package.lowercased().contains("simulated"), !warnedSimulated {
                warnedSimulated = true
                logger.warning("this monitor is a simulated QEMU, not a real VM", metadata: ["package": .string(connection.greeting.package)])
            }
            connection.syncOperations.onEvent { event in
                self.dispatch(event)
            }
            connection.closeFuture.assumeIsolated().whenSuccess { reason in
                self.connectionClosed(connection, reason: reason)
            }
        } else {
            options.metrics.domain(name, up: false)
        }
        for waiter in waiters { waiter(result) }
    }

    private func connectionClosed(_ closed: QMPConnection, reason: QMPCloseReason) {
        guard connection === closed else { return }
        connection = nil
        stats.disconnects += 1
        options.metrics.domain(name, up: false)
        if options.shared, !sharedWaiters.isEmpty {
            sharedRetiring = false
            let waiters = sharedWaiters
            sharedWaiters = []
            for waiter in waiters { withConnection(waiter) }
        }
        guard reason != .closedByClient else { return }
        monitorLost = true
        logger.warning("monitor connection lost", metadata: ["reason": .string(reason.description)])
        let text = reason.description
        for (_, handler) in closeHandlers { handler(text) }
    }

    /// Closes the monitor connection (the next command opens a new one). On the loop.
    func dropConnection() {
        guard let connection else {
            // A shared domain is up from its last good connect until the run lets it go.
            if options.shared, stats.connects > 0 { options.metrics.domain(name, up: false) }
            return
        }
        // connectionClosed ignores a connection that is no longer ours: say it here.
        options.metrics.domain(name, up: false)
        self.connection = nil
        releaseShared(connection)
    }

    // MARK: - Shared mode

    /// After the current turn of the loop, closes a shared connection that has nothing in
    /// flight (a completion that sends its next command at once keeps it: a burst).
    private func scheduleSharedIdleCheck() {
        eventLoop.assumeIsolated().execute {
            self.closeSharedIfIdle()
        }
    }

    private func closeSharedIfIdle() {
        guard options.shared, let connection, sharedInFlight == 0 else { return }
        self.connection = nil
        releaseShared(connection)
    }

    /// Closes a connection that is no longer `connection`; in shared mode, callers waiting
    /// for it to retire connect anew once it is closed (not before: the next connect must
    /// not race the closing one for the monitor).
    private func releaseShared(_ closing: QMPConnection) {
        closing.close(promise: nil)
        guard options.shared else { return }
        sharedRetiring = false
        closing.closeFuture.assumeIsolated().whenComplete { _ in
            let waiters = self.sharedWaiters
            self.sharedWaiters = []
            for waiter in waiters { self.withConnection(waiter) }
        }
    }

    /// Counts a command sent on a shared connection.
    private func sharedCommandStarted(on connection: QMPConnection) {
        guard options.shared, connection === self.connection else { return }
        sharedInFlight += 1
        if let opened = sharedOpenedAt, NIODeadline.now() - opened > Self.sharedBurstLimit {
            sharedRetiring = true
        }
    }

    private func sharedCommandFinished(on connection: QMPConnection) {
        guard options.shared, connection === self.connection else { return }
        sharedInFlight -= 1
        if sharedInFlight == 0 { scheduleSharedIdleCheck() }
    }

    // MARK: - Commands (callback API, on the loop)

    /// Sends one command; `completion` runs on the loop.
    /// `deferFlush`: the command goes out with the next one sent to this domain (in one write),
    /// or at the end of this turn of the loop.
    func send(_ command: String, _ arguments: [String: JSONValue]? = nil, timeout: TimeAmount? = nil, deferFlush: Bool = false,
                     _ completion: @escaping (Result<JSONValue, DomainError>) -> Void) {
        if command == "cont", let fencedReason {
            completion(.failure(DomainError(
                domain: name, command: command, errorClass: DomainError.fenced,
                desc: "fenced (\(fencedReason)): this node does not hold the arbiter's key; the VM stays paused until the node wins the key again")))
            return
        }
        if let why = options.refusedCommands[command], stoppedByUs {
            stats.failures += 1
            completion(.failure(DomainError(domain: name, command: command, errorClass: DomainError.refused, desc: why)))
            return
        }
        let started = NIODeadline.now()
        withConnection(timeout: timeout) { result in
            switch result {
            case .failure(let error):
                self.stats.failures += 1
                completion(.failure(error))
            case .success(let connection):
                self.sharedCommandStarted(on: connection)
                connection.syncOperations.send(command, arguments: arguments, timeout: timeout, deferFlush: deferFlush) { reply in
                    self.sharedCommandFinished(on: connection)
                    self.stats.commands += 1
                    let seconds = Double((NIODeadline.now() - started).nanoseconds) / 1e9
                    self.stats.totalLatencySeconds += seconds
                    if case .failure = reply { self.stats.failures += 1 }
                    // Before the completion: it may resume a Lua task that ends the run, and
                    // a run that has ended has every command it sent counted.
                    self.options.metrics.qmpCommand(command, seconds: seconds, failed: (try? reply.get()) == nil)
                    completion(reply.mapError { self.domainError($0, command: command) })
                }
            }
        }
    }

    func domainError(_ error: QMPClientError, command: String) -> DomainError {
        switch error {
        case .commandFailed(_, let body, _):
            return DomainError(domain: name, command: command, errorClass: body.errorClass, desc: body.desc)
        case .timeout(_, let after, _):
            return DomainError(domain: name, command: command, errorClass: DomainError.timeout,
                               desc: "no reply within \(Double(after.nanoseconds) / 1e9) s")
        case .disconnected(_, let reason, _):
            return DomainError(domain: name, command: command, errorClass: DomainError.disconnected, desc: reason.description)
        case .protocolError(let protocolError, _, _):
            return DomainError(domain: name, command: command, errorClass: DomainError.protocolError, desc: protocolError.description)
        case .connectFailed, .greetingTimeout, .invalidEndpoint:
            return DomainError(domain: name, command: command, errorClass: DomainError.connectFailed, desc: error.description)
        }
    }

    /// `stop`, journaled first. The domain counts as stopped by us from before the command
    /// is sent: a stop whose reply is lost may still have paused the VM.
    func sendStop(timeout: TimeAmount? = nil, deferFlush: Bool = false, _ completion: @escaping (Result<Void, DomainError>) -> Void) {
        if let journal {
            do {
                try journal.willStop(domain: name, endpoint: endpoint.description)
            } catch {
                completion(.failure(DomainError(domain: name, command: "stop", errorClass: "StateDirError", desc: error.description)))
                return
            }
        }
        stoppedByUs = true
        send("stop", nil, timeout: timeout, deferFlush: deferFlush) { completion($0.map { _ in () }) }
    }

    /// `cont`; on success the domain no longer counts as stopped by us. When the monitor is
    /// gone (its QEMU is not running, so nothing is paused) the stop is forgotten too, and
    /// the error still reaches the caller.
    func sendResume(timeout: TimeAmount? = nil, _ completion: @escaping (Result<Void, DomainError>) -> Void) {
        send("cont", nil, timeout: timeout) { result in
            switch result {
            case .success:
                self.markResumed()
            case .failure(let error) where error.monitorGone && self.stoppedByUs:
                self.markResumed()
                self.logger.warning("a domain this run stopped is gone (its monitor refuses connections): nothing left paused")
            case .failure:
                break
            }
            completion(result.map { _ in () })
        }
    }

    /// Counts a domain that is paused for this run's reasons (a standby restored paused on
    /// request) as stopped by us, journaled, so the end of the run resumes it.
    func adoptPaused() throws(DomainError) {
        if let journal {
            do {
                try journal.willStop(domain: name, endpoint: endpoint.description)
            } catch {
                throw DomainError(domain: name, command: "stop", errorClass: "StateDirError", desc: error.description)
            }
        }
        stoppedByUs = true
    }

    /// Fences the domain for the arbiter: from now on `cont` is refused, the pause is not
    /// journaled (the next run must not resume it) and the end of the run does not resume
    /// it; then sends `stop`. A domain whose monitor refuses connections (its QEMU is gone)
    /// counts as fenced: nothing runs.
    func fence(reason: String, timeout: TimeAmount, _ completion: @escaping (Result<Void, DomainError>) -> Void) {
        fencedReason = reason
        if stoppedByUs {
            stoppedByUs = false
            journal?.didResume(domain: name)
        }
        send("stop", nil, timeout: timeout) { result in
            switch result {
            case .success: completion(.success(()))
            case .failure(let error) where error.monitorGone: completion(.success(()))
            case .failure(let error): completion(.failure(error))
            }
        }
    }

    /// Lifts the fence (the node holds the key again): `cont` is allowed; nothing is resumed.
    func unfence() {
        fencedReason = nil
    }

    /// The domain no longer counts as stopped by us: `cont` succeeded, or QEMU resumed it by
    /// itself (COLO's first checkpoint after `colo.native.reprotect`'s stop).
    func markResumed() {
        stoppedByUs = false
        journal?.didResume(domain: name)
    }

    // MARK: - Commands (async API)

    func execute(_ command: String, _ arguments: [String: JSONValue]?) async throws(DomainError) -> JSONValue {
        try await withCheckedContinuation { (continuation: CheckedContinuation<Result<JSONValue, DomainError>, Never>) in
            onLoop { $0.send(command, arguments) { continuation.resume(returning: $0) } }
        }.get()
    }

    func stop() async throws(DomainError) {
        try await withCheckedContinuation { (continuation: CheckedContinuation<Result<Void, DomainError>, Never>) in
            onLoop { $0.sendStop { continuation.resume(returning: $0) } }
        }.get()
    }

    func resume() async throws(DomainError) {
        try await withCheckedContinuation { (continuation: CheckedContinuation<Result<Void, DomainError>, Never>) in
            onLoop { $0.sendResume { continuation.resume(returning: $0) } }
        }.get()
    }

    func disconnect() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            onLoop { domain in
                domain.dropConnection()
                continuation.resume()
            }
        }
    }

    // MARK: - Events

    /// Calls `handler` on the loop for each event named `event` (or every event for "*").
    @discardableResult
    func onEvent(_ event: String, _ handler: @escaping (QMPEvent) -> Void) -> Int {
        let id = nextHandlerID
        nextHandlerID += 1
        eventHandlers.append((id, event, handler))
        return id
    }

    /// Calls `handler` with the reason each time an open monitor connection is lost (not when
    /// colorun closes it).
    @discardableResult
    func onClose(_ handler: @escaping (String) -> Void) -> Int {
        let id = nextHandlerID
        nextHandlerID += 1
        closeHandlers.append((id, handler))
        return id
    }

    func removeHandler(_ id: Int) {
        eventHandlers.removeAll { $0.id == id }
        closeHandlers.removeAll { $0.id == id }
    }

    private func dispatch(_ event: QMPEvent) {
        for (_, name, handler) in eventHandlers where name == "*" || name == event.name {
            handler(event)
        }
    }
}

extension Domain {
    /// Runs `body` with the domain on its loop, from anywhere.
    func onLoop(_ body: @escaping @Sendable (Domain) -> Void) {
        if eventLoop.inEventLoop {
            body(self)
        } else {
            eventLoop.execute { body(self) }
        }
    }

    /// `send` as a future (which never fails: the outcome is the `Result`).
    func request(_ command: String, _ arguments: [String: JSONValue]? = nil,
                                    timeout: TimeAmount? = nil) -> EventLoopFuture<Result<JSONValue, DomainError>> {
        let promise = eventLoop.makePromise(of: Result<JSONValue, DomainError>.self)
        onLoop { d in d.send(command, arguments, timeout: timeout) { promise.succeed($0) } }
        return promise.futureResult
    }

    /// `sendResume` as a future (which never fails: the outcome is the `Result`).
    func requestResume() -> EventLoopFuture<Result<Void, DomainError>> {
        let promise = eventLoop.makePromise(of: Result<Void, DomainError>.self)
        onLoop { d in d.sendResume { promise.succeed($0) } }
        return promise.futureResult
    }
}
