import ColorunTestSupport
@testable import Colorun
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

    /// SIGKILL of a run with `--runtime-dir` that checkpoints as fast as it can, pipelined:
    /// whenever the kill comes, every generation the series' index lists is whole in its
    /// slot (length and CRC-32C), and the next run goes on from the last good one.
    @Test func aStagedRunKilledWhileCommittingLeavesOnlyWholeGenerations() async throws {
        try await withSimulatedPair { pair in
            let dir = makeTempDirectory("colorun-crash-staged")
            let state = dir + "/state", runtime = dir + "/runtime"
            let series = state + "/checkpoints/web-p+web-s"
            let policy = writePolicy("""
                local p, s = domain.get("web-p"), domain.get("web-s")
                while true do colo.checkpoint(p, s, {keep = 2, pipeline = true}) end
                """, in: dir)
            var last = 0
            for round in 1...3 {
                let run = try ColorunProcess([policy, "--state-dir", state, "--runtime-dir", runtime] + pair.domainArguments)
                // Killed once it has committed a few more generations (the index says so).
                try await waitUntil("generation \(last + 20) committed (round \(round))", timeout: .seconds(30)) {
                    ((try? GenerationStore(directory: series, fileExtension: "devstate").lastGood) ?? 0) >= last + 20
                }
                run.signal(SIGKILL)
                #expect(await run.wait(timeout: 10).code != 0)
                let fd = open(series + "/" + GenerationIndex.fileName, O_RDONLY)
                let record = try #require(GenerationIndex.read(fd)?.record)
                close(fd)
                #expect(!record.entries.isEmpty)
                for entry in record.entries {
                    let problem = GenerationStore.check(entry, path: series + "/slot-\(entry.slot).devstate")
                    #expect(problem == nil, "round \(round): generation \(entry.generation): \(problem ?? "")")
                }
                let reopened = try GenerationStore(directory: series, fileExtension: "devstate")
                let newest = try #require(reopened.lastGood)
                #expect(newest >= last + 20 && newest == record.entries.map(\.generation).max())
                last = newest
            }
            // The next run resumes the domains the kill left paused and numbers on from the last good one.
            let check = writePolicy("""
                local r = colo.checkpoint(domain.get("web-p"), domain.get("web-s"), {keep = 2})
                assert(r.generation > \(last), r.generation)
                """, in: dir, name: "check.lua")
            let next = try await runColorun([check, "--state-dir", state, "--runtime-dir", runtime] + pair.domainArguments)
            #expect(next.code == 0, "\(next.stderr)")
            #expect(pair.primary.runState == .running && pair.secondary.runState == .running)
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
