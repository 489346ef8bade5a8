/// The command-line layout QEMU 7.2's COLO needs and that cannot be changed at runtime: the
/// guest's disk is a quorum node on both sides, and on the secondary that quorum's one child
/// is the replication chain (replication(secondary) -> active -> hidden -> parent). The
/// names here are the ones `colo.native.*` uses over QMP (docs/lua-api.md, "Native COLO").
///
/// `colorun colo-args` prints these fragments; the lab (`--lab --guest colo`) launches its
/// QEMUs with them; `colo.native.check` verifies a running QEMU against them.
public enum COLOLayout {
    /// The guest disk's drive id (a quorum node) on both sides.
    public static let disk = "colo-disk0"
    /// The secondary's base image, exported over NBD to the primary's replication node.
    public static let parent = "parent0"
    /// The secondary's replication node (mode=secondary) under the quorum.
    public static let replication = "childs0"
    /// The default netdev id the network filters attach to.
    public static let netdev = "hn0"

    /// The images of a secondary: parent (same size and content as the primary's disk at
    /// the start), active and hidden (empty qcow2 images of the same size).
    public struct SecondaryImages: Sendable, Hashable {
        public var parent: String
        public var active: String
        public var hidden: String
        public init(parent: String, active: String, hidden: String) {
            self.parent = parent
            self.active = active
            self.hidden = hidden
        }
    }

    /// The primary's disk: `-drive if=ide,id=colo-disk0,driver=quorum,...` over `image`.
    public static func primaryDrive(image: String, format: String = "qcow2") -> [String] {
        ["-drive", "if=ide,id=\(disk),driver=quorum,read-pattern=fifo,vote-threshold=1,"
            + "children.0.file.filename=\(escaped(image)),children.0.driver=\(format)"]
    }

    /// The secondary's disk chain: parent, replication(secondary) over active -> hidden ->
    /// parent, and the quorum the guest's device uses.
    public static func secondaryDrives(_ images: SecondaryImages, format: String = "qcow2") -> [String] {
        [
            "-drive", "if=none,id=\(parent),driver=\(format),file.filename=\(escaped(images.parent))",
            "-drive", "if=none,id=\(replication),driver=replication,mode=secondary,top-id=\(disk),"
                + "file.driver=qcow2,file.file.filename=\(escaped(images.active)),"
                + "file.backing.driver=qcow2,file.backing.file.filename=\(escaped(images.hidden)),"
                + "file.backing.backing=\(parent)",
            "-drive", "if=ide,id=\(disk),driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=\(replication)",
        ]
    }

    /// The NIC both sides need: the same netdev type on both (a `user` netdev on one side and
    /// `socket` on the other breaks the migration stream), no vhost, one queue.
    public static func network(netdev backend: String, device: String = "ne2k_isa") -> [String] {
        ["-netdev", "\(backend),id=\(netdev)", "-device", "\(device),netdev=\(netdev)"]
    }

    /// What `colorun colo-args ROLE` prints: the fragment with placeholders, one option a line.
    public static func fragment(role: String) -> String? {
        let net = network(netdev: "tap,vhost=off,helper=/usr/lib/qemu/qemu-bridge-helper", device: "virtio-net-pci")
        let lines: [String]
        switch role {
        case "primary":
            lines = ["-accel kvm"] + pairs(net + primaryDrive(image: "PRIMARY.qcow2"))
        case "secondary":
            lines = ["-accel kvm"] + pairs(net + secondaryDrives(SecondaryImages(
                parent: "PARENT.qcow2", active: "ACTIVE.qcow2", hidden: "HIDDEN.qcow2"))) + ["-incoming tcp:0.0.0.0:PORT"]
        default:
            return nil
        }
        return lines.joined(separator: " \\\n  ")
    }

    private static func pairs(_ arguments: [String]) -> [String] {
        stride(from: 0, to: arguments.count, by: 2).map { "\(arguments[$0]) \(arguments[$0 + 1])" }
    }

    /// QEMU's option syntax doubles a comma inside a value.
    static func escaped(_ path: String) -> String {
        path.split(separator: ",", omittingEmptySubsequences: false).joined(separator: ",,")
    }
}
