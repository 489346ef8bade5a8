import ColorunTestSupport
import ColorunSystem
import QEMULab
import Testing
@testable import Colorun

#if canImport(Glibc)
import Glibc
#endif

/// `remus.checkpoint{disks=, output_commit=}` and `remus.restore` with disks, from a policy:
/// the options reach the engine, a standby command line that opens a checkpointed disk
/// itself is refused, and the standby colorun starts runs on a fresh overlay over the
/// generation's frozen image. Real QEMU under TCG.
@Suite(.serialized, .timeLimit(.minutes(3)), .machine(.exclusive)) struct RemusDiskPolicyTests {
    @Test func policyCheckpointsAndRestoresADisk() async throws {
        let rig = try RemusDiskTests.Rig()
        let (lua, socket) = rig.standbyCommandLine()
        let primary = rig.primary
        var standbyPID: pid_t?
        do {
            let run = try await runPolicy(#"""
                local p = domain.get("primary")
                local function hmp(d, line) return qmp.execute(d, "human-monitor-command", {["command-line"] = line}) end
                hmp(p, 'qemu-io -d vd0 "write -P 34 1048576 4k"')
                local ok, err = pcall(remus.checkpoint, p, {disks = {"nope"}})
                assert(not ok and err.class == "NoSuchDisk" and err.step == "prepare", tostring(err))
                local bare = remus.checkpoint(p, {disks = false, output_commit = false})
                assert(#bare.disks == 0 and #bare.output_commit == 0, json.encode(bare))
                local r = remus.checkpoint(p, {keep = 2, disks = {"vd0"}})
                assert(#r.disks == 1 and r.disks[1].device == "vd0", json.encode(r))
                assert(#remus.generations(p) == 2)
                hmp(p, 'qemu-io -d vd0 "write -P 51 1048576 4k"')
                test.kill()
                repeat sleep("20ms") until not p:alive("200ms")

                local argv = \#(lua)
                local own = {table.unpack(argv)}
                own[#own + 1] = "-blockdev"
                own[#own + 1] = "driver=qcow2,node-name=d0,file.driver=file,file.filename=\#(rig.base)"
                local ok, err = pcall(remus.restore, {name = "bad", from = p, qemu = own, qmp = "unix:\#(socket)"})
                assert(not ok and tostring(err):find("opens checkpointed disk 'vd0' itself", 1, true), tostring(err))

                local s, info = remus.restore{name = "standby", from = p, paused = true, qemu = argv, qmp = "unix:\#(socket)"}
                assert(info.generation == r.generation)
                assert(s:status().status == "paused")
                """#, domains: [("primary", "unix:\(primary.qmpSocketPath)")], stateDirectory: rig.directory + "/state",
                hooks: ["kill": { primary.kill(SIGKILL) }])
            standbyPID = Self.standbyPID(run.logs.text)
            #expect(run.failure == nil, "\(run.failure ?? "")\n\(run.logs.text)")
            #expect(standbyPID != nil)
            let overlays = try listDirectory(rig.directory + "/state/standby/standby").filter { $0.hasSuffix(".qcow2") }
            #expect(overlays.count == 1)
            if let overlay = overlays.first.map({ rig.directory + "/state/standby/standby/" + $0 }) {
                #expect(try RemusDiskTests.holds(overlay, pattern: 34))
                #expect(!(try RemusDiskTests.holds(overlay, pattern: 51)))
            }
        } catch {
            if let standbyPID { kill(standbyPID, SIGKILL) }
            await rig.tearDown()
            throw error
        }
        if let standbyPID { kill(standbyPID, SIGKILL) }
        await rig.tearDown()
    }

    /// Output commit is on by default for a domain with a NIC, and the end of the run removes
    /// the buffer (releasing what it held) from a primary that lives on.
    @Test func outputBufferIsRemovedAtTheEndOfTheRun() async throws {
        let rig = try RemusDiskTests.Rig(nic: true)
        do {
            let run = try await runPolicy(#"""
                local p = domain.get("primary")
                local r = remus.checkpoint(p)
                assert(#r.output_commit == 1 and r.output_commit[1] == "n0", json.encode(r))
                assert(#r.disks == 1, json.encode(r))
                local status = qmp.execute(p, "qom-get", {path = "/objects/colorun-buffer-n0", property = "status"})
                assert(status == "on", tostring(status))
                """#, domains: [("primary", "unix:\(rig.primary.qmpSocketPath)")], stateDirectory: rig.directory + "/state")
            #expect(run.failure == nil, "\(run.failure ?? "")\n\(run.logs.text)")
            let objects = try await RemusDiskTests.objects(rig.domain)
            #expect(!objects.contains("colorun-buffer-n0"), "\(objects)")
            #expect(try await RemusDiskTests.hmp(rig.domain, "info status").contains("running"))
        } catch {
            await rig.tearDown()
            throw error
        }
        await rig.tearDown()
    }

    /// The detached standby's pid, from the restore's log line.
    static func standbyPID(_ logs: String) -> pid_t? {
        for line in logs.split(separator: "\n") where line.contains("restoring a standby") {
            guard let range = line.firstRange(of: "pid=") else { continue }
            return pid_t(line[range.upperBound...].prefix { $0.isNumber })
        }
        return nil
    }
}
