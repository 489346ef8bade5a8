import ColorunSystem
import ColorunTestSupport
import NIOCore
import QEMULab
import QEMUSimulator
import Testing
@testable import Colorun

#if canImport(Glibc)
import Glibc
#endif

/// The examples directory of this checkout.
let examplesDirectory: String = {
    var path = #filePath
    for _ in 0..<3 { path = String(path[..<path.lastIndex(of: "/")!]) }
    return path + "/examples"
}()

/// The text of `examples/NAME` (empty if it is missing: the runs then fail).
func exampleSource(_ name: String) -> String {
    String(decoding: (try? readFile("\(examplesDirectory)/\(name)")) ?? [], as: UTF8.self)
}

/// Runs an example file (not a copy) with the given domains, options and lab.
func runExample(_ name: String, domains: [(String, String)] = [], lab: Lab? = nil,
                hooks: [String: @Sendable () throws -> Void] = [:],
                configure: (inout PolicyOptions) -> Void = { _ in }) async throws -> PolicyRun {
    let source = exampleSource(name)
    #expect(!source.isEmpty, "examples/\(name) exists")
    return try await runPolicy(source, domains: domains, hooks: hooks, lab: lab, configure: configure)
}

@Suite(.timeLimit(.minutes(3)), .machine(.exclusive)) struct ExamplesTests {
    func names(_ pair: SimulatedPair) -> [(String, String)] {
        [("primary", pair.domains[0].1), ("secondary", pair.domains[1].1)]
    }

    @Test func checkpointExampleAgainstTheSimulator() async throws {
        try await withSimulatedPair { pair in
            let run = try await runExample("checkpoint.lua", domains: names(pair)) { $0.duration = .milliseconds(1500) }
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(run.report.checkpoints >= 1)
            #expect(pair.secondary.loadedStates.count == run.report.checkpoints)
            #expect(pair.primary.runState == .running && pair.secondary.runState == .running)
        }
    }

    @Test func checkpointExampleFailsOverWhenThePrimaryDies() async throws {
        try await withSimulatedPair { pair in
            let killer = try await runPolicy(
                exampleSource("checkpoint.lua")
                    + "\npolicy.after('500ms', function() test.kill() end)\n",
                domains: names(pair), hooks: ["kill": { Task { await pair.primary.kill() } }])
            guard case .stopped = killer.report.outcome else {
                Issue.record("\(killer.report.outcome)")
                return
            }
            #expect(killer.logs.contains("the secondary takes over"))
            #expect(pair.secondary.runState == .running)
        }
    }

    @Test func declarativeExampleAgainstTheSimulator() async throws {
        try await withSimulatedPair { pair in
            let run = try await runExample("declarative.lua", domains: names(pair)) { $0.duration = .milliseconds(1500) }
            #expect(run.failure == nil, "\(run.failure ?? "")")
            #expect(run.report.checkpoints >= 1)
            #expect(pair.secondary.loadedStates.count == run.report.checkpoints)
        }
    }

    @Test func siteHooksExampleFencesBeforeFailingOver() async throws {
        try await withSimulatedPair { pair in
            let marker = makeTempDirectory("colorun-fence") + "/fenced"
            let source = exampleSource("site-hooks.lua")
                + "\npolicy.after('400ms', function() test.kill() end)\n"
            let run = try await runPolicy(source, domains: names(pair), hooks: ["kill": { Task { await pair.primary.kill() } }]) {
                $0.allowExec = true
                $0.arguments = ["/usr/bin/touch", marker]
            }
            guard case .stopped = run.report.outcome else {
                Issue.record("\(run.report.outcome)")
                return
            }
            #expect(access(marker, F_OK) == 0, "the fencing command ran")
            #expect(run.logs.contains("primary fenced"))
            #expect(pair.secondary.runState == .running)
        }
    }

    /// The README's main job: the lab, Remus checkpoints, the primary killed, the standby
    /// restored from the last good checkpoint and counting on from it.
    @Test func remusExampleInTheLab() async throws {
        let lab = try Lab(names: ["primary"])
        let run = try await runExample("remus.lua", lab: lab)
        guard case .stopped = run.report.outcome else {
            Issue.record("\(run.report.outcome)\n\(run.logs.text)")
            return
        }
        #expect(run.report.checkpoints >= 1)
        #expect(run.report.failovers == 1)
        let loaded = run.logs.lines.first { $0.contains("standby loaded the checkpoint") } ?? ""
        let runsOn = run.logs.lines.first { $0.contains("standby runs on from there") } ?? ""
        func counter(_ line: String) -> Int? {
            guard let part = line.split(separator: " ").first(where: { $0.hasPrefix("guest_counter=") }) else { return nil }
            return Int(part.dropFirst("guest_counter=".count))
        }
        let at = try #require(counter(loaded), "\(run.logs.text)")
        let later = try #require(counter(runsOn))
        #expect(at > 0 && later > at, "the standby starts from the checkpoint (\(at)) and counts on (\(later))")
    }

    /// The full cycle of examples/qemu-colo.lua in the COLO lab: the primary lost (promotion),
    /// re-protection, the secondary lost, re-protection, the primary lost again; after each
    /// failover every pattern written on the primary's COLO disk so far is on the survivor.
    @Test(.enabled(if: kvmUsable, "needs /dev/kvm: QEMU 7.2's COLO deadlocks under TCG"))
    func qemuCOLOExampleWithKVM() async throws {
        try await withCOLOLab { lab, _ in
            let run = try await runExample("qemu-colo.lua", lab: lab) {
                coloTimeouts(&$0)
                $0.arguments = ["cycles=3", "every=300ms"]
            }
            guard case .stopped = run.report.outcome else {
                Issue.record("\(run.report.outcome)\n\(run.logs.text)\nthe lab's QEMUs:\n\(lab.processReport())")
                return
            }
            #expect(run.report.failovers == 3)
            #expect(run.logs.lines.filter { $0.contains("every pattern written so far is on") }.count == 3, "\(run.logs.text)")
            #expect(run.logs.lines.filter { $0.contains("re-protected:") }.count == 3)
            #expect(run.logs.text.contains("primary lost: secondary promoted"))
            #expect(run.logs.text.contains("secondary lost: secondary runs alone"))
            #expect(run.logs.text.contains("primary lost: secondary-2 promoted"))
        }
    }
}
