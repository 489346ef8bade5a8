-- examples/qemu-colo.lua: QEMU's native COLO in full, with colorun as the heartbeat,
-- failover and re-protection manager QEMU's documentation leaves to the operator.
-- Needs KVM (QEMU 7.2's COLO deadlocks under TCG) and COLO-shaped QEMUs
-- (`colorun colo-args primary|secondary` prints the layout).
--
--   colorun --lab --guest colo examples/qemu-colo.lua                 # forever, a kill every 2 s
--   colorun --lab --guest colo examples/qemu-colo.lua -- cycles=4
--   colorun examples/qemu-colo.lua --domain primary=unix:/run/p.qmp --domain secondary=unix:/run/s.qmp \
--     -- uri=tcp:10.0.0.2:9998 nbd=10.0.0.2:9999 net=10.0.0.1:9003 next=unix:/run/colo-s%d.qmp
--
-- The loop: COLO runs until one side is lost. A lost primary: the secondary is promoted
-- (colo.native.failover). A lost secondary: the primary goes on alone
-- (colo.native.drop_secondary). Either way the survivor is then re-protected by a fresh
-- secondary (colo.native.reprotect: its disk resynced from the survivor, then COLO again), and
-- the loop waits for the next loss: failover -> reprotect -> failover -> reprotect ...
--
-- In the lab the policy makes the losses itself (kill=on): it SIGKILLs the primary and the
-- secondary in turn, and before each kill writes a pattern of its own on the primary's COLO
-- disk and waits for a checkpoint; after each failover it checks that every pattern written
-- so far is on the survivor's disk, and stops with an error if one is missing.
--
-- Arguments (after --), each NAME=VALUE:
--   cycles=N        stop after N failovers (default 0: never)
--   delay=D         x-checkpoint-delay: the longest time between two checkpoints (default 200ms)
--   kill=on|off     in the lab, kill a side every `every` (default on)
--   every=D         (default 2s)
--   uri=, nbd=, net=   outside the lab: the secondary's -incoming URI, its NBD HOST:PORT, and
--                   the primary's HOST:PORT for the network chardevs (4 ports from PORT)
--   next=PATTERN    outside the lab: the QMP endpoint of the Nth new secondary (%d = N), started
--                   by the site's tooling with the secondary layout; its uri=, nbd= are reused

local opts = { cycles = 0, delay = "200ms", kill = "on", every = "2s" }
for _, arg in ipairs({...}) do
  local k, v = arg:match("^([%w_]+)=(.*)$")
  if k == nil then error("qemu-colo.lua: arguments are NAME=VALUE, got '" .. arg .. "'") end
  opts[k] = v
end
opts.cycles = tonumber(opts.cycles)

local lab = rawget(_G, "lab")
local in_lab = lab ~= nil and lab.colo ~= nil
if not in_lab and (opts.uri == nil or opts.nbd == nil or opts.net == nil) then
  error("qemu-colo.lua: outside the COLO lab (--lab --guest colo) pass -- uri=URI nbd=HOST:PORT net=HOST:PORT (see its header)")
end

-- The addresses colo.native needs to use `s` as the secondary.
local function addresses(s)
  local a = in_lab and lab.colo(s) or { uri = opts.uri, nbd = opts.nbd, net = opts.net }
  return { uri = a.uri, nbd = a.nbd, net = a.net, delay = opts.delay }
end

local function new_secondary(n)
  if in_lab then return lab.colo_secondary("secondary-" .. n) end
  if opts.next == nil then error("qemu-colo.lua: a new secondary is needed: pass next=ENDPOINT_PATTERN") end
  return domain.open({ name = "secondary-" .. n, qmp = opts.next:format(n) })
end

-- The lab's proof: a 64 KiB pattern per cycle on the primary's COLO disk.
local written = {}
local function hmp(d, line) return qmp.execute(d, "human-monitor-command", { ["command-line"] = line }) end
local function write_pattern(p, n)
  local pattern = string.format("0x%02x", 0x10 + n % 0xe0)
  hmp(p, string.format('qemu-io colo-disk0 "write -P %s %dk 64k"', pattern, 64 * n))   -- colo-disk0: the quorum drive
  written[#written + 1] = { n = n, pattern = pattern }
  colo.native.checkpoint(p)   -- the write is in the secondary's disk from this checkpoint on
end
local function verify(d)
  for _, w in ipairs(written) do
    local found = lab.disk_pattern(d, 65536 * w.n, 65536)
    if found ~= tonumber(w.pattern) then
      error("the write of cycle " .. w.n .. " (" .. w.pattern .. ") is not on " .. d.name .. " (found " .. found .. ")")
    end
  end
  log.info("every pattern written so far is on " .. d.name, { patterns = #written })
end

-- Waits until p or s is lost; in the lab, kills one of them (the primary on odd cycles).
local function await_loss(p, s, n)
  local lost
  -- A monitor that closes is lost at once; one that does not answer for 5 s too (a COLO
  -- secondary's monitor can be slow while it loads a checkpoint on a busy host).
  local hb = { heartbeat = "100ms", timeout = "5s" }
  local wp = policy.on_lost(p, function() lost = lost or "primary" end, hb)
  local ws = policy.on_lost(s, function() lost = lost or "secondary" end, hb)
  if in_lab and opts.kill == "on" then
    sleep(opts.every)
    write_pattern(p, n)
    lab.kill(n % 2 == 1 and p or s)
  end
  while lost == nil do sleep("10ms") end
  wp.cancel()
  ws.cancel()
  return lost
end

local p, s = domain.get("primary"), domain.get("secondary")
local r = colo.native.start(p, s, addresses(s))
log.info("COLO running", { primary = p.name, secondary = s.name, setup_ms = r.ms })

local n = 0
while opts.cycles == 0 or n < opts.cycles do
  n = n + 1
  local survivor
  if await_loss(p, s, n) == "primary" then
    local f = colo.native.failover(s)
    log.warn("primary lost: " .. s.name .. " promoted", { running_ms = f.running_ms, ms = f.ms, failed_steps = f.failed })
    survivor = s
  else
    local f = colo.native.drop_secondary(p)
    log.warn("secondary lost: " .. p.name .. " runs alone", { running_ms = f.running_ms, ms = f.ms, failed_steps = f.failed })
    survivor = p
  end
  if in_lab then verify(survivor) end
  local ns = new_secondary(n)
  local rp = colo.native.reprotect(survivor, ns, addresses(ns))
  log.info("re-protected: " .. survivor.name .. " -> " .. ns.name,
    { cycle = n, resync_ms = rp.resync_ms, pause_ms = rp.pause_ms })
  p, s = survivor, ns
end
log.info("done", { cycles = n })
policy.stop()
