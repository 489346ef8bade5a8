import ColorunSystem
import ColorunTestSupport
import Foundation
import QEMULab
import Synchronization
import Testing
@testable import Colorun

#if canImport(Glibc)
import Glibc
#endif

/// Whether a Linux guest boots under this machine's KVM, and why not: the lab's Linux guest
/// is booted under KVM with a short deadline and must print its READY line. On this project's
/// machines KVM is nested (the host's kvm-pvm) and the kernel stops right after it starts
/// (QEMU reports `KVM internal error`, or nothing more happens), so the answer is no.
///
/// The answer is cached in /tmp, keyed by the host kernel, the QEMU binary and the guest's
/// kernel, so that a machine pays for the probe once (at most `deadline`).
enum LinuxUnderKVM {
    static let deadline: Duration = .seconds(10)

    static func probe() async -> (usable: Bool, why: String) {
        guard COLOLab.kvmUsable else { return (false, "/dev/kvm is not usable") }
        let image: LinuxGuestImage
        do {
            image = try await LinuxGuestImage.build()
        } catch {
            return (false, "the Linux guest image cannot be built: \(error)")
        }
        var names = utsname()
        uname(&names)
        let release = withUnsafeBytes(of: names.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        var info = stat()
        let qemu = stat("/usr/bin/qemu-system-x86_64", &info) == 0 ? "\(info.st_mtim.tv_sec)" : "?"
        let key = "\(release)|\(qemu)|\(image.kernel)"
        let cache = "/tmp/colorun-linux-kvm-probe-\(getuid())"
        if let text = try? String(contentsOfFile: cache, encoding: .utf8) {
            let lines = text.split(separator: "\n", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
            if lines.count == 3, lines[0] == key { return (lines[1] == "usable", lines[2] + " (cached in \(cache))") }
        }
        let result = await boot(image)
        try? "\(key)\n\(result.usable ? "usable" : "not usable")\n\(result.why)".write(toFile: cache, atomically: true, encoding: .utf8)
        return result
    }

    private static func boot(_ image: LinuxGuestImage) async -> (usable: Bool, why: String) {
        let guest: LinuxGuest
        do {
            var options = LinuxGuestOptions()
            options.memoryMiB = 128
            guest = try await LinuxGuest.create(options: options, disk: false, image: image)
        } catch {
            return (false, "cannot create the Linux guest: \(error)")
        }
        defer { guest.remove() }
        let serialLog = "\(guest.directory)/probe.log"
        var spec = guest.spec(hostPort: (try? freeLocalPort()) ?? 0, serialLog: serialLog)
        spec.accelerator = "kvm"
        let qemu: QEMUInstance
        do {
            qemu = try QEMUInstance.start(spec)
        } catch {
            return (false, "cannot start QEMU: \(error)")
        }
        defer { qemu.kill(SIGKILL) }
        let clock = ContinuousClock()
        let started = clock.now
        while clock.now - started < deadline {
            let serial = (try? readFile(serialLog)).map { String(decoding: $0, as: UTF8.self) } ?? ""
            if serial.contains(LinuxGuestBoot.readyMarker) { return (true, "a Linux guest booted under KVM in \(clock.now - started)") }
            let stderr = qemu.stderrText()
            if stderr.contains("KVM internal error") || qemu.exitStatus != nil {
                let line = stderr.split(separator: "\n").first { $0.contains("error") }.map(String.init) ?? "QEMU exited"
                return (false, "a Linux kernel does not boot under this KVM (\(line); nested kvm-pvm?)")
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return (false, "a Linux kernel does not boot under this KVM: no READY line within \(deadline) (nested kvm-pvm hangs it after it starts)")
    }
}

/// A TCP client of the guest's ledger on a bridge address, line by line, blocking with a
/// deadline (SO_RCVTIMEO).
final class BridgeLedger: Sendable {
    let fd: Int32
    init(host: String, port: UInt16, timeout: Int = 20) throws {
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = port.bigEndian
        inet_pton(AF_INET, host, &sa.sin_addr)
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var tv = timeval(tv_sec: timeout, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let r = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard r == 0 else {
            Glibc.close(fd)
            throw QEMULabError("cannot connect to \(host):\(port): \(String(cString: strerror(errno)))")
        }
    }

    /// Sends one line and returns the reply line (without the newline).
    func request(_ line: String) throws -> String {
        let bytes = Array((line + "\n").utf8)
        guard send(fd, bytes, bytes.count, Int32(MSG_NOSIGNAL)) == bytes.count else { throw QEMULabError("send: \(String(cString: strerror(errno)))") }
        var reply: [UInt8] = []
        var byte: UInt8 = 0
        while byte != 10 {
            let n = recv(fd, &byte, 1, 0)
            guard n == 1 else { throw QEMULabError("the connection ended or timed out waiting for the reply to '\(line)' (\(String(cString: strerror(errno))))") }
            if byte != 10 { reply.append(byte) }
        }
        return String(decoding: reply, as: UTF8.self)
    }

    func close() { Glibc.close(fd) }
}

@Suite(.serialized, .timeLimit(.minutes(3)), .machine(.exclusive)) struct NativeCOLOLinuxTests {
    /// Client-transparent failover (issue 13): a Linux guest under native COLO, both QEMUs on
    /// taps of one bridge (the same guest MAC: the secondary's output goes to the primary's
    /// colo-compare until a failover), a client on the bridge holding one TCP connection to the
    /// guest's ledger. A record is acknowledged, the primary is SIGKILLed, the secondary is
    /// promoted, and the same connection carries the next record and finds both.
    ///
    /// Needs a KVM that boots Linux, and root (the bridge and taps); skips, saying why, where
    /// either is missing (on this project's nested-KVM machines: always).
    @Test func tcpConnectionSurvivesThePrimarysDeath() async throws {
        let probe = await LinuxUnderKVM.probe()
        guard probe.usable else {
            print("SKIP client-transparent native COLO failover: \(probe.why)")
            return
        }
        guard getuid() == 0 else {
            print("SKIP client-transparent native COLO failover: needs root for the bridge and taps")
            return
        }
        let tag = String(getpid() % 100000)
        let bridge = "cobr\(tag)", tapP = "copt\(tag)", tapS = "cost\(tag)"
        func ip(_ arguments: [String]) throws {
            let pid = try spawnChild(["ip"] + arguments, lifetime: .owned)
            guard reapChild(pid, blocking: true) == .exited(code: 0) else { throw QEMULabError("ip \(arguments.joined(separator: " ")) failed") }
        }
        defer {
            for name in [tapP, tapS, bridge] { try? ip(["link", "del", name]) }
        }
        try ip(["link", "add", bridge, "type", "bridge"])
        try ip(["addr", "add", "10.0.2.2/24", "dev", bridge])
        try ip(["link", "set", bridge, "up"])
        for tap in [tapP, tapS] {
            try ip(["tuntap", "add", "dev", tap, "mode", "tap"])
            try ip(["link", "set", tap, "master", bridge])
            try ip(["link", "set", tap, "up"])
        }

        var options = LinuxGuestOptions()
        options.memoryMiB = 256
        let guest = try await LinuxGuest.create(options: options, disk: false)
        defer { guest.remove() }
        let colo = try COLOLab()
        func arguments(tap: String, serial: String) -> [String] {
            ["-no-reboot", "-kernel", guest.image.kernel, "-initrd", guest.image.initrd, "-append", guest.kernelCommandLine(),
             "-chardev", "file,id=serial0,path=\(serial)", "-serial", "chardev:serial0"]
                + COLOLayout.network(netdev: "tap,ifname=\(tap),script=no,downscript=no,vhost=off", device: "virtio-net-pci")
                + ["-global", "virtio-net-pci.romfile=", "-global", "virtio-net-pci.mac=52:54:00:12:34:56"]
        }
        let primarySpecs = try colo.spec("primary")
        let secondarySpecs = try colo.spec("secondary")
        // The lab's specs give the COLO disk layout and addresses; the guest and NIC are Linux's.
        func linuxSpec(_ base: QEMUSpec, tap: String, serial: String) -> QEMUSpec {
            var spec = base
            spec.memoryMiB = options.memoryMiB
            var extra: [String] = []
            var i = 0
            while i < base.extraArguments.count {
                let option = base.extraArguments[i]
                if ["-bios", "-netdev", "-device"].contains(option) { i += 2; continue }
                extra += [option, base.extraArguments[i + 1]]
                i += 2
            }
            spec.extraArguments = extra + arguments(tap: tap, serial: serial)
            return spec
        }
        let primary = try QEMUInstance.start(linuxSpec(primarySpecs, tap: tapP, serial: "\(guest.directory)/primary.log"))
        defer { primary.kill(SIGKILL) }
        let readyBy = ContinuousClock.now + .seconds(60)
        while !((try? readFile("\(guest.directory)/primary.log")).map { String(decoding: $0, as: UTF8.self) } ?? "").contains(LinuxGuestBoot.readyMarker) {
            guard ContinuousClock.now < readyBy, primary.exitStatus == nil else { throw QEMULabError("the primary's Linux guest did not get ready\n\(primary.stderrText())") }
            try await Task.sleep(for: .milliseconds(50))
        }
        let secondary = try QEMUInstance.start(linuxSpec(secondarySpecs, tap: tapS, serial: "\(guest.directory)/secondary.log"))
        defer { secondary.kill(SIGKILL) }
        let client = Mutex<BridgeLedger?>(nil)
        let replies = Mutex<[String]>([])
        @Sendable func ask(_ line: String) throws {
            guard let c = client.withLock({ $0 }) else { throw QEMULabError("no client") }
            let reply = try c.request(line)
            replies.withLock { $0.append(reply) }
        }
        let a = colo.addresses("secondary")!
        let ledgerPort = UInt16(options.ledgerPort)
        let run = try await runPolicy(#"""
            local p, s = domain.get("primary"), domain.get("secondary")
            colo.native.start(p, s, {uri = "\#(a.uri)", nbd = "\#(a.nbd)", net = "\#(a.net)", delay = "200ms"})
            test.connect()
            test.first()
            colo.native.checkpoint(p)
            local lost = false
            local w = policy.on_lost(p, function() lost = true end, {heartbeat = "50ms", timeout = "1s"})
            test.kill()
            while not lost do sleep("5ms") end
            w.cancel()
            local f = colo.native.failover(s)
            log.info("failover", {running_ms = f.running_ms, ms = f.ms})
            test.second()
            policy.stop()
            """#, domains: [("primary", "unix:\(primary.qmpSocketPath)"), ("secondary", "unix:\(secondary.qmpSocketPath)")], hooks: [
                "connect": { let c = try BridgeLedger(host: "10.0.2.15", port: ledgerPort); client.withLock { $0 = c } },
                "first": { try ask("record 1 before") },
                "kill": { primary.kill(SIGKILL) },
                "second": { try ask("record 2 after"); try ask("count") },
            ], configure: coloTimeouts)
        client.withLock { $0?.close() }
        guard case .stopped = run.report.outcome else {
            Issue.record("\(run.report.outcome)\n\(run.logs.text)")
            return
        }
        let got = replies.withLock { $0 }
        #expect(got.first == "ack 1", "\(got)")
        #expect(got.dropFirst().first == "ack 2", "the same TCP connection answers after the failover: \(got)")
        #expect(got.last == "count 2 0", "both records are in the promoted secondary's ledger: \(got)")
    }
}
