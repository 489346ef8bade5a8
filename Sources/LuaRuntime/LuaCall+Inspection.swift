import CLua

extension LuaCall {
    /// `file:line` of the policy code that made this call (host wrapper frames skipped),
    /// or "?" when there is none. Reads debug info only: it never raises.
    public var callerPosition: String {
        var ar = lua_Debug()
        var level: Int32 = 1
        while lua_getstack(state, level, &ar) != 0 {
            lua_getinfo(state, "Sl", &ar)
            if ar.currentline > 0 {
                let source = withUnsafeBytes(of: ar.short_src) { raw in
                    String(cString: raw.baseAddress!.assumingMemoryBound(to: CChar.self))
                }
                if !source.hasPrefix("[host") { return "\(source):\(ar.currentline)" }
            }
            level += 1
        }
        return "?"
    }
}

extension LuaRuntime {
    /// The name of the task running now ("-" outside a task).
    public var currentTaskName: String { currentTask?.name ?? "-" }
}

/// One field of a table argument, as `LuaCall.fields(_:)` reports it.
public struct LuaField: Sendable, Hashable {
    /// The key, for string keys; other keys are reported as `"[type]"`.
    public var key: String
    public var type: LuaType
    /// The `__name` of the value's metatable (e.g. "domain"), if it has one.
    public var typeName: String?
}

extension LuaCall {
    /// The fields of table argument `i` (or of its table field `key`), read raw: no
    /// metamethods run, nothing can raise.
    public func fields(_ i: Int, in key: String? = nil) throws -> [LuaField] {
        guard lua_type(state, Int32(i)) == LUA_TTABLE else { throw argumentError(i, "table expected, got \(type(i).name)") }
        let top = lua_gettop(state)
        defer { lua_settop(state, top) }
        var table = lua_absindex(state, Int32(i))
        if let key {
            guard clua_rawgetfield(state, table, key) == LUA_TTABLE else { return [] }
            table = lua_gettop(state)
        }
        var result: [LuaField] = []
        lua_pushnil(state)
        while lua_next(state, table) != 0 {
            let key: String
            if lua_type(state, -2) == LUA_TSTRING {
                var length = 0
                let p = lua_tolstring(state, -2, &length)!
                key = String(decoding: UnsafeRawBufferPointer(start: p, count: length), as: UTF8.self)
            } else {
                key = "[\((LuaType(rawValue: lua_type(state, -2)) ?? .none).name)]"
            }
            var typeName: String?
            if lua_getmetatable(state, -1) != 0 {
                if clua_rawgetfield(state, -1, "__name") == LUA_TSTRING {
                    var length = 0
                    let p = lua_tolstring(state, -1, &length)!
                    typeName = String(decoding: UnsafeRawBufferPointer(start: p, count: length), as: UTF8.self)
                }
                clua_pop(state, 2)
            }
            result.append(LuaField(key: key, type: LuaType(rawValue: lua_type(state, -1)) ?? .none, typeName: typeName))
            clua_pop(state, 1)
        }
        return result
    }
}
