-- examples/site-hooks.lua: a site hook. Before the secondary takes over, fence the
-- primary's host so the two never run at once. Commands run only with --allow-exec,
-- as an argv (no shell), with a timeout.
--
--   colorun examples/site-hooks.lua --allow-exec --domain primary=... --domain secondary=... \
--           -- /usr/local/sbin/fence-host host1

local fence = {...}                       -- the fencing command after --
if #fence == 0 then fence = {"/usr/bin/true"} end
local p, s = domain.get("primary"), domain.get("secondary")

local ticker = policy.every("200ms", function()
  local ok, err = pcall(colo.checkpoint, p, s)
  if not ok then log.warn("checkpoint failed: " .. tostring(err)) end
end)

policy.on_lost(p, function(_, reason)
  ticker.cancel()
  local argv = {timeout = "5s"}
  for i, a in ipairs(fence) do argv[i] = a end
  local r = exec.run(argv)
  if r.status ~= 0 then
    log.error("fencing failed; NOT failing over", {status = r.status, stderr = r.stderr})
    policy.stop()
    return
  end
  log.warn("primary fenced (" .. reason .. "): the secondary takes over", {fence_output = r.stdout})
  s:resume()
  policy.stop()
end, {heartbeat = "200ms", timeout = "1s"})
