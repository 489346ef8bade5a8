import ColorunTestSupport
import Logging
import NIOCore
import NIOPosix
import QMPClient
import Testing
@testable import Colorun
@testable import LuaRuntime

#if canImport(Glibc)
import Glibc
#endif

/// The result of running a policy in a test.
struct PolicyRun {
    var report: PolicyReport
    var logs: LogCollector
    var stateDirectory: String

    var failure: String? {
        if case .failed(let f) = report.outcome { return f.description }
        return nil
    }
}

/// Runs `source` as `policy.lua` in a fresh directory with the given domains.
func runPolicy(
    _ source: String,
    domains: [(String, String)] = [],
    stateDirectory: String? = nil,
    hooks: [String: @Sendable () throws -> Void] = [:],
    checks: [String: @Sendable () -> Bool] = [:],
    lab: Lab? = nil,
    extensions: [any PolicyExtension & Sendable] = [],
    logs: LogCollector = LogCollector(),
    configure: (inout PolicyOptions) -> Void = { _ in }
) async throws -> PolicyRun {
    let dir = makeTempDirectory("colorun-policy")
    let path = dir + "/policy.lua"
    writeFile(path, Array(source.utf8))
    var options = PolicyOptions(policyPath: path)
    options.stateDirectory = stateDirectory ?? dir + "/state"
    options.domains = try domains.map { try DomainSpec(parsing: "\($0.0)=\($0.1)") } + (lab?.domainSpecs ?? [])
    options.domainOptions = DomainOptions(connectTimeout: .seconds(2), commandTimeout: .seconds(2))
    configure(&options)
    let loop = MultiThreadedEventLoopGroup.singleton.next()
    let session = try await loop.submit { [options] in
        try PolicySession(options: options, eventLoop: loop, logger: logs.logger("test", level: .debug), extensions: [TestHooks(hooks, checks: checks)] + (lab.map { [$0] } ?? []) + extensions)
    }.get()
    // A test cancelled (its time limit exceeded) stops its policy: the run ends, every domain
    // it stopped is resumed, and the test returns instead of hanging.
    let report = try await withTaskCancellationHandler {
        try await session.run().get()
    } onCancel: {
        session.stop()
    }
    return PolicyRun(report: report, logs: logs, stateDirectory: options.stateDirectory)
}

/// Exposes Swift closures to a test policy: `test.NAME()` runs hook NAME; `test.wait("CHECK")`
/// returns once the Swift predicate CHECK holds (polled on the loop every 2 ms; an error after
/// 10 s), so a policy waits for a state instead of sleeping for it.
final class TestHooks: PolicyExtension {
    let hooks: [String: @Sendable () throws -> Void]
    let checks: [String: @Sendable () -> Bool]

    init(_ hooks: [String: @Sendable () throws -> Void], checks: [String: @Sendable () -> Bool] = [:]) {
        self.hooks = hooks
        self.checks = checks
    }

    func register(in session: PolicySession) throws {
        var functions: [String: LuaHostFunction] = [:]
        for (name, hook) in hooks {
            functions[name] = .sync { _ in try hook() }
        }
        let checks = self.checks
        functions["wait"] = .async { call, completion in
            let name = try call.string(1)
            guard let check = checks[name] else {
                throw LuaHostError.message("test.wait: no check named '\(name)' (known: \(checks.keys.sorted().joined(separator: ", ")))")
            }
            CheckPoller(name: name, check: check, loop: call.runtime.eventLoop, completion: completion).poll()
        }
        try session.runtime.registerModule("test", functions: functions)
    }

    func shutdown(session: PolicySession) -> EventLoopFuture<Void> {
        session.eventLoop.makeSucceededVoidFuture()
    }
}

/// Completes `completion` on `loop` once `check` holds.
private struct CheckPoller: Sendable {
    let name: String
    let check: @Sendable () -> Bool
    let loop: any EventLoop
    let completion: LuaCompletion
    let deadline = NIODeadline.now() + .seconds(10)

    func poll() {
        if completion.isCancelled { return }
        if check() { return completion.succeed() }
        if NIODeadline.now() > deadline { return completion.fail(LuaHostError.message("test.wait: '\(name)' still false after 10 s")) }
        loop.scheduleTask(in: .milliseconds(2)) { poll() }
    }
}
