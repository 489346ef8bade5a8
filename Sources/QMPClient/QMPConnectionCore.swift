import JSON
import Logging
import NIOCore
import QMP
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// State a connection shares across threads: read anywhere, written on the loop.
final class QMPConnectionShared: Sendable {
    let closing = Atomic<Bool>(false)
    let droppedEvents = Atomic<Int>(0)
    let nextSubscriptionKey = Atomic<Int>(1)
}

/// Counts the events one stream subscriber lost because its buffer was full.
final class QMPDropCounter: Sendable {
    let value = Atomic<Int>(0)
}

/// Everything a connection is configured with: what both forms of `QMPConnection.connect`
/// (future and async) take, with the defaults in one place.
public struct QMPConnectOptions: Sendable {
    public static let defaultConnectTimeout = TimeAmount.seconds(5)
    public static let defaultGreetingTimeout = TimeAmount.seconds(3)
    public static let defaultCommandTimeout = TimeAmount.seconds(30)

    public var endpoint: QMPEndpoint
    /// How long to retry ENOENT/ECONNREFUSED (QEMU creates its socket file before it
    /// listens) and to wait for the TCP handshake.
    public var connectTimeout: TimeAmount
    /// How long to wait for the greeting once connected. QEMU greets a second client only
    /// after the first disconnects, so this is the "monitor busy" signal.
    public var greetingTimeout: TimeAmount
    /// The default for commands sent without a timeout.
    public var commandTimeout: TimeAmount
    /// Ask for out-of-band execution when the server offers it.
    public var enableOOB: Bool
    public var maxLineLength: Int
    public var logger: Logger

    public init(
        endpoint: QMPEndpoint,
        connectTimeout: TimeAmount = defaultConnectTimeout,
        greetingTimeout: TimeAmount = defaultGreetingTimeout,
        commandTimeout: TimeAmount = defaultCommandTimeout,
        enableOOB: Bool = true,
        maxLineLength: Int = QMPLineFramer.defaultMaxLineLength,
        logger: Logger
    ) {
        self.endpoint = endpoint
        self.connectTimeout = connectTimeout
        self.greetingTimeout = greetingTimeout
        self.commandTimeout = commandTimeout
        self.enableOOB = enableOOB
        self.maxLineLength = maxLineLength
        self.logger = logger
    }
}

/// The heart of a connection: the handshake, commands in flight, timeouts, event fan-out.
///
/// It lives on the channel's event loop and is only touched there (the public
/// `QMPConnection` reaches it through `NIOLoopBound`), so it needs no locks. Completions
/// and event callbacks run on the loop, synchronously, with no hop.
final class QMPConnectionCore {
    typealias Completion = (Result<JSONValue, QMPClientError>) -> Void

    typealias Token = Completion

    enum Subscriber {
        case callback((QMPEvent) -> Void)
        case stream(AsyncStream<QMPEvent>.Continuation, QMPDropCounter)
    }

    enum Phase: Equatable {
        case awaitingGreeting
        case negotiating
        case ready
        case closed
    }

    let options: QMPConnectOptions
    let eventLoop: any EventLoop
    let shared = QMPConnectionShared()
    /// Succeeds with the greeting once `qmp_capabilities` succeeded.
    let readyPromise: EventLoopPromise<QMPGreeting>
    /// Succeeds (never fails) with the reason once the connection is closed.
    let closePromise: EventLoopPromise<QMPCloseReason>

    private(set) var phase = Phase.awaitingGreeting
    private(set) var greeting: QMPGreeting?
    private(set) var outOfBandEnabled = false
    private var table = QMPRequestTable<Token>()
    private var context: ChannelHandlerContext?
    /// A flush of lines written with `deferFlush` is due at the end of this turn of the loop.
    private var flushScheduled = false
    private var greetingTimer: Scheduled<Void>?
    /// One timer, armed for the earliest command deadline.
    private var sweepTimer: Scheduled<Void>?
    private var sweepDeadline: NIODeadline?
    private var closeReason: QMPCloseReason?
    private var subscribers: [(key: Int, subscriber: Subscriber)] = []
    private var logger: Logger

    var endpoint: QMPEndpoint { options.endpoint }
    var pendingCount: Int { table.count }

    init(options: QMPConnectOptions, eventLoop: any EventLoop) {
        self.options = options
        self.eventLoop = eventLoop
        self.readyPromise = eventLoop.makePromise()
        self.closePromise = eventLoop.makePromise()
        var logger = options.logger
        logger[metadataKey: "qmp.endpoint"] = "\(options.endpoint)"
        self.logger = logger
    }

    // MARK: Channel events (from QMPChannelHandler)

    func attach(_ context: ChannelHandlerContext) {
        self.context = context
    }

    func channelActive() {
        guard phase == .awaitingGreeting, greetingTimer == nil else { return }
        let after = options.greetingTimeout
        greetingTimer = eventLoop.assumeIsolated().scheduleTask(in: after) {
            guard self.phase == .awaitingGreeting else { return }
            self.logger.warning("no QMP greeting; another client may hold the monitor", metadata: ["after": "\(formatDuration(after))"])
            self.readyPromise.fail(QMPClientError.greetingTimeout(endpoint: self.endpoint, after: after))
            self.closeByClient()
        }
    }

    func receive(_ message: QMPServerMessage) {
        guard phase != .closed else { return }
        switch message {
        case .greeting(let greeting):
            guard phase == .awaitingGreeting else {
                protocolViolation(.unexpectedMessage("a second greeting: \(message.json)"))
                return
            }
            receiveGreeting(greeting)
        case .reply(let reply):
            guard phase != .awaitingGreeting else {
                protocolViolation(.unexpectedMessage("a reply before the greeting: \(message.json)"))
                return
            }
            route(reply)
        case .event(let event):
            publish(event)
        }
    }

    func errorCaught(_ error: any Error) {
        if let protocolError = error as? QMPProtocolError {
            protocolViolation(protocolError)
            return
        }
        // Errors after we decided to close (e.g. the decoder refusing data after its own error) add nothing.
        guard closeReason == nil, phase != .closed else { return }
        if let tls = error as? QMPTLSFailure {
            closeReason = .tlsFailure(tls.description)
            logger.debug("QMP TLS failure", metadata: ["error": "\(tls)"])
            context?.close(promise: nil)
            return
        }
        if let io = error as? IOError, io.errnoCode == ECONNRESET {
            closeReason = .connectionReset
        } else {
            closeReason = .ioError("\(error)")
        }
        logger.debug("QMP connection error", metadata: ["error": "\(error)"])
        context?.close(promise: nil)
    }

    func channelInactive() {
        finish(closeReason ?? .endOfFile)
    }

    func detach() {
        context = nil
        // A channel that never became active (or a pipeline torn down early) still completes its promises.
        finish(closeReason ?? .closedByClient)
    }

    // MARK: Commands

    /// Sends a command. `completion` runs on the loop exactly once, never before `send` returns.
    /// `deferFlush`: flushed with the next command, or at the end of this turn of the loop.
    func send(_ command: String, arguments: [String: JSONValue]?, timeout: TimeAmount?, deferFlush: Bool = false,
              _ completion: @escaping Completion) {
        guard phase != .closed, phase != .awaitingGreeting, let context else {
            let error = QMPClientError.disconnected(command: command, reason: closeReason ?? .closedByClient, endpoint: endpoint)
            eventLoop.assumeIsolated().execute { completion(.failure(error)) }
            return
        }
        let after = timeout ?? options.commandTimeout
        let deadline = eventLoop.now + after
        table.append(command: command, timeout: after, deadline: deadline, token: completion)
        armSweep(for: deadline)
        // Encoded straight into the buffer the channel writes (no JSONValue tree, no copy),
        // without an id: replies are matched in order (QMPRequestTable says why).
        var line = context.channel.allocator.buffer(
            capacity: QMPCommandLineEncoder.estimatedLength(name: command, hasArguments: arguments != nil))
        QMPCommandLineEncoder.write(name: command, arguments: arguments, id: nil, into: &line)
        guard deferFlush else {
            context.writeAndFlush(NIOAny(line), promise: nil)
            return
        }
        context.write(NIOAny(line), promise: nil)
        guard !flushScheduled else { return }
        flushScheduled = true
        eventLoop.assumeIsolated().execute {
            self.flushScheduled = false
            self.context?.flush()
        }
    }

    private func armSweep(for deadline: NIODeadline) {
        if let armed = sweepDeadline, armed <= deadline { return }
        sweepTimer?.cancel()
        sweepDeadline = deadline
        sweepTimer = eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
            self.sweep()
        }
    }

    /// Fails the commands whose deadline passed, then re-arms for the next deadline.
    private func sweep() {
        sweepTimer = nil
        sweepDeadline = nil
        guard phase != .closed else { return }
        for pending in table.expire(now: eventLoop.now) {
            logger.debug("QMP command timed out", metadata: ["command": "\(pending.command)"])
            pending.token(.failure(.timeout(command: pending.command, after: pending.timeout, endpoint: endpoint)))
        }
        if let next = table.earliestDeadline { armSweep(for: next) }
    }

    private func receiveGreeting(_ greeting: QMPGreeting) {
        greetingTimer?.cancel()
        greetingTimer = nil
        self.greeting = greeting
        phase = .negotiating
        let askOOB = options.enableOOB && greeting.capabilities.contains("oob")
        let arguments: [String: JSONValue]? = askOOB ? ["enable": ["oob"]] : nil
        send("qmp_capabilities", arguments: arguments, timeout: nil) { result in
            switch result {
            case .success:
                guard self.phase == .negotiating else { return }
                self.phase = .ready
                self.outOfBandEnabled = askOOB
                self.logger.debug("QMP negotiated", metadata: ["qemu": "\(greeting.qemuVersion)", "oob": "\(askOOB)"])
                self.readyPromise.succeed(greeting)
            case .failure(let error):
                switch error {
                case .disconnected(_, let reason, _):
                    self.readyPromise.fail(QMPClientError.connectFailed(
                        endpoint: self.endpoint, reason: "the connection ended during capabilities negotiation: \(reason)"))
                default:
                    self.readyPromise.fail(error)
                }
                self.closeByClient()
            }
        }
    }

    private func route(_ reply: QMPReply) {
        switch table.route(reply) {
        case .matched(let pending):
            complete(pending, reply.result)
        case .late(let command):
            logger.debug("dropping the late reply of a timed-out QMP command", metadata: ["command": "\(command)", "reply": "\(reply.json)"])
        case .unexpectedID(let id):
            // colorun sends no ids: this answers nothing it asked, and the replies after it
            // can no longer be matched in order.
            protocolViolation(.unexpectedMessage("a reply with an id colorun never sent (\(id)): \(reply.json)"))
        case .unmatched:
            logger.warning("dropping a QMP reply while no command is in flight", metadata: ["reply": "\(reply.json)"])
        }
    }

    private func complete(_ pending: QMPRequestTable<Token>.Pending, _ result: Result<JSONValue, QMPErrorBodyError>) {
        // The sweep timer stays armed: it finds nothing expired and re-arms (or not) then.
        switch result {
        case .success(let value):
            pending.token(.success(value))
        case .failure(let error):
            pending.token(.failure(.commandFailed(command: pending.command, error.body, endpoint: endpoint)))
        }
    }

    // MARK: Events

    func subscribe(key: Int, _ subscriber: Subscriber) {
        guard phase != .closed else {
            if case .stream(let continuation, _) = subscriber { continuation.finish() }
            return
        }
        subscribers.append((key: key, subscriber: subscriber))
    }

    func unsubscribe(key: Int) {
        subscribers.removeAll { $0.key == key }
    }

    private func publish(_ event: QMPEvent) {
        // Iterate a copy: a callback may subscribe or cancel.
        for (_, subscriber) in subscribers {
            switch subscriber {
            case .callback(let body):
                body(event)
            case .stream(let continuation, let counter):
                if case .dropped = continuation.yield(event) {
                    counter.value.add(1, ordering: .relaxed)
                    shared.droppedEvents.add(1, ordering: .relaxed)
                }
            }
        }
    }

    // MARK: Closing

    func closeByClient() {
        if closeReason == nil { closeReason = .closedByClient }
        shared.closing.store(true, ordering: .relaxed)
        if let context {
            context.close(promise: nil)
        } else {
            finish(closeReason ?? .closedByClient)
        }
    }

    private func protocolViolation(_ error: QMPProtocolError) {
        guard phase != .closed else { return }
        logger.error("QMP protocol error; closing the connection", metadata: ["error": "\(error)"])
        if closeReason == nil { closeReason = .protocolError(error) }
        shared.closing.store(true, ordering: .relaxed)
        // Fail what is pending now, with the protocol error, before the channel closes.
        failAllPending(.protocolError(error))
        readyPromise.fail(QMPClientError.protocolError(error, command: nil, endpoint: endpoint))
        context?.close(promise: nil)
    }

    private func failAllPending(_ reason: QMPCloseReason) {
        for pending in table.removeAll() {
            let error: QMPClientError
            if case .protocolError(let protocolError) = reason {
                error = .protocolError(protocolError, command: pending.command, endpoint: endpoint)
            } else {
                error = .disconnected(command: pending.command, reason: reason, endpoint: endpoint)
            }
            pending.token(.failure(error))
        }
    }

    private func finish(_ reason: QMPCloseReason) {
        guard phase != .closed else { return }
        phase = .closed
        if closeReason == nil { closeReason = reason }
        shared.closing.store(true, ordering: .relaxed)
        greetingTimer?.cancel()
        greetingTimer = nil
        sweepTimer?.cancel()
        sweepTimer = nil
        sweepDeadline = nil
        logger.debug("QMP connection closed", metadata: ["reason": "\(reason)"])
        failAllPending(reason)
        if case .tlsFailure(let text) = reason {
            readyPromise.fail(QMPClientError.connectFailed(endpoint: endpoint, reason: text))
        } else {
            readyPromise.fail(QMPClientError.connectFailed(endpoint: endpoint, reason: "the connection closed before QMP was ready: \(reason)"))
        }
        let current = subscribers
        subscribers = []
        for (_, subscriber) in current {
            if case .stream(let continuation, _) = subscriber { continuation.finish() }
        }
        closePromise.succeed(reason)
    }
}
