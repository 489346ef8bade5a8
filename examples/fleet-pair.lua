-- examples/fleet-pair.lua: the policy of one pair in a fleet (`colorun fleet run`). The pair's
-- declaration in etcd names this file, its domains `primary` and `secondary`, and settings
-- that reach the policy as `key=value` arguments:
--
--   colorun fleet add web1 --etcd http://10.0.0.5:2379 --policy fleet-pair.lua \
--     --domain primary=tcp:10.0.1.7:4444 --domain secondary=tcp:10.0.2.7:4444 --set interval=1s
--
-- The instance that owns the pair runs it; when ownership moves (an instance died, joined or
-- is drained) the old owner's run stops (its in-flight checkpoint finishes or rolls back,
-- the domains are resumed) before the new owner's starts.

local settings = {}
for _, arg in ipairs({...}) do
  local key, value = arg:match("^([^=]+)=(.*)$")
  if key then settings[key] = value end
end

local p, s = domain.get("primary"), domain.get("secondary")
local keep = tonumber(settings.keep or "2")

policy.every(settings.interval or "1s", function()
  local ok, err = pcall(colo.checkpoint, p, s, {keep = keep})
  if not ok then log.warn("checkpoint failed: " .. tostring(err)) end
end)
