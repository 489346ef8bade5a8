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
/// Each secondary gets its own block of loopback ports (NBD, the primary's chardevs), so a
/// re-protection never reuses a port a dead QEMU held a moment ago.
public final class COLOLab: @unchecked Sendable {
    /// Where the images and migration sockets live (removed with the lab).
    public let directory: String
    /// What the lab's QEMUs run.
    public let guest: COLOGuest
    let basePort: Int
    private var blocks = 0
    private var blockOf: [String: Int] = [:]
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

    public init(guest: COLOGuest = COLOGuest()) throws(QEMULabError) {
        do {
            directory = try makeTemporaryDirectory(in: QEMUSpec().runDirectoryParent, prefix: "colorun-colo")
            try RunDirectoryOwner.current().write(to: directory)
        } catch {
            throw QEMULabError("cannot create the COLO lab directory: \(error)")
        }
        self.guest = guest
        // A random block of loopback ports (20000-59999, 10 per domain).
        basePort = 20000 + Int.random(in: 0..<3900) * 10
    }

    deinit { removeTree(directory) }

    /// Whether /dev/kvm can be opened (the lab's COLO needs it).
    public static var kvmUsable: Bool {
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        if fd >= 0 { close(fd) }
        return fd >= 0
    }

    public func addresses(_ name: String) -> Addresses? {
        guard let block = blockOf[name] else { return nil }
        let port = basePort + 10 * block
        return Addresses(uri: "unix:\(directory)/\(name).mig", nbd: "127.0.0.1:\(port)", net: "127.0.0.1:\(port + 1)",
                         netdev: "127.0.0.1:\(port + 5)")
    }

    /// The QEMU of domain `name`: the primary layout for "primary", the secondary one otherwise.
    public func spec(_ name: String) throws(QEMULabError) -> QEMUSpec {
        guard COLOLab.kvmUsable else { throw QEMULabError("the COLO lab needs KVM: /dev/kvm is not usable (QEMU 7.2's COLO deadlocks under TCG)") }
        if blockOf[name] == nil {
            blockOf[name] = blocks
            blocks += 1
        }
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
        return QEMUSpec(accelerator: "kvm", memoryMiB: 64, incoming: incoming, extraArguments: arguments)
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
