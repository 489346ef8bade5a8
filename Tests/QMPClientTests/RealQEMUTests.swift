import ColorunTestSupport
import JSON
import Logging
import NIOCore
import NIOPosix
import QEMULab
import QMP
import QMPClient
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Against real QEMU 7.2 under TCG, started by each test in its own run directory.
///
/// Serialized: each test starts its own QEMU (safe in parallel), but a dozen QEMUs booting
/// at once on two cores delay the event loop by 100+ ms, which the timing tests would feel.
@Suite(.serialized, .timeLimit(.minutes(5)), .machine(.exclusive)) struct RealQEMUTests {
    @Test func greetingAndNegotiation() async throws {
        try await withQEMU { qemu, connection async throws in
            #expect(connection.greeting.qemuVersion.hasPrefix("7."), "version \(connection.greeting.version)")
            #expect(connection.greeting.capabilities.contains("oob"))
            #expect(connection.outOfBandEnabled)
            #expect(connection.isActive)
            #expect(connection.endpoint == qemu.qmpEndpoint)
            // Negotiation is over: a second qmp_capabilities is refused.
            let again = await qmpError { _ = try await connection.execute("qmp_capabilities") }
            #expect(again?.qmpError?.errorClass == "CommandNotFound")
        }
    }

    @Test func negotiatesWithoutOOBWhenAskedNotTo() async throws {
        let qemu = try QEMUInstance.start()
        let connection = try await QMPConnection.connect(to: qemu.qmpEndpoint, on: testGroup, enableOOB: false, logger: LogCollector().logger("qmp-test", level: .debug))
        #expect(!connection.outOfBandEnabled)
        #expect(try await connection.execute("query-status")["status"] == "running")
        await connection.close()
        await qemu.stop()
    }

    @Test func queryStatus() async throws {
        try await withQEMU { _, connection async throws in
            let status = try await connection.execute("query-status")
            #expect(status["status"] == "running")
            #expect(status["running"] == true)
        }
    }

    @Test func stopAndContWithEvents() async throws {
        try await withQEMU { _, connection async throws in
            let stream = connection.events
            let onLoop = Mutex<[String: Bool]>([:])
            let subscription = connection.onEvent { event in
                let inLoop = connection.eventLoop.inEventLoop
                onLoop.withLock { $0[event.name] = inLoop }
            }
            // A loop-side subscriber with a non-Sendable closure, as the Lua runtime registers one.
            let seenOnLoop = try await connection.eventLoop.submit {
                let box = NIOLoopBoundBox([String](), eventLoop: connection.eventLoop)
                connection.syncOperations.onEvent { event in box.value.append(event.name) }
                return box
            }.get()
            #expect(try await connection.execute("stop") == [:])
            let stop = await firstEvent(in: stream, named: "STOP")
            #expect(stop != nil)
            #expect((stop?.timestamp ?? 0) > 1_600_000_000)
            #expect(try await connection.execute("query-status")["status"] == "paused")
            #expect(try await connection.execute("cont") == [:])
            #expect(await firstEvent(in: stream, named: "RESUME") != nil)
            #expect(try await connection.execute("query-status")["status"] == "running")
            #expect(onLoop.withLock { $0 } == ["STOP": true, "RESUME": true])
            #expect(try await connection.eventLoop.submit { seenOnLoop.value }.get() == ["STOP", "RESUME"])
            #expect(stream.droppedCount == 0)
            subscription.cancel()
        }
    }

    @Test func aSlowEventConsumerNeverStallsCommands() async throws {
        try await withQEMU { _, connection async throws in
            // Nobody reads this stream; its buffer holds 2 events.
            let ignored = connection.events(bufferingNewest: 2)
            for _ in 0..<5 {
                _ = try await connection.execute("stop")
                _ = try await connection.execute("cont")
            }
            // 10 events arrived: all commands answered, 8 dropped and counted.
            #expect(try await connection.execute("query-status")["status"] == "running")
            #expect(ignored.droppedCount == 8)
            #expect(connection.droppedEventCount == 8)
        }
    }

    @Test func xenSaveDevicesStateWritesAQEVMFile() async throws {
        try await withQEMU { qemu, connection async throws in
            let file = qemu.path("devices.state")
            #expect(try await connection.execute("xen-save-devices-state", arguments: ["filename": .string(file)]) == [:])
            let fd = open(file, O_RDONLY)
            #expect(fd >= 0)
            var magic = [UInt8](repeating: 0, count: 8)
            let n = magic.withUnsafeMutableBytes { read(fd, $0.baseAddress, 8) }
            close(fd)
            #expect(n == 8)
            #expect(Array(magic[0..<4]) == Array("QEVM".utf8))
        }
    }

    @Test func xenLoadDevicesStateOnARunningVM() async throws {
        try await withQEMU { qemu, connection async throws in
            // A path that does not exist: a load that reaches the parser aborts QEMU 7.2.
            let file = qemu.path("never-written.state")
            let error = await qmpError { _ = try await connection.execute("xen-load-devices-state", arguments: ["filename": .string(file)]) }
            #expect(error?.qmpError == QMPErrorBody(errorClass: "GenericError", desc: "Cannot update device state while vm is running"))
            #expect(error?.command == "xen-load-devices-state")
        }
    }

    @Test func xenLoadDevicesStateMissingFile() async throws {
        try await withQEMU { qemu, connection async throws in
            _ = try await connection.execute("stop")
            let file = qemu.path("missing.state")
            let error = await qmpError { _ = try await connection.execute("xen-load-devices-state", arguments: ["filename": .string(file)]) }
            #expect(error?.qmpError == QMPErrorBody(errorClass: "GenericError", desc: "Unable to open \(file): No such file or directory"))
            #expect(error?.description.contains(qemu.qmpEndpoint.description) == true)
        }
    }

    @Test func unknownCommand() async throws {
        try await withQEMU { _, connection async throws in
            let error = await qmpError { _ = try await connection.execute("no-such-command") }
            guard case .commandFailed(let command, let body, _) = error else {
                Issue.record("expected commandFailed, got \(String(describing: error))")
                return
            }
            #expect(command == "no-such-command")
            #expect(body.errorClass == "CommandNotFound")
            #expect(body.desc == "The command no-such-command has not been found")
            // The connection is still fine.
            #expect(try await connection.execute("query-status")["status"] == "running")
        }
    }

    @Test func fiftyConcurrentCommandsOnOneConnection() async throws {
        try await withQEMU { _, connection async throws in
            let statuses = try await withThrowingTaskGroup(of: JSONValue.self) { group in
                for _ in 0..<50 {
                    group.addTask { try await connection.execute("query-status") }
                }
                var all: [JSONValue] = []
                for try await status in group { all.append(status) }
                return all
            }
            #expect(statuses.count == 50)
            #expect(statuses.allSatisfy { $0["status"] == "running" })

            // The same through the callback API, all sent from the loop in one go.
            let answered = try await connection.eventLoop.flatSubmit {
                let promise = connection.eventLoop.makePromise(of: Int.self)
                var remaining = 50
                var ok = 0
                let sync = connection.syncOperations
                for _ in 0..<50 {
                    sync.send("query-status") { result in
                        #expect(connection.eventLoop.inEventLoop)
                        if case .success(let value) = result, value["status"] == "running" { ok += 1 }
                        remaining -= 1
                        if remaining == 0 { promise.succeed(ok) }
                    }
                }
                #expect(sync.pendingCount == 50)
                return promise.futureResult
            }.get()
            #expect(answered == 50)
        }
    }

    /// Commands go out without ids and replies are matched in order: pipelined commands whose
    /// answers differ (a status that depends on the stop or cont before it, an error that
    /// names its own command) each get their own reply from a real QEMU.
    @Test func pipelinedRepliesMatchTheirCommandsInOrder() async throws {
        try await withQEMU { _, connection async throws in
            let groups = 20
            let outcomes = try await connection.eventLoop.flatSubmit {
                let promise = connection.eventLoop.makePromise(of: [String].self)
                let sync = connection.syncOperations
                let names = (0..<groups).flatMap { g in ["stop", "query-status", "x-nope-\(g)", "cont", "query-status"] }
                var outcomes = [String](repeating: "", count: names.count)
                var remaining = names.count
                for (i, name) in names.enumerated() {
                    sync.send(name) { result in
                        switch result {
                        case .success(let value): outcomes[i] = "\(name): \(value["status"]?.stringValue ?? "ok")"
                        case .failure(.commandFailed(let command, let body, _)): outcomes[i] = "\(command): \(body.desc)"
                        case .failure(let error): outcomes[i] = "\(name): \(error)"
                        }
                        remaining -= 1
                        if remaining == 0 { promise.succeed(outcomes) }
                    }
                }
                #expect(sync.pendingCount == names.count)
                return promise.futureResult
            }.get()
            let expected = (0..<groups).flatMap { g in
                ["stop: ok", "query-status: paused", "x-nope-\(g): The command x-nope-\(g) has not been found", "cont: ok", "query-status: running"]
            }
            #expect(outcomes == expected)
        }
    }

    @Test func sigkillFailsAPendingCommandAsDisconnectedQuickly() async throws {
        try await withQEMU { qemu, connection async throws in
            // A stopped QEMU cannot answer: the command really pends.
            #expect(qemu.kill(SIGSTOP))
            let clock = ContinuousClock()
            let outcome = Mutex<(QMPClientError?, ContinuousClock.Instant?)>((nil, nil))
            let done = connection.eventLoop.makePromise(of: Void.self)
            connection.send("query-status", timeout: .seconds(30)) { result in
                if case .failure(let error) = result { outcome.withLock { $0 = (error, clock.now) } }
                done.succeed()
            }
            try await waitForPending(connection)
            #expect(outcome.withLock { $0.0 } == nil, "the command must still be pending")
            let killedAt = clock.now
            #expect(qemu.kill(SIGKILL))
            try await done.futureResult.get()
            let (error, failedAt) = outcome.withLock { $0 }
            guard case .disconnected(let command, let reason, _) = error else {
                Issue.record("expected disconnected, got \(String(describing: error))")
                return
            }
            #expect(command == "query-status")
            #expect(reason == .connectionReset || reason == .endOfFile)
            // Noticed through the socket's EOF/reset, not the 30 s command timeout: typically a
            // few ms; the bound leaves room for a loaded 2-core machine and still catches a
            // client that waits for the timeout.
            let elapsed = failedAt! - killedAt
            #expect(elapsed < .milliseconds(500), "failed \(elapsed) after SIGKILL")
            print("SIGKILL to disconnected: \(elapsed)")
            #expect(try await connection.closeFuture.get() == reason)
            #expect(!connection.isActive)
            // Sending on a closed connection fails at once, with the same reason.
            let late = await qmpError { _ = try await connection.execute("query-status") }
            #expect(late == .disconnected(command: "query-status", reason: reason, endpoint: qemu.qmpEndpoint))
            #expect(await qemu.waitForExit() == .signaled(signal: SIGKILL))
        }
    }

    @Test func commandTimeoutThenRecovery() async throws {
        let logs = LogCollector()
        try await withQEMU(logs: logs) { qemu, connection async throws in
            #expect(qemu.kill(SIGSTOP))
            let clock = ContinuousClock()
            let start = clock.now
            let error = await qmpError { _ = try await connection.execute("query-status", timeout: .milliseconds(200)) }
            let elapsed = clock.now - start
            #expect(error == .timeout(command: "query-status", after: .milliseconds(200), endpoint: qemu.qmpEndpoint))
            #expect(error?.description.contains("query-status") == true && error?.description.contains(qemu.qmpSocketPath) == true)
            #expect(elapsed >= .milliseconds(200) && elapsed < .seconds(2))
            #expect(qemu.kill(SIGCONT))
            // QEMU answers the timed-out command late, in order (dropped, logged); the next
            // reply is the new command's.
            #expect(try await connection.execute("query-status")["status"] == "running")
            #expect(connection.isActive)
            #expect(logs.contains("late reply"))
        }
    }

    @Test func closeFailsPendingCommandsAndEndsStreams() async throws {
        try await withQEMU { qemu, connection async throws in
            let stream = connection.events
            #expect(qemu.kill(SIGSTOP))
            let pending = Task { await qmpError { _ = try await connection.execute("query-status") } }
            try await waitForPending(connection)   // closed with the command in flight
            #expect(await connection.close() == .closedByClient)
            #expect(await pending.value == .disconnected(command: "query-status", reason: .closedByClient, endpoint: qemu.qmpEndpoint))
            #expect(!connection.isActive)
            var count = 0
            for await _ in stream { count += 1 }
            #expect(count == 0)
            qemu.kill(SIGCONT)
        }
    }

    @Test func quitSendsShutdownThenEndOfFile() async throws {
        try await withQEMU { qemu, connection async throws in
            let stream = connection.events
            #expect(try await connection.execute("quit") == [:])
            let shutdown = await firstEvent(in: stream, named: "SHUTDOWN")
            #expect(shutdown?.data["reason"] == "host-qmp-quit")
            #expect(try await connection.closeFuture.get() == .endOfFile)
            #expect(await qemu.waitForExit() == .exited(code: 0))
        }
    }

    @Test func countingGuestCounts() async throws {
        try await withQEMU(QEMUSpec(countingGuest: true)) { qemu, connection in
            #expect(qemu.commandLine.contains("if=floppy,format=raw,file=\(qemu.path("counting-guest.img")),readonly=on"))
            // Wait for the BIOS to boot the sector, then watch the counter move.
            var first: UInt32 = 0
            try await waitUntil("the guest to start counting") {
                first = try await CountingGuest.readCounter(connection)
                return first != 0
            }
            #expect(first > 0)
            var second = first
            try await waitUntil("the counter to move") {
                second = try await CountingGuest.readCounter(connection)
                return second != first
            }
            #expect(second > first)
            // Stopped, it stands still: the sleep is the time in which it must not count.
            _ = try await connection.execute("stop")
            let a = try await CountingGuest.readCounter(connection)
            try await Task.sleep(for: .milliseconds(30))
            let b = try await CountingGuest.readCounter(connection)
            #expect(a == b)
        }
    }

    @Test func secondClientTimesOutWaitingForTheGreeting() async throws {
        try await withQEMU { qemu, _ async throws in
            let clock = ContinuousClock()
            let start = clock.now
            let error = await qmpError {
                _ = try await QMPConnection.connect(
                    to: qemu.qmpEndpoint, on: testGroup, greetingTimeout: .milliseconds(300), logger: LogCollector().logger("qmp-test", level: .debug))
            }
            #expect(error == .greetingTimeout(endpoint: qemu.qmpEndpoint, after: .milliseconds(300)))
            #expect(error?.description.contains("another client may hold the monitor") == true)
            #expect(clock.now - start >= .milliseconds(300))
        }
    }

    @Test func aDroppedInstanceLeavesNoProcessBehind() async throws {
        func startAndDrop() throws -> (pid_t, String) {
            let qemu = try QEMUInstance.start()
            #expect(kill(qemu.pid, 0) == 0)
            return (qemu.pid, qemu.runDirectory)
        }
        let (pid, directory) = try startAndDrop()
        #expect(kill(pid, 0) != 0 && errno == ESRCH, "QEMU \(pid) still exists")
        #expect(access(directory, F_OK) != 0, "run directory removed")
    }

    @Test func qemuStderrIsCaptured() async throws {
        let qemu = try QEMUInstance.start(QEMUSpec(extraArguments: ["-no-such-option"]))
        let status = await qemu.waitForExit()
        #expect(status == .exited(code: 1))
        #expect(qemu.stderrText().contains("-no-such-option"))
        let directory = qemu.runDirectory
        await qemu.stop()
        #expect(access(directory, F_OK) != 0, "run directory removed")
    }
}

@Suite(.serialized, .timeLimit(.minutes(2)), .machine(.exclusive)) struct ConnectTests {
    @Test func connectTimeoutNamesTheEndpoint() async {
        let endpoint = QMPEndpoint.unix(path: "/tmp/colorun-no-such-dir-\(getpid())/qmp.sock")
        let clock = ContinuousClock()
        let start = clock.now
        let error = await qmpError {
            _ = try await QMPConnection.connect(to: endpoint, on: testGroup, connectTimeout: .milliseconds(200), logger: LogCollector().logger("qmp-test", level: .debug))
        }
        let elapsed = clock.now - start
        guard case .connectFailed(let failed, let reason) = error else {
            Issue.record("expected connectFailed, got \(String(describing: error))")
            return
        }
        #expect(failed == endpoint)
        #expect(reason.contains("within 200 ms") && reason.contains("No such file or directory"))
        #expect(error!.description.contains(endpoint.description))
        #expect(elapsed >= .milliseconds(190) && elapsed < .seconds(3), "\(elapsed)")
    }

    @Test func connectRetriesUntilQEMUListens() async throws {
        // Start connecting before QEMU exists; it listens on a second -qmp socket we chose.
        let path = "/tmp/colorun-late-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        defer { unlink(path) }
        let endpoint = QMPEndpoint.unix(path: path)
        // The sleep below only widens the window in which the client retries before QEMU
        // listens; the test cannot flake on it (a shorter window still connects).
        let connecting = Task { try await QMPConnection.connect(to: endpoint, on: testGroup, connectTimeout: .seconds(5), logger: LogCollector().logger("qmp-test", level: .debug)) }
        try await Task.sleep(for: .milliseconds(100))
        let qemu = try QEMUInstance.start(QEMUSpec(extraArguments: ["-qmp", "unix:\(path),server=on,wait=off"]))
        let connection = try await connecting.value
        #expect(try await connection.execute("query-status")["status"] == "running")
        await connection.close()
        await qemu.stop()
    }
}
