import ColorunTestSupport
import Foundation
import QEMUSimulator
import Testing

/// Tests that run the built `colorun` binary, as an operator (or systemd) does.
@Suite(.serialized, .timeLimit(.minutes(3)), .machine(.exclusive)) struct BinaryTests {
    @Test func usageErrorsExitTwoNamingTheFlag() async throws {
        let dir = makeTempDirectory("colorun-cli-usage")
        let policy = writePolicy("print('hi')\n", in: dir)
        let cases: [([String], String)] = [
            (["run", policy, "--domain", "nodomain"], "--domain 'nodomain'"),
            (["run", policy, "--domain", "web=unix:"], "--domain 'web=unix:'"),
            ([policy, "--keep", "0"], "--keep '0'"),
            ([policy, "--duration", "5 parsecs"], "--duration"),
            ([policy, "--log-format", "xml"], "--log-format"),
            ([policy, "--metrics-listen", "nowhere"], "--metrics-listen 'nowhere'"),
            ([policy, "--bogus"], "--bogus"),
            ([policy, "--loop-slice", "50us"], "--loop-slice '50us': must be 0 (the kernel's default) or from 100us to 100ms"),
            ([policy, "--loop-slice", "1s"], "--loop-slice '1s'"),
            (["run", policy, "--domain", "web=unix:/x", "--shared", "db"], "--shared db: no --domain db=ENDPOINT"),
            (["run", policy, "--domain", "web=tls:h:1,cert=/c"], "give cert= and key= together"),
            (["run", dir + "/missing.lua"], "cannot open"),
        ]
        for (arguments, needle) in cases {
            let result = try await runColorun(arguments)
            #expect(result.code == 2, "\(arguments): exit \(result.code)")
            #expect(result.stderr.contains(needle), "\(arguments): \(result.stderr)")
        }
    }

    @Test func versionHelpAndDefaultSubcommand() async throws {
        let version = try await runColorun(["--version"])
        #expect(version.code == 0 && version.stdout.hasPrefix("0."))
        for command in [["--help"], ["run", "--help"], ["check", "--help"], ["qmp", "--help"]] {
            let help = try await runColorun(command)
            #expect(help.code == 0 && help.stdout.contains("Exit codes"), "\(command)")
        }
        let dir = makeTempDirectory("colorun-cli-default")
        let policy = writePolicy("print('hello', ...)\n", in: dir)
        let run = try await runColorun([policy, "--state-dir", dir + "/state", "--", "a", "b"])
        #expect(run.code == 0)
        #expect(run.stderr.contains("hello\ta\tb"))
        #expect(run.stdout.contains("finished after"))
    }

    @Test func runtimeFailureIsOneLoadFailureIsTwo() async throws {
        let dir = makeTempDirectory("colorun-cli-fail")
        let failing = writePolicy("local function f() error('boom') end\nf()\n", in: dir, name: "fail.lua")
        let result = try await runColorun([failing, "--state-dir", dir + "/state"])
        #expect(result.code == 1)
        #expect(result.stderr.contains("fail.lua:1: boom"))
        #expect(result.stderr.contains("stack traceback"))
        let broken = writePolicy("x = = 1\n", in: dir, name: "broken.lua")
        let load = try await runColorun([broken, "--state-dir", dir + "/state"])
        #expect(load.code == 2)
        #expect(load.stderr.contains("broken.lua:1:"))
    }

    @Test func checkCommand() async throws {
        let dir = makeTempDirectory("colorun-cli-check")
        let good = writePolicy("local p = domain.get('web-p')\npolicy.every('1s', function() qmp.status(p) end)\n", in: dir, name: "good.lua")
        let ok = try await runColorun(["check", good, "--domain", "web-p"])
        #expect(ok.code == 0, "\(ok.stderr)")
        #expect(ok.stdout.contains("good.lua: ok"))
        let undefined = writePolicy("local a = 1\nprnt(a)\n", in: dir, name: "undefined.lua")
        let bad = try await runColorun(["check", undefined])
        #expect(bad.code == 2)
        #expect(bad.stderr.contains("undefined.lua:2: undefined global 'prnt'"))
        let syntax = writePolicy("if then\n", in: dir, name: "syntax.lua")
        let broken = try await runColorun(["check", syntax])
        #expect(broken.code == 2)
        #expect(broken.stderr.contains("syntax.lua:1:"))
    }

    @Test func sharedDomainsFromTheCommandLine() async throws {
        try await withSimulatedPair { pair in
            let policy = writePolicy("""
                local p, s = domain.get("web-p"), domain.get("web-s")
                assert(p.shared and not s.shared)
                assert(p:status().running and s:status().running)
                assert(p:status().running)
                print("connects " .. p:stats().connects .. " " .. s:stats().connects)
                """, in: pair.directory)
            let run = try await runColorun([policy, "--state-dir", pair.directory + "/state", "--shared", "web-p"] + pair.domainArguments)
            #expect(run.code == 0, "\(run.stderr)")
            // A connection per command on the shared domain, one for the run on the other.
            #expect(run.stderr.contains("connects 2 1"), "\(run.stderr)")
        }
    }

    @Test func qmpCommandAgainstTheSimulator() async throws {
        try await withSimulatedPair { pair in
            let endpoint = "unix:\(pair.directory)/p.sock"
            let status = try await runColorun(["qmp", endpoint, "query-status"])
            #expect(status.code == 0, "\(status.stderr)")
            #expect(status.stdout.contains(#""status": "running""#))
            let compact = try await runColorun(["qmp", "--compact", endpoint, "query-status"])
            #expect(compact.stdout.split(separator: "\n").count == 1)
            let error = try await runColorun(["qmp", endpoint, "no-such-command"])
            #expect(error.code == 1)
            #expect(error.stderr.contains("CommandNotFound: The command no-such-command has not been found"))
            let withArgs = try await runColorun(["qmp", endpoint, "xen-load-devices-state", #"{"filename": "/nonexistent/x"}"#])
            #expect(withArgs.code == 1)
            #expect(withArgs.stderr.contains("GenericError:"))
            let badJSON = try await runColorun(["qmp", endpoint, "stop", "{"])
            #expect(badJSON.code == 2)
            #expect(pair.primary.runState == .running)
            let unreachable = try await runColorun(["qmp", "--timeout", "200ms", "unix:\(pair.directory)/none.sock", "query-status"])
            #expect(unreachable.code == 1)
            #expect(unreachable.stderr.contains("ConnectFailed"))
        }
    }

    /// The acceptance test: checkpoints every 100 ms against a simulated pair, SIGTERM,
    /// exit 0, both domains running, a summary on stdout, metrics served meanwhile.
    @Test func sigtermEndsARunCleanly() async throws {
        try await withSimulatedPair { pair in
            let dir = makeTempDirectory("colorun-cli-e2e")
            let policy = writePolicy("""
                local p, s = domain.get("web-p"), domain.get("web-s")
                policy.every("100ms", function()
                  colo.checkpoint(p, s)
                end)
                """, in: dir)
            let port = freePort()
            let process = try ColorunProcess(
                [policy, "--state-dir", dir + "/state", "--log-format", "json", "--metrics-listen", "127.0.0.1:\(port)"]
                    + pair.domainArguments)
            // Wait for a few checkpoints (generation files appear in the state directory).
            let series = dir + "/state/checkpoints/web-p+web-s"
            try await waitUntil("two generations and four saves", timeout: .seconds(20)) {
                let generations = ((try? FileManager.default.contentsOfDirectory(atPath: series)) ?? [])
                    .filter { $0.hasPrefix("gen-") && !$0.contains("partial") }.count
                return generations >= 2 && pair.primary.saveCounter >= 4
            }
            let metrics = try httpGet(port: port, path: "/metrics")
            #expect(metrics.hasPrefix("HTTP/1.1 200"))
            #expect(metrics.contains("colorun_checkpoint_pause_seconds_bucket"))
            #expect(metrics.contains("colorun_qmp_command_duration_seconds"))
            #expect(metrics.contains(#"colorun_domain_up{domain="web-s"} 1.0"#))
            #expect(try httpGet(port: port, path: "/").hasPrefix("HTTP/1.1 404"))

            process.signal(SIGTERM)
            let result = await process.wait(timeout: 15)
            #expect(result.code == 0, "\(result.stderr)")
            #expect(pair.primary.runState == .running)
            #expect(pair.secondary.runState == .running)
            #expect(result.stdout.contains("stopped after"))
            #expect(result.stdout.contains("checkpoints:"))
            #expect(result.stdout.contains("last good:     web-p+web-s generation"))
            #expect(!result.stdout.contains("NOT RESUMED"))
            #expect(!result.stdout.contains("\u{1B}["))  // no live status when stdout is not a terminal
            // --log-format json: every stderr line is one JSON object.
            let lines = result.stderr.split(separator: "\n")
            #expect(!lines.isEmpty)
            for line in lines {
                let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
                #expect(object?["message"] != nil && object?["ts"] != nil && object?["level"] != nil, "\(line)")
            }
            #expect(result.stderr.contains("SIGTERM: stopping"))
        }
    }

    @Test func aSecondSignalStillResumesAndExits() async throws {
        try await withSimulatedPair { pair in
            // Every save takes 3 s: a checkpoint is in flight when the signals come.
            let (process, _) = try await colorunMidCheckpoint(pair, saveDelay: .seconds(3), tag: "colorun-cli-e2e2")
            process.signal(SIGTERM)
            // The second signal must find the first one handled (a graceful stop under way).
            try await waitUntil("colorun's answer to the first SIGTERM", timeout: .seconds(10)) {
                process.stderrSoFar.contains("SIGTERM: stopping")
            }
            process.signal(SIGTERM)
            let clock = ContinuousClock()
            let start = clock.now
            let result = await process.wait(timeout: 15)
            #expect(clock.now - start < .seconds(7))
            #expect(result.stderr.contains("again: not waiting"))
            #expect(pair.primary.runState == .running)
            #expect(pair.secondary.runState == .running)
            #expect(result.code == 0 || result.code == 1)
        }
    }
}
