import ColorunTestSupport
import Testing

@testable import Colorun

/// What a lab domain's connect failure says about its QEMU.
@Suite(.timeLimit(.minutes(1)), .machine(.exclusive)) struct LabDiagnosticsTests {
    /// The lab's QEMU killed: a later command's connect failure names the QEMU's pid and how
    /// it ended, not only the socket that refused.
    @Test func aConnectFailureSaysWhatBecameOfTheLabQEMU() async throws {
        let lab = try Lab(names: ["primary"])
        let run = try await runPolicy(#"""
            local p = domain.get("primary")
            assert(p:status().running)
            policy.on_lost(p, function()
              test.wait("qemu reaped")   -- the kernel has finished the kill: no race with a dying QEMU
              local ok, err = pcall(qmp.status, p)
              assert(not ok, "the status of a killed QEMU")
              log.warn("after the kill: " .. tostring(err))
              policy.stop()
            end)
            lab.kill(p)
            """#, checks: ["qemu reaped": { lab.instance(for: "primary")?.exitStatus != nil }], lab: lab)
        #expect(run.failure == nil, "\(run.failure ?? "")\n\(run.logs.text)")
        let line = run.logs.lines.first { $0.contains("after the kill:") } ?? ""
        #expect(line.contains("ConnectFailed"), "\(run.logs.text)")
        #expect(line.contains("its QEMU (pid ") && line.contains("killed by signal 9"), "\(line)")
    }
}
