import ClusterLab
import ColorunSystem
import ColorunTestSupport
import Etcd
import Fleet
import Foundation
import Logging
import NIOPosix
import QEMUSimulator
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The domains' command logs with each command's client named by its host (the last byte of
/// its IPv4 address, from the simulator's record of the TCP peer) instead of its connection.
func logByHost(_ domain: SimulatedDomain) -> [CommandLogEntry] {
    domain.commandLog.map { entry in
        var byHost = entry
        let peer = domain.peer(of: entry.connection) ?? ""
        byHost.connection = Int(peer.split(separator: ":").first?.split(separator: ".").last ?? "") ?? -entry.connection
        return byHost
    }
}

/// Issue 11, the partition case: three `colorun fleet run` processes, each in its own network
/// namespace (a NetworkLab host), etcd in a fourth; the simulated domains listen on TCP in the
/// test process (which joins the lab's switch), so every instance reaches them and the
/// simulator's command log names the host that sent each command. n1 is cut from etcd only:
/// it must stop driving its pairs before its lease ends, the others take them over, no pair's
/// checkpoints interleave from two instances; once the cut is mended n1 joins again and
/// takes its share back without two owners at once.
@Suite("Fleet: one instance cut from etcd", .machine(.exclusive), .timeLimit(.minutes(3)), .enabled(if: getuid() == 0))
struct FleetIsolationTests {
    static let pairCount = 21
    static let ttl: Int64 = 3

    @Test func isolatedInstanceStopsBeforeItsLeaseEndsAndRejoins() async throws {
        let logger = Logger(label: "fleet-isolation")
        let nodes = ["n1", "n2", "n3"]
        let net = try NetworkLab(hosts: ["etcd"] + nodes, joinsTest: true, logger: logger)
        defer { net.destroy() }
        let dir = TempDir("fleet-iso")
        defer { dir.cleanup() }
        let etcd = try EtcdServer.start(
            members: [.init(name: "etcd", host: net.address(of: "etcd"), clientPort: 2379, peerPort: 2380, namespace: net.namespace(of: "etcd"))],
            parent: "/dev/shm")
        defer { Task { await etcd.stop() } }
        try await etcd.waitHealthy()
        let url = etcd.clientURLs[0]
        let client = try EtcdClient(endpoints: [url], eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
        defer { Task { await client.shutdown() } }
        let store = FleetStore(client: client)

        // Domains on TCP at the test's address on the switch.
        let sim = QEMUSimulator()
        var domains: [SimulatedDomain] = []
        for i in 0..<(2 * Self.pairCount) {
            domains.append(try await sim.start(name: "dom\(i)", address: .tcp(host: NetworkLab.testAddress, port: 0)))
        }
        let policyDir = dir.file("policies")
        try FileManager.default.createDirectory(atPath: policyDir, withIntermediateDirectories: true)
        let example = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../examples/fleet-pair.lua").standardized.path
        try FileManager.default.copyItem(atPath: example, toPath: policyDir + "/fleet-pair.lua")
        try await store.add((0..<Self.pairCount).map { i in
            PairDeclaration(name: "pair\(i)", policy: "fleet-pair.lua",
                            domains: ["primary": domains[2 * i].address.description, "secondary": domains[2 * i + 1].address.description],
                            settings: ["interval": "200ms", "keep": "1"])
        })
        let state = try makeTemporaryDirectory(in: "/dev/shm", prefix: "colorun-fleet-iso")
        defer { removeTree(state) }
        let binary = try #require(fleetColorunBinary())
        let common = ["--etcd", url, "--policy-dir", policyDir, "--state-dir", state, "--ttl", String(Self.ttl),
                      "--max-moves", "4", "--log-level", "notice"]
        let instances = try nodes.map { node in
            try LabProcess(node, net.commandLine(on: node, [binary, "fleet", "run", "--node", node] + common), logPath: dir.file("\(node).log"))
        }
        func logs() -> String { instances.map { "--- \($0.name):\n\($0.log().suffix(2500))" }.joined(separator: "\n") }
        let share = Self.pairCount / nodes.count
        func domainsOf(_ pair: String) -> [SimulatedDomain] {
            let i = Int(pair.dropFirst(4))!
            return [domains[2 * i], domains[2 * i + 1]]
        }
        let n1Host = Int(net.address(of: "n1").split(separator: ".").last!)!

        do {
            try await waitUntil("\(Self.pairCount) pairs owned, \(share) by each instance", timeout: .seconds(60), interval: .milliseconds(100)) {
                let view = try await store.snapshot().view
                return view.unowned.isEmpty && nodes.allSatisfy { view.counts[$0] == share }
            }
            try await waitUntil("every pair checkpointed", timeout: .seconds(30), interval: .milliseconds(50)) {
                (0..<Self.pairCount).allSatisfy { domains[2 * $0].saveCounter >= 1 }
            }
        } catch {
            Issue.record("\(error)\n\(logs())")
            return
        }

        // Cut n1 from etcd only: it still reaches its domains.
        let isolated = try await store.snapshot().owners.filter { $0.value.node == "n1" }.map(\.key).sorted()
        #expect(isolated.count == share)
        let cutAt = Date().timeIntervalSince1970
        try net.cut("n1", "etcd")
        var expiredAt = 0.0
        try await waitUntil("n1's lease ends in etcd", timeout: .seconds(Self.ttl + 5), interval: .milliseconds(10)) {
            guard try await !store.snapshot().nodes.contains("n1") else { return false }
            expiredAt = Date().timeIntervalSince1970
            return true
        }
        try await waitUntil("n1's pairs owned by n2 and n3", timeout: .seconds(10), interval: .milliseconds(20)) {
            let view = try await store.snapshot().view
            return view.unowned.isEmpty && view.counts["n1"] == nil && view.counts["n2"]! + view.counts["n3"]! == Self.pairCount
        }
        try await waitUntil("every pair n1 had checkpoints again from another instance", timeout: .seconds(15), interval: .milliseconds(50)) {
            isolated.allSatisfy { pair in
                logByHost(domainsOf(pair)[0]).contains { $0.name == "stop" && $0.time > expiredAt && $0.connection != n1Host }
            }
        }
        // n1 drove its pairs after the cut, and stopped before its lease ended.
        let n1Commands = isolated.flatMap { pair in domainsOf(pair).flatMap { logByHost($0).filter { $0.connection == n1Host } } }
        let lastN1 = n1Commands.map(\.time).max() ?? 0
        #expect(n1Commands.contains { $0.name == "stop" && $0.time > cutAt }, "n1 made no checkpoint after the cut: the test proves nothing")
        #expect(lastN1 < expiredAt, "n1 sent a command \(lastN1 - expiredAt) s after its lease ended\n\(logs())")
        #expect(lastN1 < cutAt + Double(Self.ttl), "n1 sent a command \(lastN1 - cutAt) s after the cut (TTL \(Self.ttl) s)")
        print(String(format: "fleet isolation: n1 cut from etcd; last command to its domains %.3f s after the cut, %.3f s before its lease ended (seen %.3f s after the cut)",
                     lastN1 - cutAt, expiredAt - lastN1, expiredAt - cutAt))
        #expect(instances[0].log().contains("fenced"), "n1 never fenced itself\n\(logs())")

        // Mend the cut: n1 joins again and takes its share back, gradually.
        let mendedAt = Date().timeIntervalSince1970
        try net.mend("n1", "etcd")
        do {
            try await waitUntil("n1 rejoined and owns \(share) pairs again", timeout: .seconds(45), interval: .milliseconds(100)) {
                let view = try await store.snapshot().view
                return view.nodes.contains("n1") && view.unowned.isEmpty && nodes.allSatisfy { view.counts[$0] == share }
            }
        } catch {
            Issue.record("\(error)\n\(logs())")
            return
        }
        let back = try await store.snapshot().owners.filter { $0.value.node == "n1" }.map(\.key)
        try await waitUntil("every pair n1 took back checkpoints from n1", timeout: .seconds(15), interval: .milliseconds(50)) {
            back.allSatisfy { pair in logByHost(domainsOf(pair)[0]).contains { $0.name == "stop" && $0.time > mendedAt && $0.connection == n1Host } }
        }

        for instance in instances {
            instance.signal(SIGTERM)
            let status = await instance.waitForExit(timeout: .seconds(20))
            #expect(status == .exited(code: 0), "\(instance.name): \(status.map(\.description) ?? "still running")\n\(instance.log().suffix(2000))")
        }
        // No pair's checkpoints interleaved from two instances, in the whole run (cut and rejoin
        // included); every domain runs.
        var violations: [String] = []
        for (index, domain) in domains.enumerated() {
            #expect(domain.runState == .running, "dom\(index) is \(domain.runState)")
            violations += checkpointViolations(logByHost(domain), domain: "dom\(index) (clients named by host)")
        }
        #expect(violations.isEmpty, "\(violations.prefix(10))")
        await sim.shutdown()
    }
}
