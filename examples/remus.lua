-- examples/remus.lua: full-VM (Remus-style) checkpoints, and failover to a standby.
--
--   colorun --lab examples/remus.lua
--
-- Every 200 ms the primary is paused, its whole state migrated into a new checkpoint file,
-- and resumed. When the primary's monitor goes away (under --lab the demo kills it after
-- 3 s), a standby QEMU is started from the last good checkpoint and resumed: the guest
-- goes on from the checkpoint, not from zero. Outside the lab, fill in STANDBY.qemu/qmp.

local primary = domain.get("primary")
local lab = rawget(_G, "lab")          -- the lab module exists only under --lab

local STANDBY = {
  name = "standby",
  from = primary,
  -- qemu = {"qemu-system-x86_64", "-M", "pc", "-m", "2048",
  --         "-device", "virtio-blk-pci,drive=disk0",   -- colorun adds -blockdev disk0: a fresh
  --                                                    -- overlay on the checkpoint's frozen disk
  --         "-qmp", "unix:/run/qemu/standby.qmp,server=on,wait=off", "-display", "none"},
  -- qmp = "unix:/run/qemu/standby.qmp",
  lab = lab ~= nil,
  paused = lab ~= nil,                 -- in the lab: look at the guest before it runs
}

local last
local ticker = policy.every("200ms", function()
  local ok, r = pcall(remus.checkpoint, primary, {keep = 3})
  if ok then
    last = r
    log.debug("checkpoint", {generation = r.generation, pause_ms = r.pause_ms})
  else
    -- the primary resumed (or is gone); the last good checkpoint is intact
    log.warn("checkpoint failed: " .. tostring(r))
  end
end)

policy.on_lost(primary, function(_, reason)
  ticker.cancel()
  log.warn("primary lost (" .. reason .. "): restoring the standby from the last good checkpoint")
  local standby, info = remus.restore(STANDBY, last and last.generation)
  if lab then
    local at = lab.counter(standby)
    log.info("standby loaded the checkpoint", {generation = info.generation, guest_counter = at})
    standby:resume()
    sleep("200ms")
    log.info("standby runs on from there", {guest_counter = lab.counter(standby)})
  end
  log.info("failover complete", {standby = standby.name, restore_ms = info.restore_ms})
  policy.stop()
end, {heartbeat = "100ms", timeout = "500ms"})

if lab then
  policy.after("3s", function()
    -- The guest boots first (longer on a busy machine), then two checkpoints of it counting.
    while lab.counter(primary) == 0 do sleep("100ms") end
    local seen = last and last.generation or 0
    while not last or last.generation < seen + 2 do sleep("100ms") end
    log.warn("lab: killing the primary with SIGKILL", {guest_counter = lab.counter(primary)})
    lab.kill(primary)
  end)
end
