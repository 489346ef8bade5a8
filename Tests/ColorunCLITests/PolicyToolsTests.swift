import ColorunSystem
import ColorunTestSupport
import Foundation
import JSON
import Logging
import LuaRuntime
import NIOCore
import NIOPosix
import Testing
@testable import Colorun
@testable import ColorunOperator

/// The repository's root (for examples/, editor/ and docs/).
private let repository: String = {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<3 { url = url.deletingLastPathComponent() }
    return url.path
}()

private func check(_ source: String, domains: [String] = [], lab: Bool = false) async -> Result<PolicyCheck.Passed, PolicyCheck.Failure> {
    let dir = makeTempDirectory("colorun-tools-check")
    defer { removeDirectory(dir) }
    var options = PolicyOptions(policyPath: writePolicy(source, in: dir))
    options.domains = domains.map { DomainSpec(name: $0, endpoint: .unix(path: "/nonexistent/\($0)")) }
    let result = await PolicyCheck.check(options, lab: lab, logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
    // Paths in messages are the temporary directory's: keep only what follows it.
    switch result {
    case .success(let passed): return .success(passed)
    case .failure(var failure):
        failure.message = failure.message.replacingOccurrences(of: dir + "/", with: "")
        return .failure(failure)
    }
}

/// `colorun check`'s static pass, its dry run without --domain, and --lab.
@Suite(.timeLimit(.minutes(2)), .machine(.shared)) struct PolicyCheckStaticTests {
    @Test func aTypoInsideAnEveryCallbackIsFoundWithItsLine() async {
        let result = await check("""
            local p, s = domain.get("web-p"), domain.get("web-s")
            policy.every("200ms", function()
              local ok = pcall(colo.checkpoint, p, s)
              if not ok then qmp.stpo(p) end
            end)
            policy.on_lost(p, function()
              polcy.stop()
            end)
            """)
        guard case .failure(let failure) = result else { Issue.record("a policy with two typos passed"); return }
        let lines = failure.message.split(separator: "\n").map(String.init)
        #expect(lines == [
            "policy.lua:4: 'qmp.stpo' is not part of colorun's API (did you mean 'qmp.stop'?)",
            "policy.lua:7: undefined global 'polcy' (did you mean 'policy'?)",
        ], "\(failure.message)")
    }

    @Test func nestedFunctionsStandardLibrariesAndDeeperModules() async {
        let result = await check("""
            local function outer()
              return function()
                local t = {}
                table.insrt(t, 1)
                return colo.native.strat
              end
            end
            return outer
            """)
        guard case .failure(let failure) = result else { Issue.record("passed"); return }
        #expect(failure.message.contains("policy.lua:4: 'table.insrt' does not exist (did you mean 'table.insert'?)"), "\(failure.message)")
        #expect(failure.message.contains("policy.lua:5: 'colo.native.strat' is not part of colorun's API (did you mean 'colo.native.start'?)"), "\(failure.message)")
    }

    @Test func globalsThePolicyDefinesAreKnown() async {
        let dir = makeTempDirectory("colorun-tools-require")
        defer { removeDirectory(dir) }
        _ = writePolicy("function shared_helper() return 1 end\nreturn {}\n", in: dir, name: "helpers.lua")
        let path = writePolicy("""
            require("helpers")
            counter = 0
            function bump() counter = counter + shared_helper() end
            policy.every("1s", function() bump(); log.info(counter, rawget(_G, "maybe")) end)
            policy.tools = policy.tools or {}
            """, in: dir)
        let result = await PolicyCheck.check(PolicyOptions(policyPath: path), logger: Logger(label: "t") { _ in SwiftLogNoOpLogHandler() })
        guard case .success = result else { Issue.record("\(result)"); return }
    }

    @Test func anyDomainIsAcceptedAndListedWithoutDomainOptions() async {
        let result = await check("""
            local p, s = domain.get("db-p"), domain.get("db-s")
            policy.every("1s", function() colo.checkpoint(p, s) end)
            """)
        guard case .success(let passed) = result else { Issue.record("\(result)"); return }
        #expect(passed.domains == ["db-p", "db-s"])
    }

    @Test func namedDomainsAreTheOnlyOnes() async {
        let result = await check("local p = domain.get('db-p')\n", domains: ["web-p"])
        guard case .failure(let failure) = result else { Issue.record("passed"); return }
        #expect(failure.message.contains("unknown domain 'db-p' (known: web-p"), "\(failure.message)")
    }

    @Test func labPoliciesNeedLab() async {
        let source = "local p = domain.get('primary')\npolicy.after('3s', function() lab.kill(p) end)\n"
        guard case .failure(let failure) = await check(source) else { Issue.record("passed without --lab"); return }
        #expect(failure.message.contains("policy.lua:2: undefined global 'lab' (the lab module exists only under --lab: check with --lab)"),
                "\(failure.message)")
        guard case .success(let passed) = await check(source, lab: true) else { Issue.record("failed with --lab"); return }
        #expect(passed.domains == ["primary"])
    }

    @Test func labRefusesTheDeclarativeXenMode() async {
        let source = "return colo.policy{primary = domain.get('primary'), secondary = domain.get('secondary'), interval = '1s'}\n"
        guard case .failure(let failure) = await check(source, lab: true) else { Issue.record("passed"); return }
        #expect(failure.message.contains("policy.lua:1: colo.policy: secondary: xen-load-devices-state: Refused:"), "\(failure.message)")
        guard case .success = await check(source.replacingOccurrences(of: "interval", with: "mode = 'remus', interval"), lab: true) else {
            Issue.record("mode remus refused"); return
        }
    }

    @Test func labRefusesTheXenCycle() async {
        let result = await check("""
            local p, s = domain.get("primary"), domain.get("secondary")
            policy.every("200ms", function()
              colo.checkpoint(p, s)
            end)
            """, lab: true)
        guard case .failure(let failure) = result else { Issue.record("passed"); return }
        #expect(failure.message.contains("policy.lua:3: colo.checkpoint: refused under --lab"), "\(failure.message)")
        #expect(failure.message.contains("--sim"))
    }

    /// Every table argument rejects unknown fields, naming the field and the policy line.
    @Test(arguments: [
        ("local d = domain.open{name = 'x', qmp = 'unix:/nonexistent/x', sharde = true}", "domain.open: unknown field 'sharde' (known: name, qmp, shared, timeout, tls)"),
        ("domain.xen(7, {rundir = '/run/xen'})", "domain.xen: unknown field 'rundir' (known: monitor, name, run_dir, timeout)"),
        ("local d = domain.get('a')\nd:status{timeuot = 1}", "qmp.status: unknown field 'timeuot' (known: timeout)"),
        ("qmp.save('a', '/tmp/x', {liv = false})", "qmp.save: unknown field 'liv' (known: live, timeout)"),
        ("colo.checkpoint('a', 'b', {kepp = 2})", "colo.checkpoint: unknown field 'kepp' (known: keep, pipeline)"),
        ("remus.checkpoint('a', {disk = false})", "remus.checkpoint: unknown field 'disk' (known: disks, keep, output_commit, series)"),
        ("remus.restore{name = 's', from = 'a', qemu_args = {}}", "remus.restore: unknown field 'qemu_args' (known: from, lab, name, paused, qemu, qmp)"),
        ("colo.native.start('a', 'b', {url = 'tcp:x:1'})", "colo.native.start: unknown field 'url' (known: check, delay, nbd, net, netdev, resync_timeout, timeout, uri)"),
        ("policy.on_lost('a', function() end, {hearbeat = '1s'})", "policy.on_lost: unknown field 'hearbeat' (known: heartbeat, timeout)"),
        ("exec.run{'/bin/true', timout = '1s'}", "exec.run: unknown field 'timout' (known: timeout)"),
        ("retry({attempt = 2}, function() end)", "retry: unknown option 'attempt'"),
        ("colo.policy{primary = domain.get('a'), secondary = domain.get('b'), interval = 1, intervall = 2}", "colo.policy: unknown field 'intervall'"),
    ])
    func unknownFieldsAreNamedWithTheLine(call: String, message: String) async {
        let source = "local x = 1\n" + call + "\n"
        let line = source.split(separator: "\n", omittingEmptySubsequences: false).count - 1
        guard case .failure(let failure) = await check(source) else { Issue.record("passed: \(call)"); return }
        #expect(failure.message.contains("policy.lua:\(line): \(message)"), "\(failure.message)")
    }

    @Test func theAcceptedFieldListsMatchColoPolicyAndRetry() {
        let fields = LuaAPI.acceptedFields
        #expect(Set(fields["colo.policy#1"] ?? []) == Set(DeclarativePolicy.fields.keys))
        #expect(Set(fields["retry#1"] ?? []) == Set(DeclarativePolicy.retryFields.keys))
    }
}

/// `colorun check`, `colorun stubs`, `--sim` and `--lab`'s refusal, as the binary does them.
@Suite(.timeLimit(.minutes(3)), .machine(.shared)) struct PolicyToolsBinaryTests {
    /// Examples whose usage line runs them under --lab are checked with --lab.
    static let examples: [String] = {
        ((try? FileManager.default.contentsOfDirectory(atPath: repository + "/examples")) ?? []).filter { $0.hasSuffix(".lua") }.sorted()
    }()

    @Test func everyExampleChecks() async throws {
        _ = try #require(colorunBinary(), "the colorun binary is not built")
        #expect(Self.examples.count >= 6)
        for example in Self.examples {
            let path = repository + "/examples/" + example
            let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
            let lab = text.split(separator: "\n").prefix(12).contains { $0.contains("colorun --lab") && !$0.contains("colorun --sim") }
                && !text.contains("colo.checkpoint")
            let result = try await runColorun(["check"] + (lab ? ["--lab"] : []) + [path])
            #expect(result.code == 0, "\(example): \(result.stdout)\(result.stderr)")
            #expect(result.stdout.contains("\(path): ok"), "\(example): \(result.stdout)")
        }
    }

    @Test func checkReportsEveryFindingAndExits2() async throws {
        let dir = makeTempDirectory("colorun-tools-cli")
        defer { removeDirectory(dir) }
        let path = writePolicy("""
            local p = domain.get("web-p")
            policy.every("1s", function() qmp.stpo(p) end)
            """, in: dir)
        let result = try await runColorun(["check", path])
        #expect(result.code == 2)
        #expect(result.stderr.contains("\(path):2: 'qmp.stpo' is not part of colorun's API (did you mean 'qmp.stop'?)"), "\(result.stderr)")
    }

    /// The editor files in editor/ are what `colorun stubs` writes today, luacheck with them
    /// passes every example and finds the typos the static pass finds.
    @Test func stubsMatchTheEditorDirectoryAndLuacheckUsesThem() async throws {
        let dir = makeTempDirectory("colorun-stubs")
        defer { removeDirectory(dir) }
        let result = try await runColorun(["stubs", dir])
        #expect(result.code == 0, "\(result.stderr)")
        for (path, contents) in LuaAPIStubs.files() {
            let written = try String(contentsOfFile: dir + "/" + path, encoding: .utf8)
            #expect(written == contents, "\(path)")
            let committed = try? String(contentsOfFile: repository + "/editor/" + path, encoding: .utf8)
            #expect(committed == contents, "editor/\(path) is stale: run `swift run colorun stubs editor`")
        }
        #expect(LuaRuntime.syntaxError(inFileAt: dir + "/colorun-meta/colorun.lua") == nil)
        #expect((try? JSONParser.parse(Array(LuaAPIStubs.luarc().utf8))) != nil, "\(LuaAPIStubs.luarc())")
        let luacheck = try #require(["/usr/bin/luacheck", "/usr/local/bin/luacheck"].first { FileManager.default.isExecutableFile(atPath: $0) },
                                    "luacheck is missing: scripts/setup installs Debian's lua-check")
        let examples = Self.examples.map { repository + "/examples/" + $0 }
        let clean = try await run(luacheck, ["--no-color", "--no-cache", "--config", dir + "/.luacheckrc"] + examples)
        #expect(clean.code == 0, "\(clean.stdout)\(clean.stderr)")
        let typo = writePolicy("""
            local p = domain.get("web-p")
            policy.every("1s", function() qmp.stpo(p) end)
            polcy.stop()
            """, in: dir, name: "typo.lua")
        let found = try await run(luacheck, ["--no-color", "--no-cache", "--config", dir + "/.luacheckrc", typo])
        #expect(found.code == 1)
        #expect(found.stdout.contains("typo.lua:2:31: accessing undefined field 'stpo' of global 'qmp'"), "\(found.stdout)")
        #expect(found.stdout.contains("typo.lua:3:1: accessing undefined variable 'polcy'"), "\(found.stdout)")
    }

    /// docs/lua-api.md names every function, method and value of the API table.
    @Test func theDocsMentionEveryEntry() throws {
        let docs = try String(contentsOfFile: repository + "/docs/lua-api.md", encoding: .utf8)
        for entry in LuaAPI.entries {
            let name = entry.kind == .method ? "d:" + entry.name.split(separator: ":")[1] : entry.name
            #expect(docs.contains(name), "docs/lua-api.md does not mention \(name)")
        }
    }

    /// --sim: the declarative example against simulated domains; the primary crashes (a
    /// --fault) and the secondary takes over.
    @Test func simRunsThePolicysDomainsWithFaults() async throws {
        let result = try await runColorun(["--sim", repository + "/examples/declarative.lua", "--fault", "primary=@1500ms:crash"], timeout: 30)
        #expect(result.code == 0, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.split(separator: "\n").contains { $0.split(separator: " ") == ["failovers:", "1"] }, "\(result.stdout)")
        #expect(result.stderr.contains("takes over"), "\(result.stderr)")
        let checkpoints = result.stdout.split(separator: "\n").first { $0.contains("checkpoints") } ?? ""
        #expect(!checkpoints.contains("checkpoints: 0") && !checkpoints.isEmpty, "\(result.stdout)")
    }

    @Test func simRefusesBadFaultsAndDomainOptions() async throws {
        let bad = try await runColorun(["--sim", repository + "/examples/declarative.lua", "--fault", "primary=@1s:explode"])
        #expect(bad.code == 2)
        #expect(bad.stderr.contains("--fault 'primary=@1s:explode'"), "\(bad.stderr)")
        let noSim = try await runColorun([repository + "/examples/declarative.lua", "--fault", "stop:hang"])
        #expect(noSim.code == 2)
        #expect(noSim.stderr.contains("--fault: only with --sim"), "\(noSim.stderr)")
    }

    /// `colorun --lab` refuses a policy that sends the Xen cycle before any QEMU starts.
    @Test func labRefusesTheXenCycleUpFront() async throws {
        let result = try await runColorun(["--lab", repository + "/examples/checkpoint.lua"])
        #expect(result.code == 2)
        #expect(result.stderr.contains("/examples/checkpoint.lua:16: colo.checkpoint"), "\(result.stderr)")
        #expect(result.stderr.contains("--sim"), "\(result.stderr)")
    }

    @Test func memoryLimitTakesUnits() async throws {
        let dir = makeTempDirectory("colorun-tools-mem")
        defer { removeDirectory(dir) }
        let path = writePolicy("log.info('bytes', policy.bytes('64MiB'))\n", in: dir)
        for good in ["64MiB", "64", "1GiB", "512M"] {
            let result = try await runColorun([path, "--memory-limit", good, "--state-dir", dir + "/state"])
            #expect(result.code == 0, "\(good): \(result.stderr)")
        }
        let bad = try await runColorun([path, "--memory-limit", "64 parsecs", "--state-dir", dir + "/state"])
        #expect(bad.code == 2, "\(bad.stderr)")
        let tiny = try await runColorun([path, "--memory-limit", "100KiB", "--state-dir", dir + "/state"])
        #expect(tiny.code == 2 && tiny.stderr.contains("give from 1MiB to 1TiB"), "\(tiny.stderr)")
    }
}

@Suite(.timeLimit(.minutes(1))) struct SizeTests {
    @Test func sizesParse() throws {
        #expect(try LuaSize(parsing: "64MiB").bytes == 64 << 20)
        #expect(try LuaSize(parsing: "64", defaultUnit: 1 << 20).bytes == 64 << 20)
        #expect(try LuaSize(parsing: "1.5GiB").bytes == 3 << 29)
        #expect(try LuaSize(parsing: "512K").bytes == 512 << 10)
        #expect(try LuaSize(parsing: "2MB").bytes == 2_000_000)
        #expect(try LuaSize(parsing: "100").bytes == 100)
        for bad in ["", "MiB", "-1MiB", "3 parsecs", "1e30GiB"] {
            #expect(throws: LuaHostError.self, "\(bad)") { try LuaSize(parsing: bad) }
        }
    }
}

/// Runs a program to its end (an owned child; its output captured).
private func run(_ program: String, _ arguments: [String]) async throws -> ProcessResult {
    try await ColorunProcess(commandLine: [program] + arguments).wait(timeout: 60)
}
