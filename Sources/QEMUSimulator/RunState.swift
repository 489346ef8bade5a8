/// QEMU's run states (qapi `RunState`), as `query-status` reports them.
public enum RunState: String, Sendable, Hashable, CaseIterable {
    case debug
    case inmigrate
    case internalError = "internal-error"
    case ioError = "io-error"
    case paused
    case postmigrate
    case prelaunch
    case finishMigrate = "finish-migrate"
    case restoreVM = "restore-vm"
    case running
    case saveVM = "save-vm"
    case shutdown
    case suspended
    case watchdog
    case guestPanicked = "guest-panicked"
    case colo

    /// `running` in `query-status`: true only for `running`.
    public var isRunning: Bool { self == .running }
}

/// COLO's mode as `query-colo-status` reports it.
public enum COLOMode: String, Sendable, Hashable {
    case none
    case primary
    case secondary
}

/// The status of the last outgoing migration (`query-migrate`).
public enum SimulatedMigration: Sendable, Hashable {
    case completed(uri: String, bytes: Int, totalTimeMs: Int)
    case failed(errorDesc: String)
}
