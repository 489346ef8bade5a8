import ColorunSystem
import JSON
import QEMULab

#if canImport(Glibc)
import Glibc
#endif

/// The lab's COLO-shaped QEMUs (`colorun --lab --guest colo`): KVM (QEMU 7.2's COLO deadlocks
/// under TCG), `COLOGuest` as the firmware (it counts, and sends frames if asked), a quorum disk made with `qemu-img`, and an
/// ISA NE2000 on a `-netdev socket` listening on loopback (the same netdev type on both sides,
/// as COLO needs). `primary` has the primary layout; `secondary` and every secondary made
/// later (`lab.colo_secondary`) the secondary layout, waiting on `-incoming unix:...`.
///
/// Each domain gets its own block of loopback ports that were free when it started (NBD, the
/// primary's chardevs, its netdev), so a re-protection never reuses a port a dead QEMU held
/// a moment ago.
public final class COLOLab: @unchecked Sendable {
    /// Where the images and migration sockets live (removed with the lab).
    public let directory: String
    /// What the lab's QEMUs run.
    public let guest: COLOGuest
    /// Each QEMU's RAM.
    public let memoryMiB: Int
    /// Each domain's block of 6 loopback ports (NBD, the four chardev ports, its netdev).
    private var portsOf: [String: Int] = [:]
    /// The disk size of every image.
    static let diskMiB = 16

    /// The addresses `colo.native.start`/`reprotect` need to use `name` as the secondary.
    public struct Addresses: Sendable {
        public var uri: String
        public var nbd: String
        public var net: String
        /// Where the domain's own netdev listens (a test connects there to see its packets).
        public var netdev: String
    }

    public init(guest: COLOGuest = COLOGuest(), memoryMiB: Int = 64) throws(QEMULabError) {
        do {
            directory = try makeTemporaryDirectory(in: QEMUSpec().runDirectoryParent, prefix: "colorun-colo")
            try RunDirectoryOwner.current().write(to: directory)
        } catch {
            throw QEMULabError("cannot create the COLO lab directory: \(error)")
        }
        self.guest = guest
        self.memoryMiB = memoryMiB
    }

    /// A block of 6 consecutive loopback ports that were free a moment ago, below Linux's
    /// ephemeral range (32768 and up), so that no outgoing connection of another program
    /// takes one meanwhile.
    static func freePortBlock() -> Int {
        for _ in 0..<200 {
            let base = 10000 + Int.random(in: 0..<2270) * 10
            if (base..<(base + 6)).allSatisfy(portFree) { return base }
        }
        return 10000 + Int.random(in: 0..<2270) * 10
    }

    private static func portFree(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
    }

    deinit { removeTree(directory) }

    /// Whether /dev/kvm can be opened (the lab's COLO needs it).
    public static var kvmUsable: Bool {
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        if fd >= 0 { close(fd) }
        return fd >= 0
    }

    public func addresses(_ name: String) -> Addresses? {
        guard let port = portsOf[name] else { return nil }
        return Addresses(uri: "unix:\(directory)/\(name).mig", nbd: "127.0.0.1:\(port)", net: "127.0.0.1:\(port + 1)",
                         netdev: "127.0.0.1:\(port + 5)")
    }

    /// The QEMU of domain `name`: the primary layout for "primary", the secondary one otherwise.
    public func spec(_ name: String) throws(QEMULabError) -> QEMUSpec {
        guard COLOLab.kvmUsable else { throw QEMULabError("the COLO lab needs KVM: /dev/kvm is not usable (QEMU 7.2's COLO deadlocks under TCG)") }
        if portsOf[name] == nil { portsOf[name] = Self.freePortBlock() }
        let addresses = addresses(name)!
        let firmware = "\(directory)/guest.bin"
        if access(firmware, F_OK) != 0 {
            do { try writeFile(firmware, guest.firmware) } catch { throw QEMULabError("\(error)") }
        }
        var arguments = ["-bios", firmware]
        arguments += COLOLayout.network(netdev: "socket,listen=\(addresses.netdev)")
        var incoming: String?
        if name == "primary" {
            let image = "\(directory)/\(name).qcow2"
            try makeImage(image)
            arguments += COLOLayout.primaryDrive(image: image)
        } else {
            let images = COLOLayout.SecondaryImages(parent: "\(directory)/\(name)-parent.qcow2",
                                                    active: "\(directory)/\(name)-active.qcow2",
                                                    hidden: "\(directory)/\(name)-hidden.qcow2")
            for image in [images.parent, images.active, images.hidden] { try makeImage(image) }
            arguments += COLOLayout.secondaryDrives(images)
            incoming = addresses.uri
        }
        return QEMUSpec(accelerator: "kvm", memoryMiB: memoryMiB, incoming: incoming, extraArguments: arguments)
    }

    /// An empty qcow2 image (`qemu-img create`).
    private func makeImage(_ path: String) throws(QEMULabError) {
        let stderrPath = path + ".qemu-img.err"
        do {
            let pid = try spawnChild(["qemu-img", "create", "-q", "-f", "qcow2", path, "\(Self.diskMiB)M"],
                                     lifetime: .owned, standardError: .appendingTo(stderrPath))
            let status = reapChild(pid, blocking: true)
            guard status == .exited(code: 0) else {
                let message = (try? readFile(stderrPath)).map { String(decoding: $0, as: UTF8.self) } ?? ""
                throw QEMULabError("qemu-img create \(path): \(status.map { "\($0)" } ?? "?"): \(message)")
            }
        } catch let error as QEMULabError {
            throw error
        } catch {
            throw QEMULabError("qemu-img create \(path): \(error)")
        }
    }

    /// The addresses as a Lua table.
    func json(_ name: String) -> JSONValue {
        guard let a = addresses(name) else { return .null }
        return ["uri": .string(a.uri), "nbd": .string(a.nbd), "net": .string(a.net), "netdev": .string(a.netdev)]
    }
}
