-- examples/remus-ledger.lua: Remus failover of a Linux guest that writes to its disk and
-- answers clients over the network, and the proof that no acknowledged record is lost.
--
--   colorun --lab --guest linux examples/remus-ledger.lua
--   colorun --lab --guest linux examples/remus-ledger.lua -- rounds=20 kill=after-ack
--
-- The lab's primary is the Linux lab guest (guest/README.md): its ledger appends each
-- numbered record to its ext4 disk, fsyncs it, and only then answers `ack N`. A client task
-- writes records one after another and remembers every number it saw acknowledged, while
-- remus.checkpoint snapshots the guest (memory, disk, and its network output held until the
-- checkpoint is durable) every 150 ms. At a random moment the primary is SIGKILLed; the
-- standby is restored from the last good checkpoint on a fresh overlay of its frozen disk,
-- the client reconnects to it, and the demo counts the acknowledged records present in the
-- standby's ledger. Each round kills the domain the last one restored. At the end the
-- ledger must still take records, and the last standby is powered off and its disk booted
-- again: the guest's e2fsck -fn at that boot must find the filesystem clean.
--
-- Exits 0 only when every acknowledged record was found and the filesystem is clean.
--
-- Arguments (after --), each NAME=VALUE:
--   rounds=N                 kill and restore N times (default 1)
--   interval=D               checkpoint interval (default 150ms)
--   kill=random|after-ack    kill at a random moment (default), or right after an ack: one
--                            whose record was written and acknowledged between two checkpoints
--                            if such an ack comes within 1 s, else the next one
--   disks=on|off             snapshot the disk in each checkpoint (default on)
--   output_commit=on|off     hold the guest's packets until the checkpoint is durable (default on)
-- With output_commit=off an ack leaves before any checkpoint holds its record: kill=after-ack
-- then kills right after such an ack, that record is lost, and the demo says so and fails.
-- With output commit on no such ack can be seen (the buffer holds it until the checkpoint
-- that covers its record is durable), so the kill comes after the next ack, and nothing is lost.

local lab = rawget(_G, "lab")
if lab == nil or lab.record == nil then
  error("examples/remus-ledger.lua runs in the lab: colorun --lab --guest linux examples/remus-ledger.lua")
end

local opts = {rounds = 1, interval = "150ms", kill = "random", disks = true, output_commit = true}
for _, arg in ipairs({...}) do
  local k, v = arg:match("^([%w_]+)=(.*)$")
  if k == nil or opts[k] == nil then
    error("unknown argument '" .. arg .. "' (rounds=N interval=D kill=random|after-ack disks=on|off output_commit=on|off)")
  end
  if v == "on" then v = true elseif v == "off" then v = false elseif math.tointeger(tonumber(v)) then v = math.tointeger(tonumber(v)) end
  if type(v) ~= type(opts[k]) then error("argument '" .. arg .. "': expected a " .. type(opts[k])) end
  opts[k] = v
end
if opts.kill ~= "random" and opts.kill ~= "after-ack" then error("kill=" .. opts.kill .. ": random or after-ack") end
local checkpoint_options = {keep = 3}
if not opts.disks then checkpoint_options.disks = false end
if not opts.output_commit then checkpoint_options.output_commit = false end

local target = domain.get("primary")
log.info("booting the Linux guest")
log.info("the guest's ledger is up", {ready_ms = math.floor(lab.ready(target))})

-- The client: one record at a time to the domain `writing_to`; every acknowledged number goes in `acked`.
local acked = {}
local next_record = 1
local writing_to = target
local kill_after_ack, kill_any_ack = false, false
local killed = false                 -- or, once the writer killed, "between" or "ack": after which ack
-- Checkpoints started or finished so far, and whether one is running (as this policy sees it).
local checkpoint_epoch, checkpointing = 0, false
local done = false
local writer = task.spawn(function()
  while not done do
    local d = writing_to
    if d == nil then
      sleep("10ms")
    else
      local n = next_record
      next_record = n + 1            -- never reused: a failed write may or may not be on the disk
      local epoch = checkpoint_epoch
      if pcall(lab.record, d, n) then
        acked[#acked + 1] = n
        -- Written and acknowledged with no checkpoint in between: no generation holds it yet.
        local between = epoch == checkpoint_epoch and not checkpointing
        if kill_after_ack and d == writing_to and (between or kill_any_ack) then
          writing_to, kill_after_ack, kill_any_ack = nil, false, false
          lab.kill(d)
          killed = between and "between" or "ack"
        end
      elseif d == writing_to then
        sleep("20ms")
      end
    end
  end
end)

local function lost_from(records)
  local present = {}
  for _, n in ipairs(records) do present[n] = true end
  local lost = {}
  for _, n in ipairs(acked) do
    if not present[n] then lost[#lost + 1] = n end
  end
  return lost
end

local function percentile(list, p)
  if #list == 0 then return 0 end
  local sorted = {table.unpack(list)}
  table.sort(sorted)
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

local pauses, restores, total_lost = {}, {}, 0
for round = 1, opts.rounds do
  local last
  local ticker = policy.every(opts.interval, function()
    checkpoint_epoch, checkpointing = checkpoint_epoch + 1, true
    local ok, r = pcall(remus.checkpoint, target, checkpoint_options)
    checkpoint_epoch, checkpointing = checkpoint_epoch + 1, false
    if ok then
      last = r
      pauses[#pauses + 1] = r.pause_ms
    else
      log.debug("checkpoint failed: " .. tostring(r))
    end
  end)
  -- A good checkpoint and a few acknowledged records, then a random moment.
  local from = #acked
  while last == nil or #acked < from + 3 do sleep("20ms") end
  sleep(math.random(0, 1000) .. "ms")
  local kill_kind = "random"
  if opts.kill == "after-ack" then
    kill_after_ack = true
    for _ = 1, 100 do
      if killed then break end
      sleep("10ms")
    end
    if not killed then kill_any_ack = true end
    while not killed do sleep("2ms") end
    kill_kind, killed, kill_any_ack = killed, false, false
  else
    writing_to = nil
    lab.kill(target)
  end
  ticker.cancel()
  local acked_count = #acked
  repeat sleep("20ms") until not target:alive("200ms")

  local standby, info = remus.restore(lab.standby("standby" .. round, target))
  target = standby
  lab.ready(target, "60s")
  local ledger = lab.ledger(target)
  -- Every record acknowledged so far (all rounds) must be in this standby's ledger.
  local lost = lost_from(ledger.records)
  local new_lost = #lost - total_lost
  total_lost = #lost
  restores[#restores + 1] = info.restore_ms
  print(string.format("round %d: %d records acknowledged before the kill, %d present after the failover, %d lost "
    .. "(%d in this round; standby restored from generation %d in %.0f ms)",
    round, acked_count, acked_count - #lost, #lost, new_lost, info.generation, info.restore_ms))
  log.info("failover round", {round = round, acked = acked_count, present = acked_count - #lost, lost = #lost, lost_now = new_lost, kill = kill_kind,
    bad = ledger.bad, generation = info.generation, restore_ms = info.restore_ms})
  if new_lost > 0 then log.error("acknowledged records missing from the standby's ledger", {records = table.concat(lost, ",", #lost - new_lost + 1)}) end
  writing_to = target
end

-- The ledger goes on: a few more records on the last standby.
local from = #acked
while #acked < from + 3 do sleep("20ms") end
done = true
writer:wait()

-- The honest check of the filesystem: power the last standby off, boot its disk again.
local final = lab.reboot(target)
local lost_at_reboot = #lost_from(final.records)
print(string.format("after %d round(s): %d records acknowledged, %d lost; the standby's disk at its next boot: fsck %s, "
  .. "%d records, %d bad, %d acknowledged missing", opts.rounds, #acked, total_lost, final.fsck, final.count, final.bad, lost_at_reboot))
log.info("remus-ledger summary", {rounds = opts.rounds, acked = #acked, lost = total_lost, fsck = final.fsck,
  bad = final.bad, lost_at_reboot = lost_at_reboot,
  pause_p50_ms = percentile(pauses, 0.5), pause_p99_ms = percentile(pauses, 0.99), checkpoints = #pauses,
  restore_p50_ms = percentile(restores, 0.5), restore_max_ms = percentile(restores, 1.0),
  disks = opts.disks, output_commit = opts.output_commit, kill = opts.kill})
if total_lost > 0 or lost_at_reboot > 0 then
  error(string.format("%d acknowledged record(s) lost", math.max(total_lost, lost_at_reboot)))
end
if final.fsck ~= "clean" or final.bad > 0 then
  error("the standby's filesystem is not clean at its next boot: fsck " .. final.fsck .. ", " .. final.bad .. " bad record(s)")
end
policy.stop()
