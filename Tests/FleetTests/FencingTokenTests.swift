@testable import Colorun
import ColorunSystem
import ColorunTestSupport
import Testing

/// The generation store refuses a commit with a stale or lapsed fencing token.
@Suite("Fencing tokens in the generation store", .timeLimit(.minutes(1)))
struct FencingTokenTests {
    func writePartial(_ store: GenerationStore) throws -> Int {
        let (number, partial) = store.begin()
        try writeFile(partial, Array("QEVM and the rest".utf8))
        return number
    }

    @Test func aStaleOrLapsedTokenCannotCommit() throws {
        let dir = TempDir("fencing")
        defer { dir.cleanup() }
        let tokenPath = dir.file("fencing-token")
        let old = FencingToken(token: 10, path: tokenPath, validUntil: .now + .seconds(60))
        try old.claim()
        let store = try GenerationStore(directory: dir.file("checkpoints/p+s"), fileExtension: "devstate", keep: 3, fencing: old)
        _ = try store.commit(try writePartial(store))
        #expect(try store.generations().count == 1)

        // A new owner claims the pair with a higher token: the old owner's commit is refused.
        let new = FencingToken(token: 42, path: tokenPath, validUntil: .now + .seconds(60))
        try new.claim()
        #expect(FencingToken.recorded(at: tokenPath) == 42)
        let refused = try writePartial(store)
        #expect(throws: GenerationStoreError.self) { try store.commit(refused) }
        do { _ = try store.commit(try writePartial(store)) } catch { #expect("\(error)".contains("fencing token 10 is stale")) }
        #expect(try store.generations().count == 1)
        // ...and the old token cannot be claimed again.
        #expect(throws: SystemError.self) { try old.claim() }

        // The new owner commits; then its lease lapses locally: refused; extended: allowed.
        let lapsing = FencingToken(token: 42, path: tokenPath, validUntil: .now - .milliseconds(1))
        let newStore = try GenerationStore(directory: dir.file("checkpoints/p+s"), fileExtension: "devstate", keep: 3, fencing: lapsing)
        #expect(throws: GenerationStoreError.self) { try newStore.commit(try writePartial(newStore)) }
        lapsing.extend(until: .now + .seconds(60))
        _ = try newStore.commit(try writePartial(newStore))
        #expect(try newStore.generations().count == 2)
        lapsing.revoke("released for rebalance")
        do { _ = try newStore.commit(try writePartial(newStore)) } catch { #expect("\(error)".contains("given up: released for rebalance")) }
        #expect(try newStore.generations().count == 2)
    }
}
