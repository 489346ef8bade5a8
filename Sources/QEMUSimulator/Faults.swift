/// A scripted fault: what goes wrong, and when.
///
/// Text form (one per line in a faults file, `#` starts a comment):
///
///     TRIGGER:ACTION[,after=N][,count=N][,at=DURATION][,desc=TEXT]
///
/// `TRIGGER` is a command name, `*` for any command, or `@DURATION` for a fault that
/// fires by itself that long after the domain started. See `docs/simulator.md`.
public struct SimulatedFault: Sendable, Hashable, CustomStringConvertible {
    public enum Trigger: Sendable, Hashable {
        /// A command by name; `"*"` matches every command.
        case command(String)
        /// Fires once, by itself, this long after the domain started.
        case time(Duration)
    }

    public enum Action: Sendable, Hashable {
        /// Run the command, send its reply (and events) this much later; later commands queue behind it.
        case delay(Duration)
        /// Never reply: the command does not run, and this connection answers nothing more.
        case hang
        /// Close the connection instead of replying (the command does not run).
        case drop
        /// Reply with this error instead of running the command.
        case error(errorClass: String, desc: String)
        /// The process dies: a save or migrate writes only this many bytes of its file first
        /// (nil: nothing), connections drop, and new connections are refused.
        case crash(afterBytes: Int?)
        /// The domain stops answering on every connection, new ones included (no greeting),
        /// while sockets stay open and bytes are accepted. `SimulatedDomain.unfreeze()` ends it.
        case freeze
        /// Send this line (not JSON) before the reply.
        case junk(String)
        /// Send one line of this many bytes (a JSON event padded with `x`) before the reply.
        case oversized(bytes: Int)
        /// Send the reply with an id the client never used.
        case wrongID
        /// Send this many events (`RTC_CHANGE`) before the reply.
        case flood(events: Int)
    }

    public var trigger: Trigger
    public var action: Action
    /// The first `after` matching calls go through untouched.
    public var after: Int
    /// Applied at most this many times (nil: every time).
    public var count: Int?
    /// Only matches commands that arrive at least this long after the domain started.
    public var at: Duration?

    public init(trigger: Trigger, action: Action, after: Int = 0, count: Int? = nil, at: Duration? = nil) {
        self.trigger = trigger
        self.action = action
        self.after = after
        self.count = count
        self.at = at
    }

    /// Shorthand: `SimulatedFault("stop", .delay(.milliseconds(200)))`.
    public init(_ command: String, _ action: Action, after: Int = 0, count: Int? = nil, at: Duration? = nil) {
        self.init(trigger: .command(command), action: action, after: after, count: count, at: at)
    }

    public func matches(command: String) -> Bool {
        if case .command(let name) = trigger { return name == "*" || name == command }
        return false
    }

    // MARK: - Text form

    public var description: String {
        var parts: [String] = []
        switch action {
        case .delay(let d): parts.append("delay=\(Self.format(d))")
        case .hang: parts.append("hang")
        case .drop: parts.append("drop")
        case .error(let cls, _): parts.append("error=\(cls)")
        case .crash(let n): parts.append(n.map { "crash-after-bytes=\($0)" } ?? "crash")
        case .freeze: parts.append("freeze")
        case .junk(let text): parts.append("junk=\(text)")
        case .oversized(let n): parts.append("oversized=\(n)")
        case .wrongID: parts.append("wrong-id")
        case .flood(let n): parts.append("flood=\(n)")
        }
        if after > 0 { parts.append("after=\(after)") }
        if let count { parts.append("count=\(count)") }
        if let at { parts.append("at=\(Self.format(at))") }
        if case .error(_, let desc) = action { parts.append("desc=\(desc)") }
        let head: String
        switch trigger {
        case .command(let name): head = name
        case .time(let d): head = "@" + Self.format(d)
        }
        return head + ":" + parts.joined(separator: ",")
    }

    /// Parses one fault line.
    public init(parsing line: String) throws(SimulatedFaultSyntaxError) {
        let text = line.trimmingCharacters(in: " \t\r\n")
        guard let colon = text.firstIndex(of: ":") else {
            throw SimulatedFaultSyntaxError(line: line, reason: "expected TRIGGER:ACTION")
        }
        let head = String(text[..<colon])
        var body = String(text[text.index(after: colon)...])
        var desc: String?
        if let range = body.firstRange(of: "desc=") {
            desc = String(body[range.upperBound...])
            body = String(body[..<range.lowerBound])
            if body.hasSuffix(",") { body.removeLast() }
        }
        let trigger: Trigger
        if head.hasPrefix("@") {
            guard let d = Self.parseDuration(String(head.dropFirst())) else {
                throw SimulatedFaultSyntaxError(line: line, reason: "bad time '\(head)'")
            }
            trigger = .time(d)
        } else {
            guard !head.isEmpty, !head.contains(" ") else { throw SimulatedFaultSyntaxError(line: line, reason: "bad command '\(head)'") }
            trigger = .command(head)
        }
        var action: Action?
        var after = 0
        var count: Int?
        var at: Duration?
        for item in body.split(separator: ",") {
            let pair = item.split(separator: "=", maxSplits: 1).map { String($0).trimmingCharacters(in: " \t") }
            let key = pair[0]
            let value = pair.count > 1 ? pair[1] : nil
            func int() throws(SimulatedFaultSyntaxError) -> Int {
                guard let value, let n = Int(value), n >= 0 else { throw SimulatedFaultSyntaxError(line: line, reason: "'\(key)' needs a count") }
                return n
            }
            func duration() throws(SimulatedFaultSyntaxError) -> Duration {
                guard let value, let d = Self.parseDuration(value) else { throw SimulatedFaultSyntaxError(line: line, reason: "'\(key)' needs a duration") }
                return d
            }
            var parsed: Action?
            switch key {
            case "after": after = try int()
            case "count": count = try int()
            case "at": at = try duration()
            case "delay": parsed = .delay(try duration())
            case "hang": parsed = .hang
            case "drop": parsed = .drop
            case "error": parsed = .error(errorClass: value ?? "GenericError", desc: "")
            case "crash": parsed = .crash(afterBytes: nil)
            case "crash-after-bytes": parsed = .crash(afterBytes: try int())
            case "freeze": parsed = .freeze
            case "junk": parsed = .junk(value ?? "this is not JSON")
            case "oversized": parsed = .oversized(bytes: try int())
            case "wrong-id": parsed = .wrongID
            case "flood": parsed = .flood(events: try int())
            default: throw SimulatedFaultSyntaxError(line: line, reason: "unknown word '\(key)'")
            }
            if let parsed {
                guard action == nil else { throw SimulatedFaultSyntaxError(line: line, reason: "more than one action") }
                action = parsed
            }
        }
        guard var action else { throw SimulatedFaultSyntaxError(line: line, reason: "no action") }
        if case .error(let cls, _) = action {
            action = .error(errorClass: cls, desc: desc ?? "colorun simulated fault")
        } else if desc != nil {
            throw SimulatedFaultSyntaxError(line: line, reason: "desc= goes with error=")
        }
        self.init(trigger: trigger, action: action, after: after, count: count, at: at)
    }

    /// Parses a faults file: one fault per line; blank lines and `#` comments are skipped.
    public static func parseList(_ text: String) throws(SimulatedFaultSyntaxError) -> [SimulatedFault] {
        var faults: [SimulatedFault] = []
        for raw in text.split(whereSeparator: { $0 == "\n" || $0 == "\r" }) {
            let line = raw.trimmingCharacters(in: " \t")
            if line.isEmpty || line.hasPrefix("#") { continue }
            faults.append(try SimulatedFault(parsing: line))
        }
        return faults
    }

    /// `200ms`, `1.5s`, `500us`, `2m`; a bare number is milliseconds.
    public static func parseDuration(_ text: String) -> Duration? {
        let units: [(String, Double)] = [("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9), ("s", 1), ("m", 60)]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            guard let n = Double(text.dropLast(suffix.count)), n >= 0, n.isFinite else { return nil }
            return .nanoseconds(Int64((n * scale * 1e9).rounded()))
        }
        guard let n = Double(text), n >= 0, n.isFinite else { return nil }
        return .nanoseconds(Int64((n * 1e6).rounded()))
    }

    static func format(_ d: Duration) -> String {
        let ns = d.components.seconds * 1_000_000_000 + d.components.attoseconds / 1_000_000_000
        if ns % 1_000_000_000 == 0 { return "\(ns / 1_000_000_000)s" }
        if ns % 1_000_000 == 0 { return "\(ns / 1_000_000)ms" }
        if ns % 1_000 == 0 { return "\(ns / 1_000)us" }
        return "\(ns)ns"
    }
}

public struct SimulatedFaultSyntaxError: Error, Sendable, Hashable, CustomStringConvertible {
    public var line: String
    public var reason: String
    public var description: String { "bad fault '\(line)': \(reason)" }
}

/// The faults in force on a domain, with their counters. A plain struct.
public struct FaultSchedule: Sendable, Hashable {
    public private(set) var faults: [SimulatedFault]
    private var seen: [Int]
    private var applied: [Int]

    public init(_ faults: [SimulatedFault] = []) {
        self.faults = faults
        seen = Array(repeating: 0, count: faults.count)
        applied = Array(repeating: 0, count: faults.count)
    }

    public mutating func add(_ fault: SimulatedFault) {
        faults.append(fault)
        seen.append(0)
        applied.append(0)
    }

    /// The action for a command arriving `elapsed` after start: the first fault that
    /// matches, is past its `after` and `at`, and has count left. Counts every fault that
    /// matches the name.
    public mutating func action(for command: String, elapsed: Duration) -> SimulatedFault.Action? {
        var chosen: SimulatedFault.Action?
        for (i, fault) in faults.enumerated() where fault.matches(command: command) {
            if let at = fault.at, elapsed < at { continue }
            seen[i] += 1
            guard chosen == nil, seen[i] > fault.after else { continue }
            if let count = fault.count, applied[i] >= count { continue }
            applied[i] += 1
            chosen = fault.action
        }
        return chosen
    }

    /// The faults that fire by time.
    public var timed: [(after: Duration, action: SimulatedFault.Action)] {
        faults.compactMap { fault in
            if case .time(let d) = fault.trigger { return (d, fault.action) }
            return nil
        }
    }
}

extension String {
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let c = s.first, set.contains(c) { s = s.dropFirst() }
        while let c = s.last, set.contains(c) { s = s.dropLast() }
        return String(s)
    }
}

extension Substring {
    func trimmingCharacters(in set: String) -> String { String(self).trimmingCharacters(in: set) }
}
