import Colorun
import LuaRuntime

/// The end-of-run summary the operator reads (stdout), built from a `PolicyReport`.
public enum PolicySummary {
    /// The summary as lines of text. `elapsedSeconds` is the wall time of the run.
    public static func format(_ report: PolicyReport, policy: String, elapsedSeconds: Double) -> String {
        var lines: [String] = []
        let outcome: String
        switch report.outcome {
        case .finished: outcome = "finished"
        case .stopped: outcome = "stopped"
        case .failed: outcome = "FAILED"
        }
        lines.append("colorun: \(policy) \(outcome) after \(elapsed(elapsedSeconds))")
        if case .failed(let failure) = report.outcome {
            lines.append("  error:         \(failure.message)")
        }
        lines.append("  checkpoints:   \(report.checkpoints) ok, \(report.failedCheckpoints) failed, \(report.skippedTicks) skipped tick(s)")
        let pauses = report.pauseMilliseconds.sorted()
        if pauses.isEmpty {
            lines.append("  pause:         -")
        } else {
            let p50 = percentile(pauses, 0.50), p99 = percentile(pauses, 0.99)
            lines.append("  pause:         p50 \(milliseconds(p50)), p99 \(milliseconds(p99)), max \(milliseconds(pauses.last!))")
        }
        lines.append("  failovers:     \(report.failovers)")
        if report.lastGood.isEmpty {
            lines.append("  last good:     -")
        } else {
            for (i, series) in report.lastGood.keys.sorted().enumerated() {
                let label = i == 0 ? "  last good:     " : "                 "
                lines.append("\(label)\(series) generation \(report.lastGood[series]!)")
            }
        }
        if !report.recovered.isEmpty {
            lines.append("  recovered:     \(report.recovered.joined(separator: ", ")) (left paused by a previous run, resumed)")
        }
        if !report.resumedAtExit.isEmpty {
            lines.append("  resumed:       \(report.resumedAtExit.joined(separator: ", ")) (left stopped by the policy, resumed at exit)")
        }
        for failure in report.unresumed {
            lines.append("  NOT RESUMED:   \(failure)  <-- this VM may still be paused: check it now")
        }
        return lines.joined(separator: "\n")
    }

    /// The nearest-rank percentile of sorted values (`q` in 0...1).
    public static func percentile(_ sorted: [Double], _ q: Double) -> Double {
        guard !sorted.isEmpty else { return 0 }
        let rank = Int((q * Double(sorted.count)).rounded(.up))
        return sorted[min(max(rank, 1), sorted.count) - 1]
    }

    /// `0.42 ms`, `3.1 ms`, `250 ms`, `1.25 s`
    public static func milliseconds(_ ms: Double) -> String {
        if ms >= 1000 { return format(ms / 1000, digits: 2) + " s" }
        if ms >= 100 { return format(ms, digits: 0) + " ms" }
        if ms >= 10 { return format(ms, digits: 1) + " ms" }
        return format(ms, digits: 2) + " ms"
    }

    /// `12.3s`, `4m05s`, `2h03m`
    public static func elapsed(_ seconds: Double) -> String {
        if seconds < 60 { return format(seconds, digits: 1) + "s" }
        let s = Int(seconds)
        if s < 3600 { return "\(s / 60)m" + pad(s % 60) + "s" }
        return "\(s / 3600)h" + pad(s / 60 % 60) + "m"
    }

    static func pad(_ n: Int) -> String { n < 10 ? "0\(n)" : "\(n)" }

    static func format(_ value: Double, digits: Int) -> String {
        var scale = 1.0
        for _ in 0..<digits { scale *= 10 }
        let rounded = (value * scale).rounded() / scale
        if digits == 0 { return String(Int(rounded)) }
        let whole = Int(rounded)
        var fraction = String(Int(((rounded - Double(whole)) * scale).rounded()))
        while fraction.count < digits { fraction = "0" + fraction }
        return "\(whole).\(fraction)"
    }
}
