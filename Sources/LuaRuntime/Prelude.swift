/// The host Lua code that builds the sandbox. It runs once per state with the raw host
/// functions (H), the policy environment, the module list and the task handle methods.
/// Its chunk name begins with "=[host" so error positions skip it.
let preludeSource = #"""
local H, env, modules, taskmethods = ...
local co_create, co_resume, co_yield, co_status, co_close =
  coroutine.create, coroutine.resume, coroutine.yield, coroutine.status, coroutine.close
local error, select, type, tostring, rawget, setmetatable, pairs =
  error, select, type, tostring, rawget, setmetatable, pairs
local concat, pack, unpack = table.concat, table.pack, table.unpack
local forced = H.forced

local exports = {}

-- Async host functions yield from their C trampoline and return what the scheduler
-- resumes them with ((true, results...) returned, (false, error) raised): no Lua wrapper.
-- make_async stays for code written against it.
local function make_async(raw) return raw end
exports.make_async = make_async

-- The coroutine library, wrapped so that a host call (or a forced yield) inside a user
-- coroutine passes through the user's resume up to the scheduler.
local co_isyieldable, abandon = coroutine.isyieldable, H.abandon
local function pass(co, ok, ...)
  if ok and co_status(co) == "suspended" and forced() then
    if not co_isyieldable() then
      -- cannot pass the yield up: raises for a host call or a kill, else (a forced yield)
      -- just continues the coroutine
      abandon()
      return pass(co, co_resume(co))
    end
    return pass(co, co_resume(co, co_yield(...)))
  end
  return ok, ...
end
local function resume(co, ...)
  return pass(co, co_resume(co, ...))
end
local function wrapresult(co, ok, ...)
  if ok then return ... end
  co_close(co)
  error((...), 0)
end
local lcoroutine = {}
for k, v in pairs(coroutine) do lcoroutine[k] = v end
lcoroutine.resume = resume
lcoroutine.wrap = function(f)
  local co = co_create(f)
  return function(...)
    return wrapresult(co, resume(co, ...))
  end
end

-- Copies of the safe libraries.
local function copy(t, skip)
  local c = {}
  for k, v in pairs(t) do if not (skip and skip[k]) then c[k] = v end end
  return c
end
local lstring = copy(string, { dump = true })
getmetatable("").__index = lstring
getmetatable("").__metatable = "string"

for _, k in ipairs({ "assert", "error", "ipairs", "next", "pairs", "pcall", "rawequal", "rawget",
  "rawlen", "rawset", "select", "tonumber", "tostring", "type", "xpcall", "getmetatable", "_VERSION" }) do
  env[k] = _G[k]
end
env.string = lstring
env.table = copy(table)
env.math = copy(math)
env.utf8 = copy(utf8)
env.os = { time = os.time, clock = os.clock, date = os.date, getenv = os.getenv }
env.coroutine = lcoroutine
env._G = env
env.setmetatable = function(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("__gc metamethods are not available to policies", 2)
  end
  return setmetatable(t, mt)
end
local rawload = load
env.load = function(chunk, name, mode, e)
  if mode ~= nil and mode ~= "t" then
    error("load: only text chunks can be loaded (mode \"t\")", 2)
  end
  if e == nil then e = env end
  return rawload(chunk, name, "t", e)
end

-- Logging
local function joinargs(...)
  local n = select("#", ...)
  local t = { ... }
  for i = 1, n do t[i] = tostring(t[i]) end
  return concat(t, "\t", 1, n)
end
env.print = function(...) H.log("info", joinargs(...)) end
-- log.*(message, fields) adds structured fields; log.*(...) joins its arguments like print.
local log = {}
for _, level in ipairs({ "debug", "info", "warn", "error" }) do
  log[level] = function(...)
    local n = select("#", ...)
    local message, fields = ...
    if n == 2 and type(fields) == "table" then
      H.log(level, tostring(message), fields)
    else
      H.log(level, joinargs(...))
    end
  end
end
modules.log = log
env.log = log

-- json
local null = setmetatable({}, {
  __tostring = function() return "json.null" end,
  __newindex = function() error("json.null is read-only", 2) end,
  __metatable = false,
})
local arraymt = { __name = "json.array" }
exports.null = null
exports.jsonarray = arraymt
local json = {
  null = null,
  encode = H.encode,
  decode = H.decode,
  array = function(t)
    t = t or {}
    if type(t) ~= "table" then error("bad argument #1 to 'json.array' (table expected, got " .. type(t) .. ")", 2) end
    return setmetatable(t, arraymt)
  end,
  isarray = function(t) return type(t) == "table" and getmetatable(t) == arraymt end,
}
modules.json = json
env.json = json

-- structured errors raised by host functions
exports.errormt = {
  __name = "colorun.error",
  __tostring = function(e) return tostring(rawget(e, "where") or "") .. tostring(rawget(e, "message")) end,
}

-- sleep and tasks
env.sleep = make_async(H.sleep)
local join = make_async(H.join)
local task = {}
task.spawn = H.spawn
task.yield = make_async(H.yield)
task.current = H.current
task.all = function(...)
  local n = select("#", ...)
  local handles = {}
  for i = 1, n do
    local f = select(i, ...)
    if type(f) ~= "function" then
      error("bad argument #" .. i .. " to 'task.all' (function expected, got " .. type(f) .. ")", 2)
    end
    handles[i] = H.spawn_joined(f)
  end
  local results, failed, firsterr = {}, false, nil
  for i = 1, n do
    local ok, r = join(handles[i])
    if ok then
      results[i] = r[1]
    elseif not failed then
      failed, firsterr = true, r
    end
  end
  if failed then error(firsterr, 0) end
  return unpack(results, 1, n)
end
taskmethods.wait = function(h)
  local ok, r = join(h)
  if ok then return unpack(r, 1, r.n) end
  error(r, 0)
end
modules.task = task
env.task = task

-- require: text modules next to the policy (and in luaPath), sharing its globals
local loaded = {}
env.require = function(name)
  if type(name) ~= "string" then
    error("bad argument #1 to 'require' (string expected, got " .. type(name) .. ")", 2)
  end
  local v = loaded[name]
  if v ~= nil then return v end
  v = modules[name]
  if v ~= nil then return v end
  local chunk, path = H.loadmodule(name)
  v = chunk(name, path)
  if v == nil then v = true end
  loaded[name] = v
  return v
end

-- reading an undefined global is an error naming it
setmetatable(env, {
  __index = function(_, k)
    error("undefined global '" .. tostring(k) .. "'", 2)
  end,
})

return exports
"""#
