import ColorunTestSupport
import NIOCore
import QEMULab
import QMP
@testable import QMPClient
import Testing

@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct EndpointTests {
    @Test(arguments: [
        ("unix:/tmp/q.sock", QMPEndpoint.unix(path: "/tmp/q.sock")),
        ("unix:relative.sock", QMPEndpoint.unix(path: "relative.sock")),
        ("tcp:localhost:4444", QMPEndpoint.tcp(host: "localhost", port: 4444)),
        ("tcp:127.0.0.1:1", QMPEndpoint.tcp(host: "127.0.0.1", port: 1)),
        ("tcp:[::1]:65535", QMPEndpoint.tcp(host: "::1", port: 65535)),
    ])
    func parsesAndPrints(_ text: String, _ expected: QMPEndpoint) throws {
        let endpoint = try QMPEndpoint(parsing: text)
        #expect(endpoint == expected)
        #expect(endpoint.description == text)
    }

    @Test(arguments: [
        "", "/tmp/q.sock", "unix:", "tcp:", "tcp:host", "tcp:host:", "tcp::4444", "tcp:host:0", "tcp:host:65536",
        "tcp:host:44x", "tcp:::1:4444", "tcp:[::1]4444", "tcp:[::1", "udp:host:1", "UNIX:/x",
        "unix:/" + String(repeating: "a", count: 120),
    ])
    func rejectsWithTheBadText(_ text: String) {
        do {
            _ = try QMPEndpoint(parsing: text)
            Issue.record("accepted '\(text)'")
        } catch {
            guard case .invalidEndpoint(let bad, let reason) = error else {
                Issue.record("wrong error \(error)")
                return
            }
            #expect(bad == text)
            #expect(!reason.isEmpty)
            #expect(error.description.contains("'\(text)'"))
        }
    }
}

@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct RequestTableTests {
    @Test func routesRepliesInOrderAndKeepsTimedOutCommandsInLine() {
        var table = QMPRequestTable<String>()
        let now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        table.append(command: "query-status", timeout: .milliseconds(100), deadline: now + .milliseconds(100), token: "A")
        table.append(command: "stop", timeout: .seconds(1), deadline: now + .seconds(1), token: "B")
        table.append(command: "cont", timeout: .seconds(1), deadline: now + .seconds(1), token: "C")
        #expect(table.count == 3)

        // The first times out: it is abandoned but keeps its place.
        #expect(table.expire(now: now + .milliseconds(100)).map(\.token) == ["A"])
        #expect(table.count == 2)
        #expect(table.earliestDeadline == now + .seconds(1))

        // A reply with an id answers nothing colorun sent (no id is sent) and takes no place.
        guard case .unexpectedID(.int(7)) = table.route(QMPReply(id: .int(7), result: .success([:]))) else {
            Issue.record("a reply with an id must be unexpected")
            return
        }
        // QEMU answers in order: the late answer of the abandoned command first, then B's.
        guard case .late(command: "query-status") = table.route(QMPReply(id: nil, result: .success([:]))) else {
            Issue.record("the first reply belongs to the timed-out command")
            return
        }
        let error = QMPReply(id: nil, result: .failure(QMPErrorBodyError(QMPErrorBody(errorClass: "GenericError", desc: "x"))))
        guard case .matched(let b) = table.route(error) else {
            Issue.record("the second reply belongs to the second command")
            return
        }
        #expect(b.token == "B" && b.command == "stop")
        #expect(table.count == 1)
        #expect(table.removeAll().map(\.token) == ["C"])
        #expect(table.isEmpty)
        guard case .unmatched = table.route(error) else {
            Issue.record("nothing left in flight")
            return
        }
    }

    @Test func expiresByDeadline() {
        var table = QMPRequestTable<Int>()
        let now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        for (i, ms) in [300, 100, 200, 100].enumerated() {
            table.append(command: "c\(i)", timeout: .milliseconds(Int64(ms)), deadline: now + .milliseconds(Int64(ms)), token: i)
        }
        #expect(table.earliestDeadline == now + .milliseconds(100))
        #expect(table.expire(now: now + .milliseconds(99)).isEmpty)
        let expired = table.expire(now: now + .milliseconds(150))
        #expect(expired.map(\.token) == [1, 3])
        #expect(expired.allSatisfy { $0.timeout == .milliseconds(100) })
        #expect(table.earliestDeadline == now + .milliseconds(200))
        #expect(table.count == 2)
        // Replies still come for all four, in order: the abandoned ones are dropped.
        var routed: [String] = []
        for _ in 0..<4 {
            switch table.route(QMPReply(id: nil, result: .success([:]))) {
            case .matched(let pending): routed.append("\(pending.token)")
            case .late(let command): routed.append("late \(command)")
            default: routed.append("?")
            }
        }
        #expect(routed == ["0", "late c1", "2", "late c3"])
    }

    @Test func errorDescriptionsNameEndpointAndCommand() {
        let endpoint = QMPEndpoint.unix(path: "/run/q.sock")
        let failed = QMPClientError.commandFailed(
            command: "stop", QMPErrorBody(errorClass: "GenericError", desc: "nope"), endpoint: endpoint)
        #expect(failed.description == "QMP command 'stop' on unix:/run/q.sock failed: GenericError: nope")
        let timeout = QMPClientError.timeout(command: "cont", after: .milliseconds(250), endpoint: endpoint)
        #expect(timeout.description.contains("'cont'") && timeout.description.contains("unix:/run/q.sock") && timeout.description.contains("250 ms"))
        let gone = QMPClientError.disconnected(command: "query-status", reason: .connectionReset, endpoint: endpoint)
        #expect(gone.description.contains("'query-status'") && gone.description.contains("reset"))
        #expect(QMPClientError.protocolError(.lineTooLong(limit: 10), command: "x", endpoint: endpoint).description.contains("closed"))
        #expect(formatDuration(.microseconds(1500)) == "1.5 ms")
        #expect(formatDuration(.seconds(3)) == "3 s")
    }

    @Test func countingGuestImageAndParser() {
        let sector = CountingGuest.bootSector
        #expect(sector.count == 512)
        #expect(Array(sector[0..<11]) == [0x31, 0xc0, 0x8e, 0xd8, 0x66, 0xff, 0x06, 0x00, 0x7e, 0xeb, 0xf9])
        #expect(sector[11..<510].allSatisfy { $0 == 0 })
        #expect(sector[510] == 0x55 && sector[511] == 0xaa)
        #expect(CountingGuest.parseCounter("0000000000007e00: 0x0000002a\r\n") == 42)
        #expect(CountingGuest.parseCounter("garbage") == nil)
    }
}
