import ClusterLab
import ColorunSystem
import ColorunTestSupport
import Foundation
import Logging
import QEMULab
import QMPClient

/// The built `colorun` binary: next to the test bundle in `.build/<triple>/debug/`.
func colorunBinary() throws -> String {
    guard let binary = builtColorunBinary() else { throw RigError("the colorun binary is not built (swift build)") }
    return binary
}

struct RigError: Error, CustomStringConvertible {
    var description: String
    init(_ text: String) { description = text }
}

/// Partition tests need root (network namespaces); CI runs as root.
let runningAsRoot = getuid() == 0

/// Two hosts on one machine, as issue 10 deploys colorun (Remus mode, the counting guest):
/// - host `a` runs the primary's QEMU (its monitors: one for colorun A, one on
///   10.77.0.1:4444 for host B, one for the observer) and colorun A;
/// - host `b` runs colorun B, which reaches A's QEMU only over the network and, when it takes
///   over, restores a standby QEMU on B from the newest checkpoint in the shared directory.
///
/// With the arbiter, hosts `e1`..`e3` run a 3-member etcd cluster and both hosts run
/// examples/two-hosts.lua with `--etcd`, `--node a|b`, `--pair web`, `--etcd-ttl 2s` and one
/// state directory: A holds the key and checkpoints its VM every 100 ms; B waits for the key,
/// and when it wins it pauses A's QEMU through `peer` (if it can reach it) and restores. A
/// host that wins the key back later restores a standby of its own (observed as `a2`).
///
/// Without the arbiter (the control run), A checkpoints and B watches A's QEMU with
/// `policy.on_lost` (heartbeat 100 ms, timeout 500 ms) and restores when it looks dead: the
/// best a host can do alone.
///
/// The observer (its own monitor on every QEMU) samples them all every 10 ms.
/// Every process is an owned child of the test; the namespaces and the directory go with
/// `shutdown()` (or with the next test process's sweeps if this one is killed).
final class TwoHostRig: @unchecked Sendable {
    static let pair = "web"
    /// The arbiter's lease TTL (`--etcd-ttl`, whole seconds): `COLORUN_PARTITION_TTL`, 4 s by
    /// default. The holder fences itself 3/4 TTL after its last renewal, which must outlast an
    /// etcd leader election (election timeout 500 ms, randomized up to 1 s, longer on a loaded
    /// machine) plus a renewal's timeout (TTL/4): with 2 s killing the leader fenced the holder
    /// in some runs, with 3 s in 1 of 9 leader kills of the 50-schedule run (docs/benchmarks.md).
    static let ttl = Duration.seconds(ProcessInfo.processInfo.environment["COLORUN_PARTITION_TTL"].flatMap(Int64.init) ?? 4)
    static let primaryMonitorPort = 4444

    let logger: Logger
    let net: NetworkLab
    let dir: String
    let arbiter: Bool
    let etcd: EtcdMembers?
    let qemuA: LabProcess
    private(set) var colorunA: LabProcess?
    private(set) var colorunB: LabProcess?
    let observer: RunStateObserver

    /// The VMs as the observer names them: A's QEMU, a standby A restores, B's standby.
    static let vmA = "a", vmA2 = "a2", vmB = "b"
    static let vms = [vmA, vmA2, vmB]

    var aQMP: String { "\(dir)/a.qmp" }
    var bQMP: String { "\(dir)/b.qmp" }

    private init(logger: Logger, net: NetworkLab, dir: String, arbiter: Bool, etcd: EtcdMembers?, qemuA: LabProcess, observer: RunStateObserver) {
        self.logger = logger
        self.net = net
        self.dir = dir
        self.arbiter = arbiter
        self.etcd = etcd
        self.qemuA = qemuA
        self.observer = observer
    }

    /// Starts everything and returns once A's guest runs, colorun A has made a checkpoint and
    /// colorun B watches A.
    static func start(arbiter: Bool, logger: Logger) async throws -> TwoHostRig {
        let hosts = arbiter ? ["a", "b", "e1", "e2", "e3"] : ["a", "b"]
        let net = try NetworkLab(hosts: hosts, logger: logger)
        let dir = try makeTemporaryDirectory(prefix: "colorun-part")
        try RunDirectoryOwner.current().write(to: dir)
        do {
            let etcd = arbiter ? try await EtcdMembers.start(net: net, hosts: ["e1", "e2", "e3"], dir: dir, logger: logger) : nil
            try writeFile("\(dir)/guest.img", CountingGuest.bootSector)
            let spec = QEMUSpec(countingGuest: true)
            let qemuA = try LabProcess(
                "qemu-a",
                net.commandLine(on: "a", [spec.executable] + spec.arguments(qmpSocket: "\(dir)/a.qmp", guestImage: "\(dir)/guest.img") + [
                    "-qmp", "unix:\(dir)/a-observer.qmp,server=on,wait=off",
                    "-qmp", "tcp:\(net.address(of: "a")):\(primaryMonitorPort),server=on,wait=off",
                ]),
                logPath: "\(dir)/qemu-a.log")
            let observer = RunStateObserver(
                Dictionary(uniqueKeysWithValues: vms.map { ($0, QMPEndpoint.unix(path: "\(dir)/\($0)-observer.qmp")) }), logger: logger)
            let rig = TwoHostRig(logger: logger, net: net, dir: dir, arbiter: arbiter, etcd: etcd, qemuA: qemuA, observer: observer)
            do {
                try await rig.bringUp()
            } catch {
                let logs = rig.logs()
                await rig.shutdown()
                throw RigError("\(error)\n\(logs)")
            }
            return rig
        } catch {
            net.destroy()
            removeTree(dir)
            throw error
        }
    }

    private func bringUp() async throws {
        try await waitUntil("A's guest runs", timeout: .seconds(30)) { observer.latest(Self.vmA) == .running }
        for sub in ["shared", "a-state", "b-state"] {
            try FileManager.default.createDirectory(atPath: "\(dir)/\(sub)", withIntermediateDirectories: true)
        }
        if arbiter {
            colorunA = try startColorunA()
            try await waitUntil("colorun A holds the key and checkpoints", timeout: .seconds(30)) {
                self.generations() > 0 || self.colorunA?.isRunning == false
            }
            colorunB = try startColorunB()
            try await waitUntil("colorun B waits for the key", timeout: .seconds(30)) {
                self.colorunB?.log().contains("waiting for the key") == true || self.colorunB?.isRunning == false
            }
        } else {
            try writeControlPolicies()
            colorunA = try startColorunA()
            try await waitUntil("colorun A's first checkpoint", timeout: .seconds(30)) {
                self.generations() > 0 || self.colorunA?.isRunning == false
            }
            // B reads A's checkpoints where A writes them (the shared directory).
            try FileManager.default.createSymbolicLink(atPath: "\(dir)/b-state/checkpoints", withDestinationPath: "\(dir)/a-state/checkpoints")
            colorunB = try startColorunB()
            try await waitUntil("colorun B watches the primary", timeout: .seconds(30)) {
                self.colorunB?.log().contains("watching the primary") == true || self.colorunB?.isRunning == false
            }
        }
        for process in [colorunA, colorunB].compactMap({ $0 }) where !process.isRunning {
            throw RigError("\(process.name) exited at start-up: \(process.exitStatus.map(\.description) ?? "?")\n\(process.log())")
        }
    }

    /// The number of good checkpoints of the primary on disk.
    func generations() -> Int {
        let series = arbiter ? "\(dir)/shared/checkpoints/vm" : "\(dir)/a-state/checkpoints/primary"
        return ((try? FileManager.default.contentsOfDirectory(atPath: series)) ?? []).filter { $0.hasSuffix(".manifest.json") }.count
    }

    /// The repository's examples/two-hosts.lua.
    static var twoHostsPolicy: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("examples/two-hosts.lua").path
    }

    /// QEMU's command line for a standby restored on `host`, observed as `observed`. It dies
    /// with that host's colorun (setpriv: the death signal survives the exec), so a test
    /// leaves no QEMU behind; production standbys are detached.
    private func standbyCommandLine(qmp: String, observed: String) -> [String] {
        let spec = QEMUSpec(countingGuest: true)
        return ["setpriv", "--pdeathsig", "KILL", spec.executable]
            + spec.arguments(qmpSocket: qmp, guestImage: "\(dir)/guest.img")
            + ["-qmp", "unix:\(dir)/\(observed)-observer.qmp,server=on,wait=off"]
    }

    /// colorun A on host a: with the arbiter, examples/two-hosts.lua holding A's QEMU as `vm`;
    /// in the control run, a.lua checkpointing it.
    func startColorunA() throws -> LabProcess {
        try startColorun(on: "a", arbiterDomain: "vm", endpoint: "unix:\(aQMP)", standbyObserved: Self.vmA2)
    }

    /// colorun B on host b, reaching A's QEMU only over the network: as `peer` under the
    /// arbiter, as the watched `primary` in the control run.
    private func startColorunB() throws -> LabProcess {
        try startColorun(on: "b", arbiterDomain: "peer", endpoint: "tcp:\(net.address(of: "a")):\(Self.primaryMonitorPort)",
                         standbyObserved: Self.vmB)
    }

    private func startColorun(on host: String, arbiterDomain: String, endpoint: String, standbyObserved: String) throws -> LabProcess {
        let arguments: [String]
        if let etcd {
            let standbyQMP = "\(dir)/\(host)-{token}.qmp"
            arguments = [Self.twoHostsPolicy, "--domain", "\(arbiterDomain)=\(endpoint)", "--state-dir", "\(dir)/shared"]
                + etcd.arbiterArguments(node: host, ttl: Self.ttl)
                + ["--", "interval=100ms", "standby_qmp=unix:\(standbyQMP)",
                   "standby_qemu=" + standbyCommandLine(qmp: standbyQMP, observed: standbyObserved).joined(separator: " ")]
        } else {
            arguments = ["\(dir)/\(host).lua", "--domain", "primary=\(endpoint)", "--state-dir", "\(dir)/\(host)-state"]
        }
        return try LabProcess("colorun-\(host)", net.commandLine(on: host, [try colorunBinary(), "run"] + arguments),
                              logPath: "\(dir)/colorun-\(host).log")
    }

    /// The control run's policies: A checkpoints; B watches A and restores the standby when A
    /// is lost.
    private func writeControlPolicies() throws {
        let standby = standbyCommandLine(qmp: bQMP, observed: Self.vmB)
        let qemu = "{" + standby.map { "\"\($0)\"" }.joined(separator: ", ") + "}"
        let a = """
            -- host A: checkpoint the primary every 100 ms into the shared directory
            local primary = domain.get("primary")
            policy.every("100ms", function()
              local ok, err = pcall(remus.checkpoint, primary, {keep = 3})
              if not ok then log.warn("checkpoint failed: " .. tostring(err)) end
            end)
            """
        let b = """
            -- host B: watch the primary over the network; when it is lost, restore the standby
            local primary = domain.get("primary")
            local STANDBY = {name = "standby", from = "primary", qmp = "unix:\(bQMP)",
                             qemu = \(qemu)}
            policy.every("1s", function() end)   -- the run goes on after a failover
            log.info("watching the primary")
            policy.on_lost(primary, function(_, reason)
              log.warn("primary lost (" .. tostring(reason) .. "): restoring the standby")
              local standby, info = remus.restore(STANDBY)
              log.warn("failover complete", {generation = info.generation, restore_ms = info.restore_ms})
            end, {heartbeat = "100ms", timeout = "500ms"})
            """
        try writeFile("\(dir)/a.lua", Array(a.utf8))
        try writeFile("\(dir)/b.lua", Array(b.utf8))
    }

    // MARK: Faults

    func killColorunA() async {
        observer.mark("colorun A SIGKILLed")
        await colorunA?.killAndWait()
    }

    func killQEMUA() async {
        observer.mark("QEMU A SIGKILLed")
        await qemuA.killAndWait()
    }

    /// Kills every process, stops the observer, removes the namespaces and the directory;
    /// returns what the observer saw.
    @discardableResult
    func shutdown() async -> RunStateTimeline {
        let timeline = await observer.stop()
        for process in [colorunA, colorunB].compactMap({ $0 }) { await process.killAndWait() }
        await qemuA.killAndWait()
        if let etcd { await etcd.stop() }
        net.destroy()
        removeTree(dir)
        return timeline
    }

    /// The logs of every process, for a failing test's message.
    func logs() -> String {
        [colorunA, colorunB, qemuA].compactMap { $0 }.map { "--- \($0.name):\n\($0.log().suffix(3000))" }.joined(separator: "\n")
            + "\n" + (etcd?.logs() ?? "")
    }
}

/// A 3-member etcd cluster, one member per lab host (ClusterLab's `EtcdServer`, each member
/// in its host's namespace), with short timeouts (heartbeat 50 ms, election 500 ms) so a lease
/// TTL of 2 s is safe. The test process is in no lab host, so it asks etcd through `etcdctl`
/// run inside a member's host.
final class EtcdMembers: Sendable {
    let net: NetworkLab
    let hosts: [String]
    let server: EtcdServer
    var clientURLs: [String] { server.clientURLs }

    func arbiterArguments(node: String, ttl: Duration) -> [String] {
        ["--etcd", clientURLs.joined(separator: ","), "--node", node, "--pair", TwoHostRig.pair, "--etcd-ttl", "\(ttl.components.seconds)s"]
    }

    private init(net: NetworkLab, hosts: [String], server: EtcdServer) {
        self.net = net
        self.hosts = hosts
        self.server = server
    }

    static func start(net: NetworkLab, hosts: [String], dir: String, logger: Logger) async throws -> EtcdMembers {
        let server = try EtcdServer.start(
            members: hosts.map { EtcdServer.MemberSpec(name: $0, host: net.address(of: $0), clientPort: 2379, peerPort: 2380, namespace: net.namespace(of: $0)) },
            parent: dir)
        let etcd = EtcdMembers(net: net, hosts: hosts, server: server)
        do {
            try await waitUntil("etcd has a leader", timeout: .seconds(30), interval: .milliseconds(100)) { (try? etcd.leader()) != nil }
        } catch {
            await server.stop()
            throw error
        }
        return etcd
    }

    /// The host whose member leads now (asked from the first member still running), from
    /// `etcdctl endpoint status`: "URL, ID, VERSION, SIZE, IS-LEADER, ...".
    func leader() throws -> String? {
        for member in server.members where member.exitStatus == nil {
            let output = try runCapturing(net.commandLine(on: member.name, [
                "etcdctl", "--endpoints", clientURLs.joined(separator: ","), "--dial-timeout", "1s", "--command-timeout", "1s",
                "endpoint", "status",
            ]))
            for line in output.split(separator: "\n") {
                let fields = line.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
                guard fields.count > 4, fields[4] == "true" else { continue }
                return server.members.first { $0.clientURL == fields[0] }?.name
            }
            return nil
        }
        return nil
    }

    /// SIGKILLs `host`'s member and waits until it is gone.
    func kill(_ host: String) async throws {
        guard let member = server.members.first(where: { $0.name == host }) else { return }
        member.kill(SIGKILL)
        try await waitUntil("etcd member \(host) is gone") { member.exitStatus != nil }
    }

    func logs() -> String {
        server.members.map { "--- etcd \($0.name):\n\($0.logTail(lines: 10))" }.joined(separator: "\n")
    }

    func stop() async {
        await server.stop()
    }
}

/// Runs a short command to completion; its standard output.
func runCapturing(_ commandLine: [String]) throws -> String {
    let dir = makeTempDirectory("colorun-run")
    defer { removeTree(dir) }
    let pid = try spawnChild(commandLine, lifetime: .owned, standardOutput: .appendingTo("\(dir)/out"), standardError: .appendingTo("\(dir)/err"))
    let status = reapChild(pid, blocking: true)
    guard status == .exited(code: 0) else {
        let err = (try? readFile("\(dir)/err")).map { String(decoding: $0, as: UTF8.self) } ?? ""
        throw RigError("\(commandLine.joined(separator: " ")): \(status.map(\.description) ?? "?"): \(err)")
    }
    return (try? readFile("\(dir)/out")).map { String(decoding: $0, as: UTF8.self) } ?? ""
}
