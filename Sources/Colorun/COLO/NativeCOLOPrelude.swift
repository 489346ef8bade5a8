/// `colo.native.*`: QEMU 7.2's own COLO (disk replication, network comparison, both
/// failovers, re-protection) driven over pure QMP, written in Lua on top of the prelude's
/// `raw.execute` (it is appended to `colorunPrelude` and shares its locals).
///
/// Why Lua and not Swift: every step is one QMP command whose reply the policy may want to
/// look at, and QEMU's documentation (docs/COLO-FT.txt) describes them as such a list; the
/// sequences read one-to-one against that list here, each step's failure is logged with the
/// domain and command, and a policy that wants another order can copy a function. What must
/// not be left to a script, resuming a VM that a failed step left paused, goes through the
/// journaled `stop`/`resume` of the Swift side.
///
/// The object and node ids are fixed (docs/lua-api.md, "Native COLO"); the command-line
/// layout is `COLOLayout` (`colorun colo-args`).
let nativeCOLOPrelude = #"""

-- QEMU's native COLO ------------------------------------------------------------------------

local native = {}
colo.native = native
local clock = raw.clock

-- Ids colorun gives the runtime objects (chardevs, filters, iothread, compare, nodes).
local ID = {
  disk = "colo-disk0", parent = "parent0", replication = "replication0", resync = "colo-resync",
  mirror = "colo-mirror0", compare_sec = "colo-compare1", compare_pri = "colo-compare0",
  compare_pri_in = "colo-compare0-0", compare_out = "colo-compare-out", compare_out_in = "colo-compare-out0",
  red_in = "colo-red0", red_out = "colo-red1",
  m0 = "colo-m0", redire0 = "colo-redire0", redire1 = "colo-redire1", iothread = "colo-iothread1", comp = "colo-comp0",
  f1 = "colo-f1", f2 = "colo-f2", rewriter = "colo-rew0",
}
native.ids = ID

local function desc(err)
  if type(err) == "table" and err.desc ~= nil then return tostring(err.desc) end
  return tostring(err)
end

-- One QMP step of a sequence: failures are logged with the domain and command and counted in
-- `report`; the caller decides whether the sequence goes on.
local function step(report, dn, command, args)
  local t0 = clock()
  local ok, r = pcall(raw.execute, dn, command, args)
  local entry = { domain = dn, command = command, ok = ok, ms = (clock() - t0) * 1000 }
  if args ~= nil and (args.id ~= nil or args["node-name"] ~= nil) then entry.id = args.id or args["node-name"] end
  if not ok then
    entry.error = desc(r)
    report.failed = report.failed + 1
    log.warn("colo.native: " .. dn .. ": " .. command .. (entry.id and (" " .. entry.id) or "") .. " failed: " .. entry.error)
  end
  report.steps[#report.steps + 1] = entry
  return ok, r
end

local function new_report(what) return { what = what, steps = {}, failed = 0, undo = {} } end

-- The step that takes back what a wiring step added (nil: nothing to take back).
local function inverse(command, args)
  if command == "chardev-add" then return { "chardev-remove", { id = args.id } } end
  if command == "object-add" then return { "object-del", { id = args.id } } end
  if command == "nbd-server-start" then return { "nbd-server-stop" } end
  if command == "nbd-server-add" then return { "nbd-server-remove", { name = args.device, mode = "hard" } } end
  if command == "blockdev-add" then return { "blockdev-del", { ["node-name"] = args["node-name"] } } end
  if command == "x-blockdev-change" and args.node ~= nil then return { "x-blockdev-change", { parent = args.parent, node = args.node } } end
  if command == "migrate-set-capabilities" then
    local caps = {}
    for i, c in ipairs(args.capabilities) do caps[i] = { capability = c.capability, state = not c.state } end
    return { "migrate-set-capabilities", { capabilities = caps } }
  end
  if command == "migrate" then return { "migrate_cancel" } end
  return nil
end

-- A step that must succeed: raises the domain error (structured) when it fails. What it
-- added is remembered in report.undo, so that `undo` can take it back.
local function must(report, dn, command, args)
  local ok, r = step(report, dn, command, args)
  if not ok then error(r, 0) end
  local back = inverse(command, args)
  if back ~= nil then report.undo[#report.undo + 1] = { dn, back[1], back[2] } end
  return r
end

local function address(s, what, fname)
  if type(s) ~= "string" then error(fname .. ": '" .. what .. "' (HOST:PORT) is required", 4) end
  local host, port = s:match("^%[?([^%]]*)%]?:(%d+)$")
  if host == nil then error(fname .. ": '" .. what .. "' must be HOST:PORT, got '" .. s .. "'", 4) end
  return host, tonumber(port)
end

local function inet(host, port) return { type = "inet", data = { host = host, port = tostring(port) } } end

local function socket_chardev(id, host, port, server)
  local data = { addr = inet(host, port), server = server }
  if server then data.wait = false else data.reconnect = 1 end
  return { id = id, backend = { type = "socket", data = data } }
end

local function options(opts, fname)
  if opts == nil then
    opts = {}
  elseif type(opts) ~= "table" then
    error("bad argument #3 to '" .. fname .. "' (table of options expected, got " .. type(opts) .. ")", 3)
  end
  check_fields(opts, fname, 3, 3)
  if type(opts.uri) ~= "string" then
    error(fname .. ": 'uri' (where the secondary's -incoming listens, e.g. tcp:10.0.0.2:9998) is required", 3)
  end
  local o = { uri = opts.uri, netdev = opts.netdev or "hn0" }
  o.nbd_host, o.nbd_port = address(opts.nbd, "nbd", fname)
  o.net_host, o.net_port = address(opts.net, "net", fname)
  o.delay_ms = floor(raw.seconds(opts.delay or "200ms") * 1000 + 0.5)
  o.timeout = raw.seconds(opts.timeout or "10s")
  o.resync_timeout = raw.seconds(opts.resync_timeout or "120s")
  o.check = opts.check ~= false
  return o
end

-- Waits until pred() is true, polling every 2 ms; false after `timeout` seconds.
local function wait_for(pred, timeout)
  local deadline = clock() + timeout
  while not pred() do
    if clock() >= deadline then return false end
    sleep(0.002)
  end
  return true
end

-- The runtime objects of a domain: a set of ids under /objects.
local function objects(dn)
  local set = {}
  local ok, list = pcall(raw.execute, dn, "qom-list", { path = "/objects" })
  if ok then for _, o in ipairs(list) do set[o.name] = o.type end end
  return set
end

-- The quorum child that holds node `node` in a x-debug-query-block-graph reply, "children.1"
-- if unknown.
local function quorum_child(graph, node)
  if graph ~= nil then
    local names = {}
    for _, n in ipairs(graph.nodes) do names[n.id] = n.name end
    for _, e in ipairs(graph.edges) do
      if names[e.child] == node and names[e.parent] ~= nil and e.name:match("^children%.") then return e.name end
    end
  end
  return "children.1"
end

-- The layout check ------------------------------------------------------------------------

-- What is missing from domain dn for `role` ("primary", "secondary" or "survivor"): a list.
local function missing(dn, role)
  local out = {}
  local blocks = raw.execute(dn, "query-block")
  local disk, parent
  for _, b in ipairs(blocks) do
    if b.device == ID.disk then disk = b end
    if b.device == ID.parent then parent = b end
  end
  if disk == nil then
    out[#out + 1] = "no drive '" .. ID.disk .. "' (the guest's disk must be a quorum drive with that id)"
  elseif disk.inserted == nil or disk.inserted.drv ~= "quorum" then
    out[#out + 1] = "drive '" .. ID.disk .. "' is " .. tostring(disk.inserted and disk.inserted.drv) .. ", not quorum"
  end
  if role == "secondary" then
    if parent == nil then out[#out + 1] = "no drive '" .. ID.parent .. "' (the base image the primary writes through NBD)" end
    local replication = false
    for _, n in ipairs(raw.execute(dn, "query-named-block-nodes", { flat = true })) do
      if n.drv == "replication" then replication = true end
    end
    if not replication then
      out[#out + 1] = "no replication node (driver=replication,mode=secondary,top-id=" .. ID.disk .. " over active -> hidden -> " .. ID.parent .. ")"
    end
    local st = raw.execute(dn, "query-status")
    if st.status ~= "inmigrate" then out[#out + 1] = "not waiting for the migration (-incoming): it is " .. tostring(st.status) end
  end
  if role == "primary" or role == "secondary" then
    local objs, stale = objects(dn), {}
    for _, id in pairs(ID) do if objs[id] ~= nil then stale[#stale + 1] = id end end
    table.sort(stale)
    if #stale > 0 then out[#out + 1] = "objects left from an earlier COLO run: " .. table.concat(stale, ", ") end
  end
  return out
end

local function check(dn, role, fname)
  local m = missing(dn, role)
  if #m > 0 then
    local layout = role == "survivor" and "primary" or role
    error(fname .. ": " .. dn .. " is not COLO-shaped for the " .. role .. ": " .. table.concat(m, "; ")
      .. ". Start its QEMU with the layout `colorun colo-args " .. layout .. "` prints (docs/lua-api.md, Native COLO)", 3)
  end
end

native.check = function(d, role)
  local dn = name_of(d, "colo.native.check", 1)
  if role ~= "primary" and role ~= "secondary" then
    error("bad argument #2 to 'colo.native.check' (\"primary\" or \"secondary\" expected, got " .. tostring(role) .. ")", 2)
  end
  local m = missing(dn, role)
  return #m == 0, m
end

-- Wiring ------------------------------------------------------------------------------------

-- The secondary side: x-colo, the NBD export of its parent image, the redirectors that bring
-- the primary's input in and send the guest's output to the primary's colo-compare, the
-- rewriter.
local function wire_secondary(report, sn, o)
  must(report, sn, "migrate-set-capabilities", { capabilities = { { capability = "x-colo", state = true } } })
  must(report, sn, "nbd-server-start", { addr = inet(o.nbd_host, o.nbd_port) })
  must(report, sn, "nbd-server-add", { device = ID.parent, writable = true })
  must(report, sn, "chardev-add", socket_chardev(ID.red_in, o.net_host, o.net_port, false))
  must(report, sn, "chardev-add", socket_chardev(ID.red_out, o.net_host, o.net_port + 1, false))
  must(report, sn, "object-add", { ["qom-type"] = "filter-redirector", id = ID.f1, netdev = o.netdev, queue = "tx", indev = ID.red_in })
  must(report, sn, "object-add", { ["qom-type"] = "filter-redirector", id = ID.f2, netdev = o.netdev, queue = "rx", outdev = ID.red_out })
  must(report, sn, "object-add", { ["qom-type"] = "filter-rewriter", id = ID.rewriter, netdev = o.netdev, queue = "all" })
end

-- The primary's chardevs: the mirror and the secondary's compare input (servers the secondary
-- connects to), and two local server/client pairs for colo-compare's input and output.
-- Never wait=on: it would block the primary until the secondary connects.
local function primary_chardevs(report, pn, o)
  must(report, pn, "chardev-add", socket_chardev(ID.mirror, o.net_host, o.net_port, true))
  must(report, pn, "chardev-add", socket_chardev(ID.compare_sec, o.net_host, o.net_port + 1, true))
  must(report, pn, "chardev-add", socket_chardev(ID.compare_pri, "127.0.0.1", o.net_port + 2, true))
  must(report, pn, "chardev-add", socket_chardev(ID.compare_pri_in, "127.0.0.1", o.net_port + 2, false))
  must(report, pn, "chardev-add", socket_chardev(ID.compare_out, "127.0.0.1", o.net_port + 3, true))
  must(report, pn, "chardev-add", socket_chardev(ID.compare_out_in, "127.0.0.1", o.net_port + 3, false))
end

-- The primary's filters, colo-compare and its iothread, and the replication node under the
-- quorum. On an ex-secondary the filters go before its rewriter.
local function wire_primary(report, pn, o)
  local pos = {}
  if objects(pn)[ID.rewriter] ~= nil then pos = { insert = "before", position = "id=" .. ID.rewriter } end
  local function filter(args)
    for k, v in pairs(pos) do args[k] = v end
    must(report, pn, "object-add", args)
  end
  filter({ ["qom-type"] = "filter-mirror", id = ID.m0, netdev = o.netdev, queue = "tx", outdev = ID.mirror })
  filter({ ["qom-type"] = "filter-redirector", id = ID.redire0, netdev = o.netdev, queue = "rx", indev = ID.compare_out })
  filter({ ["qom-type"] = "filter-redirector", id = ID.redire1, netdev = o.netdev, queue = "rx", outdev = ID.compare_pri })
  must(report, pn, "object-add", { ["qom-type"] = "iothread", id = ID.iothread })
  must(report, pn, "object-add", { ["qom-type"] = "colo-compare", id = ID.comp, primary_in = ID.compare_pri_in,
    secondary_in = ID.compare_sec, outdev = ID.compare_out_in, iothread = ID.iothread })
  must(report, pn, "blockdev-add", { driver = "replication", mode = "primary", ["node-name"] = ID.replication,
    file = { driver = "nbd", server = { type = "inet", host = o.nbd_host, port = tostring(o.nbd_port) }, export = ID.parent } })
  must(report, pn, "x-blockdev-change", { parent = ID.disk, node = ID.replication })
end

-- x-colo, the checkpoint delay and the migration that starts COLO; waits for both modes.
local function start_colo(report, pn, sn, o, fname)
  must(report, pn, "migrate-set-capabilities", { capabilities = { { capability = "x-colo", state = true } } })
  must(report, pn, "migrate-set-parameters", { ["x-checkpoint-delay"] = o.delay_ms })
  must(report, pn, "migrate", { uri = o.uri })
  -- A secondary's monitor can be slow to answer while it loads a checkpoint (each one holds
  -- QEMU's main lock): a query that times out only means "not yet".
  local status, last_error
  local function query(dn, command)
    local ok, r = pcall(raw.execute, dn, command)
    if ok then return r end
    last_error = r
    return nil
  end
  local ok = wait_for(function()
    -- The primary reports mode "primary" before it starts replication; it resumes its VM
    -- (stopped since the end of the migration) only after: wait for that too, or a write
    -- made right after this returns may fail on the replication child and never reach the
    -- secondary.
    status = query(pn, "query-colo-status")
    if status ~= nil and status.mode == "primary" then
      local sst, pst = query(sn, "query-colo-status"), query(pn, "query-status")
      if sst ~= nil and sst.mode == "secondary" and pst ~= nil and pst.running then return true end
    end
    local m = query(pn, "query-migrate")
    if m ~= nil and (m.status == "failed" or m.status == "cancelled") then
      error(fname .. ": migration to the secondary " .. m.status .. ": " .. tostring(m["error-desc"]), 0)
    end
    return false
  end, o.timeout)
  if not ok then
    error(fname .. ": COLO mode not reached within " .. o.timeout .. " s"
      .. (last_error and (" (last error: " .. desc(last_error) .. ")") or ""), 0)
  end
  return status
end

-- Takes back, newest first, what the `must` steps of report added (each failure logged, the
-- others still run); the quorum child a replication node went into is looked up at the time.
-- Returns how many steps it took back.
local function undo(report)
  local n = 0
  for i = #report.undo, 1, -1 do
    local dn, command, args = report.undo[i][1], report.undo[i][2], report.undo[i][3]
    if command == "x-blockdev-change" then
      local gok, graph = pcall(raw.execute, dn, "x-debug-query-block-graph")
      args = { parent = args.parent, child = quorum_child(gok and graph or nil, args.node) }
    end
    step(report, dn, command, args)
    n = n + 1
  end
  report.undo = {}
  return n
end

-- Runs fn(); if it raises, undoes what it wired, makes sure `running` domains (those that
-- ran before) run, and raises the error with `undone` (the steps taken back) and, for a QMP
-- step, the domain and command in its message.
local function undoing(report, fname, running, fn)
  local ok, err = pcall(fn)
  if ok then
    report.undo = nil
    return
  end
  local n = undo(report)
  for _, dn in ipairs(running) do
    local qok, st = pcall(raw.execute, dn, "query-status")
    if not (qok and st.running) then step(report, dn, "cont") end
  end
  log.warn(fname .. " failed; " .. n .. " wiring steps taken back: " .. desc(err))
  if type(err) == "table" then
    err.undone = n
    error(err, 0)
  end
  error(tostring(err) .. " (" .. n .. " wiring steps taken back)", 0)
end

native.start = function(p, s, opts)
  local pn = name_of(p, "colo.native.start", 1)
  local sn = name_of(s, "colo.native.start", 2)
  local o = options(opts, "colo.native.start")
  if o.check then
    check(pn, "primary", "colo.native.start")
    check(sn, "secondary", "colo.native.start")
  end
  local report = new_report("start")
  local t0 = clock()
  local pst = raw.execute(pn, "query-status")
  local st
  undoing(report, "colo.native.start", pst.running and { pn } or {}, function()
    primary_chardevs(report, pn, o)
    wire_secondary(report, sn, o)
    wire_primary(report, pn, o)
    st = start_colo(report, pn, sn, o, "colo.native.start")
  end)
  report.ms = (clock() - t0) * 1000
  report.mode = st.mode
  return report
end

-- Failovers ---------------------------------------------------------------------------------

-- Steps sent at once to dn (QEMU runs them in order, one round trip for all), each recorded
-- in `report` like `step` (its ms counts from the send); `cmds` is a list of {command, args}.
-- Returns the list of {ok=, value=, error=}.
local function batch(report, dn, cmds)
  local results = raw.execute_batch(dn, cmds)
  for i, c in ipairs(cmds) do
    local r, args = results[i], c[2]
    local entry = { domain = dn, command = c[1], ok = r.ok, ms = r.ms }
    if args ~= nil and (args.id ~= nil or args["node-name"] ~= nil) then entry.id = args.id or args["node-name"] end
    if not r.ok then
      entry.error = desc(r.error)
      report.failed = report.failed + 1
      log.warn("colo.native: " .. dn .. ": " .. c[1] .. (entry.id and (" " .. entry.id) or "") .. " failed: " .. entry.error)
    end
    report.steps[#report.steps + 1] = entry
  end
  return results
end

-- Both failovers: `first` (a list of steps, x-colo-lost-heartbeat first, then a
-- query-status, then the rest, all sent at once) makes dn the one running copy;
-- `teardown(results, ok)` gives the steps that finish the job, sent at once after dn runs.
-- Waits (1 s) until dn runs, `cont` otherwise. The report has running_ms (first command -> dn
-- answers running) and ms (all done); a failed heartbeat is raised after the rest ran.
local function take_over(what, dn, first, teardown)
  local report = new_report(what)
  report.undo = nil
  local t0 = clock()
  local cmds = { { "x-colo-lost-heartbeat" }, { "query-status" } }
  for _, c in ipairs(first) do cmds[#cmds + 1] = c end
  local results = batch(report, dn, cmds)
  local ok, err = results[1].ok, results[1].error
  local st = results[2]
  if st.ok and st.value.running then
    report.running_ms = st.ms
  elseif wait_for(function()
      local qok, q = pcall(raw.execute, dn, "query-status")
      return qok and q.running
    end, 1) then
    report.running_ms = (clock() - t0) * 1000
  else
    step(report, dn, "cont")
    local qok, q = pcall(raw.execute, dn, "query-status")
    if qok and q.running then report.running_ms = (clock() - t0) * 1000 end
  end
  report.running = report.running_ms ~= nil
  local rest = teardown(results, ok)
  if #rest > 0 then batch(report, dn, rest) end
  report.ms = (clock() - t0) * 1000
  if not ok then error(err, 0) end
  raw.count_failover(dn)
  return report
end

-- Promote the secondary (the primary is lost): QEMU's documented steps, x-colo-lost-heartbeat
-- first and nbd-server-stop right behind it in the same round trip (nbd-server-stop first,
-- as QEMU's document has it, took 300 ms now and then here, and the secondary ran only after
-- it); once it runs, its redirectors and their chardevs go (only after a heartbeat that
-- worked: a secondary still in COLO keeps them). This is the one place a secondary becomes
-- the running copy.
native.failover = function(s)
  raw.cluster_gate("colo.native.failover")   -- with an arbiter: only the key's holder promotes
  local sn = name_of(s, "colo.native.failover", 1)
  return take_over("failover", sn, { { "nbd-server-stop" } }, function(_, ok)
    if not ok then return {} end
    return {
      { "object-del", { id = ID.f2 } }, { "object-del", { id = ID.f1 } },
      { "chardev-remove", { id = ID.red_out } }, { "chardev-remove", { id = ID.red_in } },
    }
  end)
end

-- Continue without the secondary (it is lost): x-colo-lost-heartbeat first (QEMU stops the
-- primary for the failover and resumes it when COLO has ended: the sooner, the shorter the
-- guest's pause), then the replication child, colo-compare, its iothread, the filters and the
-- chardevs, in one round trip. The replication child's name comes from the block graph
-- queried in the first round trip.
native.drop_secondary = function(p)
  local pn = name_of(p, "colo.native.drop_secondary", 1)
  return take_over("drop_secondary", pn, { { "x-debug-query-block-graph" } }, function(results)
    local rest = {
      { "x-blockdev-change", { parent = ID.disk, child = quorum_child(results[3].ok and results[3].value or nil, ID.replication) } },
      { "blockdev-del", { ["node-name"] = ID.replication } },
    }
    for _, id in ipairs({ ID.comp, ID.iothread, ID.m0, ID.redire0, ID.redire1 }) do rest[#rest + 1] = { "object-del", { id = id } } end
    for _, id in ipairs({ ID.compare_pri_in, ID.compare_pri, ID.compare_out_in, ID.compare_out, ID.mirror, ID.compare_sec }) do
      rest[#rest + 1] = { "chardev-remove", { id = id } }
    end
    return rest
  end)
end

-- Re-protection -----------------------------------------------------------------------------

native.reprotect = function(survivor, s, opts)
  local pn = name_of(survivor, "colo.native.reprotect", 1)
  local sn = name_of(s, "colo.native.reprotect", 2)
  local o = options(opts, "colo.native.reprotect")
  if o.check then
    check(pn, "survivor", "colo.native.reprotect")
    check(sn, "secondary", "colo.native.reprotect")
  end
  local st = raw.execute(pn, "query-colo-status")
  if st.mode ~= "none" then error("colo.native.reprotect: " .. pn .. " is still in COLO mode " .. st.mode .. " (fail over first)", 2) end
  local report = new_report("reprotect")
  local t0 = clock()
  -- The fresh secondary's export, then a full mirror of the survivor's disk into it.
  wire_secondary(report, sn, o)
  local job = {}
  local sub = raw.on_event(pn, "JOB_STATUS_CHANGE", function(ev)
    if ev.data and ev.data.id == ID.resync then job[ev.data.status] = clock() end
  end)
  local function cleanup_job()
    raw.cancel(sub)
    pcall(raw.execute, pn, "blockdev-del", { ["node-name"] = ID.resync })
  end
  local ok, err = pcall(function()
    must(report, pn, "blockdev-add", { driver = "nbd", ["node-name"] = ID.resync,
      server = { type = "inet", host = o.nbd_host, port = tostring(o.nbd_port) }, export = ID.parent })
    report.undo[#report.undo] = nil   -- cleanup_job deletes it
    must(report, pn, "blockdev-mirror", { ["job-id"] = ID.resync, device = ID.disk, target = ID.resync, sync = "full" })
    if not wait_for(function() return job.ready ~= nil or job.concluded ~= nil end, o.resync_timeout) then
      error("colo.native.reprotect: the resync of " .. pn .. "'s disk was not ready within " .. o.resync_timeout .. " s", 0)
    end
    if job.ready == nil then error("colo.native.reprotect: the resync job ended before it was ready", 0) end
  end)
  if not ok then
    pcall(raw.execute, pn, "block-job-cancel", { device = ID.resync, force = true })
    wait_for(function() return job.null ~= nil end, 5)
    cleanup_job()
    undo(report)
    error(err, 0)
  end
  report.resync_ms = (clock() - t0) * 1000
  -- The switch: the survivor pauses while the job is cancelled (the target stays in sync),
  -- replication and the filters are added and COLO restarts; COLO's first checkpoint
  -- resumes it. Any failure here resumes it before the error reaches the policy.
  local resumed = false
  local resume_sub = raw.on_event(pn, "RESUME", function() resumed = clock() end)
  local paused = clock()
  ok, err = pcall(function()
    raw.stop(pn)
    must(report, pn, "block-job-cancel", { device = ID.resync })
    if not wait_for(function() return job.null ~= nil end, o.timeout) then
      error("colo.native.reprotect: the resync job did not end after block-job-cancel", 0)
    end
    cleanup_job()
    primary_chardevs(report, pn, o)
    wire_primary(report, pn, o)
    st = start_colo(report, pn, sn, o, "colo.native.reprotect")
  end)
  if not ok then
    raw.cancel(resume_sub)
    cleanup_job()
    undo(report)
    pcall(raw.resume, pn)
    error(err, 0)
  end
  wait_for(function() return resumed end, o.timeout)
  raw.cancel(resume_sub)
  if not resumed then pcall(raw.resume, pn) end
  -- QEMU resumed it: the run no longer has it stopped.
  if resumed then raw.mark_resumed(pn) end
  report.undo = nil
  report.pause_ms = ((resumed or clock()) - paused) * 1000
  report.ms = (clock() - t0) * 1000
  report.mode = st.mode
  return report
end

-- Forces a checkpoint now (setting x-checkpoint-delay again makes QEMU checkpoint at once) and
-- waits for it to end (the primary's RESUME). Returns the milliseconds it took.
native.checkpoint = function(p, opts)
  local pn = name_of(p, "colo.native.checkpoint", 1)
  opts = opt_table(opts, "colo.native.checkpoint", 2)
  local delay = raw.execute(pn, "query-migrate-parameters")["x-checkpoint-delay"]
  if opts.delay ~= nil then delay = floor(raw.seconds(opts.delay) * 1000 + 0.5) end
  -- A checkpoint is a STOP then a RESUME of the primary; a RESUME alone may be an earlier one's.
  local stopped, done = false, false
  local sub1 = raw.on_event(pn, "STOP", function() stopped = true end)
  local sub = raw.on_event(pn, "RESUME", function() done = stopped end)
  local t0 = clock()
  local ok, err = pcall(raw.execute, pn, "migrate-set-parameters", { ["x-checkpoint-delay"] = delay })
  if ok and not wait_for(function() return done end, raw.seconds(opts.timeout or "10s")) then
    ok, err = false, "colo.native.checkpoint: no checkpoint ended within " .. tostring(opts.timeout or "10s")
  end
  raw.cancel(sub)
  raw.cancel(sub1)
  if not ok then error(err, 2) end
  return (clock() - t0) * 1000
end

native.status = function(d) return raw.execute(name_of(d, "colo.native.status"), "query-colo-status") end
native.on_exit = function(d, fn)
  if not isdomain(d) then d = wrap(raw.domain_get(name_of(d, "colo.native.on_exit"))) end
  return d:on("COLO_EXIT", fn)
end
"""#
