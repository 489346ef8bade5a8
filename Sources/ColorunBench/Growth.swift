import Colorun
import Foundation
import QEMULab

/// How the Remus checkpoint pause grows with the guest (TCG): the Linux lab guest with its
/// memory mode filling most of its RAM and keeping it dirty at two rates, 256 MiB and 1 GiB;
/// the 64 MiB point is the counting guest (the Linux guest needs about 100 MiB to boot).
/// `--only growth`.
func benchGrowth(_ config: BenchConfig, _ results: Results) async throws {
    let n = config.n(5, 3)
    let image = try await LinuxGuestImage.build()
    // (guest MiB, MiB the memory mode fills, pages per second, label); nil MiB: counting guest.
    let slow = 2560  // 10 MiB/s
    let configurations: [(memory: Int, dirty: Int?, rate: Int, label: String)] = [
        (64, nil, 0, "64 MiB counting guest (idle: a few pages dirty)"),
        (256, 160, slow, "256 MiB, 160 MiB filled, dirtied at 10 MiB/s"),
        (256, 160, 0, "256 MiB, 160 MiB filled, dirtied as fast as the guest can"),
        (1024, 800, slow, "1 GiB, 800 MiB filled, dirtied at 10 MiB/s"),
        (1024, 800, 0, "1 GiB, 800 MiB filled, dirtied as fast as the guest can"),
    ]
    for c in configurations {
        let qemu: QEMUInstance
        var guest: LinuxGuest?
        if let dirty = c.dirty {
            var options = LinuxGuestOptions()
            options.memoryMiB = c.memory
            options.dirtyMiB = dirty
            options.dirtyPagesPerSecond = c.rate
            // Under TCG on a loaded machine the kernel's timer check can fail ("IO-APIC + timer
            // doesn't work") and panic: skip it, and boot once more if the kernel still dies.
            options.extraKernelArguments = ["no_timer_check"]
            let g = try await LinuxGuest.create(options: options, disk: false, image: image)
            guest = g
            var boot = try g.boot()
            do {
                try await boot.waitUntilReady(timeout: .seconds(240))
            } catch {
                _ = await boot.qemu.stop(grace: .milliseconds(200))
                boot = try g.boot()
                try await boot.waitUntilReady(timeout: .seconds(240))
            }
            qemu = boot.qemu
            let clock = ContinuousClock()
            let deadline = clock.now + .seconds(240)
            while !boot.serialText().contains("DIRTY ready mib=\(dirty)") {
                guard clock.now < deadline, qemu.exitStatus == nil else {
                    throw BenchError("growth: the memory mode never filled \(dirty) MiB\n\(boot.diagnostics())")
                }
                try await Task.sleep(for: .milliseconds(100))
            }
        } else {
            qemu = try QEMUInstance.start(QEMUSpec(memoryMiB: c.memory, countingGuest: true))
        }
        defer { stopLater(qemu) }
        let raw = pythonBaseline(config.python, config.baselineScript, ["raw-remus", qemu.qmpSocketPath, qemu.path("py.vmstate"), String(n)])
        let bench = BenchModule(arguments: ["n": String(n)])
        _ = try await runPolicy(
            """
            local d = domain.get("d")
            local n = tonumber(bench.arg("n"))
            remus.checkpoint(d, { keep = 1 })
            local pause, bytes = {}, {}
            for i = 1, n do
              local r = remus.checkpoint(d, { keep = 1 })
              pause[i] = math.floor(r.pause_ms * 1e6)
              bytes[i] = r.bytes
            end
            bench.put("pause", pause)
            bench.put("bytes", bytes)
            """, domains: [DomainSpec(name: "d", endpoint: qemu.qmpEndpoint)], bench: bench) { options in
            options.domainOptions = DomainOptions(connectTimeout: .seconds(5), commandTimeout: .seconds(120))
        }
        let pause = Stats(bench.samples("pause"))
        let mib = Double(bench.samples("bytes").max() ?? 0) / 1048576
        let r = raw.samples.map(Stats.init)
        let max = Double(pause.sorted.last ?? 0) / 1e6
        results.add(Row(
            name: "Remus pause vs guest size (TCG): \(c.label), p50 / max",
            colorun: "\(fmt(pause.p50 / 1e6, 0)) / \(fmt(max, 0)) ms; stream \(fmt(mib, 0)) MiB",
            baseline: r.map { "raw py \(fmt($0.p50 / 1e6, 0)) / \(fmt(Double($0.sorted.last ?? 0) / 1e6, 0)) ms" } ?? "skipped (\(raw.why))",
            ratio: r.map { "\(ratioText(pause.p50, $0.p50)) raw p50" } ?? "n/a", target: "(report)",
            status: pause.p50 < 100e6 ? "usable at 10/s" : pause.p50 < 1e9 ? "usable at 1/s" : "not usable (pause > 1 s)",
            what: "`remus.checkpoint(d)` (stop, `migrate exec:cat > FILE`, poll, cont; memory only, state dir on disk), \(n) checkpoints after one; the guest under TCG; raw: the same steps from Python. \"usable\": the pause leaves the guest running most of the time at that checkpoint rate"))
        _ = await qemu.stop(grace: .milliseconds(500))
        guest?.remove()
    }
}
