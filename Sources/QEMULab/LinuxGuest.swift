import ColorunSystem
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The Linux lab guest's kernel and initramfs, as scripts/build-guest made them.
public struct LinuxGuestImage: Sendable, Hashable {
    public var kernel: String
    public var initrd: String

    public init(kernel: String, initrd: String) {
        self.kernel = kernel
        self.initrd = initrd
    }

    /// The repository this file was built from (scripts/build-guest lives there).
    public static var repositoryRoot: String {
        var parts = "\(#filePath)".split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)  // Sources/QEMULab/LinuxGuest.swift
        return parts.joined(separator: "/")
    }

    /// Runs scripts/build-guest, which builds the image if its inputs changed and is quick
    /// when it is current, and returns the paths it reports. `COLORUN_GUEST_KERNEL` and
    /// `COLORUN_GUEST_INITRD`, when both are set, name a prebuilt image instead.
    public static func build(repositoryRoot: String = repositoryRoot) async throws(QEMULabError) -> LinuxGuestImage {
        if let kernel = getenv("COLORUN_GUEST_KERNEL").map({ String(cString: $0) }),
            let initrd = getenv("COLORUN_GUEST_INITRD").map({ String(cString: $0) })
        {
            return LinuxGuestImage(kernel: kernel, initrd: initrd)
        }
        let script = "\(repositoryRoot)/scripts/build-guest"
        let output = try await runTool([script], what: "scripts/build-guest")
        var kernel: String?
        var initrd: String?
        for line in output.split(separator: "\n") {
            if line.hasPrefix("kernel=") { kernel = String(line.dropFirst(7)) }
            if line.hasPrefix("initrd=") { initrd = String(line.dropFirst(7)) }
        }
        guard let kernel, let initrd else { throw QEMULabError("scripts/build-guest printed no kernel= and initrd= lines: \(output)") }
        return LinuxGuestImage(kernel: kernel, initrd: initrd)
    }
}

/// How to start the Linux lab guest. The guest (guest/README.md) boots the Debian kernel
/// under TCG with a virtio disk and a virtio NIC, formats the disk as ext4 on first boot,
/// checks it on every boot, and serves the ledger on `ledgerPort`, which QEMU's user network
/// forwards to 127.0.0.1:`hostPort`.
public struct LinuxGuestOptions: Sendable, Hashable {
    /// Guest RAM. The kernel with its initramfs needs about 100 MiB; the memory mode's
    /// `dirty` needs its share on top.
    public var memoryMiB: Int = 256
    /// Size of a disk made by `LinuxGuest.create` (ext4, formatted by the guest on first boot).
    public var diskMiB: Int = 64
    /// The `-blockdev` node name of the disk's qcow2 layer (the one to snapshot); its file
    /// layer is `<diskNodeName>-file`.
    public var diskNodeName: String = "disk0"
    /// The `-netdev` id of the NIC's backend (the one a `filter-buffer` attaches to).
    public var netdevID: String = "n0"
    /// The guest's ledger port.
    public var ledgerPort: Int = 7000
    /// Whether the guest serves the ledger (false: only the memory mode, if asked for).
    public var ledger: Bool = true
    /// Start the memory mode at boot: fill this many MiB and keep dirtying them.
    public var dirtyMiB: Int?
    /// Pages a second the memory mode writes (0: as fast as it can).
    public var dirtyPagesPerSecond: Int = 0
    /// More kernel command line.
    public var extraKernelArguments: [String] = []

    public init() {}
}

/// One Linux guest: its own directory (under `parent`) holding its qcow2 disk and the
/// serial logs of its boots. The disk outlives the boots, so a guest can be powered off and
/// booted again on it. `remove()` (or `deinit`) deletes the directory.
public final class LinuxGuest: Sendable {
    public let image: LinuxGuestImage
    public let options: LinuxGuestOptions
    public let directory: String
    /// The qcow2 disk, or nil for a guest without one.
    public let diskPath: String?
    private let boots = Mutex(0)

    private init(image: LinuxGuestImage, options: LinuxGuestOptions, directory: String, diskPath: String?) {
        self.image = image
        self.options = options
        self.directory = directory
        self.diskPath = diskPath
    }

    /// Builds (or finds) the image and makes the guest's directory and, if `disk`, an empty
    /// qcow2 disk of `options.diskMiB` MiB.
    public static func create(
        options: LinuxGuestOptions = LinuxGuestOptions(), disk: Bool = true, parent: String = "/tmp",
        image: LinuxGuestImage? = nil
    ) async throws(QEMULabError) -> LinuxGuest {
        let image = if let image { image } else { try await LinuxGuestImage.build() }
        let directory: String
        do {
            directory = try makeTemporaryDirectory(in: parent, prefix: "colorun-guest")
        } catch {
            throw QEMULabError(error.description)
        }
        var diskPath: String?
        if disk {
            let path = "\(directory)/disk.qcow2"
            do {
                try await createDisk(path, mebibytes: options.diskMiB)
            } catch {
                removeTree(directory)
                throw error
            }
            diskPath = path
        }
        return LinuxGuest(image: image, options: options, directory: directory, diskPath: diskPath)
    }

    /// Makes an empty qcow2 image with `qemu-img create`.
    public static func createDisk(_ path: String, mebibytes: Int) async throws(QEMULabError) {
        _ = try await runTool(["qemu-img", "create", "-q", "-f", "qcow2", path, "\(mebibytes)M"], what: "qemu-img create")
    }

    /// The kernel command line.
    public func kernelCommandLine() -> String {
        var line = ["console=ttyS0", "quiet", "panic=-1", "colorun.port=\(options.ledgerPort)"]
        if !options.ledger { line.append("colorun.ledger=off") }
        if let mib = options.dirtyMiB { line.append("colorun.dirty=\(mib):\(options.dirtyPagesPerSecond)") }
        return (line + options.extraKernelArguments).joined(separator: " ")
    }

    /// Which block node backs the guest's virtio disk.
    public enum DiskBackend: Sendable, Hashable {
        /// The guest's own qcow2 disk (`diskPath`).
        case own
        /// Another qcow2 image (e.g. an overlay of a restored generation).
        case image(String)
        /// Only the device: someone else adds the `-blockdev` node named `diskNodeName`
        /// (remus.restore does, on a fresh overlay over the generation's frozen disk).
        case providedElsewhere
    }

    /// QEMU arguments for this guest, to go in `QEMUSpec.extraArguments`: the kernel, the
    /// serial console into `serialLog`, the disk as `-blockdev` nodes `<diskNodeName>-file`
    /// (file) and `<diskNodeName>` (qcow2) under a virtio-blk device `<diskNodeName>-device`,
    /// and a virtio NIC `<netdevID>-device` on a user-network backend `netdevID` forwarding
    /// 127.0.0.1:`hostPort` to the ledger port. A guest made without a disk gets no disk
    /// unless `disk` names an image.
    public func arguments(hostPort: Int, serialLog: String, disk: DiskBackend = .own) -> [String] {
        var args = [
            "-no-reboot",
            "-kernel", image.kernel, "-initrd", image.initrd, "-append", kernelCommandLine(),
            "-chardev", "file,id=serial0,path=\(escapeOption(serialLog))", "-serial", "chardev:serial0",
        ]
        let node = options.diskNodeName
        let file: String?
        switch disk {
        case .own: file = diskPath
        case .image(let path): file = path
        case .providedElsewhere: file = nil
        }
        if let file {
            args += [
                "-blockdev", "driver=file,filename=\(escapeOption(file)),node-name=\(node)-file",
                "-blockdev", "driver=qcow2,file=\(node)-file,node-name=\(node)",
            ]
        }
        if file != nil || disk == .providedElsewhere {
            args += ["-device", "virtio-blk-pci,drive=\(node),id=\(node)-device"]
        }
        args += [
            "-netdev", "user,id=\(options.netdevID),hostfwd=tcp:127.0.0.1:\(hostPort)-:\(options.ledgerPort)",
            "-device", "virtio-net-pci,netdev=\(options.netdevID),romfile=,id=\(options.netdevID)-device",
        ]
        return args
    }

    /// A spec that boots this guest under TCG (never KVM: see guest/README.md).
    public func spec(hostPort: Int, serialLog: String, disk: DiskBackend = .own, base: QEMUSpec = QEMUSpec()) -> QEMUSpec {
        var spec = base
        spec.accelerator = "tcg"
        spec.memoryMiB = options.memoryMiB
        spec.extraArguments = arguments(hostPort: hostPort, serialLog: serialLog, disk: disk) + base.extraArguments
        return spec
    }

    /// Starts QEMU on this guest with a fresh host port and a fresh serial log. The boot is
    /// not waited for: see `LinuxGuestBoot.waitUntilReady`.
    public func boot(base: QEMUSpec = QEMUSpec(), disk: DiskBackend = .own) throws(QEMULabError) -> LinuxGuestBoot {
        let index = boots.withLock { count in
            count += 1
            return count
        }
        let serialLog = "\(directory)/serial-\(index).log"
        let port = try freeLocalPort()
        let startedAt = ContinuousClock.now
        let qemu = try QEMUInstance.start(spec(hostPort: port, serialLog: serialLog, disk: disk, base: base))
        return LinuxGuestBoot(qemu: qemu, hostPort: port, serialLog: serialLog, startedAt: startedAt)
    }

    /// Deletes the guest's directory (its disk and logs). Stop its boots first.
    public func remove() {
        removeTree(directory)
    }

    deinit {
        removeTree(directory)
    }
}

/// One running boot of a `LinuxGuest`: its QEMU, the host port of its ledger, its serial log.
public struct LinuxGuestBoot: Sendable {
    public let qemu: QEMUInstance
    /// 127.0.0.1 port forwarded to the guest's ledger.
    public let hostPort: Int
    public let serialLog: String
    /// When QEMU was spawned.
    public let startedAt: ContinuousClock.Instant

    /// The line the guest prints on its serial console once the ledger listens.
    public static let readyMarker = "COLORUN-GUEST READY"

    /// What the guest printed on its serial console so far.
    public func serialText() -> String {
        (try? readFile(serialLog)).map { String(decoding: $0, as: UTF8.self) } ?? ""
    }

    /// Waits until the guest prints its READY line (the ledger listens), checking the serial
    /// log every 20 ms. Returns the time from spawn to ready. Throws if QEMU exits first or
    /// `timeout` passes, with the end of the serial log and QEMU's stderr in the error.
    @discardableResult
    public func waitUntilReady(timeout: Duration = .seconds(90)) async throws(QEMULabError) -> Duration {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while true {
            if serialText().contains(Self.readyMarker) { return clock.now - startedAt }
            if let status = qemu.exitStatus {
                throw QEMULabError("the Linux guest's QEMU \(status) before it was ready\n\(diagnostics())")
            }
            if clock.now >= deadline {
                throw QEMULabError("the Linux guest was not ready after \(timeout)\n\(diagnostics())")
            }
            try? await Task.sleep(for: .milliseconds(20))
        }
    }

    /// Connects to the guest's ledger (see `LedgerClient.connect`).
    public func ledger(on group: any EventLoopGroup, timeout: Duration = .seconds(10)) async throws(LedgerError) -> LedgerClient {
        try await LedgerClient.connect(port: hostPort, on: group, timeout: timeout)
    }

    /// The last lines of the serial log and QEMU's stderr, for error messages.
    public func diagnostics() -> String {
        let serial = serialText().split(separator: "\n", omittingEmptySubsequences: false).suffix(15).joined(separator: "\n")
        return "serial console (\(serialLog)), last lines:\n\(serial)\nQEMU stderr:\n\(qemu.stderrText())"
    }
}

// MARK: - Helpers

/// A value inside a QEMU option string (`key=value,...`): commas doubled.
private func escapeOption(_ value: String) -> String {
    value.split(separator: ",", omittingEmptySubsequences: false).joined(separator: ",,")
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, read back, closed).
public func freeLocalPort() throws(QEMULabError) -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw QEMULabError("socket: \(errnoText(errno))") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = 0
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
    }
    guard bound == 0 else { throw QEMULabError("bind 127.0.0.1:0: \(errnoText(errno))") }
    let named = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    guard named == 0 else { throw QEMULabError("getsockname: \(errnoText(errno))") }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// Runs a short-lived tool to completion (an owned child: it dies with colorun); returns its
/// standard output, throws with its standard error when it fails.
private func runTool(_ commandLine: [String], what: String) async throws(QEMULabError) -> String {
    let directory: String
    do {
        directory = try makeTemporaryDirectory(prefix: "colorun-tool")
    } catch {
        throw QEMULabError("cannot run \(what): \(error)")
    }
    defer { removeTree(directory) }
    let stdoutPath = "\(directory)/stdout"
    let stderrPath = "\(directory)/stderr"
    let pid: pid_t
    do {
        pid = try spawnChild(commandLine, lifetime: .owned, standardOutput: .appendingTo(stdoutPath), standardError: .appendingTo(stderrPath))
    } catch {
        throw QEMULabError("cannot run \(what): \(error)")
    }
    var status: ChildExitStatus?
    while true {
        status = reapChild(pid, blocking: false)
        if status != nil { break }
        // Polls for the end of the child, as QEMUInstance.waitForExit does.
        try? await Task.sleep(for: .milliseconds(10))
    }
    func text(_ path: String) -> String {
        (try? readFile(path)).map { String(decoding: $0, as: UTF8.self) } ?? ""
    }
    guard status == .exited(code: 0) else {
        throw QEMULabError("\(what) \(status!): \(text(stderrPath))")
    }
    return text(stdoutPath)
}
