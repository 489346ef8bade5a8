import ColorunSystem
import ColorunTestSupport
import Foundation
import QEMUSimulator

/// The built `colorun` binary: next to the test bundle in `.build/<triple>/debug/`.
func colorunBinary() -> String? {
    builtColorunBinary()
}

struct ProcessResult {
    var code: Int32
    var stdout: String
    var stderr: String
}

/// Everything written to one pipe, read by a thread of its own until EOF. No callbacks into
/// the process object: a reader outlives it safely.
private final class PipeCapture: @unchecked Sendable {
    /// The write end, for the child; the parent closes it once the child has it.
    let writeEnd: Int32
    private let readEnd: Int32
    private let lock = NSLock()
    private var data = Data()
    private var atEOF = false

    init() throws {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw CLITestError("pipe failed: errno \(errno)") }
        // Only our child gets the write end (spawnChild passes it as its stdout/stderr).
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        readEnd = fds[0]
        writeEnd = fds[1]
        Thread { [self] in readUntilEOF() }.start()
    }

    private func readUntilEOF() {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(readEnd, &buffer, buffer.count)
            if n > 0 {
                lock.withLock { data.append(contentsOf: buffer[0..<n]) }
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                break
            }
        }
        close(readEnd)
        lock.withLock { atEOF = true }
    }

    var text: String { lock.withLock { String(decoding: data, as: UTF8.self) } }
    var finished: Bool { lock.withLock { atEOF } }
}

/// A running `colorun` (stdout and stderr read in the background), or any other command line.
/// Started as an owned child (ColorunSystem): it dies with the test process, however that ends.
final class ColorunProcess: @unchecked Sendable {
    let pid: pid_t
    private let out: PipeCapture, err: PipeCapture
    private let lock = NSLock()
    private var exitStatus: ChildExitStatus?

    /// The built colorun with `arguments`.
    convenience init(_ arguments: [String]) throws {
        guard let binary = colorunBinary() else { throw CLITestError("the colorun binary is not built (swift build)") }
        try self.init(commandLine: [binary] + arguments)
    }

    init(commandLine: [String]) throws {
        let out = try PipeCapture(), err = try PipeCapture()
        // The child has its own copies: closing ours lets the reads end at its exit.
        defer {
            close(out.writeEnd)
            close(err.writeEnd)
        }
        pid = try spawnChild(commandLine, lifetime: .owned,
                             standardOutput: .descriptor(out.writeEnd), standardError: .descriptor(err.writeEnd))
        self.out = out
        self.err = err
    }

    var stderrSoFar: String { err.text }

    /// Whether it still runs (reaps it once it has exited).
    var isRunning: Bool {
        lock.withLock {
            if exitStatus == nil { exitStatus = reapChild(pid, blocking: false) }
            return exitStatus == nil
        }
    }

    /// Sends `signo`, unless it has been reaped already (its pid may be reused).
    func signal(_ signo: Int32) {
        lock.withLock { if exitStatus == nil { _ = kill(pid, signo) } }
    }

    /// Kills it if it still runs, and reaps it.
    private func killAndReap() -> ChildExitStatus {
        lock.withLock {
            if exitStatus == nil {
                _ = kill(pid, SIGKILL)
                exitStatus = reapChild(pid, blocking: true)
            }
            return exitStatus ?? .signaled(signal: SIGKILL)
        }
    }

    /// A test that ends (or throws) before `wait` leaves no colorun behind.
    deinit { _ = killAndReap() }

    /// Waits for the exit (killing the process after `timeout` seconds, or at once if the
    /// test is cancelled) and for the end of its output. Polls: a child's exit offers nothing
    /// to await here.
    func wait(timeout: Double = 20) async -> ProcessResult {
        let deadline = Date().addingTimeInterval(timeout)
        while isRunning && Date() < deadline && !Task.isCancelled { try? await Task.sleep(for: .milliseconds(10)) }
        let status = killAndReap()
        // The pipes reach EOF once every holder of their write ends is gone (5 s at most, in
        // case something colorun started still holds one).
        let drained = Date().addingTimeInterval(5)
        while !(out.finished && err.finished) && Date() < drained { try? await Task.sleep(for: .milliseconds(5)) }
        let code: Int32
        switch status {
        case .exited(let c): code = c
        case .signaled(let signal): code = 128 + signal
        }
        return ProcessResult(code: code, stdout: out.text, stderr: err.text)
    }
}

func runColorun(_ arguments: [String], timeout: Double = 20) async throws -> ProcessResult {
    try await ColorunProcess(arguments).wait(timeout: timeout)
}

/// Runs any command line (the executable looked up in PATH) to its end.
func runCommand(_ commandLine: [String], timeout: Double = 20) async throws -> ProcessResult {
    try await ColorunProcess(commandLine: commandLine).wait(timeout: timeout)
}

/// `promtool check metrics` (Debian's prometheus package) on a Prometheus text exposition:
/// exit 0 and no output when it has no complaint.
func promtoolCheckMetrics(_ exposition: String) async throws -> ProcessResult {
    let dir = makeTempDirectory("colorun-promtool")
    defer { removeDirectory(dir) }
    let file = writePolicy(exposition, in: dir, name: "metrics.txt")
    return try await runCommand(["sh", "-c", #"exec promtool check metrics < "$1""#, "sh", file])
}

/// The body of an HTTP response.
func httpBody(_ response: String) -> String {
    guard let range = response.range(of: "\r\n\r\n") else { return "" }
    return String(response[range.upperBound...])
}

struct CLITestError: Error, CustomStringConvertible {
    var description: String
    init(_ text: String) { description = text }
}

/// colorun checkpointing `pair` every 100 ms (state in `<dir>/state`), each save taking
/// `saveDelay`; returns once a checkpoint has stopped the primary, with the directory.
func colorunMidCheckpoint(_ pair: SimulatedPair, saveDelay: Duration, tag: String) async throws -> (ColorunProcess, String) {
    pair.primary.addFault(SimulatedFault("xen-save-devices-state", .delay(saveDelay)))
    let dir = makeTempDirectory(tag)
    let policy = writePolicy("""
        local p, s = domain.get("web-p"), domain.get("web-s")
        policy.every("100ms", function() colo.checkpoint(p, s) end)
        """, in: dir)
    let process = try ColorunProcess([policy, "--state-dir", dir + "/state"] + pair.domainArguments)
    try await waitUntil("the checkpoint stopped the primary", timeout: .seconds(20)) {
        pair.primary.runState != .running
    }
    return (process, dir)
}

func writePolicy(_ source: String, in dir: String, name: String = "policy.lua") -> String {
    let path = dir + "/" + name
    _ = FileManager.default.createFile(atPath: path, contents: Data(source.utf8))
    return path
}

/// `GET path` over plain TCP, returns the whole response.
func httpGet(port: Int, path: String) throws -> String {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw CLITestError("socket failed") }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    guard rc == 0 else { throw CLITestError("connect to 127.0.0.1:\(port) failed") }
    let request = "GET \(path) HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    _ = request.withCString { send(fd, $0, strlen($0), 0) }
    var response = [UInt8]()
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = recv(fd, &buffer, buffer.count, 0)
        if n <= 0 { break }
        response.append(contentsOf: buffer[0..<n])
    }
    return String(decoding: response, as: UTF8.self)
}

/// A TCP port that was free a moment ago.
func freePort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = 0
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    return Int(UInt16(bigEndian: addr.sin_port))
}
