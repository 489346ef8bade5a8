import NIOCore

/// A duration given by a policy: seconds as a number (`0.2`, `5`) or a string with a unit:
/// `"500us"`, `"200ms"`, `"1.5s"`, `"2m"`, `"1h"` (a bare numeric string means seconds).
public struct LuaDuration: Sendable, Hashable, CustomStringConvertible {
    public var seconds: Double

    public init(seconds: Double) { self.seconds = seconds }

    public init(parsing text: String) throws {
        let t = text.trimmingSpaces()
        var numberEnd = t.startIndex
        while numberEnd < t.endIndex, t[numberEnd].isNumber || t[numberEnd] == "." { numberEnd = t.index(after: numberEnd) }
        let unit = String(t[numberEnd...]).trimmingSpaces()
        guard let value = Double(t[..<numberEnd]), value.isFinite, value >= 0 else {
            throw LuaDuration.badDuration(text)
        }
        let scale: Double
        switch unit {
        case "us": scale = 1e-6
        case "ms": scale = 1e-3
        case "s", "": scale = 1
        case "m": scale = 60
        case "h": scale = 3600
        default: throw LuaDuration.badDuration(text)
        }
        self.seconds = value * scale
    }

    static func badDuration(_ text: String) -> LuaHostError {
        .message("bad duration \"\(text)\": expected seconds as a number or a string like \"500us\", \"200ms\", \"1.5s\", \"2m\", \"1h\"")
    }

    public var timeAmount: TimeAmount {
        .nanoseconds(Int64(min(seconds * 1e9, Double(Int64.max / 2))))
    }

    public var description: String {
        seconds < 1 ? "\(Int((seconds * 1000).rounded()))ms" : "\(seconds)s"
    }
}

extension StringProtocol {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return String(s)
    }
}
