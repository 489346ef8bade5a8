#ifndef COLORUN_CLUA_SHIM_H
#define COLORUN_CLUA_SHIM_H
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

/* Swift cannot import Lua's function-like macros; each one used from Swift is
 * re-implemented here as a static inline function with a clua_ prefix. None of
 * them can raise a Lua error except where noted (and those are only ever called
 * from C or under a protected call). */

static inline int clua_registryindex(void) { return LUA_REGISTRYINDEX; }
static inline int clua_upvalueindex(int i) { return lua_upvalueindex(i); }
static inline void clua_pop(lua_State *L, int n) { lua_pop(L, n); }
static inline void clua_newtable(lua_State *L) { lua_newtable(L); }
static inline void clua_insert(lua_State *L, int idx) { lua_insert(L, idx); }
static inline void clua_remove(lua_State *L, int idx) { lua_remove(L, idx); }
static inline void clua_replace(lua_State *L, int idx) { lua_replace(L, idx); }
static inline int clua_isnoneornil(lua_State *L, int idx) { return lua_isnoneornil(L, idx); }
static inline const char *clua_tostring(lua_State *L, int idx) { return lua_tostring(L, idx); }
static inline lua_Number clua_tonumber(lua_State *L, int idx) { return lua_tonumber(L, idx); }
static inline lua_Integer clua_tointeger(lua_State *L, int idx) { return lua_tointeger(L, idx); }
static inline void clua_pushcfunction(lua_State *L, lua_CFunction f) { lua_pushcfunction(L, f); }
static inline void *clua_newuserdata(lua_State *L, size_t sz) { return lua_newuserdatauv(L, sz, 0); }
static inline lua_State *clua_tothread(lua_State *L, int idx) { return lua_tothread(L, idx); }
static inline void *clua_getextraspace(lua_State *L) { return lua_getextraspace(L); }
/* Registry fields: the registry has no metatable, so these raw accesses cannot raise. */
static inline int clua_getregistryfield(lua_State *L, const char *k) {
    lua_pushstring(L, k); return lua_rawget(L, LUA_REGISTRYINDEX);
}
/* t[k] = top (raw), popping the value; t at absolute index idx. */
static inline void clua_rawsetfield(lua_State *L, int idx, const char *k) {
    idx = lua_absindex(L, idx);
    lua_pushstring(L, k); lua_insert(L, -2); lua_rawset(L, idx);
}
static inline int clua_rawgetfield(lua_State *L, int idx, const char *k) {
    idx = lua_absindex(L, idx);
    lua_pushstring(L, k); return lua_rawget(L, idx);
}
static inline int clua_gc_collect(lua_State *L) { return lua_gc(L, LUA_GCCOLLECT); }
static inline int clua_gc_count_kb(lua_State *L) { return lua_gc(L, LUA_GCCOUNT); }
/* May raise: only from C or under lua_pcall. */
static inline int clua_pcall(lua_State *L, int nargs, int nresults, int msgh) {
    return lua_pcall(L, nargs, nresults, msgh);
}
static inline int clua_loadbuffer(lua_State *L, const char *buf, size_t sz, const char *name) {
    return luaL_loadbufferx(L, buf, sz, name, "t");
}
#endif
