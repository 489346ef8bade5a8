import Colorun
import ColorunSystem
import Foundation

/// One scale run: `pairs` simulated pairs in a separate qemu-sim process, each checkpointed
/// with `colo.checkpoint` by its own `policy.every(interval)`; pairs are armed staggered
/// over one interval (pair i starts at i × interval / pairs).
struct ScaleResult {
    var pairs: Int
    var interval: Double
    var seconds: Double
    var checkpoints: Int
    var failed: Int
    var skipped: Int
    var lateness: Stats
    var cpuSeconds: Double
    var rssMiB: Double
    /// Checkpoints that failed anywhere in the run (warm-up and drain included): a pipelined
    /// generation's failed commit counts here even when no later call raised it.
    var failedInRun = 0

    var rate: Double { Double(checkpoints) / seconds }
    var target: Double { Double(pairs) / interval }
    var cpuPerCheckpointMicros: Double { checkpoints > 0 ? cpuSeconds / Double(checkpoints) * 1e6 : .nan }
    /// Sustained: at least 99 % of the asked rate, nothing failed.
    var sustained: Bool { rate >= 0.99 * target && failed == 0 && failedInRun == 0 }
}

let scalePolicy = """
    local pairs_n = tonumber(bench.arg("pairs"))
    local interval = tonumber(bench.arg("interval"))
    local warm, duration = tonumber(bench.arg("warmup")), tonumber(bench.arg("duration"))
    local options = { keep = 1, pipeline = bench.arg("pipeline") == "true" }
    local now = bench.now
    local ivn = math.floor(interval * 1e9)
    local t_begin = now()
    local from = t_begin + math.floor(warm * 1e9)
    local to = from + math.floor(duration * 1e9)
    local late, done, failed = {}, 0, 0
    for i = 0, pairs_n - 1 do
      local p, s = domain.get("dom" .. (2 * i)), domain.get("dom" .. (2 * i + 1))
      policy.after(interval * i / pairs_n, function()
        local t0 = now()
        policy.every(interval, function()
          local t = now()
          local counted = t >= from and t < to
          if counted then late[#late + 1] = (t - t0) % ivn end
          local ok = pcall(colo.checkpoint, p, s, options)
          if counted then
            if ok then done = done + 1 else failed = failed + 1 end
          end
        end)
      end)
    end
    sleep((from - now()) / 1e9)
    local cpu0 = bench.cpu()
    sleep((to - now()) / 1e9)
    local cpu1, rss = bench.cpu(), bench.rss()
    sleep(interval + 0.05)   -- let checkpoints started in the window finish
    bench.put("late", late)
    bench.put("counts", { done, failed })
    bench.put("cpu_us", { math.floor((cpu1 - cpu0) * 1e6) })
    bench.put("rss_kib", { math.floor(rss * 1024) })
    policy.stop()
    """

func runScale(_ config: BenchConfig, pairs: Int, interval: Double, warmup: Double, duration: Double,
              stateOnTmpfs: Bool = false, pipeline: Bool = false, staging: Bool = false) async throws -> ScaleResult {
    let sim = try SimProcess(executable: config.qemuSim, count: 2 * pairs)
    defer { sim.stop() }
    let bench = BenchModule(arguments: [
        "pairs": String(pairs), "interval": String(interval), "warmup": String(warmup), "duration": String(duration),
        "pipeline": String(pipeline),
    ])
    let domains = (0..<(2 * pairs)).map { DomainSpec(name: "dom\($0)", endpoint: .unix(path: sim.socket($0))) }
    let shm = makeTempDirectoryIn("/dev/shm", "colorun-bench")
    defer { try? FileManager.default.removeItem(atPath: shm) }
    let report = try await runPolicy(scalePolicy, domains: domains, bench: bench) { options in
        if stateOnTmpfs { options.stateDirectory = shm + "/state" }
        if staging { options.runtimeDirectory = shm + "/runtime" }
    }
    let counts = bench.samples("counts")
    return ScaleResult(
        pairs: pairs, interval: interval, seconds: duration, checkpoints: Int(counts.first ?? 0), failed: Int(counts.last ?? 0),
        skipped: report.skippedTicks, lateness: Stats(bench.samples("late")),
        cpuSeconds: Double(bench.samples("cpu_us").first ?? 0) / 1e6, rssMiB: Double(bench.samples("rss_kib").first ?? 0) / 1024,
        failedInRun: report.failedCheckpoints)
}

func describe(_ r: ScaleResult) -> String {
    "\(fmt(r.rate, 1)) cp/s of \(fmt(r.target, 0)); jitter p99 \(fmt(r.lateness.p99 / 1e6, 1)) ms; \(fmt(r.cpuPerCheckpointMicros, 0)) µs CPU/cp; RSS \(fmt(r.rssMiB, 1)) MiB"
        + (r.failed > 0 ? "; \(r.failed) failed" : "") + (r.failedInRun > r.failed ? "; \(r.failedInRun) failed in the whole run" : "")
        + (r.skipped > 0 ? "; \(r.skipped) ticks skipped" : "")
}

/// The one-minute load line of issue 14: 100 pairs every 25 ms (4,000 checkpoints/s) from
/// one process, state directory on disk, pipelined (`colo.checkpoint{pipeline=true}`: the
/// call returns when both domains run again; every generation is still made durable, by the
/// group commit, before the next one of its pair is answered). `--only scale4k` runs it alone.
func benchScale4k(_ config: BenchConfig, _ results: Results) async throws {
    // The benchmarks before this one leave gigabytes of dirty pages (Remus streams, COLO
    // disks) that the kernel would write back during the run: start from a clean disk.
    sync()
    let seconds = config.scaleSeconds ?? (config.quick ? 10.0 : 60.0)
    let load0 = loadAverage()
    let r = try await runScale(config, pairs: 100, interval: 0.025, warmup: 2, duration: seconds, pipeline: true, staging: true)
    var missed: [String] = []
    if r.rate < 3960 { missed.append("rate") }
    if r.lateness.p99 >= 5e6 { missed.append("jitter") }
    if r.cpuPerCheckpointMicros >= 250 { missed.append("CPU") }
    if r.failed > 0 || r.failedInRun > 0 { missed.append("failures") }
    results.add(Row(
        name: "Scale: 100 pairs every 25 ms (4,000 cp/s), state dir on disk, `--runtime-dir` on /dev/shm, pipelined, \(fmt(seconds, 0)) s", colorun: describe(r),
        baseline: "(none)", ratio: "n/a", target: "≥ 3,960 cp/s, jitter p99 < 5 ms, CPU/cp < 250 µs",
        status: missed.isEmpty ? "met" : "missed (\(missed.joined(separator: ", ")))",
        what: "one PolicySession (one loop thread) driving 100 simulated pairs (qemu-sim, a separate process on the same 2 cores) with `colo.checkpoint(p, s, {pipeline = true})` from `policy.every(0.025)`, with `--runtime-dir` on /dev/shm: the stop journal is there, the primary saves each device state there and the secondary loads it from there; the call returns when both domains run again; the generation is committed to the state directory on disk with the next group while the pair goes on (copied in place into a slot file no durable record lists, syncfs, the series' index record written, syncfs: no rename, no new inode), at most two generations per pair in flight (a third waits for its own commit); \(fmt(seconds, 0)) s measured after 2 s; load average \(load0) before, \(loadAverage()) after"))
    let short = min(seconds, config.quick ? 5.0 : 15.0)
    let unstaged = try await runScale(config, pairs: 100, interval: 0.025, warmup: 2, duration: short, pipeline: true)
    results.add(Row(
        name: "Scale: 100 pairs every 25 ms, state dir on disk, no runtime directory, pipelined, \(fmt(short, 0)) s", colorun: describe(unstaged),
        baseline: "(none)", ratio: "n/a", target: "(diagnostic)", status: unstaged.sustained ? "sustained" : "not sustained",
        what: "as the row above without `--runtime-dir`: the stop journal's records are in the state directory (written back by every group's syncfs, then faulted on their next update), and QEMU (here qemu-sim) creates each generation's file there (a new inode and new blocks per generation, and the pruned one's freed)"))
    let waited = try await runScale(config, pairs: 100, interval: 0.025, warmup: 2, duration: short)
    results.add(Row(
        name: "Scale: 100 pairs every 25 ms, state dir on disk, each call waits for its commit, \(fmt(short, 0)) s", colorun: describe(waited),
        baseline: "(none)", ratio: "n/a", target: "(diagnostic)", status: waited.sustained ? "sustained" : "not sustained",
        what: "as the row above without `pipeline`: `colo.checkpoint` returns once its generation is durable, so a pair's next tick waits for the group commit's latency (a tick that comes while the call waits is skipped)"))
    let t = try await runScale(config, pairs: 100, interval: 0.025, warmup: 2, duration: short, stateOnTmpfs: true)
    results.add(Row(
        name: "Scale: 100 pairs every 25 ms, state dir on tmpfs, each call waits for its commit, \(fmt(short, 0)) s", colorun: describe(t),
        baseline: "(none)", ratio: "n/a", target: "(diagnostic)", status: t.sustained ? "sustained" : "not sustained",
        what: "as the row above with `--state-dir` on /dev/shm, where a commit waits for no disk: what the engine does when the disk is not the limit"))
    let latency = commitLatency(directory: makeTempDirectory("colorun-bench-fsync"), rounds: config.n(200, 50))
    results.note("the state directory's disk in the same run: one generation commit alone (write 2 KiB, fsync, rename, fsync the directory) takes \(ms(latency)); without `pipeline` a pair cannot checkpoint more often than once per commit (its `colo.checkpoint` returns when the generation is durable)")
    let slotted = groupCommitLatency(directory: makeTempDirectory("colorun-bench-group"), stores: 100, rounds: config.n(20, 8), slots: true)
    results.note("a group commit of 100 pairs' generations with `--runtime-dir`, alone (100 slot files of 2 KiB rewritten in place in 100 directories, syncfs, 100 index records written, syncfs): \(ms(slotted.total)) (p50 / p99), of which the slots' syncfs \(ms(slotted.data)) and the records' \(ms(slotted.names)): a group of 100 every \(fmt(slotted.total.p50 / 1e6, 1)) ms allows \(fmt(100 / (slotted.total.p50 / 1e9), 0)) generations/s")
    let group = groupCommitLatency(directory: makeTempDirectory("colorun-bench-group"), stores: 100, rounds: config.n(20, 8))
    let bound = 100 / (0.025 + group.total.p50 / 1e9)
    results.note("a group commit of 100 pairs' generations on the same disk, alone (the syncfs path of `GenerationStore.commitAll`: 100 files of 2 KiB in 100 directories, syncfs, 100 renames, syncfs): \(ms(group.total)) (p50 / p99), of which the files' syncfs \(ms(group.data)) and the renames' \(ms(group.names)); when every pair waits for its group (no `pipeline`), 100 pairs every 25 ms can reach at most about 100 / (25 ms + the group's p50) = \(fmt(bound, 0)) cp/s on this disk now; pipelined, a group of 100 every \(fmt(group.total.p50 / 1e6, 1)) ms allows \(fmt(100 / (group.total.p50 / 1e9), 0)) generations/s")
}

/// What a group commit of `stores` generations costs on the disk under `directory`, alone,
/// the way `GenerationStore.commitAll` does it for a group of 4 or more: each store's
/// partial file written (2 KiB, as qemu-sim's device state), one `syncfs`, the renames, one
/// more `syncfs`. Replaces the previous generation (keep = 1) as the scale runs do. With
/// `slots` as a staged store does it: one of three slot files per store rewritten in place,
/// one `syncfs`, each store's index record (52 bytes) written into the place of its older
/// one, one more `syncfs`.
func groupCommitLatency(directory: String, stores: Int, rounds: Int, slots: Bool = false) -> (total: Stats, data: Stats, names: Stats) {
    defer { removeTree(directory) }
    var total: [Int64] = [], data: [Int64] = [], names: [Int64] = []
    let payload = [UInt8](repeating: 0x51, count: 2048)
    let dirs = (0..<stores).map { directory + "/p\($0)" }
    for dir in dirs { mkdir(dir, 0o700) }
    if slots {
        let files = dirs.map { dir in (0..<3).map { open(dir + "/slot-\($0).devstate", O_RDWR | O_CREAT | O_CLOEXEC, 0o600) } }
        let indexes = dirs.map { open($0 + "/generations.index", O_RDWR | O_CREAT | O_CLOEXEC, 0o600) }
        defer { for fd in files.joined() + indexes { close(fd) } }
        let record = [UInt8](repeating: 0x52, count: 52)
        for fd in files.joined() { _ = payload.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) } }
        try? syncFilesystem(indexes[0])
        for round in 0..<rounds {
            for slots in files { _ = payload.withUnsafeBytes { pwrite(slots[round % 3], $0.baseAddress, $0.count, 0) } }
            let t0 = monotonicNanos()
            try? syncFilesystem(indexes[0])
            let t1 = monotonicNanos()
            for fd in indexes { _ = record.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(round % 2 * 32_768)) } }
            try? syncFilesystem(indexes[0])
            let t2 = monotonicNanos()
            total.append(t2 - t0)
            data.append(t1 - t0)
            names.append(t2 - t1)
        }
        return (Stats(total), Stats(data), Stats(names))
    }
    for round in 0..<rounds {
        var fds: [Int32] = []
        for dir in dirs {
            let fd = open(dir + "/.gen.partial", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            _ = payload.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            fds.append(fd)
        }
        let t0 = monotonicNanos()
        try? syncFilesystem(fds[0])
        let t1 = monotonicNanos()
        for dir in dirs {
            rename(dir + "/.gen.partial", dir + "/gen-\(round % 2)")
            unlink(dir + "/gen-\((round + 1) % 2)")
        }
        try? syncFilesystem(fds[0])
        let t2 = monotonicNanos()
        for fd in fds { close(fd) }
        total.append(t2 - t0)
        data.append(t1 - t0)
        names.append(t2 - t1)
    }
    return (Stats(total), Stats(data), Stats(names))
}

/// What one commit costs on the disk under `directory`, alone: write a small file, fsync
/// it, rename it, fsync the directory (what GenerationStore does per group).
func commitLatency(directory: String, rounds: Int) -> Stats {
    defer { removeTree(directory) }
    var samples: [Int64] = []
    let payload = [UInt8](repeating: 0x51, count: 2048)
    for i in 0..<rounds {
        let partial = directory + "/.gen.partial", final = directory + "/gen-\(i % 2)"
        let t = monotonicNanos()
        let fd = open(partial, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        _ = payload.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        fsync(fd)
        close(fd)
        rename(partial, final)
        let dfd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        fsync(dfd)
        close(dfd)
        samples.append(monotonicNanos() - t)
    }
    return Stats(samples)
}

/// The machine's 1/5/15-minute load averages, for the rows that depend on it.
func loadAverage() -> String {
    guard let text = try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8) else { return "?" }
    return text.split(separator: " ").prefix(3).joined(separator: " ")
}

/// The highest sustained rate of `pairs` pairs in the configuration for high rates (state
/// directory on disk, `--runtime-dir` on /dev/shm, pipelined): intervals from `intervals`,
/// shortest last, until one is not sustained.
func highestRate(_ config: BenchConfig, pairs: Int, intervals: [Double], seconds: Double) async throws -> (best: ScaleResult?, tried: [String]) {
    var best: ScaleResult?
    var tried: [String] = []
    for interval in intervals {
        // Pairs are armed over one interval and tick first one interval later: the window starts
        // once every pair ticks, and holds a whole number of intervals.
        let warmup = max(1, 2 * interval + 0.1)
        let window = max(seconds, interval * 3).rounded(.up)
        let r = try await runScale(config, pairs: pairs, interval: interval, warmup: warmup, duration: (window / interval).rounded(.up) * interval,
                                   pipeline: true, staging: true)
        tried.append("\(fmt(interval * 1000, 1)) ms: \(fmt(r.rate, 0))/\(fmt(r.target, 0)) cp/s, jitter p99 \(fmt(r.lateness.p99 / 1e6, 1)) ms, \(fmt(r.cpuPerCheckpointMicros, 0)) µs CPU/cp")
        if r.sustained { best = r } else { break }
    }
    return (best, tried)
}

func benchScale(_ config: BenchConfig, _ results: Results) async throws {
    let long = config.quick ? 8.0 : 30.0
    let short = config.quick ? 4.0 : 10.0
    try await benchScale4k(config, results)
    var runs: [ScaleResult] = []
    for pairs in [10, 100] {
        let r = try await runScale(config, pairs: pairs, interval: 1.0, warmup: 2, duration: short)
        runs.append(r)
        results.add(Row(
            name: "Scale: \(pairs) pairs every 1000 ms", colorun: describe(r), baseline: "(none)", ratio: "n/a",
            target: "(none)", status: r.sustained ? "sustained" : "not sustained",
            what: "one PolicySession (one loop thread) driving \(pairs) simulated pairs (qemu-sim, separate process) with `colo.checkpoint` from `policy.every`, \(fmt(short, 0)) s measured after 2 s"))
    }
    let big = try await runScale(config, pairs: 1000, interval: 1.0, warmup: 3, duration: long)
    runs.append(big)
    let ok = big.rate >= 990 && big.lateness.p99 < 50e6 && big.rssMiB < 100 && big.failed == 0
    var missed: [String] = []
    if big.rate < 990 { missed.append("rate") }
    if big.lateness.p99 >= 50e6 { missed.append("jitter") }
    if big.rssMiB >= 100 { missed.append("RSS") }
    if big.failed > 0 { missed.append("failures") }
    results.add(Row(
        name: "Scale: 1,000 pairs every 1 s", colorun: describe(big), baseline: "(none)", ratio: "n/a",
        target: "≥ 990 cp/s, jitter p99 < 50 ms, RSS < 100 MiB", status: ok ? "met" : "missed (\(missed.joined(separator: ", ")))",
        what: "as above, 2,000 simulated domains, \(fmt(long, 0)) s measured after 3 s"))

    // The same with the state directory on tmpfs (fsync is free there): how much of the
    // cost is the generation store's fsyncs.
    let tmpfs = try await runScale(config, pairs: 1000, interval: 1.0, warmup: 3, duration: short, stateOnTmpfs: true)
    results.add(Row(
        name: "Scale: 1,000 pairs every 1 s, state dir on tmpfs", colorun: describe(tmpfs), baseline: "(none)", ratio: "n/a",
        target: "(diagnostic)", status: tmpfs.sustained ? "sustained" : "not sustained",
        what: "as the row above but `--state-dir` on /dev/shm, where the generation store's fsyncs cost nothing; \(fmt(short, 0)) s measured"))

    // The highest sustained rates.
    let probe = config.quick ? 3.0 : 5.0
    for (pairs, intervals) in [(100, [0.2, 0.1, 0.05, 0.025, 0.02, 0.0125]), (1000, [2.0, 1.0, 0.5, 0.25, 0.2])] {
        let (best, tried) = try await highestRate(config, pairs: pairs, intervals: intervals, seconds: probe)
        results.add(Row(
            name: "Scale: highest sustained rate, \(pairs == 1000 ? "1,000" : String(pairs)) pairs",
            colorun: best.map { "\(fmt($0.rate, 0)) cp/s (every \(fmt($0.interval * 1000, 1)) ms; \(fmt($0.cpuPerCheckpointMicros, 0)) µs CPU/cp)" } ?? "none sustained",
            baseline: "(none)", ratio: "n/a", target: "(report)", status: "n/a",
            what: "\(pairs) pairs, state dir on disk, `--runtime-dir` on /dev/shm, `colo.checkpoint(p, s, {pipeline = true})`; the interval shortened until < 99 % of the asked rate (or a failure), \(fmt(probe, 0)) s each: " + tried.joined(separator: "; ")))
    }
    results.note("CPU per checkpoint against N at 1 s: 10 pairs \(fmt(runs[0].cpuPerCheckpointMicros, 0)) µs, 100 pairs \(fmt(runs[1].cpuPerCheckpointMicros, 0)) µs, 1,000 pairs \(fmt(big.cpuPerCheckpointMicros, 0)) µs (at 1 checkpoint per pair per second the loop sleeps between ticks: each wake-up is paid by fewer checkpoints when N is small); RSS \(fmt(runs[0].rssMiB, 1)) / \(fmt(runs[1].rssMiB, 1)) / \(fmt(big.rssMiB, 1)) MiB (RSS of the whole bench process, which ran the earlier benchmarks too)")
}
