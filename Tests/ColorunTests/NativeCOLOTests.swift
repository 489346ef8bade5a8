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

/// Runs `body` with a fresh COLO lab (KVM, COLO-shaped QEMUs); its QEMUs are gone when
/// this returns, also when `body` throws.
func withCOLOLab<T>(bootSector: [UInt8] = CountingGuest.bootSector, _ body: (Lab, COLOLab) async throws -> T) async throws -> T {
    let colo = try COLOLab(bootSector: bootSector)
    let lab = try Lab(colo: colo)
    do {
        let result = try await body(lab, colo)
        await lab.stopAll()
        return result
    } catch {
        await lab.stopAll()
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

    /// The layout check, on plain (not COLO-shaped) QEMU under TCG: it names what is missing
    /// and where the layout comes from, and colo.native.start refuses before touching either.
    @Test func layoutCheckNamesWhatIsMissing() async throws {
        let lab = try Lab(names: ["primary", "secondary"])
        let run = try await runPolicy(#"""
            local p, s = domain.get("primary"), domain.get("secondary")
            local ok, missing = colo.native.check(p, "primary")
            assert(not ok and missing[1]:find("no drive 'colo-disk0'", 1, true), json.encode(missing))
            ok, missing = colo.native.check(s, "secondary")
            assert(not ok and #missing == 4, json.encode(missing))
            assert(missing[2]:find("no drive 'parent0'", 1, true) and missing[3]:find("no replication node", 1, true)
              and missing[4]:find("not waiting for the migration", 1, true), json.encode(missing))
            local ok2, err = pcall(colo.native.start, p, s, {uri = "unix:/nonexistent", nbd = "127.0.0.1:1", net = "127.0.0.1:2"})
            assert(not ok2, "start refused")
            log.info("start: " .. tostring(err))
            assert(tostring(err):find("colorun colo-args primary", 1, true), tostring(err))
            for _, c in ipairs(qmp.execute(p, "query-chardev")) do assert(not c.label:find("^colo"), "nothing was added") end
            local ok3, err3 = pcall(colo.native.start, p, s, {uri = "unix:/x", nbd = "nohost", net = "127.0.0.1:2"})
            assert(not ok3 and tostring(err3):find("'nbd' must be HOST:PORT", 1, true), tostring(err3))
            policy.stop()
            """#, lab: lab)
        guard case .stopped = run.report.outcome else {
            Issue.record("\(run.report.outcome)\n\(run.logs.text)")
            return
        }
        #expect(run.logs.text.contains("is not COLO-shaped for the primary: no drive 'colo-disk0'"), "\(run.logs.text)")
    }

    /// Real QEMU with KVM: a write checkpointed before the primary dies is on the promoted
    /// secondary; a write after the last checkpoint is rolled back (x-checkpoint-delay 60 s,
    /// so no periodic checkpoint comes between), as COLO says.
    @Test(.enabled(if: kvmUsable, "needs /dev/kvm: QEMU 7.2's COLO deadlocks under TCG"))
    func writeAfterTheLastCheckpointIsRolledBack() async throws {
        try await withCOLOLab { lab, _ in
            let run = try await runPolicy(#"""
                local p, s = domain.get("primary"), domain.get("secondary")
                local a = lab.colo(s)
                colo.native.start(p, s, {uri = a.uri, nbd = a.nbd, net = a.net, delay = "60s"})
                local function hmp(line) qmp.execute(p, "human-monitor-command", {["command-line"] = line}) end
                hmp('qemu-io colo-disk0 "write -P 0x5a 0 64k"')
                colo.native.checkpoint(p)
                hmp('qemu-io colo-disk0 "write -P 0xa5 64k 64k"')
                assert(lab.disk_pattern(p, 65536, 65536) == 0xa5, "the primary has the late write")
                lab.kill(p)
                local f = colo.native.failover(s)
                assert(f.running and f.failed == 0, json.encode(f))
                assert(colo.native.status(s).mode == "none")
                local early, late = lab.disk_pattern(s, 0, 65536), lab.disk_pattern(s, 65536, 65536)
                log.info("after failover", {early = early, late = late})
                assert(early == 0x5a, "the checkpointed write is on the secondary: " .. early)
                assert(late == 0, "the write after the last checkpoint is rolled back: " .. late)
                policy.stop()
                """#, lab: lab)
            guard case .stopped = run.report.outcome else {
                Issue.record("\(run.report.outcome)\n\(run.logs.text)")
                return
            }
            #expect(run.report.failovers == 1)
        }
    }
}
