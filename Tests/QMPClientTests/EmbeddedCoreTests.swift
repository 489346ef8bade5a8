import ColorunTestSupport
import JSON
import Logging
import NIOCore
import NIOEmbedded
import QMP
@testable import QMPClient
import Testing

/// The connection core driven through an `EmbeddedChannel`: no sockets, virtual time.
@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct EmbeddedCoreTests {
    let endpoint = QMPEndpoint.unix(path: "/embedded/qmp.sock")

    private func makeChannel(enableOOB: Bool = true) throws -> (EmbeddedChannel, QMPConnectionCore) {
        let channel = EmbeddedChannel()
        let options = QMPConnectOptions(
            endpoint: endpoint, connectTimeout: .seconds(1), greetingTimeout: .seconds(3), commandTimeout: .seconds(30),
            enableOOB: enableOOB, maxLineLength: 1024, logger: LogCollector().logger("qmp-test", level: .debug))
        let core = try QMPConnection.configurePipeline(channel, options: options)
        try channel.connect(to: SocketAddress(unixDomainSocketPath: "/embedded/qmp.sock")).wait()
        return (channel, core)
    }

    private func outbound(_ channel: EmbeddedChannel) throws -> String? {
        try channel.readOutbound(as: ByteBuffer.self).map { String(buffer: $0) }
    }

    private func inbound(_ channel: EmbeddedChannel, _ line: String) throws {
        try channel.writeInbound(ByteBuffer(string: line + "\r\n"))
    }

    private func negotiate(_ channel: EmbeddedChannel, _ core: QMPConnectionCore) throws {
        try inbound(channel, #"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#)
        #expect(try outbound(channel) == #"{"arguments":{"enable":["oob"]},"execute":"qmp_capabilities"}"# + "\n")
        try inbound(channel, #"{"return": {}}"#)
        #expect(try core.readyPromise.futureResult.wait().qemuVersion == "7.2.22")
        #expect(core.outOfBandEnabled)
    }

    /// A command sent with `deferFlush` waits in the channel for the next command sent
    /// without it (the two then leave in one flush), or for the end of the loop's turn.
    @Test func deferredFlushesLeaveWithTheNextCommandOrAtTheEndOfTheTurn() throws {
        let (channel, core) = try makeChannel()
        try negotiate(channel, core)
        var replies = 0
        core.send("stop", arguments: nil, timeout: nil, deferFlush: true) { _ in replies += 1 }
        #expect(try outbound(channel) == nil, "not flushed yet")
        core.send("xen-save-devices-state", arguments: ["filename": "/x"], timeout: nil) { _ in replies += 1 }
        #expect(try outbound(channel) == #"{"execute":"stop"}"# + "\n")
        #expect(try outbound(channel) == #"{"arguments":{"filename":"/x"},"execute":"xen-save-devices-state"}"# + "\n")
        // Alone, it is flushed when the loop's turn ends.
        core.send("cont", arguments: nil, timeout: nil, deferFlush: true) { _ in replies += 1 }
        #expect(try outbound(channel) == nil)
        channel.embeddedEventLoop.run()
        #expect(try outbound(channel) == #"{"execute":"cont"}"# + "\n")
        try inbound(channel, #"{"return": {}}"# + "\r\n" + #"{"return": {}}"# + "\r\n" + #"{"return": {}}"#)
        #expect(replies == 3 && core.pendingCount == 0)
    }

    @Test func handshakeWritesAndTimeouts() throws {
        let (channel, core) = try makeChannel()
        try negotiate(channel, core)

        var results: [String: Result<JSONValue, QMPClientError>] = [:]
        core.send("stop", arguments: nil, timeout: .milliseconds(100)) { results["stop"] = $0 }
        core.send("query-status", arguments: nil, timeout: .milliseconds(300)) { results["query-status"] = $0 }
        core.send("human-monitor-command", arguments: ["command-line": "info version"], timeout: nil) { results["hmp"] = $0 }
        #expect(try outbound(channel) == #"{"execute":"stop"}"# + "\n")
        #expect(try outbound(channel) == #"{"execute":"query-status"}"# + "\n")
        #expect(try outbound(channel) == #"{"arguments":{"command-line":"info version"},"execute":"human-monitor-command"}"# + "\n")

        channel.embeddedEventLoop.advanceTime(by: .milliseconds(99))
        #expect(results["stop"] == nil)
        channel.embeddedEventLoop.advanceTime(by: .milliseconds(1))
        #expect(results["stop"] == .failure(.timeout(command: "stop", after: .milliseconds(100), endpoint: endpoint)))
        #expect(core.pendingCount == 2)

        // Replies come in order; events on the way do not disturb them. The first answers
        // the timed-out stop (dropped), the second query-status.
        try inbound(channel, #"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#)
        try inbound(channel, #"{"return": {}}"# + "\r\n" + #"{"return": {"status": "paused", "singlestep": false, "running": false}}"#)
        #expect(try results["query-status"]?.get()["status"] == "paused")
        #expect(results["hmp"] == nil)
        // A line split across reads.
        try channel.writeInbound(ByteBuffer(string: #"{"return": "7.2"#))
        #expect(results["hmp"] == nil)
        try inbound(channel, #".22\r\n"}"#)
        #expect(try results["hmp"]?.get() == "7.2.22\r\n")
        #expect(core.pendingCount == 0)
        #expect(core.phase == .ready)

        // A reply with an id answers nothing colorun sent: the replies are out of step, so
        // the connection closes.
        core.send("cont", arguments: nil, timeout: nil) { results["cont"] = $0 }
        #expect(try outbound(channel) == #"{"execute":"cont"}"# + "\n")
        try inbound(channel, #"{"return": {}, "id": 2}"#)
        guard case .failure(.protocolError(.unexpectedMessage, "cont", _))? = results["cont"] else {
            Issue.record("expected a protocol error for cont, got \(String(describing: results["cont"]))")
            return
        }
        _ = try channel.finish(acceptAlreadyClosed: true)
    }

    @Test func endOfFileFailsEverythingPendingAtOnce() throws {
        let (channel, core) = try makeChannel()
        try negotiate(channel, core)
        var failures: [QMPClientError] = []
        for name in ["a", "b", "c"] {
            core.send(name, arguments: nil, timeout: nil) { if case .failure(let e) = $0 { failures.append(e) } }
        }
        channel.pipeline.fireChannelInactive()
        #expect(failures.map(\.command) == ["a", "b", "c"])
        #expect(failures.allSatisfy { if case .disconnected(_, .endOfFile, _) = $0 { true } else { false } })
        #expect(try core.closePromise.futureResult.wait() == .endOfFile)
        _ = try? channel.finish(acceptAlreadyClosed: true)
    }

    @Test func replyBeforeGreetingIsAProtocolError() throws {
        let (channel, core) = try makeChannel()
        try inbound(channel, #"{"return": {}}"#)
        #expect(throws: QMPClientError.self) { try core.readyPromise.futureResult.wait() }
        guard case .protocolError(.unexpectedMessage) = try core.closePromise.futureResult.wait() else {
            Issue.record("expected a protocol error as the close reason")
            return
        }
    }

    @Test func greetingTimeoutInVirtualTime() throws {
        let (channel, core) = try makeChannel()
        channel.embeddedEventLoop.advanceTime(by: .seconds(3))
        #expect(throws: QMPClientError.greetingTimeout(endpoint: endpoint, after: .seconds(3))) {
            try core.readyPromise.futureResult.wait()
        }
        #expect(try core.closePromise.futureResult.wait() == .closedByClient)
    }
}
