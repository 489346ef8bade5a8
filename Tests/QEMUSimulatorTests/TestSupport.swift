import ColorunTestSupport
import Foundation
import JSON
import NIOCore
import NIOPosix
import QMP
import Synchronization
import Testing

@testable import QEMUSimulator

/// One event loop group for every test client.
let testGroup = MultiThreadedEventLoopGroup.singleton

struct TestTimeout: Error, CustomStringConvertible {
    var what: String
    var description: String { "timed out waiting for \(what)" }
}

/// Lines received by a test client, with waiting and timeouts.
final class LineInbox: Sendable {
    private struct State {
        var lines: [[UInt8]] = []
        var finished = false
        var waiter: (token: Int, continuation: CheckedContinuation<[UInt8]?, any Error>)?
        var nextToken = 0
        var received = 0
    }
    private let state = Mutex(State())

    func push(_ line: [UInt8]) {
        let waiter = state.withLock { s -> CheckedContinuation<[UInt8]?, any Error>? in
            s.received += 1
            if let w = s.waiter {
                s.waiter = nil
                return w.continuation
            }
            s.lines.append(line)
            return nil
        }
        waiter?.resume(returning: line)
    }

    func finish() {
        let waiter = state.withLock { s -> CheckedContinuation<[UInt8]?, any Error>? in
            s.finished = true
            defer { s.waiter = nil }
            return s.waiter?.continuation
        }
        waiter?.resume(returning: nil)
    }

    var receivedCount: Int { state.withLock { $0.received } }

    /// The next line, nil at EOF, or `TestTimeout`.
    func next(timeout: Duration, loop: any EventLoop) async throws -> [UInt8]? {
        try await withCheckedThrowingContinuation { continuation in
            let token = state.withLock { s -> Int? in
                if !s.lines.isEmpty {
                    continuation.resume(returning: s.lines.removeFirst())
                    return nil
                }
                if s.finished {
                    continuation.resume(returning: nil)
                    return nil
                }
                s.nextToken += 1
                s.waiter = (s.nextToken, continuation)
                return s.nextToken
            }
            guard let token else { return }
            let nanos = timeout.components.seconds * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000
            loop.scheduleTask(in: .nanoseconds(nanos)) {
                let expired = self.state.withLock { s -> CheckedContinuation<[UInt8]?, any Error>? in
                    guard let w = s.waiter, w.token == token else { return nil }
                    s.waiter = nil
                    return w.continuation
                }
                expired?.resume(throwing: TestTimeout(what: "a line"))
            }
        }
    }
}

/// Splits bytes on LF (dropping a CR before it) into the inbox.
final class LineSplitter: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    private let inbox: LineInbox
    private let partial = Mutex<[UInt8]>([])

    init(inbox: LineInbox) { self.inbox = inbox }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        let bytes = buffer.readBytes(length: buffer.readableBytes) ?? []
        let lines = partial.withLock { partial -> [[UInt8]] in
            partial.append(contentsOf: bytes)
            var lines: [[UInt8]] = []
            while let nl = partial.firstIndex(of: 0x0A) {
                var line = Array(partial[..<nl])
                if line.last == 0x0D { line.removeLast() }
                lines.append(line)
                partial.removeFirst(nl + 1)
            }
            return lines
        }
        for line in lines { inbox.push(line) }
    }

    func channelInactive(context: ChannelHandlerContext) { inbox.finish() }
    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}

/// A tiny QMP client for the tests (real QEMU and the simulator alike).
final class TestQMPClient: Sendable {
    let channel: any Channel
    let inbox: LineInbox

    private init(channel: any Channel, inbox: LineInbox) {
        self.channel = channel
        self.inbox = inbox
    }

    /// Connects, retrying while the socket is not there yet (QEMU starting).
    static func connect(_ address: SimulatorAddress, retryFor: Duration = .seconds(5)) async throws -> TestQMPClient {
        let deadline = ContinuousClock.now + retryFor
        while true {
            let inbox = LineInbox()
            let bootstrap = ClientBootstrap(group: testGroup).channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(LineSplitter(inbox: inbox))
                }
            }
            do {
                let channel: any Channel
                switch address {
                case .unix(let path): channel = try await bootstrap.connect(unixDomainSocketPath: path).get()
                case .tcp(let host, let port): channel = try await bootstrap.connect(host: host, port: port).get()
                }
                return TestQMPClient(channel: channel, inbox: inbox)
            } catch {
                if ContinuousClock.now > deadline { throw error }
                try await Task.sleep(for: .milliseconds(10))
            }
        }
    }

    func send(_ text: String) async throws {
        try await channel.writeAndFlush(ByteBuffer(string: text)).get()
    }

    func send(_ value: JSONValue) async throws {
        try await send(value.description + "\n")
    }

    /// The next raw line; nil at EOF.
    func line(timeout: Duration = .seconds(5)) async throws -> [UInt8]? {
        try await inbox.next(timeout: timeout, loop: channel.eventLoop)
    }

    /// The next line as JSON; nil at EOF.
    func json(timeout: Duration = .seconds(5)) async throws -> JSONValue? {
        guard let line = try await line(timeout: timeout) else { return nil }
        return try JSONParser.parse(line)
    }

    /// Reads the greeting and negotiates.
    func negotiate() async throws -> JSONValue {
        let greeting = try #require(try await json())
        try await send(#"{"execute":"qmp_capabilities"}"# + "\n")
        let reply = try #require(try await json())
        #expect(reply == ["return": [:]])
        return greeting
    }

    /// Sends a command and collects messages up to its reply: (events, reply).
    func execute(_ name: String, _ arguments: JSONValue? = nil, id: JSONValue? = nil, timeout: Duration = .seconds(5)) async throws -> (events: [JSONValue], reply: JSONValue) {
        var command: [String: JSONValue] = ["execute": .string(name)]
        if let arguments { command["arguments"] = arguments }
        if let id { command["id"] = id }
        try await send(.object(command))
        return try await replyAndEvents(timeout: timeout)
    }

    func replyAndEvents(timeout: Duration = .seconds(5)) async throws -> (events: [JSONValue], reply: JSONValue) {
        var events: [JSONValue] = []
        while true {
            guard let message = try await json(timeout: timeout) else { throw TestTimeout(what: "a reply (EOF)") }
            if message["event"] != nil { events.append(message) } else { return (events, message) }
        }
    }

    func close() async {
        try? await channel.close()
    }
}

/// An in-process simulator with one domain in a fresh temp dir.
func withSimulatedDomain<T>(
    _ configuration: SimulatedDomainConfiguration = SimulatedDomainConfiguration(),
    _ body: (SimulatedDomain, TempDir) async throws -> T
) async throws -> T {
    let dir = TempDir()
    let simulator = QEMUSimulator()
    do {
        let domain = try await simulator.start(socketPath: dir.file("dom0.sock"), configuration: configuration)
        let result = try await body(domain, dir)
        await simulator.shutdown()
        dir.cleanup()
        return result
    } catch {
        await simulator.shutdown()
        dir.cleanup()
        throw error
    }
}

extension JSONValue {
    /// An event's name, or nil.
    var eventName: String? { self["event"]?.stringValue }
}
