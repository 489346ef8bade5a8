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
/// copies it into the state directory. The copy goes into the file of a generation pruned
/// earlier (hidden under `.gen-N.EXT.free`, written in place, its length set, renamed to the
/// final name), so a generation on disk costs no new inode and, at a steady device-state
/// size, no block allocation: what bounds a disk's generations per second when QEMU creates
/// each file (about 3× fewer measured on this machine's ext4). A killed run's free files are
/// removed when the store is opened.
final class GenerationStore: Sendable {
    let directory: String
    let fileExtension: String
    /// Where generations are saved and loaded before their commit copies them into
    /// `directory` (nil: saved straight under the partial name in `directory`).
    let staging: String?

    private struct State {
        var highest = 0
        var keep: Int
        var lastGood: Int?
        /// Complete generations on disk, oldest first (kept in memory: pruning lists nothing).
        var committed: [Int] = []
        /// Pruned generations' files kept (hidden) for a staged store's next commits to
        /// write into, oldest first: renamed to their free name durably (a sync since).
        var free: [Int] = []
        /// Renamed to their free name since the store's last sync. Not written into yet: a
        /// crash could otherwise bring back the final name over new data (the rename lost,
        /// the overwrite on disk), a torn listed generation.
        var freeing: [Int] = []
    }

    /// How many pruned files a staged store keeps for reuse (a commit takes one; a group
    /// holds at most the pair's pipelined generations).
    static let freeFilesKept = 4

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
         staging: String? = nil) throws(GenerationStoreError) {
        precondition(keep >= 1, "keep at least one generation")
        self.directory = directory
        self.fileExtension = fileExtension
        self.fencing = fencing
        self.staging = staging
        self.state = Mutex(State(keep: keep))
        try Self.makeDirectories(directory)
        var removed: [String] = []
        for name in try Self.list(directory) where name.hasPrefix(".gen-") {
            if name.hasSuffix(".partial") {
                unlink(directory + "/" + name)
                removed.append(name)
            } else if name.hasSuffix(".free") {
                unlink(directory + "/" + name)
            }
        }
        if let staging {
            try Self.makeDirectories(staging)
            for name in try Self.list(staging) where name.hasPrefix(".gen-") && name.hasSuffix(".partial") {
                unlink(staging + "/" + name)
                removed.append(name)
            }
        }
        removedPartials = removed
        directoryFD = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        let existing = try generations().map(\.number)
        state.withLock {
            $0.highest = existing.last ?? 0
            $0.lastGood = existing.last
            $0.committed = existing
        }
    }

    /// Partial files found (torn by definition) and removed when the store was opened.
    let removedPartials: [String]

    /// The directory, open for its fsyncs after renames.
    private let directoryFD: Int32

    deinit {
        if directoryFD >= 0 { close(directoryFD) }
    }

    /// Complete generations, oldest first.
    func generations() throws(GenerationStoreError) -> [Generation] {
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

    /// The newest complete generation: the last good checkpoint.
    func latest() throws(GenerationStoreError) -> Generation? {
        try generations().last
    }

    /// Reserves the next generation number and returns it with the path QEMU saves it to
    /// (and a secondary loads it from) before its commit: the partial name, in the staging
    /// directory if the store has one.
    func begin() -> (number: Int, partialPath: String) {
        let number = state.withLock { state in
            state.highest += 1
            return state.highest
        }
        return (number, savePath(number))
    }

    /// The hidden name a generation has in `directory` until its commit renames it.
    func partialPath(_ number: Int) -> String {
        Self.partialPath(number, in: directory, fileExtension: fileExtension)
    }

    /// Where QEMU saves generation `number`: its partial name, in `staging` if set.
    func savePath(_ number: Int) -> String {
        Self.partialPath(number, in: staging ?? directory, fileExtension: fileExtension)
    }

    private static func partialPath(_ number: Int, in directory: String, fileExtension: String) -> String {
        directory + "/.gen-" + pad(number) + "." + fileExtension + ".partial"
    }

    /// The hidden name of a pruned generation's file kept for reuse.
    func freePath(_ number: Int) -> String {
        directory + "/.gen-" + Self.pad(number) + "." + fileExtension + ".free"
    }

    func finalPath(_ number: Int) -> String {
        directory + "/gen-" + Self.pad(number) + "." + fileExtension
    }

    /// Checks that a partial generation is complete enough to hand to a secondary: it
    /// exists, is not empty and starts with `magic` (QEMU's device state starts with `QEVM`).
    /// Returns its size.
    @discardableResult
    func validate(_ number: Int, magic: [UInt8]) throws(GenerationStoreError) -> Int {
        try Self.validate(path: savePath(number), magic: magic)
    }

    @discardableResult
    static func validate(path: String, magic: [UInt8]) throws(GenerationStoreError) -> Int {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw GenerationStoreError(path: path, reason: Self.errnoText()) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw GenerationStoreError(path: path, reason: Self.errnoText()) }
        guard info.st_size >= magic.count, info.st_size > 0 else {
            throw GenerationStoreError(path: path, reason: "checkpoint file is empty or truncated (\(info.st_size) bytes)")
        }
        var head = [UInt8](repeating: 0, count: magic.count)
        let n = head.withUnsafeMutableBytes { read(fd, $0.baseAddress, magic.count) }
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

    /// From this many generations in one group on, `commitAll` makes them durable with one
    /// `syncfs` per phase instead of one fsync per file and per directory.
    static let syncfsGroupSize = 4

    /// Commits many partial generations (of any stores) together, a group commit: each file
    /// is made durable, then renamed into place, then the directories are made durable. A
    /// small group fsyncs each file (after starting every file's writeback, so that one journal
    /// commit serves them all) and each directory once; a group of `syncfsGroupSize` or more
    /// uses one `syncfs` of the filesystem for the files and one for the renames (per-file
    /// fsyncs each flush the disk's cache: 100 of them take a second on a busy virtual disk),
    /// falling back to the per-file way if `syncfs` fails. Each generation is durable under
    /// its final name before its result says so; one that fails is left under its partial
    /// name (the caller discards it) and does not hold back the others.
    static func commitAll(_ items: [(store: GenerationStore, number: Int)]) -> [Result<Generation, GenerationStoreError>] {
        var results: [Result<Generation, GenerationStoreError>?] = Array(repeating: nil, count: items.count)
        var fds: [Int32] = Array(repeating: -1, count: items.count)
        var sizes: [Int] = Array(repeating: 0, count: items.count)
        var devices: [UInt64] = Array(repeating: 0, count: items.count)
        // Where each generation is until its rename: its partial name, or for a staged one
        // written into a free file, that file's name.
        var names = items.map { $0.store.partialPath($0.number) }
        for (i, item) in items.enumerated() where item.store.staging != nil {
            do throws(GenerationStoreError) {
                (names[i], fds[i], sizes[i], devices[i]) = try item.store.copyIn(item.number)
            } catch {
                results[i] = .failure(error)
            }
        }
        for (i, item) in items.enumerated() where results[i] == nil && fds[i] < 0 {
            let partial = item.store.partialPath(item.number)
            let fd = open(partial, O_RDONLY | O_CLOEXEC)
            var info = stat()
            guard fd >= 0, fstat(fd, &info) == 0 else {
                results[i] = .failure(GenerationStoreError(path: partial, reason: Self.errnoText()))
                if fd >= 0 { close(fd) }
                continue
            }
            fds[i] = fd
            sizes[i] = Int(info.st_size)
            devices[i] = UInt64(info.st_dev)
        }
        defer { for fd in fds where fd >= 0 { close(fd) } }
        let open = items.indices.filter { fds[$0] >= 0 }

        // 1. The files' data.
        if open.count < syncfsGroupSize || !syncEachFilesystem(open.map { (devices[$0], fds[$0]) }) {
            for i in open { startWriteback(fds[i]) }
            for i in open where fsync(fds[i]) != 0 {
                results[i] = .failure(GenerationStoreError(path: names[i], reason: "fsync failed: \(Self.errnoText())"))
                if items[i].store.staging != nil { unlink(names[i]) }
            }
        }
        // The fencing tokens, just before the renames: a refused generation is discarded,
        // never made visible. One check per token per group (it reads the pair's token file).
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
                unlink(names[i])
                results[i] = .failure(GenerationStoreError(path: item.store.finalPath(item.number), reason: "not committed: \(refusal)"))
            }
        }
        // 2. Their names.
        var renamed: [Int] = []
        for i in open where results[i] == nil {
            let final = items[i].store.finalPath(items[i].number)
            if rename(names[i], final) == 0 {
                renamed.append(i)
            } else {
                results[i] = .failure(GenerationStoreError(path: final, reason: "rename failed: \(Self.errnoText())"))
                if items[i].store.staging != nil { unlink(names[i]) }
            }
        }
        // 3. The directories.
        var durable: Set<ObjectIdentifier> = []
        if renamed.count >= syncfsGroupSize && syncEachFilesystem(renamed.map { (devices[$0], fds[$0]) }) {
            for i in renamed { durable.insert(ObjectIdentifier(items[i].store)) }
        } else {
            var synced: Set<ObjectIdentifier> = []
            for i in renamed where synced.insert(ObjectIdentifier(items[i].store)).inserted {
                if items[i].store.syncDirectory() { durable.insert(ObjectIdentifier(items[i].store)) }
            }
        }
        // Files freed by earlier commits of these stores are now durably under their free
        // names: writable from the next group on.
        for i in renamed where items[i].store.staging != nil && durable.remove(ObjectIdentifier(items[i].store)) != nil {
            items[i].store.state.withLock { state in
                state.free += state.freeing
                state.freeing.removeAll()
            }
        }
        return items.enumerated().map { i, item in
            if let failure = results[i] { return failure }
            item.store.didCommit(item.number)
            return .success(Generation(number: item.number, path: item.store.finalPath(item.number), bytes: sizes[i]))
        }
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

    /// A staged generation into `directory`, under a hidden name: written in place into a
    /// pruned generation's free file when one is ready (its length set to the generation's),
    /// else into a new file under the partial name; then the staged copy is removed. Returns
    /// the hidden name the commit renames. Durable only after the commit's sync.
    private func copyIn(_ number: Int) throws(GenerationStoreError) -> (path: String, fd: Int32, bytes: Int, device: UInt64) {
        let source = savePath(number)
        let bytes: [UInt8]
        do {
            bytes = try readFile(source)
        } catch {
            throw GenerationStoreError(path: source, reason: "cannot read the staged generation: \(ColorunSystem.errnoText(error.code))")
        }
        // A free file is hidden already: written under its free name, renamed straight to
        // the final one (no third rename). Without one, a new file under the partial name.
        let target = state.withLock { $0.free.isEmpty ? nil : $0.free.removeLast() }.map(freePath) ?? partialPath(number)
        let output = open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
        guard output >= 0 else { throw GenerationStoreError(path: target, reason: Self.errnoText()) }
        var info = stat()
        do throws(GenerationStoreError) {
            var done = 0
            while done < bytes.count {
                let n = bytes.withUnsafeBytes { pwrite(output, $0.baseAddress! + done, $0.count - done, off_t(done)) }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw GenerationStoreError(path: target, reason: "write failed: \(Self.errnoText())") }
                done += n
            }
            guard fstat(output, &info) == 0 else { throw GenerationStoreError(path: target, reason: Self.errnoText()) }
            // A reused file longer than this generation is cut to it (no call when the
            // length is the same: a truncate also updates the inode's times).
            if Int(info.st_size) != bytes.count, ftruncate(output, off_t(bytes.count)) != 0 {
                throw GenerationStoreError(path: target, reason: "cannot set the length: \(Self.errnoText())")
            }
        } catch {
            close(output)
            unlink(target)
            throw error
        }
        unlink(source)
        return (target, output, bytes.count, UInt64(info.st_dev))
    }

    /// Records a committed generation and removes those beyond `keep` (the oldest); a
    /// staged store keeps their files, hidden, for its next commits to write into.
    private func didCommit(_ number: Int) {
        let stale = state.withLock { state -> [Int] in
            state.lastGood = max(state.lastGood ?? 0, number)
            if let at = state.committed.lastIndex(where: { $0 < number }) {
                state.committed.insert(number, at: at + 1)
            } else {
                state.committed.insert(number, at: 0)
            }
            let excess = state.committed.count - state.keep
            guard excess > 0 else { return [] }
            defer { state.committed.removeFirst(excess) }
            return Array(state.committed.prefix(excess))
        }
        guard staging != nil else {
            for old in stale { unlink(finalPath(old)) }
            return
        }
        for old in stale {
            let full = state.withLock { $0.free.count + $0.freeing.count >= Self.freeFilesKept }
            if !full && rename(finalPath(old), freePath(old)) == 0 {
                state.withLock { $0.freeing.append(old) }
            } else {
                unlink(finalPath(old))
            }
        }
    }

    /// Fsyncs the store's directory (through a descriptor kept open). False if it failed.
    @discardableResult
    func syncDirectory() -> Bool {
        if directoryFD >= 0 {
            return fsync(directoryFD) == 0
        }
        return Self.syncDirectory(directory)
    }

    /// Removes a partial generation that will not be committed.
    func discard(_ number: Int) {
        unlink(partialPath(number))
        if staging != nil { unlink(savePath(number)) }
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
