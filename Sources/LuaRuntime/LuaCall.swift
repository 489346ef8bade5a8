import CLua
import CLuaShims
import JSON

/// A host function implemented in Swift, callable from Lua.
///
/// - `sync`: reads its arguments from the `LuaCall`, pushes results with `call.push(...)`,
///   or throws (the error becomes an ordinary Lua error, raised from C).
/// - `async`: reads its arguments, starts work, and returns; later (on the runtime's loop, or
///   from anywhere: the completion hops) it calls `completion.succeed(values)` or
///   `completion.fail(error)`. Lua sees an ordinary call that returns those values or raises
///   the error; meanwhile other tasks run. Throwing synchronously raises at once.
public enum LuaHostFunction {
    case sync((inout LuaCall) throws -> Void)
    case async((inout LuaCall, LuaCompletion) throws -> Void)
}

/// The arguments of a Lua → Swift call and the place to push its results.
///
/// Valid only during the call (it points into the Lua stack). Argument indices start at 1.
/// Accessors throw `LuaHostError`s worded like Lua's own ("bad argument #1 to 'sleep'
/// (number expected, got nil)").
public struct LuaCall {
    /// The running coroutine (or state) that called the function.
    public let state: OpaquePointer
    /// The runtime (use it to spawn tasks, reach the loop, push values).
    @inline(__always)
    public var runtime: LuaRuntime { runtimeRef.takeUnretainedValue() }
    /// Unretained: the state owner keeps the runtime and the box alive for the call, and a
    /// call that never touches them costs no retain/release (issue 14: the Lua → Swift call).
    let runtimeRef: Unmanaged<LuaRuntime>
    unowned(unsafe) let function: HostFunctionBox
    /// Number of arguments passed by Lua.
    public let argumentCount: Int
    /// Number of values pushed so far (the function's results).
    public internal(set) var resultCount: Int32 = 0

    /// The qualified name of the function, e.g. "qmp.stop".
    public var functionName: String { function.name }

    /// The Lua type of argument `i` (`.none` past the end).
    @inline(__always)
    public func type(_ i: Int) -> LuaType {
        LuaType(rawValue: lua_type(state, Int32(i))) ?? .none
    }

    public func isNil(_ i: Int) -> Bool { lua_type(state, Int32(i)) <= 0 }

    /// An argument error: "bad argument #i to 'name' (message)".
    public func argumentError(_ i: Int, _ message: String) -> LuaHostError {
        .message("bad argument #\(i) to '\(function.name)' (\(message))")
    }

    /// A type error: "bad argument #i to 'name' (expected expected, got actual)".
    public func typeError(_ i: Int, _ expected: String) -> LuaHostError {
        argumentError(i, "\(expected) expected, got \(type(i).name)")
    }

    /// Argument `i` as an integer (a float with an integral value is accepted).
    @inline(__always)
    public func integer(_ i: Int) throws -> Int64 {
        var ok: Int32 = 0
        let v = lua_tointegerx(state, Int32(i), &ok)
        if ok != 0 && lua_type(state, Int32(i)) == LUA_TNUMBER { return Int64(v) }
        throw lua_type(state, Int32(i)) == LUA_TNUMBER
            ? argumentError(i, "number has no integer representation") : typeError(i, "integer")
    }

    /// Argument `i` as a number.
    public func number(_ i: Int) throws -> Double {
        guard lua_type(state, Int32(i)) == LUA_TNUMBER else { throw typeError(i, "number") }
        return lua_tonumberx(state, Int32(i), nil)
    }

    /// Argument `i` as a string (strings only, no number coercion).
    public func string(_ i: Int) throws -> String {
        guard lua_type(state, Int32(i)) == LUA_TSTRING, let s = String(lua: state, at: Int32(i)) else {
            throw typeError(i, "string")
        }
        return s
    }

    public func optionalString(_ i: Int) throws -> String? { isNil(i) ? nil : try string(i) }
    public func optionalInteger(_ i: Int) throws -> Int64? { isNil(i) ? nil : try integer(i) }

    /// Argument `i` by Lua truthiness (nil and false are false).
    public func boolean(_ i: Int) -> Bool { lua_toboolean(state, Int32(i)) != 0 }

    /// Argument `i` converted to JSON (tables become objects or arrays; `json.null` is null).
    public func json(_ i: Int) throws -> JSONValue {
        do {
            return try runtime.toJSON(state, Int32(i), depth: 0)
        } catch let e as LuaHostError {
            throw argumentError(i, e.message)
        }
    }

    /// Argument `i` as a Swift object pushed earlier with `.object(...)`.
    public func object<T: AnyObject>(_ i: Int, as type: T.Type = T.self) throws -> T {
        if let p = clua_toobject(state, Int32(i)),
            let o = Unmanaged<AnyObject>.fromOpaque(p).takeUnretainedValue() as? T
        {
            return o
        }
        throw typeError(i, runtime.typeName(of: T.self))
    }

    /// Argument `i` as a function, anchored in the registry.
    public func function(_ i: Int) throws -> LuaRef {
        guard lua_type(state, Int32(i)) == LUA_TFUNCTION else { throw typeError(i, "function") }
        return runtime.makeRef(state, Int32(i))
    }

    /// Argument `i` (any type) anchored in the registry.
    public func ref(_ i: Int) -> LuaRef { runtime.makeRef(state, Int32(i)) }

    /// Argument `i` as a duration: seconds as a number, or a string such as "200ms", "1.5s".
    public func duration(_ i: Int) throws -> LuaDuration {
        switch type(i) {
        case .number:
            let s = lua_tonumberx(state, Int32(i), nil)
            guard s.isFinite, s >= 0 else { throw argumentError(i, "bad duration \(s): must be a non-negative number of seconds") }
            return LuaDuration(seconds: s)
        case .string:
            do {
                return try LuaDuration(parsing: try string(i))
            } catch let e as LuaHostError {
                throw argumentError(i, e.message)
            }
        default:
            throw typeError(i, "duration (seconds or a string like \"200ms\")")
        }
    }

    /// Field `key` of the table argument `i` (raw access), or nil.
    public func field(_ i: Int, _ key: String) throws -> JSONValue? {
        guard lua_type(state, Int32(i)) == LUA_TTABLE else { throw typeError(i, "table") }
        _ = clua_rawgetfield(state, Int32(i), key)
        defer { clua_pop(state, 1) }
        if lua_type(state, -1) == LUA_TNIL { return nil }
        return try runtime.toJSON(state, -1, depth: 0)
    }

    /// The array part (`t[1]` to `t[#t]`, raw accesses) of the table argument `i` as strings;
    /// a non-string element is an argument error naming it (`NAME[2] must be a string`).
    public func stringArray(_ i: Int, name: String) throws -> [String] {
        guard lua_type(state, Int32(i)) == LUA_TTABLE else { throw typeError(i, "table") }
        let n = lua_rawlen(state, Int32(i))
        var strings: [String] = []
        for k in stride(from: 1, through: Int(n), by: 1) {
            lua_rawgeti(state, Int32(i), lua_Integer(k))
            defer { clua_pop(state, 1) }
            guard lua_type(state, -1) == LUA_TSTRING, let s = String(lua: state, at: -1) else {
                throw argumentError(i, "\(name)[\(k)] must be a string")
            }
            strings.append(s)
        }
        return strings
    }

    /// Field `key` of the table argument `i` (raw access) as a duration, or nil when absent.
    public func durationField(_ i: Int, _ key: String) throws -> LuaDuration? {
        guard lua_type(state, Int32(i)) == LUA_TTABLE else { throw typeError(i, "table") }
        _ = clua_rawgetfield(state, Int32(i), key)
        defer { clua_pop(state, 1) }
        if lua_type(state, -1) == LUA_TNIL { return nil }
        return try duration(Int(lua_gettop(state)))
    }

    /// The value of argument `i` in Swift form: scalars as such, tables as `.json`, Swift
    /// objects as `.object`, functions and anything else as `.ref`.
    public func value(_ i: Int) throws -> LuaValue {
        try runtime.readValue(state, Int32(i))
    }

    // MARK: results

    @inline(__always)
    public mutating func push(_ value: LuaValue) {
        runtime.push(value, on: state)
        resultCount += 1
    }

    @inline(__always)
    public mutating func push(_ value: Int64) {
        lua_pushinteger(state, lua_Integer(value))
        resultCount += 1
    }

    @inline(__always)
    public mutating func push(_ value: Double) {
        lua_pushnumber(state, value)
        resultCount += 1
    }

    @inline(__always)
    public mutating func push(_ value: Bool) {
        lua_pushboolean(state, value ? 1 : 0)
        resultCount += 1
    }

    public mutating func push(_ value: String) {
        runtime.push(.string(value), on: state)
        resultCount += 1
    }

    public mutating func push(json value: JSONValue) {
        runtime.push(.json(value), on: state)
        resultCount += 1
    }

    public mutating func push(object: AnyObject) {
        runtime.push(.object(object), on: state)
        resultCount += 1
    }
}

/// Boxes a host function; the Lua closure holds its address as a light userdata.
///
/// Both bodies are stored non-optional (the unused one is a stub) and the runtime unretained,
/// so the dispatcher borrows them from the guaranteed box: a sync call makes no
/// retain/release (perf showed two pairs per call when they were optionals and `unowned`).
final class HostFunctionBox {
    let name: String
    let isSync: Bool
    let sync: (inout LuaCall) throws -> Void
    let async: (inout LuaCall, LuaCompletion) throws -> Void
    let runtimeRef: Unmanaged<LuaRuntime>
    var runtime: LuaRuntime { runtimeRef.takeUnretainedValue() }

    init(name: String, body: LuaHostFunction, runtime: LuaRuntime) {
        self.name = name
        switch body {
        case .sync(let f):
            isSync = true
            sync = f
            async = { _, _ in }
        case .async(let f):
            isSync = false
            sync = { _ in }
            async = f
        }
        self.runtimeRef = Unmanaged.passUnretained(runtime)
    }
}

/// The single entry point from C into Swift host functions. It never raises: an error is
/// pushed and reported with CLUA_RAISE, and the C trampoline raises it after we return.
let luaDispatch: @convention(c) (OpaquePointer?, UnsafeMutableRawPointer?) -> Int32 = { L, box in
    // The box is kept alive by the state owner: borrow it without retain/release.
    Unmanaged<HostFunctionBox>.fromOpaque(box!)._withUnsafeGuaranteedRef { fn in
        let L = L!
        var call = LuaCall(state: L, runtimeRef: fn.runtimeRef, function: fn, argumentCount: Int(lua_gettop(L)))
        if fn.isSync {
            do {
                try fn.sync(&call)
                return call.resultCount
            } catch {
                fn.runtime.pushError(LuaHostError(error), on: L, positionFrom: L)
                return CLUA_RAISE
            }
        }
        let r = fn.runtime.startAsync(&call, fn.async)
        return r == 0 ? CLUA_YIELD : r
    }
}

let luaRelease: @convention(c) (UnsafeMutableRawPointer?) -> Void = { p in
    if let p { Unmanaged<AnyObject>.fromOpaque(p).release() }
}
