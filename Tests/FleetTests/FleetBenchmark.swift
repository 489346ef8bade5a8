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

/// The fleet's scale figures for docs/benchmarks.md (issue 11): 3 instances, N pairs every
/// 1 s. Runs only with COLORUN_FLEET_BENCH=PAIRS (e.g. 3000); COLORUN_FLEET_BINARY picks the
/// colorun binary (a release build), else the debug one next to the tests. `scripts/fleet-bench`
/// builds the release binary and runs this.
@Suite("Fleet benchmark", .machine(.exclusive), .timeLimit(.minutes(10)),
       .enabled(if: ProcessInfo.processInfo.environment["COLORUN_FLEET_BENCH"] != nil))
struct FleetBenchmark {
    /// etcd's count of gRPC requests started (the JSON gateway's calls included).
    static func etcdRequests(_ url: String) throws -> Double {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        process.arguments = ["-s", url + "/metrics"]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        var total = 0.0
        for line in String(decoding: data, as: UTF8.self).split(separator: "\n") where line.hasPrefix("grpc_server_started_total{") {
            total += Double(line.split(separator: " ").last ?? "0") ?? 0
        }
        return total
    }

    @Test func threeInstances() async throws {
        let environment = ProcessInfo.processInfo.environment
        let pairs = Int(environment["COLORUN_FLEET_BENCH"] ?? "") ?? 3000
        let binary = try #require(environment["COLORUN_FLEET_BINARY"] ?? fleetColorunBinary())
        let ttl = 3
        let dir = TempDir("fleet-bench")
        defer { dir.cleanup() }
        let state = try makeTemporaryDirectory(in: "/dev/shm", prefix: "colorun-fleet-bench")
        defer { removeTree(state) }
        let etcd = try EtcdServer.start(parent: "/dev/shm")
        defer { Task { await etcd.stop() } }
        try await etcd.waitHealthy()
        let sim = QEMUSimulator(threads: 1)
        let domains = try await sim.startDomains(count: 2 * pairs, directory: dir.path)
        let policyDir = dir.file("policies")
        try FileManager.default.createDirectory(atPath: policyDir, withIntermediateDirectories: true)
        let example = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../examples/fleet-pair.lua").standardized.path
        try FileManager.default.copyItem(atPath: example, toPath: policyDir + "/fleet-pair.lua")
        let url = etcd.clientURLs[0]
        let client = try EtcdClient(endpoints: [url], requestTimeout: .seconds(10), eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
        defer { Task { await client.shutdown() } }
        let store = FleetStore(client: client)
        try await store.add((0..<pairs).map {
            PairDeclaration(name: "pair\($0)", policy: "fleet-pair.lua",
                            domains: ["primary": "unix:\(dir.path)/dom\(2 * $0).sock", "secondary": "unix:\(dir.path)/dom\(2 * $0 + 1).sock"],
                            settings: ["interval": "1s", "keep": "1"])
        })
        let common = ["--etcd", url, "--policy-dir", policyDir, "--state-dir", state, "--ttl", String(ttl), "--log-level", environment["COLORUN_FLEET_BENCH_LOG"] ?? "error"]
        let started = ContinuousClock.now
        let instances = try ["n1", "n2", "n3"].map { node in
            try FleetInstance(binary: binary, node: node, arguments: common, logPath: dir.file("\(node).log"))
        }
        defer { for instance in instances { instance.kill(SIGKILL) } }
        try await waitUntil("\(pairs) pairs owned", timeout: .seconds(120), interval: .milliseconds(100)) {
            try await store.snapshot().view.unowned.isEmpty
        }
        let owning = ContinuousClock.now - started
        try await Task.sleep(for: .seconds(5))   // warm-up: every pair's first checkpoints

        let window = 10.0
        let saves0 = domains.enumerated().filter { $0.offset % 2 == 0 }.map(\.element.saveCounter).reduce(0, +)
        let requests0 = try Self.etcdRequests(url)
        try await Task.sleep(for: .seconds(window))
        let saves1 = domains.enumerated().filter { $0.offset % 2 == 0 }.map(\.element.saveCounter).reduce(0, +)
        let requests1 = try Self.etcdRequests(url)
        let checkpointsPerSecond = Double(saves1 - saves0) / window
        let requestsPerSecond = (requests1 - requests0) / window

        let view = try await store.snapshot().view
        let victim = instances[2]
        let orphaned = view.counts[victim.node] ?? 0
        let killed = ContinuousClock.now
        victim.kill(SIGKILL)
        _ = reapChild(victim.pid, blocking: true)
        var leaseGone: Duration?
        try await waitUntil("\(orphaned) pairs owned again", timeout: .seconds(60), interval: .milliseconds(20)) {
            let view = try await store.snapshot().view
            if leaseGone == nil && !view.nodes.contains(victim.node) { leaseGone = ContinuousClock.now - killed }
            return view.unowned.isEmpty && !view.nodes.contains(victim.node)
        }
        let reowned = ContinuousClock.now - killed
        print("""
            fleet benchmark: 3 instances, \(pairs) pairs every 1 s, TTL \(ttl) s, binary \(binary)
            | time for 3 fresh instances to own \(pairs) pairs | \(owning) |
            | checkpoints/s (10 s window, all pairs) | \(String(format: "%.1f", checkpointsPerSecond)) of \(pairs) asked |
            | etcd requests/s, steady state (all instances) | \(String(format: "%.1f", requestsPerSecond)) |
            | time to re-own \(orphaned) pairs of a SIGKILLed instance | \(reowned) (TTL \(ttl) s; lease gone after \(leaseGone ?? .zero)) |
            """)
        if environment["COLORUN_FLEET_BENCH_LOG"] != nil {
            for instance in instances { print("--- \(instance.node):\n\(instance.log.suffix(4000))") }
        }
        for instance in instances.prefix(2) { _ = await instance.stop(grace: .seconds(60)) }
        await sim.shutdown()
    }
}
