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
    @Test func routesByIDAndChargesIdlessErrorsToTheOldest() {
        var table = QMPRequestTable<String>()
        let now = NIODeadline.now()
        let a = table.reserveID()
        table.insert(id: a, command: "query-status", timeout: .seconds(1), deadline: now + .seconds(1), token: "A")
        let b = table.reserveID()
        table.insert(id: b, command: "stop", timeout: .seconds(1), deadline: now + .seconds(1), token: "B")
        let c = table.reserveID()
        table.insert(id: c, command: "cont", timeout: .seconds(1), deadline: now + .seconds(1), token: "C")
        #expect(Set([a, b, c]).count == 3)

        guard case .matched(let id, let pending) = table.route(QMPReply(id: .int(b), result: .success([:]))) else {
            Issue.record("not matched")
            return
        }
        #expect(id == b && pending.token == "B" && pending.command == "stop")

        guard case .unknownID(.int(b)) = table.route(QMPReply(id: .int(b), result: .success([:]))) else {
            Issue.record("a second reply for the same id must be unknown")
            return
        }
        guard case .unknownID = table.route(QMPReply(id: "text", result: .success([:]))) else {
            Issue.record("a non-integer id must be unknown")
            return
        }
        guard case .unmatched = table.route(QMPReply(id: nil, result: .success([:]))) else {
            Issue.record("an idless success must not match")
            return
        }
        let idless = QMPReply(id: nil, result: .failure(QMPErrorBodyError(QMPErrorBody(errorClass: "GenericError", desc: "x"))))
        guard case .idlessErrorMatchedOldest(let oldest, let first) = table.route(idless) else {
            Issue.record("idless error must match the oldest")
            return
        }
        #expect(oldest == a && first.token == "A")
        #expect(table.count == 1)
        let rest = table.removeAll()
        #expect(rest.map(\.id) == [c])
        #expect(table.isEmpty)
        guard case .unmatched = table.route(idless) else {
            Issue.record("nothing left to charge")
            return
        }
    }

    @Test func expiresByDeadline() {
        var table = QMPRequestTable<Int>()
        let now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        for (i, ms) in [300, 100, 200, 100].enumerated() {
            table.insert(id: table.reserveID(), command: "c\(i)", timeout: .milliseconds(Int64(ms)), deadline: now + .milliseconds(Int64(ms)), token: i)
        }
        #expect(table.earliestDeadline == now + .milliseconds(100))
        #expect(table.removeExpired(now: now + .milliseconds(99)).isEmpty)
        let expired = table.removeExpired(now: now + .milliseconds(150))
        #expect(expired.map(\.pending.token) == [1, 3])
        #expect(expired.allSatisfy { $0.pending.timeout == .milliseconds(100) })
        #expect(table.earliestDeadline == now + .milliseconds(200))
        #expect(table.count == 2)
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
