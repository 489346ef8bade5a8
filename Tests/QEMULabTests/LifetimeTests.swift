import ColorunSystem
import ColorunTestSupport
import Foundation
import Logging
import Synchronization
import Testing

@testable import QEMULab

#if canImport(Glibc)
import Glibc
#endif

/// Nothing a test or colorun starts in owned mode outlives its owner, however the owner
/// ends; a production standby (detached) does; and run directories left by dead owners are
/// swept. Serialized, and alone on the machine: the kill tests time how fast QEMUs go, which
/// others booting alongside would blur.
@Suite(.serialized, .timeLimit(.minutes(2)), .machine(.exclusive)) struct LifetimeTests {
    /// SIGKILL `colorun --lab` in the middle of a run (its QEMUs up, a checkpoint generation
    /// on disk): within 5 s every QEMU it started is gone. `examples/remus.lua` runs one
    /// QEMU at a time; the second policy checkpoints both lab domains.
    @Test(arguments: [
        ("examples/remus.lua", 1),
        ("both domains", 2),
    ])
    func sigkilledColorunLeavesNoQEMU(policy: String, qemus: Int) async throws {
        let colorun = try #require(builtBinary("colorun"), "the colorun binary is not built (swift build)")
        let scratch = try Scratch()
        var path = "\(repositoryRoot)/\(policy)"
        if !policy.hasSuffix(".lua") {
            path = scratch.path("both.lua")
            try writeFile(path, Array("""
                local p, s = domain.get("primary"), domain.get("secondary")
                policy.every("200ms", function()
                  remus.checkpoint(p, {keep = 2})
                  remus.checkpoint(s, {keep = 2})
                end)
                """.utf8))
        }
        let owner = try Child([colorun, "--lab", path], scratch: scratch)
        let pid = owner.pid
        var watched: Set<pid_t> = []
        defer { cleanUp(owner: owner, qemus: watched) }

        // Mid-run: its QEMUs are up and the policy has written a checkpoint generation.
        let running = try await waitUntil("colorun checkpoints its lab domains", seconds: 60, scratch: scratch) {
            let children = qemuChildren(of: pid)
            return children.count == qemus && hasCheckpoint(ownedBy: pid) ? children : nil
        }
        let started = ContinuousClock.now
        owner.kill()
        #expect(owner.wait() == .signaled(signal: SIGKILL))
        watched = Set(running + recordedChildren(ownedBy: pid))
        let all = watched
        let gone = await waitUntilGone(all, seconds: 5)
        print("colorun --lab \(policy) SIGKILLed with QEMU(s) \(all.sorted()): all gone after \(milliseconds(ContinuousClock.now - started)) ms")
        #expect(gone, "QEMU still running 5 s after its colorun was killed: \(all.filter(isRunning))")
        #expect(all.count >= qemus)
    }

    /// A process that started lab QEMUs from several tasks (pool threads that may come and
    /// go) is SIGKILLed: within 5 s all its QEMUs are gone.
    @Test func sigkilledOwnerOfQEMUInstancesLeavesNone() async throws {
        let probe = try #require(builtBinary("QEMULabProbe"), "QEMULabProbe is not built (swift build)")
        let scratch = try Scratch()
        let owner = try Child([probe, "qemus", "3"], scratch: scratch)
        var watched: Set<pid_t> = []
        defer { cleanUp(owner: owner, qemus: watched) }
        let running = try await waitUntil("the probe starts 3 QEMUs", seconds: 60, scratch: scratch) {
            let children = qemuChildren(of: owner.pid)
            return children.count == 3 ? children : nil
        }
        watched = Set(running)
        let started = ContinuousClock.now
        owner.kill()
        let gone = await waitUntilGone(Set(running), seconds: 5)
        print("probe SIGKILLed with QEMUs \(running.sorted()): all gone after \(milliseconds(ContinuousClock.now - started)) ms")
        #expect(gone, "QEMU still running 5 s after its owner was killed: \(running.filter(isRunning))")
        #expect(owner.wait() == .signaled(signal: SIGKILL))
    }

    /// The kernel's death signal is tied to the thread that forks: an owned child started from
    /// a thread that then ends must keep running while its process does.
    @Test func ownedChildOutlivesTheThreadThatAskedForIt() async throws {
        let (child, tid) = try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<(Child, pid_t), any Error>) in
            let thread = Thread {
                do {
                    continuation.resume(returning: (try Child(["sleep", "60"]), currentThreadID()))
                } catch {
                    continuation.resume(throwing: error)
                }
            }
            thread.start()
        }
        defer { child.end() }
        // The thread has ended once its task is gone from /proc (after the kernel's exit
        // notifications, which is when a death signal would be sent).
        _ = try await waitUntil("the spawning thread ends", seconds: 10) {
            access("/proc/self/task/\(tid)", F_OK) != 0 ? true : nil
        }
        #expect(child.poll() == nil)
        #expect(isRunning(child.pid))
        child.kill()
        #expect(child.wait() == .signaled(signal: SIGKILL))
    }

    /// A detached child (the production standby's way) keeps running when the process that
    /// started it exits, in a session of its own; an owned one does not.
    @Test func detachedChildOutlivesItsSpawnerAndOwnedDoesNot() async throws {
        let probe = try #require(builtBinary("QEMULabProbe"), "QEMULabProbe is not built (swift build)")
        let scratch = try Scratch()
        var pids: [ChildLifetime: pid_t] = [:]
        defer { killIfRunning(Set(pids.values), commandLine: "sleep 60") }
        for (lifetime, name) in [(ChildLifetime.detached, "detached"), (.owned, "owned")] {
            let pidFile = scratch.path("\(name).pid")
            let spawner = try Child([probe, "spawn", name, pidFile, "sleep", "60"], scratch: scratch)
            #expect(await spawner.exit(within: 10) == .exited(code: 0), "\(scratch.text("stderr"))")
            let text = String(decoding: try readFile(pidFile), as: UTF8.self)
            let pid = try #require(pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)))
            pids[lifetime] = pid
        }
        let detached = try #require(pids[.detached]), owned = try #require(pids[.owned])
        #expect(isRunning(detached), "the detached child died with its spawner")
        #expect(getsid(detached) == detached, "not in a session of its own")
        #expect(RunDirectorySweep.commandLine(of: detached).hasPrefix("sleep 60"))
        #expect(await waitUntilGone([owned], seconds: 5), "the owned child outlived its spawner")
        #expect(kill(detached, SIGKILL) == 0)
        #expect(await waitUntilGone([detached], seconds: 5))
    }

    /// The production standby: `remus.restore` with `qemu = {...}` under `colorun --lab`
    /// starts a QEMU that keeps running after colorun has ended, in a session of its own.
    @Test func restoredProductionStandbyOutlivesColorun() async throws {
        let colorun = try #require(builtBinary("colorun"), "the colorun binary is not built (swift build)")
        let scratch = try Scratch()
        let image = scratch.path("guest.img")
        try writeFile(image, CountingGuest.bootSector)
        let socket = scratch.path("standby.sock")
        let argv = [QEMUSpec().executable] + QEMUSpec(countingGuest: true).arguments(qmpSocket: socket, guestImage: image)
        let policy = scratch.path("standby.lua")
        try writeFile(policy, Array("""
            local p = domain.get("primary")
            local r = remus.checkpoint(p, {keep = 2})
            local standby, info = remus.restore({name = "prod", from = p, qmp = "unix:\(socket)",
              qemu = {\(argv.map { "\"\($0)\"" }.joined(separator: ", "))}}, r.generation)
            assert(standby:status().running)
            policy.stop()
            """.utf8))
        let owner = try Child([colorun, "--lab", policy], scratch: scratch)
        var standby: [pid_t] = []
        defer { cleanUp(owner: owner, qemus: Set(standby)) }
        #expect(await owner.exit(within: 60) == .exited(code: 0), "\(scratch.text("stderr"))")

        standby = RunDirectorySweep.processesNaming(scratch.directory).filter(isRunning)
        #expect(standby.count == 1, "the standby did not outlive colorun: \(scratch.text("stderr"))")
        for pid in standby {
            #expect(getsid(pid) == pid, "the standby is not in a session of its own")
            #expect(kill(pid, SIGKILL) == 0)
        }
        #expect(await waitUntilGone(Set(standby), seconds: 5))
    }

    /// A run directory whose owner is dead is swept: its QEMU (still running, found by its
    /// command line) killed, the directory removed. Directories of a live owner, without a
    /// record, or whose recorded pid is now another program are left alone.
    @Test func sweepRemovesStaleRunDirectoriesAndKillsTheirQEMU() async throws {
        let parent = try makeTemporaryDirectory(prefix: "colorun-sweeptest")
        try RunDirectoryOwner.current().write(to: parent)  // a later sweep of /tmp removes it if this test dies
        defer { removeTree(parent) }

        let dead = try Child(["true"])
        #expect(dead.wait() == .exited(code: 0))
        let deadOwner = dead.pid
        // An unrelated process whose pid the stale record also names.
        let bystanderChild = try Child(["sleep", "60"])
        defer { bystanderChild.end() }
        let bystander = bystanderChild.pid

        let stale = try makeTemporaryDirectory(in: parent, prefix: "colorun-qemu")
        let spec = QEMUSpec()
        let qemuChild = try Child([spec.executable] + spec.arguments(qmpSocket: "\(stale)/qmp.sock", guestImage: nil))
        defer { qemuChild.end() }
        let qemu = qemuChild.pid
        try RunDirectoryOwner(pid: deadOwner, startTime: 0, children: [qemu, bystander]).write(to: stale)
        let staleEmpty = try makeTemporaryDirectory(in: parent, prefix: "colorun-lab-state")
        try RunDirectoryOwner(pid: deadOwner, startTime: 0).write(to: staleEmpty)
        // A record whose pid is alive but started at another time: the owner is gone.
        let reused = try makeTemporaryDirectory(in: parent, prefix: "colorun-qemu")
        try RunDirectoryOwner(pid: bystander, startTime: 1).write(to: reused)
        let live = try makeTemporaryDirectory(in: parent, prefix: "colorun-qemu")
        try RunDirectoryOwner.current().write(to: live)
        let unrecorded = try makeTemporaryDirectory(in: parent, prefix: "colorun-qemu")
        let notOurs = try makeTemporaryDirectory(in: parent, prefix: "other")
        try RunDirectoryOwner(pid: deadOwner, startTime: 0).write(to: notOurs)

        _ = try await waitUntil("QEMU runs", seconds: 10) { access("\(stale)/qmp.sock", F_OK) == 0 ? true : nil }
        let swept = RunDirectorySweep.sweep(parent, logger: Logger(label: "test.sweep"))

        #expect(Set(swept.map(\.path)) == [stale, staleEmpty, reused])
        #expect(swept.first { $0.path == stale }?.killed == [qemu])
        #expect(swept.allSatisfy { $0.path == stale || $0.killed.isEmpty })
        #expect(await qemuChild.exit(within: 5) == .signaled(signal: SIGKILL))
        #expect(isRunning(bystander))
        for path in [stale, staleEmpty, reused] { #expect(access(path, F_OK) != 0, "\(path) left") }
        for path in [live, unrecorded, notOurs] { #expect(access(path, F_OK) == 0, "\(path) swept") }
    }

    /// `QEMUInstance` records its owner and QEMU in the run directory.
    @Test func runDirectoryRecordsOwnerAndQEMU() async throws {
        let instance = try QEMUInstance.start()
        let owner = try #require(RunDirectoryOwner.read(from: instance.runDirectory))
        #expect(owner == RunDirectoryOwner.current(children: [instance.pid]))
        #expect(owner.isAlive)
        #expect(RunDirectorySweep.commandLine(of: instance.pid).contains(instance.runDirectory + "/"))
        await instance.stop()
        #expect(access(instance.runDirectory, F_OK) != 0)
    }
}

// MARK: - Support

/// The repository (three levels above this file).
let repositoryRoot: String = {
    var path = #filePath
    for _ in 0..<3 { path = String(path[..<path.lastIndex(of: "/")!]) }
    return path
}()

/// A binary of this package: next to the test bundle in `.build/<triple>/debug/`.
func builtBinary(_ name: String) -> String? {
    var dir = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent(name).path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    return nil
}

/// A private directory for a test's files, removed with the value.
final class Scratch {
    let directory: String
    init() throws { directory = try makeTemporaryDirectory(prefix: "colorun-lifetimetest") }
    deinit { removeTree(directory) }
    func path(_ name: String) -> String { "\(directory)/\(name)" }
    func text(_ name: String) -> String { String(decoding: (try? readFile(path(name))) ?? [], as: UTF8.self) }
}

/// The kernel's id of the calling thread (from the /proc/thread-self link, "PID/task/TID").
func currentThreadID() -> pid_t {
    var buffer = [UInt8](repeating: 0, count: 64)
    let n = buffer.withUnsafeMutableBufferPointer { readlink("/proc/thread-self", $0.baseAddress!, $0.count) }
    guard n > 0 else { return -1 }
    return pid_t(String(decoding: buffer[0..<n], as: UTF8.self).split(separator: "/").last ?? "") ?? -1
}

/// `duration` in milliseconds, to 0.1 ms.
func milliseconds(_ duration: Duration) -> Double {
    let (seconds, attoseconds) = duration.components
    return ((Double(seconds) * 1000 + Double(attoseconds) / 1e15) * 10).rounded() / 10
}

struct Timeout: Error, CustomStringConvertible {
    var description: String
}

/// Polls `condition` every 5 ms until it returns a value; throws after `seconds`.
func waitUntil<T>(_ what: String, seconds: Double, scratch: Scratch? = nil, _ condition: () -> T?) async throws -> T {
    let deadline = ContinuousClock.now + .seconds(seconds)
    while ContinuousClock.now < deadline {
        if let value = condition() { return value }
        try await Task.sleep(for: .milliseconds(5))
    }
    let output = scratch.map { "; stderr: \($0.text("stderr").suffix(2000))" } ?? ""
    throw Timeout(description: "timed out after \(seconds) s waiting until \(what)\(output)")
}

/// Whether `pid` is a process that runs (exists and is not a zombie).
func isRunning(_ pid: pid_t) -> Bool {
    guard let stat = ProcessInfoFile.stat(pid) else { return false }
    return stat.state != "Z"
}

/// Waits (polling every millisecond) until none of `pids` runs; false if one still does
/// after `seconds`.
func waitUntilGone(_ pids: Set<pid_t>, seconds: Double) async -> Bool {
    let deadline = ContinuousClock.now + .seconds(seconds)
    while pids.contains(where: isRunning) {
        if ContinuousClock.now >= deadline { return false }
        try? await Task.sleep(for: .milliseconds(1))
    }
    return true
}

/// The running QEMU children of `parent`.
func qemuChildren(of parent: pid_t) -> [pid_t] {
    ((try? listDirectory("/proc")) ?? []).compactMap { name in
        guard let pid = pid_t(name), let stat = ProcessInfoFile.stat(pid), stat.parent == parent, stat.state != "Z",
            RunDirectorySweep.commandLine(of: pid).contains("qemu-system")
        else { return nil }
        return pid
    }
}

/// The directories under /tmp whose owner record names `owner`.
func directories(ownedBy owner: pid_t) -> [String] {
    ((try? listDirectory("/tmp")) ?? []).filter { $0.hasPrefix(RunDirectorySweep.namePrefix) }.compactMap { name in
        let path = "/tmp/\(name)"
        return RunDirectoryOwner.read(from: path)?.pid == owner ? path : nil
    }
}

/// The QEMUs recorded in `owner`'s run directories.
func recordedChildren(ownedBy owner: pid_t) -> [pid_t] {
    directories(ownedBy: owner).flatMap { RunDirectoryOwner.read(from: $0)?.children ?? [] }
}

/// Whether one of `owner`'s directories holds a checkpoint generation (a file under
/// `checkpoints/SERIES/`).
func hasCheckpoint(ownedBy owner: pid_t) -> Bool {
    directories(ownedBy: owner).contains { directory in
        ((try? listDirectory("\(directory)/checkpoints")) ?? []).contains { series in
            ((try? listDirectory("\(directory)/checkpoints/\(series)")) ?? []).contains { !$0.hasPrefix(".") }
        }
    }
}

/// Ends `owner`, kills whichever of `qemus` still runs (none should: then the test has
/// failed), and removes what the owner left under /tmp.
func cleanUp(owner: Child, qemus: Set<pid_t>) {
    owner.end()
    killIfRunning(qemus, commandLine: "qemu-system")
    for directory in directories(ownedBy: owner.pid) { removeTree(directory) }
}

/// SIGKILLs those of `pids` that still run `commandLine` (not a pid reused since).
func killIfRunning(_ pids: Set<pid_t>, commandLine: String) {
    for pid in pids where isRunning(pid) && RunDirectorySweep.commandLine(of: pid).hasPrefix(commandLine) {
        _ = kill(pid, SIGKILL)
    }
}

/// An owned child of the test process, reaped once: after that its pid is never signalled.
final class Child: Sendable {
    let pid: pid_t
    private let status = Mutex<ChildExitStatus?>(nil)

    /// Starts `commandLine`, stdout and stderr appended to the scratch directory's files.
    init(_ commandLine: [String], scratch: Scratch? = nil) throws {
        pid = try spawnChild(
            commandLine, lifetime: .owned,
            standardOutput: scratch.map { .appendingTo($0.path("stdout")) } ?? .null,
            standardError: scratch.map { .appendingTo($0.path("stderr")) } ?? .null)
    }

    /// How it ended, if it has (reaping it).
    func poll() -> ChildExitStatus? {
        status.withLock { status in
            if status == nil { status = reapChild(pid, blocking: false) }
            return status
        }
    }

    /// Waits until it has ended.
    func wait() -> ChildExitStatus? {
        status.withLock { status in
            if status == nil { status = reapChild(pid, blocking: true) }
            return status
        }
    }

    /// Polls until it has ended; nil if it still runs after `seconds`.
    func exit(within seconds: Double) async -> ChildExitStatus? {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while ContinuousClock.now < deadline {
            if let status = poll() { return status }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return poll()
    }

    /// SIGKILL, unless it has been reaped.
    func kill() {
        status.withLock { status in
            if status == nil { _ = Glibc.kill(pid, SIGKILL) }
        }
    }

    /// Kills and reaps it, unless it has been reaped.
    func end() {
        kill()
        _ = wait()
    }
}
