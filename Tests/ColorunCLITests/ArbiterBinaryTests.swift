import ClusterLab
import ColorunSystem
import ColorunTestSupport
import Etcd
import Foundation
import Logging
import NIOCore
import NIOPosix
import QEMULab
import QMPClient
import Testing

/// The etcd arbiter with real processes on one host: real etcd (Debian's etcd-server), the
/// built colorun binary per "host", and real QEMU (TCG, the counting guest) with a second
/// monitor for the test to watch its run state while colorun holds the first.
@Suite(.timeLimit(.minutes(4)), .machine(.exclusive)) struct ArbiterBinaryTests {
    static let examplePath = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("examples/two-hosts.lua").path

    /// A counting-guest QEMU with a second monitor, `observer.qmp`, for the test.
    struct ObservedVM {
        let qemu: QEMUInstance
        let observer: QMPConnection

        static func start() async throws -> ObservedVM {
            let dir = makeTempDirectory("colorun-arb")
            let qemu = try QEMUInstance.start(QEMUSpec(countingGuest: true, extraArguments: ["-qmp", "unix:\(dir)/observer.qmp,server=on,wait=off"]))
            let observer = try await QMPConnection.connect(
                to: .unix(path: "\(dir)/observer.qmp"), on: MultiThreadedEventLoopGroup.singleton, logger: Logger(label: "observer"))
            return ObservedVM(qemu: qemu, observer: observer)
        }

        func status() async throws -> String {
            try await observer.execute("query-status")["status"]?.stringValue ?? "?"
        }

        func stop() async {
            _ = await observer.close()
            await qemu.stop()
        }
    }

    static func etcdClient(_ server: EtcdServer) throws -> EtcdClient {
        try EtcdClient(endpoints: server.clientURLs, requestTimeout: .seconds(2), eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
    }

    /// Runs `body` with a healthy one-member etcd and a client of it; both are stopped when
    /// `body` returns or throws.
    static func withEtcd(_ body: (EtcdServer, EtcdClient) async throws -> Void) async throws {
        let etcd = try EtcdServer.start()
        let client: EtcdClient
        do { client = try etcdClient(etcd) } catch {
            await etcd.stop()
            throw error
        }
        var failure: (any Error)?
        do {
            try await etcd.waitHealthy()
            try await body(etcd, client)
        } catch {
            failure = error
        }
        await client.shutdown()
        await etcd.stop()
        if let failure { throw failure }
    }

    /// Runs `body` with an ``ObservedVM`` that is stopped when `body` returns or throws.
    static func withObservedVM(_ body: (ObservedVM) async throws -> Void) async throws {
        let vm = try await ObservedVM.start()
        var failure: (any Error)?
        do { try await body(vm) } catch { failure = error }
        await vm.stop()
        if let failure { throw failure }
    }

    @Test func theHolderFencesItselfBeforeTheTTLEndsWhenEtcdStopsAnswering() async throws {
        let dir = makeTempDirectory("colorun-arb")
        defer { removeDirectory(dir) }
        try await Self.withEtcd { etcd, client in try await Self.withObservedVM { vm in
            let policy = writePolicy("""
                local vm = domain.get("vm")
                assert(cluster.acquire(), "the only node wins the key")
                cluster.guard(vm)
                cluster.on_fenced(function(reason)
                  log.warn("TEST on_fenced: " .. reason)
                  local ok, err = pcall(qmp.resume, vm)
                  log.warn("TEST resume while fenced: " .. tostring(ok) .. " " .. tostring(err and err.class))
                end)
                while true do sleep("100ms") end
                """, in: dir)
            let port = freePort()
            let colorun = try ColorunProcess([
                policy, "--etcd", etcd.clientURLs[0], "--node", "a", "--pair", "fence", "--etcd-ttl", "2s",
                "--state-dir", dir + "/state", "--domain", "vm=\(vm.qemu.qmpEndpoint)", "--metrics-listen", "127.0.0.1:\(port)",
            ])
            try await waitUntil("node a holds the key", timeout: .seconds(20)) {
                try await client.get("/colorun/pairs/fence/active")?.value == "a"
            }
            #expect(try await vm.status() == "running")
            // etcd stops answering: the holder cannot renew, and must pause its VM before the
            // TTL (2 s) has passed since its last renewal, which came before the stop.
            let clock = ContinuousClock()
            etcd.members[0].kill(SIGSTOP)
            let stopped = clock.now
            var pausedAfter: Duration?
            while clock.now - stopped < .seconds(4) {
                if try await vm.status() == "paused" {
                    pausedAfter = clock.now - stopped
                    break
                }
                try await Task.sleep(for: .milliseconds(10))
            }
            etcd.members[0].kill(SIGCONT)
            let fencedIn = try #require(pausedAfter, "the VM was not paused within 4 s of etcd stopping")
            print("ArbiterBinaryTests: VM paused \(fencedIn) after etcd stopped (ttl 2 s, fence deadline 1.5 s after the last renewal)")
            #expect(fencedIn < .seconds(2), "paused before the lease can expire")
            // Fenced for good: the VM stays paused after etcd answers again, and nobody holds the key.
            try await Task.sleep(for: .seconds(1))
            #expect(try await vm.status() == "paused")
            let metrics = try httpGet(port: port, path: "/metrics")
            #expect(metrics.contains(#"colorun_fenced{pair="fence"} 1"#), "\(metrics.split(separator: "\n").filter { $0.contains("fence") })")
            try await waitUntil("the fenced node's key to go", timeout: .seconds(10)) {
                try await client.get("/colorun/pairs/fence/active") == nil
            }
            colorun.signal(SIGTERM)
            let result = await colorun.wait()
            #expect(result.stderr.contains("FENCED: no renewal of the lease succeeded"), "\(result.stderr)")
            #expect(result.stderr.contains("TEST on_fenced"))
            #expect(result.stderr.contains("TEST resume while fenced: false Fenced"), "\(result.stderr)")
            // The end of the run does not resume a fenced VM.
            #expect(try await vm.status() == "paused")
        } }
    }

    /// examples/two-hosts.lua on both "hosts": B never promotes while A's lease lives (A's
    /// QEMU looking dead from B changes nothing); when colorun A is SIGKILLed with its QEMU
    /// alive, B wins the key only after A's lease expired, pauses A's QEMU through its
    /// monitor, and restores a standby from the shared checkpoints.
    @Test func theOtherHostPromotesOnlyAfterTheLeaseExpiredAndPausesTheOldPrimary() async throws {
        let dir = makeTempDirectory("colorun-arb")
        defer { removeDirectory(dir) }
        var standbyPID: pid_t?
        defer { if let standbyPID { kill(standbyPID, SIGKILL) } }
        try await Self.withEtcd { etcd, client in try await Self.withObservedVM { vm in
            let image = dir + "/guest.img"
            try ColorunSystem.writeFile(image, CountingGuest.bootSector)
            let standbyQEMU = (["qemu-system-x86_64"] + QEMUSpec(countingGuest: true, extraArguments: [
                "-qmp", "unix:\(dir)/obs-{token}.qmp,server=on,wait=off",
            ]).arguments(qmpSocket: "\(dir)/s-{token}.qmp", guestImage: image)).joined(separator: " ")
            func host(_ node: String, _ domains: [String]) throws -> ColorunProcess {
                try ColorunProcess([
                    Self.examplePath, "--etcd", etcd.clientURLs[0], "--node", node, "--pair", "web", "--etcd-ttl", "2s",
                    "--state-dir", dir + "/state",
                ] + domains.flatMap { ["--domain", $0] } + [
                    "--", "interval=200ms", "standby_qmp=unix:\(dir)/s-{token}.qmp", "standby_qemu=\(standbyQEMU)",
                ])
            }
            let a = try host("a", ["vm=\(vm.qemu.qmpEndpoint)"])
            try await waitUntil("node a holds the key and checkpoints", timeout: .seconds(30)) {
                guard try await client.get("/colorun/pairs/web/active")?.value == "a" else { return false }
                return ((try? listDirectory(dir + "/state/checkpoints/vm")) ?? []).contains { $0.hasSuffix(".manifest.json") }
            }
            let tokenA = try #require(try await client.get("/colorun/pairs/web/active")).createRevision
            let b = try host("b", ["peer=\(vm.qemu.qmpEndpoint)"])
            // Three TTLs with A alive: B waits, A keeps the key and runs.
            try await waitUntil("node b to wait for the key", timeout: .seconds(20)) { b.stderrSoFar.contains("waiting for the key") }
            try await Task.sleep(for: .seconds(6))
            #expect(!b.stderrSoFar.contains("promoted"), "\(b.stderrSoFar)")
            #expect(try await client.get("/colorun/pairs/web/active")?.createRevision == tokenA)
            #expect(try await vm.status() == "running")

            // colorun A dies, its QEMU lives on.
            let clock = ContinuousClock()
            a.signal(SIGKILL)
            let killed = clock.now
            try await waitUntil("node b to promote", timeout: .seconds(30)) { b.stderrSoFar.contains("promoted: the standby runs") }
            let promotedAfter = clock.now - killed
            print("ArbiterBinaryTests: standby promoted \(promotedAfter) after colorun A was killed (ttl 2 s)")
            let holder = try #require(try await client.get("/colorun/pairs/web/active"))
            #expect(holder.value == "b")
            #expect(holder.createRevision > tokenA)
            // B won only after A's lease expired: at least TTL - renew interval after the kill.
            #expect(promotedAfter >= .milliseconds(1500), "promoted \(promotedAfter) after the kill, before A's lease could expire")
            // The fencing path for a dead colorun whose QEMU lives: B paused it first.
            #expect(try await vm.status() == "paused")
            let text = b.stderrSoFar
            if let range = text.range(of: #"generation=\d+ pid=\d+"#, options: .regularExpression) {
                standbyPID = text[range].split(separator: "=").last.flatMap { pid_t($0) }
            }
            let standby = try await QMPConnection.connect(
                to: .unix(path: "\(dir)/obs-\(holder.createRevision).qmp"), on: MultiThreadedEventLoopGroup.singleton, logger: Logger(label: "observer"))
            #expect(try await standby.execute("query-status")["status"]?.stringValue == "running")
            _ = await standby.close()
            // The standby is checkpointed into the same series, with B's token in the manifests.
            try await waitUntil("a generation of b's era", timeout: .seconds(20)) {
                let names = ((try? listDirectory(dir + "/state/checkpoints/vm")) ?? []).filter { $0.hasSuffix(".manifest.json") }.sorted()
                guard let last = names.last, let bytes = try? readFile(dir + "/state/checkpoints/vm/" + last) else { return false }
                return String(decoding: bytes, as: UTF8.self).contains("\"fencing_token\":\(holder.createRevision)")
            }
            b.signal(SIGTERM)
            let result = await b.wait()
            #expect(result.code == 0, "\(result.stderr)")
        } }
    }

    /// Checkpoints need the key; `policy.on_lost`'s handler waits until its node wins the key
    /// (the holder hands over when its run ends); `cluster.override` is loud.
    @Test func promotionsWaitForTheKeyAndTheOverrideIsLogged() async throws {
        let dir = makeTempDirectory("colorun-arb")
        defer { removeDirectory(dir) }
        try await Self.withEtcd { etcd, client in
            let holderPolicy = writePolicy("""
                assert(cluster.acquire())
                while true do sleep("100ms") end
                """, in: dir, name: "holder.lua")
            let waiterPolicy = writePolicy("""
                local peer = domain.get("peer")
                local holder = cluster.holder()
                log.warn("TEST holder " .. holder.node .. " primary " .. tostring(cluster.is_primary()) .. " token " .. tostring(cluster.token()))
                local ok, err = pcall(remus.checkpoint, peer)
                log.warn("TEST checkpoint without the key: " .. tostring(err.class))
                policy.on_lost(peer, function(_, reason)
                  log.warn("TEST on_lost handler runs, token " .. tostring(cluster.token()))
                  cluster.override("test override")
                  local ok, err = pcall(remus.restore, {name = "x", from = "nothing", qemu = {"true"}, qmp = "unix:/nonexistent"})
                  log.warn("TEST restore after override: " .. tostring(err.class))
                  policy.stop()
                end, {heartbeat = "100ms", timeout = "300ms"})
                """, in: dir, name: "waiter.lua")
            let common = ["--etcd", etcd.clientURLs[0], "--pair", "gate", "--etcd-ttl", "2s", "--state-dir", dir + "/state"]
            let holder = try ColorunProcess([holderPolicy, "--node", "a"] + common)
            try await waitUntil("node a holds the key", timeout: .seconds(20)) {
                try await client.get("/colorun/pairs/gate/active")?.value == "a"
            }
            // The peer's monitor does not exist: on_lost fires at once, but a holds the key.
            let waiter = try ColorunProcess([waiterPolicy, "--node", "b", "--domain", "peer=unix:\(dir)/nonexistent.qmp"] + common)
            try await waitUntil("b's on_lost to wait for the key", timeout: .seconds(20)) { waiter.stderrSoFar.contains("waits until this node wins") }
            try await Task.sleep(for: .seconds(3))
            #expect(!waiter.stderrSoFar.contains("TEST on_lost handler runs"), "\(waiter.stderrSoFar)")
            #expect(waiter.stderrSoFar.contains("TEST checkpoint without the key: NotHolder"), "\(waiter.stderrSoFar)")
            #expect(waiter.stderrSoFar.contains("TEST holder a primary false token nil"), "\(waiter.stderrSoFar)")
            // a's run ends: it hands the key over at once (no TTL to wait for).
            holder.signal(SIGTERM)
            let ended = await holder.wait()
            #expect(ended.code == 0, "\(ended.stderr)")
            let result = await waiter.wait(timeout: 20)
            #expect(result.code == 0, "\(result.stderr)")
            #expect(result.stderr.contains("TEST on_lost handler runs, token "), "\(result.stderr)")
            #expect(result.stderr.contains("promotion confirmed by etcd"))
            #expect(result.stderr.contains("ARBITER OVERRIDE set at"))
            #expect(result.stderr.contains("ARBITER OVERRIDE: remus.restore x at"), "\(result.stderr)")
            #expect(result.stderr.contains("TEST restore after override: NoCheckpoint"), "\(result.stderr)")
        }
    }

    @Test func badArbiterFlagsAreUsageErrors() async throws {
        let dir = makeTempDirectory("colorun-arb")
        defer { removeDirectory(dir) }
        let policy = writePolicy("print(cluster.enabled())", in: dir)
        let noNode = try await runColorun([policy, "--etcd", "http://127.0.0.1:1"])
        #expect(noNode.code == 2)
        #expect(noNode.stderr.contains("--etcd needs --node"), "\(noNode.stderr)")
        let badURL = try await runColorun([policy, "--etcd", "127.0.0.1:2379", "--node", "a"])
        #expect(badURL.code == 2)
        #expect(badURL.stderr.contains("http://HOST:PORT"), "\(badURL.stderr)")
        let badTTL = try await runColorun([policy, "--etcd", "http://127.0.0.1:1", "--node", "a", "--etcd-ttl", "1500ms"])
        #expect(badTTL.code == 2)
        #expect(badTTL.stderr.contains("whole seconds"), "\(badTTL.stderr)")
        let nodeAlone = try await runColorun([policy, "--node", "a"])
        #expect(nodeAlone.code == 2)
        let plain = try await runColorun([policy])
        #expect(plain.code == 0)
        #expect((plain.stdout + plain.stderr).contains("false"))
        let help = try await runColorun(["help", "run"])
        for flag in ["--etcd", "--node", "--pair", "--etcd-ttl", "--etcd-ca"] {
            #expect(help.stdout.contains(flag), "colorun help run lists \(flag)")
        }
    }
}

extension ArbiterBinaryTests {
    /// colo.policy{} under an arbiter: it checkpoints only once its host holds the key.
    @Test func theDeclarativeFormWaitsForTheKey() async throws {
        let dir = makeTempDirectory("colorun-arb")
        defer { removeDirectory(dir) }
        try await Self.withEtcd { etcd, client in
            // Someone else holds the key for 3 s (a lease of its own).
            let lease = try await client.grantLease(ttl: 60)
            _ = try await client.txn(compare: [.createRevision("/colorun/pairs/decl/active", .equal, 0)],
                                     success: [.put(key: "/colorun/pairs/decl/active", value: "other", lease: lease.id)])
            let policy = writePolicy("""
                return colo.policy{
                  primary = domain.get("p"), secondary = domain.get("s"), interval = "100ms", mode = "remus",
                  on_checkpoint = function(r) log.warn("TEST checkpoint by the holder " .. tostring(cluster.is_primary())) ; policy.stop() end,
                  on_checkpoint_error = function(err) log.warn("TEST checkpoint error " .. tostring(err)) ; policy.stop() end,
                }
                """, in: dir)
            try await Self.withObservedVM { vm in
                let colorun = try ColorunProcess([
                    policy, "--etcd", etcd.clientURLs[0], "--node", "a", "--pair", "decl", "--etcd-ttl", "2s", "--state-dir", dir + "/state",
                    "--domain", "p=\(vm.qemu.qmpEndpoint)", "--domain", "s=unix:\(dir)/none.qmp",
                ])
                try await Task.sleep(for: .seconds(3))
                #expect(!colorun.stderrSoFar.contains("TEST checkpoint"), "\(colorun.stderrSoFar)")
                try await client.revokeLease(lease.id)
                let result = await colorun.wait(timeout: 30)
                #expect(result.code == 0, "\(result.stderr)")
                #expect(result.stderr.contains("TEST checkpoint by the holder true"), "\(result.stderr)")
            }
        }
    }
}
