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

    public init() {}

    /// `checkpoints 42 ok, 1 failed | last pause 3.1 ms | generation 42 | skipped 0 | failovers 0`
    public func line(elapsedSeconds: Double? = nil) -> String {
        var parts = ["checkpoints \(checkpoints) ok, \(failedCheckpoints) failed"]
        parts.append("last pause " + (lastPauseMilliseconds.map { PolicySummary.milliseconds($0) } ?? "-"))
        parts.append("generation " + (lastGeneration.map(String.init) ?? "-"))
        if skippedTicks > 0 { parts.append("skipped \(skippedTicks)") }
        if failovers > 0 { parts.append("failovers \(failovers)") }
        if let elapsedSeconds { parts.insert(PolicySummary.elapsed(elapsedSeconds), at: 0) }
        return parts.joined(separator: " | ")
    }
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
            return status
        }
    }

    /// Feeds the metrics from a finished checkpoint (called on the loop by the bindings).
    func recordMetrics(series: String, started: NIODeadline, _ result: Result<CheckpointResult, CheckpointError>) {
        let metrics = options.domainOptions.metrics
        switch result {
        case .success(let checkpoint):
            let seconds = Double((NIODeadline.now() - started).nanoseconds) / 1e9
            metrics.checkpointSucceeded(series: series, durationSeconds: seconds, pauseMilliseconds: checkpoint.pauseMilliseconds)
        case .failure(let error):
            metrics.checkpointFailed(series: series, step: error.step)
        }
    }
}
