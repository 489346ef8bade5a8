import Colorun

// MARK: - Native COLO (KVM): failover and checkpoint pause

/// p50 / p90 / max of nanosecond samples, in milliseconds.
private func p50p90max(_ s: Stats) -> String {
    "\(fmt(s.p50 / 1e6, 1)) / \(fmt(s.percentile(90) / 1e6, 1)) / \(fmt(Double(s.sorted.last ?? 0) / 1e6, 1)) ms"
}

/// Native COLO failover in the COLO lab (KVM). Each round is a fresh COLO-shaped pair: COLO
/// runs, the primary is SIGKILLed, `policy.on_lost` sees its monitor close, and the secondary
/// is promoted. Rounds alternate between colorun's `colo.native.failover` (then a
/// re-protection by a fresh secondary, whose loss `drop_secondary` handles) and the baseline:
/// QEMU's own `x-colo-lost-heartbeat` alone, nothing else, until `query-status` says running.
func benchCOLOFailover(_ config: BenchConfig, _ results: Results) async throws {
    guard COLOLab.kvmUsable else {
        results.add(Row(name: "Native COLO failover", colorun: "skipped", baseline: "", ratio: "n/a", target: "< 50 ms QMP part",
                        status: "skipped: /dev/kvm is not usable", what: "needs KVM (QEMU 7.2's COLO deadlocks under TCG)"))
        return
    }
    let rounds = config.n(10, 3)
    let bench = BenchModule()
    for round in 0..<(2 * rounds) {
        let lab = try Lab(colo: try COLOLab(guest: COLOGuest(send: true, delay: 200)))
        let baseline = round % 2 == 1
        _ = try await runPolicy(
            """
            local p, s = domain.get("primary"), domain.get("secondary")
            local now = bench.now
            local a = lab.colo(s)
            colo.native.start(p, s, {uri = a.uri, nbd = a.nbd, net = a.net, delay = "200ms"})
            sleep("300ms")
            local t0, t1
            local lost = false
            local w = policy.on_lost(p, function() t1 = now(); lost = true end, { heartbeat = "50ms", timeout = "1s" })
            t0 = now()
            lab.kill(p)
            while not lost do sleep("1ms") end
            w.cancel()
            bench.put("detect", { t1 - t0 })
            if \(baseline) then
              local t2 = now()
              qmp.execute(s, "x-colo-lost-heartbeat")
              while not qmp.execute(s, "query-status").running do end
              local t3 = now()
              bench.put("heartbeat", { t3 - t2 })
              bench.put("heartbeat_total", { t3 - t0 })
              policy.stop()
            end
            local t2 = now()
            local f = colo.native.failover(s)
            local t3 = now()
            assert(f.running and f.failed == 0, "failover: " .. json.encode(f))
            bench.put("running", { math.floor(f.running_ms * 1e6) })
            bench.put("all", { math.floor(f.ms * 1e6) })
            bench.put("total", { t2 - t0 + math.floor(f.running_ms * 1e6) })
            local ns = lab.colo_secondary("secondary-1")
            local b = lab.colo(ns)
            local r = colo.native.reprotect(s, ns, {uri = b.uri, nbd = b.nbd, net = b.net, delay = "200ms"})
            bench.put("pause", { math.floor(r.pause_ms * 1e6) })
            bench.put("resync", { math.floor(r.resync_ms * 1e6) })
            sleep("300ms")
            lab.kill(ns)
            local d = colo.native.drop_secondary(s)
            assert(d.running, "drop_secondary: " .. json.encode(d))
            bench.put("drop_running", { math.floor(d.running_ms * 1e6) })
            bench.put("drop", { math.floor(d.ms * 1e6) })
            policy.stop()
            """, domains: [], bench: bench, extensions: [lab])
        await lab.stopAll()
    }
    let running = Stats(bench.samples("running"))
    let all = Stats(bench.samples("all"))
    let total = Stats(bench.samples("total"))
    let heartbeat = Stats(bench.samples("heartbeat"))
    let heartbeatTotal = Stats(bench.samples("heartbeat_total"))
    let detect = Stats(bench.samples("detect"))
    results.add(Row(
        name: "Native COLO failover (primary lost): first command → running, p50 / p90 / max",
        colorun: "\(p50p90max(running)) (teardown done \(p50p90max(all)); SIGKILL → running \(p50p90max(total)), detect p50 \(fmt(detect.p50 / 1e6, 1)) ms)",
        baseline: "x-colo-lost-heartbeat alone → running \(p50p90max(heartbeat)) (SIGKILL → running \(p50p90max(heartbeatTotal)))",
        ratio: ratioText(running.p50, heartbeat.p50), target: "< 50 ms p50", status: verdict(running.p50 < 50e6),
        what: "COLO lab (KVM, 64 MiB, the frame-sending guest, x-checkpoint-delay 200 ms), a fresh pair per round: SIGKILL of the primary → `policy.on_lost` (monitor EOF) → `colo.native.failover(s)`: nbd-server-stop, x-colo-lost-heartbeat and query-status in one round trip, then the redirectors and their chardevs; the baseline rounds (interleaved) send x-colo-lost-heartbeat alone and poll query-status; \(rounds) rounds each"))
    let drop = Stats(bench.samples("drop"))
    let dropRunning = Stats(bench.samples("drop_running"))
    results.add(Row(
        name: "Native COLO: secondary lost (drop_secondary): first command → running, p50 / p90 / max",
        colorun: "\(p50p90max(dropRunning)) (teardown done \(p50p90max(drop)))", baseline: "(none)", ratio: "n/a",
        target: "(none)", status: "n/a",
        what: "the re-protected pair's secondary SIGKILLed: x-colo-lost-heartbeat, the block graph and query-status in one round trip, then the replication child and node, colo-compare, iothread, filters and chardevs in another"))
    let pause = Stats(bench.samples("pause"))
    let resync = Stats(bench.samples("resync"))
    results.add(Row(
        name: "Native COLO re-protection: survivor's pause, p50 / p90 / max", colorun: "\(p50p90max(pause)) (resync p50 \(fmt(resync.p50 / 1e6, 1)) ms)",
        baseline: "(none)", ratio: "n/a", target: "(none)", status: "n/a",
        what: "`colo.native.reprotect`: blockdev-mirror to the fresh secondary until ready (resync, guest running), then stop → block-job-cancel → chardevs, filters, replication → migrate → COLO's first checkpoint resumes it (pause: stop sent → RESUME event); 16 MiB disk, 64 MiB RAM"))
}

/// Native COLO's checkpoint pause (KVM) against the guest's size and dirty rate. The guest is
/// `COLOGuest.dirtying`: from its firmware it fills its memory above 1 MiB by IDE bus-master
/// DMA of a disk pattern (the first pass at full speed), then keeps rewriting it at the rate
/// its delay allows (measured here from its chunk counter). COLO runs with x-checkpoint-delay
/// 200 ms; the pause is the primary's STOP → RESUME of each checkpoint (QEMU's event
/// timestamps), over `window` seconds. The baseline is the same size's pause with an idle
/// guest (the counting firmware) in the same run.
func benchCOLOPause(_ config: BenchConfig, _ results: Results) async throws {
    guard COLOLab.kvmUsable else {
        results.add(Row(name: "Native COLO checkpoint pause vs guest size", colorun: "skipped", baseline: "", ratio: "n/a", target: "(none)",
                        status: "skipped: /dev/kvm is not usable", what: "needs KVM"))
        return
    }
    let window = config.quick ? 2 : 4
    let sizes = config.quick ? [64, 256] : [64, 256, 1024]
    for size in sizes {
        var cells: [String] = []
        var idleP50 = Double.nan
        for (label, delay) in [("idle", UInt16?.none), ("fast", UInt16(0)), ("slow", UInt16(1000))] {
            let bench = BenchModule()
            let guest = delay.map { COLOGuest.dirtying(delay: $0, endMiB: size) } ?? COLOGuest()
            let lab = try Lab(colo: try COLOLab(guest: guest, memoryMiB: size))
            let dirtying = delay != nil
            do {
                _ = try await runPolicy(
                    """
                    local p, s = domain.get("primary"), domain.get("secondary")
                    local function hmp(d, line) return qmp.execute(d, "human-monitor-command", {["command-line"] = line}) end
                    local function word(d, addr)
                      return tonumber(hmp(d, string.format("xp /1wx 0x%x", addr)):match(":%s*(0x%x+)"))
                    end
                    local a = lab.colo(s)
                    if \(dirtying) then
                      hmp(p, 'qemu-io colo-disk0 "write -P 0x5a 0 4M"')
                      local t = bench.now()
                      while word(p, 0x7e04) < 1 do
                        assert(bench.now() - t < 180e9, "the guest did not fill its memory in 180 s")
                        sleep("100ms")
                      end
                      bench.put("fill", { bench.now() - t })
                    end
                    -- The initial migration carries all of the filled memory: no bandwidth cap,
                    -- and room to converge while the guest keeps writing.
                    qmp.execute(p, "migrate-set-parameters", {["max-bandwidth"] = 100 * 1024 * 1024 * 1024, ["downtime-limit"] = 2000})
                    colo.native.start(p, s, {uri = a.uri, nbd = a.nbd, net = a.net, delay = "200ms", timeout = "120s"})
                    local stop_at
                    local function ts(ev) return ev.timestamp * 1e9 end   -- seconds (QEMU's event timestamp)
                    local s1 = p:on("STOP", function(ev) stop_at = ts(ev) end)
                    local s2 = p:on("RESUME", function(ev)
                      if stop_at then bench.put("pause", { math.floor(ts(ev) - stop_at) }); stop_at = nil end
                    end)
                    local c0, t0 = word(p, 0x7e00), bench.now()
                    sleep("\(window)s")
                    local c1, t1 = word(p, 0x7e00), bench.now()
                    s1.cancel(); s2.cancel()
                    bench.put("rate", { math.floor((c1 - c0) * 4096 * 1e9 / (t1 - t0)) })   -- KiB/s
                    policy.stop()
                    """, domains: [], bench: bench, extensions: [lab],
                    configure: { $0.domainOptions = DomainOptions(connectTimeout: .seconds(10), commandTimeout: .seconds(30)) })
            } catch {
                await lab.stopAll()
                cells.append("\(label): error \(error)")
                continue
            }
            await lab.stopAll()
            let pause = Stats(bench.samples("pause"))
            let rate = fmt(Double(bench.samples("rate").first ?? 0) / 1024, 1)
            let fill = bench.samples("fill").first.map { " (filled in \(fmt(Double($0) / 1e9, 1)) s)" } ?? ""
            if !dirtying { idleP50 = pause.p50 }
            cells.append("\(label)\(dirtying ? " \(rate) MiB/s" : ""): \(fmt(pause.p50 / 1e6, 1)) / \(fmt(Double(pause.sorted.last ?? 0) / 1e6, 1)) ms, \(pause.count) checkpoints in \(window) s\(fill)")
            if dirtying {
                let busy = pause.sorted.reduce(0, +)
                results.note("native COLO \(size) MiB, \(label) (\(rate) MiB/s): the primary paused \(fmt(Double(busy) / 1e9 / Double(window) * 100, 0)) % of \(window) s")
            }
        }
        results.add(Row(
            name: "Native COLO checkpoint pause, \(size) MiB guest, p50 / max", colorun: cells.dropFirst().joined(separator: "; "),
            baseline: cells.first ?? "", ratio: "n/a", target: "(none)", status: "n/a",
            what: "COLO lab (KVM), x-checkpoint-delay 200 ms, the DMA-dirtying firmware guest (memory above 1 MiB filled with a disk pattern, then rewritten at two rates: no delay, and 1000 `out 0x80` per 4 MiB chunk), pause = the primary's STOP → RESUME by QEMU's event timestamps over \(window) s; baseline: the counting guest (nothing dirty but its counter), same size, same run; idle p50 \(fmt(idleP50 / 1e6, 1)) ms"))
    }
}
