import ColorunSystem
import ColorunTestSupport
import QEMULab
import Testing
@testable import Colorun

#if canImport(Glibc)
import Glibc
#endif

/// What remus.restore leaves in `<state-dir>/standby/<name>/`: the overlays of a standby
/// that runs (its disk), and nothing of one that failed to come up.
@Suite(.serialized, .timeLimit(.minutes(3)), .machine(.exclusive)) struct RemusRestoreCleanupTests {
    @Test func overlayFilesAreReadFromTheBlockdevArguments() {
        let arguments = [
            "-blockdev", "driver=qcow2,node-name=d0,file.driver=file,file.filename=/s/standby/a,,b/d0-gen00000001-x.qcow2",
            "-blockdev", "driver=qcow2,node-name=d1,file.driver=file,file.filename=/s/d1.qcow2",
        ]
        #expect(RemusDisks.overlayFiles(arguments) == ["/s/standby/a,b/d0-gen00000001-x.qcow2", "/s/d1.qcow2"])
        #expect(RemusDisks.overlayFiles(["-m", "64"]).isEmpty)
    }

    /// A standby whose QEMU never answers: the restore fails, the process is killed, and the
    /// overlay made for it is deleted. The restore made the overlay (qemu-img ran: the
    /// directory exists), and a later restore of the same generation works.
    @Test func aStandbyThatFailsToComeUpLeavesNoOverlay() async throws {
        let rig = try RemusDiskTests.Rig()
        let (lua, socket) = rig.standbyCommandLine()
        let primary = rig.primary
        var standbyPID: pid_t?
        do {
            let run = try await runPolicy(#"""
                local p = domain.get("primary")
                local r = remus.checkpoint(p, {keep = 2})
                assert(#r.disks == 1, json.encode(r))
                test.kill()
                repeat sleep("20ms") until not p:alive("200ms")
                -- /bin/sleep opens no monitor: the bring-up cannot connect.
                local ok, err = pcall(remus.restore, {name = "bad", from = p, qemu = {"/bin/sleep", "30"}, qmp = "unix:\#(socket).none"})
                assert(not ok, "the restore of a standby with no monitor failed")
                local s, info = remus.restore{name = "good", from = p, paused = true, qemu = \#(lua), qmp = "unix:\#(socket)"}
                assert(info.generation == r.generation)
                """#, domains: [("primary", "unix:\(primary.qmpSocketPath)")], stateDirectory: rig.directory + "/state",
                hooks: ["kill": { primary.kill(SIGKILL) }])
            standbyPID = RemusDiskPolicyTests.standbyPID(run.logs.lines.filter { $0.contains("domain=good") }.joined(separator: "\n"))
            #expect(run.failure == nil, "\(run.failure ?? "")\n\(run.logs.text)")
            let bad = try listDirectory(rig.directory + "/state/standby/bad")
            #expect(bad.filter { $0.hasSuffix(".qcow2") }.isEmpty, "\(bad)")
            let good = try listDirectory(rig.directory + "/state/standby/good")
            #expect(good.filter { $0.hasSuffix(".qcow2") }.count == 1, "\(good)")
        } catch {
            if let standbyPID { kill(standbyPID, SIGKILL) }
            await rig.tearDown()
            throw error
        }
        if let standbyPID { kill(standbyPID, SIGKILL) }
        await rig.tearDown()
    }
}
