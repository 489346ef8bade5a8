import JSON
import LuaRuntime
import Testing

extension LuaRuntimeSuite {
@Suite struct BasicTests {
    @Test func printsAndFinishes() async throws {
        let r = try await runPolicy(#"print("hello", 1, 2.5, nil, true)"#)
        #expect(r.finished, "\(r.outcome)")
        #expect(r.printed == ["hello\t1\t2.5\tnil\ttrue"])
    }

    @Test func runtimeErrorReportsFileLine() async throws {
        let r = try await runPolicy("local x = 1\nlocal y = nil\nreturn y.z\n")
        let f = try #require(r.failure)
        #expect(f.message.hasSuffix("policy.lua:3: attempt to index a nil value (local 'y')"), "\(f.message)")
        #expect(f.traceback.contains("stack traceback"))
        #expect(f.traceback.contains("policy.lua:3"))
    }

    @Test func syntaxErrorReportsFileLine() async throws {
        let r = try await runPolicy("local x = 1\nlocal = 2\n")
        let f = try #require(r.failure)
        #expect(f.message.contains("policy.lua:2:"), "\(f.message)")
    }

    @Test func sleepAndTasks() async throws {
        let r = try await runPolicy("""
            local t = task.spawn(function(a, b) sleep("10ms"); return a + b end, 1, 2)
            sleep(0.001)
            print(t:wait())
            local x, y = task.all(function() sleep("2ms") return "a" end, function() return "b" end)
            print(x, y)
            """)
        #expect(r.finished, "\(r.outcome)")
        #expect(r.printed == ["3", "a\tb"])
    }
}
}
