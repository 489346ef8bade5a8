import ColorunTestSupport
import QEMULab
import Testing
@testable import Colorun

#if canImport(Glibc)
import Glibc
#endif

private let haveLinuxGuestTools =
    access("/usr/bin/qemu-system-x86_64", X_OK) == 0 && access("/usr/bin/qemu-img", X_OK) == 0
    && access("/bin/busybox", X_OK) == 0

/// Issue 15's proof, end to end on real QEMU (TCG): the Linux lab guest's ledger takes
/// numbered records from a client while colorun checkpoints it every 150 ms through a Lua
/// policy (examples/remus-ledger.lua, run through PolicySession as `colorun --lab --guest
/// linux` runs it), with disk snapshots and output commit; the primary is SIGKILLed, the
/// standby restored from the last good generation on a fresh overlay, the client reconnects
/// to the standby's new port. Every record the client saw acknowledged must be in the
/// standby's ledger; the last standby's disk, booted again, must pass the guest's e2fsck -fn.
/// Without output commit, a kill right after an ack loses that record: the check can fail.
///
/// Here and not in GuestTests because it needs colorun itself (the session, the lab,
/// remus.checkpoint/restore); GuestTests covers the guest alone.
@Suite(.serialized, .timeLimit(.minutes(8)), .machine(.exclusive), .enabled(if: haveLinuxGuestTools, "needs qemu-system-x86_64, qemu-img and busybox-static (scripts/setup)"))
struct RemusLedgerTests {
    /// The fields of the log events whose message is `message`.
    static func fields(_ run: PolicyRun, _ message: String) -> [[String: String]] {
        run.logs.records.filter { $0.message == message }.map { record in
            Dictionary(record.metadata.map { ($0.key, $0.value) }, uniquingKeysWith: { $1 })
        }
    }

    /// Output commit on, three kills at random moments (each round kills the standby the
    /// previous one restored): nothing acknowledged is lost, the ledger goes on, the
    /// filesystem is clean at the next boot. This is also the test of the example.
    @Test(.timeLimit(.minutes(4)))
    func noAcknowledgedRecordIsLostAcrossThreeFailovers() async throws {
        let lab = try await Lab.linux()
        let clock = ContinuousClock()
        let start = clock.now
        let run = try await runExample("remus-ledger.lua", lab: lab) { $0.arguments = ["rounds=3"] }
        print("remus-ledger, 3 rounds with output commit: \(clock.now - start)")
        #expect(run.failure == nil, "\(run.failure ?? "")\n\(run.logs.text)")
        let rounds = Self.fields(run, "failover round")
        #expect(rounds.count == 3, "\(run.logs.text)")
        var previous = 0
        for round in rounds {
            let acked = Int(round["acked"] ?? "") ?? 0
            #expect(acked > previous, "each round acknowledges new records: \(round)")
            #expect(round["lost"] == "0", "\(round)\n\(run.logs.text)")
            #expect(round["bad"] == "0", "\(round)")
            previous = acked
        }
        let summary = try #require(Self.fields(run, "remus-ledger summary").first, "\(run.logs.text)")
        print("remus-ledger rounds: \(rounds)\nsummary: \(summary)")
        #expect(summary["fsck"] == "clean", "\(summary)")
        #expect(summary["lost"] == "0" && summary["lost_at_reboot"] == "0" && summary["bad"] == "0", "\(summary)")
        #expect((Int(summary["acked"] ?? "") ?? 0) > previous, "the last standby's ledger went on taking records: \(summary)")
        #expect(run.report.failovers == 3)
        #expect(run.report.checkpoints >= 3)
    }

    /// Output commit off, each kill right after an ack whose record was written and
    /// acknowledged between two checkpoints: no generation holds that record, so the standby
    /// lacks it (every such round loses at least one), and the demo fails.
    @Test(.timeLimit(.minutes(4)))
    func withoutOutputCommitAnAcknowledgedRecordIsLost() async throws {
        let lab = try await Lab.linux()
        let run = try await runExample("remus-ledger.lua", lab: lab) {
            $0.arguments = ["rounds=2", "kill=after-ack", "output_commit=off"]
        }
        let rounds = Self.fields(run, "failover round")
        #expect(rounds.count == 2, "\(run.logs.text)")
        let lost = rounds.map { Int($0["lost_now"] ?? "") ?? 0 }
        print("remus-ledger without output commit, kill after an ack: lost \(lost) acknowledged records (rounds: \(rounds))")
        #expect(lost.contains { $0 > 0 }, "no acknowledged record was lost in \(rounds.count) rounds: \(rounds)")
        let between = rounds.filter { $0["kill"] == "between" }
        #expect(!between.isEmpty, "no kill came right after an ack between two checkpoints: \(rounds)")
        for round in between {
            #expect((Int(round["lost_now"] ?? "") ?? 0) >= 1, "killed after an ack no checkpoint held, yet nothing lost: \(round)")
        }
        #expect(run.failure?.contains("acknowledged record(s) lost") == true, "\(run.failure ?? "no failure")")
        // Losing records is not corrupting the filesystem: the disk is still consistent.
        let summary = try #require(Self.fields(run, "remus-ledger summary").first, "\(run.logs.text)")
        #expect(summary["fsck"] == "clean", "\(summary)")
    }
}
