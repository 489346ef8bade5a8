import ColorunSystem
import ColorunTestSupport
import Foundation
import JSON
import QMP
import Testing

@testable import QEMUSimulator

/// Where the real QEMU is, if installed.
let realQEMUPath: String? = ["/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"]
    .first { FileManager.default.isExecutableFile(atPath: $0) }

/// A real QEMU 7.2 under TCG with a QMP socket, started as docs/qemu-notes.md describes, as an
/// owned child (ColorunSystem): it dies with the test process, however that ends.
final class RealQEMU {
    let pid: pid_t
    let socketPath: String
    private var reaped = false

    init(directory: TempDir) throws {
        socketPath = directory.file("qemu.sock")
        pid = try spawnChild([
            realQEMUPath!,
            "-M", "pc,suppress-vmdesc=on", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64",
            "-global", "migration.send-configuration=off", "-global", "apic.vapic=off",
            "-qmp", "unix:\(socketPath),server=on,wait=off",
        ], lifetime: .owned, standardError: .appendingTo(directory.file("qemu.stderr")))
    }

    /// Waits for it to exit (after `quit`); kills it if it has not within 2 s.
    func stop() async {
        for _ in 0..<100 where !reaped {
            if reapChild(pid, blocking: false) != nil { reaped = true } else { try? await Task.sleep(for: .milliseconds(20)) }
        }
        killAndReap()
    }

    private func killAndReap() {
        guard !reaped else { return }
        kill(pid, SIGKILL)
        _ = reapChild(pid, blocking: true)
        reaped = true
    }

    deinit { killAndReap() }
}

/// One scenario, run against real QEMU and against the simulator; the replies must match
/// (ids, timestamps and version aside).
@Suite(.timeLimit(.minutes(2)), .machine(.exclusive)) struct ConformanceTests {
    struct Step: Equatable, CustomStringConvertible {
        var label: String
        var messages: [JSONValue]
        var description: String { "\(label): \(messages.map(\.description).joined(separator: " | "))" }
    }

    /// Drops what legitimately differs: ids, timestamps, the version, migration numbers.
    static func normalize(_ value: JSONValue) -> JSONValue {
        guard case .object(var m) = value else { return value }
        m["id"] = nil
        m["timestamp"] = nil
        if case .object(var greeting)? = m["QMP"] {
            greeting["version"] = nil
            m["QMP"] = .object(greeting)
        }
        if case .object(let ret)? = m["return"], ret["status"] == "completed", let ram = ret["ram"] {
            // query-migrate: compare the status and the shape, not the numbers.
            let ramKeys = ram.objectValue.map { Array($0.keys).sorted() } ?? []
            m["return"] = [
                "status": "completed",
                "keys": .array(ret.keys.sorted().map { .string($0) }),
                "ram-keys": .array(ramKeys.map { .string($0) }),
            ]
        }
        return .object(m)
    }

    /// The scenario; `dir` holds this target's files.
    static func scenario(_ address: SimulatorAddress, dir: TempDir) async throws -> [Step] {
        var steps: [Step] = []
        var client = try await TestQMPClient.connect(address)
        func record(_ label: String, _ messages: [JSONValue]) { steps.append(Step(label: label, messages: messages.map(normalize))) }
        func run(_ label: String, _ name: String, _ args: JSONValue? = nil) async throws {
            let (events, reply) = try await client.execute(name, args, id: .string(label))
            record(label, events + [reply])
        }
        func raw(_ label: String, _ text: String) async throws {
            try await client.send(text + "\n")
            let (events, reply) = try await client.replyAndEvents()
            record(label, events + [reply])
        }

        record("greeting", [try #require(try await client.json())])
        try await run("before-capabilities", "query-status")
        try await run("qmp_capabilities", "qmp_capabilities")
        try await run("qmp_capabilities-again", "qmp_capabilities")
        try await run("query-status-running", "query-status")
        try await run("stop", "stop")
        try await run("stop-again", "stop")
        try await run("query-status-paused", "query-status")
        let statePath = dir.file("x.state")
        try await run("xen-save-devices-state", "xen-save-devices-state", ["filename": .string(statePath)])
        let head = try FileHandle(forReadingFrom: URL(fileURLWithPath: statePath)).readData(ofLength: 8)
        record("state-file-magic", [.array(head.map { .int(Int64($0)) })])
        try await run("cont", "cont")
        try await run("load-while-running", "xen-load-devices-state", ["filename": .string(statePath)])
        try await run("stop-for-load", "stop")
        try await run("load-missing-file", "xen-load-devices-state", ["filename": "/tmp/colorun-conformance-nonexistent/x.state"])
        try await run("command-not-found", "bogus")
        try await run("missing-argument", "xen-save-devices-state")
        try await run("wrong-argument-type", "xen-save-devices-state", ["filename": 5])
        try await run("unexpected-argument", "stop", ["x": 1])
        try await raw("non-object", "[1,2]")
        try await raw("malformed-json", "{bad json}")
        try await run("query-migrate-never", "query-migrate")
        try await run("query-colo-status", "query-colo-status")
        try await run("x-colo-lost-heartbeat", "x-colo-lost-heartbeat")
        try await run("hmp-info-status", "human-monitor-command", ["command-line": "info status"])
        try await run("cont-again", "cont")

        // Checkpoint by migration to a file: reply, then STOP; poll until completed.
        let (migrateEvents, migrateReply) = try await client.execute("migrate", ["uri": .string("exec:cat > \(dir.file("mig.bin"))")])
        var events = migrateEvents
        var info: JSONValue = [:]
        for _ in 0..<250 {
            let (more, reply) = try await client.execute("query-migrate")
            events += more
            info = reply
            if reply["return"]?["status"] == "completed" || reply["return"]?["status"] == "failed" { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        record("migrate", [migrateReply] + events)
        record("query-migrate-completed", [info])
        try await run("query-status-postmigrate", "query-status")
        #expect(FileManager.default.fileExists(atPath: dir.file("mig.bin")))

        // A fresh connection must negotiate again.
        await client.close()
        client = try await TestQMPClient.connect(address)
        record("greeting-again", [try #require(try await client.json())])
        try await run("before-capabilities-again", "stop")
        try await run("qmp_capabilities-fresh", "qmp_capabilities")
        try await run("quit", "quit")
        record("eof-after-quit", try await client.line() == nil ? ["EOF"] : ["data"])
        await client.close()
        return steps
    }

    @Test(.enabled(if: realQEMUPath != nil, "needs qemu-system-x86_64"), .timeLimit(.minutes(1)))
    func simulatorAnswersAsRealQEMU() async throws {
        let qemuDir = TempDir("conf-q")
        let simDir = TempDir("conf-s")
        defer {
            qemuDir.cleanup()
            simDir.cleanup()
        }
        let qemu = try RealQEMU(directory: qemuDir)
        let real: [Step]
        do {
            real = try await Self.scenario(.unix(path: qemu.socketPath), dir: qemuDir)
            await qemu.stop()
        } catch {
            await qemu.stop()
            throw error
        }

        let simulator = QEMUSimulator()
        let simulated: [Step]
        do {
            let domain = try await simulator.start(socketPath: simDir.file("sim.sock"))
            simulated = try await Self.scenario(domain.address, dir: simDir)
            await simulator.shutdown()
        } catch {
            await simulator.shutdown()
            throw error
        }

        if ProcessInfo.processInfo.environment["SIM_CONFORMANCE_VERBOSE"] != nil { for r in real { print(r) } }
        #expect(real.count == simulated.count)
        for (r, s) in zip(real, simulated) {
            #expect(r == s, "step \(r.label) differs:\n  QEMU: \(r)\n  sim:  \(s)")
        }
        // The scenario checks things that can differ: make sure it saw real answers.
        #expect(real.first { $0.label == "stop" }?.messages.first?.eventName == "STOP")
        #expect(real.first { $0.label == "state-file-magic" }?.messages == [[81, 69, 86, 77, 0, 0, 0, 3]])
        #expect(real.last?.messages == ["EOF"])
    }
}
