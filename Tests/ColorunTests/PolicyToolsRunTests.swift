import ColorunTestSupport
import Logging
import LuaRuntime
import NIOCore
import NIOPosix
import QEMUSimulator
import Synchronization
import Testing
@testable import Colorun
import ColorunSystem

/// Several pairs in one file, simulated domains (`--sim`), out-of-memory positions, and the
/// API table held to the live environment.
@Suite(.timeLimit(.minutes(2)), .machine(.shared)) struct PolicyToolsRunTests {
    /// Three colo.policy{} pairs; each primary crashes at its own time. Each failover ends its
    /// pair only: every on_failover handler runs to its end (they sleep across the others'
    /// failovers), the run ends when the last pair is gone, and the summary counts three.
    @Test func threePairsFailOverOneByOne() async throws {
        let faults = try ["web-p=@1500ms:crash", "db-p=@2000ms:crash", "cache-p=@2500ms:crash"].map { try SimulatedDomains.Fault(parsing: $0) }
        let simulated = try SimulatedDomains(faults: faults)
        let run = try await runPolicy("""
            for _, name in ipairs({"web", "db", "cache"}) do
              colo.policy{
                primary = domain.get(name .. "-p"), secondary = domain.get(name .. "-s"),
                interval = "100ms", heartbeat = "200ms", heartbeat_timeout = "2s",
                on_failover = function(p, s, reason)
                  sleep("700ms")
                  s:resume()
                  log.warn("failover done: " .. p.name .. " -> " .. s.name)
                end,
              }
            end
            """, extensions: [simulated])
        #expect(run.failure == nil, "\(run.failure ?? "")\n\(run.logs.text)")
        if case .finished = run.report.outcome {} else { Issue.record("outcome \(run.report.outcome)") }
        #expect(run.report.failovers == 3, "\(run.logs.text)")
        let done = run.logs.lines.filter { $0.contains("failover done:") }
        #expect(done.count == 3, "\(run.logs.text)")
        for name in ["web", "db", "cache"] {
            #expect(done.contains { $0.contains("\(name)-p -> \(name)-s") })
            #expect(run.report.lastGood["\(name)-p+\(name)-s"] != nil, "\(name) made no checkpoint")
        }
        #expect(Set(run.logs.lines.filter { $0.contains("sim: simulated domain") }).count == 6)
    }

    /// A declarative pair without on_failover counts its failover too, and policy.stop()
    /// still ends a run with pairs left.
    @Test func defaultFailoverCountsAndStopEndsTheRun() async throws {
        let simulated = try SimulatedDomains(faults: [try SimulatedDomains.Fault(parsing: "a-p=@300ms:crash")])
        let run = try await runPolicy("""
            colo.policy{primary = domain.get("a-p"), secondary = domain.get("a-s"), interval = "100ms",
                        heartbeat = "200ms", heartbeat_timeout = "2s"}
            colo.policy{primary = domain.get("b-p"), secondary = domain.get("b-s"), interval = "100ms",
                        heartbeat = "200ms", heartbeat_timeout = "2s"}
            policy.every("50ms", function()
              if #colo.generations("b-p", "b-s") >= 2 and rawget(_G, "failed_over") then policy.stop() end
            end)
            policy.on_lost("a-p", function() failed_over = true end, {heartbeat = "200ms", timeout = "2s"})
            """, extensions: [simulated])
        #expect(run.failure == nil, "\(run.failure ?? "")\n\(run.logs.text)")
        if case .stopped = run.report.outcome {} else { Issue.record("outcome \(run.report.outcome)") }
        #expect(run.report.failovers == 1)
    }

    /// QEMU's answer resumes the task inside the reply's handler (its next command goes out
    /// in the same turn of the loop); a lost monitor's failure reaches the task only after the
    /// domain has taken in the loss, so the policy sees the disconnect it was failed by.
    @Test func aLostMonitorsFailureReachesThePolicyAfterTheDomainTookInTheLoss() async throws {
        let simulated = try SimulatedDomains(faults: [try SimulatedDomains.Fault(parsing: "a-p=query-status:drop,after=2")])
        let run = try await runPolicy("""
            local d = domain.get("a-p")
            print(qmp.status(d).status, qmp.status(d).status, d:stats().disconnects)
            local ok, e = pcall(qmp.status, d)
            print(ok, e.class, d:stats().disconnects)
            """, extensions: [simulated])
        #expect(run.failure == nil, "\(run.failure ?? "")\n\(run.logs.text)")
        let printed = run.logs.records.filter { $0.level == .info && $0.message.contains("\t") }.map(\.message)
        #expect(printed == ["running\trunning\t0", "false\tDisconnected\t1"], "\(run.logs.text)")
    }

    /// An uncaught out-of-memory error names the policy line that allocated.
    @Test func outOfMemoryNamesTheLine() async throws {
        let run = try await runPolicy("""
            local t = {}
            for i = 1, 1e9 do t[i] = ("x"):rep(64) .. i end
            """) { $0.lua.memoryLimit = 4 << 20 }
        let failure = try #require(run.failure)
        #expect(failure.contains("policy.lua:2: not enough memory"), "\(failure)")
    }

    /// The session's loop thread asks the kernel for `loopSlice` (sched_setattr), and `.zero`
    /// gives it the kernel's default back. Custom slices came with EEVDF in Linux 6.12.
    @Test(.enabled(if: linuxAtLeast(6, 12), "custom slices need Linux 6.12 or later (sched_attr.sched_runtime for normal threads)"))
    func theLoopThreadRunsWithTheSliceAskedFor() async throws {
        let seen = Mutex<[UInt64]>([])
        let hooks: [String: @Sendable () throws -> Void] = ["slice": { seen.withLock { $0.append(threadSlice() ?? 0) } }]
        _ = try await runPolicy("test.slice()", hooks: hooks) { $0.loopSlice = .microseconds(300) }
        _ = try await runPolicy("test.slice()", hooks: hooks) { $0.loopSlice = .zero }
        _ = try await runPolicy("test.slice()", hooks: hooks)
        let values = seen.withLock { $0 }
        #expect(values.count == 3)
        #expect(values.first == 300_000, "\(values)")
        #expect(values.count == 3 && values[1] > 0 && values[1] != 300_000, "\(values)")
        #expect(values.last == UInt64(PolicyOptions.defaultLoopSlice.nanoseconds), "\(values)")
    }

    @Test func policyBytes() async throws {
        let run = try await runPolicy("""
            assert(policy.bytes("64MiB") == 67108864)
            assert(policy.bytes(4096) == 4096)
            assert(policy.bytes("1.5K") == 1536)
            local ok, err = pcall(policy.bytes, "lots")
            assert(not ok and err:find("policy.lua:4: bad argument #1 to 'policy.bytes' (bad size \\"lots\\"", 1, true), err)
            """)
        #expect(run.failure == nil, "\(run.failure ?? "")")
    }

    /// Every global a session binds (the lab's module included) is in the API table and the
    /// sandbox list behind the editor stubs, with exactly the same fields, and the other way
    /// round: the stubs cannot drift from the code.
    @Test func theAPITableIsTheLiveEnvironment() async throws {
        let dir = makeTempDirectory("colorun-api")
        defer { removeDirectory(dir) }
        var options = PolicyOptions(policyPath: dir + "/policy.lua")
        options.stateDirectory = dir + "/state"
        let lab = try Lab()
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let snapshot = try await loop.submit { [options] in
            let session = try PolicySession(options: options, eventLoop: loop, logger: Logger(label: "t") { _ in SwiftLogNoOpLogHandler() },
                                            extensions: [lab])
            defer { session.blockingIO.shutdownGracefully { _ in } }
            return session.runtime.environmentSnapshot()
        }.get()
        let tree = LuaAPIStubs.globalTree()
        #expect(snapshot.globals == Set(tree.keys), "live only: \(snapshot.globals.subtracting(tree.keys).sorted()); table only: \(Set(tree.keys).subtracting(snapshot.globals).sorted())")
        for (name, sub) in tree where !sub.open && !sub.fields.isEmpty {
            let live = snapshot.tables[name] ?? []
            #expect(live == Set(sub.fields.keys), "\(name): live only \(live.subtracting(sub.fields.keys).sorted()); table only \(Set(sub.fields.keys).subtracting(live).sorted())")
            for (field, inner) in sub.fields where !inner.fields.isEmpty {
                #expect(snapshot.tables[name + "." + field] == Set(inner.fields.keys), "\(name).\(field)")
            }
        }
    }
}

extension PolicyToolsRunTests {
    /// The domain methods a policy can call are the API table's methods.
    @Test func theAPITableHasEveryDomainMethod() async throws {
        let run = try await runPolicy("""
            local names = {}
            for k, v in pairs(getmetatable(domain.get("x"))) do
              if type(v) == "function" and not k:find("^__") then names[#names + 1] = k end
            end
            table.sort(names)
            log.info("methods: " .. table.concat(names, ","))
            """) {
            $0.acceptAnyDomain = true
            $0.domainOptions.refuseConnections = "no VM here"
        }
        #expect(run.failure == nil, "\(run.failure ?? "")")
        let line = run.logs.lines.first { $0.contains("methods: ") } ?? ""
        let live = Set(line.split(separator: " ").last { $0.contains(",") }.map { $0.split(separator: ",").map(String.init) } ?? [])
        let table = Set(LuaAPI.entries.filter { $0.kind == .method }.map { String($0.name.split(separator: ":")[1]) })
        #expect(live == table, "\(line)")
    }
}

/// A lab domain refuses the Xen cycle's load before sending it: the lab's QEMU (plain QEMU)
/// keeps running and is never left paused.
@Suite(.timeLimit(.minutes(1)), .machine(.exclusive)) struct LabXenRefusalTests {
    @Test func labDomainsRefuseXenLoadDevicesState() async throws {
        let lab = try Lab()
        let run = try await runPolicy(#"""
            local p, s = domain.get("primary"), domain.get("secondary")
            s:stop()
            local ok, err = pcall(qmp.execute, s, "xen-load-devices-state", {filename = "/nonexistent"})
            assert(not ok and err.class == "Refused", tostring(err))
            s:resume()
            local ok2, err2 = pcall(colo.checkpoint, p, s)
            assert(not ok2 and err2.class == "Refused", tostring(err2))
            assert(tostring(err2):find("policy.lua:6: colo.checkpoint: secondary: xen-load-devices-state: Refused:", 1, true), tostring(err2))
            assert(p:status().running and s:status().running)
            local ok3, err3 = pcall(colo.policy, {primary = p, secondary = s, interval = "100ms"})
            assert(not ok3 and tostring(err3):find("--sim", 1, true), tostring(err3))
            log.info("refused: " .. tostring(err2))
            """#, lab: lab)
        #expect(run.failure == nil, "\(run.failure ?? "")\n\(run.logs.text)")
        #expect(run.logs.text.contains("refused: "))
    }
}
