import Foundation
import Logging
import LuaRuntime
import NIOCore
import NIOPosix
import Synchronization
import Testing

/// Every suite of this target runs serialized: several tests assert timing, and the machine
/// has two cores.
@Suite(.serialized) struct LuaRuntimeSuite {}

/// One single-threaded loop shared by the tests (each test makes its own runtime).
let testGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)

/// Collects log lines.
final class LogSink: Sendable {
    let lines = Mutex<[String]>([])
    var all: [String] { lines.withLock { $0 } }
    func logger() -> Logger {
        Logger(label: "test") { _ in CollectingHandler(sink: self) }
    }
}

struct CollectingHandler: LogHandler {
    let sink: LogSink
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        sink.lines.withLock { $0.append("\(event.level): \(event.message)") }
    }
}

/// Writes `files` (name → source) to a fresh directory; returns its path.
func makePolicyDir(_ files: [String: String]) throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lua-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    for (name, text) in files {
        let url = dir.appendingPathComponent(name)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try text.write(to: url, atomically: true, encoding: .utf8)
    }
    return dir.path
}

/// Test results with the temporary directory stripped from positions ("policy.lua:3: ...").
struct PolicyResult {
    var outcome: LuaRunOutcome
    var logs: [String]
    var failure: LuaTaskFailure? {
        if case .failed(let f) = outcome { return f }
        return nil
    }
    init(outcome: LuaRunOutcome, logs: [String], dir: String) {
        let strip = { (s: String) in s.replacingOccurrences(of: dir + "/", with: "") }
        if case .failed(var f) = outcome {
            f.message = strip(f.message)
            f.traceback = strip(f.traceback)
            self.outcome = .failed(f)
        } else {
            self.outcome = outcome
        }
        self.logs = logs.map(strip)
    }
    var finished: Bool {
        if case .finished = outcome { return true }
        return false
    }
    /// Lines printed by the policy (print → log at info).
    var printed: [String] { logs.filter { $0.hasPrefix("info: ") }.map { String($0.dropFirst(6)) } }
}

/// Runs `source` as policy.lua (plus sibling `files`), with `setup` run on the loop first.
func runPolicy(_ source: String, files: [String: String] = [:], options: LuaRuntimeOptions = LuaRuntimeOptions(),
               setup: @escaping @Sendable (LuaRuntime) throws -> Void = { _ in }) async throws -> PolicyResult {
    let dir = try makePolicyDir(files.merging(["policy.lua": source]) { a, _ in a })
    let sink = LogSink()
    // a loop of its own, so timing assertions do not see other tests' work
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    defer { group.shutdownGracefully { _ in } }
    let loop = group.next()
    let runtime = try await loop.submit {
        let rt = try LuaRuntime(eventLoop: loop, options: options, logger: sink.logger())
        try setup(rt)
        return rt
    }.get()
    let outcome = await runtime.run(policyAt: dir + "/policy.lua")
    return PolicyResult(outcome: outcome, logs: sink.all, dir: dir)
}
