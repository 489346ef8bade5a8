/// A size in bytes as policies and options give it: a number of the default unit, or a
/// number with a unit: `B`, `KiB`/`K`, `MiB`/`M`, `GiB`/`G`, `TiB`/`T` (powers of 1024) or
/// `kB`, `MB`, `GB`, `TB` (powers of 1000). `"64MiB"`, `"1.5GiB"`, `"512K"`.
public struct LuaSize: Sendable, Hashable, CustomStringConvertible {
    public var bytes: Int

    public init(bytes: Int) { self.bytes = bytes }

    static let units: [(String, Double)] = [
        ("KiB", 1024), ("MiB", 1_048_576), ("GiB", 1_073_741_824), ("TiB", 1_099_511_627_776),
        ("kB", 1e3), ("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12),
        ("K", 1024), ("M", 1_048_576), ("G", 1_073_741_824), ("T", 1_099_511_627_776), ("B", 1),
    ]

    /// Parses `text`; a bare number counts `defaultUnit` bytes each (1: bytes).
    public init(parsing text: String, defaultUnit: Int = 1) throws(LuaHostError) {
        let t = text.trimmingSpaces()
        var number = Substring(t)
        var scale = Double(defaultUnit)
        for (unit, factor) in Self.units where t.hasSuffix(unit) {
            number = t.dropLast(unit.count)
            scale = factor
            break
        }
        let digits = number.trimmingSpaces()
        guard let value = Double(digits), value.isFinite, value >= 0, !digits.hasPrefix("+"), !digits.isEmpty,
              value * scale < 9.2e18 else {
            throw LuaHostError.message("bad size \"\(text)\": expected a number or a number with a unit: B, KiB, MiB, GiB, TiB (or K, M, G, T), kB, MB, GB, TB")
        }
        bytes = Int((value * scale).rounded())
    }

    public var description: String {
        for (unit, factor) in [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1024)] where bytes >= factor && bytes % factor == 0 {
            return "\(bytes / factor)\(unit)"
        }
        return "\(bytes)B"
    }
}
