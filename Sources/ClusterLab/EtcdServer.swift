import ColorunSystem
import Etcd
import Logging
import NIOCore
import NIOPosix
import QEMULab
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What went wrong starting or driving a lab etcd.
public struct ClusterLabError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Real etcd (Debian's `etcd-server`, 3.4) for tests and labs: one member or an N-member
/// cluster, each an owned child process (it dies with the process that started it, SIGKILL
/// included), data directories in one run directory under `/tmp` (removed by `stop()`, or by
/// the next process's start-up sweep when the owner was killed).
///
/// Members run with short Raft timings (heartbeat 50 ms, election 500 ms by default), so a
/// leader is elected in about a second and etcd's minimum lease TTL, `1.5 * election`, is
/// under one second: a lease of TTL 1 s is granted as asked.
///
/// A member may run in a network namespace (`ip netns exec NS etcd ...`, which execs etcd:
/// the death signal set for `ip` stays with etcd); its `host` is then an address of that
/// namespace.
public final class EtcdServer: Sendable {
    /// TLS on the members' client URLs (https): their certificate and key, and the CA whose
    /// client certificates they require (`--client-cert-auth`) when `caFile` is given.
    public struct TLSFiles: Sendable, Hashable {
        public var certFile: String
        public var keyFile: String
        public var caFile: String?
        public init(certFile: String, keyFile: String, caFile: String? = nil) {
            self.certFile = certFile
            self.keyFile = keyFile
            self.caFile = caFile
        }
    }

    /// One member as asked for: `clientPort`/`peerPort` 0 picks a free port (on the host's
    /// loopback; give ports explicitly for members in namespaces).
    public struct MemberSpec: Sendable, Hashable {
        public var name: String
        public var host: String
        public var clientPort: Int
        public var peerPort: Int
        public var namespace: String?

        public init(name: String, host: String = "127.0.0.1", clientPort: Int = 0, peerPort: Int = 0, namespace: String? = nil) {
            self.name = name
            self.host = host
            self.clientPort = clientPort
            self.peerPort = peerPort
            self.namespace = namespace
        }
    }

    /// A running (or killed) member.
    public final class Member: Sendable {
        public let name: String
        public let clientURL: String
        public let peerURL: String
        public let namespace: String?
        public let dataDirectory: String
        public let logPath: String
        let commandLine: [String]
        private let state = Mutex<(pid: pid_t, exit: ChildExitStatus?)>((0, nil))

        init(name: String, clientURL: String, peerURL: String, namespace: String?, dataDirectory: String, logPath: String, commandLine: [String]) {
            self.name = name
            self.clientURL = clientURL
            self.peerURL = peerURL
            self.namespace = namespace
            self.dataDirectory = dataDirectory
            self.logPath = logPath
            self.commandLine = commandLine
        }

        /// The member's process id (of its latest start).
        public var pid: pid_t { state.withLock { $0.pid } }

        /// Starts (or restarts, on the same data directory) the member's process.
        func spawn() throws(ClusterLabError) {
            let pid: pid_t
            do {
                pid = try spawnChild(commandLine, lifetime: .owned, standardOutput: .appendingTo(logPath), standardError: .appendingTo(logPath))
            } catch {
                throw ClusterLabError("etcd member \(name): \(error) (is Debian's etcd-server installed? scripts/setup installs it)")
            }
            state.withLock { $0 = (pid, nil) }
        }

        /// Sends `signal` (SIGKILL, SIGSTOP, SIGCONT, ...). False if the process has exited.
        @discardableResult
        public func kill(_ signal: Int32) -> Bool {
            guard exitStatus == nil else { return false }
            return Glibc.kill(pid, signal) == 0
        }

        /// True once the process is stopped (SIGSTOP takes effect after `kill` returns).
        public var isStopped: Bool { ProcessInfoFile.stat(pid)?.state == "T" }

        /// How the process ended, if it has (reaps it without blocking).
        public var exitStatus: ChildExitStatus? { reap(blocking: false) }

        /// Waits until the process has exited (SIGKILL after `grace`).
        @discardableResult
        public func terminate(grace: Duration = .seconds(2)) async -> ChildExitStatus? {
            if let status = exitStatus { return status }
            kill(SIGCONT)
            kill(SIGTERM)
            let clock = ContinuousClock()
            let deadline = clock.now + grace
            while clock.now < deadline {
                if let status = exitStatus { return status }
                try? await Task.sleep(for: .milliseconds(5))
            }
            kill(SIGKILL)
            return reap(blocking: true)
        }

        /// The end of etcd's log (its real reasons for failing to start).
        public func logTail(lines: Int = 5) -> String {
            let text = String(decoding: (try? readFile(logPath)) ?? [], as: UTF8.self)
            return text.split(separator: "\n").suffix(lines).joined(separator: "\n")
        }

        func reap(blocking: Bool) -> ChildExitStatus? {
            state.withLock { state in
                if let status = state.exit { return status }
                guard state.pid > 0, let status = reapChild(state.pid, blocking: blocking) else { return nil }
                state.exit = status
                return status
            }
        }
    }

    public let members: [Member]
    /// The run directory holding every member's data directory and log.
    public let directory: String
    private let removed = Mutex(false)

    /// Every member's client URL, for `--etcd` or `EtcdClient(endpoints:)`.
    public var clientURLs: [String] { members.map(\.clientURL) }

    private init(members: [Member], directory: String) {
        self.members = members
        self.directory = directory
    }

    private static let sweepLogger = Logger(label: "colorun.clusterlab")

    /// Starts `count` members on 127.0.0.1 with free ports. Wait for `waitHealthy()`.
    public static func start(
        count: Int = 1, heartbeat: Duration = .milliseconds(50), election: Duration = .milliseconds(500),
        tls: TLSFiles? = nil, parent: String = "/tmp", executable: String = "etcd"
    ) throws(ClusterLabError) -> EtcdServer {
        try start(members: (1...max(1, count)).map { MemberSpec(name: "etcd\($0)") }, heartbeat: heartbeat, election: election,
                  tls: tls, parent: parent, executable: executable)
    }

    /// Starts the members given, as one new cluster. Wait for `waitHealthy()`.
    public static func start(
        members specs: [MemberSpec], heartbeat: Duration = .milliseconds(50), election: Duration = .milliseconds(500),
        tls: TLSFiles? = nil, parent: String = "/tmp", executable: String = "etcd"
    ) throws(ClusterLabError) -> EtcdServer {
        guard !specs.isEmpty, Set(specs.map(\.name)).count == specs.count else {
            throw ClusterLabError("etcd: give at least one member, each with its own name")
        }
        RunDirectorySweep.sweepOnce(parent, logger: sweepLogger)
        let directory: String
        do {
            directory = try makeTemporaryDirectory(in: parent, prefix: "colorun-etcd")
            try RunDirectoryOwner.current().write(to: directory)
        } catch {
            throw ClusterLabError("etcd: cannot create a run directory: \(error)")
        }
        var resolved: [(spec: MemberSpec, client: String, peer: String)] = []
        do {
            for var spec in specs {
                if spec.clientPort == 0 { spec.clientPort = try freePort() }
                if spec.peerPort == 0 { spec.peerPort = try freePort() }
                let host = spec.host.contains(":") ? "[\(spec.host)]" : spec.host
                resolved.append((spec, "\(tls == nil ? "http" : "https")://\(host):\(spec.clientPort)", "http://\(host):\(spec.peerPort)"))
            }
        } catch {
            removeTree(directory)
            throw error
        }
        let initialCluster = resolved.map { "\($0.spec.name)=\($0.peer)" }.joined(separator: ",")
        let token = "colorun-\(getpid())-\(directory.split(separator: "-").last ?? "")"
        var members: [Member] = []
        for (spec, client, peer) in resolved {
            let data = "\(directory)/\(spec.name).etcd"
            var commandLine = [
                executable, "--name", spec.name, "--data-dir", data,
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", initialCluster, "--initial-cluster-state", "new", "--initial-cluster-token", token,
                "--heartbeat-interval", String(milliseconds(heartbeat)), "--election-timeout", String(milliseconds(election)),
                "--logger", "zap", "--log-level", "warn",
            ]
            if let tls {
                commandLine += ["--cert-file", tls.certFile, "--key-file", tls.keyFile]
                if let ca = tls.caFile { commandLine += ["--trusted-ca-file", ca, "--client-cert-auth"] }
            }
            if let namespace = spec.namespace { commandLine = ["ip", "netns", "exec", namespace] + commandLine }
            members.append(Member(name: spec.name, clientURL: client, peerURL: peer, namespace: spec.namespace,
                                  dataDirectory: data, logPath: "\(directory)/\(spec.name).log", commandLine: commandLine))
        }
        let server = EtcdServer(members: members, directory: directory)
        do {
            for member in members { try member.spawn() }
        } catch {
            for member in members { member.kill(SIGKILL) }
            server.removeDirectory()
            throw error
        }
        try? RunDirectoryOwner.current(children: members.map(\.pid)).write(to: directory)
        return server
    }

    static func milliseconds(_ duration: Duration) -> Int64 {
        duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
    }

    /// A TCP port free on 127.0.0.1 now (the kernel's pick; free until someone takes it).
    static func freePort() throws(ClusterLabError) -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ClusterLabError("etcd: cannot pick a port: \(errnoText())") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer -> Bool in
                bind(fd, pointer, length) == 0 && getsockname(fd, pointer, &length) == 0
            }
        }
        guard bound else { throw ClusterLabError("etcd: cannot pick a port: \(errnoText())") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    // MARK: - Asking the members

    /// What the lab's own health and leader checks use against TLS members (give the
    /// client certificate when the members require one).
    public var clientTLS: EtcdTLS? {
        get { statusTLS.withLock { $0 } }
        set { statusTLS.withLock { $0 = newValue } }
    }
    private let statusTLS = Mutex<EtcdTLS?>(nil)

    /// Each running member's status (nil for a member that does not answer within `timeout`).
    public func statuses(timeout: TimeAmount = .milliseconds(500)) async -> [(member: Member, status: EtcdStatus?)] {
        guard let client = try? EtcdClient(endpoints: clientURLs, tls: clientTLS, requestTimeout: timeout, eventLoopGroup: MultiThreadedEventLoopGroup.singleton) else {
            return members.map { ($0, nil) }
        }
        var result: [(Member, EtcdStatus?)] = []
        for member in members {
            let status = member.exitStatus == nil ? try? await client.status(of: member.clientURL, timeout: timeout) : nil
            result.append((member, status))
        }
        await client.shutdown()
        return result
    }

    /// Waits until every running member answers and they agree on a leader (etcd is then
    /// serving); throws naming the members that did not, with the end of their logs.
    public func waitHealthy(timeout: Duration = .seconds(30)) async throws(ClusterLabError) {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while true {
            let statuses = await statuses()
            let running = statuses.filter { $0.member.exitStatus == nil }
            let leaders = Set(running.compactMap { $0.status?.leaderID }.filter { !$0.isEmpty && $0 != "0" })
            if !running.isEmpty, running.allSatisfy({ $0.status != nil }), leaders.count == 1 { return }
            let dead = statuses.filter { $0.member.exitStatus != nil }
            if clock.now >= deadline || dead.count == members.count {
                let detail = statuses.map { entry in
                    let state = entry.member.exitStatus.map { "exited (\($0))" } ?? (entry.status.map { "leader \($0.leaderID.isEmpty ? "none" : $0.leaderID)" } ?? "no answer")
                    return "\(entry.member.name) \(entry.member.clientURL): \(state); log: \(entry.member.logTail(lines: 3))"
                }.joined(separator: "\n")
                throw ClusterLabError("etcd did not become healthy within \(timeout):\n\(detail)")
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
    }

    /// The member that is the Raft leader now, by asking the members (nil if none answers as leader).
    public func leader() async -> Member? {
        await statuses().first { $0.status?.isLeader == true }?.member
    }

    /// Kills the leader (SIGKILL) and returns it; nil if no leader was found.
    @discardableResult
    public func killLeader() async -> Member? {
        guard let leader = await leader() else { return nil }
        leader.kill(SIGKILL)
        _ = leader.reap(blocking: true)
        return leader
    }

    /// Starts a killed member again on its data directory (it rejoins the cluster).
    public func restart(_ member: Member) async throws(ClusterLabError) {
        if member.exitStatus == nil { await member.terminate() }
        try member.spawn()
    }

    /// Stops every member and removes the run directory. Safe to call twice.
    public func stop() async {
        for member in members { member.kill(SIGCONT) }
        for member in members { await member.terminate(grace: .milliseconds(500)) }
        removeDirectory()
    }

    private func removeDirectory() {
        let first = removed.withLock { removed in
            defer { removed = true }
            return !removed
        }
        if first { removeTree(directory) }
    }

    deinit {
        for member in members where member.exitStatus == nil {
            member.kill(SIGKILL)
            _ = member.reap(blocking: true)
        }
        removeDirectory()
    }
}
