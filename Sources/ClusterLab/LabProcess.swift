import ColorunSystem
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A process a cluster test runs (QEMU, colorun, etcd), usually inside a `NetworkLab` host:
/// an owned child (it dies with its owner, SIGKILL included), its standard output and error
/// appended to a log file. Dropping it kills and reaps it.
public final class LabProcess: Sendable {
    public let name: String
    public let pid: pid_t
    public let commandLine: [String]
    public let logPath: String
    private let status = Mutex<ChildExitStatus?>(nil)

    /// Starts `commandLine` (e.g. `lab.commandLine(on: "a", [...])`), output to `logPath`.
    public init(_ name: String, _ commandLine: [String], logPath: String) throws(NetworkLabError) {
        self.name = name
        self.commandLine = commandLine
        self.logPath = logPath
        do {
            pid = try spawnChild(commandLine, lifetime: .owned, standardOutput: .appendingTo(logPath), standardError: .appendingTo(logPath))
        } catch {
            throw NetworkLabError("cannot start \(name): \(error)")
        }
    }

    deinit {
        if reap(blocking: false) == nil {
            _ = kill(pid, SIGKILL)
            _ = reap(blocking: true)
        }
    }

    /// How it ended, if it has (reaps it without blocking).
    public var exitStatus: ChildExitStatus? { reap(blocking: false) }

    public var isRunning: Bool { exitStatus == nil }

    /// Sends `signal` unless it has been reaped (its pid may be reused then).
    public func signal(_ signal: Int32) {
        status.withLock { if $0 == nil { _ = kill(pid, signal) } }
    }

    /// SIGKILLs it and waits until it is reaped.
    @discardableResult
    public func killAndWait() async -> ChildExitStatus? {
        signal(SIGKILL)
        return await waitForExit(timeout: .seconds(10))
    }

    /// Waits until it exits; nil if it still runs after `timeout`.
    @discardableResult
    public func waitForExit(timeout: Duration) async -> ChildExitStatus? {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while true {
            if let status = reap(blocking: false) { return status }
            if clock.now >= deadline { return nil }
            try? await Task.sleep(for: .milliseconds(5))
        }
    }

    /// Its log so far.
    public func log() -> String {
        (try? readFile(logPath)).map { String(decoding: $0, as: UTF8.self) } ?? ""
    }

    private func reap(blocking: Bool) -> ChildExitStatus? {
        status.withLock { status in
            if let status { return status }
            status = reapChild(pid, blocking: blocking)
            return status
        }
    }
}
