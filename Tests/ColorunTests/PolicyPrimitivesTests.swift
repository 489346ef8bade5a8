import ColorunTestSupport
import QEMUSimulator
import QMP
import Synchronization
import Testing
@testable import Colorun

/// Timers, events, lost domains, retries, the declarative form and the end-of-run rules,
/// against simulated domains.
@Suite(.timeLimit(.minutes(3)), .machine(.exclusive)) struct PolicyPrimitivesTests {
    @Test func everyNeverOverlapsAndCountsSkippedTicks() async throws {
        let run = try await runPolicy(#"""
            local runs = 0
            local t
            t = policy.every("20ms", function()
              runs = runs + 1
              sleep("70ms")           -- longer than the interval: the next ticks are skipped
              if runs == 3 then t.cancel() end
            end)
            """#)
        #expect(run.failure == nil, "\(run.failure ?? "")")
        #expect(run.report.skippedTicks >= 4, "skipped \(run.report.skippedTicks)")
        #expect(run.logs.count("previous run was still going") == 1, "logged once")
    }

    /// A test cancelled (as its time limit does) stops its policy: a policy that never ends
    /// fails its test instead of hanging the run.
    @Test func aCancelledTestStopsItsPolicy() async throws {
        let started = Mutex(false)
        let run = Task {
            try await runPolicy("test.started()\nwhile true do sleep('10ms') end\n",
                                hooks: ["started": { started.withLock { $0 = true } }])
        }
        try await waitUntil("the policy to start") { started.withLock { $0 } }
        run.cancel()
        let outcome = try await run.value.report.outcome
        guard case .stopped = outcome else {
            Issue.record("expected a stopped run, got \(outcome)")
            return
        }
    }

    @Test func afterRunsOnceAndStopEndsTheRun() async throws {
        let run = try await runPolicy(#"""
            local fired = 0
            policy.after("30ms", function() fired = fired + 1 end)
            policy.every("10ms", function() if fired == 1 then log.info("after fired", {count = fired}); policy.stop() end end)
            """#)
        guard case .stopped = run.report.outcome else {
            Issue.record("expected a stopped run, got \(run.report.outcome)")
            return
        }
        #expect(run.logs.contains("after fired count=1"))
    }

    @Test func eventsReachTheirHandler() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local d = domain.get("web-p")
                local seen = {}
                local sub = d:on("*", function(ev) seen[#seen + 1] = ev.event end)
                d:on("RESUME", function(ev)
                  assert(ev.domain == "web-p" and type(ev.timestamp) == "number")
                  sub.cancel()
                  assert(seen[1] == "STOP", tostring(seen[1]))
                  policy.stop()
                end)
                d:stop()
                d:resume()
                """#, domains: pair.domains)
            guard case .stopped = run.report.outcome else {
                Issue.record("expected a stopped run, got \(run.report.outcome)")
                return
            }
        }
    }

    @Test func onLostFiresOnceWhenTheMonitorDies() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local p = domain.get("web-p")
                local fired = 0
                policy.on_lost(p, function(d, reason)
                  fired = fired + 1
                  assert(d == p, "the handler gets the domain")
                  log.warn("lost " .. d.name .. ": " .. reason)
                  sleep("100ms")
                  assert(fired == 1)
                end, {heartbeat = "20ms", timeout = "100ms"})
                sleep("50ms")
                test.kill()
                """#, domains: pair.domains, hooks: ["kill": { Task { await pair.primary.kill() } }])
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(run.logs.contains("lost web-p"))
        }
    }

    @Test func onLostSeesAFrozenMonitorThroughTheHeartbeat() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local p = domain.get("web-p")
                assert(p:status().running)   -- connected before the freeze
                policy.on_lost(p, function(_, reason) log.warn("lost: " .. reason) end, {heartbeat = "50ms", timeout = "300ms"})
                sleep("40ms")
                test.freeze()
                """#, domains: pair.domains, hooks: ["freeze": { pair.primary.freeze() }])
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(run.logs.contains("lost: heartbeat failed: Timeout"), "\(run.logs.text)")
            pair.primary.unfreeze()
        }
    }

    @Test func retryBacksOffAndGivesUpWithTheLastError() async throws {
        try await withSimulatedPair { pair in
            try pair.primary.addFaults(parsing: "query-status:error=GenericError,count=2,desc=busy")
            let run = try await runPolicy(#"""
                local d = domain.get("web-p")
                local retries = {}
                local st = retry({attempts = 3, backoff = "5ms", on_retry = function(err, n) retries[#retries + 1] = err.desc end},
                  function() return d:status() end)
                assert(st.running and #retries == 2 and retries[1] == "busy", "two retries, then success")
                -- retry_on can refuse: CommandNotFound is not worth retrying
                local calls = 0
                local ok, err = pcall(retry, {attempts = 5, backoff = 0, retry_on = function(e) return e.class ~= "CommandNotFound" end},
                  function() calls = calls + 1; return d:execute("nope") end)
                assert(not ok and err.class == "CommandNotFound" and calls == 1)
                local ok2, err2 = pcall(retry, {attempts = 2, backof = "1s"}, function() end)
                assert(not ok2 and tostring(err2):find("unknown option 'backof'"), tostring(err2))
                """#, domains: pair.domains)
            #expect(run.failure == nil, "\(run.failure ?? "")")
        }
    }

    @Test func declarativePolicyChecksItsFields() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                return colo.policy{
                  primary = domain.get("web-p"),
                  secondary = domain.get("web-s"),
                  intervall = "200ms",
                }
                """#, domains: pair.domains)
            let failure = try #require(run.failure)
            #expect(failure.contains("policy.lua:1: colo.policy: unknown field 'intervall'"), "\(failure)")
            let typed = try await runPolicy(#"""
                return colo.policy{ primary = domain.get("web-p"), secondary = "web-s", interval = 1 }
                """#, domains: pair.domains)
            #expect(typed.failure?.contains("field 'secondary' must be a domain, got string") == true, "\(typed.failure ?? "")")
        }
    }

    @Test func declarativePolicyCheckpointsAndFailsOver() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local done = 0
                return colo.policy{
                  primary = domain.get("web-p"),
                  secondary = domain.get("web-s"),
                  interval = "40ms",
                  keep = 2,
                  heartbeat = "20ms",
                  retry = {attempts = 2, backoff = "5ms"},
                  on_checkpoint = function(r) done = done + 1; if done == 3 then test.kill() end end,
                  on_checkpoint_error = function(err) log.warn("checkpoint error: " .. tostring(err)) end,
                }
                """#, domains: pair.domains, hooks: ["kill": { Task { await pair.primary.kill() } }])
            // The pair's failover ends its checkpointing; with no pair left the run finishes.
            guard case .finished = run.report.outcome else {
                Issue.record("expected the run to finish after the only pair failed over, got \(run.report.outcome)")
                return
            }
            #expect(run.report.checkpoints >= 3, "\(run.logs.text)")
            #expect(run.report.failovers == 1)
            #expect(pair.secondary.runState == .running)
            #expect(run.logs.contains("failing over to web-s"))
        }
    }

    @Test func domainsThePolicyLeftStoppedAreResumedAtTheEnd() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                domain.get("web-p"):stop()
                error("the policy breaks with the VM stopped")
                """#, domains: pair.domains)
            #expect(run.failure?.contains("policy.lua:2: the policy breaks with the VM stopped") == true)
            #expect(run.report.resumedAtExit == ["web-p"])
            #expect(pair.primary.runState == .running)
            #expect(run.logs.contains("resumed a domain the policy left stopped"))
            #expect(try StopJournal(stateDirectory: run.stateDirectory).entries().isEmpty, "the journal is clean")
        }
    }

    @Test func aLaterRunResumesWhatAKilledRunLeftStopped() async throws {
        try await withSimulatedPair { pair in
            // A run that died after `stop`: the journal says so (its pid is gone), the VM is paused.
            let state = makeTempDirectory("colorun-state")
            pair.secondary.setRunState(.paused)
            do {
                let journal = try StopJournal(stateDirectory: state)
                try journal.willStop(domain: "web-s", endpoint: pair.domains[1].1)
                writeFile(state + "/journal/web-s.journal", Array(#"{"domain":"web-s","endpoint":"\#(pair.domains[1].1)","pid":999999,"since":1,"state":"stopped"}"#.utf8))
            }
            let run = try await runPolicy("assert(domain.get('web-s'):status().running)\n", domains: pair.domains, stateDirectory: state)
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(run.report.recovered == ["web-s"])
            #expect(run.logs.contains("resumed a domain that a previous colorun run left paused"))
            #expect(try StopJournal(stateDirectory: state).entries().isEmpty)
        }
    }
}
