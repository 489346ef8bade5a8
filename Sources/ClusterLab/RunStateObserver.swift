import JSON
import Logging
import NIOCore
import NIOPosix
import QMPClient
import Synchronization

/// What one sample saw of a VM.
public enum ObservedState: Sendable, Hashable, CustomStringConvertible {
    /// `query-status` said running: the guest runs (as a primary, for a replicated pair).
    case running
    /// `query-status` answered another status (paused, inmigrate, postmigrate, ...).
    case stopped(String)
    /// No monitor: the QEMU is not there yet, is gone, or did not answer in time.
    case unreachable

    public var isRunning: Bool { self == .running }

    public var description: String {
        switch self {
        case .running: "running"
        case .stopped(let status): status
        case .unreachable: "unreachable"
        }
    }
}

/// One sample: when `query-status` was sent (since the observer started) and its answer.
public struct ObservedSample: Sendable, Hashable {
    public var at: Duration
    public var state: ObservedState

    public init(at: Duration, state: ObservedState) {
        self.at = at
        self.state = state
    }
}

/// An independent witness of which VMs run: its own QMP monitor on each QEMU (QEMU accepts
/// several `-qmp` options, each a monitor of its own), asking `query-status` every `interval`
/// (10 ms) while it runs, reconnecting whenever a monitor is missing (a standby not started
/// yet, a QEMU killed). It never sends anything but `query-status`. Samples are timed by the
/// observer's clock; `mark` puts a test's events on the same clock.
public final class RunStateObserver: Sendable {
    public let interval: Duration
    private let endpoints: [String: QMPEndpoint]
    private let group: any EventLoopGroup
    private let logger: Logger
    private let clock = ContinuousClock()
    private let started: ContinuousClock.Instant

    private struct State {
        var samples: [String: [ObservedSample]] = [:]
        var marks: [(at: Duration, event: String)] = []
        var tasks: [Task<Void, Never>] = []
        var stopped = false
    }

    private let state = Mutex(State())

    /// Starts sampling `vms` (name → the observer's own monitor) at once.
    public init(
        _ vms: [String: QMPEndpoint], interval: Duration = .milliseconds(10),
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, logger: Logger
    ) {
        endpoints = vms
        self.interval = interval
        self.group = group
        self.logger = logger
        started = clock.now
        let tasks = vms.keys.sorted().map { name in
            Task { [self] in await sample(name) }
        }
        state.withLock { $0.tasks = tasks }
    }

    deinit {
        for task in state.withLock({ $0.tasks }) { task.cancel() }
    }

    /// Time since the observer started.
    public var now: Duration { clock.now - started }

    /// Records `event` at `now`.
    @discardableResult
    public func mark(_ event: String) -> Duration {
        let at = now
        state.withLock { $0.marks.append((at, event)) }
        logger.info("observer: \(event)", metadata: ["at_ms": .stringConvertible(at.wholeMilliseconds)])
        return at
    }

    /// What has been seen so far.
    public var timeline: RunStateTimeline {
        state.withLock { RunStateTimeline(samples: $0.samples, marks: $0.marks, end: now) }
    }

    /// The latest sample of `vm`.
    public func latest(_ vm: String) -> ObservedState? {
        state.withLock { $0.samples[vm]?.last?.state }
    }

    /// Stops sampling (waits for the samplers to close their monitors) and returns everything seen.
    public func stop() async -> RunStateTimeline {
        let tasks = state.withLock { state in
            state.stopped = true
            return state.tasks
        }
        for task in tasks { task.cancel() }
        for task in tasks { await task.value }
        return timeline
    }

    private var isStopped: Bool { state.withLock { $0.stopped } }

    private func sample(_ name: String) async {
        guard let endpoint = endpoints[name] else { return }
        var connection: QMPConnection?
        var next = clock.now
        while !isStopped && !Task.isCancelled {
            let at = clock.now - started
            var observed = ObservedState.unreachable
            if connection == nil {
                connection = try? await QMPConnection.connect(
                    to: endpoint, on: group, connectTimeout: .milliseconds(1), greetingTimeout: .seconds(1),
                    commandTimeout: .milliseconds(500), enableOOB: false, logger: logger)
            }
            if let current = connection {
                do {
                    let reply = try await current.execute("query-status")
                    let status = reply["status"]?.stringValue ?? "?"
                    observed = status == "running" ? .running : .stopped(status)
                } catch {
                    _ = await current.close()
                    connection = nil
                }
            }
            state.withLock { $0.samples[name, default: []].append(ObservedSample(at: at, state: observed)) }
            next = max(next + interval, clock.now)
            try? await clock.sleep(until: next)
        }
        if let connection { _ = await connection.close() }
    }
}

/// The samples of a run, and what they say about double primaries.
///
/// A VM counts as running from a sample that saw it running until its next sample (or the end
/// of the run): with 10 ms samples, a figure is good to about 10 ms per change of state, and
/// errs towards more running, never less.
public struct RunStateTimeline: Sendable {
    public var samples: [String: [ObservedSample]]
    public var marks: [(at: Duration, event: String)]
    public var end: Duration

    public init(samples: [String: [ObservedSample]], marks: [(at: Duration, event: String)], end: Duration) {
        self.samples = samples
        self.marks = marks
        self.end = end
    }

    /// The spans during which `vm` ran, in order, adjacent ones merged.
    public func runningSpans(_ vm: String) -> [Range<Duration>] {
        let list = samples[vm] ?? []
        var spans: [Range<Duration>] = []
        for (i, sample) in list.enumerated() where sample.state.isRunning {
            let until = i + 1 < list.count ? list[i + 1].at : end
            guard until > sample.at else { continue }
            if let last = spans.last, last.upperBound >= sample.at {
                spans[spans.count - 1] = last.lowerBound..<max(last.upperBound, until)
            } else {
                spans.append(sample.at..<until)
            }
        }
        return spans
    }

    /// How long `a` and `b` ran at the same time (after `from`).
    public func overlap(_ a: String, _ b: String, from: Duration = .zero) -> Duration {
        overlap([a, b], from: from)
    }

    /// How long two or more of `vms` ran at the same time (after `from`): the time a pair had
    /// two primaries.
    public func overlap(_ vms: [String], from: Duration = .zero) -> Duration {
        var events: [(at: Duration, delta: Int)] = []
        for vm in Set(vms) {
            for span in runningSpans(vm) {
                events.append((span.lowerBound, 1))
                events.append((span.upperBound, -1))
            }
        }
        // Ends before starts at the same instant: touching spans do not overlap.
        events.sort { $0.at != $1.at ? $0.at < $1.at : $0.delta < $1.delta }
        var total = Duration.zero
        var running = 0
        var last = Duration.zero
        for event in events {
            if running >= 2 {
                let low = max(last, from)
                if event.at > low { total += event.at - low }
            }
            running += event.delta
            last = event.at
        }
        return total
    }

    /// The first time at or after `after` a sample saw `vm` running.
    public func firstRunning(_ vm: String, after: Duration = .zero) -> Duration? {
        samples[vm]?.first { $0.at >= after && $0.state.isRunning }?.at
    }

    /// The first time at or after `after` a sample saw `vm` not running.
    public func firstNotRunning(_ vm: String, after: Duration = .zero) -> Duration? {
        samples[vm]?.first { $0.at >= after && !$0.state.isRunning }?.at
    }

    /// Whether any sample at or after `after` saw `vm` running.
    public func ranAfter(_ vm: String, _ after: Duration) -> Bool { firstRunning(vm, after: after) != nil }

    /// The first span of `vm` not running that is at least `atLeast` long, starting at or
    /// after `after` (a checkpoint's pause lasts milliseconds, a fence or a death much longer).
    public func firstStop(_ vm: String, after: Duration, atLeast: Duration) -> Duration? {
        let list = (samples[vm] ?? []).filter { $0.at >= after }
        var start: Duration?
        for sample in list {
            if sample.state.isRunning {
                start = nil
            } else {
                if start == nil { start = sample.at }
                if let start, sample.at - start >= atLeast { return start }
            }
        }
        if let start, end - start >= atLeast { return start }
        return nil
    }

    /// A short text of each VM's state changes, for a failing test's message.
    public func summary() -> String {
        var lines: [String] = []
        for name in samples.keys.sorted() {
            var changes: [String] = []
            var last: ObservedState?
            for sample in samples[name] ?? [] where sample.state != last {
                changes.append("\(sample.at.wholeMilliseconds)ms \(sample.state)")
                last = sample.state
            }
            lines.append("\(name): " + changes.joined(separator: ", "))
        }
        lines.append("marks: " + marks.map { "\($0.at.wholeMilliseconds)ms \($0.event)" }.joined(separator: ", "))
        return lines.joined(separator: "\n")
    }
}

extension Duration {
    /// Whole milliseconds.
    public var wholeMilliseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1000 + attoseconds / 1_000_000_000_000_000
    }
}
