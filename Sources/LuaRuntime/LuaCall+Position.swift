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
