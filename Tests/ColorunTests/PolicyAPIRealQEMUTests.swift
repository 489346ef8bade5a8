import ColorunSystem
import ColorunTestSupport
import QEMULab
import Testing
@testable import Colorun

#if canImport(Glibc)
import Glibc
#endif

/// The policy API against real QEMU (TCG), started by the tests through the lab.
@Suite(.serialized, .timeLimit(.minutes(3)), .machine(.exclusive)) struct PolicyAPIRealQEMUTests {
    @Test func stopSaveResumeOnRealQEMU() async throws {
        let lab = try Lab(names: ["primary"])
        let statePath = makeTempDirectory("colorun-save") + "/dev.state"
        let run = try await runPolicy(#"""
            local d = domain.get("primary")
            d:stop()
            assert(d:status().status == "paused")
            d:save("\#(statePath)", {live = false})
            d:resume()
            assert(d:status().running)
            local ok, err = pcall(d.restore, d, "\#(statePath)")
            assert(not ok and err.class == "GenericError" and err.desc == "Cannot update device state while vm is running", tostring(err))
            """#, lab: lab)
        #expect(run.failure == nil, "\(run.failure ?? "")")
        let bytes = try readFile(statePath)
        #expect(Array(bytes.prefix(4)) == Array("QEVM".utf8))
    }

    /// A Remus checkpoint and a restore: the restored guest's counter is exactly the
    /// checkpoint's, and it counts on once resumed.
    @Test func remusCheckpointAndRestoreContinueTheGuest() async throws {
        let lab = try Lab(names: ["primary"])
        let run = try await runPolicy(#"""
            local p = domain.get("primary")
            local waited = 0
            while lab.counter(p) == 0 and waited < 100 do sleep("50ms"); waited = waited + 1 end
            p:stop()
            local at_checkpoint = lab.counter(p)
            local r = remus.checkpoint(p, {keep = 2})
            assert(r.generation == 1 and r.bytes > 100000, "a whole-VM checkpoint")
            assert(p:status().running, "the primary runs again")
            assert(at_checkpoint > 0, "the guest was counting")
            lab.kill(p)
            local s, info = remus.restore({name = "standby", from = p, lab = true, paused = true})
            assert(info.generation == 1)
            local restored = lab.counter(s)
            assert(restored == at_checkpoint, ("restored counter %d, checkpoint %d"):format(restored, at_checkpoint))
            s:resume()
            for i = 1, 400 do   -- the resumed guest counts on (10 s at most on a loaded machine)
              if lab.counter(s) > restored then break end
              sleep("25ms")
            end
            assert(lab.counter(s) > restored, "the standby counts on")
            """#, lab: lab)
        #expect(run.failure == nil, "\(run.failure ?? "")")
        #expect(run.report.checkpoints == 1)
        #expect(run.report.failovers == 1)
    }

    /// Failover: checkpoints every 100 ms, the primary is SIGKILLed, `policy.on_lost` restores
    /// the standby from the last good checkpoint; it runs within 1 s of the kill.
    @Test func failoverAfterSIGKILLWithinOneSecond() async throws {
        let lab = try Lab(names: ["primary"])
        let clock = FailoverClock()
        let run = try await runPolicy(#"""
            local p = domain.get("primary")
            -- The kill may land in a checkpoint: that one fails (caught), the failover goes on.
            local ticker = policy.every("100ms", function() pcall(remus.checkpoint, p) end)
            local killed_at
            policy.on_lost(p, function(_, reason)
              ticker.cancel()
              local s = remus.restore({name = "standby", from = p, lab = true})
              assert(s:status().running)
              local ms = (os.clock() - killed_at) * 1000
              log.info("failover done", {wall_ms = ms})
              test.record_failover(ms)
              policy.stop()
            end, {heartbeat = "100ms", timeout = "500ms"})
            repeat sleep("50ms") until #remus.generations(p) >= 2   -- checkpoints exist before the kill
            killed_at = os.clock()
            test.mark_kill()
            lab.kill(p)
            """#, hooks: [
                "mark_kill": { clock.mark() },
                "record_failover": { clock.done() },
            ], lab: lab)
        #expect(run.failure == nil, "\(run.failure ?? "")")
        #expect(run.report.checkpoints >= 1)
        #expect(run.report.failovers == 1)
        let elapsed = try #require(clock.elapsed)
        #expect(elapsed < .seconds(1), "standby running \(elapsed) after the kill")
        print("failover: kill to standby running in \(elapsed)")
    }
}

/// Wall-clock time from the kill to the standby running, measured in Swift.
final class FailoverClock: @unchecked Sendable {
    private let lock = NSLockLike()
    private var killedAt: ContinuousClock.Instant?
    private(set) var elapsed: Duration?

    func mark() { lock.with { killedAt = .now } }
    func done() { lock.with { if let k = killedAt { elapsed = .now - k } } }
}

struct NSLockLike: @unchecked Sendable {
    private let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    init() { pthread_mutex_init(m, nil) }
    func with<T>(_ body: () -> T) -> T {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        return body()
    }
}
