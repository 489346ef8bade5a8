import Testing

@Suite struct LuaRuntimeTestsPlaceholder {}
