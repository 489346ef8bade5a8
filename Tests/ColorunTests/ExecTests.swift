import ColorunTestSupport
import Testing
@testable import Colorun

/// `exec.run`: a colorun binding (site hooks), off unless the run allows it.
@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct ExecTests {
    @Test func execRunCapturesOutputStatusAndTimesOut() async throws {
        let run = try await runPolicy(#"""
            local r = exec.run{"/bin/echo", "hello", "world"}
            assert(r.status == 0 and r.ok == true and r.stdout == "hello world\n", json.encode(r))
            local r2 = exec.run{"sh", "-c", "echo err >&2; exit 3"}
            assert(r2.status == 3 and r2.ok == false and r2.stderr == "err\n", json.encode(r2))
            local ok, e = pcall(exec.run, {"/bin/sleep", "5", timeout = "200ms"})
            assert(not ok and e:find("policy.lua:5: exec.run: /bin/sleep timed out after 200ms", 1, true), tostring(e))
            local ok2, e2 = pcall(exec.run, {"/bin/echo", 7})
            assert(not ok2 and tostring(e2):find("argv[2] must be a string", 1, true), tostring(e2))
            log.info("exec checks passed")
            """#) { $0.allowExec = true }
        #expect(run.failure == nil, "\(run.failure ?? "")")
        #expect(run.logs.contains("exec checks passed"))
    }

    @Test func execRunIsRefusedUnlessAllowed() async throws {
        let run = try await runPolicy(#"""
            local ok, e = pcall(exec.run, {"/bin/true"})
            assert(not ok and e:find("policy.lua:1: exec.run is disabled: start colorun with --allow-exec to let policies run commands", 1, true), tostring(e))
            log.info("refused")
            """#)
        #expect(run.failure == nil, "\(run.failure ?? "")")
        #expect(run.logs.contains("refused"))
    }
}
