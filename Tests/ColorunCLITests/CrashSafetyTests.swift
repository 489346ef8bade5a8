import ColorunTestSupport
import Foundation
import QEMUSimulator
import Testing

/// colorun itself killed in the middle of a checkpoint (issue 6 §3, the fault matrix).
@Suite(.serialized, .timeLimit(.minutes(3)), .machine(.exclusive)) struct CrashSafetyTests {
    /// SIGKILL leaves the VMs it stopped stopped; the next run resumes them from the
    /// journal and says so.
    @Test func aRunKilledMidCheckpointIsRepairedByTheNext() async throws {
        try await withSimulatedPair { pair in
            // Each save takes 5 s: the kill comes while both domains are stopped.
            pair.primary.addFault(SimulatedFault("xen-save-devices-state", .delay(.seconds(5))))
            let dir = makeTempDirectory("colorun-crash")
            let state = dir + "/state"
            let policy = writePolicy("""
                local p, s = domain.get("web-p"), domain.get("web-s")
                policy.every("100ms", function() colo.checkpoint(p, s) end)
                """, in: dir)
            let first = try ColorunProcess([policy, "--state-dir", state] + pair.domainArguments)
            // The kill comes once the checkpoint has stopped both and its save is in flight.
            try await waitUntil("both domains stopped and the save in flight", timeout: .seconds(20)) {
                pair.primary.runState == .paused && pair.secondary.runState == .paused
                    && pair.primary.commandLog.contains { $0.name == "xen-save-devices-state" }
            }
            first.signal(SIGKILL)
            let killed = await first.wait(timeout: 10)
            #expect(killed.code != 0)
            // The journal holds both; the VMs stay paused: nothing else resumes them.
            #expect(try stoppedInJournal(state) == ["web-p", "web-s"])
            #expect(pair.primary.runState == .paused)
            // No torn generation is visible.
            let checkpoints = (try? FileManager.default.contentsOfDirectory(atPath: state + "/checkpoints/web-p+web-s")) ?? []
            #expect(checkpoints.allSatisfy { !$0.hasPrefix("gen-") || $0.hasSuffix(".devstate") })

            pair.primary.clearFaults()
            let check = writePolicy("assert(domain.get('web-p'):status().running)\nassert(domain.get('web-s'):status().running)\n", in: dir, name: "check.lua")
            let second = try await runColorun([check, "--state-dir", state] + pair.domainArguments)
            #expect(second.code == 0, "\(second.stderr)")
            #expect(second.stderr.contains("resumed a domain that a previous colorun run left paused"), "\(second.stderr)")
            #expect(pair.primary.runState == .running && pair.secondary.runState == .running)
            #expect(try stoppedInJournal(state).isEmpty)
        }
    }

    /// SIGTERM mid-checkpoint: the checkpoint finishes (or rolls back), both run, exit 0.
    @Test func sigtermMidCheckpointLetsItFinish() async throws {
        try await withSimulatedPair { pair in
            let (process, dir) = try await colorunMidCheckpoint(pair, saveDelay: .milliseconds(800), tag: "colorun-term")
            process.signal(SIGTERM)
            let result = await process.wait(timeout: 15)
            #expect(result.code == 0, "\(result.stderr)")
            #expect(result.stderr.contains("in-flight checkpoint"))
            #expect(pair.primary.runState == .running && pair.secondary.runState == .running)
            #expect(result.stdout.contains("checkpoints:"))
            // The in-flight checkpoint completed: its generation is the last good one.
            let gens = try FileManager.default.contentsOfDirectory(atPath: dir + "/state/checkpoints/web-p+web-s")
            #expect(gens == ["gen-00000001.devstate"])
        }
    }
}

/// The domains the stop journal records as stopped.
func stoppedInJournal(_ state: String) throws -> [String] {
    let dir = state + "/journal"
    return try FileManager.default.contentsOfDirectory(atPath: dir).sorted().compactMap { name in
        let text = try String(contentsOfFile: dir + "/" + name, encoding: .utf8)
        return text.contains(#""state":"stopped""#) ? String(name.dropLast(".journal".count)) : nil
    }
}
