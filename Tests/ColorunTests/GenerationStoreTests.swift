import ColorunTestSupport
import NIOCore
import NIOPosix
import ColorunSystem
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import Colorun

func writeFile(_ path: String, _ bytes: [UInt8]) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    close(fd)
}

let qevm: [UInt8] = [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]

@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct GenerationStoreTests {
    @Test func commitsOnlyCompleteGenerationsAndKeepsN() throws {
        let dir = makeTempDirectory()
        let store = try GenerationStore(directory: dir + "/pair", fileExtension: "devstate", keep: 2)
        #expect(try store.latest() == nil)
        for _ in 0..<3 {
            let (number, partial) = store.begin()
            writeFile(partial, qevm + [1, 2, 3])
            #expect(try store.validate(number, magic: qevm) == 11)
            try store.commit(number)
        }
        let generations = try store.generations()
        #expect(generations.map(\.number) == [2, 3])
        #expect(try store.latest()?.bytes == 11)
    }

    /// A group commit of several stores (large enough for the `syncfs` path) makes every
    /// complete generation visible and prunes each store to its `keep`; a generation whose
    /// partial file is missing fails alone and holds back none of the others.
    @Test func groupCommitAcrossStores() throws {
        let dir = makeTempDirectory()
        let a = try GenerationStore(directory: dir + "/a+b", fileExtension: "devstate", keep: 1)
        let c = try GenerationStore(directory: dir + "/c+d", fileExtension: "devstate", keep: 2)
        var items: [(store: GenerationStore, number: Int)] = []
        for store in [a, c, a, c, c] {
            let (number, partial) = store.begin()
            writeFile(partial, qevm + [UInt8(number)])
            items.append((store, number))
        }
        let (missing, _) = a.begin()  // never written
        items.append((a, missing))
        #expect(items.count > GenerationStore.syncfsGroupSize)
        let results = GenerationStore.commitAll(items)
        #expect(results.count == items.count)
        for (i, result) in results.enumerated() {
            switch result {
            case .success(let generation):
                #expect(i < 5)
                #expect(generation.number == items[i].number && generation.bytes == 9)
            case .failure(let error):
                #expect(i == 5, "\(error)")
            }
        }
        #expect(try a.generations().map(\.number) == [2])
        #expect(try c.generations().map(\.number) == [2, 3])
        #expect(a.lastGood == 2 && c.lastGood == 3)
        #expect(try GenerationStore.list(dir + "/a+b").filter { $0.hasSuffix(".partial") }.isEmpty)
    }

    /// The fleet's fencing token holds on the grouped path too: in one group of commits (large
    /// enough for `syncfs`), the generations of a pair whose owner's token went stale are
    /// refused and discarded, the other pair's are committed; the same through the session's
    /// `GroupCommitter` on a thread pool.
    @Test func aStaleFencingTokenIsRefusedInAGroupCommit() async throws {
        let dir = makeTempDirectory()
        let stale = FencingToken(token: 10, path: dir + "/a+b/fencing-token", validUntil: .now + .seconds(60))
        try stale.claim()
        let held = FencingToken(token: 7, path: dir + "/c+d/fencing-token", validUntil: .now + .seconds(60))
        try held.claim()
        let a = try GenerationStore(directory: dir + "/a+b/checkpoints/a+b", fileExtension: "devstate", keep: 5, fencing: stale)
        let c = try GenerationStore(directory: dir + "/c+d/checkpoints/c+d", fileExtension: "devstate", keep: 5, fencing: held)
        func partial(_ store: GenerationStore) -> (store: GenerationStore, number: Int) {
            let (number, path) = store.begin()
            writeFile(path, qevm + [UInt8(number)])
            return (store, number)
        }
        try a.commit(partial(a).number)
        // Another owner claims a+b with a newer token.
        try FencingToken(token: 42, path: stale.path, validUntil: .now + .seconds(60)).claim()

        let items = [a, c, a, c, c].map(partial)
        #expect(items.count >= GenerationStore.syncfsGroupSize)
        let results = GenerationStore.commitAll(items)
        for (item, result) in zip(items, results) {
            switch result {
            case .success(let generation):
                #expect(item.store === c && generation.number == item.number)
            case .failure(let error):
                #expect(item.store === a && error.description.contains("fencing token 10 is stale"), "\(error)")
            }
        }
        #expect(results.filter { (try? $0.get()) != nil }.count == 3)

        // Through the committer the sessions use.
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        let loop = group.next()
        let committer = GroupCommitter(pool: pool, eventLoop: loop)
        let queued = [a, c, a, c].map(partial)
        let outcomes = try await loop.flatSubmit {
            EventLoopFuture.whenAllComplete(queued.map { item in
                let promise = loop.makePromise(of: Generation.self)
                committer.commit(item.store, item.number) { result in
                    switch result {
                    case .success(let generation): promise.succeed(generation)
                    case .failure(let error): promise.fail(error)
                    }
                }
                return promise.futureResult
            }, on: loop)
        }.get()
        for (item, outcome) in zip(queued, outcomes) {
            switch outcome {
            case .success: #expect(item.store === c)
            case .failure(let error): #expect(item.store === a && "\(error)".contains("fencing token 10 is stale"), "\(error)")
            }
        }
        try await pool.shutdownGracefully()
        try await group.shutdownGracefully()

        #expect(try a.generations().map(\.number) == [1])
        #expect(try c.generations().count == 5)
        #expect(try GenerationStore.list(a.directory).filter { $0.hasSuffix(".partial") }.isEmpty)
    }

    @Test func rejectsTornOrForeignFiles() throws {
        let dir = makeTempDirectory()
        let store = try GenerationStore(directory: dir, fileExtension: "devstate")
        let (n1, p1) = store.begin()
        writeFile(p1, [0x51, 0x45])
        #expect(throws: GenerationStoreError.self) { try store.validate(n1, magic: qevm) }
        let (n2, p2) = store.begin()
        writeFile(p2, Array("not a state file".utf8))
        #expect(throws: GenerationStoreError.self) { try store.validate(n2, magic: qevm) }
        let (n3, _) = store.begin()
        #expect(throws: GenerationStoreError.self) { try store.validate(n3, magic: qevm) }
    }

    @Test func removesPartialsLeftByAKilledRunAndNeverReusesNumbers() throws {
        let dir = makeTempDirectory()
        do {
            let store = try GenerationStore(directory: dir, fileExtension: "devstate")
            let (n, p) = store.begin()
            writeFile(p, qevm)
            try store.commit(n)
            let (_, torn) = store.begin()
            writeFile(torn, [0x51])
        }
        let reopened = try GenerationStore(directory: dir, fileExtension: "devstate")
        #expect(reopened.removedPartials.count == 1)
        #expect(try reopened.latest()?.number == 1)
        #expect(reopened.begin().number == 2)
    }

    @Test func unwritableStateDirectoryIsAClearError() throws {
        let dir = makeTempDirectory()
        chmod(dir, 0o500)
        defer { chmod(dir, 0o700) }
        // root ignores permission bits; use a path under a file instead.
        writeFile(dir + "/file", [1])
        #expect(throws: GenerationStoreError.self) {
            try GenerationStore(directory: dir + "/file/sub", fileExtension: "devstate")
        }
    }
}

@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct StopJournalTests {
    @Test func recordsAndClearsStoppedDomains() throws {
        let dir = makeTempDirectory()
        let journal = try StopJournal(stateDirectory: dir)
        try journal.willStop(domain: "web/p 1", endpoint: "unix:/run/a.sock")
        try journal.willStop(domain: "web-s", endpoint: "tcp:127.0.0.1:4444")
        let entries = journal.entries().sorted { $0.domain < $1.domain }
        #expect(entries.map(\.domain) == ["web-s", "web/p 1"])
        #expect(entries[1].endpoint == "unix:/run/a.sock")
        #expect(entries[0].pid == getpid())
        #expect(!StopJournal.writerIsAlive(entries[0]), "our own entries are ours to recover")
        journal.didResume(domain: "web/p 1")
        #expect(journal.entries().map(\.domain) == ["web-s"])
    }

    /// The record after updates through its mapping: one 1 KiB line of JSON, `"state":"stopped"`
    /// as one run of text, `since` the time of the last update, names escaped; what a
    /// successor (another StopJournal on the same directory) reads.
    @Test func mappedRecordsReadAsJSONByASuccessor() throws {
        let dir = makeTempDirectory()
        let journal = try StopJournal(stateDirectory: dir)
        let name = "we\"b\\p é"
        for _ in 0..<3 {
            try journal.willStop(domain: name, endpoint: "unix:/run/a.sock")
            journal.didResume(domain: name)
        }
        try journal.willStop(domain: name, endpoint: "unix:/run/a.sock")
        let files = try GenerationStore.list(dir + "/journal").filter { $0.hasSuffix(".journal") }
        #expect(files.count == 1)
        let bytes = try readFile(dir + "/journal/" + files[0])
        #expect(bytes.count == StopJournal.recordSize && bytes.last == 0x0A)
        #expect(String(decoding: bytes, as: UTF8.self).contains(#""state":"stopped""#))
        let successor = try StopJournal(stateDirectory: dir)
        let entries = successor.entries()
        #expect(entries.map(\.domain) == [name] && entries.first?.endpoint == "unix:/run/a.sock")
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        #expect(abs((entries.first?.since ?? 0) - Double(now.tv_sec)) < 60, "since: \(entries.first?.since ?? 0)")
        journal.didResume(domain: name)
        #expect(successor.entries().isEmpty)
        #expect(String(decoding: try readFile(dir + "/journal/" + files[0]), as: UTF8.self).contains(#""state":"running""#))
        // A new endpoint for the same name rewrites the whole record.
        try journal.willStop(domain: name, endpoint: "tcp:10.0.0.1:4444")
        #expect(successor.entries().first?.endpoint == "tcp:10.0.0.1:4444")
        #expect(throws: GenerationStoreError.self) {
            try journal.willStop(domain: "long", endpoint: "unix:/" + String(repeating: "x", count: 2000))
        }
    }
}
