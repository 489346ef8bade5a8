import ColorunTestSupport
import Foundation
import JSON
import QMP
import Testing

@testable import QEMUSimulator

/// The simulator over real sockets, one fault at a time.
@Suite(.timeLimit(.minutes(2)), .machine(.shared)) struct SocketTests {
    @Test func servesOverUnixAndTCP() async throws {
        try await withSimulatedDomain { domain, dir in
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            let greeting = try await client.negotiate()
            #expect(greeting["QMP"]?["capabilities"] == ["oob"])
            #expect(greeting["QMP"]?["version"]?["package"] == "colorun simulated QEMU")
            let (events, reply) = try await client.execute("stop", id: 2)
            #expect(events.map(\.eventName) == ["STOP"])
            #expect(events.first?["timestamp"]?["seconds"]?.intValue ?? 0 > 1_600_000_000)
            #expect(reply == ["return": [:], "id": 2])
            #expect(domain.runState == .paused)
            #expect(domain.commandLog.map(\.name) == ["qmp_capabilities", "stop"])
            await client.close()
        }
        let simulator = QEMUSimulator()
        let domain = try await simulator.start(name: "t", address: .tcp(host: "127.0.0.1", port: 0))
        guard case .tcp(_, let port) = domain.address else { Issue.record("not tcp"); return }
        #expect(port > 0)
        let client = try await TestQMPClient.connect(domain.address)
        _ = try await client.negotiate()
        #expect(try await client.execute("query-status").reply["return"]?["status"] == "running")
        await client.close()
        await simulator.shutdown()
    }

    @Test func oneClientAtATimeLikeQEMU() async throws {
        try await withSimulatedDomain { domain, dir in
            let first = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await first.negotiate()
            let second = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            try await second.send(#"{"execute":"qmp_capabilities","id":1}"# + "\n")
            await #expect(throws: TestTimeout.self) { try await second.line(timeout: .milliseconds(200)) }
            await first.close()
            // Now the second gets its greeting, and its queued command is served.
            let greeting = try #require(try await second.json())
            #expect(greeting["QMP"] != nil)
            #expect(try await second.json() == ["return": [:], "id": 1])
            await second.close()
        }
    }

    @Test func loadRecordsStateReadableByTests() async throws {
        try await withSimulatedDomain(SimulatedDomainConfiguration(runState: .paused)) { domain, dir in
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await client.negotiate()
            let path = dir.file("s.state")
            #expect(try await client.execute("xen-save-devices-state", ["filename": .string(path)]).reply == ["return": [:]])
            #expect(try await client.execute("xen-load-devices-state", ["filename": .string(path)]).reply == ["return": [:]])
            #expect(try await client.execute("xen-load-devices-state", ["filename": .string(path)]).reply == ["return": [:]])
            #expect(domain.loadedStates.map(\.file.domain) == ["dom0", "dom0"])
            #expect(domain.loadedStates.map(\.file.save) == [1, 1])
            #expect(domain.saveCounter == 1)
            let status = try await client.execute("x-sim-status").reply["return"]
            #expect(status?["loaded"]?.arrayValue?.count == 2)
            await client.close()
        }
    }

    // MARK: - Faults

    @Test func delayHoldsTheReplyAndLaterCommandsQueue() async throws {
        try await withSimulatedDomain(SimulatedDomainConfiguration(faults: [SimulatedFault("stop", .delay(.milliseconds(300)))])) { domain, dir in
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await client.negotiate()
            let start = ContinuousClock.now
            try await client.send(#"{"execute":"stop","id":1}{"execute":"query-status","id":2}"# + "\n")
            let (events, reply) = try await client.replyAndEvents()
            #expect(ContinuousClock.now - start >= .milliseconds(290))
            #expect(events.map(\.eventName) == ["STOP"])
            #expect(reply == ["return": [:], "id": 1])
            #expect(try await client.json()?["id"] == 2)
            #expect(domain.commandLog.first { $0.name == "stop" }?.fault == .delay(.milliseconds(300)))
            await client.close()
        }
    }

    @Test func hangNeverRepliesOnThatConnection() async throws {
        try await withSimulatedDomain(SimulatedDomainConfiguration(faults: [SimulatedFault("query-status", .hang, after: 1, count: 1)])) { domain, dir in
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await client.negotiate()
            #expect(try await client.execute("query-status", id: 1).reply["id"] == 1)
            try await client.send(#"{"execute":"query-status","id":2}"# + "\n")
            try await client.send(#"{"execute":"query-status","id":3}"# + "\n")
            await #expect(throws: TestTimeout.self) { try await client.line(timeout: .milliseconds(300)) }
            await client.close()
            // A new connection is served (the fault's count is spent).
            let again = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await again.negotiate()
            #expect(try await again.execute("query-status", id: 4).reply["return"]?["status"] == "running")
            await again.close()
        }
    }

    @Test func dropClosesInsteadOfReplying() async throws {
        try await withSimulatedDomain(SimulatedDomainConfiguration(faults: [SimulatedFault("stop", .drop)])) { domain, dir in
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await client.negotiate()
            try await client.send(#"{"execute":"stop","id":1}"# + "\n")
            #expect(try await client.line() == nil)
            #expect(domain.runState == .running)  // the command never ran
            #expect(domain.isAlive)
        }
    }

    @Test func errorReplacesTheReply() async throws {
        try await withSimulatedDomain { domain, dir in
            try domain.addFaults(parsing: "cont:error=DeviceNotActive,desc=No, really: no,count=1")
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await client.negotiate()
            _ = try await client.execute("stop")
            let first = try await client.execute("cont", id: 5)
            #expect(first.reply == ["id": 5, "error": ["class": "DeviceNotActive", "desc": "No, really: no,count=1"]])
            #expect(domain.runState == .paused)
            await client.close()
        }
    }

    @Test func crashMidSaveLeavesPartialFileAndRefusesConnections() async throws {
        try await withSimulatedDomain(SimulatedDomainConfiguration(faults: [try SimulatedFault(parsing: "xen-save-devices-state:crash-after-bytes=4096")])) { domain, dir in
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await client.negotiate()
            _ = try await client.execute("stop")
            let path = dir.file("partial.state")
            try await client.send(.object(["execute": "xen-save-devices-state", "arguments": ["filename": .string(path)]]))
            #expect(try await client.line() == nil)
            let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
            #expect(bytes.count == 4096)
            #expect(Array(bytes.prefix(4)) == Array("QEVM".utf8))
            #expect(DeviceStateFile.decode(bytes) == nil)
            #expect(!domain.isAlive)
            #expect(FileManager.default.fileExists(atPath: dir.file("dom0.sock")))  // a dead QEMU leaves its socket
            await #expect(throws: (any Error).self) {
                _ = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")), retryFor: .zero)
            }
        }
    }

    @Test func freezeAcceptsBytesAnswersNothing() async throws {
        try await withSimulatedDomain { domain, dir in
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await client.negotiate()
            domain.freeze()
            try await client.send(#"{"execute":"query-status","id":1}"# + "\n")
            await #expect(throws: TestTimeout.self) { try await client.line(timeout: .milliseconds(300)) }
            #expect(client.channel.isActive)
            // A new client gets no greeting while frozen.
            await client.close()
            let other = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            await #expect(throws: TestTimeout.self) { try await other.line(timeout: .milliseconds(200)) }
            domain.unfreeze()
            _ = try await other.negotiate()
            #expect(try await other.execute("query-status", id: 2).reply["id"] == 2)
            await other.close()
        }
    }

    @Test func freezeByTime() async throws {
        try await withSimulatedDomain(SimulatedDomainConfiguration(faults: [try SimulatedFault(parsing: "@300ms:freeze")])) { domain, dir in
            // Wait for the timed fault (however loaded the machine is), then a new client
            // gets no greeting: the frozen domain answers nothing.
            let clock = ContinuousClock()
            let deadline = clock.now + .seconds(10)
            while !domain.isFrozen && clock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
            #expect(domain.isFrozen)
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            await #expect(throws: TestTimeout.self) { try await client.line(timeout: .milliseconds(300)) }
            await client.close()
        }
    }

    @Test func junkOversizedWrongIDAndFlood() async throws {
        let faults = [
            SimulatedFault("query-status", .junk("this is not JSON"), count: 1),
            SimulatedFault("query-status", .oversized(bytes: 100_000), count: 1),
            SimulatedFault("query-status", .wrongID, count: 1),
            SimulatedFault("query-status", .flood(events: 500), count: 1),
        ]
        try await withSimulatedDomain(SimulatedDomainConfiguration(faults: faults)) { domain, dir in
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await client.negotiate()
            try await client.send(#"{"execute":"query-status","id":1}"# + "\n")
            #expect(try await client.line() == Array("this is not JSON".utf8))
            #expect(try await client.json()?["id"] == 1)

            try await client.send(#"{"execute":"query-status","id":2}"# + "\n")
            let big = try #require(try await client.line())
            #expect(big.count == 100_000 - 2)
            #expect(try await client.json()?["id"] == 2)

            try await client.send(#"{"execute":"query-status","id":3}"# + "\n")
            let wrong = try #require(try await client.json())
            #expect(wrong["return"] != nil)
            #expect(wrong["id"] != 3 && wrong["id"] != nil)

            let (events, reply) = try await client.execute("query-status", id: 4)
            #expect(events.count == 500)
            #expect(Set(events.compactMap(\.eventName)) == ["RTC_CHANGE"])
            #expect(reply["id"] == 4)
            await client.close()
        }
    }

    @Test func faultsChangeWhileRunningThroughAPIAndQMP() async throws {
        try await withSimulatedDomain { domain, dir in
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await client.negotiate()
            domain.addFault(SimulatedFault("query-status", .error(errorClass: "GenericError", desc: "injected")))
            #expect(try await client.execute("query-status").reply == ["error": ["class": "GenericError", "desc": "injected"]])
            domain.clearFaults()
            #expect(try await client.execute("query-status").reply["return"] != nil)
            let set = try await client.execute("x-sim-fault", ["fault": "stop:error=GenericError,desc=nope"]).reply
            #expect(set == ["return": ["faults": ["stop:error=GenericError,desc=nope"]]])
            #expect(try await client.execute("stop").reply == ["error": ["class": "GenericError", "desc": "nope"]])
            #expect(try await client.execute("x-sim-fault", ["fault": "stop:explode"]).reply["error"] != nil)
            _ = try await client.execute("x-sim-fault", ["clear": true])
            #expect(domain.faults.isEmpty)
            #expect(try await client.execute("stop").reply == ["return": [:]])
            await client.close()
        }
    }

    @Test func killAndQuit() async throws {
        try await withSimulatedDomain { domain, dir in
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await client.negotiate()
            await domain.kill()
            #expect(try await client.line() == nil)
            #expect(!domain.isAlive)
        }
        try await withSimulatedDomain { domain, dir in
            let client = try await TestQMPClient.connect(.unix(path: dir.file("dom0.sock")))
            _ = try await client.negotiate()
            let (events, reply) = try await client.execute("quit", id: 99)
            #expect(events.map(\.eventName) == ["SHUTDOWN"])
            #expect(events.first?["data"] == ["guest": false, "reason": "host-qmp-quit"])
            #expect(reply == ["return": [:], "id": 99])
            #expect(try await client.line() == nil)
            #expect(!domain.isAlive)
            #expect(domain.runState == .shutdown)
            #expect(!FileManager.default.fileExists(atPath: dir.file("dom0.sock")))
        }
    }
}

/// 1,000 domains in one in-process simulator on one event loop.
@Suite(.timeLimit(.minutes(2)), .machine(.exclusive)) struct ScaleTests {
    @Test func thousandDomainsOneQueryEach() async throws {
        let dir = TempDir("sim1k")
        defer { dir.cleanup() }
        let simulator = QEMUSimulator()
        let startClock = ContinuousClock.now
        let domains = try await simulator.startDomains(count: 1000, directory: dir.path)
        let started = ContinuousClock.now - startClock
        #expect(domains.count == 1000)

        let queryClock = ContinuousClock.now
        let statuses = try await withThrowingTaskGroup(of: JSONValue?.self) { group in
            for domain in domains {
                group.addTask {
                    let client = try await TestQMPClient.connect(domain.address)
                    _ = try await client.negotiate()
                    let reply = try await client.execute("query-status", id: .string(domain.name)).reply
                    await client.close()
                    return reply["id"] == .string(domain.name) ? reply["return"]?["status"] : nil
                }
            }
            var all: [JSONValue?] = []
            for try await status in group { all.append(status) }
            return all
        }
        let served = ContinuousClock.now - queryClock
        #expect(statuses.count == 1000)
        #expect(statuses.allSatisfy { $0 == "running" })
        #expect(domains.allSatisfy { $0.commandLog.map(\.name) == ["qmp_capabilities", "query-status"] })
        print("1000 domains: started in \(started), served one query-status each in \(served)")
        await simulator.shutdown()
    }
}
