import ColorunSystem
import Logging
import NIOCore
import QMPClient
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A QEMU process started for a test or a lab run, with its own run directory holding the
/// QMP socket, QEMU's stderr (`qemu.stderr`), the owner record (`colorun-owner`, see
/// `RunDirectoryOwner`) and, if asked for, the counting guest's image.
///
/// QEMU dies with the process that started it (an owned child, see `spawnChild`): the
/// kernel kills it however its owner ends, SIGKILL included. `stop()` ends the process and
/// removes the directory. If an instance is dropped without `stop()`, `deinit` kills the
/// process (SIGKILL), reaps it and removes the directory. A directory left behind by an
/// owner that died is removed by the next process's first `start` under the same parent
/// (`RunDirectorySweep`).
public final class QEMUInstance: Sendable {
    public let pid: pid_t
    public let spec: QEMUSpec
    public let runDirectory: String
    public let qmpSocketPath: String
    public let stderrPath: String
    /// The full command line, executable first.
    public let commandLine: [String]

    private struct State {
        var exitStatus: QEMUExitStatus?
        var directoryRemoved = false
    }

    private let state = Mutex(State())

    public var qmpEndpoint: QMPEndpoint { .unix(path: qmpSocketPath) }

    /// A path inside the run directory (for state files a test writes).
    public func path(_ name: String) -> String { "\(runDirectory)/\(name)" }

    private init(pid: pid_t, spec: QEMUSpec, runDirectory: String, qmpSocketPath: String, stderrPath: String, commandLine: [String]) {
        self.pid = pid
        self.spec = spec
        self.runDirectory = runDirectory
        self.qmpSocketPath = qmpSocketPath
        self.stderrPath = stderrPath
        self.commandLine = commandLine
    }

    // MARK: Starting

    /// The logger of the start-up sweep `start` runs.
    private static let sweepLogger = Logger(label: "colorun.qemulab")

    /// Spawns QEMU. It greets on `qmpEndpoint` some 20 ms later; `QMPConnection.connect`
    /// retries until then. The first start under a parent directory in a process sweeps
    /// that directory first (`RunDirectorySweep.sweepOnce`).
    public static func start(_ spec: QEMUSpec = QEMUSpec()) throws(QEMULabError) -> QEMUInstance {
        RunDirectorySweep.sweepOnce(spec.runDirectoryParent, logger: sweepLogger)
        let runDirectory: String
        do {
            runDirectory = try makeTemporaryDirectory(in: spec.runDirectoryParent, prefix: "colorun-qemu")
        } catch {
            throw QEMULabError("cannot create a run directory: \(error)")
        }
        let socket = "\(runDirectory)/qmp.sock"
        let stderrPath = "\(runDirectory)/qemu.stderr"
        do {
            try RunDirectoryOwner.current().write(to: runDirectory)
            var guestImage: String?
            if spec.countingGuest {
                let image = "\(runDirectory)/counting-guest.img"
                try writeFile(image, CountingGuest.bootSector)
                guestImage = image
            }
            let commandLine = [spec.executable] + spec.arguments(qmpSocket: socket, guestImage: guestImage)
            let pid = try spawnChild(commandLine, lifetime: .owned, standardError: .appendingTo(stderrPath))
            // The sweep also finds QEMU by its command line, so a failure here loses nothing.
            try? RunDirectoryOwner.current(children: [pid]).write(to: runDirectory)
            return QEMUInstance(
                pid: pid, spec: spec, runDirectory: runDirectory, qmpSocketPath: socket, stderrPath: stderrPath,
                commandLine: commandLine)
        } catch {
            removeTree(runDirectory)
            throw QEMULabError(error.description)
        }
    }

    /// Connects to this instance's monitor (see `QMPConnection.connect`).
    public func connect(
        on group: any EventLoopGroup,
        connectTimeout: TimeAmount = .seconds(5),
        greetingTimeout: TimeAmount = .seconds(3),
        commandTimeout: TimeAmount = .seconds(10),
        logger: Logger
    ) async throws(QMPClientError) -> QMPConnection {
        try await QMPConnection.connect(
            to: qmpEndpoint, on: group, connectTimeout: connectTimeout, greetingTimeout: greetingTimeout,
            commandTimeout: commandTimeout, logger: logger)
    }

    // MARK: Signals and exit

    /// Sends `signal` (SIGKILL, SIGSTOP, SIGCONT, SIGTERM, ...). False if the process is gone.
    @discardableResult
    public func kill(_ signal: Int32) -> Bool {
        guard state.withLock({ $0.exitStatus == nil }) else { return false }
        return posixKill(pid, signal) == 0
    }

    /// How the process ended, if it has (reaps it without blocking).
    public var exitStatus: QEMUExitStatus? {
        reap(blocking: false)
    }

    /// Waits until the process exits; nil if it is still running after `timeout`.
    @discardableResult
    public func waitForExit(timeout: Duration = .seconds(10)) async -> QEMUExitStatus? {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while true {
            if let status = reap(blocking: false) { return status }
            if clock.now >= deadline { return nil }
            try? await Task.sleep(for: .milliseconds(2))
        }
    }

    /// Asks QEMU to quit (SIGTERM), kills it (SIGKILL) if it has not after `grace`, reaps it
    /// and removes the run directory. Safe to call twice.
    @discardableResult
    public func stop(grace: Duration = .seconds(2)) async -> QEMUExitStatus? {
        var status = exitStatus
        if status == nil {
            // A stopped process cannot act on SIGTERM.
            kill(SIGCONT)
            kill(SIGTERM)
            status = await waitForExit(timeout: grace)
        }
        if status == nil {
            kill(SIGKILL)
            status = await waitForExit(timeout: .seconds(10))
        }
        removeRunDirectory()
        return status
    }

    /// QEMU's stderr so far (QEMU writes its real reasons for failures there).
    public func stderrText() -> String {
        (try? readFile(stderrPath)).map { String(decoding: $0, as: UTF8.self) } ?? ""
    }

    deinit {
        if reap(blocking: false) == nil {
            _ = posixKill(pid, SIGKILL)
            _ = reap(blocking: true)
        }
        removeRunDirectory()
    }

    private func reap(blocking: Bool) -> QEMUExitStatus? {
        state.withLock { state in
            if let status = state.exitStatus { return status }
            guard let status = reapChild(pid, blocking: blocking) else { return nil }
            state.exitStatus = status
            return status
        }
    }

    private func removeRunDirectory() {
        let remove = state.withLock { state in
            defer { state.directoryRemoved = true }
            return !state.directoryRemoved
        }
        if remove { removeTree(runDirectory) }
    }
}

private func posixKill(_ pid: pid_t, _ signal: Int32) -> Int32 {
    kill(pid, signal)
}
