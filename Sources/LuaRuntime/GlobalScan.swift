import CLua

/// A static pass over a compiled chunk, for `colorun check`: every read and write of a
/// global (through `_ENV`) and every field read of a global table (`qmp.stop`,
/// `colo.native.start`), in every function of the file, with its line.
///
/// The file is compiled (never run) in a bare state and dumped with `lua_dump`; the dump (Lua
/// 5.4's documented `luac` format: header, then each function prototype with its code,
/// constants, upvalues, nested prototypes and debug information) is read here. A global read
/// is `GETTABUP A B C` on an upvalue named `_ENV`; a write is `SETTABUP`; `GETFIELD A B C` on
/// a register that holds a global table (tracked through `MOVE`, forgotten at jump targets and
/// whenever the register is written by anything else) is a field read of that table. A
/// chunk with more than 255 constants in one function may reach a global through other
/// instructions: those accesses are not seen (the pass finds fewer, never wrong, problems).
public struct LuaGlobalScan: Sendable {
    public struct Access: Sendable, Hashable {
        public enum Kind: Sendable, Hashable {
            case read, write
        }
        public var kind: Kind
        /// The global's name (`qmp`), or a dotted path to a field of a global table (`qmp.stpo`).
        public var name: String
        public var line: Int
    }

    /// In source order (by line, then as compiled).
    public var accesses: [Access]

    /// Compiles the file at `path` (text only) and scans it; the error is the compile error
    /// (`path:line: message`) or why the dump could not be read.
    public static func scan(fileAt path: String) -> Result<LuaGlobalScan, ScanError> {
        guard let L = luaL_newstate() else { return .failure(ScanError("cannot create a Lua state")) }
        defer { lua_close(L) }
        guard luaL_loadfilex(L, path, "t") == LUA_OK else {
            return .failure(ScanError(String(lua: L, at: -1) ?? "cannot load \(path)"))
        }
        let sink = DumpSink()
        let status = withExtendedLifetime(sink) {
            lua_dump(L, { _, p, size, ud in
                guard let p, let ud else { return 0 }
                let sink = Unmanaged<DumpSink>.fromOpaque(ud).takeUnretainedValue()
                sink.bytes.append(contentsOf: UnsafeRawBufferPointer(start: p, count: size))
                return 0
            }, Unmanaged.passUnretained(sink).toOpaque(), 0)
        }
        guard status == 0 else { return .failure(ScanError("\(path): cannot dump the compiled chunk")) }
        do throws(ScanError) {
            var reader = DumpReader(bytes: sink.bytes)
            let main = try reader.chunk()
            var accesses: [Access] = []
            scan(main, into: &accesses)
            accesses.sort { $0.line < $1.line }
            return .success(LuaGlobalScan(accesses: accesses))
        } catch {
            return .failure(error)
        }
    }

    public struct ScanError: Error, Sendable, CustomStringConvertible {
        public var description: String
        init(_ text: String) { description = text }
    }

    // MARK: - The pass

    private static func scan(_ f: Prototype, into accesses: inout [Access]) {
        let env = Set(f.upvalueNames.enumerated().filter { $0.element == "_ENV" }.map(\.offset))
        let targets = jumpTargets(f.code)
        var holds: [Int: String] = [:]   // register -> global (or global field path) it holds
        for (pc, i) in f.code.enumerated() {
            if targets.contains(pc) { holds.removeAll() }
            let op = Int(i & 0x7F)
            let a = Int((i >> 7) & 0xFF)
            let b = Int((i >> 16) & 0xFF)
            let c = Int((i >> 24) & 0xFF)
            let k = (i >> 15) & 1 == 1
            let line = f.lines[pc]
            switch op {
            case Op.move:
                holds[a] = holds[b]
            case Op.gettabup:
                if env.contains(b), let name = f.string(c) {
                    accesses.append(Access(kind: .read, name: name, line: line))
                    holds[a] = name
                } else {
                    holds[a] = nil
                }
            case Op.settabup:
                if env.contains(a), let name = f.string(b) {
                    accesses.append(Access(kind: .write, name: name, line: line))
                }
            case Op.getfield:
                if let base = holds[b], let key = f.string(c) {
                    accesses.append(Access(kind: .read, name: base + "." + key, line: line))
                    holds[a] = base + "." + key
                } else {
                    holds[a] = nil
                }
            case Op.setfield:
                if let base = holds[a], let key = f.string(b) {
                    accesses.append(Access(kind: .write, name: base + "." + key, line: line))
                }
            case Op.selfOp:
                if let base = holds[b], k, let key = f.string(c) {
                    accesses.append(Access(kind: .read, name: base + "." + key, line: line))
                }
                holds[a] = nil
                holds[a + 1] = nil
            case Op.call, Op.tforcall, Op.vararg, Op.loadnil:
                // These write A and (possibly) every register above it.
                holds = holds.filter { $0.key < a }
            case Op.settable, Op.seti, Op.setupval, Op.jmp, Op.eq, Op.lt, Op.le, Op.eqk, Op.eqi, Op.lti,
                 Op.lei, Op.gti, Op.gei, Op.test, Op.close, Op.tbc, Op.return_, Op.return0, Op.return1,
                 Op.setlist, Op.mmbin, Op.mmbini, Op.mmbink, Op.extraarg, Op.varargprep:
                break   // they write no register (A is read)
            default:
                holds[a] = nil
            }
        }
        for p in f.protos { scan(p, into: &accesses) }
    }

    /// Instructions some jump lands on: what a register holds there depends on the path.
    private static func jumpTargets(_ code: [UInt32]) -> Set<Int> {
        var targets: Set<Int> = []
        for (pc, i) in code.enumerated() {
            let op = Int(i & 0x7F)
            let bx = Int(i >> 15)
            switch op {
            case Op.jmp:
                let sj = Int((i >> 7) & 0x1FF_FFFF) - 0xFF_FFFF
                targets.insert(pc + 1 + sj)
            case Op.forloop, Op.tforloop:
                targets.insert(pc + 1 - bx)
            case Op.forprep:
                targets.insert(pc + bx + 2)
            case Op.tforprep:
                targets.insert(pc + bx + 1)
            case Op.eq, Op.lt, Op.le, Op.eqk, Op.eqi, Op.lti, Op.lei, Op.gti, Op.gei, Op.test, Op.testset,
                 Op.lfalseskip, Op.loadkx:
                targets.insert(pc + 2)
            default:
                break
            }
        }
        return targets
    }

    /// Lua 5.4's opcodes (lopcodes.h) this pass looks at.
    private enum Op {
        static let move = 0, loadkx = 4, lfalseskip = 6, loadnil = 8, setupval = 10
        static let gettabup = 11, getfield = 14, settabup = 15, settable = 16, seti = 17, setfield = 18
        static let selfOp = 20, mmbin = 46, mmbini = 47, mmbink = 48
        static let close = 54, tbc = 55, jmp = 56, eq = 57, lt = 58, le = 59, eqk = 60, eqi = 61
        static let lti = 62, lei = 63, gti = 64, gei = 65, test = 66, testset = 67
        static let call = 68, return_ = 70, return0 = 71, return1 = 72
        static let forloop = 73, forprep = 74, tforprep = 75, tforcall = 76, tforloop = 77
        static let setlist = 78, vararg = 80, varargprep = 81, extraarg = 82
    }
}

private final class DumpSink {
    var bytes: [UInt8] = []
}

/// One function prototype of a dump: what the pass needs of it.
private struct Prototype {
    var code: [UInt32] = []
    var constants: [String?] = []   // string constants; nil for the others
    var upvalueNames: [String] = []
    var lines: [Int] = []           // the source line of each instruction
    var protos: [Prototype] = []

    func string(_ index: Int) -> String? {
        index < constants.count ? constants[index] : nil
    }
}

/// Reads Lua 5.4's dump format (lundump.c) on this machine's sizes.
private struct DumpReader {
    let bytes: [UInt8]
    var at = 0

    init(bytes: [UInt8]) { self.bytes = bytes }

    typealias ScanError = LuaGlobalScan.ScanError

    mutating func byte() throws(ScanError) -> UInt8 {
        guard at < bytes.count else { throw ScanError("truncated chunk dump") }
        defer { at += 1 }
        return bytes[at]
    }

    mutating func skip(_ n: Int) throws(ScanError) {
        guard n >= 0, at + n <= bytes.count else { throw ScanError("truncated chunk dump") }
        at += n
    }

    /// loadUnsigned: 7 bits a byte, most significant first, the last byte has bit 7 set.
    mutating func size() throws(ScanError) -> Int {
        var x = 0
        while true {
            let b = try byte()
            guard x < Int.max >> 8 else { throw ScanError("bad size in chunk dump") }
            x = (x << 7) | Int(b & 0x7F)
            if b & 0x80 != 0 { return x }
        }
    }

    mutating func string() throws(ScanError) -> String? {
        let n = try size()
        guard n > 0 else { return nil }
        let start = at
        try skip(n - 1)
        return String(decoding: bytes[start..<at], as: UTF8.self)
    }

    mutating func chunk() throws(ScanError) -> Prototype {
        // "\x1bLua", version 0x54, format 0, LUAC_DATA (6), sizes of Instruction,
        // lua_Integer, lua_Number, then LUAC_INT and LUAC_NUM.
        guard bytes.count > 32, Array(bytes[0..<4]) == [0x1B, 0x4C, 0x75, 0x61], bytes[4] == 0x54 else {
            throw ScanError("not a Lua 5.4 chunk dump")
        }
        guard bytes[12] == 4, bytes[13] == 8, bytes[14] == 8 else { throw ScanError("unexpected sizes in chunk dump") }
        at = 31
        _ = try byte()   // number of upvalues of the main closure
        return try function()
    }

    mutating func function() throws(ScanError) -> Prototype {
        var f = Prototype()
        _ = try string()                 // source
        let lineDefined = try size()
        _ = try size()                   // lastlinedefined
        try skip(3)                      // numparams, is_vararg, maxstacksize
        let ncode = try size()
        f.code.reserveCapacity(ncode)
        for _ in 0..<ncode {
            var word: UInt32 = 0
            for shift in stride(from: 0, to: 32, by: 8) { word |= UInt32(try byte()) << UInt32(shift) }
            f.code.append(word)
        }
        let nk = try size()
        for _ in 0..<nk {
            switch try byte() {
            case 0, 1, 17: f.constants.append(nil)                 // nil, false, true
            case 3, 19: try skip(8); f.constants.append(nil)       // integer, float
            case 4, 20: f.constants.append(try string() ?? "")     // short, long string
            default: throw ScanError("unknown constant type in chunk dump")
            }
        }
        let nup = try size()
        try skip(3 * nup)                // instack, idx, kind
        let np = try size()
        for _ in 0..<np { f.protos.append(try function()) }
        // Debug information: relative line of each instruction, absolute lines, locals, upvalue names.
        let nline = try size()
        let start = at
        try skip(nline)
        let relative = bytes[start..<at].map { Int(Int8(bitPattern: $0)) }
        var absolute: [Int: Int] = [:]
        let nabs = try size()
        for _ in 0..<nabs {
            let pc = try size()
            absolute[pc] = try size()
        }
        let nloc = try size()
        for _ in 0..<nloc {
            _ = try string()
            _ = try size()
            _ = try size()
        }
        let nupnames = try size()
        for _ in 0..<nupnames { f.upvalueNames.append(try string() ?? "") }
        var line = lineDefined
        for pc in 0..<ncode {
            if pc < relative.count {
                if relative[pc] == -0x80, let abs = absolute[pc] { line = abs } else { line += relative[pc] }
            }
            f.lines.append(line)
        }
        return f
    }
}
