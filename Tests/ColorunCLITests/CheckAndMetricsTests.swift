import ColorunTestSupport
import CoreMetrics
import Logging
import LuaRuntime
import NIOCore
import NIOPosix
import Prometheus
import Testing
@testable import Colorun
@testable import ColorunOperator

@Suite(.timeLimit(.minutes(2)), .machine(.shared)) struct PolicyCheckTests {
    func check(_ source: String, domains: [String] = []) async throws -> Result<PolicyCheck.Passed, PolicyCheck.Failure> {
        let dir = makeTempDirectory("colorun-check-test")
        var options = PolicyOptions(policyPath: writePolicy(source, in: dir))
        options.domains = domains.map { DomainSpec(name: $0, endpoint: .unix(path: "/nonexistent/\($0)")) }
        return await PolicyCheck.check(options, logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
    }

    @Test func goodPolicyPasses() async throws {
        let result = try await check("""
            local p, s = domain.get("web-p"), domain.get("web-s")
            policy.every("100ms", function() colo.checkpoint(p, s) end)
            log.info("armed")
            """, domains: ["web-p", "web-s"])
        guard case .success(let passed) = result else { Issue.record("\(result)"); return }
        #expect(passed.notes.isEmpty)
    }

    @Test func syntaxErrorNamesFileAndLine() async throws {
        let result = try await check("local x = 1\nx = = 2\n")
        guard case .failure(let failure) = result else { Issue.record("passed"); return }
        #expect(failure.message.contains("policy.lua:2:"))
    }

    @Test func undefinedTopLevelGlobal() async throws {
        let result = try await check("local a = 1\n\nprnt(a)\n")
        guard case .failure(let failure) = result else { Issue.record("passed"); return }
        #expect(failure.message.contains("policy.lua:3: undefined global 'prnt'"))
    }

    @Test func firstVMAccessEndsTheDryRun() async throws {
        let result = try await check("local p = domain.get('web-p')\nlocal st = qmp.status(p)\nprint(st)\n", domains: ["web-p"])
        guard case .success(let passed) = result else { Issue.record("\(result)"); return }
        #expect(passed.notes.joined().contains("first VM access"))
    }

    @Test func unknownDomainFailsWhenDomainsAreNamed() async throws {
        let result = try await check("local p = domain.get('web-p')\n", domains: ["web-s"])
        guard case .failure(let failure) = result else { Issue.record("passed"); return }
        #expect(failure.message.contains("unknown domain 'web-p'"))
    }

    @Test func missingFile() async {
        let result = await PolicyCheck.check(PolicyOptions(policyPath: "/nonexistent/p.lua"), logger: Logger(label: "t"))
        guard case .failure(let failure) = result else { Issue.record("passed"); return }
        #expect(failure.message.contains("cannot open /nonexistent/p.lua"))
    }

    @Test func aLoopingMainChunkIsCutShort() async throws {
        let clock = ContinuousClock()
        let start = clock.now
        let result = try await check("while true do sleep('10ms') end\n")
        guard case .success(let passed) = result else { Issue.record("\(result)"); return }
        #expect(passed.notes.joined().contains("still running"))
        #expect(clock.now - start < .seconds(3))
    }
}

@Suite(.timeLimit(.minutes(2)), .machine(.shared)) struct MetricsTests {
    @Test func aRunAgainstTheSimulatorFeedsEveryMetric() async throws {
        try await withSimulatedPair { pair in
            let dir = makeTempDirectory("colorun-metrics")
            let path = writePolicy("""
                local p, s = domain.get("web-p"), domain.get("web-s")
                for i = 1, 3 do colo.checkpoint(p, s) end
                pcall(qmp.execute, p, "no-such-command")
                policy.count_failover_for_test()
                """, in: dir)
            let (report, text) = try await runWithMetrics(path, pair: pair, stateDirectory: dir + "/state", failoverHook: true)
            #expect(report.checkpoints == 3)
            // (failures by step: see failedCheckpointsCountByStep; this run has none)
            for name in ColorunMetrics.Name.all where name != ColorunMetrics.Name.checkpointFailures && !ColorunMetrics.Name.arbiter.contains(name) {
                #expect(text.contains(name), "missing \(name)")
            }
            #expect(text.contains(#"colorun_qmp_command_duration_seconds_count{command="xen-save-devices-state"} 3"#))
            #expect(text.contains(#"colorun_qmp_command_failures_total{command="no-such-command"} 1"#))
            #expect(text.contains(#"colorun_checkpoints_total{series="web-p+web-s"} 3"#))
            #expect(text.contains(#"colorun_domain_up{domain="web-p"}"#))
            #expect(text.contains("colorun_failovers_total 1"))
            // Every metric says what it is, and promtool has nothing to say about any.
            for name in ColorunMetrics.Name.all where name != ColorunMetrics.Name.checkpointFailures && !ColorunMetrics.Name.arbiter.contains(name) {
                #expect(text.contains("# HELP \(name) \(ColorunMetrics.help[name] ?? "-")\n"), "no HELP for \(name)")
            }
            let lint = try await promtoolCheckMetrics(text)
            #expect(lint.code == 0 && lint.stdout.isEmpty && lint.stderr.isEmpty, "promtool: \(lint.code) \(lint.stdout) \(lint.stderr)")
        }
    }

    @Test func everyMetricHasHelpText() {
        for name in ColorunMetrics.Name.all {
            let help = ColorunMetrics.help[name] ?? ""
            #expect(help.count > 10 && !help.contains("\n"), "\(name): '\(help)'")
        }
        #expect(Set(ColorunMetrics.help.keys) == Set(ColorunMetrics.Name.all))
    }

    /// The gauge says 1 while colorun holds a domain's monitor, and 0 once the run has ended.
    @Test func domainUpGoesToZeroAtTheEndOfARun() async throws {
        try await withSimulatedPair { pair in
            let dir = makeTempDirectory("colorun-metrics")
            let path = writePolicy("""
                local p, s = domain.get("web-p"), domain.get("web-s")
                colo.checkpoint(p, s)
                """, in: dir)
            let (report, text) = try await runWithMetrics(path, pair: pair, stateDirectory: dir + "/state")
            #expect(report.checkpoints == 1)
            #expect(text.contains(#"colorun_domain_up{domain="web-p"} 0.0"#), "\(text)")
            #expect(text.contains(#"colorun_domain_up{domain="web-s"} 0.0"#), "\(text)")
        }
    }

    @Test func failedCheckpointsCountByStep() async throws {
        try await withSimulatedPair { pair in
            try pair.secondary.addFaults(parsing: "xen-load-devices-state:error=GenericError")
            let dir = makeTempDirectory("colorun-metrics")
            let path = writePolicy("""
                local p, s = domain.get("web-p"), domain.get("web-s")
                pcall(colo.checkpoint, p, s)
                """, in: dir)
            let (report, text) = try await runWithMetrics(path, pair: pair, stateDirectory: dir + "/state")
            #expect(report.failedCheckpoints == 1)
            #expect(text.contains(#"colorun_checkpoint_failures_total{series="web-p+web-s",step="restore"} 1"#))
            #expect(text.contains("# HELP colorun_checkpoint_failures_total \(ColorunMetrics.help[ColorunMetrics.Name.checkpointFailures] ?? "-")\n"))
            let lint = try await promtoolCheckMetrics(text)
            #expect(lint.code == 0 && lint.stdout.isEmpty && lint.stderr.isEmpty, "promtool: \(lint.code) \(lint.stdout) \(lint.stderr)")
        }
    }
}

extension MetricsTests {
    /// Runs the policy at `path` against the pair with Prometheus metrics; returns the
    /// report and the metrics as Prometheus prints them.
    func runWithMetrics(_ path: String, pair: SimulatedPair, stateDirectory: String, failoverHook: Bool = false)
        async throws -> (PolicyReport, String)
    {
        let registry = PrometheusCollectorRegistry()
        var options = PolicyOptions(policyPath: path)
        options.stateDirectory = stateDirectory
        options.domains = [
            DomainSpec(name: "web-p", endpoint: .unix(path: pair.directory + "/p.sock")),
            DomainSpec(name: "web-s", endpoint: .unix(path: pair.directory + "/s.sock")),
        ]
        // What `--metrics-listen` serves: swift-prometheus with colorun's HELP texts.
        options.domainOptions.metrics = ColorunMetrics(factory: ColorunPrometheusFactory(registry: registry))
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let session = try await loop.submit { [options] in
            try PolicySession(options: options, eventLoop: loop, logger: Logger(label: "t") { _ in SwiftLogNoOpLogHandler() },
                              extensions: failoverHook ? [FailoverHook()] : [])
        }.get()
        let report = try await session.run().get()
        return (report, registry.emitToString())
    }
}

/// `policy.count_failover_for_test()`: counts a failover the way colo.policy does.
final class FailoverHook: PolicyExtension {
    func register(in session: PolicySession) throws {
        try session.runtime.registerModule("policy", functions: [
            "count_failover_for_test": .sync { _ in
                session.report.failovers += 1
                session.options.domainOptions.metrics.failover()
            },
        ])
    }

    func shutdown(session: PolicySession) -> EventLoopFuture<Void> { session.eventLoop.makeSucceededVoidFuture() }
}

@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct ShutdownTests {
    /// A stop that comes before the run starts (a SIGTERM at start-up) ends the run at once:
    /// the policy never starts.
    @Test func aStopBeforeTheRunEndsItBeforeThePolicyStarts() async throws {
        try await withSimulatedPair { pair in
            let dir = makeTempDirectory("colorun-early-stop")
            var options = PolicyOptions(policyPath: writePolicy("""
                local p, s = domain.get("web-p"), domain.get("web-s")
                policy.every("100ms", function() colo.checkpoint(p, s) end)
                """, in: dir))
            options.stateDirectory = dir + "/state"
            options.domains = [
                DomainSpec(name: "web-p", endpoint: .unix(path: pair.directory + "/p.sock")),
                DomainSpec(name: "web-s", endpoint: .unix(path: pair.directory + "/s.sock")),
            ]
            let loop = MultiThreadedEventLoopGroup.singleton.next()
            let session = try await loop.submit { [options] in
                try PolicySession(options: options, eventLoop: loop, logger: Logger(label: "t") { _ in SwiftLogNoOpLogHandler() })
            }.get()
            session.stop()
            let report = try await session.run().get()
            guard case .stopped = report.outcome else { Issue.record("outcome \(report.outcome)"); return }
            #expect(report.checkpoints == 0)
            #expect(pair.primary.saveCounter == 0)
            #expect(pair.primary.runState == .running)
        }
    }
}
