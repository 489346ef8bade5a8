// LuaRuntime: placeholder until its issue lands.
