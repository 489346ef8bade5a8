import Logging
import Synchronization

/// One log event as a collecting logger saw it.
public struct LogRecord: Sendable {
    /// nil for a raw line given to `LogCollector.append(_:)`.
    public var level: Logger.Level?
    public var label: String
    public var message: String
    /// The metadata (handler's, provider's and the event's), sorted by key.
    public var metadata: [(key: String, value: String)]

    /// `LEVEL MESSAGE KEY=VALUE...`, or the raw line.
    public var line: String {
        guard let level else { return message }
        let fields = metadata.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        return fields.isEmpty ? "\(level) \(message)" : "\(level) \(message) \(fields)"
    }
}

/// Keeps every log event of the loggers it makes (tests never bootstrap the logging system),
/// for tests that assert what the operator is told. Thread-safe.
public final class LogCollector: Sendable {
    private let stored = Mutex<[LogRecord]>([])

    public init() {}

    /// A logger whose events land here, at `level` and above.
    public func logger(_ label: String = "test", level: Logger.Level = .trace) -> Logger {
        var logger = Logger(label: label) { label in CollectingLogHandler(label: label, collector: self) }
        logger.logLevel = level
        return logger
    }

    /// Records a line as it is (for writers that format their own lines).
    public func append(_ line: String) {
        stored.withLock { $0.append(LogRecord(level: nil, label: "", message: line, metadata: [])) }
    }

    func record(_ record: LogRecord) { stored.withLock { $0.append(record) } }

    public var records: [LogRecord] { stored.withLock { $0 } }

    /// Every event as `LEVEL MESSAGE KEY=VALUE...` (raw lines as given).
    public var lines: [String] { records.map(\.line) }

    public var text: String { lines.joined(separator: "\n") }

    /// Whether some line contains `needle`.
    public func contains(_ needle: String) -> Bool { lines.contains { $0.contains(needle) } }

    /// How many lines contain `needle`.
    public func count(_ needle: String) -> Int { lines.filter { $0.contains(needle) }.count }
}

/// The handler behind `LogCollector.logger(_:level:)`.
public struct CollectingLogHandler: LogHandler {
    public let label: String
    public let collector: LogCollector
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    public var logLevel: Logger.Level = .trace

    public init(label: String, collector: LogCollector) {
        self.label = label
        self.collector = collector
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadata
        for (k, v) in metadataProvider?.get() ?? [:] { all[k] = v }
        for (k, v) in event.metadata ?? [:] { all[k] = v }
        let fields = all.sorted { $0.key < $1.key }.map { (key: $0.key, value: "\($0.value)") }
        collector.record(LogRecord(level: event.level, label: label, message: "\(event.message)", metadata: fields))
    }
}
