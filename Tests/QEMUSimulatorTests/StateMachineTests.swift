import ColorunTestSupport
import Foundation
import JSON
import QMP
import Testing

@testable import QEMUSimulator

/// The QEMU state machine without sockets: one input in, QEMU 7.2's exact messages out.
@Suite(.timeLimit(.minutes(2)), .machine(.shared)) struct StateMachineTests {
    /// A negotiated machine and session.
    struct Harness {
        var machine: SimulatedQEMU
        var session = QMPSessionState()
        var now = 1_000.0

        init(_ state: RunState = .running, negotiated: Bool = true) {
            machine = SimulatedQEMU(name: "dom7", runState: state, now: 1_000)
            session.negotiated = negotiated
        }

        mutating func run(_ text: String) throws -> [JSONValue] {
            now += 0.5
            let outcome = machine.handle(.value(try JSONParser.parse(text)), session: &session, now: now)
            return outcome.messages.map(Self.stripTimestamp)
        }

        static func stripTimestamp(_ v: JSONValue) -> JSONValue {
            guard case .object(var m) = v, m["event"] != nil else { return v }
            m["timestamp"] = nil
            return .object(m)
        }
    }

    static func err(_ cls: String, _ desc: String, id: JSONValue? = nil) -> JSONValue {
        var m: [String: JSONValue] = ["error": ["class": .string(cls), "desc": .string(desc)]]
        if let id { m["id"] = id }
        return .object(m)
    }

    @Test func greetingSaysItIsSimulated() {
        let g = SimulatedQEMU.greeting
        #expect(g.capabilities == ["oob"])
        #expect(g.qemuVersion == "7.2.22")
        #expect(g.package == "colorun simulated QEMU")
    }

    @Test func negotiation() throws {
        var h = Harness(negotiated: false)
        #expect(try h.run(#"{"execute":"query-status","id":1}"#) == [Self.err("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'", id: 1)])
        #expect(try h.run(#"{"execute":"bogus","id":2}"#) == [Self.err("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'", id: 2)])
        #expect(try h.run(#"{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]},"id":3}"#) == [Self.err("GenericError", "Parameter 'null' does not accept value 'bogus'", id: 3)])
        #expect(try h.run(#"{"execute":"qmp_capabilities","id":"a"}"#) == [["return": [:], "id": "a"]])
        #expect(try h.run(#"{"execute":"qmp_capabilities","id":"b"}"#) == [Self.err("CommandNotFound", "Capabilities negotiation is already complete, command ignored", id: "b")])
    }

    @Test func envelopeErrors() throws {
        var h = Harness()
        #expect(try h.run(#"[1,2]"#) == [Self.err("GenericError", "QMP input must be a JSON object")])
        #expect(try h.run(#""str""#) == [Self.err("GenericError", "QMP input must be a JSON object")])
        #expect(try h.run(#"{"id":1}"#) == [Self.err("GenericError", "QMP input lacks member 'execute'", id: 1)])
        #expect(try h.run(#"{}"#) == [Self.err("GenericError", "QMP input lacks member 'execute'")])
        #expect(try h.run(#"{"execute":5,"id":14}"#) == [Self.err("GenericError", "QMP input member 'execute' must be a string", id: 14)])
        #expect(try h.run(#"{"execute":"query-status","id":15,"extra":1}"#) == [Self.err("GenericError", "QMP input member 'extra' is unexpected", id: 15)])
        #expect(try h.run(#"{"execute":"query-status","arguments":[],"id":11}"#) == [Self.err("GenericError", "QMP input member 'arguments' must be an object", id: 11)])
        #expect(try h.run(#"{"exec-oob":"query-status","id":2}"#) == [Self.err("GenericError", "QMP input member 'exec-oob' is unexpected", id: 2)])
        #expect(try h.run(#"{"execute":"bogus","id":3}"#) == [Self.err("CommandNotFound", "The command bogus has not been found", id: 3)])
        #expect(try h.run(#"{"execute":"query-status","id":{"x":[1]}}"#)[0]["id"] == ["x": [1]])
        let invalid = h.machine.handle(.invalid(desc: "JSON parse error, expecting value"), session: &h.session, now: 1)
        #expect(invalid.messages == [Self.err("GenericError", "JSON parse error, expecting value")])
    }

    @Test func argumentErrors() throws {
        var h = Harness()
        #expect(try h.run(#"{"execute":"xen-save-devices-state","id":7}"#) == [Self.err("GenericError", "Parameter 'filename' is missing", id: 7)])
        #expect(try h.run(#"{"execute":"xen-save-devices-state","arguments":{"filename":5},"id":8}"#) == [Self.err("GenericError", "Invalid parameter type for 'filename', expected: string", id: 8)])
        #expect(try h.run(#"{"execute":"xen-save-devices-state","arguments":{"filename":"/x","live":"no"},"id":9}"#) == [Self.err("GenericError", "Invalid parameter type for 'live', expected: boolean", id: 9)])
        #expect(try h.run(#"{"execute":"xen-save-devices-state","arguments":{"filename":"/x","bogus":1},"id":9}"#) == [Self.err("GenericError", "Parameter 'bogus' is unexpected", id: 9)])
        #expect(try h.run(#"{"execute":"stop","arguments":{"x":1},"id":10}"#) == [Self.err("GenericError", "Parameter 'x' is unexpected", id: 10)])
        #expect(try h.run(#"{"execute":"migrate","arguments":{},"id":15}"#) == [Self.err("GenericError", "Parameter 'uri' is missing", id: 15)])
        #expect(try h.run(#"{"execute":"human-monitor-command","arguments":{},"id":6}"#) == [Self.err("GenericError", "Parameter 'command-line' is missing", id: 6)])
        #expect(h.machine.runState == .running)
    }

    @Test func stopAndCont() throws {
        var h = Harness()
        let running: JSONValue = ["return": ["status": "running", "singlestep": false, "running": true], "id": 1]
        #expect(try h.run(#"{"execute":"query-status","id":1}"#) == [running])
        #expect(try h.run(#"{"execute":"stop","id":2}"#) == [["event": "STOP"], ["return": [:], "id": 2]])
        #expect(try h.run(#"{"execute":"stop","id":3}"#) == [["return": [:], "id": 3]])
        #expect(try h.run(#"{"execute":"query-status","id":4}"#) == [["return": ["status": "paused", "singlestep": false, "running": false], "id": 4]])
        #expect(try h.run(#"{"execute":"cont","id":5}"#) == [["event": "RESUME"], ["return": [:], "id": 5]])
        #expect(try h.run(#"{"execute":"cont","id":6}"#) == [["return": [:], "id": 6]])
        #expect(h.machine.runState == .running)
    }

    @Test func prelaunchAndInmigrate() throws {
        var pre = Harness(.prelaunch)
        #expect(try pre.run(#"{"execute":"query-status"}"#) == [["return": ["status": "prelaunch", "singlestep": false, "running": false]]])
        #expect(try pre.run(#"{"execute":"cont"}"#) == [["event": "RESUME"], ["return": [:]]])
        var inm = Harness(.inmigrate)
        #expect(try inm.run(#"{"execute":"stop"}"#) == [["return": [:]]])
        #expect(try inm.run(#"{"execute":"cont"}"#) == [["return": [:]]])
        #expect(inm.machine.runState == .inmigrate)
        #expect(try inm.run(#"{"execute":"migrate","arguments":{"uri":"exec:cat > /dev/null"},"id":6}"#) == [Self.err("GenericError", "Guest is waiting for an incoming migration", id: 6)])
        #expect(try inm.run(#"{"execute":"query-migrate"}"#) == [["return": [:]]])
        var dead = Harness(.shutdown)
        #expect(try dead.run(#"{"execute":"cont"}"#) == [Self.err("GenericError", "Resetting the Virtual Machine is required")])
    }

    @Test func saveAndLoadRepeatedly() throws {
        let dir = TempDir("sm")
        defer { dir.cleanup() }
        var h = Harness()
        // Saving a running VM stops and resumes it around the save, as QEMU does.
        let path1 = dir.file("a.state")
        #expect(try h.run(#"{"execute":"xen-save-devices-state","arguments":{"filename":"\#(path1)"},"id":1}"#) == [["event": "STOP"], ["event": "RESUME"], ["return": [:], "id": 1]])
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path1)))
        #expect(Array(bytes.prefix(8)) == [0x51, 0x45, 0x56, 0x4D, 0x00, 0x00, 0x00, 0x03])
        #expect(bytes.count == DeviceStateFile.defaultSize)
        let saved = try #require(DeviceStateFile.decode(bytes))
        #expect(saved.domain == "dom7" && saved.save == 1)

        #expect(try h.run(#"{"execute":"xen-load-devices-state","arguments":{"filename":"\#(path1)"},"id":2}"#) == [Self.err("GenericError", "Cannot update device state while vm is running", id: 2)])
        _ = try h.run(#"{"execute":"stop"}"#)
        let path2 = dir.file("b.state")
        #expect(try h.run(#"{"execute":"xen-save-devices-state","arguments":{"filename":"\#(path2)","live":false}}"#) == [["return": [:]]])
        #expect(h.machine.saveCounter == 2)
        for path in [path1, path2, path1] {
            #expect(try h.run(#"{"execute":"xen-load-devices-state","arguments":{"filename":"\#(path)"}}"#) == [["return": [:]]])
        }
        #expect(h.machine.loadedStates.map(\.file.save) == [1, 2, 1])
        #expect(h.machine.loadedStates.map(\.path) == [path1, path2, path1])
        #expect(h.machine.guestCounter(at: h.now + 10) == saved.guestCounter)  // stopped: the counter holds

        let missing = dir.file("nonexist")
        #expect(try h.run(#"{"execute":"xen-load-devices-state","arguments":{"filename":"\#(missing)"},"id":3}"#) == [Self.err("GenericError", "Unable to open \(missing): No such file or directory", id: 3)])
        let notState = dir.file("junk")
        try Data("hello".utf8).write(to: URL(fileURLWithPath: notState))
        #expect(try h.run(#"{"execute":"xen-load-devices-state","arguments":{"filename":"\#(notState)"},"id":4}"#) == [Self.err("GenericError", "An IO error has occurred", id: 4)])
        // A truncated state file (a crash mid-save) is not a state file.
        let truncated = dir.file("trunc")
        try Data(bytes.prefix(4096)).write(to: URL(fileURLWithPath: truncated))
        #expect(try h.run(#"{"execute":"xen-load-devices-state","arguments":{"filename":"\#(truncated)"},"id":5}"#) == [Self.err("GenericError", "An IO error has occurred", id: 5)])
        #expect(try h.run(#"{"execute":"xen-save-devices-state","arguments":{"filename":"/nonexistent/dir/x"},"id":6}"#) == [Self.err("GenericError", "Unable to open /nonexistent/dir/x: No such file or directory", id: 6)])
        #expect(h.machine.loadedStates.count == 3)
    }

    @Test func guestCounterContinuesFromLoadedState() throws {
        let dir = TempDir("sm")
        defer { dir.cleanup() }
        var h = Harness()
        h.now += 2  // two seconds of running
        _ = try h.run(#"{"execute":"stop"}"#)
        let counter = h.machine.guestCounter(at: h.now)
        #expect(counter > 2_000_000)
        let hmp = try h.run(#"{"execute":"human-monitor-command","arguments":{"command-line":"xp /1wx 0x7e00"},"id":9}"#)
        let hex = String(counter, radix: 16)
        #expect(hmp == [["return": .string("0000000000007e00: 0x" + String(repeating: "0", count: 8 - hex.count) + hex + "\r\n"), "id": 9]])
        let path = dir.file("c.state")
        _ = try h.run(#"{"execute":"xen-save-devices-state","arguments":{"filename":"\#(path)"}}"#)

        var secondary = Harness(.paused)
        _ = try secondary.run(#"{"execute":"xen-load-devices-state","arguments":{"filename":"\#(path)"}}"#)
        #expect(secondary.machine.guestCounter(at: secondary.now) == counter)
        #expect(secondary.machine.loadedStates.first?.file.domain == "dom7")
        #expect(try secondary.run(#"{"execute":"human-monitor-command","arguments":{"command-line":"info status"}}"#) == [["return": "VM status: paused\r\n"]])
        #expect(try secondary.run(#"{"execute":"human-monitor-command","arguments":{"command-line":"bogus x"}}"#) == [["return": "unknown command: 'bogus'\r\n"]])
    }

    @Test func migrateToFile() throws {
        let dir = TempDir("sm")
        defer { dir.cleanup() }
        var h = Harness()
        #expect(try h.run(#"{"execute":"query-migrate"}"#) == [["return": [:]]])
        #expect(try h.run(#"{"execute":"migrate","arguments":{"uri":"bogus:x"},"id":1}"#) == [Self.err("GenericError", "Parameter 'uri' expects a valid migration protocol", id: 1)])
        let target = dir.file("mig.bin")
        // Running: reply first, then STOP; the VM ends in postmigrate.
        #expect(try h.run(#"{"execute":"migrate","arguments":{"uri":"exec:cat > \#(target)"},"id":2}"#) == [["return": [:], "id": 2], ["event": "STOP"]])
        #expect(h.machine.runState == .postmigrate)
        let info = try h.run(#"{"execute":"query-migrate"}"#)[0]["return"]
        #expect(info?["status"] == "completed")
        #expect(info?["ram"]?["transferred"]?.intValue == 590_986)
        #expect(FileManager.default.fileExists(atPath: target))
        #expect(try h.run(#"{"execute":"migrate","arguments":{"uri":"exec:cat > \#(target)"},"id":3}"#) == [Self.err("GenericError", "Can't migrate the vm that was paused due to previous migration", id: 3)])
        #expect(try h.run(#"{"execute":"cont"}"#) == [["event": "RESUME"], ["return": [:]]])
        #expect(try h.run(#"{"execute":"migrate","arguments":{"uri":"exec:false"}}"#) == [["return": [:]]])
        #expect(try h.run(#"{"execute":"query-migrate"}"#)[0]["return"]?["status"] == "failed")
        #expect(h.machine.runState == .running)
    }

    @Test func colo() throws {
        var h = Harness()
        #expect(try h.run(#"{"execute":"query-colo-status"}"#) == [["return": ["last-mode": "none", "mode": "none", "reason": "none"]]])
        #expect(try h.run(#"{"execute":"x-colo-lost-heartbeat","id":17}"#) == [Self.err("GenericError", "The feature 'colo' is not enabled", id: 17)])
        #expect(try h.run(#"{"execute":"x-colo-lost-heartbeat","arguments":{"a":1},"id":8}"#) == [Self.err("GenericError", "Parameter 'a' is unexpected", id: 8)])
        h.machine.coloMode = .secondary
        #expect(try h.run(#"{"execute":"x-colo-lost-heartbeat"}"#) == [["return": [:]], ["event": "COLO_EXIT", "data": ["mode": "secondary", "reason": "request"]]])
        #expect(try h.run(#"{"execute":"query-colo-status"}"#) == [["return": ["last-mode": "secondary", "mode": "none", "reason": "request"]]])
    }

    @Test func quit() throws {
        var h = Harness()
        let outcome = h.machine.handle(.value(["execute": "quit", "id": 99]), session: &h.session, now: 5)
        #expect(outcome.messages.map(Harness.stripTimestamp) == [["event": "SHUTDOWN", "data": ["guest": false, "reason": "host-qmp-quit"]], ["return": [:], "id": 99]])
        #expect(outcome.closesConnection)
        #expect(h.machine.runState == .shutdown)
    }
}

/// QEMU's JSON streamer: values end where braces balance; errors as QEMU words them.
@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct InputSplitterTests {
    func split(_ chunks: [String]) -> [QMPInput] {
        var s = QMPInputSplitter()
        return chunks.flatMap { s.feed(Array($0.utf8)) }
    }

    @Test func valuesWithoutNewlinesAndAcrossReads() {
        let inputs = split([#"{"execute":"query-status","id":1}{"execute":"stop"}"#, #"{"execute":"query-"#, #"status","id":16}"#])
        #expect(inputs == [
            .value(["execute": "query-status", "id": 1]), .value(["execute": "stop"]), .value(["execute": "query-status", "id": 16]),
        ])
    }

    @Test func qemuParseErrors() {
        #expect(split(["{bad json}\n"]) == [.invalid(desc: "JSON parse error, invalid keyword 'bad'")])
        #expect(split(["x\n"]) == [.invalid(desc: "JSON parse error, invalid keyword 'x'")])
        #expect(split(["{\"execute\": }\n"]) == [.invalid(desc: "JSON parse error, expecting value")])
        #expect(split(["}\n"]) == [.invalid(desc: "JSON parse error, expecting value")])
        #expect(split(["{\"a\" 1}\n"]) == [.invalid(desc: "JSON parse error, missing : in object pair")])
        #expect(split(["{\"execute\":\"query-status\",\"id\":\"a\n"]) == [.invalid(desc: "JSON parse error, stray '\"a\n'")])
        #expect(split(["5\n", "\"str\"\n", "[1, {\"a\": \"}\"}]"]) == [.value(5), .value("str"), .value([1, ["a": "}"]])])
    }

    @Test func recoversAfterErrorAndBoundsSize() {
        #expect(split(["x\n{\"execute\":\"stop\"}"]) == [.invalid(desc: "JSON parse error, invalid keyword 'x'"), .value(["execute": "stop"])])
        var s = QMPInputSplitter(maxValueLength: 100)
        let out = s.feed(Array(("{\"a\":\"" + String(repeating: "x", count: 200)).utf8))
        #expect(out == [.invalid(desc: "JSON parse error, token size limit exceeded")])
        #expect(s.feed(Array("{\"execute\":\"stop\"}".utf8)) == [.value(["execute": "stop"])])
    }
}

@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct FaultSyntaxTests {
    @Test(arguments: [
        ("stop:delay=200ms", SimulatedFault("stop", .delay(.milliseconds(200)))),
        ("xen-save-devices-state:crash-after-bytes=4096", SimulatedFault("xen-save-devices-state", .crash(afterBytes: 4096))),
        ("*:hang,after=3", SimulatedFault("*", .hang, after: 3)),
        ("query-status:drop,count=2", SimulatedFault("query-status", .drop, count: 2)),
        ("cont:error=DeviceNotActive,desc=No, really: no", SimulatedFault("cont", .error(errorClass: "DeviceNotActive", desc: "No, really: no"))),
        ("@2s:freeze", SimulatedFault(trigger: .time(.seconds(2)), action: .freeze)),
        ("*:wrong-id,at=1.5s", SimulatedFault(trigger: .command("*"), action: .wrongID, at: .milliseconds(1500))),
        ("query-status:flood=100", SimulatedFault("query-status", .flood(events: 100))),
        ("stop:oversized=70000", SimulatedFault("stop", .oversized(bytes: 70000))),
        ("stop:junk=hello", SimulatedFault("stop", .junk("hello"))),
        ("stop:delay=50", SimulatedFault("stop", .delay(.milliseconds(50)))),
    ])
    func parses(_ text: String, _ expected: SimulatedFault) throws {
        let fault = try SimulatedFault(parsing: text)
        #expect(fault == expected)
        #expect(try SimulatedFault(parsing: fault.description) == fault)
    }

    @Test(arguments: ["stop", "stop:", "stop:explode", "stop:delay=soon", "stop:hang,drop", "@x:freeze", "stop:hang,desc=x", "stop:after=-1,hang"])
    func rejects(_ text: String) {
        #expect(throws: SimulatedFaultSyntaxError.self) { try SimulatedFault(parsing: text) }
    }

    @Test func fileWithComments() throws {
        let faults = try SimulatedFault.parseList("# faults\n\nstop:delay=1s\n  cont:hang  \n")
        #expect(faults == [SimulatedFault("stop", .delay(.seconds(1))), SimulatedFault("cont", .hang)])
    }

    @Test func scheduleCountsAfterAndCount() {
        var schedule = FaultSchedule([SimulatedFault("stop", .drop, after: 1, count: 2), SimulatedFault("*", .hang, at: .seconds(10))])
        let seen = (0..<5).map { _ in schedule.action(for: "stop", elapsed: .seconds(1)) }
        #expect(seen == [nil, .drop, .drop, nil, nil])
        #expect(schedule.action(for: "cont", elapsed: .seconds(9)) == nil)
        #expect(schedule.action(for: "cont", elapsed: .seconds(11)) == .hang)
    }
}

@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct AddressTests {
    @Test func parsesAddresses() {
        #expect(SimulatorAddress(parsing: "unix:/tmp/a.sock") == .unix(path: "/tmp/a.sock"))
        #expect(SimulatorAddress(parsing: "/tmp/a.sock") == .unix(path: "/tmp/a.sock"))
        #expect(SimulatorAddress(parsing: "tcp:127.0.0.1:4444") == .tcp(host: "127.0.0.1", port: 4444))
        #expect(SimulatorAddress(parsing: "tcp:[::1]:0") == .tcp(host: "::1", port: 0))
        #expect(SimulatorAddress.tcp(host: "::1", port: 5).description == "tcp:[::1]:5")
        #expect(SimulatorAddress(parsing: "tcp:127.0.0.1") == nil)
        #expect(SimulatorAddress(parsing: "tcp:h:99999") == nil)
        #expect(SimulatorAddress(parsing: "unix:") == nil)
        #expect(SimulatorAddress(parsing: "dom0.sock") == nil)
        #expect(SimulatorAddress.tcp(host: "h", port: 1).description == "tcp:h:1")
    }
}

/// The domain layer without sockets: connections, faults, steps.
@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct DomainCoreTests {
    static func core(_ faults: [SimulatedFault] = []) -> DomainCore {
        DomainCore(machine: SimulatedQEMU(name: "d", now: 100), faults: FaultSchedule(faults), startedAt: 100)
    }

    static func sent(_ steps: [DomainStep]) -> [JSONValue] {
        steps.compactMap { if case .send(.json(let v)) = $0 { return v } else { return nil } }
    }

    @Test func oneConnectionHoldsTheMonitor() {
        var core = Self.core()
        #expect(Self.sent(core.connect(1)).first?["QMP"] != nil)
        #expect(core.connect(2).isEmpty)
        #expect(core.isServing(1) && !core.isServing(2))
        #expect(core.disconnect(1) == 2)
        #expect(core.isServing(2))
    }

    @Test func faultsBecomeSteps() throws {
        let dir = TempDir("core")
        defer { dir.cleanup() }
        var core = Self.core([
            SimulatedFault("stop", .delay(.seconds(1)), count: 1),
            SimulatedFault("query-status", .hang, count: 1),
            try SimulatedFault(parsing: "xen-save-devices-state:crash-after-bytes=100"),
        ])
        _ = core.connect(1)
        _ = core.receive(.value(["execute": "qmp_capabilities"]), from: 1, now: 101)
        let stop = core.receive(.value(["execute": "stop"]), from: 1, now: 101)
        #expect(stop.first == .wait(.seconds(1)))
        #expect(Self.sent(stop).count == 2)  // STOP, then the reply
        #expect(core.receive(.value(["execute": "query-status"]), from: 1, now: 101) == [.hang])
        let path = dir.file("p.state")
        let crash = core.receive(.value(["execute": "xen-save-devices-state", "arguments": ["filename": .string(path)]]), from: 1, now: 102)
        #expect(crash == [.die])
        #expect(!core.isAlive)
        #expect(try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int == 100)
        #expect(core.log.map(\.name) == ["qmp_capabilities", "stop", "query-status", "xen-save-devices-state"])
        #expect(core.connect(3) == [.close])
    }

    @Test func quitExits() {
        var core = Self.core()
        _ = core.connect(1)
        _ = core.receive(.value(["execute": "qmp_capabilities"]), from: 1, now: 101)
        let steps = core.receive(.value(["execute": "quit"]), from: 1, now: 101)
        #expect(steps.last == .exit)
        #expect(Self.sent(steps).map { $0["event"] ?? $0["return"] } == ["SHUTDOWN", [:]])
    }
}
