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
/// QMP socket, QEMU's stderr (`qemu.stderr`) and, if asked for, the counting guest's image.
///
/// `stop()` ends the process and removes the directory. If an instance is dropped without
/// `stop()`, `deinit` kills the process (SIGKILL), reaps it and removes the directory; an
/// `atexit` hook kills whatever is still running when the program exits.
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

    /// Spawns QEMU. It greets on `qmpEndpoint` some 20 ms later; `QMPConnection.connect`
    /// retries until then.
    public static func start(_ spec: QEMUSpec = QEMUSpec()) throws(QEMULabError) -> QEMUInstance {
        var template = Array("\(spec.runDirectoryParent)/colorun-qemu-XXXXXX".utf8CString)
        guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
            throw QEMULabError("cannot create a run directory under \(spec.runDirectoryParent): \(errnoText(errno))")
        }
        let runDirectory = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let socket = "\(runDirectory)/qmp.sock"
        let stderrPath = "\(runDirectory)/qemu.stderr"
        do {
            var guestImage: String?
            if spec.countingGuest {
                let image = "\(runDirectory)/counting-guest.img"
                try writeFile(image, CountingGuest.bootSector)
                guestImage = image
            }
            let commandLine = [spec.executable] + spec.arguments(qmpSocket: socket, guestImage: guestImage)
            let pid = try spawn(commandLine, stderrPath: stderrPath)
            LiveProcesses.shared.insert(pid)
            return QEMUInstance(
                pid: pid, spec: spec, runDirectory: runDirectory, qmpSocketPath: socket, stderrPath: stderrPath,
                commandLine: commandLine)
        } catch {
            removeTree(runDirectory)
            throw error
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
            var raw: Int32 = 0
            var result: pid_t
            repeat {
                result = waitpid(pid, &raw, blocking ? 0 : WNOHANG)
            } while result == -1 && errno == EINTR
            guard result == pid else { return nil }
            let status: QEMUExitStatus
            if raw & 0x7f == 0 {
                status = .exited(code: (raw >> 8) & 0xff)
            } else {
                status = .signaled(signal: raw & 0x7f)
            }
            state.exitStatus = status
            LiveProcesses.shared.remove(pid)
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

// MARK: - Process plumbing

/// Processes started and not reaped; killed when the program exits.
private final class LiveProcesses: Sendable {
    static let shared = LiveProcesses()

    private let pids = Mutex(Set<pid_t>())

    private init() {
        atexit {
            LiveProcesses.shared.killAll()
        }
    }

    func insert(_ pid: pid_t) { pids.withLock { _ = $0.insert(pid) } }
    func remove(_ pid: pid_t) { pids.withLock { _ = $0.remove(pid) } }

    func killAll() {
        for pid in pids.withLock({ $0 }) {
            _ = posixKill(pid, SIGKILL)
        }
    }
}

private func errnoText(_ code: Int32) -> String {
    "\(String(cString: strerror(code))) (errno \(code))"
}

/// posix_spawn with stdin and stdout on /dev/null, stderr appended to `stderrPath`, default
/// signal dispositions and mask, and no inherited descriptors beyond those three. A
/// `detached` process gets a session of its own (`setsid`), so signals to colorun's process
/// group or terminal do not reach it.
func spawn(_ commandLine: [String], stderrPath: String, detached: Bool = false) throws(QEMULabError) -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 2, stderrPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
    addCloseFrom(&actions, 3)

    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var noSignals = sigset_t()
    sigemptyset(&noSignals)
    posix_spawnattr_setsigmask(&attributes, &noSignals)
    var defaults = sigset_t()
    sigemptyset(&defaults)
    for signal in [SIGPIPE, SIGINT, SIGTERM, SIGHUP, SIGCHLD] { sigaddset(&defaults, signal) }
    posix_spawnattr_setsigdefault(&attributes, &defaults)
    var flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF
    if detached { flags |= 0x80 }  // glibc POSIX_SPAWN_SETSID, which Swift does not import
    posix_spawnattr_setflags(&attributes, Int16(flags))

    let argv: [UnsafeMutablePointer<CChar>?] = commandLine.map { strdup($0) } + [nil]
    defer { for arg in argv { free(arg) } }
    var pid: pid_t = 0
    let result = posix_spawnp(&pid, commandLine[0], &actions, &attributes, argv, environ)
    guard result == 0 else {
        throw QEMULabError("cannot start \(commandLine[0]): \(errnoText(result))")
    }
    return pid
}

/// glibc's `posix_spawn_file_actions_addclosefrom_np` (2.34+), which Swift's Glibc module
/// does not export; looked up at run time, skipped where missing (most descriptors are
/// O_CLOEXEC anyway).
private func addCloseFrom(_ actions: inout posix_spawn_file_actions_t, _ lowest: Int32) {
    typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") else { return }
    _ = unsafeBitCast(symbol, to: AddCloseFrom.self)(&actions, lowest)
}

private func writeFile(_ path: String, _ bytes: [UInt8]) throws(QEMULabError) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw QEMULabError("cannot create \(path): \(errnoText(errno))") }
    defer { close(fd) }
    let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    guard written == bytes.count else { throw QEMULabError("cannot write \(path): \(errnoText(errno))") }
}

func readFile(_ path: String) throws(QEMULabError) -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw QEMULabError("cannot open \(path): \(errnoText(errno))") }
    defer { close(fd) }
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0, errno == EINTR { continue }
        guard n > 0 else { break }
        out.append(contentsOf: chunk[0..<n])
    }
    return out
}

/// Removes a directory and everything under it (no symlinks followed).
public func removeTree(_ path: String) {
    if let dir = opendir(path) {
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        closedir(dir)
        for name in names {
            let child = "\(path)/\(name)"
            var info = stat()
            if lstat(child, &info) == 0, info.st_mode & S_IFMT == S_IFDIR {
                removeTree(child)
            } else {
                unlink(child)
            }
        }
    }
    rmdir(path)
}

private func posixKill(_ pid: pid_t, _ signal: Int32) -> Int32 {
    kill(pid, signal)
}
