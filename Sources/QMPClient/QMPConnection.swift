import JSON
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import QMP

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// One client connection to a QEMU QMP monitor, negotiated and ready for commands.
///
/// All work happens on one event loop, the one the connection was bound to. Two APIs share
/// that core:
/// - callbacks: `send(_:arguments:timeout:_:)` and `onEvent(_:)`, whose closures run on
///   `eventLoop` (no thread hop when called from the loop); `syncOperations` takes
///   non-`Sendable` closures for callers that live on the loop (the Lua runtime);
/// - async: `execute(_:arguments:timeout:)`, `events`, `close()`.
///
/// Many commands may be in flight; they are sent without an id and their replies are matched
/// in order, as QEMU answers in-band commands (`QMPRequestTable`). QEMU serves one client per
/// `-qmp` socket: hold one connection per monitor and share it.
/// The owner must `close()` it: a dropped `QMPConnection` leaves its channel open.
public final class QMPConnection: Sendable {
    public let endpoint: QMPEndpoint
    /// The server's greeting (QEMU version, capabilities).
    public let greeting: QMPGreeting
    /// The loop the channel is bound to; completions and event callbacks run here.
    public let eventLoop: any EventLoop
    /// The timeout for commands sent without one.
    public let defaultCommandTimeout: TimeAmount
    /// Whether out-of-band execution was negotiated (QEMU offers `oob`; we ask for it unless told not to).
    public let outOfBandEnabled: Bool
    /// Succeeds (never fails) with the reason once the connection has closed.
    public let closeFuture: EventLoopFuture<QMPCloseReason>

    let channel: any Channel
    let core: NIOLoopBound<QMPConnectionCore>
    let shared: QMPConnectionShared

    init(core bound: NIOLoopBound<QMPConnectionCore>, channel: any Channel, greeting: QMPGreeting) {
        let core = bound.value
        self.endpoint = core.endpoint
        self.greeting = greeting
        self.eventLoop = core.eventLoop
        self.defaultCommandTimeout = core.options.commandTimeout
        self.outOfBandEnabled = core.outOfBandEnabled
        self.closeFuture = core.closePromise.futureResult
        self.channel = channel
        self.core = bound
        self.shared = core.shared
    }

    /// False once the connection closed or started closing.
    public var isActive: Bool {
        !shared.closing.load(ordering: .relaxed) && channel.isActive
    }

    /// Events lost by all stream subscribers together because their buffers were full.
    public var droppedEventCount: Int {
        shared.droppedEvents.load(ordering: .relaxed)
    }

    // MARK: Connecting

    /// Connects, reads the greeting and negotiates capabilities; the future succeeds once
    /// commands can be sent. The channel is bound to `group.next()`; pass an `EventLoop` to
    /// choose it.
    public static func connect(_ options: QMPConnectOptions, on group: any EventLoopGroup) -> EventLoopFuture<QMPConnection> {
        makeConnection(options, on: group.next())
    }

    /// The async form of `connect(_:on:)`.
    public static func connect(_ options: QMPConnectOptions, on group: any EventLoopGroup) async throws(QMPClientError) -> QMPConnection {
        do {
            return try await makeConnection(options, on: group.next()).get()
        } catch let error as QMPClientError {
            throw error
        } catch {
            throw .connectFailed(endpoint: options.endpoint, reason: "\(error)")
        }
    }

    /// `connect(_:on:)` (async) with the options spelled out (see `QMPConnectOptions`).
    public static func connect(
        to endpoint: QMPEndpoint,
        on group: any EventLoopGroup,
        connectTimeout: TimeAmount = QMPConnectOptions.defaultConnectTimeout,
        greetingTimeout: TimeAmount = QMPConnectOptions.defaultGreetingTimeout,
        commandTimeout: TimeAmount = QMPConnectOptions.defaultCommandTimeout,
        enableOOB: Bool = true,
        maxLineLength: Int = QMPLineFramer.defaultMaxLineLength,
        logger: Logger
    ) async throws(QMPClientError) -> QMPConnection {
        try await connect(
            QMPConnectOptions(
                endpoint: endpoint, connectTimeout: connectTimeout, greetingTimeout: greetingTimeout,
                commandTimeout: commandTimeout, enableOOB: enableOOB, maxLineLength: maxLineLength, logger: logger),
            on: group)
    }

    private static let retryDelay = TimeAmount.milliseconds(5)

    private static func makeConnection(_ options: QMPConnectOptions, on loop: any EventLoop) -> EventLoopFuture<QMPConnection> {
        let promise = loop.makePromise(of: QMPConnection.self)
        let deadline = NIODeadline.now() + options.connectTimeout
        _ = QMPTLS.warnIfCleartextRemote(options.endpoint, logger: options.logger)
        loop.execute {
            attemptConnect(options, on: loop, deadline: deadline, attempt: 1, lastErrno: nil, promise: promise)
        }
        return promise.futureResult
    }

    private static func attemptConnect(
        _ options: QMPConnectOptions, on loop: any EventLoop, deadline: NIODeadline, attempt: Int,
        lastErrno: Int32?, promise: EventLoopPromise<QMPConnection>
    ) {
        let remaining = deadline - .now()
        // A tls: endpoint's handlers are made here, on the channel's loop, so unreadable
        // certificate files fail the connect at once, naming the file.
        var tls: NIOLoopBound<(NIOSSLClientHandler, QMPTLSFiles)>?
        if case .tls(let host, _, let credentials) = options.endpoint {
            do {
                tls = NIOLoopBound(try QMPTLS.makeHandler(host: host, credentials: credentials), eventLoop: loop)
            } catch {
                promise.fail(QMPClientError.connectFailed(endpoint: options.endpoint, reason: error.description))
                return
            }
        }
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(max(remaining, .milliseconds(1)))
            .channelInitializer { [tls] channel in
                channel.eventLoop.makeCompletedFuture {
                    if let pair = tls?.value {
                        try channel.pipeline.syncOperations.addHandlers([pair.0, QMPTLSDiagnosisHandler(files: pair.1)])
                    }
                    _ = try configurePipeline(channel, options: options)
                }
            }
        let connected: EventLoopFuture<any Channel>
        switch options.endpoint {
        case .unix(let path): connected = bootstrap.connect(unixDomainSocketPath: path)
        case .tcp(let host, let port), .tls(let host, let port, _): connected = bootstrap.connect(host: host, port: port)
        }
        connected.whenComplete { result in
            switch result {
            case .success(let channel):
                let core: QMPConnectionCore
                do {
                    core = try channel.pipeline.syncOperations.handler(type: QMPChannelHandler.self).core
                } catch {
                    channel.close(promise: nil)
                    promise.fail(QMPClientError.connectFailed(endpoint: options.endpoint, reason: "pipeline set-up failed: \(error)"))
                    return
                }
                let bound = NIOLoopBound(core, eventLoop: loop)
                core.readyPromise.futureResult.whenComplete { ready in
                    switch ready {
                    case .success(let greeting):
                        promise.succeed(QMPConnection(core: bound, channel: channel, greeting: greeting))
                    case .failure(let error):
                        channel.close(promise: nil)
                        promise.fail(error)
                    }
                }
            case .failure(let error):
                let errno = connectErrno(error)
                let retryable = errno == ENOENT || errno == ECONNREFUSED
                if retryable, deadline - .now() > retryDelay {
                    _ = loop.scheduleTask(in: retryDelay) {
                        attemptConnect(options, on: loop, deadline: deadline, attempt: attempt + 1, lastErrno: errno, promise: promise)
                    }
                    return
                }
                let isTimeout: Bool
                if let error = error as? ChannelError, case .connectTimeout = error { isTimeout = true } else { isTimeout = false }
                let reason: String
                if let code = retryable ? errno : (isTimeout ? lastErrno : nil) {
                    // Retried until the deadline (the last attempt may have been cut short by it).
                    reason = "nothing accepted the connection within \(formatDuration(options.connectTimeout)) "
                        + "(\(attempt) attempts; last error: \(errnoText(code)))"
                } else if let error = error as? ChannelError, case .connectTimeout(let after) = error {
                    reason = "timed out after \(formatDuration(after))"
                } else {
                    reason = "\(error)"
                }
                promise.fail(QMPClientError.connectFailed(endpoint: options.endpoint, reason: reason))
            }
        }
    }

    /// Adds the QMP handler (it frames and classifies what the channel reads; the core
    /// encodes commands into the buffers it writes) to `channel`'s pipeline (on its loop)
    /// and returns the core that drives the connection.
    static func configurePipeline(_ channel: any Channel, options: QMPConnectOptions) throws -> QMPConnectionCore {
        let core = QMPConnectionCore(options: options, eventLoop: channel.eventLoop)
        try channel.pipeline.syncOperations.addHandler(QMPChannelHandler(core: core, maxLineLength: options.maxLineLength))
        return core
    }

    private static func connectErrno(_ error: any Error) -> Int32? {
        if let io = error as? IOError { return io.errnoCode }
        if let connection = error as? NIOConnectionError {
            for failure in connection.connectionErrors {
                if let io = failure.error as? IOError { return io.errnoCode }
            }
        }
        return nil
    }

    private static func errnoText(_ code: Int32) -> String {
        "\(String(cString: strerror(code))) (errno \(code))"
    }

    // MARK: Commands

    /// Sends `command`; `completion` runs on `eventLoop` exactly once, never before `send`
    /// returns. Called on the loop, nothing hops threads.
    ///
    /// - Parameter timeout: overrides `defaultCommandTimeout` for this command.
    public func send(
        _ command: String,
        arguments: [String: JSONValue]? = nil,
        timeout: TimeAmount? = nil,
        _ completion: @escaping @Sendable (Result<JSONValue, QMPClientError>) -> Void
    ) {
        if eventLoop.inEventLoop {
            core.value.send(command, arguments: arguments, timeout: timeout, completion)
        } else {
            eventLoop.execute { [core] in
                core.value.send(command, arguments: arguments, timeout: timeout, completion)
            }
        }
    }

    /// Sends `command` and waits for its reply (the `return` value). Task cancellation does
    /// not abandon the command: it ends with its reply, its timeout or the connection.
    public func execute(
        _ command: String,
        arguments: [String: JSONValue]? = nil,
        timeout: TimeAmount? = nil
    ) async throws(QMPClientError) -> JSONValue {
        let result = await withCheckedContinuation { (continuation: CheckedContinuation<Result<JSONValue, QMPClientError>, Never>) in
            send(command, arguments: arguments, timeout: timeout) { continuation.resume(returning: $0) }
        }
        return try result.get()
    }

    // MARK: Events

    /// Calls `body` on `eventLoop` for every event until the subscription is cancelled or the
    /// connection closes. `body` runs on the loop: keep it short (use `events` to consume
    /// events at leisure).
    @discardableResult
    public func onEvent(_ body: @escaping @Sendable (QMPEvent) -> Void) -> QMPEventSubscription {
        let key = shared.nextSubscriptionKey.wrappingAdd(1, ordering: .relaxed).oldValue
        onLoop { core in core.subscribe(key: key, .callback(body)) }
        return QMPEventSubscription(connection: self, key: key)
    }

    /// A new subscription to events as an async sequence. It never slows commands: it buffers
    /// up to `limit` events and then drops the oldest, counting them (`droppedCount`). It ends
    /// when the connection closes or the consumer stops iterating.
    public func events(bufferingNewest limit: Int = 1024) -> QMPEventStream {
        let key = shared.nextSubscriptionKey.wrappingAdd(1, ordering: .relaxed).oldValue
        let counter = QMPDropCounter()
        let (stream, continuation) = AsyncStream.makeStream(of: QMPEvent.self, bufferingPolicy: .bufferingNewest(max(limit, 1)))
        continuation.onTermination = { [weak self] _ in
            self?.onLoop { core in core.unsubscribe(key: key) }
        }
        onLoop { core in core.subscribe(key: key, .stream(continuation, counter)) }
        return QMPEventStream(stream: stream, counter: counter)
    }

    /// A new event subscription with the default buffer (see `events(bufferingNewest:)`).
    /// Each access subscribes anew.
    public var events: QMPEventStream { events() }

    fileprivate func unsubscribe(key: Int) {
        onLoop { core in core.unsubscribe(key: key) }
    }

    private func onLoop(_ body: @escaping @Sendable (QMPConnectionCore) -> Void) {
        if eventLoop.inEventLoop {
            body(core.value)
        } else {
            eventLoop.execute { [core] in body(core.value) }
        }
    }

    // MARK: Closing

    /// Closes the connection: pending commands fail with `.disconnected(..., reason: .closedByClient)`.
    /// `promise` (if any) gets the close reason.
    public func close(promise: EventLoopPromise<QMPCloseReason>?) {
        onLoop { core in core.closeByClient() }
        if let promise { closeFuture.cascade(to: promise) }
    }

    /// Closes the connection and waits until it is closed; returns why it closed (which may
    /// be an earlier reason, if the peer had closed it already).
    @discardableResult
    public func close() async -> QMPCloseReason {
        close(promise: nil)
        return (try? await closeFuture.get()) ?? .closedByClient
    }

    // MARK: On-loop operations

    /// Operations for callers already on `eventLoop`, taking non-`Sendable` closures.
    /// Accessing it off the loop traps.
    public var syncOperations: SyncOperations {
        eventLoop.preconditionInEventLoop()
        return SyncOperations(connection: self)
    }

    public struct SyncOperations {
        let connection: QMPConnection

        /// As `QMPConnection.send`, for a caller on the loop; `completion` runs on the loop,
        /// never before `send` returns. With `deferFlush` the line is written but flushed
        /// with the next command sent without it, or at the latest at the end of this turn of
        /// the loop: two commands for one monitor then go out in one system call.
        public func send(
            _ command: String,
            arguments: [String: JSONValue]? = nil,
            timeout: TimeAmount? = nil,
            deferFlush: Bool = false,
            _ completion: @escaping (Result<JSONValue, QMPClientError>) -> Void
        ) {
            connection.core.value.send(command, arguments: arguments, timeout: timeout, deferFlush: deferFlush, completion)
        }

        /// As `QMPConnection.onEvent`, for a caller on the loop.
        @discardableResult
        public func onEvent(_ body: @escaping (QMPEvent) -> Void) -> QMPEventSubscription {
            let key = connection.shared.nextSubscriptionKey.wrappingAdd(1, ordering: .relaxed).oldValue
            connection.core.value.subscribe(key: key, .callback(body))
            return QMPEventSubscription(connection: connection, key: key)
        }

        /// Commands sent and not yet answered.
        public var pendingCount: Int { connection.core.value.pendingCount }
    }
}

@available(*, unavailable)
extension QMPConnection.SyncOperations: Sendable {}

/// A callback event subscription; `cancel()` stops deliveries (from the next event on the loop).
public struct QMPEventSubscription: Sendable {
    let connection: QMPConnection
    let key: Int

    public func cancel() {
        connection.unsubscribe(key: key)
    }
}

/// Events from one subscription, buffered so a slow consumer never stalls the connection.
public struct QMPEventStream: AsyncSequence, Sendable {
    public typealias Element = QMPEvent
    public typealias Failure = Never

    let stream: AsyncStream<QMPEvent>
    let counter: QMPDropCounter

    /// Events this subscription lost because its buffer was full.
    public var droppedCount: Int { counter.value.load(ordering: .relaxed) }

    public func makeAsyncIterator() -> AsyncStream<QMPEvent>.Iterator {
        stream.makeAsyncIterator()
    }
}
