import Logging
import NIOCore
import NIOPosix
import QMPClient
import Synchronization
import Testing
@testable import Colorun
@testable import LuaRuntime

#if canImport(Glibc)
import Glibc
#endif

/// A log handler that keeps every line, for tests that assert what the operator is told.
final class LogCollector: Sendable {
    let lines = Mutex<[String]>([])

    func logger(_ label: String = "test") -> Logger {
        var logger = Logger(label: label) { _ in CollectingHandler(collector: self) }
        logger.logLevel = .debug
        return logger
    }

    var text: String { lines.withLock { $0.joined(separator: "\n") } }

    func contains(_ needle: String) -> Bool { lines.withLock { $0.contains { $0.contains(needle) } } }
}

struct CollectingHandler: LogHandler {
    let collector: LogCollector
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .debug

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var all = metadata
        for (k, v) in event.metadata ?? [:] { all[k] = v }
        let fields = all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let now = ContinuousClock.now
        collector.lines.withLock { $0.append("\(now) \(event.level) \(event.message) \(fields)") }
    }
}

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
    lab: Lab? = nil,
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
    let logs = LogCollector()
    let loop = MultiThreadedEventLoopGroup.singleton.next()
    let session = try await loop.submit { [options] in
        try PolicySession(options: options, eventLoop: loop, logger: logs.logger(), extensions: [TestHooks(hooks)] + (lab.map { [$0] } ?? []))
    }.get()
    let report = try await session.run().get()
    return PolicyRun(report: report, logs: logs, stateDirectory: options.stateDirectory)
}

/// Exposes Swift closures to a test policy as `test.NAME()`.
final class TestHooks: PolicyExtension {
    let hooks: [String: @Sendable () throws -> Void]

    init(_ hooks: [String: @Sendable () throws -> Void]) { self.hooks = hooks }

    func register(in session: PolicySession) throws {
        var functions: [String: LuaHostFunction] = [:]
        for (name, hook) in hooks {
            functions[name] = .sync { _ in try hook() }
        }
        try session.runtime.registerModule("test", functions: functions)
    }

    func shutdown(session: PolicySession) -> EventLoopFuture<Void> {
        session.eventLoop.makeSucceededVoidFuture()
    }
}
