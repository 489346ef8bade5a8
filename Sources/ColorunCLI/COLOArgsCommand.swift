import ArgumentParser
import Colorun

/// `colorun colo-args ROLE`: the command-line fragment a QEMU needs for colo.native.* (the
/// disk layout that cannot be changed at runtime in QEMU 7.2).
struct COLOArgsCommand: ColorunSubcommand {
    static let configuration = CommandConfiguration(
        commandName: "colo-args",
        abstract: "Print the QEMU command-line fragment colo.native.* needs for ROLE (primary or secondary).",
        discussion: """
            QEMU 7.2 cannot put a quorum above a device's disk at runtime, so a COLO domain \
            must be launched COLO-shaped: on the primary the guest's disk is a quorum drive \
            with id colo-disk0; on the secondary that quorum's child is the replication chain \
            replication(secondary) -> ACTIVE -> HIDDEN -> PARENT (drive id parent0, exported \
            to the primary over NBD). ACTIVE and HIDDEN are empty qcow2 images of the disk's \
            size; PARENT starts as a copy of the primary's disk (colo.native.reprotect fills a \
            fresh one). Everything else (NBD, replication node, chardevs, filters, \
            colo-compare) colo.native adds over QMP. Replace the upper-case placeholders; keep \
            the netdev id hn0 (or pass netdev= to colo.native.start) and the same netdev type \
            on both sides (no vhost, one queue).

            Examples:
              colorun colo-args primary
              colorun colo-args secondary

            Exit codes: 0 printed; 2 bad usage.
            """
    )

    @Argument(help: ArgumentHelp("primary or secondary.", valueName: "ROLE"))
    var role: String

    func run() async throws { try await execute() }

    func execute() async throws {
        guard let fragment = COLOLayout.fragment(role: role) else {
            writeStandardError("colorun colo-args: ROLE must be primary or secondary, not '\(role)'")
            throw ExitCode(2)
        }
        writeStandardOutput(fragment + "\n")
    }
}
