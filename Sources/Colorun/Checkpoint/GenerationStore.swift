import ColorunSystem
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One complete checkpoint on disk.
struct Generation: Sendable, Hashable, Comparable {
    var number: Int
    var path: String
    var bytes: Int

    static func < (a: Generation, b: Generation) -> Bool { a.number < b.number }
}

/// Why a generation could not be written, committed or trusted.
struct GenerationStoreError: Error, Sendable, CustomStringConvertible {
    var path: String
    var reason: String
    var description: String { "\(path): \(reason)" }
}

/// The checkpoint generations of one replicated pair (or one Remus domain) in a directory.
///
/// A generation being written lives under a hidden partial name (`.gen-00000043.devstate.partial`);
/// only when it is complete is it fsynced and renamed to `gen-00000043.devstate`, and the
/// directory fsynced. So a listed generation is never torn, whatever dies when. Partial
/// files left by a killed run are removed when the store is opened. The newest `keep`
/// generations are kept; older ones are removed after each commit.
///
/// A *staged* store (`staging` set: a directory in memory, such as one under /dev/shm)
/// has QEMU save each generation there and the secondary load it from there; the commit
/// copies it into the state directory **in place, into a slot file** (`slot-3.devstate`)
/// that no durable record lists, and then records it in the store's `generations.index`
/// (`GenerationIndex`: two CRC-checked records, the new one written where the older one
/// was). A generation on disk then costs no new inode, no rename and no directory update:
/// its bytes and one index record, made durable by the group's two syncs. A slot whose
/// generation is pruned is written again only once a record without it is durable. The
/// generations of a directory are its named files and the slots its index lists (an
/// earlier run's of the other kind included); a slot whose bytes do not match the index's
/// length and CRC is never listed.
final class GenerationStore: Sendable {
    let directory: String
    let fileExtension: String
    /// Where generations are saved and loaded before their commit copies them into a slot
    /// file of `directory` (nil: saved straight under the partial name in `directory`).
    let staging: String?

    private struct State {
        var highest = 0
        var keep: Int
        var lastGood: Int?
        /// Complete generations on disk, oldest first, named and in slots (kept in memory:
        /// pruning lists nothing).
        var committed: [Int] = []
        /// The slot of each generation written in place: begun (reserved) and committed ones.
        var slotOf: [Int: Int] = [:]
        /// The durable record's entries, by generation.
        var entries: [Int: GenerationIndex.Entry] = [:]
        /// Slots that neither the durable record lists nor a begun generation holds: writable.
        var freeSlots: [Int] = []
        /// Slots that become writable once the next record is durable: a record that failed
        /// may have reached the disk, and it lists them.
        var quarantined: [Int] = []
        /// How many slots exist or are reserved (slot numbers are 0..<slotCount).
        var slotCount = 0
        /// The index file, open once needed (-1 before).
        var indexFD: Int32 = -1
        /// The place of the newest durable record (the next record goes to the other one).
        var indexPlace = 1
        /// The highest sequence ever written (a failed write's included): the next is higher.
        var sequence: UInt64 = 0
        /// Descriptors kept open per slot (a staged store's): its file in `directory`, and
        /// its staged file, which QEMU saves into again (truncating the same inode), so a
        /// checkpoint opens no file by path on the loop or in the commit.
        var slotFDs: [Int: Int32] = [:]
        var stagedFDs: [Int: Int32] = [:]
    }

    private let state: Mutex<State>
    /// The owner's fencing token (a fleet instance's), checked before every commit, single or
    /// grouped (`commitAll`): a stale or lapsed token cannot make a generation visible.
    let fencing: FencingToken?

    /// How many complete generations to keep.
    var keep: Int {
        get { state.withLock { $0.keep } }
        set { state.withLock { $0.keep = newValue } }
    }

    /// The number of the newest complete generation (kept in memory: no directory scan).
    var lastGood: Int? { state.withLock { $0.lastGood } }

    /// Opens (creating if needed) the store. Returns the names of removed partial files in `removedPartials`.
    init(directory: String, fileExtension: String, keep: Int = 3, fencing: FencingToken? = nil,
         staging: String? = nil, directorySync: @escaping @Sendable (Int32) -> Bool = { fsync($0) == 0 }) throws(GenerationStoreError) {
        precondition(keep >= 1, "keep at least one generation")
        self.directory = directory
        self.directorySync = directorySync
        self.fileExtension = fileExtension
        self.fencing = fencing
        self.staging = staging
        self.state = Mutex(State(keep: keep))
        try Self.makeDirectories(directory)
        var removed: [String] = []
        var slotFiles: [Int] = []
        var named: [Int] = []
        let suffix = "." + fileExtension
        for name in try Self.list(directory) {
            if name.hasPrefix(".gen-") && name.hasSuffix(".partial") {
                unlink(directory + "/" + name)
                removed.append(name)
            } else if name.hasPrefix(".gen-") && name.hasSuffix(".free") {
                // An earlier version's pruned files kept for reuse.
                unlink(directory + "/" + name)
            } else if name.hasPrefix("slot-") && name.hasSuffix(suffix), let slot = Int(name.dropFirst(5).dropLast(suffix.count)) {
                slotFiles.append(slot)
            } else if name.hasPrefix("gen-") && name.hasSuffix(suffix), let number = Int(name.dropFirst(4).dropLast(suffix.count)) {
                named.append(number)
            }
        }
        if let staging {
            try Self.makeDirectories(staging)
            for name in try Self.list(staging) {
                if name.hasPrefix(".gen-") && name.hasSuffix(".partial") {
                    unlink(staging + "/" + name)
                    removed.append(name)
                } else if name.hasPrefix("slot-") {
                    // Another run's staged files: never trusted (a slot's file is QEMU's to
                    // write again before anyone reads it).
                    unlink(staging + "/" + name)
                }
            }
        }
        removedPartials = removed
        directoryFD = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        var info = stat()
        indexDevice = fstat(directoryFD, &info) == 0 ? UInt64(info.st_dev) : 0
        // The index an earlier run left, if any (a staged store's first commit makes one: a
        // session opening a thousand stores does not fsync a thousand directories on its loop).
        let indexFD = open(directory + "/" + GenerationIndex.fileName, O_RDWR | O_CLOEXEC)
        let found = indexFD >= 0 ? GenerationIndex.read(indexFD) : nil
        var good: [GenerationIndex.Entry] = []
        var listed: Set<Int> = []
        for entry in found?.record.entries ?? [] {
            listed.insert(entry.slot)
            if Self.check(entry, path: slotPath(entry.slot)) == nil { good.append(entry) }
        }
        let slotCount = max(slotFiles.max().map { $0 + 1 } ?? 0, listed.max().map { $0 + 1 } ?? 0)
        state.withLock { state in
            state.committed = Array(Set(named).union(good.map(\.generation))).sorted()
            state.highest = max(state.committed.last ?? 0, found?.record.entries.map(\.generation).max() ?? 0)
            state.lastGood = state.committed.last
            for entry in good {
                state.entries[entry.generation] = entry
                state.slotOf[entry.generation] = entry.slot
            }
            state.slotCount = slotCount
            state.freeSlots = (0..<slotCount).filter { !listed.contains($0) }.reversed()
            // Listed but bad (the CRC says so): not listed as generations, not written until
            // a record without them is durable.
            state.quarantined = Array(listed.subtracting(good.map(\.slot)))
            state.indexFD = indexFD
            state.indexPlace = found?.place ?? 1
            state.sequence = found?.record.sequence ?? 0
        }
    }

    /// Partial files found (torn by definition) and removed when the store was opened.
    let removedPartials: [String]

    /// The directory, open for its fsyncs after renames.
    private let directoryFD: Int32
    /// How the directory is synced (fsync; a test gives one that fails, as a failing disk does).
    private let directorySync: @Sendable (Int32) -> Bool
    /// The filesystem of the directory and its index (for `syncEachFilesystem`).
    private let indexDevice: UInt64

    deinit {
        if directoryFD >= 0 { close(directoryFD) }
        let fds = state.withLock { [$0.indexFD] + Array($0.slotFDs.values) + Array($0.stagedFDs.values) }
        for fd in fds where fd >= 0 { close(fd) }
    }

    /// Complete generations, oldest first, as on disk now: the named files and the slots the
    /// newest whole index record lists whose bytes match it (length and CRC-32C).
    func generations() throws(GenerationStoreError) -> [Generation] {
        var result = try namedGenerations()
        let fd = open(directory + "/" + GenerationIndex.fileName, O_RDONLY | O_CLOEXEC)
        if fd >= 0 {
            defer { close(fd) }
            for entry in GenerationIndex.read(fd)?.record.entries ?? [] where Self.check(entry, path: slotPath(entry.slot)) == nil {
                result.append(Generation(number: entry.generation, path: slotPath(entry.slot), bytes: entry.bytes))
            }
        }
        return result.sorted()
    }

    private func namedGenerations() throws(GenerationStoreError) -> [Generation] {
        var result: [Generation] = []
        let suffix = "." + fileExtension
        for name in try Self.list(directory) where name.hasPrefix("gen-") && name.hasSuffix(suffix) {
            let digits = name.dropFirst(4).dropLast(suffix.count)
            guard let number = Int(digits) else { continue }
            let path = directory + "/" + name
            var info = stat()
            guard stat(path, &info) == 0 else { continue }
            result.append(Generation(number: number, path: path, bytes: Int(info.st_size)))
        }
        return result.sorted()
    }

    /// Why a slot does not hold what `entry` says (nil when it does).
    static func check(_ entry: GenerationIndex.Entry, path: String) -> String? {
        let bytes: [UInt8]
        do {
            bytes = try readFile(path)
        } catch {
            return "cannot read: \(ColorunSystem.errnoText(error.code))"
        }
        guard bytes.count == entry.bytes else { return "\(bytes.count) bytes, the index says \(entry.bytes)" }
        guard crc32c(bytes) == entry.checksum else { return "CRC-32C does not match the index" }
        return nil
    }

    /// The newest complete generation: the last good checkpoint.
    func latest() throws(GenerationStoreError) -> Generation? {
        try generations().last
    }

    /// Reserves the next generation number and returns it with the path QEMU saves it to
    /// (and a secondary loads it from) before its commit: the partial name, or in a staged
    /// store the staged file of the writable slot the generation takes.
    func begin() -> (number: Int, partialPath: String) {
        let number = state.withLock { state in
            state.highest += 1
            if staging != nil {
                state.slotOf[state.highest] = state.freeSlots.popLast() ?? {
                    state.slotCount += 1
                    return state.slotCount - 1
                }()
            }
            return state.highest
        }
        return (number, savePath(number))
    }

    /// The hidden name a generation has in `directory` until its commit renames it.
    func partialPath(_ number: Int) -> String {
        Self.partialPath(number, in: directory, fileExtension: fileExtension)
    }

    /// Where QEMU saves generation `number`: its partial name in `directory`; in a staged
    /// store, the staged file of its slot (`staging/slot-K.devstate`). A slot's staged file
    /// serves each generation the slot takes: nobody else writes or reads it while the slot
    /// is taken (the secondary has loaded it and the commit copied it before the slot is
    /// free again), and QEMU truncates a file it saves into (`O_TRUNC`, tried on 7.2), so a
    /// generation costs no inode in the staging directory either.
    func savePath(_ number: Int) -> String {
        if let staging, let slot = state.withLock({ $0.slotOf[number] }) {
            return staging + "/slot-" + String(slot) + "." + fileExtension
        }
        return Self.partialPath(number, in: staging ?? directory, fileExtension: fileExtension)
    }

    private static func partialPath(_ number: Int, in directory: String, fileExtension: String) -> String {
        directory + "/.gen-" + pad(number) + "." + fileExtension + ".partial"
    }

    /// The name of a named generation.
    func finalPath(_ number: Int) -> String {
        directory + "/gen-" + Self.pad(number) + "." + fileExtension
    }

    func slotPath(_ slot: Int) -> String {
        directory + "/slot-" + String(slot) + "." + fileExtension
    }

    /// Where generation `number` is once committed: its slot file in a staged store, else
    /// its named file.
    func path(of number: Int) -> String {
        state.withLock { $0.slotOf[number] }.map(slotPath) ?? finalPath(number)
    }

    /// Checks that a partial generation is complete enough to hand to a secondary: it
    /// exists, is not empty and starts with `magic` (QEMU's device state starts with `QEVM`).
    /// Returns its size.
    @discardableResult
    func validate(_ number: Int, magic: [UInt8]) throws(GenerationStoreError) -> Int {
        guard staging != nil, let slot = state.withLock({ $0.slotOf[number] }) else {
            return try Self.validate(path: savePath(number), magic: magic)
        }
        let path = savePath(number)
        var fd = try stagedFD(slot, path: path)
        if (try? Self.validate(fd: fd, path: path, magic: magic)) == nil {
            // Not what the path holds now if the file was replaced rather than truncated
            // (QEMU truncates it; anything else that saves there may not): open it again.
            fd = try stagedFD(slot, path: path, reopen: true)
        }
        return try Self.validate(fd: fd, path: path, magic: magic)
    }

    /// The staged file of `slot`, open (opened by path the first time, or again with `reopen`).
    private func stagedFD(_ slot: Int, path: String, reopen: Bool = false) throws(GenerationStoreError) -> Int32 {
        try state.withLock { (state: inout State) throws(GenerationStoreError) -> Int32 in
            if let fd = state.stagedFDs[slot] {
                guard reopen else { return fd }
                close(fd)
                state.stagedFDs[slot] = nil
            }
            let fd = open(path, O_RDWR | O_CLOEXEC)
            guard fd >= 0 else { throw GenerationStoreError(path: path, reason: Self.errnoText()) }
            state.stagedFDs[slot] = fd
            return fd
        }
    }

    @discardableResult
    static func validate(path: String, magic: [UInt8]) throws(GenerationStoreError) -> Int {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw GenerationStoreError(path: path, reason: Self.errnoText()) }
        defer { close(fd) }
        return try validate(fd: fd, path: path, magic: magic)
    }

    private static func validate(fd: Int32, path: String, magic: [UInt8]) throws(GenerationStoreError) -> Int {
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw GenerationStoreError(path: path, reason: Self.errnoText()) }
        guard info.st_size >= magic.count, info.st_size > 0 else {
            throw GenerationStoreError(path: path, reason: "checkpoint file is empty or truncated (\(info.st_size) bytes)")
        }
        var head = [UInt8](repeating: 0, count: magic.count)
        let n = head.withUnsafeMutableBytes { pread(fd, $0.baseAddress, magic.count, 0) }
        guard n == magic.count, head == magic else {
            throw GenerationStoreError(path: path, reason: "not a checkpoint file (bad magic)")
        }
        return Int(info.st_size)
    }

    /// Makes a complete partial generation durable and visible: fsync the file, rename it
    /// into place, fsync the directory, then remove generations beyond `keep`.
    @discardableResult
    func commit(_ number: Int) throws(GenerationStoreError) -> Generation {
        try Self.commitAll([(self, number)])[0].get()
    }

    /// From this many files in one group on, `commitAll` makes them durable with one
    /// `syncfs` per phase instead of one fsync per file and per directory.
    static let syncfsGroupSize = 4

    /// What one commit of a group is: where its bytes are, and the descriptor that syncs them.
    private struct Staged {
        var path: String
        var fd: Int32 = -1
        var bytes = 0
        var device: UInt64 = 0
        var checksum: UInt32 = 0
        /// A slot file made for this commit (its directory entry is new).
        var created = false
        /// `fd` is this commit's to close (a slot's descriptor stays open with its store).
        var ownsFD = true
    }

    /// Commits many generations (of any stores) together, a group commit, in two phases each
    /// made durable by one `syncfs` of the filesystem for a group of `syncfsGroupSize` or more
    /// (per-file fsyncs each flush the disk's cache: 100 of them take a second on a busy
    /// virtual disk), else by fsyncs of each file and directory (after starting every file's
    /// writeback, so that one journal commit serves them all; also the fallback when `syncfs`
    /// fails):
    /// 1. the bytes: a named generation's partial file, a staged one copied into its slot;
    /// 2. the names: each named generation renamed into place, and each store's new index
    ///    record (its slot generations, the pruned ones gone) written.
    /// Each generation is durable under its final name or in its recorded slot before its
    /// result says so; one that fails is left unlisted (the caller discards it) and does not
    /// hold back the others. Pruned named files are removed after phase 2; pruned slots are
    /// written again only after a later group (their record is durable by then).
    static func commitAll(_ items: [(store: GenerationStore, number: Int)]) -> [Result<Generation, GenerationStoreError>] {
        var results: [Result<Generation, GenerationStoreError>?] = Array(repeating: nil, count: items.count)
        var files = items.map { Staged(path: $0.store.partialPath($0.number)) }
        for (i, item) in items.enumerated() {
            do throws(GenerationStoreError) {
                files[i] = item.store.staging != nil ? try item.store.copyIn(item.number) : try Self.openPartial(files[i].path)
            } catch {
                results[i] = .failure(error)
                item.store.release(item.number)
            }
        }
        defer { for file in files where file.fd >= 0 && file.ownsFD { close(file.fd) } }
        let open = items.indices.filter { files[$0].fd >= 0 }

        // 1. The bytes.
        if open.count < syncfsGroupSize || !syncEachFilesystem(open.map { (files[$0].device, files[$0].fd) }) {
            for i in open { startWriteback(files[i].fd) }
            for i in open where fsync(files[i].fd) != 0 {
                results[i] = .failure(GenerationStoreError(path: files[i].path, reason: "fsync failed: \(Self.errnoText())"))
                items[i].store.release(items[i].number)
            }
            // A new slot file's name is in its directory, not in the file.
            var synced: Set<ObjectIdentifier> = []
            for i in open where results[i] == nil && files[i].created && synced.insert(ObjectIdentifier(items[i].store)).inserted {
                items[i].store.syncDirectory()
            }
        }
        // The fencing tokens, just before anything is made visible: a refused generation is
        // discarded, never listed. One check per token per group (it reads the pair's token file).
        var refusals: [ObjectIdentifier: String?] = [:]
        for i in open where results[i] == nil {
            let item = items[i]
            guard let fencing = item.store.fencing else { continue }
            let key = ObjectIdentifier(fencing)
            let refusal: String?
            if let known = refusals[key] {
                refusal = known
            } else {
                refusal = fencing.refusal()
                refusals[key] = .some(refusal)
            }
            if let refusal {
                if item.store.staging == nil { unlink(files[i].path) }
                item.store.release(item.number)
                results[i] = .failure(GenerationStoreError(path: item.store.path(of: item.number), reason: "not committed: \(refusal)"))
            }
        }
        // 2. The names: renames of named generations, index records of slotted ones.
        var renamed: [Int] = []
        for i in open where results[i] == nil && items[i].store.staging == nil {
            let final = items[i].store.finalPath(items[i].number)
            if rename(files[i].path, final) == 0 {
                renamed.append(i)
                files[i].path = final
            } else {
                results[i] = .failure(GenerationStoreError(path: final, reason: "rename failed: \(Self.errnoText())"))
            }
        }
        var plans: [ObjectIdentifier: CommitPlan] = [:]
        var order: [GenerationStore] = []
        for i in open where results[i] == nil {
            let store = items[i].store
            if plans[ObjectIdentifier(store)] == nil { order.append(store) }
            plans[ObjectIdentifier(store), default: CommitPlan()].added.append((items[i].number, files[i]))
        }
        for store in order {
            plans[ObjectIdentifier(store)] = store.writeRecord(plans[ObjectIdentifier(store)]!)
        }
        let recorded = order.filter { plans[ObjectIdentifier($0)]!.record != nil && plans[ObjectIdentifier($0)]!.failure == nil }
        // Why a store's names are not durable (its index record or renames), by store.
        var unsynced: [ObjectIdentifier: String] = [:]
        let syncs = renamed.map { (files[$0].device, files[$0].fd) } + recorded.map { ($0.indexDevice, $0.state.withLock { $0.indexFD }) }
        if syncs.count < syncfsGroupSize || !syncEachFilesystem(syncs) {
            for store in order {
                let plan = plans[ObjectIdentifier(store)]!
                let renames = store.staging == nil && !plan.added.isEmpty
                if (renames || plan.indexCreated) && !store.syncDirectory() {
                    unsynced[ObjectIdentifier(store)] = "the directory's fsync failed: \(Self.errnoText())"
                } else if plan.record != nil && plan.failure == nil && fsync(store.state.withLock { $0.indexFD }) != 0 {
                    unsynced[ObjectIdentifier(store)] = "index sync failed: \(Self.errnoText())"
                }
            }
        }
        for store in order {
            var plan = plans[ObjectIdentifier(store)]!
            if plan.failure == nil, let reason = unsynced[ObjectIdentifier(store)] {
                if plan.record != nil {
                    plan.failure = reason
                } else if store.staging == nil && !plan.added.isEmpty {
                    // Renamed into place, but the rename may not survive a crash: not reported
                    // committed, and nothing older is pruned for it.
                    plan.failure = reason + " (the generation is in place; its name may not survive a crash)"
                    plan.namesUnsynced = true
                }
            }
            store.apply(plan)
            plans[ObjectIdentifier(store)] = plan
        }
        return items.enumerated().map { i, item in
            if let failure = results[i] { return failure }
            let plan = plans[ObjectIdentifier(item.store)]!
            if let failure = plan.failure, item.store.staging != nil {
                return .failure(GenerationStoreError(path: item.store.directory + "/" + GenerationIndex.fileName, reason: failure))
            }
            if let failure = plan.failure, plan.namesUnsynced {
                return .failure(GenerationStoreError(path: files[i].path, reason: failure))
            }
            return .success(Generation(number: item.number, path: files[i].path, bytes: files[i].bytes))
        }
    }

    /// One store's part of a group commit: what it adds, what its new record is.
    private struct CommitPlan {
        var added: [(number: Int, file: Staged)] = []
        /// The committed generations after this group (pruned ones gone), and the pruned.
        var committed: [Int] = []
        var pruned: [Int] = []
        /// The record written (nil when no slot generation was added or pruned).
        var record: GenerationIndex.Record?
        var place = 0
        var failure: String?
        /// The index file was made by this group (its name is in the directory, not in the file).
        var indexCreated = false
        /// Named generations were renamed but the directory's fsync failed (`failure` says why).
        var namesUnsynced = false
    }


    /// Works out this group's committed list and, when a slot generation comes or goes,
    /// writes the record that lists it into the place the newest durable one is not in.
    private func writeRecord(_ plan: CommitPlan) -> CommitPlan {
        var plan = plan
        let (openFD, record, place) = state.withLock { state -> (Int32, GenerationIndex.Record?, Int) in
            var committed = state.committed
            for (number, _) in plan.added where !committed.contains(number) { committed.append(number) }
            committed.sort()
            let excess = max(0, committed.count - state.keep)
            plan.pruned = Array(committed.prefix(excess))
            plan.committed = Array(committed.dropFirst(excess))
            let slotted = plan.added.contains { state.slotOf[$0.number] != nil } || plan.pruned.contains { state.entries[$0] != nil }
            guard slotted else { return (-1, nil, 0) }
            var entries: [GenerationIndex.Entry] = []
            for number in plan.committed {
                if let entry = state.entries[number] {
                    entries.append(entry)
                } else if let slot = state.slotOf[number], let added = plan.added.first(where: { $0.number == number }) {
                    entries.append(GenerationIndex.Entry(generation: number, slot: slot, bytes: added.file.bytes, checksum: added.file.checksum))
                }
            }
            state.sequence += 1
            return (state.indexFD, GenerationIndex.Record(sequence: state.sequence, entries: entries), 1 - state.indexPlace)
        }
        guard let record else { return plan }
        plan.record = record
        plan.place = place
        var fd = openFD
        if fd < 0 {
            // The store's first record: the index is made now, its name made durable with the record.
            fd = open(directory + "/" + GenerationIndex.fileName, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
            guard fd >= 0 else {
                plan.failure = "cannot make the index: \(Self.errnoText())"
                return plan
            }
            plan.indexCreated = true
            state.withLock { $0.indexFD = fd }
        }
        do {
            try GenerationIndex.write(record, place: place, to: fd)
        } catch {
            plan.failure = error.reason
        }
        return plan
    }

    /// After the group's phase 2: the new record is the durable one (its pruned slots
    /// writable, pruned named files removed), or, when it failed, nothing this group added
    /// to the index is listed and its slots wait for the next good record.
    private func apply(_ plan: CommitPlan) {
        let stale = state.withLock { state -> [Int] in
            let namedPruned = plan.pruned.filter { state.slotOf[$0] == nil }
            if plan.failure != nil {
                // Named generations were renamed: they are on disk, listed from now on. Slot
                // generations are not listed; their slots wait for the next good record.
                let named = plan.added.map(\.number).filter { state.slotOf[$0] == nil }
                for (number, _) in plan.added where state.slotOf[number] != nil {
                    state.quarantined.append(state.slotOf.removeValue(forKey: number)!)
                }
                for number in named where !state.committed.contains(number) {
                    state.committed.append(number)
                }
                state.committed.sort()
                state.lastGood = state.committed.last
                return []
            }
            if let record = plan.record {
                state.indexPlace = plan.place
                state.freeSlots += state.quarantined
                state.quarantined.removeAll()
                for number in plan.pruned {
                    if let slot = state.slotOf.removeValue(forKey: number) { state.freeSlots.append(slot) }
                }
                state.entries = Dictionary(uniqueKeysWithValues: record.entries.map { ($0.generation, $0) })
            }
            state.committed = plan.committed
            state.lastGood = max(state.lastGood ?? 0, plan.committed.last ?? 0)
            return namedPruned
        }
        for old in stale { unlink(finalPath(old)) }
    }

    /// The bytes of a slot's staged file, which is then emptied: a slot's staged file holds a
    /// generation only from QEMU's save into it to its commit, so a save that never happened
    /// cannot hand the commit an older generation's bytes (an empty file is an error).
    private func take(staged slot: Int, path: String) throws(GenerationStoreError) -> [UInt8] {
        let fd = try stagedFD(slot, path: path)
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw GenerationStoreError(path: path, reason: Self.errnoText()) }
        let size = Int(info.st_size)
        guard size > 0 else { throw GenerationStoreError(path: path, reason: "the staged generation is empty (never saved)") }
        var failure: Int32 = 0
        let bytes = [UInt8](unsafeUninitializedCapacity: size) { buffer, count in
            while count < size {
                let n = pread(fd, buffer.baseAddress! + count, size - count, off_t(count))
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else {
                    failure = n < 0 ? errno : EIO
                    return
                }
                count += n
            }
        }
        guard failure == 0 else { throw GenerationStoreError(path: path, reason: "cannot read the staged generation: \(ColorunSystem.errnoText(failure))") }
        guard bytes.count == size else { throw GenerationStoreError(path: path, reason: "the staged generation changed size while read") }
        _ = ftruncate(fd, 0)
        return bytes
    }

    /// A begun generation that will not be committed gives its slot back (it was never listed).
    private func release(_ number: Int) {
        state.withLock { state in
            guard state.entries[number] == nil, let slot = state.slotOf.removeValue(forKey: number) else { return }
            state.freeSlots.append(slot)
        }
    }

    private static func openPartial(_ path: String) throws(GenerationStoreError) -> Staged {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        var info = stat()
        guard fd >= 0, fstat(fd, &info) == 0 else {
            let reason = Self.errnoText()
            if fd >= 0 { close(fd) }
            throw GenerationStoreError(path: path, reason: reason)
        }
        return Staged(path: path, fd: fd, bytes: Int(info.st_size), device: UInt64(info.st_dev))
    }

    /// One `syncfs` per filesystem among `files` (device, an open descriptor on it). False if
    /// one failed (the caller then syncs file by file, which names the file that fails).
    private static func syncEachFilesystem(_ files: [(device: UInt64, fd: Int32)]) -> Bool {
        var done: Set<UInt64> = []
        for file in files where done.insert(file.device).inserted {
            do {
                try syncFilesystem(file.fd)
            } catch {
                return false
            }
        }
        return true
    }

    /// A staged generation into its slot file in `directory`, written in place (the file
    /// made if the slot is new, its length set to the generation's), with its CRC-32C (the
    /// staged file stays for the slot's next generation). Durable only after the commit's
    /// sync; listed only once the record naming it is. Both files stay open with the store.
    private func copyIn(_ number: Int) throws(GenerationStoreError) -> Staged {
        let source = savePath(number)
        guard let slot = state.withLock({ $0.slotOf[number] }) else {
            throw GenerationStoreError(path: source, reason: "generation \(number) was not begun in this store")
        }
        let bytes = try take(staged: slot, path: source)
        let target = slotPath(slot)
        let (output, created) = try slotFD(slot, path: target)
        var info = stat()
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { pwrite(output, $0.baseAddress! + done, $0.count - done, off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw GenerationStoreError(path: target, reason: "write failed: \(Self.errnoText())") }
            done += n
        }
        guard fstat(output, &info) == 0 else { throw GenerationStoreError(path: target, reason: Self.errnoText()) }
        // A reused slot longer than this generation is cut to it (no call when the
        // length is the same: a truncate also updates the inode's times).
        if Int(info.st_size) != bytes.count, ftruncate(output, off_t(bytes.count)) != 0 {
            throw GenerationStoreError(path: target, reason: "cannot set the length: \(Self.errnoText())")
        }
        return Staged(path: target, fd: output, bytes: bytes.count, device: UInt64(info.st_dev), checksum: crc32c(bytes),
                      created: created, ownsFD: false)
    }

    /// The slot file of `slot` in `directory`, open for writing (made the first time it is
    /// needed: `created`).
    private func slotFD(_ slot: Int, path: String) throws(GenerationStoreError) -> (fd: Int32, created: Bool) {
        try state.withLock { (state: inout State) throws(GenerationStoreError) -> (fd: Int32, created: Bool) in
            if let fd = state.slotFDs[slot] { return (fd, false) }
            var created = false
            var fd = open(path, O_WRONLY | O_CLOEXEC)
            if fd < 0 && errno == ENOENT {
                fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
                created = true
            }
            guard fd >= 0 else { throw GenerationStoreError(path: path, reason: Self.errnoText()) }
            state.slotFDs[slot] = fd
            return (fd, created)
        }
    }

    /// Fsyncs the store's directory (through a descriptor kept open). False if it failed.
    @discardableResult
    func syncDirectory() -> Bool {
        if directoryFD >= 0 {
            return directorySync(directoryFD)
        }
        return Self.syncDirectory(directory)
    }

    /// Removes a partial generation that will not be committed.
    func discard(_ number: Int) {
        unlink(partialPath(number))
        if staging != nil {
            unlink(savePath(number))
            // The slot's next save makes a new staged file: its descriptor goes too.
            state.withLock { state in
                if let slot = state.slotOf[number], let fd = state.stagedFDs.removeValue(forKey: slot) { close(fd) }
            }
        }
        release(number)
    }

    // MARK: - Files

    static func pad(_ number: Int) -> String {
        let digits = String(number)
        return String(repeating: "0", count: max(0, 8 - digits.count)) + digits
    }

    static func errnoText() -> String {
        String(cString: strerror(errno))
    }

    static func makeDirectories(_ path: String) throws(GenerationStoreError) {
        var current = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            current += "/" + component
            if mkdir(current, 0o700) != 0 && errno != EEXIST {
                throw GenerationStoreError(path: current, reason: "cannot create directory: \(errnoText())")
            }
        }
        guard access(path, W_OK) == 0 else {
            throw GenerationStoreError(path: path, reason: "state directory is not writable: \(errnoText())")
        }
    }

    static func list(_ directory: String) throws(GenerationStoreError) -> [String] {
        do {
            return try listDirectory(directory)
        } catch {
            throw GenerationStoreError(path: directory, reason: "cannot list: \(ColorunSystem.errnoText(error.code))")
        }
    }

    @discardableResult
    static func syncDirectory(_ directory: String) -> Bool {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return fsync(fd) == 0
    }
}
