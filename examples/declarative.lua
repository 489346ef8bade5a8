-- examples/declarative.lua: the common case as data. colorun checks every field.
--
--   colorun examples/declarative.lua --domain primary=unix:/run/p.qmp --domain secondary=unix:/run/s.qmp

return colo.policy{
  primary = domain.get("primary"),
  secondary = domain.get("secondary"),
  interval = "200ms",
  keep = 3,
  retry = {attempts = 3, backoff = "20ms"},
  heartbeat = "200ms",
  heartbeat_timeout = "1s",
  on_checkpoint_error = function(err)
    log.warn("checkpoint failed at " .. tostring(err.step) .. ": " .. tostring(err))
  end,
  on_failover = function(primary, secondary, reason)
    log.warn(primary.name .. " lost (" .. reason .. "): " .. secondary.name .. " takes over")
    secondary:resume()
  end,
}
