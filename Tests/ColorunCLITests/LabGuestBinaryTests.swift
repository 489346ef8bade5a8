import ColorunTestSupport
import Foundation
import Testing

private let haveLinuxGuestTools =
    FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64")
    && FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img") && FileManager.default.isExecutableFile(atPath: "/bin/busybox")

/// `colorun --lab --guest linux`, as the README tells a reader to run it.
@Suite(.serialized, .timeLimit(.minutes(4)), .machine(.exclusive)) struct LabGuestBinaryTests {
    @Test func guestNeedsTheLab() async throws {
        let dir = makeTempDirectory("colorun-cli-guest")
        let policy = writePolicy("print('hi')\n", in: dir)
        let result = try await runColorun([policy, "--guest", "linux"])
        #expect(result.code == 2, "exit \(result.code)")
        #expect(result.stderr.contains("--guest linux: only with --lab"), "\(result.stderr)")
        let bad = try await runColorun([policy, "--lab", "--guest", "windows"])
        #expect(bad.code == 2 && bad.stderr.contains("--guest"), "\(bad.stderr)")
    }

    /// The README's demo: exit 0, the counts before the kill and after the failover printed,
    /// nothing lost, the filesystem clean at the standby disk's next boot.
    @Test(.enabled(if: haveLinuxGuestTools, "needs qemu-system-x86_64, qemu-img and busybox-static (scripts/setup)"))
    func remusLedgerDemoFromTheREADME() async throws {
        let examples = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("examples/remus-ledger.lua").path
        let result = try await runColorun(["--lab", "--guest", "linux", examples], timeout: 180)
        #expect(result.code == 0, "exit \(result.code)\n\(result.stderr)")
        let round = result.stderr.split(separator: "\n").first { $0.contains("round 1:") }.map(String.init) ?? ""
        #expect(round.contains("records acknowledged before the kill") && round.contains(", 0 lost"), "\(result.stderr)")
        #expect(result.stderr.contains("fsck clean"), "\(result.stderr)")
    }
}
