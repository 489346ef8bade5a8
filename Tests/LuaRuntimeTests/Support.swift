import ColorunTestSupport
import Foundation
import Logging
import LuaRuntime
import NIOCore
import NIOPosix
import Testing

/// Every suite of this target is nested here and runs serialized, alone on the machine
/// (`.machine(.exclusive)`), within the time limit: several tests assert timing, and the
/// machine has two cores.
@Suite(.serialized, .timeLimit(.minutes(5)), .machine(.exclusive)) struct LuaRuntimeSuite {}

/// One single-threaded loop shared by the tests (each test makes its own runtime).
let testGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)

extension LogCollector {
    /// Every event as `LEVEL: MESSAGE` (what these tests compare).
    var levelled: [String] { records.map { "\($0.level.map { "\($0)" } ?? "raw"): \($0.message)" } }
}

/// Writes `files` (name → source) to a fresh directory; returns its path.
func makePolicyDir(_ files: [String: String]) throws -> String {
    let dir = URL(fileURLWithPath: makeTempDirectory("lua"))
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
    let sink = LogCollector()
    // a loop of its own, so timing assertions do not see other tests' work
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let loop = group.next()
    let outcome: LuaRunOutcome
    do {
        let runtime = try await loop.submit {
            let rt = try LuaRuntime(eventLoop: loop, options: options, logger: sink.logger())
            try setup(rt)
            return rt
        }.get()
        // A test cancelled (its time limit exceeded) stops its policy instead of hanging.
        outcome = await withTaskCancellationHandler {
            await runtime.run(policyAt: dir + "/policy.lua")
        } onCancel: {
            runtime.stop()
        }
    } catch {
        try? await group.shutdownGracefully()
        throw error
    }
    try? await group.shutdownGracefully()
    removeDirectory(dir)
    return PolicyResult(outcome: outcome, logs: sink.levelled, dir: dir)
}
