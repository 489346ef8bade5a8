import ColorunTestSupport
import NIOCore
import NIOPosix
import ColorunSystem
import Synchronization
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

/// The newest whole index record in a store's directory, as a reader after a crash finds it.
func diskRecord(_ directory: String) -> (record: GenerationIndex.Record, place: Int)? {
    let fd = open(directory + "/" + GenerationIndex.fileName, O_RDONLY)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    return GenerationIndex.read(fd)
}

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

    /// A staged store (`--runtime-dir`): QEMU saves into the staging directory; the commit
    /// copies the state byte for byte into a slot file of the state directory (a shorter
    /// state than the slot's last one is cut to its length) and lists it in the index. A
    /// slot is written only while the newest record on disk does not list it, so a crash
    /// at any point leaves every listed slot whole; three slot files serve keep = 2 (no new
    /// inode, no rename per generation). Each slot has one staged file in staging too, which
    /// QEMU saves into again and the commit empties once copied.
    @Test func stagedGenerationsAreWrittenInPlaceIntoSlotsNoDurableRecordLists() throws {
        let dir = makeTempDirectory()
        let state = dir + "/state/pair"
        let store = try GenerationStore(directory: state, fileExtension: "devstate", keep: 2, staging: dir + "/staging/pair")
        var content: [Int: [UInt8]] = [:]
        var inodes: Set<UInt64> = []
        for round in 1...8 {
            let (number, path) = store.begin()
            // The slot it will be written into is not one the record on disk lists.
            let slotPath = store.path(of: number)
            #expect(path == store.savePath(number) && path == dir + "/staging/pair/" + slotPath.split(separator: "/").last!)
            let onDisk = diskRecord(state)?.record.entries ?? []
            #expect(slotPath.hasPrefix(state + "/slot-") && !onDisk.contains { store.slotPath($0.slot) == slotPath }, "round \(round)")
            // Sizes grow and shrink: 4,000 bytes, then 100, then 4,000 ...
            let bytes = qevm + [UInt8](repeating: UInt8(round), count: round % 2 == 1 ? 4_000 : 100)
            writeFile(path, bytes)
            #expect(try store.validate(number, magic: qevm) == bytes.count)
            let generation = try store.commit(number)
            #expect(generation.path == slotPath && generation.bytes == bytes.count)
            #expect(try readFile(slotPath) == bytes)
            var info = stat()
            #expect(stat(generation.path, &info) == 0)
            inodes.insert(UInt64(info.st_ino))
            content[number] = bytes
            #expect(try readFile(path).isEmpty, "the staged file is emptied once committed")
            #expect(diskRecord(state)?.record.entries.map(\.generation) == Array(max(1, number - 1)...number))
        }
        #expect(inodes.count == 3, "keep = 2 cycles through three slot files")
        #expect(try store.generations().map(\.number) == [7, 8])
        for generation in try store.generations() {
            #expect(try readFile(generation.path) == content[generation.number], "generation \(generation.number) on disk")
        }
        #expect(try GenerationStore.list(dir + "/staging/pair").sorted() == ["slot-0.devstate", "slot-1.devstate", "slot-2.devstate"])
        #expect(try GenerationStore.list(state).sorted() == ["generations.index", "slot-0.devstate", "slot-1.devstate", "slot-2.devstate"])
        // A killed run's staged files are removed on open; the slots and index stay.
        let (_, tornPath) = store.begin()
        writeFile(tornPath, [0x51])
        let reopened = try GenerationStore(directory: state, fileExtension: "devstate", keep: 2, staging: dir + "/staging/pair")
        #expect(try GenerationStore.list(dir + "/staging/pair").isEmpty)
        #expect(try reopened.generations().map(\.number) == [7, 8])
        #expect(reopened.lastGood == 8)
        // A generation that is not committed leaves nothing behind and gives its slot back.
        let (dropped, droppedPath) = reopened.begin()
        let droppedSlot = reopened.path(of: dropped)
        writeFile(droppedPath, qevm)
        reopened.discard(dropped)
        #expect(try GenerationStore.list(dir + "/staging/pair").isEmpty)
        let (next, _) = reopened.begin()
        #expect(next == dropped + 1 && reopened.path(of: next) == droppedSlot)
    }

    /// The index's two places: a record torn by a crash (here: one byte of the newest
    /// changed) is passed over for the other, whose slots are whole (they were not written
    /// while it was the newest); a slot whose bytes no longer match its entry is not listed,
    /// and is not written again until a record without it is durable.
    @Test func aTornIndexRecordFallsBackToTheOtherAndABadSlotIsNeverListed() throws {
        let dir = makeTempDirectory()
        let state = dir + "/state/pair"
        let staging = dir + "/staging/pair"
        let store = try GenerationStore(directory: state, fileExtension: "devstate", keep: 2, staging: staging)
        for round in 1...6 {
            let (number, path) = store.begin()
            writeFile(path, qevm + [UInt8(round)])
            try store.commit(number)
        }
        let newest = try #require(diskRecord(state))
        #expect(newest.record.entries.map(\.generation) == [5, 6])
        // Tear the newest record: the older one (generations 4 and 5) is what the disk says.
        let fd = open(state + "/" + GenerationIndex.fileName, O_RDWR)
        var byte: UInt8 = 0
        let at = off_t(newest.place * GenerationIndex.placeSize + GenerationIndex.headerSize + 3)
        _ = pread(fd, &byte, 1, at)
        byte ^= 0xFF
        _ = pwrite(fd, &byte, 1, at)
        close(fd)
        let fallen = try GenerationStore(directory: state, fileExtension: "devstate", keep: 2, staging: staging)
        #expect(try fallen.generations().map(\.number) == [4, 5])
        for generation in try fallen.generations() {
            #expect(try readFile(generation.path) == qevm + [UInt8(generation.number)])
        }
        // Corrupt generation 5's slot: only 4 is listed; 5's slot stays out of use.
        let five = try #require(try fallen.generations().last)
        writeFile(five.path, qevm + [0xEE])
        let checked = try GenerationStore(directory: state, fileExtension: "devstate", keep: 2, staging: staging)
        #expect(try checked.generations().map(\.number) == [4])
        #expect(checked.lastGood == 4)
        let (number, path) = checked.begin()
        #expect(number == 6 && checked.path(of: number) != five.path)
        writeFile(path, qevm + [6])
        try checked.commit(number)
        #expect(try checked.generations().map(\.number) == [4, 6])
        #expect(try readFile(checked.path(of: number)) == qevm + [6])
    }

    /// A directory written by both kinds of run: named generations of a run without
    /// `--runtime-dir` and slot generations of one with it are one series, pruned oldest
    /// first whichever their kind.
    @Test func namedAndSlotGenerationsAreOneSeries() throws {
        let dir = makeTempDirectory()
        let state = dir + "/state/pair"
        let named = try GenerationStore(directory: state, fileExtension: "devstate", keep: 3)
        for _ in 1...2 {
            let (number, path) = named.begin()
            writeFile(path, qevm + [UInt8(number)])
            try named.commit(number)
        }
        let staged = try GenerationStore(directory: state, fileExtension: "devstate", keep: 3, staging: dir + "/staging/pair")
        #expect(staged.lastGood == 2)
        for _ in 1...2 {
            let (number, path) = staged.begin()
            writeFile(path, qevm + [UInt8(number)])
            try staged.commit(number)
        }
        #expect(try staged.generations().map(\.number) == [2, 3, 4])
        #expect(access(state + "/gen-00000001.devstate", F_OK) != 0, "the oldest named generation is pruned")
        // And back: a run without the runtime directory prunes slot generations through the index.
        let again = try GenerationStore(directory: state, fileExtension: "devstate", keep: 3)
        for _ in 1...2 {
            let (number, path) = again.begin()
            writeFile(path, qevm + [UInt8(number)])
            try again.commit(number)
        }
        #expect(try again.generations().map(\.number) == [4, 5, 6])
        #expect(diskRecord(state)?.record.entries.map(\.generation) == [4])
        for generation in try again.generations() {
            #expect(try readFile(generation.path) == qevm + [UInt8(generation.number)])
        }
    }

    /// The record's encoding round-trips and its CRC catches a change anywhere in it.
    @Test func indexRecordsRoundTripAndRejectAnyChangedByte() {
        let record = GenerationIndex.Record(sequence: 41, entries: [
            GenerationIndex.Entry(generation: 7, slot: 2, bytes: 2_048, checksum: 0xDEAD_BEEF),
            GenerationIndex.Entry(generation: 8, slot: 0, bytes: 1 << 33, checksum: 1),
        ])
        let bytes = GenerationIndex.encode(record)
        #expect(bytes.count == GenerationIndex.headerSize + 2 * GenerationIndex.entrySize + 4)
        #expect(bytes.withUnsafeBytes { GenerationIndex.decode($0) } == record)
        for i in bytes.indices {
            var changed = bytes
            changed[i] ^= 0x20
            #expect(changed.withUnsafeBytes { GenerationIndex.decode($0) } == nil, "byte \(i)")
        }
        #expect(crc32c(Array("123456789".utf8)) == 0xE306_9283, "the CRC-32C check value")
    }

    /// A group commit (the `syncfs` path) of staged stores: each generation lands whole in
    /// its own state directory; one whose staged file is missing fails alone.
    /// A rename whose directory fsync fails (a failing disk) is not reported committed: the
    /// name may not survive a crash. The file is in place and listed, nothing older is pruned
    /// for it, and the next good commit goes on from it.
    @Test func aGenerationWhoseDirectoryFsyncFailsIsNotReportedCommitted() throws {
        final class Failing: Sendable { let on = Atomic<Bool>(false) }
        let failing = Failing()
        let dir = makeTempDirectory()
        let store = try GenerationStore(directory: dir + "/pair", fileExtension: "devstate", keep: 1,
                                        directorySync: { fd in !failing.on.load(ordering: .relaxed) && fsync(fd) == 0 })
        func saved() -> Int {
            let (number, path) = store.begin()
            writeFile(path, qevm + [UInt8(number)])
            return number
        }
        try store.commit(saved())
        failing.on.store(true, ordering: .relaxed)
        let second = saved()
        do {
            try store.commit(second)
            Issue.record("a generation whose name is not durable was reported committed")
        } catch {
            #expect(error.reason.contains("directory's fsync failed") && error.path == store.finalPath(second), "\(error)")
        }
        #expect(try store.generations().map(\.number) == [1, 2], "in place, and generation 1 not pruned for it")
        failing.on.store(false, ordering: .relaxed)
        #expect(try store.commit(saved()).number == 3)
        #expect(try store.generations().map(\.number) == [3])

        // A staged series: its first commit makes the index, whose name needs the directory's
        // fsync. That failing, the generation is not reported committed, nor counted as the
        // last good one; the next commit records only itself.
        failing.on.store(true, ordering: .relaxed)
        let staged = try GenerationStore(directory: dir + "/staged", fileExtension: "devstate", keep: 2, staging: dir + "/staging",
                                         directorySync: { fd in !failing.on.load(ordering: .relaxed) && fsync(fd) == 0 })
        let (first, firstPath) = staged.begin()
        writeFile(firstPath, qevm + [1])
        #expect(throws: GenerationStoreError.self) { try staged.commit(first) }
        #expect(staged.lastGood == nil)
        failing.on.store(false, ordering: .relaxed)
        let (next, nextPath) = staged.begin()
        writeFile(nextPath, qevm + [2])
        #expect(try staged.commit(next).number == next)
        #expect(diskRecord(dir + "/staged")?.record.entries.map(\.generation) == [next])
    }

    /// The committer's gathering: commits nobody waits for, asked for together, share one
    /// group (the window lets them gather); with no window the first goes alone. An urgent
    /// commit does not wait out the window (an hour here): it takes the waiting ones along.
    @Test func commitsNobodyWaitsForGatherIntoOneGroup() async throws {
        let dir = makeTempDirectory()
        let stores = try (0..<3).map { i in
            try GenerationStore(directory: dir + "/state/p\(i)", fileExtension: "devstate", keep: 1, staging: dir + "/staging/p\(i)")
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        let loop = group.next()
        func run(_ committer: GroupCommitter, urgency: [Bool]) async throws -> (numbers: [Int], groups: Int) {
            let items = stores.map { store in
                let (number, path) = store.begin()
                writeFile(path, qevm + [UInt8(number)])
                return (store: store, number: number)
            }
            let numbers = try await loop.flatSubmit {
                EventLoopFuture.whenAllSucceed(zip(items, urgency).map { item, urgent in
                    let promise = loop.makePromise(of: Int.self)
                    committer.commit(item.store, item.number, urgent: urgent) { result in
                        switch result {
                        case .success(let generation): promise.succeed(generation.number)
                        case .failure(let error): promise.fail(error)
                        }
                    }
                    return promise.futureResult
                }, on: loop)
            }.get()
            return (numbers, try await loop.submit { committer.groupsWritten }.get())
        }
        let gathering = GroupCommitter(pool: pool, eventLoop: loop, gatherWindow: .milliseconds(50))
        let gathered = try await run(gathering, urgency: [false, false, false])
        #expect(gathered.numbers == [1, 1, 1] && gathered.groups == 1)
        let alone = GroupCommitter(pool: pool, eventLoop: loop, gatherWindow: .zero)
        let unwindowed = try await run(alone, urgency: [false, false, false])
        #expect(unwindowed.numbers == [2, 2, 2] && unwindowed.groups == 2, "the first commit goes alone, the others form the next group")
        let hour = GroupCommitter(pool: pool, eventLoop: loop, gatherWindow: .hours(1))
        let urgent = try await run(hour, urgency: [false, false, true])
        #expect(urgent.numbers == [3, 3, 3] && urgent.groups == 1)
        for store in stores { #expect(try store.generations().map(\.number) == [3]) }
        try await pool.shutdownGracefully()
        try await group.shutdownGracefully()
    }

    /// A slot's staged file stays open between generations (QEMU truncates it and saves again
    /// into the same inode). One replaced instead (a new inode under the name, as a writer
    /// that renames would leave) is found again by its name, never read from the old inode.
    @Test func aStagedFileReplacedByANewInodeIsReadFromTheNewOne() throws {
        let dir = makeTempDirectory()
        let staging = dir + "/staging/pair"
        let store = try GenerationStore(directory: dir + "/state/pair", fileExtension: "devstate", keep: 1, staging: staging)
        for round in 1...7 {
            let (number, path) = store.begin()
            let bytes = qevm + [UInt8](repeating: UInt8(round), count: 100 * round)
            if round % 2 == 0 {
                writeFile(path + ".new", bytes)
                #expect(rename(path + ".new", path) == 0)
            } else {
                writeFile(path, bytes)
            }
            #expect(try store.validate(number, magic: qevm) == bytes.count, "round \(round)")
            let generation = try store.commit(number)
            #expect(try readFile(generation.path) == bytes, "round \(round)")
        }
    }

    @Test func stagedGroupCommit() throws {
        let dir = makeTempDirectory()
        let stores = try (0..<4).map { i in
            try GenerationStore(directory: dir + "/state/p\(i)", fileExtension: "devstate", keep: 1, staging: dir + "/staging/p\(i)")
        }
        for round in 1...4 {
            var items: [(store: GenerationStore, number: Int)] = []
            for (i, store) in stores.enumerated() {
                let (number, path) = store.begin()
                if !(round == 4 && i == 2) { writeFile(path, qevm + [UInt8(i), UInt8(round)]) }
                items.append((store, number))
            }
            let results = GenerationStore.commitAll(items)
            for (i, result) in results.enumerated() {
                if round == 4 && i == 2 {
                    guard case .failure(let error) = result else { Issue.record("a missing staged file committed"); continue }
                    #expect(error.path.hasPrefix(dir + "/staging/p2/"))
                } else {
                    let generation = try result.get()
                    #expect(try readFile(generation.path) == qevm + [UInt8(i), UInt8(round)])
                }
            }
        }
        #expect(try stores[2].generations().map(\.number) == [3])
        #expect(try stores[1].generations().map(\.number) == [4])
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

    /// A run with `--runtime-dir` moves the records an earlier run left in
    /// `<state-dir>/journal` into its own journal directory, so a domain a killed run left
    /// stopped is still found (and its record cleared in the new place only).
    @Test func recordsLeftInTheStateDirectoryAreAdoptedByARuntimeJournal() throws {
        let state = makeTempDirectory()
        let runtime = makeTempDirectory()
        let old = try StopJournal(stateDirectory: state)
        try old.willStop(domain: "web-p", endpoint: "unix:/run/web-p.sock")
        try old.willStop(domain: "web-s", endpoint: "unix:/run/web-s.sock")
        old.didResume(domain: "web-s")
        let moved = try StopJournal(directory: runtime + "/journal", adopting: state + "/journal")
        #expect(try GenerationStore.list(state + "/journal").isEmpty)
        #expect(try GenerationStore.list(runtime + "/journal").sorted() == ["web-p.journal", "web-s.journal"])
        #expect(moved.entries().map(\.domain) == ["web-p"])
        #expect(moved.entries().first?.endpoint == "unix:/run/web-p.sock")
        moved.didResume(domain: "web-p")
        #expect(moved.entries().isEmpty)
        #expect(try StopJournal(stateDirectory: state).entries().isEmpty)
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
