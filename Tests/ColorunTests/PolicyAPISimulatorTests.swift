import ColorunSystem
import ColorunTestSupport
import QEMUSimulator
import QMP
import Testing
@testable import Colorun
import LuaRuntime

#if canImport(Glibc)
import Glibc
#endif

@Suite(.timeLimit(.minutes(3)), .machine(.shared)) struct PolicyAPISimulatorTests {
    @Test func stopStatusResumeFromLua() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local d = domain.get("web-p")
                assert(d.name == "web-p")
                assert(qmp.status(d).status == "running")
                d:stop()
                local st = d:status()
                assert(st.status == "paused" and st.running == false, "expected paused, got " .. st.status)
                qmp.resume(d)
                assert(qmp.status(d).running == true)
                local v = qmp.execute(d, "query-version")
                assert(math.type(v.qemu.major) == "integer")
                """#, domains: pair.domains)
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(pair.primary.runState == .running)
            #expect(run.report.resumedAtExit.isEmpty)
            #expect(run.logs.contains("simulated QEMU"), "a warning says the peer is simulated")
        }
    }

    @Test func failedCommandRaisesAStructuredError() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local d = domain.get("web-s")
                local ok, err = pcall(qmp.restore, d, "/tmp/whatever.state")
                assert(not ok)
                assert(err.domain == "web-s", tostring(err.domain))
                assert(err.command == "xen-load-devices-state", tostring(err.command))
                assert(err.class == "GenericError", tostring(err.class))
                assert(err.desc == "Cannot update device state while vm is running", tostring(err.desc))
                local text = tostring(err)
                assert(text:find("policy.lua:2: web-s: xen-load-devices-state: GenericError: Cannot update device state while vm is running", 1, true), text)
                local ok2, err2 = pcall(qmp.execute, d, "no-such-command")
                assert(err2.class == "CommandNotFound", tostring(err2.class))
                """#, domains: pair.domains)
            #expect(run.failure == nil, "\(run.failure ?? "")")
        }
    }

    @Test func unknownDomainNamesTheKnownOnes() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy("domain.get(\"web-x\")\n", domains: pair.domains)
            let failure = try #require(run.failure)
            #expect(failure.contains("policy.lua:1: unknown domain 'web-x' (known: web-p, web-s"))
        }
    }

    @Test func connectionsReopenAfterThePeerDropsThem() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local d = domain.get("web-p")
                assert(d:status().running)
                test.drop()
                -- wait until the client has seen the peer's EOF (a command sent before that
                -- fails as Disconnected, which is not what this test is about)
                local waited = 0
                while d:stats().disconnects == 0 do
                  assert(waited < 2000, "the client never saw the peer close the connection")
                  sleep("5ms"); waited = waited + 1
                end
                assert(d:status().running, "the next command opens a new connection")
                local st = d:stats()
                assert(st.connects == 2 and st.disconnects == 1, json.encode(st))
                """#, domains: pair.domains, hooks: ["drop": { pair.primary.dropConnections() }])
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(run.logs.contains("monitor connection lost"))
        }
    }

    @Test func xenDomainsResolveLibxlSockets() async throws {
        try await withSimulator("colorun-xen") { sim, dir in
            _ = try await sim.start(socketPath: dir + "/qmp-libxl-7", name: "dom7")
            let run = try await runPolicy(#"""
                local d = domain.xen(7, {run_dir = "\#(dir)"})
                assert(d.name == "xen-7" and d.endpoint == "unix:\#(dir)/qmp-libxl-7", d.endpoint)
                assert(d:status().running)
                assert(#domain.list() == 1 and domain.list()[1] == d)
                local ok, err = pcall(domain.xen, "7")
                assert(not ok and tostring(err):find("domain id expected"), tostring(err))
                local ok2, err2 = pcall(domain.open, {name = "x", qmp = "udp:1.2.3.4"})
                assert(not ok2 and tostring(err2):find("udp:1.2.3.4"), tostring(err2))
                """#)
            #expect(run.failure == nil, "\(run.failure ?? "")")
        }
    }

    @Test func xenCheckpointCycle() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                local r1 = colo.checkpoint(p, s)
                local r2 = colo.checkpoint(p, s, {keep = 1})
                assert(r1.generation == 1 and r2.generation == 2)
                assert(r2.bytes > 0 and r2.pause_ms > 0 and r2.save_ms >= 0 and r2.restore_ms >= 0)
                assert(qmp.status(p).running and qmp.status(s).running)
                local gens = colo.generations(p, s)
                assert(#gens == 1 and gens[1].generation == 2, "keep=1 keeps one generation")
                """#, domains: pair.domains)
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(run.report.checkpoints == 2)
            #expect(run.report.lastGood["web-p+web-s"] == 2)
            #expect(pair.primary.runState == .running && pair.secondary.runState == .running)
            // The secondary loaded exactly the primary's saves, in order.
            #expect(pair.secondary.loadedStates.map(\.file.save) == [1, 2])
            #expect(pair.secondary.loadedStates.allSatisfy { $0.file.domain == "web-p" })
        }
    }

    /// `pipeline = true`: the call returns once both domains run again, before the generation
    /// is durable; every generation is still committed, in order, and the run ends only once
    /// the last one is on disk.
    @Test func pipelinedCheckpointsAreAllCommitted() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                local first = colo.checkpoint(p, s, {pipeline = true})
                assert(first.generation == 1 and first.durable == false, "the first returns before its commit")
                assert(qmp.status(p).running and qmp.status(s).running)
                for i = 2, 20 do
                  local r = colo.checkpoint(p, s, {pipeline = true, keep = 2})
                  assert(r.generation == i and type(r.durable) == "boolean")
                end
                local waited = colo.checkpoint(p, s, {keep = 2})
                assert(waited.generation == 21 and waited.durable == true)
                local ok, err = pcall(colo.checkpoint, p, s, {pipeline = "yes"})
                assert(not ok and tostring(err):find("'pipeline' must be true or false"), tostring(err))
                """#, domains: pair.domains)
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(run.report.checkpoints == 21 && run.report.failedCheckpoints == 0)
            #expect(run.report.lastGood["web-p+web-s"] == 21)
            let dir = run.stateDirectory + "/checkpoints/web-p+web-s"
            let names = try GenerationStore.list(dir).filter { $0 != "." && $0 != ".." }.sorted()
            #expect(names == ["gen-00000020.devstate", "gen-00000021.devstate"], "keep = 2, nothing partial: \(names)")
            #expect(pair.secondary.loadedStates.map(\.file.save) == Array(1...21))
        }
    }

    /// `--runtime-dir`: the primary saves and the secondary loads each device state under
    /// the run's own staging directory there; the commit writes it into a slot file of the
    /// state directory (the result's path) listed by the series' index, pruned generations'
    /// slots are reused, and the run's staging
    /// directory is gone when the run ends, pipelined generations included. The stop journal
    /// is in the runtime directory, not the state directory.
    @Test func stagedCheckpointsAreCommittedIntoTheStateDirectory() async throws {
        try await withSimulatedPair { pair in
            let runtime = makeTempDirectory("colorun-runtime")
            let staging = runtime + "/staging"
            let runs: @Sendable () -> [String] = {
                ((try? GenerationStore.list(staging)) ?? []).filter { $0.hasPrefix("colorun-staging-") }
            }
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                for i = 1, 8 do
                  local r = colo.checkpoint(p, s, {keep = 2, pipeline = i % 2 == 0})
                  assert(r.generation == i)
                  assert(r.path:find("/state/checkpoints/web-p+web-s/slot-", 1, true), r.path)
                  local listed = colo.generations(p, s)
                  if r.durable then assert(listed[#listed].generation == i and listed[#listed].path == r.path) end
                  test.one_staging_run()
                end
                """#, domains: pair.domains,
                hooks: ["one_staging_run": { if runs().count != 1 { throw LuaHostError.message("staging runs: \(runs())") } }],
                configure: { $0.runtimeDirectory = runtime })
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(run.report.lastGood["web-p+web-s"] == 8)
            #expect(runs().isEmpty, "the run's staging directory is removed at its end")
            let loaded = pair.secondary.loadedStates
            #expect(loaded.map(\.file.save) == Array(1...8))
            #expect(loaded.allSatisfy { $0.path.hasPrefix(staging + "/colorun-staging-") }, "\(loaded.map(\.path))")
            let dir = run.stateDirectory + "/checkpoints/web-p+web-s"
            let names = try GenerationStore.list(dir).sorted()
            #expect(names.first == "generations.index" && names.dropFirst().allSatisfy { $0.hasPrefix("slot-") && $0.hasSuffix(".devstate") }, "\(names)")
            #expect(names.count <= 1 + 2 + 3, "keep = 2, at most three generations in flight: \(names)")
            let generations = try GenerationStore(directory: dir, fileExtension: "devstate").generations()
            #expect(generations.map(\.number) == [7, 8])
            #expect(try readFile(generations[1].path).prefix(4) == [0x51, 0x45, 0x56, 0x4d])
            #expect(try GenerationStore.list(runtime + "/journal").sorted() == ["web-p.journal", "web-s.journal"])
            #expect(((try? GenerationStore.list(run.stateDirectory + "/journal")) ?? []).isEmpty)
        }
    }

    /// A pipelined generation whose commit is refused (here a stale fencing token) never
    /// becomes the last good one, and the pair's next call raises it before stopping anything.
    @Test func aFailedPipelinedCommitIsRaisedByTheNextCall() async throws {
        try await withSimulatedPair { pair in
            let tokenFile = makeTempDirectory("colorun-token") + "/fencing-token"
            let stateDirectory = makeTempDirectory("colorun-state")
            let series = stateDirectory + "/checkpoints/web-p+web-s/"
            let logs = LogCollector()
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                assert(colo.checkpoint(p, s, {pipeline = true}).generation == 1)
                test.wait("first committed")
                test.stale()
                local second = colo.checkpoint(p, s, {pipeline = true})
                assert(second.generation == 2 and second.durable == false)
                test.wait("second refused")
                local ok, err = pcall(colo.checkpoint, p, s, {pipeline = true})
                assert(not ok and err.step == "commit" and err.generation == 2 and err.class == "StateDirError", tostring(err))
                assert(err.last_good == 1, "last_good: " .. tostring(err.last_good))
                assert(tostring(err):find("earlier pipelined generation") and tostring(err):find("fencing token 5 is stale"), tostring(err))
                local gens = colo.generations(p, s)
                assert(#gens == 1 and gens[1].generation == 1)
                """#, domains: pair.domains, stateDirectory: stateDirectory,
                hooks: ["stale": { writeFile(tokenFile, Array("9\n".utf8)) }],
                checks: [
                    "first committed": { access(series + "gen-00000001.devstate", F_OK) == 0 },
                    "second refused": { logs.text.contains("checkpoint 2 failed at commit") },
                ], logs: logs
            ) { options in
                options.fencing = FencingToken(token: 5, path: tokenFile, validUntil: .now + .seconds(600))
            }
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(run.report.checkpoints == 1 && run.report.failedCheckpoints == 1)
            #expect(run.report.lastGood["web-p+web-s"] == 1)
            // The raising call stopped nothing: two checkpoints' stops, both domains running.
            #expect(pair.primary.commandLog.filter { $0.name == "stop" }.count == 2)
            #expect(pair.primary.runState == .running && pair.secondary.runState == .running)
        }
    }

    @Test func checkpointsOfOneDomainNeverOverlap() async throws {
        try await withSimulatedPair { pair in
            // The first checkpoint's save takes 1 s: the second is tried while it is in flight.
            try pair.primary.addFaults(parsing: "xen-save-devices-state:delay=1s,count=1")
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                local first = task.spawn(function() return colo.checkpoint(p, s) end)
                test.wait("saving")   -- the first checkpoint has reached its save
                local ok, err = pcall(remus.checkpoint, p)
                assert(not ok and err.class == "Busy" and err.domain == "web-p", tostring(err))
                assert(first:wait().generation == 1)
                """#, domains: pair.domains,
                checks: ["saving": { pair.primary.commandLog.contains { $0.name == "xen-save-devices-state" } }])
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(pair.primary.runState == .running && pair.secondary.runState == .running)
        }
    }

    /// The primary's save goes out behind its `stop` (one write), not after both stops are
    /// answered: with the secondary's stop never answered, the primary has saved already. The
    /// checkpoint still fails at `stop`, both run again, and the save's file is removed once
    /// QEMU has answered the save.
    @Test func thePrimarySavesBehindItsStopWithoutWaitingForTheSecondary() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                colo.checkpoint(p, s)
                test.fault()
                local ok, err = pcall(colo.checkpoint, p, s)
                assert(not ok and err.step == "stop" and err.domain == "web-s" and err.class == "Timeout", tostring(err))
                """#, domains: pair.domains,
                hooks: ["fault": { try pair.secondary.addFaults(parsing: "stop:hang,count=1") }]
            ) { options in
                options.domainOptions.commandTimeout = .seconds(2)
            }
            #expect(run.failure == nil, "\(run.failure ?? "")")
            let saves = pair.primary.commandLog.filter { $0.name == "xen-save-devices-state" }
            #expect(saves.count == 2, "the second save was sent while the secondary's stop hung")
            #expect(!pair.secondary.commandLog.contains { $0.name == "xen-load-devices-state" && $0.time > saves[1].time })
            #expect(pair.primary.runState == .running && pair.secondary.runState == .running)
            #expect(try GenerationStore.list(run.stateDirectory + "/checkpoints/web-p+web-s") == ["gen-00000001.devstate"])
        }
    }

    /// The secondary's `cont` goes out behind its load, in the same write: it reaches QEMU
    /// before the load is answered (here the load's reply is held back half a second), and
    /// QEMU runs it after the load.
    @Test func theSecondaryResumesBehindItsLoadWithoutWaitingForTheReply() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                test.fault()
                local r = colo.checkpoint(p, s)
                assert(r.generation == 1, tostring(r.generation))
                """#, domains: pair.domains,
                hooks: ["fault": { try pair.secondary.addFaults(parsing: "xen-load-devices-state:delay=500ms,count=1") }])
            #expect(run.failure == nil, "\(run.failure ?? "")")
            let log = pair.secondary.commandLog
            let load = try #require(log.first { $0.name == "xen-load-devices-state" })
            let cont = try #require(log.first { $0.name == "cont" && $0.time >= load.time })
            #expect(cont.time - load.time < 0.25, "cont arrived \(cont.time - load.time) s after the load")
            #expect(pair.primary.runState == .running && pair.secondary.runState == .running)
        }
    }

    /// Each failure of the cycle ends with both domains running, the failed step named and
    /// the last good generation intact.
    @Test(arguments: [
        ("web-p", "xen-save-devices-state:error=GenericError,desc=disk full", "save", "GenericError"),
        ("web-s", "xen-load-devices-state:error=GenericError,desc=An IO error has occurred", "restore", "GenericError"),
        ("web-s", "xen-load-devices-state:drop", "restore", "Disconnected"),
        ("web-p", "xen-save-devices-state:hang", "save", "Timeout"),
        ("web-s", "stop:error=GenericError,desc=nope", "stop", "GenericError"),
        ("web-p", "stop:error=GenericError,desc=nope", "stop", "GenericError"),
        ("web-p", "xen-save-devices-state:crash-after-bytes=100", "save", "Disconnected"),
    ])
    func xenCheckpointFailures(_ target: String, _ fault: String, _ step: String, _ errorClass: String) async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                local good = colo.checkpoint(p, s)
                test.fault()
                local ok, err = pcall(colo.checkpoint, p, s)
                assert(not ok, "the checkpoint should fail")
                assert(err.step == "\#(step)", "step: " .. tostring(err.step) .. " / " .. tostring(err))
                assert(err.class == "\#(errorClass)", "class: " .. tostring(err.class) .. " / " .. tostring(err))
                assert(err.last_good == good.generation)
                assert(err.generation == good.generation + 1)
                local gens = colo.generations(p, s)
                assert(#gens == 1 and gens[1].generation == 1 and gens[1].bytes == good.bytes)
                """#, domains: pair.domains,
                hooks: ["fault": { try (target == "web-p" ? pair.primary : pair.secondary).addFaults(parsing: fault) }]
            ) { options in
                // Long enough for a loaded machine running the whole suite; the hang row waits it out.
                options.domainOptions.commandTimeout = .seconds(2)
            }
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(run.report.failedCheckpoints == 1)
            let crashed = fault.contains("crash")
            if !crashed {
                #expect(pair.primary.runState == .running)
            }
            #expect(pair.secondary.runState == .running)
            // No partial or torn generation is left behind.
            let files = try GenerationStore.list(run.stateDirectory + "/checkpoints/web-p+web-s")
            #expect(files == ["gen-00000001.devstate"])
        }
    }
}
