import CoreMetrics

/// The metrics colorun emits through swift-metrics. The library only records; the `colorun`
/// executable picks the backend (Prometheus on `--metrics-listen`).
///
/// Every value goes to `factory`, or to the global `MetricsSystem.factory` when it is nil
/// (read at each record, so a bootstrap after the options are built still counts). Tests pass
/// their own factory instead of bootstrapping the process-wide one.
public final class ColorunMetrics: Sendable {
    /// The metric names. Each has a HELP text in `help`, which docs/operations.md repeats.
    public enum Name {
        /// Timer: a checkpoint from its first command to its commit. Dimension `series`.
        public static let checkpointDuration = "colorun_checkpoint_duration_seconds"
        /// Timer: how long the guest(s) were paused by a good checkpoint. Dimension `series`.
        public static let pauseDuration = "colorun_checkpoint_pause_seconds"
        /// Counter: good checkpoints. Dimension `series`.
        public static let checkpoints = "colorun_checkpoints_total"
        /// Counter: failed checkpoints. Dimensions `series`, `step`.
        public static let checkpointFailures = "colorun_checkpoint_failures_total"
        /// Counter: failovers the policy performed.
        public static let failovers = "colorun_failovers_total"
        /// Timer: QMP command latency, request to reply. Dimension `command`.
        public static let qmpLatency = "colorun_qmp_command_duration_seconds"
        /// Counter: QMP commands that failed (error reply, timeout, lost connection). Dimension `command`.
        public static let qmpFailures = "colorun_qmp_command_failures_total"
        /// Gauge: 1 while the domain's monitor connection is open, 0 after it failed or closed
        /// (and for every domain at the end of a run). Dimension `domain`.
        public static let domainUp = "colorun_domain_up"
        /// Gauge: 1 while this node is fenced by the arbiter (it lost the key and paused its guarded domains). Dimension `pair`.
        public static let fenced = "colorun_fenced"
        /// Gauge: 1 while this node holds the arbiter's key (it may run as primary). Dimension `pair`.
        public static let holding = "colorun_arbiter_holding"

        public static let all = [
            checkpointDuration, pauseDuration, checkpoints, checkpointFailures, failovers, qmpLatency, qmpFailures, domainUp,
            fenced, holding,
        ]
        /// Emitted only by a run with an arbiter (`--etcd`).
        public static let arbiter = [fenced, holding]
    }

    /// The HELP text of each metric in `Name.all` (what a Prometheus exporter prints as `# HELP`).
    public static let help: [String: String] = [
        Name.checkpointDuration: "Duration of a good checkpoint, from its first command to its commit, by checkpoint series.",
        Name.pauseDuration: "How long a good checkpoint kept the guests paused, by checkpoint series.",
        Name.checkpoints: "Good checkpoints, by checkpoint series.",
        Name.checkpointFailures: "Failed checkpoints, by checkpoint series and the step that failed (stop, save, verify, restore, migrate, resume, commit).",
        Name.failovers: "Failovers the policy performed.",
        Name.qmpLatency: "QMP command latency from request to reply, by command.",
        Name.qmpFailures: "QMP commands that failed (an error reply, a timeout or a lost connection), by command.",
        Name.domainUp: "1 while colorun's monitor connection to the domain is open; 0 after it failed, was lost, or the run ended.",
        Name.fenced: "With --etcd: 1 while this host is fenced (it lost the pair's key and paused its guarded domains), by pair.",
        Name.holding: "With --etcd: 1 while this host holds the pair's key (it may run as primary), by pair.",
    ]

    /// HELP texts of a fleet instance's own metrics (`colorun fleet run`, module Fleet's
    /// `FleetMetrics`), emitted only there.
    public static let fleetHelp: [String: String] = [
        "colorun_fleet_owned_pairs": "Fleet: pairs this instance owns and runs now.",
        "colorun_fleet_pairs": "Fleet: pairs declared in etcd, as this instance last read them.",
        "colorun_fleet_unowned_pairs": "Fleet: declared pairs without an owner, as this instance last read them.",
        "colorun_fleet_nodes": "Fleet: live instances (each with a key on its lease), as this instance last read them.",
        "colorun_fleet_node_pairs": "Fleet: pairs each instance owns, as this instance last read etcd, by node.",
    ]

    private let explicitFactory: (any MetricsFactory)?

    public init(factory: (any MetricsFactory)? = nil) {
        self.explicitFactory = factory
    }

    private var factory: any MetricsFactory { explicitFactory ?? MetricsSystem.factory }

    func checkpointSucceeded(series: String, durationSeconds: Double, pauseMilliseconds: Double) {
        let dims = [("series", series)]
        Timer(label: Name.checkpointDuration, dimensions: dims, factory: factory).recordNanoseconds(Self.nanoseconds(durationSeconds))
        Timer(label: Name.pauseDuration, dimensions: dims, factory: factory).recordNanoseconds(Self.nanoseconds(pauseMilliseconds / 1000))
        Counter(label: Name.checkpoints, dimensions: dims, factory: factory).increment()
    }

    func checkpointFailed(series: String, step: String) {
        Counter(label: Name.checkpointFailures, dimensions: [("series", series), ("step", step)], factory: factory).increment()
    }

    func failover() {
        Counter(label: Name.failovers, factory: factory).increment()
    }

    func qmpCommand(_ command: String, seconds: Double, failed: Bool) {
        let dims = [("command", command)]
        Timer(label: Name.qmpLatency, dimensions: dims, factory: factory).recordNanoseconds(Self.nanoseconds(seconds))
        if failed { Counter(label: Name.qmpFailures, dimensions: dims, factory: factory).increment() }
    }

    func domain(_ name: String, up: Bool) {
        Gauge(label: Name.domainUp, dimensions: [("domain", name)], factory: factory).record(up ? 1 : 0)
    }

    func fenced(pair: String, _ fenced: Bool) {
        Gauge(label: Name.fenced, dimensions: [("pair", pair)], factory: factory).record(fenced ? 1 : 0)
    }

    func holding(pair: String, _ holding: Bool) {
        Gauge(label: Name.holding, dimensions: [("pair", pair)], factory: factory).record(holding ? 1 : 0)
    }

    static func nanoseconds(_ seconds: Double) -> Int64 {
        Int64(max(0, min(seconds * 1e9, Double(Int64.max / 2))))
    }
}
