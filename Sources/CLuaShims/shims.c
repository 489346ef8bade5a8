#include "clua_shims.h"
#include <lauxlib.h>
#include <lualib.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <time.h>

#define CTX(L) (*(clua_ctx **)lua_getextraspace(L))

static clua_dispatch_fn g_dispatch;
static void (*g_release)(void *);

int64_t clua_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The allocator. ptr == NULL means osize is a type tag, not a size. A shrink or a
 * free never fails. Growth fails (returns NULL, which Lua turns into "not enough
 * memory") only when Lua code is running and the cap would be exceeded: while Swift
 * runs (enforce == 0) allocations always succeed so no error can longjmp through it. */
static void *clua_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    clua_ctx *c = ud;
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        free(ptr);
        c->used -= old;
        return NULL;
    }
    if (nsize > old && c->enforce && c->limit && c->used - old + nsize > c->limit)
        return NULL;
    void *p = realloc(ptr, nsize);
    if (p == NULL) {
        if (ptr && nsize <= old) return ptr; /* a shrink never fails */
        return NULL;
    }
    c->used = c->used - old + nsize;
    return p;
}

static void clua_hook(lua_State *L, lua_Debug *ar) {
    clua_ctx *c = CTX(L);
    if (!c->killed && c->deadline_ns && clua_monotonic_ns() >= c->deadline_ns) {
        c->killed = 1;
        if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0)
            snprintf(c->kill_where, sizeof c->kill_where, "%s:%d:", ar->short_src, ar->currentline);
        else
            snprintf(c->kill_where, sizeof c->kill_where, "?:");
        /* From now on check at every instruction, so a pcall that catches the error
         * below cannot keep the task running. */
        lua_sethook(L, clua_hook, LUA_MASKCOUNT, 1);
    }
    if (c->killed) {
        if (lua_isyieldable(L)) { lua_yield(L, 0); return; } /* the scheduler never resumes it */
        lua_pushfstring(L, "%s time limit exceeded", c->kill_where);
        lua_error(L);
    }
    if (lua_isyieldable(L)) {
        c->forced_yield = 1;
        lua_yield(L, 0);
    }
}

void clua_sethook(lua_State *L) {
    clua_ctx *c = CTX(L);
    if (c->instruction_slice > 0)
        lua_sethook(L, clua_hook, LUA_MASKCOUNT, c->instruction_slice);
}

lua_State *clua_newstate(size_t limit, int instruction_slice) {
    clua_ctx *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->limit = limit;
    c->instruction_slice = instruction_slice;
    lua_State *L = lua_newstate(clua_alloc, c);
    if (!L) { free(c); return NULL; }
    CTX(L) = c; /* new threads copy the main thread's extra space */
    clua_sethook(L);
    return L;
}

void clua_closestate(lua_State *L) {
    clua_ctx *c = CTX(L);
    c->enforce = 0;
    lua_close(L);
    free(c);
}

clua_ctx *clua_ctx_of(lua_State *L) { return CTX(L); }

void clua_set_dispatch(clua_dispatch_fn fn) { g_dispatch = fn; }
void clua_set_release(void (*release)(void *)) { g_release = release; }

/* The continuation of an async host call: the scheduler resumed the task with
 * (true, results...) or (false, error) above the `base` values the call had. */
static int clua_async_k(lua_State *L, int status, lua_KContext base) {
    (void)status;
    int b = (int)base;
    if (lua_toboolean(L, b + 1)) return lua_gettop(L) - b - 1;
    lua_pushvalue(L, b + 2);
    return lua_error(L);
}

/* Calls the Swift host function; raises its error, or yields for an async call, after the
 * Swift frame returned (no longjmp crosses it). One C frame is the whole wrapper of an
 * async call: no Lua function around it (issue 14). */
static int clua_trampoline(lua_State *L) {
    clua_ctx *c = CTX(L);
    int saved = c->enforce;
    c->enforce = 0;
    int r = g_dispatch(L, lua_touserdata(L, lua_upvalueindex(1)));
    c->enforce = saved;
    if (r >= 0) return r;
    if (r == CLUA_YIELD) {
        int base = lua_gettop(L);
        return lua_yieldk(L, 0, (lua_KContext)base, clua_async_k);
    }
    return lua_error(L);
}

void clua_pushhostfunction(lua_State *L, void *box) {
    lua_pushlightuserdata(L, box);
    lua_pushcclosure(L, clua_trampoline, 1);
}

void clua_pushwhere(lua_State *L) {
    clua_pushwhere_from(L, 1, L);
}

void clua_pushwhere_from(lua_State *co, int first, lua_State *L) {
    lua_Debug ar;
    for (int level = first; lua_getstack(co, level, &ar); level++) {
        if (!lua_getinfo(co, "Sl", &ar)) break;
        if (ar.currentline <= 0) continue;
        if (strncmp(ar.source, "=[host", 6) == 0) continue;
        lua_pushfstring(L, "%s:%d: ", ar.short_src, ar.currentline);
        return;
    }
    lua_pushliteral(L, "");
}

int clua_resume(lua_State *co, lua_State *from, int nargs, int *nres) {
    clua_ctx *c = CTX(co);
    c->enforce = 1;
    int status = lua_resume(co, from, nargs, nres);
    c->enforce = 0;
    return status;
}

int clua_pcall_enforced(lua_State *L, int nargs, int nresults) {
    clua_ctx *c = CTX(L);
    int saved = c->enforce;
    c->enforce = 1;
    int status = lua_pcall(L, nargs, nresults, 0);
    c->enforce = saved;
    return status;
}

int clua_l_forced(lua_State *L) {
    clua_ctx *c = CTX(L);
    lua_pushboolean(L, c->forced_yield || c->killed || c->pending);
    return 1;
}

static int clua_l_tostring(lua_State *L) {
    luaL_tolstring(L, 1, NULL);
    return 1;
}

const char *clua_safe_tostring(lua_State *L, int idx, size_t *len) {
    idx = lua_absindex(L, idx);
    lua_pushcfunction(L, clua_l_tostring);
    lua_pushvalue(L, idx);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK || lua_type(L, -1) != LUA_TSTRING) {
        lua_pop(L, 1);
        lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, idx));
    }
    return lua_tolstring(L, -1, len);
}

typedef struct { void *object; } clua_objbox;

static int clua_object_gc(lua_State *L) {
    clua_objbox *b = lua_touserdata(L, 1);
    if (b && b->object) {
        void *o = b->object;
        b->object = NULL;
        if (g_release) g_release(o);
    }
    return 0;
}

void clua_pushobject(lua_State *L, void *retained, const char *mtname) {
    clua_objbox *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->object = retained;
    lua_pushstring(L, mtname);
    if (lua_rawget(L, LUA_REGISTRYINDEX) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushstring(L, mtname);
        lua_setfield(L, -2, "__name"); /* fresh table without metatable: cannot raise */
        lua_pushstring(L, mtname);
        lua_pushvalue(L, -2);
        lua_rawset(L, LUA_REGISTRYINDEX);
    }
    /* every Swift-object metatable gets __gc */
    lua_pushliteral(L, "__gc");
    if (lua_rawget(L, -2) == LUA_TNIL) {
        lua_pop(L, 1);
        lua_pushliteral(L, "__gc");
        lua_pushcfunction(L, clua_object_gc);
        lua_rawset(L, -3);
        lua_pushliteral(L, "__swiftobject");
        lua_pushboolean(L, 1);
        lua_rawset(L, -3);
    } else {
        lua_pop(L, 1);
    }
    lua_setmetatable(L, -2);
}

void *clua_toobject(lua_State *L, int idx) {
    if (lua_type(L, idx) != LUA_TUSERDATA || lua_rawlen(L, idx) != sizeof(clua_objbox)) return NULL;
    if (!lua_getmetatable(L, idx)) return NULL;
    lua_pushliteral(L, "__swiftobject");
    int ok = lua_rawget(L, -2) == LUA_TBOOLEAN;
    lua_pop(L, 2);
    if (!ok) return NULL;
    clua_objbox *b = lua_touserdata(L, idx);
    return b->object;
}
