import NIOCore

/// A cheap snapshot of a running session, for the operator's one-line live status.
public struct PolicyStatus: Sendable, Hashable {
    public var checkpoints = 0
    public var failedCheckpoints = 0
    public var skippedTicks = 0
    public var failovers = 0
    /// Pause of the newest good checkpoint, in milliseconds.
    public var lastPauseMilliseconds: Double?
    /// The newest good generation of any series.
    public var lastGeneration: Int?
    /// Checkpoints and restores running now (a fleet moves only a pair with none).
    public var inFlight = 0

    init() {}
}

extension PolicySession {
    /// The run's counts so far. Callable from any thread.
    public func status() -> EventLoopFuture<PolicyStatus> {
        eventLoop.submit { [self] in
            var status = PolicyStatus()
            status.checkpoints = report.checkpoints
            status.failedCheckpoints = report.failedCheckpoints
            status.skippedTicks = report.skippedTicks
            status.failovers = report.failovers
            status.lastPauseMilliseconds = report.pauseMilliseconds.last
            status.lastGeneration = report.lastGood.values.max()
            status.inFlight = inFlight
            return status
        }
    }
}
