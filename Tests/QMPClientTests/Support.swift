import ColorunTestSupport
import Logging
import NIOCore
import NIOPosix
import QEMULab
import QMP
import QMPClient
import Testing

/// One loop for all tests (tests run in parallel; each connection is bound to a loop of this group).
let testGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton

/// Starts a QEMU, connects, runs `body`, and always closes and stops the QEMU.
func withQEMU<T>(
    _ spec: QEMUSpec = QEMUSpec(),
    commandTimeout: TimeAmount = .seconds(10),
    logs: LogCollector = LogCollector(),
    _ body: (QEMUInstance, QMPConnection) async throws -> T
) async throws -> T {
    let qemu = try QEMUInstance.start(spec)
    let connection: QMPConnection
    do {
        connection = try await qemu.connect(on: testGroup, commandTimeout: commandTimeout, logger: logs.logger("qmp-test", level: .debug))
    } catch {
        let stderr = qemu.stderrText()
        await qemu.stop()
        Issue.record("QEMU stderr: \(stderr)")
        throw error
    }
    do {
        let result = try await body(qemu, connection)
        await connection.close()
        await qemu.stop()
        return result
    } catch {
        await connection.close()
        await qemu.stop()
        throw error
    }
}

/// Waits for the first element of `stream` matching `predicate`, or nil after `timeout`.
func firstEvent(
    in stream: QMPEventStream, named name: String, timeout: Duration = .seconds(5)
) async -> QMPEvent? {
    await withTaskGroup(of: QMPEvent?.self) { group in
        group.addTask {
            for await event in stream where event.name == name { return event }
            return nil
        }
        group.addTask {
            try? await Task.sleep(for: timeout)
            return nil
        }
        let first = await group.next() ?? nil
        group.cancelAll()
        return first
    }
}

/// The failure of `body`, as a `QMPClientError`, or nil if it succeeded.
func qmpError(_ body: () async throws -> Void) async -> QMPClientError? {
    do {
        try await body()
        return nil
    } catch let error as QMPClientError {
        return error
    } catch {
        Issue.record("not a QMPClientError: \(error)")
        return nil
    }
}

/// Waits until at least `count` commands are pending on `connection` (sent and unanswered):
/// the signal that a command issued from another task has gone out before the next one.
func waitForPending(_ connection: QMPConnection, count: Int = 1) async throws {
    try await waitUntil("\(count) pending command(s) on \(connection.endpoint)") {
        try await connection.eventLoop.submit { connection.syncOperations.pendingCount }.get() >= count
    }
}
