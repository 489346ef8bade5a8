-- examples/qemu-colo.lua: QEMU's native COLO with colorun as the heartbeat and failover
-- manager QEMU's documentation leaves to the operator. Needs KVM (QEMU 7.2's COLO
-- deadlocks under TCG). The secondary must run with -incoming at MIGRATION_URI.
--
--   colorun examples/qemu-colo.lua --domain primary=unix:/run/p.qmp \
--           --domain secondary=unix:/run/s.qmp -- unix:/run/colo.mig

local uri = ... or "unix:/run/colo.mig"
local p, s = domain.get("primary"), domain.get("secondary")

colo.native.start(p, s, {uri = uri, delay = "200ms"})
log.info("COLO running", colo.native.status(p))

colo.native.on_exit(s, function(ev)
  log.warn("the secondary left COLO", {reason = ev.data.reason})
end)

policy.on_lost(p, function(_, reason)
  colo.native.failover(s)
  log.warn("primary lost (" .. reason .. "): the secondary runs on its own", colo.native.status(s))
  policy.stop()
end, {heartbeat = "50ms", timeout = "200ms"})
