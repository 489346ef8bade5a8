import ColorunTestSupport
import Foundation
import Testing

/// What an operator installs and scrapes (issue 16, part 4): the metrics of a real run under
/// promtool, and scripts/install into a temporary prefix.
@Suite(.serialized, .timeLimit(.minutes(6)), .machine(.exclusive)) struct OperationsTests {
    /// A `--lab` run (real QEMU, TCG) checkpointing every 100 ms: its /metrics pass
    /// `promtool check metrics` with no complaint while it runs; SIGTERM ends it cleanly
    /// through the service group (policy first, then the metrics endpoint).
    @Test func aRealRunsMetricsPassPromtool() async throws {
        let dir = makeTempDirectory("colorun-ops-metrics")
        defer { removeDirectory(dir) }
        let policy = writePolicy("""
            local p = domain.get("primary")
            pcall(qmp.execute, p, "no-such-command")     -- one failed QMP command
            policy.every("100ms", function() pcall(remus.checkpoint, p, {keep = 2}) end)
            """, in: dir)
        let port = freePort()
        let process = try ColorunProcess(["--lab", policy, "--metrics-listen", "127.0.0.1:\(port)"])
        var body = ""
        try await waitUntil("two Remus checkpoints of the lab's primary in /metrics", timeout: .seconds(60), interval: .milliseconds(100)) {
            guard process.isRunning else { return true }
            body = httpBody((try? httpGet(port: port, path: "/metrics")) ?? "")
            let line = body.split(separator: "\n").first { $0.hasPrefix(#"colorun_checkpoints_total{series="primary"} "#) }
            return (line.flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0) >= 2
        }
        #expect(process.isRunning, "colorun ended early: \(process.stderrSoFar)")
        for name in ["colorun_checkpoints_total", "colorun_checkpoint_pause_seconds", "colorun_qmp_command_duration_seconds",
                     "colorun_qmp_command_failures_total", "colorun_domain_up"] {
            #expect(body.contains("# HELP \(name) "), "no HELP for \(name)")
        }
        #expect(body.contains(#"colorun_domain_up{domain="primary"} 1.0"#))
        let lint = try await promtoolCheckMetrics(body)
        #expect(lint.code == 0 && lint.stdout.isEmpty && lint.stderr.isEmpty,
                "promtool check metrics: exit \(lint.code)\n\(lint.stdout)\(lint.stderr)\n--- the exposition:\n\(body)")

        process.signal(SIGTERM)
        let result = await process.wait(timeout: 30)
        #expect(result.code == 0, "\(result.stderr)")
        #expect(result.stderr.contains("SIGTERM: stopping"))
        #expect(result.stdout.contains("stopped after"))
        #expect(result.stdout.contains("last good:     primary generation"))
        // The endpoint closed with the run.
        #expect(throws: (any Error).self) { try httpGet(port: port, path: "/metrics") }
    }

    /// scripts/install with the debug binary (no release build in CI) into a temporary
    /// prefix: every file where it belongs, and the installed colorun runs and checks an
    /// installed example.
    @Test func installIntoATemporaryPrefix() async throws {
        guard let binary = colorunBinary() else { throw CLITestError("the colorun binary is not built (swift build)") }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let dir = makeTempDirectory("colorun-install")
        defer { removeDirectory(dir) }
        let prefix = dir + "/prefix"
        let clock = ContinuousClock()
        let started = clock.now
        // The first install builds swift-argument-parser's generate-manual (debug, once).
        let install = try await runCommand([root + "/scripts/install", "--binary", binary, prefix], timeout: 300)
        print("OperationsTests: scripts/install took \(clock.now - started)")
        #expect(install.code == 0, "scripts/install: \(install.stderr)")

        let files = [
            "bin/colorun", "lib/systemd/system/colorun@.service", "share/man/man1/colorun.1",
            "share/bash-completion/completions/colorun", "share/zsh/site-functions/_colorun",
            "share/fish/vendor_completions.d/colorun.fish", "share/colorun/examples/checkpoint.lua",
            "share/colorun/examples/remus.lua",
        ]
        for file in files {
            let size = (try? FileManager.default.attributesOfItem(atPath: prefix + "/" + file)[.size] as? Int) ?? 0
            #expect(size > 0, "\(file) missing or empty")
        }
        let unit = (try? String(contentsOfFile: prefix + "/lib/systemd/system/colorun@.service", encoding: .utf8)) ?? ""
        #expect(unit.contains("ExecStart=\(prefix)/bin/colorun run /etc/colorun/%i.lua"))
        #expect(!unit.contains("/usr/local/bin"))
        let manual = (try? String(contentsOfFile: prefix + "/share/man/man1/colorun.1", encoding: .utf8)) ?? ""
        #expect(manual.contains(".Dt COLORUN 1"), "\(manual.prefix(300))")
        #expect(manual.contains("metrics-listen") && manual.contains("Exit codes"))
        // man renders it without a warning; systemd accepts the unit (an instance of it, with the
        // installed binary and manual).
        let man = try await runCommand(["sh", "-c", #"MANWIDTH=80 exec man -l "$1""#, "sh", prefix + "/share/man/man1/colorun.1"])
        #expect(man.code == 0 && man.stderr.isEmpty && man.stdout.contains("COLORUN(1)"), "man: \(man.stderr)")
        let instance = dir + "/colorun@web.service"
        try FileManager.default.copyItem(atPath: prefix + "/lib/systemd/system/colorun@.service", toPath: instance)
        let verify = try await runCommand(["sh", "-c", #"MANPATH="$1" exec systemd-analyze verify "$2""#, "sh", prefix + "/share/man", instance])
        #expect(verify.code == 0 && verify.stderr.isEmpty, "systemd-analyze verify: \(verify.stdout)\(verify.stderr)")
        let bash = (try? String(contentsOfFile: prefix + "/share/bash-completion/completions/colorun", encoding: .utf8)) ?? ""
        #expect(bash.contains("--metrics-listen"))

        let version = try await runCommand([prefix + "/bin/colorun", "--version"])
        #expect(version.code == 0 && version.stdout.hasPrefix("0."), "\(version.stdout)\(version.stderr)")
        let check = try await runCommand([prefix + "/bin/colorun", "check", prefix + "/share/colorun/examples/checkpoint.lua",
                                          "--domain", "primary", "--domain", "secondary"])
        #expect(check.code == 0, "\(check.stderr)")
        #expect(check.stdout.contains("checkpoint.lua: ok"))

        let usage = try await runCommand([root + "/scripts/install", "--bogus"])
        #expect(usage.code == 2 && usage.stderr.contains("unknown option '--bogus'"))
    }
}
