import CColorunSystem
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Whether a child process dies with colorun or outlives it.
public enum ChildLifetime: Sendable, Hashable {
    /// Dies with its owner: killed (SIGKILL) by the kernel when the process that started it
    /// ends, however it ends (a normal exit, a crash, SIGKILL, OOM), and by an `atexit` hook
    /// on a normal exit. Lab and test QEMUs, simulators, helpers.
    case owned
    /// Outlives its owner: a session of its own (`setsid`), so signals to colorun's process
    /// group or terminal do not reach it, and no death signal. Production VMs (a restored
    /// standby); init adopts it when colorun exits.
    case detached
}

/// Where a child's standard output or error goes.
public enum ChildOutput: Sendable, Hashable {
    case null
    /// Appended to the file (created with mode 0644 if missing).
    case appendingTo(String)
    /// A descriptor of the caller (e.g. a pipe's write end), which the caller still owns.
    case descriptor(Int32)
}

/// How a child process ended.
public enum ChildExitStatus: Sendable, Hashable, CustomStringConvertible {
    case exited(code: Int32)
    case signaled(signal: Int32)

    public var description: String {
        switch self {
        case .exited(let code): return "exited with status \(code)"
        case .signaled(let signal): return "killed by signal \(signal)"
        }
    }
}

/// Starts `commandLine` (the executable first, looked up in PATH unless it holds a "/"),
/// stdin on /dev/null, with the environment of colorun, default signal dispositions and an
/// empty signal mask, and no descriptors but 0, 1 and 2. Returns its pid.
///
/// An owned child is recorded until `reapChild` reaps it; one still recorded when the
/// program exits normally is killed by an `atexit` hook (the kernel's death signal covers
/// every other way the program can end). Reap owned children with `reapChild`, not with
/// `waitpid` directly, so the hook never signals a reused pid.
public func spawnChild(
    _ commandLine: [String], lifetime: ChildLifetime,
    standardOutput: ChildOutput = .null, standardError: ChildOutput = .null
) throws(SystemError) -> pid_t {
    guard let name = commandLine.first, !name.isEmpty else { throw SystemError("cannot start a process: empty command line") }
    guard let path = executablePath(name) else {
        throw SystemError("cannot start \(name): not found in PATH", code: ENOENT)
    }
    var opened: [Int32] = []
    defer { for fd in opened { close(fd) } }
    func descriptor(_ output: ChildOutput?) throws(SystemError) -> Int32 {
        let (path, flags): (String, Int32)
        switch output {
        case .descriptor(let fd): return fd
        case nil: (path, flags) = ("/dev/null", O_RDONLY)
        case .null: (path, flags) = ("/dev/null", O_WRONLY)
        case .appendingTo(let file): (path, flags) = (file, O_WRONLY | O_CREAT | O_APPEND)
        }
        let fd = open(path, flags | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            let code = errno
            throw SystemError("cannot start \(name): cannot open \(path): \(errnoText(code))", code: code)
        }
        opened.append(fd)
        return fd
    }
    let stdinFD = try descriptor(nil)
    let stdoutFD = try descriptor(standardOutput)
    let stderrFD = try descriptor(standardError)

    let argv: [UnsafeMutablePointer<CChar>?] = commandLine.map { strdup($0) } + [nil]
    defer { for arg in argv { free(arg) } }
    var pid: pid_t = 0
    let mode = lifetime == .owned ? Int32(COLORUN_SPAWN_OWNED) : Int32(COLORUN_SPAWN_DETACHED)
    // Owned children are recorded before they exist, so the exit hook cannot miss one.
    let result = OwnedChildren.shared.spawning(lifetime == .owned) {
        colorun_spawn(path, argv, environ, stdinFD, stdoutFD, stderrFD, mode, &pid)
    } recording: {
        pid
    }
    guard result == 0 else {
        throw SystemError("cannot start \(name): \(errnoText(result))", code: result)
    }
    return pid
}

/// Reaps `pid` if it has exited (waits for it if `blocking`); nil while it runs, or if it is
/// not a child of this process.
public func reapChild(_ pid: pid_t, blocking: Bool) -> ChildExitStatus? {
    var raw: Int32 = 0
    var result: pid_t
    repeat {
        result = waitpid(pid, &raw, blocking ? 0 : WNOHANG)
    } while result == -1 && errno == EINTR
    guard result == pid else { return nil }
    OwnedChildren.shared.remove(pid)
    if raw & 0x7f == 0 { return .exited(code: (raw >> 8) & 0xff) }
    return .signaled(signal: raw & 0x7f)
}

/// The path `execve` needs for `name`: `name` itself if it holds a "/", else the first
/// executable file named so in PATH.
func executablePath(_ name: String) -> String? {
    if name.contains("/") { return name }
    let search = getenv("PATH").map { String(cString: $0) } ?? "/usr/local/bin:/usr/bin:/bin"
    for directory in search.split(separator: ":", omittingEmptySubsequences: false) {
        let candidate = (directory.isEmpty ? "." : String(directory)) + "/" + name
        var info = stat()
        if stat(candidate, &info) == 0, info.st_mode & S_IFMT == S_IFREG, access(candidate, X_OK) == 0 {
            return candidate
        }
    }
    return nil
}

/// Owned children not yet reaped; killed when the program exits normally.
final class OwnedChildren: Sendable {
    static let shared = OwnedChildren()

    private let pids = Mutex(Set<pid_t>())

    private init() {
        atexit {
            OwnedChildren.shared.killAll()
        }
    }

    /// Runs `spawn` and records the pid `recording` then returns if `owned` and `spawn`
    /// returned 0, under the lock the exit hook takes: a child is never running unrecorded
    /// while the hook runs.
    func spawning(_ owned: Bool, _ spawn: () -> Int32, recording: () -> pid_t) -> Int32 {
        guard owned else { return spawn() }
        return pids.withLock { pids in
            let result = spawn()
            if result == 0 { pids.insert(recording()) }
            return result
        }
    }

    func remove(_ pid: pid_t) { pids.withLock { _ = $0.remove(pid) } }

    func killAll() {
        for pid in pids.withLock({ $0 }) {
            _ = kill(pid, SIGKILL)
        }
    }
}

/// Raises this process's open-file soft limit to its hard limit and returns the new soft
/// limit. Each domain holds a QMP socket and each checkpoint series a few files open, so a
/// thousand pairs need several thousand descriptors, where the usual soft limit is 1,024
/// (systemd's hard limit is 524,288; as Go's runtime and nginx do, colorun takes what the
/// hard limit allows).
@discardableResult
public func raiseOpenFileLimit() -> UInt64 {
    #if canImport(Glibc)
    let resourceNOFILE = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
    #else
    let resourceNOFILE = RLIMIT_NOFILE
    #endif
    var limit = rlimit()
    guard getrlimit(resourceNOFILE, &limit) == 0 else { return 0 }
    if limit.rlim_cur < limit.rlim_max {
        var raised = limit
        raised.rlim_cur = limit.rlim_max
        if setrlimit(resourceNOFILE, &raised) == 0 { return UInt64(raised.rlim_cur) }
    }
    return UInt64(limit.rlim_cur)
}

/// Asks the kernel for a time slice of `slice` for the calling thread, keeping its normal
/// policy and nice value (`colorun_set_thread_slice`: sched_setattr's `sched_runtime`, the
/// EEVDF slice of Linux 6.12 and later, clamped to 0.1-100 ms; zero restores the default).
/// A thread with a short slice runs as soon as it wakes, ahead of one that is in the middle
/// of a longer slice (a vCPU thread, QEMU's main loop), instead of waiting for it to end.
/// Older kernels accept and ignore it. Returns 0 or an errno value.
@discardableResult
public func setThreadSlice(nanoseconds: UInt64) -> Int32 {
    colorun_set_thread_slice(nanoseconds)
}

/// The calling thread's slice in nanoseconds as the kernel reports it (`sched_getattr`'s
/// `sched_runtime`), or nil if it cannot say.
public func threadSlice() -> UInt64? {
    var slice: UInt64 = 0
    return colorun_thread_slice(&slice) == 0 ? slice : nil
}
