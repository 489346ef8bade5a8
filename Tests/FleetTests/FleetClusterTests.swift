import ClusterLab
import ColorunSystem
import ColorunTestSupport
import Etcd
import Fleet
import Foundation
import NIOPosix
import QEMUSimulator
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A `colorun fleet run` process (an owned child: it dies with the test process).
final class FleetInstance: @unchecked Sendable {
    let node: String
    let pid: pid_t
    let logPath: String

    init(binary: String? = nil, node: String, arguments: [String], logPath: String) throws {
        guard let binary = binary ?? fleetColorunBinary() else { throw FleetTestError("the colorun binary is not built (swift build)") }
        self.node = node
        self.logPath = logPath
        pid = try spawnChild([binary, "fleet", "run", "--node", node] + arguments, lifetime: .owned,
                             standardOutput: .appendingTo(logPath), standardError: .appendingTo(logPath))
    }

    func kill(_ signal: Int32) { _ = Glibc.kill(pid, signal) }

    /// SIGTERM and wait for the exit (SIGKILL after `grace`).
    func stop(grace: Duration = .seconds(20)) async -> ChildExitStatus? {
        kill(SIGTERM)
        let clock = ContinuousClock()
        let deadline = clock.now + grace
        while clock.now < deadline {
            if let status = reapChild(pid, blocking: false) { return status }
            try? await Task.sleep(for: .milliseconds(20))
        }
        kill(SIGKILL)
        return reapChild(pid, blocking: true)
    }

    var log: String { String(decoding: (try? readFile(logPath)) ?? [], as: UTF8.self) }
}

struct FleetTestError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The built `colorun` binary: next to the test bundle in `.build/<triple>/debug/`.
func fleetColorunBinary() -> String? {
    builtColorunBinary()
}

/// Checkpoints in a domain's command log: each `stop` and the commands up to its `cont`.
/// Returns the violations: a command from another connection inside a checkpoint
/// (interleaving), and checkpoints whose connection never sent the `cont` (unless that
/// connection sent nothing more at all: its owner was killed mid-checkpoint).
func checkpointViolations(_ log: [CommandLogEntry], domain: String) -> [String] {
    var violations: [String] = []
    var open: (connection: Int, time: Double)?
    for (index, entry) in log.enumerated() {
        if let current = open, entry.connection != current.connection {
            let laterFromOpen = log[index...].contains { $0.connection == current.connection }
            if laterFromOpen {
                violations.append("\(domain): connection \(entry.connection) sent \(entry.name) inside a checkpoint of connection \(current.connection)")
            }
            open = nil
        }
        switch entry.name {
        case "stop": open = (entry.connection, entry.time)
        case "cont": if open?.connection == entry.connection { open = nil }
        default: break
        }
    }
    return violations
}

@Suite("Fleet: real etcd, three colorun processes, simulated pairs", .machine(.exclusive), .timeLimit(.minutes(4)))
struct FleetClusterTests {
    static let pairCount = 300
    static let ttl: Int64 = 3

    @Test func spreadTakeOverAndRebalance() async throws {
        let dir = TempDir("fleet")
        defer { dir.cleanup() }
        let etcd = try EtcdServer.start(parent: "/dev/shm")   // its fsyncs on tmpfs
        defer { Task { await etcd.stop() } }
        try await etcd.waitHealthy()
        let sim = QEMUSimulator()
        let domains = try await sim.startDomains(count: 2 * Self.pairCount, directory: dir.path)

        // The policy and the declarations (through `colorun fleet add --file`).
        let policyDir = dir.file("policies")
        try FileManager.default.createDirectory(atPath: policyDir, withIntermediateDirectories: true)
        let example = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../examples/fleet-pair.lua").standardized.path
        try FileManager.default.copyItem(atPath: example, toPath: policyDir + "/fleet-pair.lua")
        var entries: [String] = []
        for i in 0..<Self.pairCount {
            entries.append("\"pair\(i)\": {\"policy\": \"fleet-pair.lua\", \"domains\": {\"primary\": \"unix:\(dir.path)/dom\(2 * i).sock\", \"secondary\": \"unix:\(dir.path)/dom\(2 * i + 1).sock\"}, \"settings\": {\"interval\": \"2s\", \"keep\": \"1\"}}")
        }
        try writeFile(dir.file("pairs.json"), Array("{\(entries.joined(separator: ",\n"))}".utf8))
        let url = etcd.clientURLs[0]
        let binary = try #require(fleetColorunBinary())
        let addPid = try spawnChild([binary, "fleet", "add", "--etcd", url, "--file", dir.file("pairs.json")], lifetime: .owned,
                                    standardOutput: .appendingTo(dir.file("add.log")), standardError: .appendingTo(dir.file("add.log")))
        #expect(reapChild(addPid, blocking: true) == .exited(code: 0), "fleet add: \(String(decoding: (try? readFile(dir.file("add.log"))) ?? [], as: UTF8.self))")

        let client = try EtcdClient(endpoints: [url], eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
        defer { Task { await client.shutdown() } }
        let store = FleetStore(client: client)
        // The pairs' state (300 checkpoints a second, each fsynced) on tmpfs.
        let state = try makeTemporaryDirectory(in: "/dev/shm", prefix: "colorun-fleet-state")
        defer { removeTree(state) }
        let common = ["--etcd", url, "--policy-dir", policyDir, "--state-dir", state, "--ttl", String(Self.ttl),
                      "--max-moves", "10", "--log-level", "notice"]
        var instances = try ["n1", "n2", "n3"].map { try FleetInstance(node: $0, arguments: common, logPath: dir.file("\($0).log")) }
        defer { for instance in instances { instance.kill(SIGKILL) } }

        // 300 pairs spread evenly: 100 each.
        do {
            try await waitUntil("300 pairs owned, 100 by each instance", timeout: .seconds(60), interval: .milliseconds(100)) {
                let view = try await store.snapshot().view
                return view.unowned.isEmpty && ["n1", "n2", "n3"].allSatisfy { view.counts[$0] == 100 }
            }
        } catch {
            let view = try await store.snapshot().view
            Issue.record("\(error): counts \(view.counts), unowned \(view.unowned.count), nodes \(view.nodes)\n\(instances.map { $0.log.suffix(3000) })")
            return
        }
        // Every pair checkpoints.
        try await waitUntil("every pair checkpointed", timeout: .seconds(30), interval: .milliseconds(100)) {
            (0..<Self.pairCount).allSatisfy { domains[2 * $0].saveCounter >= 1 }
        }

        // Kill n3: its pairs are owned again within TTL + 1 s, and checkpoint again.
        let before = try await store.snapshot()
        let orphans = before.owners.filter { $0.value.node == "n3" }.map(\.key)
        #expect(orphans.count == 100)
        let savesAtKill = Dictionary(uniqueKeysWithValues: orphans.map { ($0, domains[2 * Int($0.dropFirst(4))!].saveCounter) })
        let killed = ContinuousClock.now
        instances[2].kill(SIGKILL)
        _ = reapChild(instances[2].pid, blocking: true)
        var expired: Duration?
        try await waitUntil("n3's pairs owned again", timeout: .seconds(15), interval: .milliseconds(20)) {
            let view = try await store.snapshot().view
            if expired == nil && !view.nodes.contains("n3") { expired = ContinuousClock.now - killed }
            return view.unowned.isEmpty && view.counts["n3"] == nil && !view.nodes.contains("n3")
        }
        let reowned = ContinuousClock.now - killed
        // What the time is made of: etcd ending the lease (at most TTL after the last renewal,
        // plus etcd's expiry check, every 500 ms), then the survivors' watch, read and claims.
        let claimLines = instances.prefix(2).flatMap { $0.log.split(separator: "\n").filter { $0.contains("claimed pairs") }.suffix(2) }
        print("fleet: 100 pairs of a SIGKILLed instance owned again after \(reowned) (its lease gone after \(expired ?? .zero), claimed \(reowned - (expired ?? .zero)) later; TTL \(Self.ttl) s)\n\(claimLines.joined(separator: "\n"))")
        #expect(reowned - (expired ?? reowned) < .milliseconds(750), "the survivors took \(reowned - (expired ?? reowned)) to claim after the lease ended\n\(claimLines.joined(separator: "\n"))")
        #expect(reowned < .seconds(Self.ttl) + .seconds(1), "re-owned after \(reowned), TTL \(Self.ttl) s, killed at \(Date()) - \(reowned); \(instances.prefix(2).map { $0.log.split(separator: "\n").filter { $0.contains("[Fleet]") }.suffix(8).joined(separator: "\n") })")
        let after = try await store.snapshot()
        for pair in orphans {
            #expect(after.owners[pair]!.token > before.owners[pair]!.token, "\(pair): a new owner has a newer fencing token")
        }
        try await waitUntil("every taken-over pair checkpoints again", timeout: .seconds(15), interval: .milliseconds(100)) {
            orphans.allSatisfy { domains[2 * Int($0.dropFirst(4))!].saveCounter > savesAtKill[$0]! }
        }

        // A fourth joins: 100 each again, gradually, no checkpoint torn or interleaved.
        let logMarks = domains.map { $0.commandLog.count }
        instances.append(try FleetInstance(node: "n4", arguments: common, logPath: dir.file("n4.log")))
        try await waitUntil("rebalanced to 100 pairs each on n1, n2, n4", timeout: .seconds(60), interval: .milliseconds(100)) {
            let view = try await store.snapshot().view
            return view.unowned.isEmpty && ["n1", "n2", "n4"].allSatisfy { view.counts[$0] == 100 }
        }
        let moved = try await store.snapshot().owners.filter { $0.value.node == "n4" }.map(\.key)
        let savesAtBalance = Dictionary(uniqueKeysWithValues: moved.map { ($0, domains[2 * Int($0.dropFirst(4))!].saveCounter) })
        try await waitUntil("every moved pair checkpoints on n4", timeout: .seconds(15), interval: .milliseconds(100)) {
            moved.allSatisfy { domains[2 * Int($0.dropFirst(4))!].saveCounter > savesAtBalance[$0]! }
        }

        // Drain n1 for maintenance (`colorun fleet drain`): its 100 pairs move to n2 and n4
        // (150 each), gradually, and each checkpoints there; n1 keeps running, owning none.
        let drainPid = try spawnChild([binary, "fleet", "drain", "n1", "--etcd", url], lifetime: .owned,
                                      standardOutput: .appendingTo(dir.file("drain.log")), standardError: .appendingTo(dir.file("drain.log")))
        #expect(reapChild(drainPid, blocking: true) == .exited(code: 0), "fleet drain: \(String(decoding: (try? readFile(dir.file("drain.log"))) ?? [], as: UTF8.self))")
        let onN1 = try await store.snapshot().owners.filter { $0.value.node == "n1" }.map(\.key)
        #expect(onN1.count == 100)
        try await waitUntil("n1 drained: 150 pairs each on n2 and n4", timeout: .seconds(60), interval: .milliseconds(100)) {
            let view = try await store.snapshot().view
            return view.unowned.isEmpty && view.counts["n1", default: 0] == 0 && view.counts["n2"] == 150 && view.counts["n4"] == 150
        }
        let savesAtDrain = Dictionary(uniqueKeysWithValues: onN1.map { ($0, domains[2 * Int($0.dropFirst(4))!].saveCounter) })
        try await waitUntil("every pair n1 gave away checkpoints again", timeout: .seconds(15), interval: .milliseconds(100)) {
            onN1.allSatisfy { domains[2 * Int($0.dropFirst(4))!].saveCounter > savesAtDrain[$0]! }
        }
        #expect(try await store.snapshot().view.nodes.contains("n1"), "a drained node stays in the fleet")

        // Stop the instances: their pairs stop, every domain runs.
        for instance in instances.indices where instance != 2 {
            let status = await instances[instance].stop()
            #expect(status == .exited(code: 0), "\(instances[instance].node): \(instances[instance].log.suffix(2000))")
        }
        var violations: [String] = []
        for (index, domain) in domains.enumerated() {
            #expect(domain.runState == .running, "dom\(index) is \(domain.runState)")
            // From the join on, no checkpoint of any pair was torn or interleaved by two owners.
            violations += checkpointViolations(Array(domain.commandLog.dropFirst(logMarks[index])), domain: "dom\(index)")
        }
        #expect(violations.isEmpty, "\(violations.prefix(10))")
        for instance in instances {
            #expect(!instance.log.contains("not committed"), "\(instance.node) had a commit refused: \(instance.log.suffix(2000))")
        }
        await sim.shutdown()
    }
}
