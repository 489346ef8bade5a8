import Colorun
import ColorunSystem
import Foundation
import LuaRuntime
import NIOCore
import QEMULab
import QMP
import Synchronization

/// Where the helpers are and how long to run.
struct BenchConfig: Sendable {
    var quick = false
    var python: String?
    var baselineScript: String
    var qemuSim: String
    var qmpBench: String?
    /// The blocking C client baseline (scripts/bench_qmp_client.c, compiled by scripts/bench).
    var cClient: String?
    /// The release `colorun` binary, for the command start-up rows.
    var colorun: String?
    /// Only these benchmarks (empty: all).
    var only: Set<String> = []
    /// The length of the 4,000 checkpoints/s run (default 60 s, 10 s with --quick).
    var scaleSeconds: Double?

    func n(_ full: Int, _ quick: Int) -> Int { self.quick ? quick : full }
    func wants(_ name: String) -> Bool { only.isEmpty || only.contains(name) }
}

/// QEMUs to stop; main awaits `stopAllQEMUs()` before it exits.
let pendingStops = Mutex<[QEMUInstance]>([])
func stopLater(_ instances: QEMUInstance...) { pendingStops.withLock { $0 += instances } }
func stopAllQEMUs() async {
    let all = pendingStops.withLock { list in defer { list = [] }; return list }
    for q in all { _ = await q.stop(grace: .milliseconds(500)) }
}

func ratioText(_ a: Double, _ b: Double) -> String { b > 0 && a.isFinite && b.isFinite ? "\(fmt(a / b))×" : "n/a" }

// MARK: - QMP round trip

func benchQMPRoundTrip(_ config: BenchConfig, _ results: Results) async throws {
    let n = config.n(400, 200)
    // The machine's load drifts within seconds (a round's p50 moved by ±10 % in rounds of a
    // quarter of a second per client): short rounds, so each client of a round meets the same
    // load, and fifteen of them, so that the median of their ratios is not one round's luck.
    let rounds = config.quick ? 3 : 15
    let qemu = try QEMUInstance.start(QEMUSpec())
    defer { stopLater(qemu) }
    // The baselines and colorun alternate, so that load from other work on the machine falls
    // on all of them alike; each round gives its own ratios.
    var all: [String: [Int64]] = [:]
    var why: [String: String] = [:]
    var ratioC: [Double] = [], ratioRaw: [Double] = [], ratioLoop: [Double] = []
    var ratioDefaultSliceC: [Double] = [], ratioDefaultSliceRaw: [Double] = []
    var cpuPerCall: [Int64] = []
    for _ in 0..<rounds {
        var p50: [String: Double] = [:]
        let c = toolBaseline(config.cClient, [qemu.qmpSocketPath, String(n)], missing: "no C client (scripts/bench compiles scripts/bench_qmp_client.c)")
        let loopC = toolBaseline(config.cClient, [qemu.qmpSocketPath, String(n), "epoll"], missing: "no C client")
        let raw = pythonBaseline(config.python, config.baselineScript, ["raw-status", qemu.qmpSocketPath, String(n)])
        let lib = pythonBaseline(config.python, config.baselineScript, ["lib-status", qemu.qmpSocketPath, String(n)])
        for (key, r) in [("c", c), ("loop", loopC), ("raw", raw), ("lib", lib)] {
            if let samples = r.samples {
                all[key, default: []] += samples
                p50[key] = Stats(samples).p50
            } else {
                why[key] = r.why
            }
        }
        // colorun as it runs (its loop thread with a 0.1 ms slice), then with the kernel's
        // default slice (a diagnostic: what the slice is worth here).
        var own: [String: Double] = [:]
        for (key, slice) in [("colorun", PolicyOptions.defaultLoopSlice), ("colorun-default-slice", TimeAmount.zero)] {
            let bench = BenchModule(arguments: ["n": String(n)])
            _ = try await runPolicy(
                """
                local d = domain.get("d")
                local n = tonumber(bench.arg("n"))
                local now = bench.now
                for i = 1, 50 do qmp.status(d) end
                local s = {}
                local cpu0 = bench.cpu()
                for i = 1, n do
                  local t = now()
                  qmp.status(d)
                  s[i] = now() - t
                end
                bench.put("cpu_ns", { math.floor((bench.cpu() - cpu0) * 1e9 / n) })
                bench.put("rt", s)
                """, domains: [DomainSpec(name: "d", endpoint: qemu.qmpEndpoint)], bench: bench) { $0.loopSlice = slice }
            if key == "colorun" { cpuPerCall += bench.samples("cpu_ns") }
            let mine = bench.samples("rt")
            all[key, default: []] += mine
            own[key] = Stats(mine).p50
        }
        if let c = p50["c"] {
            ratioC.append(own["colorun"]! / c)
            ratioDefaultSliceC.append(own["colorun-default-slice"]! / c)
        }
        if let r = p50["raw"] {
            ratioRaw.append(own["colorun"]! / r)
            ratioDefaultSliceRaw.append(own["colorun-default-slice"]! / r)
        }
        if let l = p50["loop"] { ratioLoop.append(own["colorun"]! / l) }
    }
    // The slice stays with the loop's thread: later rows run with colorun's default, as colorun does.
    _ = try await benchGroup.next().submit { setThreadSlice(nanoseconds: UInt64(PolicyOptions.defaultLoopSlice.nanoseconds)) }.get()
    let colorun = Stats(all["colorun"] ?? [])
    func stats(_ key: String, _ label: String) -> String {
        all[key].map { "\(label) \(ms(Stats($0)))" } ?? "\(label) skipped (\(why[key] ?? "?"))"
    }
    let baseline = [stats("c", "blocking C"), stats("raw", "raw py"), stats("lib", "qemu.qmp"), stats("loop", "(diagnostic) C waiting in epoll")].joined(separator: "; ")
    var ratio: [String] = []
    if !ratioC.isEmpty { ratio.append("\(spread(ratioC)) C") }
    if !ratioRaw.isEmpty { ratio.append("\(spread(ratioRaw)) raw py") }
    if !ratioLoop.isEmpty { ratio.append("\(spread(ratioLoop)) C in epoll") }
    if !ratioDefaultSliceC.isEmpty && !ratioDefaultSliceRaw.isEmpty {
        ratio.append("(diagnostic) colorun with the kernel's default slice \(spread(ratioDefaultSliceC)) C, \(spread(ratioDefaultSliceRaw)) raw py")
    }
    var missed: [String] = []
    if let m = median(ratioC), m > 1.10 { missed.append("C") }
    if let m = median(ratioRaw), m > 1.0 { missed.append("raw py") }
    let measured = !ratioC.isEmpty && !ratioRaw.isEmpty
    results.add(Row(
        name: "QMP round trip (query-status), p50 / p99", colorun: "\(ms(colorun)); CPU \(fmt(Stats(cpuPerCall).p50 / 1e3, 1)) µs/call; (diagnostic) with the kernel's default slice \(ms(Stats(all["colorun-default-slice"] ?? [])))", baseline: baseline,
        ratio: ratio.isEmpty ? "n/a" : ratio.joined(separator: "; "),
        target: "≤ 1.10× blocking C p50, ≤ 1.0× raw py p50 (medians of the rounds)",
        status: !measured ? "skipped: \(why["c"] ?? why["raw"] ?? "?")" : missed.isEmpty ? "met" : "missed (\(missed.joined(separator: ", ")))",
        what: "one `qmp.status(d)` from a Lua policy loop, \(rounds) rounds of \(n) calls (after 50 warm-up) alternating with the baselines, real QEMU 7.2 TCG; colorun's loop thread runs with the 0.1 ms slice colorun asks the kernel for (`--loop-slice`, its default; the baselines run with the kernel's default slice), and, as a diagnostic, again with the kernel's default slice in the same round; ratios are min / median / max over the rounds of the round's p50 ratio; baselines: a blocking C client (scripts/bench_qmp_client.c: write, read to the reply line), a blocking AF_UNIX JSON-lines Python client, Python qemu.qmp 0.0.6 (asyncio), on the same QEMU; colorun and the C and raw Python clients send the same 27 bytes (`{\"execute\":\"query-status\"}`: QEMU reads a command one byte per main-loop iteration, so the line's length is QEMU's time), qemu.qmp its own (with an id and spaces); diagnostic, not a target: the same C client waiting in epoll_wait before each read, as an event loop does (what waiting through epoll instead of in read costs on this machine)"))
    if let qmpBench = config.qmpBench {
        // The same QEMU build through QMPClient alone (no Lua): the existing qmp-bench tool.
        let out = runTool(qmpBench, [String(n)])
        if let line = out.split(separator: "\n").last(where: { $0.contains("pass 2 callback") }) {
            results.note("QMPClient alone (qmp-bench, callback API, no Lua): \(line.replacingOccurrences(of: "pass 2 callback: ", with: ""))")
        }
    }
}

/// "min / median / max×" of per-round ratios.
func spread(_ ratios: [Double]) -> String {
    let sorted = ratios.sorted()
    guard let m = median(sorted) else { return "n/a" }
    return "\(fmt(sorted.first!)) / \(fmt(m)) / \(fmt(sorted.last!))×"
}

func median(_ values: [Double]) -> Double? {
    guard !values.isEmpty else { return nil }
    let sorted = values.sorted()
    let mid = sorted.count / 2
    return sorted.count % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
}

func runTool(_ path: String, _ arguments: [String]) -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    let out = Pipe()
    process.standardOutput = out
    process.standardError = FileHandle.nullDevice
    guard (try? process.run()) != nil else { return "" }
    let data = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return String(decoding: data, as: UTF8.self)
}

// MARK: - Xen-flavour cycle without the restore, real QEMU

func benchXenCycleRealQEMU(_ config: BenchConfig, _ results: Results) async throws {
    let n = config.n(300, 100)
    let primary = try QEMUInstance.start(QEMUSpec())
    let secondary = try QEMUInstance.start(QEMUSpec())
    defer { stopLater(primary, secondary) }
    let pyFile = primary.path("py.devstate")
    let args = [primary.qmpSocketPath, secondary.qmpSocketPath, pyFile, String(n / 2)]  // per round
    let bench = BenchModule(arguments: ["n": String(n / 2), "file": primary.path("colorun.devstate")])
    var collected: [String: [Int64]] = [:]
    var why: [String: String] = [:]
    var roundRatios: [Double] = []
    for _ in 0..<3 {
        var overlapP50: Double?
        for mode in ["raw-cycle-serial", "raw-cycle-overlap", "lib-cycle-gather"] {
            let r = pythonBaseline(config.python, config.baselineScript, [mode] + args)
            if let samples = r.samples { collected[mode, default: []] += samples } else { why[mode] = r.why }
            if mode == "raw-cycle-overlap", let samples = r.samples { overlapP50 = Stats(samples).p50 }
        }
        let before = bench.samples("cycle").count
        _ = try await runPolicy(
            """
            local p, s = domain.get("p"), domain.get("s")
            local n, file = tonumber(bench.arg("n")), bench.arg("file")
            local now = bench.now
            local function cycle()
              task.all(function() qmp.stop(p) end, function() qmp.stop(s) end)
              qmp.save(p, file, { live = false })
              task.all(function() qmp.resume(p) end, function() qmp.resume(s) end)
            end
            for i = 1, 20 do cycle() end
            local out = {}
            for i = 1, n do
              local t = now()
              cycle()
              out[i] = now() - t
            end
            bench.put("cycle", out)
            -- Diagnostic: the same cycle with qmp.execute("stop"/"cont"), which skips the
            -- stop journal (a file written before each stop, removed after each cont).
            local function cycle_nj()
              task.all(function() qmp.execute(p, "stop") end, function() qmp.execute(s, "stop") end)
              qmp.save(p, file, { live = false })
              task.all(function() qmp.execute(p, "cont") end, function() qmp.execute(s, "cont") end)
            end
            local nj = {}
            for i = 1, n do
              local t = now()
              cycle_nj()
              nj[i] = now() - t
            end
            bench.put("cycle_nj", nj)
            """,
            domains: [DomainSpec(name: "p", endpoint: primary.qmpEndpoint), DomainSpec(name: "s", endpoint: secondary.qmpEndpoint)],
            bench: bench)
        if let overlapP50 { roundRatios.append(Stats(Array(bench.samples("cycle").dropFirst(before))).p50 / overlapP50) }
    }
    let serial = (samples: why["raw-cycle-serial"] == nil ? collected["raw-cycle-serial"] : nil, why: why["raw-cycle-serial"] ?? "")
    let overlap = (samples: why["raw-cycle-overlap"] == nil ? collected["raw-cycle-overlap"] : nil, why: why["raw-cycle-overlap"] ?? "")
    let gather = (samples: why["lib-cycle-gather"] == nil ? collected["lib-cycle-gather"] : nil, why: why["lib-cycle-gather"] ?? "")
    let c = Stats(bench.samples("cycle"))
    let o = overlap.samples.map(Stats.init)
    let s = serial.samples.map(Stats.init)
    let g = gather.samples.map(Stats.init)
    var baseline = "raw serial " + (s.map { ms($0) } ?? "skipped")
    baseline += "; raw overlapped " + (o.map { ms($0) } ?? "skipped")
    baseline += "; qemu.qmp gather " + (g.map { ms($0) } ?? "skipped (\(gather.why))")
    var status = "skipped: \(overlap.why)"
    var ratio = "n/a"
    if let o, let s, let m = median(roundRatios) {
        ratio = "\(spread(roundRatios)) overlapped p50 (overhead \(fmt((c.p50 - o.p50) / 1e6, 3)) ms); \(ratioText(c.p50, s.p50)) serial"
        status = verdict(m <= 1.05 && c.p50 < s.p50)
    }
    results.note("Xen cycle without the stop journal (qmp.execute \"stop\"/\"cont\" instead of qmp.stop/qmp.resume), same run: \(ms(Stats(bench.samples("cycle_nj")))) vs \(ms(c)) with it")
    results.add(Row(
        name: "Xen cycle w/o restore (stop both, save, cont both), p50 / p99", colorun: ms(c), baseline: baseline, ratio: ratio,
        target: "< raw serial; ≤ 1.05× raw overlapped (median of the rounds)", status: status,
        what: "a Lua policy: `task.all` of two `qmp.stop`, `qmp.save(p, f, {live=false})`, `task.all` of two `qmp.resume`; 3 rounds of \(n / 2) cycles alternating with the baselines on two real QEMUs, ratio min / median / max over the rounds of the round's p50 ratio; the raw overlapped client sends both stops (conts) before reading either reply; the raw clients' lines are compact and without an id, as colorun's"))
}

// MARK: - colo.checkpoint against the simulator

let coloPolicy = """
        local p, s = domain.get("p"), domain.get("s")
        local n = tonumber(bench.arg("n"))
        local now = bench.now
        for i = 1, 20 do colo.checkpoint(p, s, { keep = 2 }) end
        local wall, pause = {}, {}
        for i = 1, n do
          local t = now()
          local r = colo.checkpoint(p, s, { keep = 2 })
          wall[i] = now() - t
          pause[i] = math.floor(r.pause_ms * 1e6)
        end
        bench.put("wall", wall)
        bench.put("pause", pause)
        """

func coloDomains(_ sim: SimProcess) -> [DomainSpec] {
    [DomainSpec(name: "p", endpoint: .unix(path: sim.socket(0))), DomainSpec(name: "s", endpoint: .unix(path: sim.socket(1)))]
}

func benchColoCheckpointSim(_ config: BenchConfig, _ results: Results) async throws {
    let n = config.n(500, 150)
    let sim = try SimProcess(executable: config.qemuSim, count: 2)
    defer { sim.stop() }
    let raw = pythonBaseline(config.python, config.baselineScript,
                             ["raw-colo-overlap", sim.socket(0), sim.socket(1), sim.directory + "/py.devstate", String(n)])
    let bench = BenchModule(arguments: ["n": String(n)])
    _ = try await runPolicy(coloPolicy, domains: coloDomains(sim), bench: bench)
    let wall = Stats(bench.samples("wall"))
    let pause = Stats(bench.samples("pause"))
    // The same with the state directory on tmpfs, where the commit's two fsyncs cost nothing.
    let shm = makeTempDirectoryIn("/dev/shm", "colorun-bench")
    defer { try? FileManager.default.removeItem(atPath: shm) }
    let tmpfsBench = BenchModule(arguments: ["n": String(n)])
    _ = try await runPolicy(coloPolicy, domains: coloDomains(sim), bench: tmpfsBench) { $0.stateDirectory = shm + "/state" }
    let tmpfsWall = Stats(tmpfsBench.samples("wall"))
    results.note("colo.checkpoint with the state directory on tmpfs (no fsync cost), same simulator: call \(ms(tmpfsWall)), pause \(ms(Stats(tmpfsBench.samples("pause")))); on disk: call \(ms(wall))")
    let r = raw.samples.map(Stats.init)
    results.add(Row(
        name: "colo.checkpoint (full Xen cycle), simulator, p50 / p99", colorun: "call \(ms(wall)); pause \(ms(pause))",
        baseline: r.map { "raw py overlapped \(ms($0))" } ?? "skipped (\(raw.why))",
        ratio: r.map { "\(ratioText(wall.p50, $0.p50)) raw p50 (\(ratioText(tmpfsWall.p50, $0.p50)) with the state dir on tmpfs)" } ?? "n/a", target: "(none)", status: "n/a",
        what: "`colo.checkpoint(p, s)` (stop both, save to a partial file, verify, load on s, cont both, commit the generation: fsync file, rename, fsync dir, prune) against a qemu-sim process; raw: the same QMP steps without the file checks or fsyncs"))
}

// MARK: - Remus checkpoint, real QEMU 64 MiB

func benchRemusCheckpoint(_ config: BenchConfig, _ results: Results) async throws {
    let n = config.n(30, 10)
    let qemu = try QEMUInstance.start(QEMUSpec(memoryMiB: 64, countingGuest: true))
    defer { stopLater(qemu) }
    let raw = pythonBaseline(config.python, config.baselineScript, ["raw-remus", qemu.qmpSocketPath, qemu.path("py.vmstate"), String(n)])
    let bench = BenchModule(arguments: ["n": String(n)])
    _ = try await runPolicy(
        """
        local d = domain.get("d")
        local n = tonumber(bench.arg("n"))
        local now = bench.now
        for i = 1, 2 do remus.checkpoint(d, { keep = 2 }) end
        local wall, pause = {}, {}
        for i = 1, n do
          local t = now()
          local r = remus.checkpoint(d, { keep = 2 })
          wall[i] = now() - t
          pause[i] = math.floor(r.pause_ms * 1e6)
        end
        bench.put("wall", wall)
        bench.put("pause", pause)
        """, domains: [DomainSpec(name: "d", endpoint: qemu.qmpEndpoint)], bench: bench)
    let wall = Stats(bench.samples("wall"))
    let pause = Stats(bench.samples("pause"))
    let r = raw.samples.map(Stats.init)
    results.add(Row(
        name: "remus.checkpoint, real QEMU 64 MiB, pause p50 / p99", colorun: "pause \(ms(pause, digits: 1)); call \(ms(wall, digits: 1))",
        baseline: r.map { "raw py \(ms($0, digits: 1))" } ?? "skipped (\(raw.why))",
        ratio: r.map { "\(ratioText(pause.p50, $0.p50)) raw p50" } ?? "n/a", target: "(none)", status: "n/a",
        what: "stop, `migrate exec:cat > FILE`, poll `query-migrate`, cont (pause = stop sent → cont answered), idle counting guest, max-bandwidth raised; \(n) checkpoints; raw: the same steps polling every 0.5 ms"))
}

// MARK: - Failover

func benchFailover(_ config: BenchConfig, _ results: Results) async throws {
    let rounds = config.n(5, 2)
    var detect: [Int64] = []
    var total: [Int64] = []
    for _ in 0..<rounds {
        let lab = try Lab(names: ["primary"], memoryMiB: 64)
        let bench = BenchModule()
        _ = try await runPolicy(
            """
            local p = domain.get("primary")
            local now = bench.now
            remus.checkpoint(p)
            local t0
            policy.on_lost(p, function()
              local t1 = now()
              local sb = remus.restore{ name = "standby", from = "primary", lab = true }
              local st = qmp.status(sb)
              local t2 = now()
              assert(st.status == "running", "standby is " .. tostring(st.status))
              bench.put("detect", { t1 - t0 })
              bench.put("total", { t2 - t0 })
              policy.stop()
            end, { heartbeat = "50ms", timeout = "100ms" })
            sleep("100ms")
            t0 = now()
            lab.kill(p)
            sleep("10s")
            error("no failover within 10 s")
            """, domains: lab.domainSpecs, bench: bench, extensions: [lab])
        detect += bench.samples("detect")
        total += bench.samples("total")
    }
    let t = Stats(total)
    let d = Stats(detect)
    results.add(Row(
        name: "Failover: SIGKILL → Remus standby `running`, p50 / max", colorun: "\(fmt(t.p50 / 1e6, 1)) / \(fmt(Double(t.sorted.last ?? 0) / 1e6, 1)) ms (detect \(fmt(d.p50 / 1e6, 1)) ms)",
        baseline: "(none)", ratio: "n/a", target: "< 200 ms", status: verdict(Double(t.sorted.last ?? .max) < 200e6),
        what: "lab: `lab.kill(primary)` → `policy.on_lost` fires (monitor EOF) → `remus.restore{lab=true}` starts QEMU with `-incoming exec:cat GEN`, cont → `qmp.status` says running; \(rounds) rounds, 64 MiB idle guest"))
}

// MARK: - Lua → Swift binding cost

func benchBinding(_ config: BenchConfig, _ results: Results) async throws {
    let n = config.n(5_000_000, 1_000_000)
    let dir = makeTempDirectory("colorun-bench-lua")
    defer { try? FileManager.default.removeItem(atPath: dir) }
    let path = dir + "/policy.lua"
    try """
    local n = tonumber(bench.arg("n"))
    local now = bench.now
    local nop, nop2 = nop, nop
    local function lf() end
    local best = { math.huge, math.huge, math.huge, math.huge }
    for round = 1, 5 do
      sleep(0)  -- a completed host operation resets the 5 s time limit of a task
      local t = now(); for i = 1, n do end; local e = now() - t
      t = now(); for i = 1, n do lf() end; local l = now() - t
      t = now(); for i = 1, n do nop() end; local h = now() - t
      t = now(); for i = 1, n do nop2(i, "x") end; local h2 = now() - t
      local r = { e, l, h, h2 }
      for k = 1, 4 do if r[k] < best[k] then best[k] = r[k] end end
    end
    bench.put("b", best)
    """.write(toFile: path, atomically: true, encoding: .utf8)
    var hosts: [Double] = [], luas: [Double] = [], twoArgs: [Double] = [], empties: [Double] = []
    for _ in 0..<3 {
        let bench = BenchModule(arguments: ["n": String(n)])
        let loop = benchGroup.next()
        let runtime = try await loop.submit {
            let runtime = try LuaRuntime(eventLoop: loop, options: LuaRuntimeOptions(), logger: quietLogger)
            try runtime.registerGlobal("nop", .sync { _ in })
            try bench.register(in: runtime)
            return runtime
        }.get()
        let outcome = await runtime.run(policyAt: path)
        if case .failed(let failure) = outcome { throw BenchError("binding policy failed: \(failure)") }
        let b = bench.samples("b").map { Double($0) / Double(n) }
        guard b.count == 4 else { throw BenchError("binding: no samples") }
        hosts.append(b[2] - b[0])
        luas.append(b[1] - b[0])
        twoArgs.append(b[3] - b[0])
        empties.append(b[0])
    }
    func triple(_ v: [Double]) -> String {
        let s = v.sorted()
        return "\(fmt(s[0], 1)) / \(fmt(median(s)!, 1)) / \(fmt(s[s.count - 1], 1)) ns"
    }
    let ratios = zip(hosts, luas).map { $0 / $1 }
    results.add(Row(
        name: "Lua → Swift call (sync host function), ns/call, min / median / max of 3 runs", colorun: "\(triple(hosts)) (with 2 args: \(triple(twoArgs)))",
        baseline: "Lua → Lua \(triple(luas))", ratio: "\(spread(ratios))", target: "< 40 ns (median)", status: verdict(median(hosts)! < 40),
        what: "3 runs (a fresh Lua state each), each the best of 5 loops of \(n) calls of a no-op `LuaHostFunction.sync` registered with `registerGlobal`, minus the empty loop (\(triple(empties))/iter); includes the 10,000-instruction budget hook"))
}

// MARK: - Start-up

func benchStartup(_ config: BenchConfig, _ results: Results) async throws {
    let rounds = config.n(30, 10)
    var samples: [Int64] = []
    for _ in 0..<rounds {
        let bench = BenchModule()
        let t = monotonicNanos()
        _ = try await runPolicy("-- nothing", domains: [], bench: bench)
        samples.append(monotonicNanos() - t)
    }
    let s = Stats(samples)
    results.add(Row(
        name: "Start-up: PolicySession + empty policy, in-process", colorun: ms(s), baseline: "(none)", ratio: "n/a", target: "(none)", status: "n/a",
        what: "write policy.lua, create a PolicySession (Lua state, sandbox, colorun's modules, state dir, journal) on its loop, run it to the end; \(rounds) rounds, p50 / p99"))

    guard let colorun = config.colorun else { return }
    let dir = NSTemporaryDirectory() + "colorun-bench-startup-\(getpid())"
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: dir) }
    let empty = dir + "/empty.lua"
    _ = FileManager.default.createFile(atPath: empty, contents: Data("-- nothing\n".utf8))
    func timeCommand(_ arguments: [String]) -> Stats {
        var samples: [Int64] = []
        for _ in 0..<rounds {
            let t = monotonicNanos()
            _ = runTool(colorun, arguments)
            samples.append(monotonicNanos() - t)
        }
        return Stats(samples)
    }
    let check = timeCommand(["check", "examples/checkpoint.lua", "--domain", "primary", "--domain", "secondary"])
    results.add(Row(
        name: "Start-up: `colorun check examples/checkpoint.lua`", colorun: ms(check), baseline: "(none)", ratio: "n/a", target: "< 50 ms",
        status: verdict(check.p50 / 1e6 < 50),
        what: "the release binary as a process: compile the policy, dry-run its main chunk; \(rounds) rounds, p50 / p99"))
    let run = timeCommand(["run", empty, "--state-dir", dir + "/state"])
    results.add(Row(
        name: "Start-up: `colorun run` of a policy that does nothing", colorun: ms(run), baseline: "(none)", ratio: "n/a", target: "(none)", status: "n/a",
        what: "the release binary as a process, journal recovery and the summary included; \(rounds) rounds, p50 / p99"))
}
