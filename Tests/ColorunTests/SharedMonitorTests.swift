import ColorunSystem
import ColorunTestSupport
import Logging
import NIOCore
import NIOPosix
import QEMULab
import QMPClient
import Synchronization
import Testing
@testable import Colorun

/// What another client of a monitor (xl, qm) saw while colorun used the same monitor.
struct OtherClientTally: Sendable {
    var attempts = 0
    var failures: [String] = []
    var worst = Duration.zero
    var total = Duration.zero
}

/// Connects to `socket` every `interval` until `done()` is true (at least `minimum` times),
/// as a management tool does: connect, wait for the greeting, negotiate, `query-status`,
/// close. The greeting and the answer must come within 1 s each time (the greeting
/// timeout); a failure is recorded, not thrown.
func otherClient(socket: String, every interval: Duration = .milliseconds(50), minimum: Int, until done: @Sendable () -> Bool) async -> OtherClientTally {
    var tally = OtherClientTally()
    let clock = ContinuousClock()
    let logger = Logger(label: "other-client", factory: { _ in SwiftLogNoOpLogHandler() })
    while tally.attempts < minimum || !done() {
        let started = clock.now
        do {
            let connection = try await QMPConnection.connect(
                to: .unix(path: socket), on: MultiThreadedEventLoopGroup.singleton, connectTimeout: .seconds(1),
                greetingTimeout: .seconds(1), commandTimeout: .seconds(1), logger: logger)
            let status = try await connection.execute("query-status")
            await connection.close()
            if status["status"] == nil { tally.failures.append("no status in \(status)") }
        } catch {
            tally.failures.append("\(error)")
        }
        let elapsed = clock.now - started
        tally.attempts += 1
        tally.total += elapsed
        tally.worst = max(tally.worst, elapsed)
        try? await Task.sleep(for: interval)
    }
    return tally
}

@Suite(.serialized, .timeLimit(.minutes(3)), .machine(.exclusive)) struct SharedMonitorTests {
    /// A shared-mode policy checkpoints every 100 ms; another client connects every 50 ms
    /// to the primary's monitor and gets its greeting and answer within 1 s every time.
    /// Without shared mode the same client is locked out (the control that shows the test
    /// can fail).
    @Test func anotherClientGetsInWhileASharedPolicyCheckpoints() async throws {
        try await withSimulatedPair("colorun-shared") { pair in
            for shared in [true, false] {
                let clientDone = Atomic<Bool>(false)
                let policyStarted = Atomic<Bool>(false)
                let primarySocket = pair.directory + "/p.sock"
                let client = Task {
                    try? await waitUntil("the policy started") { policyStarted.load(ordering: .relaxed) }
                    let tally = await otherClient(socket: primarySocket, minimum: shared ? 40 : 2) { true }
                    clientDone.store(true, ordering: .relaxed)
                    return tally
                }
                let run = try await runPolicy(#"""
                    local p = domain.open{name = "web-p", qmp = "unix:\#(pair.directory)/p.sock", shared = \#(shared)}
                    local s = domain.open{name = "web-s", qmp = "unix:\#(pair.directory)/s.sock", shared = \#(shared)}
                    assert(p.shared == \#(shared) and s.shared == \#(shared))
                    p:status()  -- not shared: from here on colorun holds the monitor
                    local ticker = policy.every("100ms", function()
                      local ok, err = pcall(colo.checkpoint, p, s)
                      if not ok then log.warn("checkpoint failed: " .. tostring(err)) end
                    end)
                    test.started()
                    test.wait("client_done")
                    ticker.cancel()
                    print("connects " .. p:stats().connects)
                    """#,
                    hooks: ["started": { policyStarted.store(true, ordering: .relaxed) }],
                    checks: ["client_done": { clientDone.load(ordering: .relaxed) }])
                let tally = await client.value
                print("shared=\(shared): \(tally.attempts) connects by another client, worst \(tally.worst), "
                      + "\(run.report.checkpoints) checkpoints, \(run.report.failedCheckpoints) failed")
                #expect(run.failure == nil, "\(run.failure ?? "")")
                if shared {
                    #expect(tally.failures.isEmpty, "\(tally.failures.prefix(3))")
                    #expect(tally.worst < .seconds(1))
                    #expect(run.report.checkpoints >= 10)
                    #expect(run.report.failedCheckpoints == 0)
                } else {
                    // colorun holds the monitor for the whole run: nobody else gets a greeting.
                    #expect(tally.failures.count == tally.attempts)
                    #expect(tally.failures.first?.contains("sent no greeting") == true, "\(tally.failures.first ?? "")")
                }
            }
        }
    }

    /// A policy that never pauses between commands (two tasks sending back to back) still
    /// lets another client in: a shared connection is retired after 200 ms of bursts.
    @Test func aPolicyThatNeverPausesStillLetsOthersIn() async throws {
        try await withSimulatedPair("colorun-burst") { pair in
            let clientDone = Atomic<Bool>(false)
            let policyStarted = Atomic<Bool>(false)
            let primarySocket = pair.directory + "/p.sock"
            let client = Task {
                try? await waitUntil("the policy started") { policyStarted.load(ordering: .relaxed) }
                let tally = await otherClient(socket: primarySocket, minimum: 10) { true }
                clientDone.store(true, ordering: .relaxed)
                return tally
            }
            let run = try await runPolicy(#"""
                local p = domain.open{name = "web-p", qmp = "unix:\#(pair.directory)/p.sock", shared = true}
                local done = false
                local function hammer()
                  local n = 0
                  while not done do p:status(); n = n + 1 end
                  return n
                end
                local a, b = task.spawn(hammer), task.spawn(hammer)
                test.started()
                test.wait("client_done")
                done = true
                local n = a:wait() + b:wait()
                print("commands " .. n .. " connects " .. p:stats().connects)
                assert(p:stats().connects > 1)
                """#,
                hooks: ["started": { policyStarted.store(true, ordering: .relaxed) }],
                checks: ["client_done": { clientDone.load(ordering: .relaxed) }])
            let tally = await client.value
            for line in run.logs.records.map(\.message) where line.hasPrefix("commands ") {
                print("\(line); another client: \(tally.attempts) connects, worst \(tally.worst)")
            }
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(tally.failures.isEmpty, "\(tally.failures.prefix(3))")
            #expect(tally.worst < .seconds(1))
        }
    }

    /// A real QEMU with three monitors, as a Xen domain with colorun's own monitor has:
    /// the lab's (held by another client for the whole test, as libvirt holds its own),
    /// libxl's `qmp-libxl-7` and `qmp-colorun-web`. `domain.xen` picks colorun's monitor when
    /// it is there and shares libxl's otherwise; the holder sees the STOP and RESUME colorun
    /// caused, and xl-like clients get libxl's monitor in between colorun's commands.
    @Test func xenDomainsUseColorunsMonitorOrShareLibxls() async throws {
        let dir = makeTempDirectory("colorun-xen")
        defer { removeDirectory(dir) }
        let qemu = try QEMUInstance.start(QEMUSpec(extraArguments: [
            "-qmp", "unix:\(dir)/qmp-libxl-7,server=on,wait=off",
            "-qmp", "unix:\(dir)/qmp-colorun-web,server=on,wait=off",
        ]))
        let holder: QMPConnection
        do {
            holder = try await qemu.connect(on: MultiThreadedEventLoopGroup.singleton, logger: LogCollector().logger("holder"))
        } catch {
            Issue.record("QEMU stderr: \(qemu.stderrText())")
            await qemu.stop()
            throw error
        }
        let events = holder.events
        let seen = Task {
            var names: [String] = []
            for await event in events where ["STOP", "RESUME"].contains(event.name) {
                names.append(event.name)
                if names.count == 2 { break }
            }
            return names
        }
        let clientDone = Atomic<Bool>(false)
        let sharing = Atomic<Bool>(false)
        let client = Task {
            try? await waitUntil("the policy shares libxl's monitor") { sharing.load(ordering: .relaxed) }
            let tally = await otherClient(socket: dir + "/qmp-libxl-7", minimum: 20) { true }
            clientDone.store(true, ordering: .relaxed)
            return tally
        }
        let run = try await runPolicy(#"""
            local own = domain.xen(7, {name = "web", run_dir = "\#(dir)"})
            assert(own.endpoint == "unix:\#(dir)/qmp-colorun-web" and not own.shared, own.endpoint)
            local libxl = domain.xen(7, {run_dir = "\#(dir)"})
            assert(libxl.name == "xen-7" and libxl.endpoint == "unix:\#(dir)/qmp-libxl-7" and libxl.shared, libxl.endpoint)
            own:stop()
            assert(libxl:status().status == "paused")
            own:resume()
            assert(own:status().running)
            -- Shared: a command every 20 ms while xl-like clients come and go.
            local n = 0
            local ticker = policy.every("20ms", function() assert(libxl:status().running); n = n + 1 end)
            test.sharing()
            test.wait("client_done")
            ticker.cancel()
            assert(n >= 10, n)
            assert(libxl:stats().connects > 1, libxl:stats().connects)
            -- The cost of a connection per command: the same query-status, 50 times each way.
            local function mean_ms(d)
              local before = d:stats()
              for _ = 1, 50 do d:status(); sleep("2ms") end
              local after = d:stats()
              return (after.mean_latency_ms * after.commands - before.mean_latency_ms * before.commands) / (after.commands - before.commands)
            end
            local held, shared = mean_ms(own), mean_ms(libxl)
            print(string.format("query-status mean: %.3f ms on a held connection, %.3f ms shared (connect, greeting, qmp_capabilities, command, close)", held, shared))
            """#,
            hooks: ["sharing": { sharing.store(true, ordering: .relaxed) }],
            checks: ["client_done": { clientDone.load(ordering: .relaxed) }])
        let tally = await client.value
        #expect(run.failure == nil, "\(run.failure ?? "")")
        #expect(tally.failures.isEmpty, "\(tally.failures.prefix(3))")
        #expect(tally.worst < .seconds(1))
        #expect(await seen.value == ["STOP", "RESUME"])
        #expect(try await holder.execute("query-status")["status"] == "running")
        for line in run.logs.records.map(\.message) where line.contains("query-status mean") {
            print("\(line); another client: \(tally.attempts) connects, worst \(tally.worst)")
        }
        await holder.close()
        await qemu.stop()
    }
}
