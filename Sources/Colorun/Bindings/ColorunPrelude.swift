/// The Lua half of colorun's policy API: thin wrappers over the host functions in
/// `HostBindings.swift`. It runs once per run as host code (its frames are skipped when an
/// error's position is computed, so errors point at the policy line that made the call).
///
/// Domains are Lua tables `{name=, endpoint=}` with methods; host functions take the
/// domain's name. Everything that waits (QMP commands, checkpoints, sleeps) yields the
/// calling task, so policy code reads sequentially while other tasks run.
let colorunPrelude = #"""
local C = ...
local raw = {}
for k, v in pairs(C) do raw[k] = v end
for k in pairs(raw) do C[k] = nil end
C.version = raw.version()

local type, error, tostring, pairs, ipairs, select, setmetatable, rawget, pcall =
  type, error, tostring, pairs, ipairs, select, setmetatable, rawget, pcall
local pack, unpack, sort, concat = table.pack, table.unpack, table.sort, table.concat
local floor, min, random = math.floor, math.min, math.random

-- Domains -------------------------------------------------------------------------------

local Domain = {}
Domain.__index = Domain
Domain.__name = "domain"
Domain.__tostring = function(d) return "domain " .. d.name end
Domain.__newindex = function(_, k) error("domain fields are read-only ('" .. tostring(k) .. "')", 2) end

local cache = {}
local function wrap(info)
  local d = cache[info.name]
  if d == nil then
    d = setmetatable({ name = info.name, endpoint = info.endpoint, shared = info.shared }, Domain)
    cache[info.name] = d
  end
  return d
end

local function isdomain(d) return type(d) == "table" and getmetatable(d) == Domain end

-- The name of the domain argument #i of function fname (a domain, or a domain's name).
local function name_of(d, fname, i)
  if isdomain(d) then return d.name end
  if type(d) == "string" then return raw.domain_get(d).name end
  error("bad argument #" .. (i or 1) .. " to '" .. fname .. "' (domain expected, got " .. type(d) .. ")", 3)
end

-- The fields each table argument accepts, from colorun's API table (LuaAPI.swift): one
-- place per function, "FUNCTION#ARG" -> {field = true}.
local accepted = {}
for fname, list in pairs(raw.accepted_fields()) do
  local set = {}
  for _, k in ipairs(list) do set[k] = true end
  accepted[fname] = set
end

-- Raises at the policy line (level: of the caller of the function that called this one's
-- caller) when table t, argument #i of fname, has a field the API does not know.
local function check_fields(t, fname, i, level)
  local known = accepted[fname .. "#" .. i]
  if known == nil then return end
  for k in pairs(t) do
    if not known[k] and not (fname == "exec.run" and math.type(k) == "integer") then
      local names = {}
      for n in pairs(known) do names[#names + 1] = n end
      sort(names)
      error(fname .. ": unknown field '" .. tostring(k) .. "' (known: " .. concat(names, ", ") .. ")", level + 1)
    end
  end
end

local function opt_table(t, fname, i)
  if t == nil then return {} end
  if type(t) ~= "table" then
    error("bad argument #" .. i .. " to '" .. fname .. "' (table of options expected, got " .. type(t) .. ")", 3)
  end
  check_fields(t, fname, i, 3)
  return t
end

domain.get = function(name)
  if type(name) ~= "string" then
    error("bad argument #1 to 'domain.get' (domain name expected, got " .. type(name) .. ")", 2)
  end
  return wrap(raw.domain_get(name))
end
-- The qmp text with a tls = {dir=, ca=, cert=, key=, hostname=} table appended as endpoint options.
local tls_options = { "dir", "ca", "cert", "key", "hostname" }
local function with_tls(qmp, tls)
  if tls == nil then return qmp end
  if type(tls) ~= "table" then error("domain.open: 'tls' must be a table {dir=, ca=, cert=, key=, hostname=}", 3) end
  if qmp:sub(1, 4) ~= "tls:" then error("domain.open: 'tls' options need a tls:HOST:PORT endpoint, not " .. qmp, 3) end
  for k in pairs(tls) do
    local known = false
    for _, name in ipairs(tls_options) do if k == name then known = true end end
    if not known then error("domain.open: unknown field 'tls." .. tostring(k) .. "' (dir, ca, cert, key, hostname)", 3) end
  end
  for _, name in ipairs(tls_options) do
    local v = tls[name]
    if v ~= nil then
      if type(v) ~= "string" or v:find(",", 1, true) then error("domain.open: 'tls." .. name .. "' must be a string without ','", 3) end
      qmp = qmp .. "," .. name .. "=" .. v
    end
  end
  return qmp
end
domain.open = function(spec)
  spec = opt_table(spec, "domain.open", 1)
  if type(spec.name) ~= "string" then error("domain.open: 'name' (a string) is required", 2) end
  if type(spec.qmp) ~= "string" then error("domain.open: 'qmp' (unix:PATH, tcp:HOST:PORT or tls:HOST:PORT) is required", 2) end
  if spec.shared ~= nil and type(spec.shared) ~= "boolean" then error("domain.open: 'shared' must be true or false", 2) end
  return wrap(raw.domain_open(spec.name, with_tls(spec.qmp, spec.tls), spec.timeout, spec.shared == true))
end
domain.xen = function(domid, opts)
  opts = opt_table(opts, "domain.xen", 2)
  if math.type(domid) ~= "integer" or domid < 0 then
    error("bad argument #1 to 'domain.xen' (domain id expected, got " .. tostring(domid) .. ")", 2)
  end
  local name = opts.name or ("xen-" .. domid)
  if opts.monitor ~= nil then
    if type(opts.monitor) ~= "string" then error("domain.xen: 'monitor' must be an endpoint (unix:PATH)", 2) end
    return wrap(raw.domain_open(name, opts.monitor, opts.timeout, false))
  end
  -- colorun's own monitor (device_model_args) when the domain has one; else libxl's, shared.
  local m = raw.xen_monitor(domid, name, opts.run_dir or "/var/run/xen")
  return wrap(raw.domain_open(name, m.qmp, opts.timeout, m.shared))
end
domain.list = function()
  local list = {}
  for i, info in ipairs(raw.domain_list()) do list[i] = wrap(info) end
  return list
end
domain.is = isdomain

-- qmp.* ---------------------------------------------------------------------------------

qmp.execute = function(d, command, args, opts)
  local name = name_of(d, "qmp.execute")
  if type(command) ~= "string" then
    error("bad argument #2 to 'qmp.execute' (command name expected, got " .. type(command) .. ")", 2)
  end
  if args ~= nil and type(args) ~= "table" then
    error("bad argument #3 to 'qmp.execute' (table of arguments expected, got " .. type(args) .. ")", 2)
  end
  opts = opt_table(opts, "qmp.execute", 4)
  return raw.execute(name, command, args, opts.timeout)
end
qmp.stop = function(d) raw.stop(name_of(d, "qmp.stop")) end
qmp.resume = function(d) raw.resume(name_of(d, "qmp.resume")) end
qmp.save = function(d, path, opts)
  local name = name_of(d, "qmp.save")
  if type(path) ~= "string" then error("bad argument #2 to 'qmp.save' (path expected, got " .. type(path) .. ")", 2) end
  opts = opt_table(opts, "qmp.save", 3)
  local args = { filename = path }
  if opts.live ~= nil then args.live = opts.live and true or false end
  raw.execute(name, "xen-save-devices-state", args, opts.timeout)
end
qmp.restore = function(d, path, opts)
  local name = name_of(d, "qmp.restore")
  if type(path) ~= "string" then error("bad argument #2 to 'qmp.restore' (path expected, got " .. type(path) .. ")", 2) end
  opts = opt_table(opts, "qmp.restore", 3)
  raw.execute(name, "xen-load-devices-state", { filename = path }, opts.timeout)
end
qmp.status = function(d, opts)
  local name = name_of(d, "qmp.status")
  opts = opt_table(opts, "qmp.status", 2)
  return raw.execute(name, "query-status", nil, opts.timeout)
end

for _, m in ipairs({ "execute", "stop", "resume", "save", "restore", "status" }) do
  Domain[m] = qmp[m]
end
function Domain:alive(timeout) return raw.alive(self.name, timeout) end
function Domain:on(event, fn)
  if type(event) ~= "string" then error("bad argument #1 to 'on' (event name or \"*\" expected, got " .. type(event) .. ")", 2) end
  if type(fn) ~= "function" then error("bad argument #2 to 'on' (function expected, got " .. type(fn) .. ")", 2) end
  local id = raw.on_event(self.name, event, fn)
  return { cancel = function() raw.cancel(id) end }
end
function Domain:stats() return raw.domain_stats(self.name) end

-- Checkpoints ---------------------------------------------------------------------------

colo.checkpoint = function(p, s, opts)
  local pn = name_of(p, "colo.checkpoint", 1)
  local sn = name_of(s, "colo.checkpoint", 2)
  opts = opt_table(opts, "colo.checkpoint", 3)
  if opts.pipeline ~= nil and type(opts.pipeline) ~= "boolean" then
    error("colo.checkpoint: 'pipeline' must be true or false", 2)
  end
  return raw.colo_checkpoint(pn, sn, opts.keep, opts.pipeline == true)
end
colo.generations = function(p, s)
  return raw.generations(name_of(p, "colo.generations", 1) .. "+" .. name_of(s, "colo.generations", 2))
end

remus.checkpoint = function(d, opts)
  local name = name_of(d, "remus.checkpoint")
  opts = opt_table(opts, "remus.checkpoint", 2)
  return raw.remus_checkpoint(name, opts.keep, opts.disks, opts.output_commit, opts.series)
end
remus.restore = function(spec, generation)
  spec = opt_table(spec, "remus.restore", 1)
  if type(spec.name) ~= "string" then error("remus.restore: 'name' (the standby's domain name) is required", 2) end
  local from = spec.from
  if isdomain(from) then from = from.name end
  if type(from) ~= "string" then error("remus.restore: 'from' (the domain whose checkpoints to restore) is required", 2) end
  if generation ~= nil and math.type(generation) ~= "integer" then
    error("bad argument #2 to 'remus.restore' (generation number expected, got " .. type(generation) .. ")", 2)
  end
  local copy = {}
  for k, v in pairs(spec) do copy[k] = v end
  copy.from = from
  raw.cluster_gate("remus.restore " .. spec.name)   -- with an arbiter: only the key's holder promotes
  local info = raw.remus_restore(copy, generation)
  local d = wrap(info)
  return d, info
end
remus.generations = function(d) return raw.generations(name_of(d, "remus.generations")) end

-- Policy primitives ---------------------------------------------------------------------

local function timer_handle(id)
  return {
    cancel = function() raw.cancel(id) end,
    stats = function() return raw.timer_stats(id) end,
  }
end
policy.every = function(interval, fn)
  if type(fn) ~= "function" then error("bad argument #2 to 'policy.every' (function expected, got " .. type(fn) .. ")", 2) end
  return timer_handle(raw.every(interval, fn))
end
policy.after = function(delay, fn)
  if type(fn) ~= "function" then error("bad argument #2 to 'policy.after' (function expected, got " .. type(fn) .. ")", 2) end
  return timer_handle(raw.after(delay, fn))
end
policy.on_lost = function(d, fn, opts)
  local name = name_of(d, "policy.on_lost")
  if type(fn) ~= "function" then error("bad argument #2 to 'policy.on_lost' (function expected, got " .. type(fn) .. ")", 2) end
  opts = opt_table(opts, "policy.on_lost", 3)
  local dom = wrap(raw.domain_get(name))
  local id = raw.on_lost(name, function(reason)
    raw.cluster_gate("policy.on_lost " .. name)   -- with an arbiter: runs once this node holds the key
    return fn(dom, reason)
  end, opts.heartbeat, opts.timeout)
  return { cancel = function() raw.cancel(id) end }
end
policy.stop = function() raw.stop_run() end
policy.seconds = raw.seconds
policy.bytes = raw.bytes

-- retry(opts, fn): attempts with exponential backoff and jitter.
local retry_keys = { attempts = "number", backoff = "duration", max_backoff = "duration", jitter = "number",
  retry_on = "function", on_retry = "function" }
local function check_retry(opts, level)
  for k, v in pairs(opts) do
    local want = retry_keys[k]
    if want == nil then error("retry: unknown option '" .. tostring(k) .. "'", level) end
    if want == "duration" then
      if type(v) ~= "number" and type(v) ~= "string" then error("retry: '" .. k .. "' must be a duration", level) end
    elseif type(v) ~= want then
      error("retry: '" .. k .. "' must be a " .. want .. ", got " .. type(v), level)
    end
  end
end
function retry(opts, fn)
  if type(opts) == "function" and fn == nil then opts, fn = {}, opts end
  opts = opts or {}
  if type(opts) ~= "table" then error("bad argument #1 to 'retry' (table of options expected, got " .. type(opts) .. ")", 2) end
  if type(fn) ~= "function" then error("bad argument #2 to 'retry' (function expected, got " .. type(fn) .. ")", 2) end
  check_retry(opts, 3)
  local attempts = opts.attempts or 3
  local base = raw.seconds(opts.backoff or "100ms")
  local cap = raw.seconds(opts.max_backoff or "5s")
  local jitter = opts.jitter or 0.1
  for attempt = 1, attempts do
    local r = pack(pcall(fn, attempt))
    if r[1] then return unpack(r, 2, r.n) end
    local err = r[2]
    if attempt >= attempts or (opts.retry_on ~= nil and not opts.retry_on(err)) then error(err, 0) end
    if opts.on_retry ~= nil then opts.on_retry(err, attempt) end
    local delay = min(cap, base * 2 ^ (attempt - 1))
    delay = delay * (1 + jitter * (2 * random() - 1))
    if delay > 0 then sleep(delay) end
  end
end

-- The declarative form: return colo.policy{ primary=, secondary=, interval=, ... }
-- colo.policy itself is a host function (it checks every field and names the policy line,
-- even from `return colo.policy{...}`, a tail call); it then runs this in a task of its own.
raw.set_declarative(function(spec)
  local mode = spec.mode or "xen"
  local p, s = spec.primary, spec.secondary
  local ticker, watch
  if raw.cluster_info().enabled then
    -- With an arbiter: checkpoint only while this host holds the pair's key, the primary
    -- paused by a fence; the failover below waits for the key too (policy.on_lost).
    raw.cluster_acquire(true)
    raw.cluster_guard(p.name)
  end
  local function checkpoint()
    if mode == "xen" then return colo.checkpoint(p, s, { keep = spec.keep }) end
    return remus.checkpoint(p, { keep = spec.keep })
  end
  ticker = policy.every(spec.interval, function()
    local ok, result = pcall(retry, spec.retry or { attempts = 1 }, checkpoint)
    if ok then
      if spec.on_checkpoint then spec.on_checkpoint(result) end
    elseif spec.on_checkpoint_error then
      spec.on_checkpoint_error(result)
    else
      log.error("checkpoint failed: " .. tostring(result))
    end
  end)
  -- A failover ends this pair's checkpointing, not the run: the run ends when no pair (and
  -- nothing else) is left, or at policy.stop(). Every failover is counted once (a handler
  -- that restores a standby has counted it already).
  watch = policy.on_lost(p, function(_, reason)
    ticker.cancel()
    log.warn("primary lost (" .. tostring(reason) .. "): failing over to " .. s.name)
    local window = raw.failover_begin(p.name, s.name)
    local ok, err = true, nil
    if spec.on_failover then
      ok, err = pcall(spec.on_failover, p, s, reason)
    elseif mode == "xen" then
      ok, err = pcall(s.resume, s)
    end
    raw.failover_end(window)
    if not ok then error(err, 0) end
  end, { heartbeat = spec.heartbeat, timeout = spec.heartbeat_timeout })
end)
colo.policy = raw.colo_policy
"""#
