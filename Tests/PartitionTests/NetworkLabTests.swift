import ClusterLab
import ColorunSystem
import ColorunTestSupport
import Foundation
import Logging
import Testing

/// The network lab itself: partitions cut what they say and nothing else, heal undoes them,
/// and no namespace or process outlives its owner.
@Suite(.serialized, .timeLimit(.minutes(2)), .machine(.shared), .enabled(if: runningAsRoot, "network namespaces need root"))
struct NetworkLabTests {
    let logger = Logger(label: "test.networklab")

    /// A TCP listener on `host`:5000 (python3), accepting and closing connections.
    func listener(_ net: NetworkLab, on host: String, dir: String) throws -> LabProcess {
        let code = """
            import socket
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("\(net.address(of: host))", 5000)); s.listen(16)
            while True:
                c, _ = s.accept(); c.close()
            """
        return try LabProcess("listener-\(host)", net.commandLine(on: host, ["python3", "-c", code]), logPath: "\(dir)/listener-\(host).log")
    }

    /// Whether `from` can open a TCP connection to `to`:5000 within 400 ms.
    func reaches(_ net: NetworkLab, _ from: String, _ to: String) throws -> Bool {
        let code = """
            import socket, sys
            try:
                socket.create_connection(("\(net.address(of: to))", 5000), timeout=0.4); print("ok")
            except OSError as e:
                print("no", e)
            """
        return try runCapturing(net.commandLine(on: from, ["python3", "-c", code])).hasPrefix("ok")
    }

    /// Whether `pid` exists and is not a zombie (a killed orphan waits for init to reap it).
    func runs(_ pid: pid_t) -> Bool {
        guard let bytes = try? readFile("/proc/\(pid)/stat") else { return false }
        let text = String(decoding: bytes, as: UTF8.self)
        guard let close = text.lastIndex(of: ")") else { return false }
        return text[text.index(after: close)...].split(separator: " ").first != "Z"
    }

    @Test func partitionsCutWhatTheySayAndHealUndoesThem() async throws {
        let dir = makeTempDirectory("colorun-netlab")
        defer { removeTree(dir) }
        let net = try NetworkLab(hosts: ["a", "b", "c"], logger: logger)
        defer { net.destroy() }
        #expect(net.address(of: "a") == "10.77.0.1" && net.address(of: "c") == "10.77.0.3")
        let server = try listener(net, on: "b", dir: dir)
        let other = try listener(net, on: "c", dir: dir)
        try await waitUntil("the listeners accept", timeout: .seconds(10)) {
            try reaches(net, "a", "b") && reaches(net, "a", "c")
        }

        try net.cut("a", "b")
        #expect(try !reaches(net, "a", "b"), "a reaches b through a cut")
        #expect(try reaches(net, "a", "c"), "a cut from b must still reach c")
        #expect(try reaches(net, "c", "b"), "c must still reach b")
        try net.mend("b", "a")
        #expect(try reaches(net, "a", "b"))

        try net.isolate("b")
        #expect(try !reaches(net, "a", "b") && !reaches(net, "c", "b"), "an isolated host is reachable")
        #expect(try !reaches(net, "b", "c"), "an isolated host reaches out")
        #expect(try reaches(net, "a", "c"))
        #expect(net.partitions.isolated == ["b"])

        try net.cut("a", "c")
        try net.heal()
        #expect(net.partitions.isolated.isEmpty && net.partitions.cuts.isEmpty)
        #expect(try reaches(net, "a", "b") && reaches(net, "a", "c") && reaches(net, "c", "b"))
        #expect(server.isRunning && other.isRunning)
    }

    @Test func destroyKillsTheProcessesInsideAndRemovesTheNamespaces() async throws {
        let net = try NetworkLab(hosts: ["a"], logger: logger)
        // Not a child of this process: started in the namespace by a shell that exits, as
        // something a test started could leave behind.
        _ = try runCapturing(net.commandLine(on: "a", ["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 &"]))
        try await waitUntil("the orphan runs in the namespace") { !NetworkLab.processes(in: net.namespace(of: "a")).isEmpty }
        let orphan = try #require(NetworkLab.processes(in: net.namespace(of: "a")).first)
        net.destroy()
        #expect(!runs(orphan), "a process in a destroyed lab's namespace still runs")
        let left = try listDirectory("/run/netns").filter { $0.hasPrefix(net.tag) }
        #expect(left.isEmpty, "namespaces left: \(left)")
    }

    @Test func sweepRemovesNamespacesWhoseOwnerIsGoneAndKeepsLiveOnes() async throws {
        // A pid that is certainly dead: a child that exited and was reaped.
        let dead = try spawnChild(["true"], lifetime: .owned)
        _ = reapChild(dead, blocking: true)
        // The live lab first: the first lab of a process sweeps, and this test sweeps itself.
        let live = try NetworkLab(hosts: ["a"], logger: logger)
        defer { live.destroy() }
        let stale = "\(NetworkLab.namePrefix)\(dead)-1-0-x"
        _ = try runCapturing(["ip", "netns", "add", stale])
        _ = try runCapturing(["ip", "netns", "exec", stale, "sh", "-c", "setsid sleep 600 >/dev/null 2>&1 &"])
        try await waitUntil("the sleeper runs in the stale namespace") { !NetworkLab.processes(in: stale).isEmpty }
        let sleeper = try #require(NetworkLab.processes(in: stale).first)

        let swept = NetworkLab.sweep(logger: logger)
        #expect(swept.contains(stale))
        #expect(!runs(sleeper), "the stale namespace's process still runs")
        let names = try listDirectory("/run/netns")
        #expect(!names.contains(stale))
        #expect(names.contains(live.namespace(of: "a")), "a live owner's namespace was swept")
    }
}
