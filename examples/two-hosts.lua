-- examples/two-hosts.lua: one VM, two hosts, one truth (etcd decides who runs it).
--
-- Both hosts run this same policy, each with its own colorun and the same shared state
-- directory (checkpoints live there):
--
--   host A, whose QEMU runs the VM now (domain "vm"), and whose peer is B's standby host:
--     colorun examples/two-hosts.lua --etcd http://10.0.0.9:2379 --node a \
--       --state-dir /shared/colorun --domain vm=tcp:127.0.0.1:4444 --domain peer=tcp:10.0.0.12:4444 \
--       -- standby_qmp=unix:/run/colorun/vm-{token}.qmp standby_qemu="qemu-system-x86_64 -M pc -m 2048 ... -qmp unix:/run/colorun/vm-{token}.qmp,server=on,wait=off"
--   host B (no VM yet; "peer" is A's QEMU, so B can pause it before promoting):
--     colorun examples/two-hosts.lua --etcd http://10.0.0.9:2379 --node b \
--       --state-dir /shared/colorun --domain peer=tcp:10.0.0.11:4444 -- standby_qmp=... standby_qemu="..."
--
-- What happens:
--   * whoever wins the pair's key (cluster.acquire) is the primary: A, whose VM is running,
--     guards it (paused by colorun if A ever loses the key) and checkpoints it every
--     `interval` into the shared series `series`;
--   * the other host waits for the key; while A's lease is alive it never promotes, however
--     dead A looks from where it stands;
--   * when it wins (A's lease expired: A was cut off, or its colorun died), it pauses A's QEMU
--     through "peer" if it can reach it (A's colorun may be dead with its QEMU alive), restores
--     a standby from the last good checkpoint (remus.restore: the promotion is confirmed in
--     etcd with the fencing token first), and checkpoints that standby into the same series;
--   * a host that is fenced (it could not renew its lease in time) has its VM paused by
--     colorun, never resumes it, and waits to win the key again; when it does, it restores
--     from the newest checkpoint, like any promotion (and quits its stale, paused VM).
--
-- Arguments after `--` (key=value):
--   interval=200ms          checkpoint interval
--   series=vm               the checkpoint series in the shared state directory
--   standby_qemu="..."      QEMU's command line for a restored standby, space-separated,
--                           without -incoming (colorun adds it); {token} is replaced by the
--                           fencing token, so each promotion has sockets of its own
--   standby_qmp=unix:PATH   the monitor that command line opens ({token} replaced too)
--   keep=3                  generations kept

local args = {}
for _, a in ipairs({...}) do
  local k, v = a:match("^([%w_]+)=(.*)$")
  if not k then error("two-hosts.lua: argument '" .. a .. "': expected key=value", 0) end
  args[k] = v
end
local interval = args.interval or "200ms"
local series = args.series or "vm"
local keep = tonumber(args.keep or "3")

if not cluster.enabled() then
  error("two-hosts.lua needs the arbiter: colorun examples/two-hosts.lua --etcd URL --node NAME ...", 0)
end
local me = cluster.node()

local function optional_domain(name)
  for _, d in ipairs(domain.list()) do
    if d.name == name then return d end
  end
  return nil
end
local vm = optional_domain("vm")       -- this host's running VM, if it has one
local peer = optional_domain("peer")   -- the other host's QEMU, to pause before promoting

local function running(d)
  local ok, st = pcall(qmp.status, d, {timeout = "1s"})
  return ok and st.status == "running"
end

local ticker
local eras = 0        -- promotions made by this host, for unique standby names
local previous        -- the standby of this host's previous era (paused since it was fenced)

-- Checkpoint `d` (the VM this host runs as primary) into the shared series.
local function protect(d)
  cluster.guard(d)
  log.info("primary", {domain = d.name, token = cluster.token(), series = series})
  ticker = policy.every(interval, function()
    local ok, err = pcall(remus.checkpoint, d, {series = series, keep = keep})
    if not ok then log.warn("checkpoint failed: " .. tostring(err)) end
  end)
end

local function words(text)
  local list = {}
  for w in text:gmatch("%S+") do list[#list + 1] = w end
  return list
end

-- Restore a standby from the newest good checkpoint and run it as the primary.
local function promote()
  if peer then
    -- The old primary's colorun may be dead with its QEMU alive: pause that QEMU if we can
    -- reach it. (Plain qmp.execute: not journaled, so this run never resumes it.)
    local ok, err = pcall(qmp.execute, peer, "stop", nil, {timeout = "1s"})
    if ok then
      log.warn("paused the old primary's QEMU before promoting", {peer = peer.name})
    else
      log.warn("could not reach the old primary's QEMU (its host is cut off or it is gone)", {error = tostring(err)})
    end
  end
  if not args.standby_qemu or not args.standby_qmp then
    error("two-hosts.lua: this host won the key but cannot restore a standby: give standby_qemu=... and standby_qmp=...", 0)
  end
  eras = eras + 1
  local token = tostring(cluster.token())
  local standby, info = remus.restore({
    name = series .. "-" .. me .. "-" .. token .. "-" .. eras,
    from = series,
    qemu = words((args.standby_qemu:gsub("{token}", token))),
    qmp = (args.standby_qmp:gsub("{token}", token)),
  })
  log.warn("promoted: the standby runs from the last good checkpoint",
    {domain = standby.name, generation = info.generation, restore_ms = info.restore_ms, token = token})
  if previous then
    -- This host's VM of an earlier era has been paused since that era ended: it is stale.
    pcall(qmp.execute, previous, "quit", nil, {timeout = "1s"})
  end
  previous = standby
  protect(standby)
end

cluster.on_fenced(function(reason)
  log.warn("fenced: " .. reason .. "; the VM stays paused until this host wins the key again")
end)

-- The eras: wait for the key, run the VM (the local one on the first win, if it is still
-- running; otherwise a standby restored from the newest checkpoint), until the key is lost.
local first_era = true
while true do
  local reached, won, holder = pcall(cluster.acquire)
  if not reached then
    log.warn("cannot reach etcd; waiting for the key: " .. tostring(won))
    won, holder = false, {}
  end
  if not won then
    log.info("not the primary: waiting for the key", {holder = holder.node, token = holder.token})
    if vm and first_era and running(vm) then
      -- Another host is the primary: this host's VM must not run.
      log.warn("another host holds the key: pausing the local VM", {holder = holder.node})
      pcall(qmp.execute, vm, "stop", nil, {timeout = "1s"})
    end
    cluster.acquire({wait = true})
  end
  local ok, err = true, nil
  if vm and first_era and running(vm) then
    protect(vm)
  else
    ok, err = pcall(promote)
  end
  first_era = false
  if ok then
    while cluster.is_primary() do sleep(interval) end
    log.warn("no longer the primary", {fenced = cluster.status().fenced})
  else
    log.error("promotion failed; giving the key up and trying again: " .. tostring(err))
    cluster.release()
    sleep("1s")
  end
  if ticker then ticker.cancel() ticker = nil end
end
