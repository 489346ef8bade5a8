#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import JSON
import Logging
import QMP
import Synchronization

/// A swift-log handler writing one JSON object per line:
/// `{"ts":"2026-11-26T22:41:07.123Z","level":"info","label":"colorun","message":"...","metadata":{...}}`.
///
/// Only the executable installs it (`LoggingSystem.bootstrap`); `line(...)` is the pure
/// formatting, for tests.
public struct JSONLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .info
    public var metadataProvider: Logger.MetadataProvider?
    let label: String
    let write: @Sendable (String) -> Void

    public init(label: String, write: @escaping @Sendable (String) -> Void = JSONLogHandler.writeToStandardError) {
        self.label = label
        self.write = write
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let provided = metadataProvider?.get() { all.merge(provided) { _, new in new } }
        if let extra = event.metadata { all.merge(extra) { _, new in new } }
        write(Self.line(timestamp: Self.now(), level: event.level, label: label, message: "\(event.message)", metadata: all))
    }

    /// One log line (without the newline).
    public static func line(timestamp: String, level: Logger.Level, label: String, message: String,
                            metadata: Logger.Metadata) -> String {
        var object: [String: JSONValue] = [
            "ts": .string(timestamp), "level": .string(level.rawValue), "label": .string(label), "message": .string(message),
        ]
        if !metadata.isEmpty { object["metadata"] = .object(metadata.mapValues(json)) }
        // Keys in a fixed order, for people reading the raw lines.
        var out: [UInt8] = []
        out.append(UInt8(ascii: "{"))
        let order = ["ts", "level", "label", "message", "metadata"].filter { object[$0] != nil }
        for (i, key) in order.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            JSONEncoding.writeString(key, into: &out)
            out.append(UInt8(ascii: ":"))
            JSONEncoding.write(object[key]!, into: &out)
        }
        out.append(UInt8(ascii: "}"))
        return String(decoding: out, as: UTF8.self)
    }

    static func json(_ value: Logger.MetadataValue) -> JSONValue {
        switch value {
        case .string(let s): return .string(s)
        case .stringConvertible(let c): return .string(c.description)
        case .array(let a): return .array(a.map(json))
        case .dictionary(let d): return .object(d.mapValues(json))
        }
    }

    /// ISO 8601 UTC with milliseconds.
    public static func now() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = time_t(ts.tv_sec)
        var parts = tm()
        gmtime_r(&t, &parts)
        func pad(_ n: Int32, _ width: Int) -> String {
            let s = String(n)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
            + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(Int32(ts.tv_nsec / 1_000_000), 3))Z"
    }

    private static let stderrLock = Mutex(())

    @Sendable public static func writeToStandardError(_ line: String) {
        stderrLock.withLock { _ in
            var bytes = Array(line.utf8)
            bytes.append(UInt8(ascii: "\n"))
            bytes.withUnsafeBytes { buffer in
                var offset = 0
                while offset < buffer.count {
                    let n = writeStandardError(buffer.baseAddress! + offset, buffer.count - offset)
                    if n <= 0 { break }
                    offset += n
                }
            }
        }
    }
}

private func writeStandardError(_ pointer: UnsafeRawPointer, _ count: Int) -> Int {
    write(2, pointer, count)
}
