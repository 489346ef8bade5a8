import CLua
import CLuaShims
import JSON

/// Value conversion between Lua and Swift: references, `LuaValue`s and JSON (raw accesses
/// only, so no metamethod runs while a value is read).
extension LuaRuntime {
    func makeRef(_ S: OpaquePointer, _ idx: Int32) -> LuaRef {
        let t = LuaType(rawValue: lua_type(S, idx)) ?? .nil
        lua_pushvalue(S, idx)
        let r = luaL_ref(S, clua_registryindex())
        return LuaRef(owner: owner, ref: r, type: t)
    }

    /// The value at `idx` in Swift form: scalars as such, tables as `.json`, Swift objects as
    /// `.object`, functions and anything else as `.ref`.
    func readValue(_ S: OpaquePointer, _ idx: Int32) throws -> LuaValue {
        switch lua_type(S, idx) {
        case LUA_TNONE, LUA_TNIL: return .nil
        case LUA_TBOOLEAN: return .bool(lua_toboolean(S, idx) != 0)
        case LUA_TNUMBER:
            return lua_isinteger(S, idx) != 0 ? .integer(Int64(clua_tointeger(S, idx))) : .number(clua_tonumber(S, idx))
        case LUA_TSTRING: return .string(String(lua: S, at: idx) ?? "")
        case LUA_TTABLE: return .json(try toJSON(S, idx, depth: 0))
        case LUA_TUSERDATA:
            if let p = clua_toobject(S, idx) { return .object(Unmanaged<AnyObject>.fromOpaque(p).takeUnretainedValue()) }
            return .ref(makeRef(S, idx))
        default:
            return .ref(makeRef(S, idx))
        }
    }

    func isNull(_ S: OpaquePointer, _ idx: Int32) -> Bool {
        lua_topointer(S, idx) == nullPointer
    }

    /// Pushes a Swift value onto `S` (never raises: Swift-side allocations are not capped).
    func push(_ value: LuaValue, on S: OpaquePointer) {
        switch value {
        case .nil: lua_pushnil(S)
        case .bool(let b): lua_pushboolean(S, b ? 1 : 0)
        case .integer(let i): lua_pushinteger(S, lua_Integer(i))
        case .number(let d): lua_pushnumber(S, d)
        case .string(var s):
            s.withUTF8 { b in _ = lua_pushlstring(S, b.baseAddress.map { UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self) }, b.count) }
        case .json(let j): pushJSON(j, on: S)
        case .object(let o):
            let name = typeNames[ObjectIdentifier(Swift.type(of: o))] ?? "colorun.object"
            clua_pushobject(S, Unmanaged.passRetained(o).toOpaque(), name)
        case .ref(let r):
            r.push(S)
        }
    }

    func pushJSON(_ value: JSONValue, on S: OpaquePointer) {
        _ = lua_checkstack(S, 4)
        switch value {
        case .null: _ = clua_getregistryfield(S, "colorun.null")
        case .bool(let b): lua_pushboolean(S, b ? 1 : 0)
        case .int(let i): lua_pushinteger(S, lua_Integer(i))
        case .double(let d): lua_pushnumber(S, d)
        case .string(let s): push(.string(s), on: S)
        case .array(let a):
            lua_createtable(S, Int32(clamping: a.count), 0)
            for (i, e) in a.enumerated() {
                pushJSON(e, on: S)
                lua_rawseti(S, -2, lua_Integer(i + 1))
            }
            _ = clua_getregistryfield(S, "colorun.jsonarray")
            _ = lua_setmetatable(S, -2)
        case .object(let o):
            lua_createtable(S, 0, Int32(clamping: o.count))
            for (k, v) in o {
                push(.string(k), on: S)
                pushJSON(v, on: S)
                lua_rawset(S, -3)
            }
        }
    }

    /// Converts the Lua value at `idx` to JSON with raw accesses only (no metamethods).
    func toJSON(_ S: OpaquePointer, _ idx: Int32, depth: Int) throws -> JSONValue {
        let idx = lua_absindex(S, idx)
        switch lua_type(S, idx) {
        case LUA_TNIL: return .null
        case LUA_TBOOLEAN: return .bool(lua_toboolean(S, idx) != 0)
        case LUA_TNUMBER:
            if lua_isinteger(S, idx) != 0 { return .int(Int64(clua_tointeger(S, idx))) }
            let d = clua_tonumber(S, idx)
            guard d.isFinite else { throw LuaHostError.message("cannot convert \(d) to JSON") }
            return .double(d)
        case LUA_TSTRING: return .string(String(lua: S, at: idx) ?? "")
        case LUA_TTABLE:
            if lua_topointer(S, idx) == nullPointer { return .null }
            guard depth < 100 else { throw LuaHostError.message("table nested too deeply (or a cycle) for JSON") }
            guard lua_checkstack(S, 4) != 0 else { throw LuaHostError.message("stack overflow converting to JSON") }
            var isArrayMarked = false
            if lua_getmetatable(S, idx) != 0 {
                _ = clua_getregistryfield(S, "colorun.jsonarray")
                isArrayMarked = lua_rawequal(S, -1, -2) != 0
                clua_pop(S, 2)
            }
            var object: [String: JSONValue] = [:]
            var indexed: [(Int64, JSONValue)] = []
            lua_pushnil(S)
            while lua_next(S, idx) != 0 {
                let v: JSONValue
                do { v = try toJSON(S, -1, depth: depth + 1) } catch { clua_pop(S, 2); throw error }
                if lua_type(S, -2) == LUA_TSTRING {
                    object[String(lua: S, at: -2) ?? ""] = v
                } else if lua_isinteger(S, -2) != 0 {
                    indexed.append((Int64(clua_tointeger(S, -2)), v))
                } else {
                    let t = LuaType(rawValue: lua_type(S, -2))?.name ?? "?"
                    clua_pop(S, 2)
                    throw LuaHostError.message("cannot convert a table with a \(t) key to JSON")
                }
                clua_pop(S, 1)
            }
            if indexed.isEmpty {
                return isArrayMarked && object.isEmpty ? .array([]) : .object(object)
            }
            guard object.isEmpty else { throw LuaHostError.message("cannot convert a table with both array and string keys to JSON") }
            indexed.sort { $0.0 < $1.0 }
            for (n, e) in indexed.enumerated() where e.0 != Int64(n + 1) {
                throw LuaHostError.message("cannot convert a sparse array to JSON (index \(e.0))")
            }
            return .array(indexed.map(\.1))
        default:
            let t = LuaType(rawValue: lua_type(S, idx))?.name ?? "?"
            throw LuaHostError.message("cannot convert a \(t) to JSON")
        }
    }
}
