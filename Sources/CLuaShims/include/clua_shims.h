#ifndef COLORUN_CLUA_SHIMS_H
#define COLORUN_CLUA_SHIMS_H
#include <stddef.h>
#include <stdint.h>
#include <lua.h>

/* Per-state context shared by the allocator, the count hook and the trampolines.
 * Its address lives in the extra space of every thread of the state. */
typedef struct clua_ctx {
    size_t used;            /* bytes currently allocated by the state */
    size_t limit;           /* memory cap in bytes (0: none) */
    int enforce;            /* 1 while Lua code runs (resume/pcall); 0 while Swift runs */
    int forced_yield;       /* set by the hook when it forced a yield */
    int killed;             /* set by the hook when the deadline passed */
    int pending;            /* an async host call was just registered (until the task yields) */
    int instruction_slice;  /* instructions between hook calls */
    int64_t deadline_ns;    /* CLOCK_MONOTONIC deadline of the running slice-run (0: none) */
    char kill_where[512];   /* "file:line:" where the deadline hit */
} clua_ctx;

/* The Swift dispatcher: returns the number of results, or CLUA_RAISE with the
 * error value on top of the stack (the trampoline then raises it from C). */
#define CLUA_RAISE (-1)
/* An async host call was registered: the trampoline yields the task, and returns what the
 * scheduler resumes it with ((true, results...) returned, (false, error) raised). */
#define CLUA_YIELD (-2)
typedef int (*clua_dispatch_fn)(lua_State *L, void *box);

lua_State *clua_newstate(size_t limit, int instruction_slice);
void clua_closestate(lua_State *L);
clua_ctx *clua_ctx_of(lua_State *L);
void clua_set_dispatch(clua_dispatch_fn fn);
/* Pushes a closure of the trampoline over the host function box (a light userdata). */
void clua_pushhostfunction(lua_State *L, void *box);
/* Pushes "chunk:line: " for the innermost Lua caller that is not host code
 * (chunk names beginning with "=[host"), or "" if none. Never raises. */
void clua_pushwhere(lua_State *L);
/* The same for the stack of `co` from level `first` (0: the running function), pushed on
 * `to`: for a thread that ended with an error (its stack is not unwound). */
void clua_pushwhere_from(lua_State *co, int first, lua_State *to);
int64_t clua_monotonic_ns(void);
/* Arms the count hook on a thread (threads inherit it from their creator). */
void clua_sethook(lua_State *L);
/* Status of a lua_resume, with the results count. */
int clua_resume(lua_State *co, lua_State *from, int nargs, int *nres);
/* lua_pcall with the memory cap enforced. */
int clua_pcall_enforced(lua_State *L, int nargs, int nresults);
/* A C function for Lua: true if the current yield belongs to the scheduler (a forced yield,
 * a kill, or a pending host call); used by the coroutine wrappers. Clears nothing. */
int clua_l_forced(lua_State *L);
/* Protected tostring: pushes tostring(v) of the value at idx or an explanation. Never raises. */
const char *clua_safe_tostring(lua_State *L, int idx, size_t *len);
/* Swift-object userdata */
void clua_set_release(void (*release)(void *));
void clua_pushobject(lua_State *L, void *retained, const char *mtname);
void *clua_toobject(lua_State *L, int idx);
#endif
