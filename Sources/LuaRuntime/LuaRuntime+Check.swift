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
