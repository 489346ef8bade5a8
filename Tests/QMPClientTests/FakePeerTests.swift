import ColorunTestSupport
import JSON
import Logging
import NIOCore
import NIOPosix
import QMP
import QMPClient
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A tiny QMP server on a UNIX socket that misbehaves on request: it greets, accepts
/// `qmp_capabilities`, then answers each command with the raw lines `respond` returns
/// (`FakeQMPPeer.close` closes the connection instead).
final class FakeQMPPeer: Sendable {
    static let close = "<close>"

    let endpoint: QMPEndpoint
    private let serverChannel: any Channel
    private let path: String?
    /// The peer's own loop: a peer busy writing megabytes must not stall the clients' loops.
    private let group: MultiThreadedEventLoopGroup

    private init(endpoint: QMPEndpoint, path: String?, serverChannel: any Channel, group: MultiThreadedEventLoopGroup) {
        self.path = path
        self.endpoint = endpoint
        self.serverChannel = serverChannel
        self.group = group
    }

    /// Listens on a fresh UNIX socket, or with `tcp` on 127.0.0.1 at a port the system picks.
    static func start(tcp: Bool = false, respond: @escaping @Sendable (JSONValue) -> [String]) async throws -> FakeQMPPeer {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let bootstrap = ServerBootstrap(group: group)
            .childChannelInitializer { child in
                child.eventLoop.makeCompletedFuture {
                    try child.pipeline.syncOperations.addHandlers([
                        ByteToMessageHandler(QMPJSONLineDecoder()),
                        FakePeerHandler(respond: respond),
                    ])
                }
            }
        if tcp {
            let channel = try await bootstrap.bind(host: "127.0.0.1", port: 0).get()
            let port = try #require(channel.localAddress?.port)
            return FakeQMPPeer(endpoint: .tcp(host: "127.0.0.1", port: port), path: nil, serverChannel: channel, group: group)
        }
        let path = "/tmp/colorun-fake-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let channel = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
        return FakeQMPPeer(endpoint: .unix(path: path), path: path, serverChannel: channel, group: group)
    }

    /// Runs `body` with a started peer; the peer is stopped (socket closed, its loop shut
    /// down) before this returns, also when `body` throws.
    static func with<T>(
        tcp: Bool = false, respond: @escaping @Sendable (JSONValue) -> [String], body: (FakeQMPPeer) async throws -> T
    ) async throws -> T {
        let peer = try await start(tcp: tcp, respond: respond)
        do {
            let result = try await body(peer)
            await peer.stop()
            return result
        } catch {
            await peer.stop()
            throw error
        }
    }

    func stop() async {
        try? await serverChannel.close()
        if let path { unlink(path) }
        try? await group.shutdownGracefully()
    }
}

private final class FakePeerHandler: ChannelInboundHandler {
    typealias InboundIn = JSONValue
    typealias OutboundOut = ByteBuffer

    let respond: @Sendable (JSONValue) -> [String]

    init(respond: @escaping @Sendable (JSONValue) -> [String]) {
        self.respond = respond
    }

    func channelActive(context: ChannelHandlerContext) {
        send(#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}"#, context)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let command = unwrapInboundIn(data)
        if command["execute"] == "qmp_capabilities" {
            send(#"{"return": {}}"#, context)
            return
        }
        for line in respond(command) {
            if line == FakeQMPPeer.close {
                context.close(promise: nil)
                return
            }
            send(line, context)
        }
    }

    private func send(_ line: String, _ context: ChannelHandlerContext) {
        var buffer = context.channel.allocator.buffer(capacity: line.utf8.count + 2)
        buffer.writeString(line)
        buffer.writeString("\r\n")
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
    }
}

/// What a client does when the peer breaks the protocol: the connection closes, pending
/// commands fail with `.protocolError`, the process goes on.
@Suite(.timeLimit(.minutes(2)), .machine(.shared)) struct FakePeerTests {
    private func connect(_ peer: FakeQMPPeer, logs: LogCollector = LogCollector()) async throws -> QMPConnection {
        try await QMPConnection.connect(to: peer.endpoint, on: testGroup, commandTimeout: .seconds(5), logger: logs.logger("qmp-test", level: .debug))
    }

    @Test func malformedJSONFailsEveryPendingCommand() async throws {
        try await FakeQMPPeer.with { command in
            command["execute"] == "second" ? ["this is { not JSON"] : []
        } body: { peer in
            let connection = try await connect(peer)
            #expect(connection.greeting.package == "fake")
            let first = Task { await qmpError { _ = try await connection.execute("first") } }
            try await waitForPending(connection)   // "first" goes out before "second"
            let second = await qmpError { _ = try await connection.execute("second") }
            let firstError = await first.value
            guard case .protocolError(.malformedJSON, let command, let endpoint) = second else {
                Issue.record("expected protocolError(.malformedJSON), got \(String(describing: second))")
                return
            }
            #expect(command == "second")
            #expect(endpoint == peer.endpoint)
            guard case .protocolError(.malformedJSON, "first", _) = firstError else {
                Issue.record("the other pending command must fail too, got \(String(describing: firstError))")
                return
            }
            guard case .protocolError(.malformedJSON) = try await connection.closeFuture.get() else {
                Issue.record("close reason must be the protocol error")
                return
            }
            #expect(!connection.isActive)
            let after = await qmpError { _ = try await connection.execute("third") }
            #expect(after?.command == "third")
        }
    }

    @Test func oversizedLineClosesTheConnection() async throws {
        let huge = String(decoding: [UInt8](repeating: UInt8(ascii: "x"), count: QMPJSONLineDecoder.defaultMaxLineLength + 1024), as: UTF8.self)
        try await FakeQMPPeer.with { _ in [huge] } body: { peer in
            let connection = try await connect(peer)
            let error = await qmpError { _ = try await connection.execute("big") }
            #expect(error == .protocolError(.lineTooLong(limit: QMPJSONLineDecoder.defaultMaxLineLength), command: "big", endpoint: peer.endpoint))
            #expect(try await connection.closeFuture.get() == .protocolError(.lineTooLong(limit: QMPJSONLineDecoder.defaultMaxLineLength)))
        }
    }

    @Test func nonQMPMessageIsAProtocolError() async throws {
        try await FakeQMPPeer.with { _ in [#"{"neither": "reply nor event"}"#] } body: { peer in
            let connection = try await connect(peer)
            let error = await qmpError { _ = try await connection.execute("odd") }
            guard case .protocolError(.unexpectedMessage, "odd", _) = error else {
                Issue.record("expected unexpectedMessage, got \(String(describing: error))")
                return
            }
        }
    }

    /// colorun sends no ids, so a reply that carries one answers nothing it asked and the
    /// replies after it cannot be matched in order: the connection closes.
    @Test func replyWithAnIDIsAProtocolError() async throws {
        try await FakeQMPPeer.with { _ in
            [#"{"return": {"stray": true}, "id": 987654}"#, #"{"return": {"ok": true}}"#]
        } body: { peer in
            let connection = try await connect(peer)
            let error = await qmpError { _ = try await connection.execute("anything") }
            guard case .protocolError(.unexpectedMessage(let text), "anything", _) = error else {
                Issue.record("expected unexpectedMessage, got \(String(describing: error))")
                return
            }
            #expect(text.contains("987654"))
            guard case .protocolError = try await connection.closeFuture.get() else {
                Issue.record("expected the connection to close with a protocol error")
                return
            }
        }
    }

    /// A peer that answers only the second command (QEMU never does): replies are matched in
    /// order, so its answer goes to the first, and the second times out.
    @Test func repliesAreMatchedInOrder() async throws {
        try await FakeQMPPeer.with { command in
            command["execute"] == "second"
                ? [#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#]
                : []
        } body: { peer in
            let connection = try await connect(peer)
            let first = Task { await qmpError { _ = try await connection.execute("first") } }
            try await waitForPending(connection)   // "first" goes out before "second"
            let second = Task { await qmpError { _ = try await connection.execute("second", timeout: .milliseconds(300)) } }
            let firstError = await first.value
            #expect(firstError == .commandFailed(
                command: "first", QMPErrorBody(errorClass: "GenericError", desc: "QMP input must be a JSON object"), endpoint: peer.endpoint))
            #expect(await second.value == .timeout(command: "second", after: .milliseconds(300), endpoint: peer.endpoint))
            await connection.close()
        }
    }

    @Test func peerClosingFailsPendingAsDisconnected() async throws {
        try await FakeQMPPeer.with { _ in [FakeQMPPeer.close] } body: { peer in
            let connection = try await connect(peer)
            let error = await qmpError { _ = try await connection.execute("bye") }
            #expect(error == .disconnected(command: "bye", reason: .endOfFile, endpoint: peer.endpoint))
            #expect(try await connection.closeFuture.get() == .endOfFile)
        }
    }

    @Test func tcpEndpoint() async throws {
        try await FakeQMPPeer.with(tcp: true) { command in
            [#"{"return": {"status": "running"}}"#]
        } body: { peer in
            let connection = try await QMPConnection.connect(
                to: try QMPEndpoint(parsing: peer.endpoint.description), on: testGroup, logger: LogCollector().logger("qmp-test", level: .debug))
            #expect(try await connection.execute("query-status")["status"] == "running")
            await connection.close()
        }
    }

    @Test func tcpConnectionRefusedIsRetriedUntilTheTimeout() async throws {
        // A port that was just free: bind, read the port, close.
        let probe = try await FakeQMPPeer.start(tcp: true) { _ in [] }
        let endpoint = probe.endpoint
        await probe.stop()
        let error = await qmpError {
            // Long enough that several attempts fit even on a loaded machine.
            _ = try await QMPConnection.connect(to: endpoint, on: testGroup, connectTimeout: .seconds(1), logger: LogCollector().logger("qmp-test", level: .debug))
        }
        guard case .connectFailed(endpoint, let reason) = error else {
            Issue.record("expected connectFailed, got \(String(describing: error))")
            return
        }
        #expect(reason.contains("Connection refused"), "\(reason)")
    }
}
