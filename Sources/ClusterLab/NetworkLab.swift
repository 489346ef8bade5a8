import ColorunSystem
import Logging
import QEMULab
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Why a network lab could not do what it was asked.
public struct NetworkLabError: Error, Sendable, Hashable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Several "hosts" on one machine, for two-host tests: one network namespace per host, each
/// with an `eth0` (a veth pair) plugged into a bridge that lives in a namespace of its own
/// (the switch), on the subnet 10.77.0.0/24 (host N of the list has 10.77.0.N). Everything
/// lives in namespaces, so deleting them removes every link, the bridge and the firewall.
///
/// Partitions, as a network really fails:
/// - `isolate(host)` takes the host's port on the switch down: the host reaches nobody and
///   nobody reaches it (its packets vanish, no error comes back); `reconnect` puts it back.
/// - `cut(a, b)` drops every packet between two hosts on the switch (nftables, bridge
///   family), while both still reach everyone else; `mend` undoes it.
/// - `heal()` undoes every partition.
///
/// With `joinsTest: true` the test process itself (the root network namespace) is plugged
/// into the switch too, as 10.77.0.254 (`testAddress`): it reaches every host directly (etcd
/// in a host, no `etcdctl` detour) and serves them (e.g. simulated domains on TCP, whose
/// command log then names the host that sent each command). Its link is a veth whose other
/// end is in the switch namespace, so it goes with the namespaces. Partitions never touch it.
///
/// Processes run inside a host with `commandLine(on:_:)` (`ip netns exec NS ...`, which execs:
/// a child started with `spawnChild(_:lifetime: .owned)` keeps its death signal) and die with
/// their owner like any owned child. Namespaces do not: they are named after their owner
/// (`colorun-net-PID-START-N-HOST`, pid and start time as `RunDirectoryOwner` names them),
/// removed by `destroy()` (and `deinit`), and the first lab a process makes sweeps those whose
/// owner is gone (`NetworkLab.sweep`): the processes still in them are killed, the namespaces
/// deleted. Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN), `ip` (iproute2) and `nft` (nftables).
public final class NetworkLab: Sendable {
    /// Namespace names the sweep looks at.
    public static let namePrefix = "colorun-net-"
    /// Where `ip netns` keeps its namespaces.
    static let namespaceDirectory = "/run/netns"
    static let subnet = "10.77.0"
    /// The test process's address on the switch (`joinsTest`).
    public static let testAddress = "10.77.0.254"

    /// This lab's part of every namespace name: `colorun-net-PID-START-N`.
    public let tag: String
    /// The hosts, in the order given (host i has address 10.77.0.(i+1)).
    public let hosts: [String]
    public let switchNamespace: String
    /// The test process's link to the switch (in the root namespace), when it joins.
    public let testLink: String?
    private let logger: Logger

    private struct State {
        var isolated: Set<String> = []
        var cuts: Set<[String]> = []
        var destroyed = false
    }

    private let state = Mutex(State())

    private static let counter = Atomic<Int>(0)
    private static let swept = Atomic<Bool>(false)

    /// Makes the namespaces, the switch and the links (about 30 `ip` calls), after sweeping
    /// the namespaces of dead owners if this process has not yet. Host names: letters and
    /// digits, at most 8 characters (they name the switch's ports: `p-HOST`).
    public init(hosts: [String], joinsTest: Bool = false, logger: Logger) throws(NetworkLabError) {
        guard !hosts.isEmpty, hosts.count < 200, Set(hosts).count == hosts.count else {
            throw NetworkLabError("a network lab needs distinct hosts (1 to 199), got \(hosts)")
        }
        for host in hosts where host.isEmpty || host.count > 8 || !host.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber) }) {
            throw NetworkLabError("bad host name '\(host)': letters and digits, 1 to 8 of them")
        }
        if joinsTest && hosts.contains("test") { throw NetworkLabError("the host name 'test' is the test process's port on the switch (joinsTest)") }
        if !Self.swept.exchange(true, ordering: .relaxed) { Self.sweep(logger: logger) }
        let owner = RunDirectoryOwner.current()
        let n = Self.counter.wrappingAdd(1, ordering: .relaxed).oldValue
        tag = "\(Self.namePrefix)\(owner.pid)-\(owner.startTime)-\(n)"
        self.hosts = hosts
        switchNamespace = "\(tag)-sw"
        // Interface names have at most 15 characters: "cl" + pid + "-" + n.
        testLink = joinsTest ? "cl\(owner.pid)-\(n)" : nil
        self.logger = logger
        do {
            try build()
        } catch {
            destroy()
            throw error
        }
    }

    deinit { destroy() }

    /// The namespace of `host`.
    public func namespace(of host: String) -> String { "\(tag)-\(host)" }

    /// The IPv4 address of `host` (10.77.0.N).
    public func address(of host: String) -> String {
        guard let index = hosts.firstIndex(of: host) else { preconditionFailure("no host '\(host)' in this lab") }
        return "\(Self.subnet).\(index + 1)"
    }

    /// `commandLine` run inside `host`'s namespace.
    public func commandLine(on host: String, _ commandLine: [String]) -> [String] {
        ["ip", "netns", "exec", namespace(of: host)] + commandLine
    }

    private func port(_ host: String) -> String { "p-\(host)" }

    private func build() throws(NetworkLabError) {
        try runTool(["ip", "netns", "add", switchNamespace])
        try runTool(["ip", "-n", switchNamespace, "link", "add", "br0", "type", "bridge"])
        try runTool(["ip", "-n", switchNamespace, "link", "set", "br0", "up"])
        for host in hosts {
            let ns = namespace(of: host)
            try runTool(["ip", "netns", "add", ns])
            try runTool(["ip", "-n", switchNamespace, "link", "add", port(host), "type", "veth", "peer", "name", "eth0", "netns", ns])
            try runTool(["ip", "-n", switchNamespace, "link", "set", port(host), "master", "br0", "up"])
            try runTool(["ip", "-n", ns, "addr", "add", "\(address(of: host))/24", "dev", "eth0"])
            try runTool(["ip", "-n", ns, "link", "set", "eth0", "up"])
            try runTool(["ip", "-n", ns, "link", "set", "lo", "up"])
        }
        if let testLink {
            try runTool(["ip", "link", "add", testLink, "type", "veth", "peer", "name", port("test"), "netns", switchNamespace])
            try runTool(["ip", "-n", switchNamespace, "link", "set", port("test"), "master", "br0", "up"])
            try runTool(["ip", "addr", "add", "\(Self.testAddress)/24", "dev", testLink])
            try runTool(["ip", "link", "set", testLink, "up"])
        }
    }

    // MARK: Partitions

    /// Takes `host`'s port on the switch down: it reaches nobody, nobody reaches it.
    public func isolate(_ host: String) throws(NetworkLabError) {
        try setPort(host, up: false)
    }

    /// Puts `host`'s port on the switch back up.
    public func reconnect(_ host: String) throws(NetworkLabError) {
        try setPort(host, up: true)
    }

    /// Drops every packet between `a` and `b` (both directions); both still reach the others.
    public func cut(_ a: String, _ b: String) throws(NetworkLabError) {
        try check(a)
        try check(b)
        state.withLock { _ = $0.cuts.insert([a, b].sorted()) }
        try applyCuts()
    }

    /// Lets packets between `a` and `b` through again.
    public func mend(_ a: String, _ b: String) throws(NetworkLabError) {
        state.withLock { _ = $0.cuts.remove([a, b].sorted()) }
        try applyCuts()
    }

    /// Undoes every partition: all ports up, no cut.
    public func heal() throws(NetworkLabError) {
        let isolated = state.withLock { state in
            state.cuts = []
            return state.isolated
        }
        for host in isolated.sorted() { try setPort(host, up: true) }
        try applyCuts()
    }

    /// Hosts isolated now, and pairs cut now (each pair sorted).
    public var partitions: (isolated: Set<String>, cuts: Set<[String]>) {
        state.withLock { ($0.isolated, $0.cuts) }
    }

    private func check(_ host: String) throws(NetworkLabError) {
        guard hosts.contains(host) else { throw NetworkLabError("no host '\(host)' in this lab (hosts: \(hosts.joined(separator: ", ")))") }
    }

    private func setPort(_ host: String, up: Bool) throws(NetworkLabError) {
        try check(host)
        try runTool(["ip", "-n", switchNamespace, "link", "set", port(host), up ? "up" : "down"])
        state.withLock { state in
            if up { state.isolated.remove(host) } else { state.isolated.insert(host) }
        }
        logger.info("network lab: \(host) \(up ? "reconnected" : "isolated")")
    }

    /// Replaces the switch's nftables table with one that drops the cut pairs' packets (one
    /// `nft -f` transaction: the rules change atomically).
    private func applyCuts() throws(NetworkLabError) {
        let cuts = state.withLock { $0.cuts }.sorted { $0.joined() < $1.joined() }
        var rules = ""
        for pair in cuts {
            let (a, b) = (address(of: pair[0]), address(of: pair[1]))
            rules += "    ip saddr \(a) ip daddr \(b) drop\n    ip saddr \(b) ip daddr \(a) drop\n"
        }
        // "add table" first, so "delete table" never fails on a missing one.
        let script = """
            add table bridge colorun
            delete table bridge colorun
            table bridge colorun {
              chain cut {
                type filter hook forward priority 0; policy accept;
            \(rules)  }
            }

            """
        let file = "/tmp/\(tag)-nft"
        do {
            try writeFile(file, Array(script.utf8), mode: 0o600)
        } catch {
            throw NetworkLabError("cannot write the nftables rules: \(error)")
        }
        defer { unlink(file) }
        try runTool(["ip", "netns", "exec", switchNamespace, "nft", "-f", file])
        logger.info("network lab: cuts now \(cuts.map { $0.joined(separator: "-") })")
    }

    // MARK: Clean-up

    /// Kills every process still in the lab's namespaces (SIGKILL) and deletes them. Safe to
    /// call twice.
    public func destroy() {
        let first = state.withLock { state in
            defer { state.destroyed = true }
            return !state.destroyed
        }
        guard first else { return }
        Self.remove(namespaces: hosts.map(namespace(of:)) + [switchNamespace])
    }

    /// The namespaces whose owner is gone (as named by `tag`), deleted after killing their
    /// processes. What the first lab of a process runs; returns the names removed.
    @discardableResult
    public static func sweep(logger: Logger) -> [String] {
        let stale = ((try? listDirectory(namespaceDirectory)) ?? []).filter { name in
            guard name.hasPrefix(namePrefix) else { return false }
            let words = name.dropFirst(namePrefix.count).split(separator: "-")
            guard words.count >= 2, let pid = pid_t(words[0]), let start = UInt64(words[1]) else { return false }
            return !RunDirectoryOwner(pid: pid, startTime: start).isAlive
        }.sorted()
        guard !stale.isEmpty else { return [] }
        remove(namespaces: stale)
        logger.notice("swept network namespaces whose owner is gone", metadata: ["namespaces": .string(stale.joined(separator: ","))])
        return stale
    }

    private static func remove(namespaces: [String]) {
        for ns in namespaces {
            killProcesses(in: ns)
            _ = try? runTool(["ip", "netns", "delete", ns])
        }
    }

    /// SIGKILLs the processes in `namespace` and waits (up to 5 s) until none is left.
    static func killProcesses(in namespace: String) {
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(5)
        while clock.now < deadline {
            let pids = processes(in: namespace)
            if pids.isEmpty { return }
            for pid in pids { _ = kill(pid, SIGKILL) }
            usleep(5000)
        }
    }

    /// The processes in `namespace`, zombies left out (their parent reaps them).
    public static func processes(in namespace: String) -> [pid_t] {
        let text = (try? runTool(["ip", "netns", "pids", namespace])) ?? ""
        return text.split(whereSeparator: \.isWhitespace).compactMap { pid_t($0) }.filter { pid in
            guard let bytes = try? readFile("/proc/\(pid)/stat") else { return false }
            let text = String(decoding: bytes, as: UTF8.self)
            guard let close = text.lastIndex(of: ")") else { return false }
            return text[text.index(after: close)...].split(separator: " ").first != "Z"
        }
    }
}

/// Runs a short tool to completion (an owned child), blocking the calling thread; returns its
/// standard output, throws with its standard error (and the command) when it fails.
@discardableResult
func runTool(_ commandLine: [String]) throws(NetworkLabError) -> String {
    let directory: String
    do {
        directory = try makeTemporaryDirectory(prefix: "colorun-tool")
    } catch {
        throw NetworkLabError("cannot run \(commandLine.joined(separator: " ")): \(error)")
    }
    defer { removeTree(directory) }
    let stdoutPath = "\(directory)/stdout", stderrPath = "\(directory)/stderr"
    let pid: pid_t
    do {
        pid = try spawnChild(commandLine, lifetime: .owned, standardOutput: .appendingTo(stdoutPath), standardError: .appendingTo(stderrPath))
    } catch {
        throw NetworkLabError("cannot run \(commandLine.joined(separator: " ")): \(error)")
    }
    let status = reapChild(pid, blocking: true)
    func text(_ path: String) -> String { (try? readFile(path)).map { String(decoding: $0, as: UTF8.self) } ?? "" }
    guard status == .exited(code: 0) else {
        let reason = status.map(\.description) ?? "not reaped"
        throw NetworkLabError("\(commandLine.joined(separator: " ")): \(reason): \(text(stderrPath))")
    }
    return text(stdoutPath)
}
