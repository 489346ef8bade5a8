import ColorunTestSupport
import QEMULab
import QEMUSimulator
import QMP
import Testing
@testable import Colorun

#if canImport(Glibc)
import Glibc
#endif

/// The fault matrix (issue 7 §3). Each row ends with every VM running (or, after a failover,
/// the chosen one running), no torn generation file, and a clear log line.
///
/// Rows covered elsewhere: a reply that never comes, a save that fails, the secondary
/// dropping mid-restore, the primary crashing mid-save (simulator) — `xenCheckpointFailures`
/// in PolicyAPISimulatorTests; colorun SIGTERMed or SIGKILLed mid-checkpoint and restarted —
/// `CrashSafetyTests` in ColorunCLITests.
@Suite(.timeLimit(.minutes(5)), .machine(.exclusive)) struct FaultMatrixTests {
    /// Only complete generations, no partial files.
    func expectNoTornFiles(_ run: PolicyRun, series: String) throws {
        let files = (try? GenerationStore.list(run.stateDirectory + "/checkpoints/" + series)) ?? []
        #expect(files.allSatisfy { $0.hasPrefix("gen-") && !$0.hasSuffix(".partial") }, "\(files)")
        for file in files where !file.hasSuffix(".manifest.json") {
            #expect(throws: Never.self) {
                try GenerationStore.validate(path: run.stateDirectory + "/checkpoints/" + series + "/" + file, magic: CheckpointEngine.stateMagic)
            }
        }
    }

    @Test func secondaryKilledMidRestore() async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                colo.checkpoint(p, s)
                test.fault()
                local ok, err = pcall(colo.checkpoint, p, s)
                assert(not ok and err.step == "restore" and err.class == "Disconnected", tostring(err))
                assert(p:status().running, "the primary runs on")
                """#, domains: pair.domains, hooks: ["fault": { try pair.secondary.addFaults(parsing: "xen-load-devices-state:crash") }])
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(pair.primary.runState == .running)
            #expect(!pair.secondary.isAlive)
            #expect(run.report.unresumed.isEmpty, "a dead secondary has nothing paused: \(run.report.unresumed)")
            #expect(run.logs.contains("checkpoint failed"))
            try expectNoTornFiles(run, series: "web-p+web-s")
        }
    }

    /// The primary SIGKILLed while its whole-VM checkpoint is being written (real QEMU, a
    /// migration slowed to a crawl): the partial file goes, the last good generation stays,
    /// and the standby restored from it runs.
    @Test func primaryKilledMidMigrationThenFailover() async throws {
        let lab = try Lab(names: ["primary"])
        let run = try await runPolicy(#"""
            local p = domain.get("primary")
            local good = remus.checkpoint(p)
            p:execute("migrate-set-parameters", {["max-bandwidth"] = 20000})   -- 20 kB/s
            policy.after("300ms", function() lab.kill(p) end)
            local ok, err = pcall(remus.checkpoint, p)
            assert(not ok and err.step == "migrate", tostring(err))
            assert(err.last_good == good.generation)
            local s = remus.restore{name = "standby", from = p, lab = true}
            assert(s:status().running)
            """#, lab: lab) { $0.domainOptions.commandTimeout = .seconds(3) }
        #expect(run.failure == nil, "\(run.failure ?? "")\n\(run.logs.text)")
        #expect(run.report.failovers == 1)
        #expect(run.report.unresumed.isEmpty)
        try expectNoTornFiles(run, series: "primary")
    }

    /// A QEMU frozen (SIGSTOP) during a checkpoint and thawed 4 s later ends running:
    /// the checkpoint fails at `stop` (timeout), and colorun keeps sending `cont` until the
    /// VM runs.
    @Test func frozenDuringACheckpointThenThawed() async throws {
        let lab = try Lab(names: ["primary"])
        let run = try await runPolicy(#"""
            local p = domain.get("primary")
            remus.checkpoint(p)
            lab.freeze(p)
            policy.after("4s", function() lab.thaw(p) end)
            -- No disks or output buffers to look up first: the freeze hits the `stop` itself.
            local ok, err = pcall(remus.checkpoint, p, {disks = false, output_commit = false})
            assert(not ok and err.class == "Timeout", tostring(err))
            for i = 1, 100 do
              sleep("100ms")
              local ok, st = pcall(p.status, p)      -- fails while the QEMU is frozen
              if ok and st.running then break end
            end
            assert(p:status().running, "running again after the thaw")
            """#, lab: lab) {
                $0.domainOptions.commandTimeout = .milliseconds(700)
                $0.domainOptions.connectTimeout = .milliseconds(700)
            }
        #expect(run.failure == nil, "\(run.failure ?? "")\n\(run.logs.text)")
        #expect(run.logs.contains("checkpoint failed"))
        #expect(run.logs.contains("retrying until it runs"), "the freeze outlasts the checkpoint's own retries")
        #expect(run.report.unresumed.isEmpty)
        try expectNoTornFiles(run, series: "primary")
    }

    @Test func stateDirectoryUnwritable() async throws {
        try await withSimulatedPair { pair in
            let base = makeTempDirectory("colorun-ro")
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                local ok, err = pcall(colo.checkpoint, p, s)
                assert(not ok and err.class == "StateDirError", tostring(err))
                """#, domains: pair.domains, stateDirectory: base) { _ in
                // Make the checkpoints directory a file: nothing can be created under it.
                writeFile(base + "/checkpoints", [0x78])
            }
            #expect(run.failure == nil, "\(run.failure ?? "")")
            // Nothing was stopped: the state directory is checked first.
            #expect(!pair.primary.commandLog.contains(where: { $0.name == "stop" }))
            #expect(pair.primary.runState == .running && pair.secondary.runState == .running)
        }
    }

    /// The policy stops a VM, then errors, loops forever or exhausts memory: the run ends
    /// and colorun resumes the VM it stopped.
    @Test(arguments: [
        ("error('boom')", "boom"),
        ("while true do end", "time limit exceeded"),
        ("local t, s = {}, ('x'):rep(1 << 20) for i = 1, 1e9 do t[i] = s .. i end", "not enough memory"),
    ])
    func policyBreaksInsideACheckpointCallback(_ body: String, _ message: String) async throws {
        try await withSimulatedPair { pair in
            let run = try await runPolicy("""
                local p, s = domain.get("web-p"), domain.get("web-s")
                policy.every("50ms", function()
                  colo.checkpoint(p, s)
                  qmp.stop(p)
                  \(body)
                end)
                """, domains: pair.domains) {
                    $0.lua.timeLimit = .milliseconds(300)
                    $0.lua.memoryLimit = 16 << 20
                }
            let failure = try #require(run.failure)
            #expect(failure.contains(message), "\(failure)")
            #expect(run.report.resumedAtExit == ["web-p"])
            #expect(pair.primary.runState == .running && pair.secondary.runState == .running)
            try expectNoTornFiles(run, series: "web-p+web-s")
        }
    }

    /// A hostile monitor during a checkpoint: junk, an over-long line, a reply with an id
    /// nobody sent, or a flood of events while the reply is due.
    @Test(arguments: [
        ("xen-save-devices-state:junk=not json at all", false, "ProtocolError", 5),
        ("xen-save-devices-state:oversized=17000000", false, "ProtocolError", 20),
        ("xen-save-devices-state:wrong-id", false, "ProtocolError", 5),
        ("xen-save-devices-state:flood=5000", true, "", 20),
    ])
    func hostilePeerDuringACheckpoint(_ fault: String, _ succeeds: Bool, _ errorClass: String, _ timeout: Int64) async throws {
        try await withSimulatedPair { pair in
            try pair.primary.addFaults(parsing: fault + ",count=1")
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                local ok, r = pcall(colo.checkpoint, p, s)
                if \#(succeeds) then
                  assert(ok, tostring(r))
                else
                  assert(not ok and r.class == "\#(errorClass)", tostring(r))
                end
                assert(p:status().running and s:status().running)
                local again = colo.checkpoint(p, s)   -- and the next one works
                """#, domains: pair.domains) { $0.domainOptions.commandTimeout = .seconds(timeout) }
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(pair.primary.runState == .running && pair.secondary.runState == .running)
            try expectNoTornFiles(run, series: "web-p+web-s")
        }
    }
}
