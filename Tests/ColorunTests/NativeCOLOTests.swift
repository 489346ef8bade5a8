import ColorunTestSupport
import QEMULab
import QEMUSimulator
import Testing
@testable import Colorun

#if canImport(Glibc)
import Glibc
#endif

/// Whether /dev/kvm can be opened: QEMU 7.2's COLO deadlocks under TCG (docs/qemu-notes.md), so the
/// real native-COLO test needs KVM.
let kvmUsable: Bool = {
    let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
    if fd >= 0 { close(fd) } else { print("SKIP native COLO on real QEMU: /dev/kvm is not usable (QEMU 7.2's COLO deadlocks under TCG)") }
    return fd >= 0
}()

/// A primary and a secondary waiting for COLO (`-incoming unix:...`), both with KVM.
struct KVMCOLOPair {
    let primary: QEMUInstance
    let secondary: QEMUInstance
    let migrationURI: String

    init() throws {
        let migration = makeTempDirectory("colorun-colo") + "/colo.mig"
        migrationURI = "unix:\(migration)"
        primary = try QEMUInstance.start(QEMUSpec(accelerator: "kvm"))
        secondary = try QEMUInstance.start(QEMUSpec(accelerator: "kvm", incoming: migrationURI))
    }

    var domains: [(String, String)] {
        [("primary", "unix:\(primary.qmpSocketPath)"), ("secondary", "unix:\(secondary.qmpSocketPath)")]
    }

    /// Stops both QEMUs (SIGKILL after a grace period) and waits until they are gone.
    func stop() async {
        await primary.stop()
        await secondary.stop()
    }
}

/// Runs `body` with a fresh KVM COLO pair; both QEMUs are gone before this returns, also when
/// `body` throws.
func withKVMCOLOPair<T>(_ body: (KVMCOLOPair) async throws -> T) async throws -> T {
    let pair = try KVMCOLOPair()
    do {
        let result = try await body(pair)
        await pair.stop()
        return result
    } catch {
        await pair.stop()
        throw error
    }
}

@Suite(.serialized, .timeLimit(.minutes(3)), .machine(.exclusive)) struct NativeCOLOTests {
    /// The helpers' errors and the failover against the simulator (which has COLO modes).
    @Test func failoverOnASimulatedSecondary() async throws {
        try await withSimulatedPair { pair in
            pair.secondary.setCOLOMode(.secondary)
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                local ok, err = pcall(colo.native.failover, p)
                assert(not ok and err.desc == "The feature 'colo' is not enabled", tostring(err))
                local exited = false
                colo.native.on_exit(s, function(ev) exited = ev.data.reason == "request" end)
                assert(colo.native.status(s).mode == "secondary")
                colo.native.failover(s)
                local st = colo.native.status(s)
                assert(st.mode == "none" and st["last-mode"] == "secondary" and st.reason == "request", json.encode(st))
                for i = 1, 2000 do   -- the COLO_EXIT event is on its way: wait for it (10 s at most)
                  if exited then break end
                  sleep("5ms")
                end
                assert(exited, "COLO_EXIT reached the handler")
                assert(s:status().running)
                policy.stop()
                """#, domains: pair.domains)
            guard case .stopped = run.report.outcome else {
                Issue.record("\(run.report.outcome)")
                return
            }
            #expect(run.report.failovers == 1)
        }
    }

    /// Real QEMU with KVM: replication starts, the primary is killed, the secondary takes over.
    @Test(.enabled(if: kvmUsable, "needs /dev/kvm: QEMU 7.2's COLO deadlocks under TCG"))
    func nativeCOLOFailoverOnRealQEMU() async throws {
        try await withKVMCOLOPair { pair in
            let clock = FailoverClock()
            let run = try await runPolicy(#"""
                local p, s = domain.get("primary"), domain.get("secondary")
                local st = colo.native.start(p, s, {uri = "\#(pair.migrationURI)", delay = "100ms"})
                assert(st.mode == "primary")
                assert(colo.native.status(s).mode == "secondary")
                sleep("400ms")   -- a few COLO checkpoints
                policy.on_lost(p, function()
                  colo.native.failover(s)
                  -- the secondary leaves COLO and runs (a few ms)
                  for i = 1, 400 do
                    if s:status().running then break end
                    sleep("5ms")
                  end
                  assert(s:status().running, "the secondary runs on its own: " .. s:status().status)
                  test.done()
                  policy.stop()
                end, {heartbeat = "50ms", timeout = "200ms"})
                test.kill()
                """#, domains: pair.domains,
                hooks: ["kill": { clock.mark(); pair.primary.kill(SIGKILL) }, "done": { clock.done() }])
            guard case .stopped = run.report.outcome else {
                Issue.record("\(run.report.outcome)\n\(run.logs.text)")
                return
            }
            #expect(run.report.failovers == 1)
            let elapsed = try #require(clock.elapsed)
            print("native COLO: kill to secondary running in \(elapsed)")
            #expect(elapsed < .seconds(1))
        }
    }
}
