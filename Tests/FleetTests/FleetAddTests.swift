import ClusterLab
import ColorunSystem
import ColorunTestSupport
import Etcd
import Fleet
import Foundation
import NIOPosix
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `colorun fleet add --file` is all or nothing (issue 11): a file larger than one etcd
/// transaction whose late batch fails leaves nothing written, without undoing what someone
/// else wrote meanwhile. Real etcd.
@Suite("Fleet: add is all or nothing", .timeLimit(.minutes(2)))
struct FleetAddTests {
    static func declarations(_ range: Range<Int>, version: String) -> [PairDeclaration] {
        range.map {
            PairDeclaration(name: "pair\($0)", policy: "fleet-pair.lua",
                            domains: ["primary": "tcp:10.0.0.1:\(4000 + $0)", "secondary": "tcp:10.0.0.2:\(4000 + $0)"],
                            settings: ["version": version])
        }
    }

    /// The pairs declared now: name to the declaration's `version` setting.
    static func declared(_ store: FleetStore) async throws -> [String: String] {
        try await store.snapshot().declarations.mapValues { $0.settings["version"] ?? "?" }
    }

    @Test func aLateBatchFailsAndNothingIsLeftWritten() async throws {
        let etcd = try EtcdServer.start(parent: "/dev/shm")
        defer { Task { await etcd.stop() } }
        try await etcd.waitHealthy()
        let client = try EtcdClient(endpoints: etcd.clientURLs, eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
        defer { Task { await client.shutdown() } }
        let store = FleetStore(client: client)
        let other = Self.declarations(0..<300, version: "other")

        // 300 pairs: 3 transactions of 128 at most. Before the third, someone else declares
        // pair270 (in the third batch) and replaces pair3 (written by the first): the third
        // fails, the first two are undone, except pair3, which is no longer ours.
        do {
            try await store.add(Self.declarations(0..<300, version: "1")) { batch in
                guard batch == 2 else { return }
                _ = try? await client.txn(compare: [], success: [.put(key: store.pairKey("pair270"), value: other[270].jsonText),
                                                                 .put(key: store.pairKey("pair3"), value: other[3].jsonText)])
            }
            Issue.record("the add succeeded although pair270 was declared meanwhile")
        } catch {
            #expect("\(error)".contains("pair270") && "\(error)".contains("nothing was written"), "\(error)")
        }
        #expect(try await Self.declared(store) == ["pair270": "other", "pair3": "other"])

        // Up to 128 pairs: one transaction; a pair already declared refuses the whole add.
        await #expect(throws: FleetError.self) { try await store.add(Self.declarations(200..<300, version: "1")) }
        #expect(try await Self.declared(store).count == 2)

        // With --replace, a failed late batch puts back what the earlier ones replaced.
        try await store.add(Self.declarations(0..<300, version: "1"), replace: true)
        #expect(try await Self.declared(store) == Dictionary(uniqueKeysWithValues: (0..<300).map { ("pair\($0)", "1") }))
        do {
            try await store.add(Self.declarations(0..<300, version: "2"), replace: true) { batch in
                guard batch == 1 else { return }
                _ = try? await client.txn(compare: [], success: [.put(key: store.pairKey("pair200"), value: other[200].jsonText)])
            }
            Issue.record("the replace succeeded although pair200 changed meanwhile")
        } catch {
            #expect("\(error)".contains("pair200") && "\(error)".contains("nothing was written"), "\(error)")
        }
        var expected = Dictionary(uniqueKeysWithValues: (0..<300).map { ("pair\($0)", "1") })
        expected["pair200"] = "other"
        #expect(try await Self.declared(store) == expected)

        // Many batches, no interference: all written.
        try await store.add(Self.declarations(300..<700, version: "1"))
        #expect(try await Self.declared(store).count == 700)
    }
}
