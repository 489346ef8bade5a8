import CLua

/// What `colorun check` needs of the runtime: a compile-only load and a way to tell when the
/// main chunk is done.
extension LuaRuntime {
    /// Compiles the policy file without running it, in a bare Lua state (no sandbox, no
    /// colorun modules: nothing runs). Returns the error (`path:line: message`, or "cannot
    /// open path") or nil when the file compiles.
    public static func syntaxError(inFileAt path: String) -> String? {
        guard let L = luaL_newstate() else { return "cannot create a Lua state" }
        defer { lua_close(L) }
        guard luaL_loadfilex(L, path, "t") != LUA_OK else { return nil }
        return String(lua: L, at: -1) ?? "cannot load \(path)"
    }

    /// True once a run has started and its main chunk (task "main") has ended, whatever
    /// timers or other tasks it left behind.
    public var mainTaskHasEnded: Bool {
        assertOnLoop()
        return runState != .idle && !tasks.values.contains { $0.name == "main" }
    }
}

/// What the policy's global environment holds now, for `colorun check`'s static pass.
public struct LuaEnvironmentSnapshot: Sendable {
    /// Every global's name.
    public var globals: Set<String> = []
    /// The string keys of each global table and of the tables inside them, by dotted path
    /// (`qmp`, `colo`, `colo.native`); `_G` is left out (it is the environment itself).
    public var tables: [String: Set<String>] = [:]

    public init(globals: Set<String> = [], tables: [String: Set<String>] = [:]) {
        self.globals = globals
        self.tables = tables
    }
}

extension LuaRuntime {
    /// The globals and the global tables' fields (raw reads: no metamethod runs), two
    /// levels deep.
    public func environmentSnapshot() -> LuaEnvironmentSnapshot {
        assertOnLoop()
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        _ = lua_checkstack(L, 10)
        var tables: [String: Set<String>] = [:]
        _ = clua_getregistryfield(L, "colorun.env")
        let globals = stringKeys(at: lua_gettop(L)) { name, isTable in
            guard isTable, name != "_G" else { return }
            let fields = stringKeys(at: lua_gettop(L)) { field, isTable in
                guard isTable else { return }
                tables[name + "." + field] = Set(stringKeys(at: lua_gettop(L)) { _, _ in })
            }
            tables[name] = Set(fields)
        }
        return LuaEnvironmentSnapshot(globals: Set(globals), tables: tables)
    }

    /// The string keys of the table at `index`; `visit(key, isTable)` runs with the value on
    /// top of the stack.
    private func stringKeys(at index: Int32, _ visit: (String, Bool) -> Void) -> [String] {
        var keys: [String] = []
        lua_pushnil(L)
        while lua_next(L, index) != 0 {
            if lua_type(L, -2) == LUA_TSTRING, let key = String(lua: L, at: -2) {
                keys.append(key)
                visit(key, lua_type(L, -1) == LUA_TTABLE)
            }
            clua_pop(L, 1)
        }
        return keys
    }
}
