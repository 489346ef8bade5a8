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
final class GenerationStore: Sendable {
    let directory: String
    let fileExtension: String

    private struct State {
        var highest = 0
        var keep: Int
        var lastGood: Int?
    }

    private let state: Mutex<State>
    /// The owner's fencing token (a fleet instance's), checked before every commit: a stale
    /// or lapsed token cannot make a generation visible.
    let fencing: FencingToken?

    /// How many complete generations to keep.
    var keep: Int {
        get { state.withLock { $0.keep } }
        set { state.withLock { $0.keep = newValue } }
    }

    /// The number of the newest complete generation (kept in memory: no directory scan).
    var lastGood: Int? { state.withLock { $0.lastGood } }

    /// Opens (creating if needed) the store. Returns the names of removed partial files in `removedPartials`.
    init(directory: String, fileExtension: String, keep: Int = 3, fencing: FencingToken? = nil) throws(GenerationStoreError) {
        precondition(keep >= 1, "keep at least one generation")
        self.directory = directory
        self.fileExtension = fileExtension
        self.fencing = fencing
        self.state = Mutex(State(keep: keep))
        try Self.makeDirectories(directory)
        var removed: [String] = []
        for name in try Self.list(directory) where name.hasPrefix(".gen-") && name.hasSuffix(".partial") {
            unlink(directory + "/" + name)
            removed.append(name)
        }
        removedPartials = removed
        let newest = try generations().last?.number
        state.withLock {
            $0.highest = newest ?? 0
            $0.lastGood = newest
        }
    }

    /// Partial files found (torn by definition) and removed when the store was opened.
    let removedPartials: [String]

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

    /// Reserves the next generation number and returns it with the partial path to write.
    func begin() -> (number: Int, partialPath: String) {
        let number = state.withLock { state in
            state.highest += 1
            return state.highest
        }
        return (number, partialPath(number))
    }

    func partialPath(_ number: Int) -> String {
        directory + "/.gen-" + Self.pad(number) + "." + fileExtension + ".partial"
    }

    func finalPath(_ number: Int) -> String {
        directory + "/gen-" + Self.pad(number) + "." + fileExtension
    }

    /// Checks that a partial generation is complete enough to hand to a secondary: it
    /// exists, is not empty and starts with `magic` (QEMU's device state starts with `QEVM`).
    /// Returns its size.
    @discardableResult
    func validate(_ number: Int, magic: [UInt8]) throws(GenerationStoreError) -> Int {
        try Self.validate(path: partialPath(number), magic: magic)
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
        let partial = partialPath(number)
        let final = finalPath(number)
        if let refusal = fencing?.refusal() {
            unlink(partial)
            throw GenerationStoreError(path: final, reason: "not committed: \(refusal)")
        }
        let fd = open(partial, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw GenerationStoreError(path: partial, reason: Self.errnoText()) }
        var info = stat()
        let synced = fsync(fd) == 0 && fstat(fd, &info) == 0
        let syncError = Self.errnoText()
        close(fd)
        guard synced else { throw GenerationStoreError(path: partial, reason: "fsync failed: \(syncError)") }
        guard rename(partial, final) == 0 else {
            throw GenerationStoreError(path: final, reason: "rename failed: \(Self.errnoText())")
        }
        Self.syncDirectory(directory)
        state.withLock { $0.lastGood = max($0.lastGood ?? 0, number) }
        prune()
        return Generation(number: number, path: final, bytes: Int(info.st_size))
    }

    /// Removes a partial generation that will not be committed.
    func discard(_ number: Int) {
        unlink(partialPath(number))
    }

    private func prune() {
        let keep = self.keep
        guard let all = try? generations(), all.count > keep else { return }
        for generation in all.dropLast(keep) {
            unlink(generation.path)
        }
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

    static func syncDirectory(_ directory: String) {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return }
        fsync(fd)
        close(fd)
    }
}
