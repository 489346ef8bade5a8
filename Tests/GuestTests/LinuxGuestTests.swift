import ColorunTestSupport
import JSON
import Logging
import NIOCore
import NIOPosix
import QEMULab
import QMPClient
import Testing

#if canImport(Glibc)
import Glibc
#endif

private let group = MultiThreadedEventLoopGroup.singleton

private let haveGuestTools =
    access("/usr/bin/qemu-system-x86_64", X_OK) == 0 && access("/usr/bin/qemu-img", X_OK) == 0
    && access("/bin/busybox", X_OK) == 0

/// The Linux lab guest (guest/, scripts/build-guest) under TCG: it boots, its ledger
/// acknowledges only durable records, and its memory mode dirties what it is told to.
///
/// Serialized: each test boots a Linux kernel under TCG, which keeps a core busy for ten
/// seconds or more; two at once on two cores only make both slower.
@Suite(.serialized, .timeLimit(.minutes(10)), .machine(.exclusive), .enabled(if: haveGuestTools, "needs qemu-system-x86_64, qemu-img and busybox-static (scripts/setup)"))
struct LinuxGuestTests {
    @Test(.timeLimit(.minutes(4)))
    func ledgerAcksRecordsThatSurviveACleanRestart() async throws {
        let guest = try await LinuxGuest.create()
        defer { guest.remove() }

        let first = try guest.boot()
        let bootTime = try await first.waitUntilReady()
        print("Linux guest: spawn to ledger ready in \(bootTime) (first boot, mkfs included)")
        let ledger = try await first.ledger(on: group)
        #expect(try await ledger.fsck() == "clean")
        for number in 1...20 {
            try await ledger.record(number, text: "payload \(number)")
        }
        #expect(try await ledger.count() == (records: 20, bad: 0))

        // A record number the ledger cannot parse is refused, not acknowledged.
        #expect(try await ledger.request("record x") == "error bad-record")
        await #expect(throws: LedgerError.invalidText("two\nlines")) {
            try await ledger.record(21, text: "two\nlines")
        }
        #expect(try await ledger.count() == (records: 20, bad: 0))

        try await ledger.powerOff()
        #expect(await first.qemu.waitForExit(timeout: .seconds(60)) == .exited(code: 0), "\(first.diagnostics())")
        #expect(first.serialText().contains("GUEST unmounted /mnt"), "\(first.diagnostics())")
        await first.qemu.stop()

        let second = try guest.boot()
        let restartTime = try await second.waitUntilReady()
        print("Linux guest: spawn to ledger ready in \(restartTime) (second boot)")
        let again = try await second.ledger(on: group)
        let contents = try await again.dump()
        #expect(contents == LedgerContents(records: Array(1...20), bad: 0))
        #expect(try await again.fsck() == "clean")
        try await again.record(21)
        #expect(try await again.count() == (records: 21, bad: 0))
        again.close()
        await second.qemu.stop()
    }

    /// fsync before ack: records the ledger acknowledged are on the disk even when QEMU is
    /// SIGKILLed right after the last ack (the guest's page cache dies with it), and the
    /// journal makes the filesystem clean again at the next boot.
    @Test(.timeLimit(.minutes(4)))
    func acknowledgedRecordsSurviveSIGKILL() async throws {
        let guest = try await LinuxGuest.create()
        defer { guest.remove() }

        let first = try guest.boot()
        try await first.waitUntilReady()
        let ledger = try await first.ledger(on: group)
        for number in 1...50 {
            try await ledger.record(number)
        }
        #expect(first.qemu.kill(SIGKILL))
        #expect(await first.qemu.waitForExit() == .signaled(signal: SIGKILL))
        ledger.close()
        await first.qemu.stop()

        let second = try guest.boot()
        try await second.waitUntilReady()
        let again = try await second.ledger(on: group)
        let contents = try await again.dump()
        #expect(contents == LedgerContents(records: Array(1...50), bad: 0), "\(second.diagnostics())")
        #expect(try await again.fsck() == "clean", "\(second.diagnostics())")
        try await again.record(51)
        again.close()
        await second.qemu.stop()
    }

    /// The guest can be a Remus standby: saved to a file while stopped and started from it
    /// with `-incoming` on another host port, its ledger goes on where it was (the listening
    /// socket is in the saved memory; the host side reconnects through the new forward).
    @Test(.timeLimit(.minutes(4)))
    func restoresFromASavedStateOnANewPort() async throws {
        let guest = try await LinuxGuest.create()
        defer { guest.remove() }

        let primary = try guest.boot()
        try await primary.waitUntilReady()
        let ledger = try await primary.ledger(on: group)
        for number in 1...5 {
            try await ledger.record(number)
        }
        let qmp = try await primary.qemu.connect(on: group, logger: Logger(label: "guest-tests"))
        let state = guest.directory + "/state.mig"
        _ = try await migrationStreamSize(qmp, to: state, keep: true)
        // The primary is gone; the disk is as it was when the state was saved.
        #expect(primary.qemu.kill(SIGKILL))
        await primary.qemu.stop()
        ledger.close()
        await qmp.close()

        let standby = try guest.boot(base: QEMUSpec(incoming: "exec:cat \(state)"))
        #expect(standby.hostPort != primary.hostPort)
        // A state saved from a stopped VM loads into a paused one ("inmigrate", then "paused").
        let standbyQMP = try await standby.qemu.connect(on: group, logger: Logger(label: "guest-tests"))
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(60)
        while try await standbyQMP.execute("query-status")["status"]?.stringValue != "paused" {
            guard clock.now < deadline else { throw QEMULabError("the standby never loaded the state\n\(standby.diagnostics())") }
            try await Task.sleep(for: .milliseconds(20))
        }
        _ = try await standbyQMP.execute("cont")
        await standbyQMP.close()
        let again = try await standby.ledger(on: group)
        #expect(try await again.dump() == LedgerContents(records: Array(1...5), bad: 0), "\(standby.diagnostics())")
        try await again.record(6)
        #expect(try await again.count() == (records: 6, bad: 0))
        again.close()
        await standby.qemu.stop()
    }

    /// The memory mode fills the memory it is given (a migration stream of the stopped guest
    /// grows by that much) and keeps writing to it (QEMU's sampled dirty rate jumps).
    @Test(.timeLimit(.minutes(4)))
    func memoryModeFillsAndKeepsDirtying() async throws {
        var options = LinuxGuestOptions()
        options.memoryMiB = 384
        let guest = try await LinuxGuest.create(options: options, disk: false)
        defer { guest.remove() }

        let boot = try guest.boot()
        try await boot.waitUntilReady()
        let ledger = try await boot.ledger(on: group)
        let qmp = try await boot.qemu.connect(on: group, logger: Logger(label: "guest-tests"))

        let idleSize = try await migrationStreamSize(qmp, to: guest.directory + "/idle.mig")
        let idleRate = try await sampledDirtyRate(qmp)

        try await ledger.dirty(mebibytes: 192)
        #expect(boot.serialText().contains("DIRTY ready mib=192"))
        let dirtySize = try await migrationStreamSize(qmp, to: guest.directory + "/dirty.mig")
        let dirtyRate = try await sampledDirtyRate(qmp)
        print("Linux guest memory mode: stream \(idleSize >> 20) MiB idle, \(dirtySize >> 20) MiB with 192 MiB dirtied; dirty rate \(idleRate) MB/s idle, \(dirtyRate) MB/s dirtying")

        // Free guest pages are not zeroed, so the idle stream is some 100 MiB; the filled
        // memory is never zero, so the stream holds all of it on top of the kernel's pages.
        #expect(idleSize < 160 << 20, "idle stream \(idleSize) bytes")
        #expect(dirtySize >= 208 << 20, "stream \(idleSize) -> \(dirtySize) bytes")
        #expect(dirtyRate >= 16, "dirty rate \(idleRate) -> \(dirtyRate) MB/s")
        #expect(dirtyRate >= 4 * max(idleRate, 1), "dirty rate \(idleRate) -> \(dirtyRate) MB/s")

        // Stopping the memory mode brings the rate back down.
        try await ledger.dirty(mebibytes: 0)
        let stoppedRate = try await sampledDirtyRate(qmp)
        #expect(stoppedRate < dirtyRate / 4, "dirty rate \(dirtyRate) -> \(stoppedRate) MB/s after stopping")

        ledger.close()
        await qmp.close()
        await boot.qemu.stop()
    }
}

/// Stops the guest, saves it to `path` with `migrate exec:cat`, resumes it; returns the size
/// (and removes the file unless `keep`).
private func migrationStreamSize(_ qmp: QMPConnection, to path: String, keep: Bool = false) async throws -> Int {
    _ = try await qmp.execute("stop")
    _ = try await qmp.execute("migrate", arguments: ["uri": .string("exec:cat > \(path)")])
    let clock = ContinuousClock()
    let deadline = clock.now + .seconds(60)
    while true {
        let status = try await qmp.execute("query-migrate")["status"]?.stringValue
        if status == "completed" { break }
        guard status != "failed", clock.now < deadline else {
            throw QEMULabError("migration to \(path) ended \(status ?? "unknown")")
        }
        try await Task.sleep(for: .milliseconds(20))
    }
    _ = try await qmp.execute("cont")
    var info = stat()
    guard stat(path, &info) == 0 else { throw QEMULabError("no migration file \(path)") }
    if !keep { unlink(path) }
    return Int(info.st_size)
}

/// QEMU's sampled dirty-page rate over one second (calc-dirty-rate, page-sampling), MB/s.
private func sampledDirtyRate(_ qmp: QMPConnection) async throws -> Int64 {
    _ = try await qmp.execute("calc-dirty-rate", arguments: ["calc-time": 1])
    let clock = ContinuousClock()
    let deadline = clock.now + .seconds(30)
    while true {
        let reply = try await qmp.execute("query-dirty-rate")
        if reply["status"]?.stringValue == "measured", let rate = reply["dirty-rate"]?.intValue { return rate }
        guard clock.now < deadline else { throw QEMULabError("query-dirty-rate never measured: \(reply)") }
        try await Task.sleep(for: .milliseconds(50))
    }
}

/// The command line the Linux guest gets (no QEMU started).
@Suite(.timeLimit(.minutes(1)), .machine(.shared))
struct LinuxGuestArgumentsTests {
    @Test func diskAndNICAreNamedNodesAndCommasAreEscaped() async throws {
        var options = LinuxGuestOptions()
        options.dirtyMiB = 32
        let guest = try await LinuxGuest.create(
            options: options, disk: false, image: LinuxGuestImage(kernel: "/k/kernel", initrd: "/k/initrd"))
        defer { guest.remove() }

        let own = guest.arguments(hostPort: 5555, serialLog: "/tmp/a,b.log", disk: .image("/d/x,y.qcow2"))
        let joined = own.joined(separator: " ")
        #expect(joined.contains("-blockdev driver=file,filename=/d/x,,y.qcow2,node-name=disk0-file"))
        #expect(joined.contains("-blockdev driver=qcow2,file=disk0-file,node-name=disk0"))
        #expect(joined.contains("-device virtio-blk-pci,drive=disk0,id=disk0-device"))
        #expect(joined.contains("-netdev user,id=n0,hostfwd=tcp:127.0.0.1:5555-:7000"))
        #expect(joined.contains("-device virtio-net-pci,netdev=n0,romfile=,id=n0-device"))
        #expect(joined.contains("path=/tmp/a,,b.log"))
        #expect(guest.kernelCommandLine().contains("colorun.dirty=32:0"))
        #expect(!own.contains("-drive"), "disks are -blockdev nodes, so that QMP can snapshot them by name")

        // A restored standby's disk node comes from remus.restore: only the device is ours.
        let standby = guest.arguments(hostPort: 5555, serialLog: "/tmp/s.log", disk: .providedElsewhere)
        #expect(!standby.contains("-blockdev"))
        #expect(standby.contains("virtio-blk-pci,drive=disk0,id=disk0-device"))

        // A guest without a disk has no disk device either.
        let diskless = guest.arguments(hostPort: 5555, serialLog: "/tmp/s.log")
        #expect(!diskless.contains { $0.hasPrefix("virtio-blk-pci") })

        let spec = guest.spec(hostPort: 5555, serialLog: "/tmp/s.log")
        #expect(spec.accelerator == "tcg")
        #expect(spec.memoryMiB == 256)
    }
}
