import Logging
import NIOCore
import NIOPosix
import QEMULab
import QMP
import QMPClient
import Synchronization
import Testing

/// Log lines captured for assertions (tests never bootstrap the logging system).
final class LogCapture: Sendable {
    private let lines = Mutex<[String]>([])

    func append(_ line: String) { lines.withLock { $0.append(line) } }
    var all: [String] { lines.withLock { $0 } }
    func contains(_ text: String) -> Bool { all.contains { $0.contains(text) } }

    var logger: Logger {
        Logger(label: "qmp-test") { _ in CapturingLogHandler(capture: self) }
    }
}

struct CapturingLogHandler: LogHandler {
    let capture: LogCapture
    var logLevel: Logger.Level = .debug
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let all = metadata.merging(event.metadata ?? [:]) { _, new in new }
        capture.append("\(event.level) \(event.message) \(all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))")
    }
}

/// One loop for all tests (tests run in parallel; each connection is bound to a loop of this group).
let testGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton

/// Starts a QEMU, connects, runs `body`, and always closes and stops the QEMU.
func withQEMU<T>(
    _ spec: QEMUSpec = QEMUSpec(),
    commandTimeout: TimeAmount = .seconds(10),
    logs: LogCapture = LogCapture(),
    _ body: (QEMUInstance, QMPConnection) async throws -> T
) async throws -> T {
    let qemu = try QEMUInstance.start(spec)
    let connection: QMPConnection
    do {
        connection = try await qemu.connect(on: testGroup, commandTimeout: commandTimeout, logger: logs.logger)
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
