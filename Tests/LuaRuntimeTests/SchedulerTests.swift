import ColorunTestSupport
import Foundation
import JSON
import LuaRuntime
import NIOCore
import Synchronization
import Testing

/// A host function `now()`: monotonic seconds.
@Sendable func addClock(_ rt: LuaRuntime) throws {
    try rt.registerGlobal("now", .sync { call in
        call.push(Double(DispatchTime.now().uptimeNanoseconds) / 1e9)
    })
}

extension LuaRuntimeSuite {
@Suite struct SchedulerTests {
    @Test func thousandTasksSleepingConcurrently() async throws {
        let start = ContinuousClock.now
        let r = try await runPolicy("""
            local done = 0
            for i = 1, 1000 do
              task.spawn(function()
                for j = 1, 100 do sleep("1ms") end
                done = done + 1
              end)
            end
            while done < 1000 do sleep(0.01) end
            print(done)
            """)
        let elapsed = ContinuousClock.now - start
        #expect(r.finished, "\(r.outcome)")
        #expect(r.printed == ["1000"])
        // Serial sleeping would take 100 s; a loaded 2-core CI machine running the whole suite in a
        // debug build needs several seconds for the 100,000 timers.
        #expect(elapsed < .seconds(20), "took \(elapsed)")
    }

    @Test func busyTaskDoesNotDelayTimersAndIsKilled() async throws {
        var options = LuaRuntimeOptions()
        options.timeLimit = .milliseconds(500)
        options.uncaughtErrors = .logAndContinue
        let r = try await runPolicy("""
            task.spawn(function()
              while true do
                pcall(function() while true do end end)
              end
            end)
            local worst = 0
            for i = 1, 30 do
              local t0 = now()
              sleep("10ms")
              local late = now() - t0 - 0.010
              if late > worst then worst = late end
            end
            print(string.format("%.4f", worst))
            """, options: options, setup: addClock)
        #expect(r.finished, "\(r.outcome)")
        let worst = try #require(Double(r.printed.first ?? "x"))
        print("busy task: worst timer lateness \(worst) s")
        // Typically a few ms. A busy task that held the loop would make a timer wait for the
        // 0.5 s time limit; 0.25 s still catches that and leaves room for a loaded 2-core machine.
        #expect(worst < 0.25, "timers late by \(worst) s")
        #expect(r.logs.contains { $0.contains("policy.lua:3: time limit exceeded") }, "\(r.logs)")
    }

    @Test func timeLimitFailsTheRunByDefault() async throws {
        var options = LuaRuntimeOptions()
        options.timeLimit = .milliseconds(200)
        let start = ContinuousClock.now
        let r = try await runPolicy("local n = 0\nwhile true do n = n + 1 end\n", options: options)
        let f = try #require(r.failure)
        #expect(f.message.hasSuffix("policy.lua:2: time limit exceeded (0.2 s)"), "\(f.message)")
        #expect(ContinuousClock.now - start < .seconds(2))
    }

    @Test func hostileErrorObjectCannotHangTheRunner() async throws {
        var options = LuaRuntimeOptions()
        options.timeLimit = .milliseconds(200)
        let start = ContinuousClock.now
        let r = try await runPolicy("""
            error(setmetatable({}, {__tostring = function() while true do end end}))
            """, options: options)
        let f = try #require(r.failure)
        #expect(f.message == "(error object is a table value)", "\(f.message)")
        #expect(ContinuousClock.now - start < .seconds(2))
    }

    @Test func memoryErrorCanBeCaughtAndTheTaskGoesOn() async throws {
        var options = LuaRuntimeOptions()
        options.memoryLimit = 16 << 20
        let r = try await runPolicy("""
            local ok, e = pcall(function()
              local t = {}
              for i = 1, 1e9 do t[i] = string.rep("y", 64) .. i end
            end)
            print(ok, e)
            sleep(0)
            print(#string.rep("z", 1000))
            """, options: options)
        #expect(r.finished, "\(r.outcome)")
        #expect(r.printed == ["false\tnot enough memory", "1000"])
    }

    @Test func memoryBombFailsOnlyItsTask() async throws {
        var options = LuaRuntimeOptions()
        options.memoryLimit = 16 << 20
        options.uncaughtErrors = .logAndContinue
        let r = try await runPolicy("""
            task.spawn(function()
              local t = {}
              for i = 1, 1e9 do t[i] = string.rep("x", 64) .. i end
            end)
            sleep("50ms")
            local s = {}
            for i = 1, 1000 do s[i] = tostring(i) end
            print("alive", #s)
            """, options: options)
        #expect(r.finished, "\(r.outcome)")
        #expect(r.printed == ["alive\t1000"])
        #expect(r.logs.contains { $0.contains("not enough memory") }, "\(r.logs)")
    }

    @Test func hostCallFromSortComparatorIsAClearError() async throws {
        let r = try await runPolicy("""
            local ok, e = pcall(table.sort, {3, 1, 2}, function(a, b) sleep(0) return a < b end)
            print(ok, e)
            """)
        #expect(r.finished, "\(r.outcome)")
        let line = try #require(r.printed.first)
        #expect(line.hasPrefix("false\t"))
        #expect(line.contains("policy.lua:1: sleep cannot wait here"), "\(line)")
        #expect(line.contains("table.sort comparator"))
    }

    @Test func userCoroutinesAroundHostCalls() async throws {
        let r = try await runPolicy("""
            local gen = coroutine.wrap(function()
              for i = 1, 3 do
                sleep("1ms")
                coroutine.yield(i)
              end
              return "end"
            end)
            print(gen(), gen(), gen(), gen())
            local co = coroutine.create(function(a)
              sleep(0)
              local b = coroutine.yield(a + 1)
              sleep(0)
              return b * 2
            end)
            print(coroutine.resume(co, 1))
            print(coroutine.resume(co, 10))
            print(coroutine.status(co))
            -- a host call inside a coroutine resumed from a sort comparator: a clear error
            local ok, e = pcall(table.sort, {2, 1}, function(a, b)
              return coroutine.wrap(function() sleep(0) return a < b end)()
            end)
            print(ok, e)
            sleep(0)
            -- a busy loop inside a user coroutine is still preempted
            local busy = coroutine.wrap(function() local n = 0 for i = 1, 200000 do n = n + i end return n end)
            print(busy())
            """)
        #expect(r.finished, "\(r.outcome)")
        #expect(r.printed == ["1\t2\t3\tend", "true\t2", "true\t20", "dead",
            "false\tpolicy.lua:19: a host call cannot wait here: its coroutine was resumed from code that cannot yield (a table.sort comparator, a string.gsub callback, a metamethod called from C)",
            "20000100000"])
    }

    @Test func taskAllErrorSemantics() async throws {
        let r = try await runPolicy("""
            local slowDone = false
            local ok, e = pcall(task.all,
              function() sleep("30ms"); slowDone = true; return 1 end,
              function() sleep("5ms"); error("second failed") end,
              function() error("third failed") end)
            print(ok, e, slowDone)
            print(task.all(function() return 1, 2 end, function() sleep(0) return "x" end))
            print(pcall(task.all, 1))
            """)
        #expect(r.finished, "\(r.outcome)")
        try #require(r.printed.count == 3, "\(r.printed)")
        #expect(r.printed[0] == "false\t\(r.printed[0].split(separator: "\t")[1])\ttrue")
        #expect(r.printed[0].contains("policy.lua:4: second failed"), "\(r.printed)")
        #expect(r.printed[1] == "1\tx")
        #expect(r.printed[2].contains("bad argument #1 to 'task.all' (function expected, got number)"))
    }

    @Test func uncaughtErrorInSpawnedTaskEndsRun() async throws {
        let r = try await runPolicy("""
            task.spawn(function() sleep(0) error("boom") end)
            sleep(1)
            print("not reached")
            """)
        let f = try #require(r.failure)
        #expect(f.message.hasSuffix("policy.lua:1: boom"))
        #expect(f.traceback.contains("policy.lua:1"))
        #expect(r.printed.isEmpty)
    }

    @Test func badDurations() async throws {
        let r = try await runPolicy("""
            for _, d in ipairs({"abc", "5 parsecs", -1, "", {}}) do
              local ok, e = pcall(sleep, d)
              print(e)
            end
            sleep("500us"); sleep("1ms"); sleep("0.01s"); sleep(0)
            print("ok")
            """)
        #expect(r.finished, "\(r.outcome)")
        try #require(r.printed.count == 6, "\(r.printed)")
        #expect(r.printed[0] == "policy.lua:2: bad argument #1 to 'sleep' (bad duration \"abc\": expected seconds as a number or a string like \"500us\", \"200ms\", \"1.5s\", \"2m\", \"1h\")")
        #expect(r.printed[1].contains("bad duration \"5 parsecs\""))
        #expect(r.printed[2].contains("must be a non-negative number of seconds"))
        #expect(r.printed[4].contains("duration (seconds or a string like \"200ms\") expected, got table"))
        #expect(r.printed[5] == "ok")
        #expect(try LuaDuration(parsing: "1.5s").seconds == 1.5)
        #expect(try LuaDuration(parsing: "2m").seconds == 120)
        #expect(try LuaDuration(parsing: "200ms").seconds == 0.2)
        #expect(abs(try LuaDuration(parsing: "500us").seconds - 0.0005) < 1e-12)
    }

    @Test func stopCancelsTasksAndRunsShutdownHooks() async throws {
        let dir = try makePolicyDir(["policy.lua": "started()\nwhile true do sleep(0.01) end"])
        let loop = testGroup.next()
        let hookRan = Mutex(false)
        let started = loop.makePromise(of: Void.self)
        let rt = try await loop.submit {
            let rt = try LuaRuntime(eventLoop: loop)
            try rt.registerGlobal("started", .sync { _ in started.succeed() })
            rt.addShutdownHook { outcome in
                hookRan.withLock { $0 = true }
                return loop.makeSucceededVoidFuture()
            }
            return rt
        }.get()
        let future = rt.start(policyAt: dir + "/policy.lua")
        try await started.futureResult.get()   // the policy runs: stop has tasks to cancel
        rt.stop()
        let outcome = try await future.get()
        guard case .stopped = outcome else { Issue.record("\(outcome)"); return }
        #expect(hookRan.withLock { $0 })
        #expect(try await loop.submit { rt.liveTaskCount }.get() == 0)
    }

    @Test func lateCompletionAfterStopIsIgnored() async throws {
        let dir = try makePolicyDir(["policy.lua": "print('before')\nwait_forever()\nprint('after')\n"])
        let loop = testGroup.next()
        final class Saved: @unchecked Sendable { var completion: LuaCompletion?; var cancelled = false }
        let saved = Saved()
        let sink = LogCollector()
        let waiting = loop.makePromise(of: Void.self)
        let rt = try await loop.submit {
            let rt = try LuaRuntime(eventLoop: loop, logger: sink.logger())
            try rt.registerGlobal("wait_forever", .async { _, completion in
                saved.completion = completion
                waiting.succeed()
                completion.onCancel { saved.cancelled = true }
            })
            return rt
        }.get()
        let future = rt.start(policyAt: dir + "/policy.lua")
        try await waiting.futureResult.get()   // the policy waits in wait_forever
        rt.stop()
        guard case .stopped = try await future.get() else { Issue.record("not stopped"); return }
        try await loop.submit {
            #expect(saved.cancelled)
            #expect(saved.completion?.isCancelled == true)
            saved.completion?.succeed([.integer(1)])  // ignored
        }.get()
        try await loop.submit {}.get()
        #expect(sink.levelled == ["info: before"])
    }

    @Test func swiftSpawnsCallbacksFromRefs() async throws {
        let dir = try makePolicyDir(["policy.lua": """
            callbacks = {}
            on(function(name, n) sleep(0) print("callback", name, n) end)
            on(function() error("cb failed") end)
            """])
        let loop = testGroup.next()
        let sink = LogCollector()
        let outcomes = Mutex<[String]>([])
        let rt = try await loop.submit {
            let rt = try LuaRuntime(eventLoop: loop, logger: sink.logger())
            let hold = rt.holdRun()
            final class Counter: @unchecked Sendable { var pending = 0 }
            let counter = Counter()
            try rt.registerGlobal("on", .sync { call in
                let fn = try call.function(1)
                counter.pending += 1
                let rt = call.runtime
                rt.eventLoop.scheduleTask(in: .milliseconds(20)) {
                    _ = try? rt.spawn(fn, arguments: [.string("tick"), .integer(7)], name: "cb", handlesErrors: true) { outcome in
                        switch outcome {
                        case .success: outcomes.withLock { $0.append("ok") }
                        case .failure(let f): outcomes.withLock { $0.append(f.message) }
                        case .cancelled: outcomes.withLock { $0.append("cancelled") }
                        }
                        counter.pending -= 1
                        if counter.pending == 0 { hold.release() }
                    }
                }
            })
            return rt
        }.get()
        let outcome = try await rt.start(policyAt: dir + "/policy.lua").get()
        guard case .finished = outcome else { Issue.record("\(outcome)"); return }
        #expect(sink.levelled.contains("info: callback\ttick\t7"))
        let o = outcomes.withLock { $0 }.sorted()
        #expect(o.count == 2)
        #expect(o.contains("ok"))
        #expect(o.contains { $0.hasSuffix("policy.lua:3: cb failed") })
    }
}
}
