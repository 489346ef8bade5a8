import ColorunTestSupport
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
}
