-- examples/checkpoint.lua: the seed's checkpoint (libxl's COLO flavour) every 200 ms, with
-- retries: stop both, save the primary's device state, load it on the secondary, resume.
--
--   colorun examples/checkpoint.lua --domain primary=unix:/var/run/xen/qmp-libxl-7 --shared primary \
--                                   --domain secondary=unix:/var/run/xen/qmp-libxl-8 --shared secondary

local p, s = domain.get("primary"), domain.get("secondary")
local failed_in_a_row = 0

policy.every("200ms", function()
  local ok, r = pcall(retry, {
    attempts = 3, backoff = "20ms", max_backoff = "200ms",
    -- a failure to write the state directory will not fix itself
    retry_on = function(err) return err.class ~= "StateDirError" end,
    on_retry = function(err, n) log.warn("checkpoint attempt " .. n .. " failed: " .. tostring(err)) end,
  }, function() return colo.checkpoint(p, s, {keep = 3}) end)
  if ok then
    failed_in_a_row = 0
    log.debug("checkpoint", {generation = r.generation, pause_ms = r.pause_ms})
  else
    failed_in_a_row = failed_in_a_row + 1
    log.error("checkpoint failed: " .. tostring(r), {last_good = r.last_good})
    if failed_in_a_row >= 5 then
      log.error("five checkpoints failed in a row; stopping (both VMs run)")
      policy.stop()
    end
  end
end)

-- The secondary holds the last good checkpoint: when the primary is gone, it takes over.
policy.on_lost(p, function(_, reason)
  log.warn("primary lost (" .. reason .. "): the secondary takes over")
  s:resume()   -- it runs already after every checkpoint; make sure
  policy.stop()
end, {heartbeat = "200ms", timeout = "1s"})
