import Colorun

extension PolicyStatus {
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
