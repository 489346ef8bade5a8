import JSON
import LuaRuntime
import NIOCore
import QEMULab
import QMP
import QMPClient

/// A standby QEMU that is being restored from a checkpoint.
struct LaunchedStandby: Sendable {
    var endpoint: QMPEndpoint
    var pid: Int32
    /// Where QEMU's stderr goes (its real reasons for a failed incoming migration).
    var stderrPath: String

    init(endpoint: QMPEndpoint, pid: Int32, stderrPath: String) {
        self.endpoint = endpoint
        self.pid = pid
        self.stderrPath = stderrPath
    }
}

/// Starts the QEMU process of a standby, with `-incoming` reading a checkpoint.
protocol StandbyLauncher: AnyObject {
    /// `spec` is the policy's restore table; `incoming` the `-incoming` argument to add.
    func launch(name: String, spec: JSONValue, incoming: String, stateDirectory: String) throws -> LaunchedStandby
}

/// The production launcher: the policy gives QEMU's command line (`qemu = {argv...}`) and
/// the monitor it opens (`qmp = "unix:..."`); colorun appends `-incoming` and starts QEMU
/// detached, so the standby outlives colorun.
final class DetachedStandbyLauncher: StandbyLauncher {
    func launch(name: String, spec: JSONValue, incoming: String, stateDirectory: String) throws -> LaunchedStandby {
        guard let argv = spec["qemu"]?.arrayValue?.compactMap(\.stringValue), !argv.isEmpty else {
            throw LuaHostError.message("remus.restore: 'qemu' (QEMU's command line as a list of strings) is required")
        }
        guard let qmp = spec["qmp"]?.stringValue else {
            throw LuaHostError.message("remus.restore: 'qmp' (the monitor the command line opens, unix:PATH or tcp:HOST:PORT) is required")
        }
        let endpoint: QMPEndpoint
        do {
            endpoint = try QMPEndpoint(parsing: qmp)
        } catch {
            throw LuaHostError.message("remus.restore: \(error)")
        }
        if argv.contains("-incoming") {
            throw LuaHostError.message("remus.restore: leave '-incoming' out of 'qemu'; colorun adds it")
        }
        let stderrPath = stateDirectory + "/standby-\(name).stderr"
        do {
            let disks = spec[PolicySession.standbyDiskArgumentsKey]?.arrayValue?.compactMap(\.stringValue) ?? []
            let pid = try DetachedQEMU.start(argv + disks + ["-incoming", incoming], stderrPath: stderrPath)
            return LaunchedStandby(endpoint: endpoint, pid: pid, stderrPath: stderrPath)
        } catch {
            throw LuaHostError.message("remus.restore: \(error)")
        }
    }
}

extension CheckpointEngine {
    /// Waits for a standby started with `-incoming` to finish loading, then resumes it.
    /// Returns the milliseconds from the call to the VM running.
    /// With `resume: false` it returns once loaded, leaving the standby paused.
    static func bringUpStandby(
        _ domain: some CheckpointTarget, resume: Bool = true, pollInterval: Duration = .milliseconds(2), timeout: Duration = .seconds(30)
    ) async throws(DomainError) -> Double {
        let clock = ContinuousClock()
        let start = clock.now
        let deadline = start + timeout
        while true {
            let status = try await domain.execute("query-status", nil)["status"]?.stringValue ?? ""
            switch status {
            case "running":
                return milliseconds(clock.now - start)
            case "inmigrate", "prelaunch":
                if clock.now > deadline {
                    throw DomainError(domain: domain.name, command: "query-status", errorClass: DomainError.timeout,
                                      desc: "the incoming checkpoint did not finish loading within \(timeout)")
                }
                try? await Task.sleep(for: pollInterval)
            case "paused", "postmigrate", "restore-vm", "finish-migrate":
                // Loaded: the standby waits for `cont`.
                if resume { _ = try await domain.execute("cont", nil) }
                return milliseconds(clock.now - start)
            default:
                throw DomainError(domain: domain.name, command: "query-status", errorClass: "RestoreFailed",
                                  desc: "the standby is '\(status)' after loading the checkpoint")
            }
        }
    }
}
