import Colorun
import ColorunSystem
import Foundation
import Logging
import LuaRuntime
import NIOCore
import NIOPosix
import QMP
import Synchronization

// MARK: - Numbers

/// Percentiles of durations in nanoseconds.
struct Stats: Sendable {
    var sorted: [Int64]
    init(_ samples: [Int64]) { sorted = samples.sorted() }
    var count: Int { sorted.count }
    func percentile(_ p: Double) -> Double {
        guard !sorted.isEmpty else { return .nan }
        // Nearest rank.
        let rank = Int((Double(sorted.count) * p / 100).rounded(.up))
        return Double(sorted[max(0, min(sorted.count - 1, rank - 1))])
    }
    var p50: Double { percentile(50) }
    var p99: Double { percentile(99) }
    var mean: Double { sorted.isEmpty ? .nan : Double(sorted.reduce(0, +)) / Double(sorted.count) }
}

func fmt(_ value: Double, _ digits: Int = 2) -> String {
    guard value.isFinite else { return "n/a" }
    return String(format: "%.\(digits)f", value)
}

/// "p50 / p99" in milliseconds.
func ms(_ s: Stats, digits: Int = 3) -> String { "\(fmt(s.p50 / 1e6, digits)) / \(fmt(s.p99 / 1e6, digits)) ms" }

/// CPU time (user + system) of this process, all threads, in seconds.
func processCPUSeconds() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
}

/// VmRSS of this process (from /proc/self/status), in MiB.
func residentMiB() -> Double {
    guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return .nan }
    for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        let kib = line.split(separator: " ").compactMap { Double($0) }.first ?? .nan
        return kib / 1024
    }
    return .nan
}

func monotonicNanos() -> Int64 { Int64(NIODeadline.now().uptimeNanoseconds) }

// MARK: - Results

/// One row of the table.
struct Row: Sendable {
    var name: String
    var colorun: String
    var baseline: String
    var ratio: String
    var target: String
    /// "met", "missed", "n/a", "skipped: why".
    var status: String
    var what: String
}

final class Results: Sendable {
    let rows = Mutex<[Row]>([])
    let notes = Mutex<[String]>([])

    func add(_ row: Row) {
        rows.withLock { $0.append(row) }
        say("| \(row.name) | \(row.colorun) | \(row.baseline) | \(row.ratio) | \(row.target) | \(row.status) |")
    }

    func note(_ text: String) {
        notes.withLock { $0.append(text) }
        say("  note: \(text)")
    }
}

/// Writes a line to standard output at once (no stdio buffering: progress shows through a pipe).
func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

struct Unchecked<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}

func verdict(_ ok: Bool) -> String { ok ? "met" : "missed" }

// MARK: - The `bench` Lua module

/// Gives a benchmark policy a monotonic clock and a way to hand samples back to Swift.
/// `bench.now()` → integer nanoseconds; `bench.put(name, {numbers...})`; `bench.arg(name)`.
final class BenchModule: PolicyExtension, @unchecked Sendable {
    let collected = Mutex<[String: [Int64]]>([:])
    let arguments: [String: String]

    init(arguments: [String: String] = [:]) { self.arguments = arguments }

    func samples(_ name: String) -> [Int64] { collected.withLock { $0[name] ?? [] } }

    func register(in session: PolicySession) throws { try register(in: session.runtime) }

    func register(in runtime: LuaRuntime) throws {
        try runtime.registerModule("bench", functions: [
            "now": .sync { call in call.push(monotonicNanos()) },
            "put": .sync { [self] call in
                let name = try call.string(1)
                guard case .array(let values) = try call.json(2) else { throw LuaHostError.message("bench.put: array expected") }
                let numbers = values.compactMap { v -> Int64? in
                    if case .int(let i) = v { return i }
                    return v.doubleValue.map { Int64($0) }
                }
                collected.withLock { $0[name, default: []].append(contentsOf: numbers) }
            },
            "cpu": .sync { call in call.push(processCPUSeconds()) },
            "rss": .sync { call in call.push(residentMiB()) },
            "arg": .sync { [self] call in
                let name = try call.string(1)
                guard let value = arguments[name] else { throw LuaHostError.message("bench.arg: no argument '\(name)'") }
                call.push(value)
            },
        ])
    }

    func shutdown(session: PolicySession) -> EventLoopFuture<Void> { session.eventLoop.makeSucceededVoidFuture() }
}

// MARK: - Running policies

let quietLogger: Logger = {
    var logger = Logger(label: "colorun-bench")
    logger.logLevel = .error
    return logger
}()

func makeTempDirectory(_ prefix: String) -> String { makeTempDirectoryIn("/tmp", prefix) }

func makeTempDirectoryIn(_ parent: String, _ prefix: String) -> String {
    do {
        return try makeTemporaryDirectory(in: parent, prefix: prefix)
    } catch {
        fatalError("colorun-bench: \(error)")
    }
}

/// Runs `source` as a policy in a fresh PolicySession on its own event loop (one thread).
func runPolicy(_ source: String, domains: [DomainSpec], bench: BenchModule, extensions: [any PolicyExtension] = [],
               configure: (inout PolicyOptions) -> Void = { _ in }) async throws -> PolicyReport {
    let dir = makeTempDirectory("colorun-bench")
    // The state directory holds every generation the run kept (Remus streams: hundreds of MiB).
    defer { removeTree(dir) }
    let path = dir + "/policy.lua"
    try source.write(toFile: path, atomically: true, encoding: .utf8)
    var options = PolicyOptions(policyPath: path)
    options.stateDirectory = dir + "/state"
    options.domains = domains
    options.domainOptions = DomainOptions(connectTimeout: .seconds(5), commandTimeout: .seconds(5))
    configure(&options)
    let loop = benchGroup.next()
    let opts = options
    let all = Unchecked([bench] + extensions)
    let session = try await loop.submit {
        try PolicySession(options: opts, eventLoop: loop, logger: quietLogger, extensions: all.value)
    }.get()
    let report = try await session.run().get()
    if case .failed(let failure) = report.outcome {
        throw BenchError("policy failed: \(failure)")
    }
    return report
}

/// One event loop thread for colorun's session (a colorun process runs one session on one loop).
let benchGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

// MARK: - Subprocesses

/// Runs the Python baseline script; returns its samples, or nil and why not.
func pythonBaseline(_ python: String?, _ script: String, _ arguments: [String]) -> (samples: [Int64]?, why: String) {
    guard let python else { return (nil, "no python venv") }
    return toolBaseline(python, [script] + arguments, missing: "")
}

/// Runs a baseline program that prints {"samples_ns": [...]} (or {"skip": why}).
func toolBaseline(_ executable: String?, _ arguments: [String], missing: String) -> (samples: [Int64]?, why: String) {
    guard let executable else { return (nil, missing) }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    do {
        try process.run()
    } catch {
        return (nil, "cannot start \(executable): \(error)")
    }
    let data = out.fileHandleForReading.readDataToEndOfFile()
    let errData = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0,
        let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any]
    else {
        let text = String(decoding: errData, as: UTF8.self).split(separator: "\n").suffix(2).joined(separator: " | ")
        return (nil, "baseline \(arguments.first ?? "") failed: \(text)")
    }
    if let skip = object["skip"] as? String { return (nil, skip) }
    let samples = (object["samples_ns"] as? [NSNumber])?.map { $0.int64Value } ?? []
    return (samples, "")
}

/// A `qemu-sim` process serving `count` domains in a fresh directory; it dies with the
/// benchmark (an owned child), however the benchmark ends.
final class SimProcess: Sendable {
    let pid: Int32
    let directory: String
    /// The read end of qemu-sim's stdout, open until `stop` so that it never writes to a
    /// closed pipe.
    private let output: Int32

    init(executable: String, count: Int, prefix: String = "dom") throws {
        directory = makeTempDirectory("colorun-bench-sim")
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw BenchError("cannot make a pipe: \(errnoText())") }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        output = fds[0]
        do {
            pid = try spawnChild(
                [executable, "--dir", directory, "--count", String(count), "--prefix", prefix, "--quiet"],
                lifetime: .owned, standardOutput: .descriptor(fds[1]))
        } catch {
            close(fds[0])
            close(fds[1])
            throw error
        }
        close(fds[1])
        // Wait for "ready N".
        var buffer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 256)
        while !String(decoding: buffer, as: UTF8.self).contains("ready") {
            let n = chunk.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                _ = reapChild(pid, blocking: true)
                close(fds[0])
                throw BenchError("qemu-sim exited before it was ready")
            }
            buffer += chunk[0..<n]
        }
    }

    func socket(_ index: Int, prefix: String = "dom") -> String { "\(directory)/\(prefix)\(index).sock" }

    func stop() {
        kill(pid, SIGTERM)
        _ = reapChild(pid, blocking: true)
        close(output)
        removeTree(directory)
    }
}
