#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ColorunSystem
import JSON
import QMP
import Synchronization

/// The domains this colorun has stopped and not yet resumed, on disk.
///
/// Each domain has a small record `<state-dir>/journal/<domain>.journal`, or under
/// `<runtime-dir>/journal/` with `--runtime-dir` (its name, QMP
/// endpoint, colorun's pid and whether colorun has it stopped). Before colorun sends `stop`
/// it writes "stopped"; after `cont` succeeds it writes "running". If colorun is killed in
/// between (SIGKILL, OOM), a later run finds the record and resumes the domain. The record
/// must survive the death of the colorun process, not of the host (which takes its VMs with
/// it), so it is not fsynced.
///
/// The record is a fixed-size line of JSON written whole once per domain and run, then kept
/// mapped (`MAP_SHARED`): an update is two stores into the page cache, no system call, no
/// inode time update per checkpoint (four updates per `colo.checkpoint`; as `pwrite`s they
/// were the largest kernel cost of a checkpoint on disk after the QMP sockets). A store into
/// a shared mapping outlives the process like a `write` does. So that a kill between two
/// stores never leaves a record that reads "stopped" for a running domain it did not stop:
/// `since` (fixed width, right-aligned) is written first, then the state as one aligned
/// 8-byte store (`stopped"` or `running"`), which a signal cannot split.
final class StopJournal: @unchecked Sendable {
    struct Entry: Sendable, Hashable {
        var domain: String
        var endpoint: String
        var pid: Int32
        var since: Double
    }

    /// One domain's record, mapped.
    private final class Record: @unchecked Sendable {
        let fd: Int32
        let base: UnsafeMutableRawPointer
        let endpoint: String
        /// Where the `since` number's field (`sinceWidth` bytes) and the state's 8 bytes are.
        let sinceOffset: Int
        let stateOffset: Int

        static let sinceWidth = 17
        static let stopped = Record.word("stopped\"")
        static let running = Record.word("running\"")

        static func word(_ text: String) -> UInt64 {
            var value: UInt64 = 0
            for (i, byte) in text.utf8.prefix(8).enumerated() { value |= UInt64(byte) << (8 * UInt64(i)) }
            return value.littleEndian
        }

        init(path: String, domain: String, endpoint: String, stopped: Bool) throws(GenerationStoreError) {
            var bytes = Array("{\"domain\":".utf8) + JSONEncoding.encode(.string(domain))
            bytes += Array(",\"endpoint\":".utf8) + JSONEncoding.encode(.string(endpoint))
            bytes += Array(",\"pid\":\(getpid()),\"since\":".utf8)
            let sinceOffset = bytes.count
            bytes += [UInt8](repeating: 0x20, count: Self.sinceWidth)
            // JSON allows spaces after a value: they put the state's 8 bytes on an 8-byte
            // boundary, and `"state":"stopped"` stays one run of text for those who grep.
            let key = Array(",\"state\":\"".utf8)
            while (bytes.count + key.count) % 8 != 0 { bytes.append(0x20) }
            bytes += key
            let stateOffset = bytes.count
            bytes += Array((stopped ? "stopped\"" : "running\"").utf8) + [0x7D]
            guard bytes.count < StopJournal.recordSize else {
                throw GenerationStoreError(path: path, reason: "journal record too long")
            }
            bytes += [UInt8](repeating: 0x20, count: StopJournal.recordSize - 1 - bytes.count) + [0x0A]
            Self.formatSince(into: &bytes, at: sinceOffset)
            let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
            guard fd >= 0 else {
                throw GenerationStoreError(path: path, reason: "cannot write stop journal: \(GenerationStore.errnoText())")
            }
            let written = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
            guard written == bytes.count, ftruncate(fd, off_t(StopJournal.recordSize)) == 0 else {
                let reason = GenerationStore.errnoText()
                close(fd)
                throw GenerationStoreError(path: path, reason: "cannot write stop journal: \(reason)")
            }
            guard let base = mmap(nil, StopJournal.recordSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), base != MAP_FAILED else {
                let reason = GenerationStore.errnoText()
                close(fd)
                throw GenerationStoreError(path: path, reason: "cannot map stop journal: \(reason)")
            }
            self.fd = fd
            self.base = base
            self.endpoint = endpoint
            self.sinceOffset = sinceOffset
            self.stateOffset = stateOffset
        }

        deinit {
            munmap(base, StopJournal.recordSize)
            close(fd)
        }

        /// `since` first, then the state in one store.
        func set(stopped: Bool) {
            Self.formatSince(into: UnsafeMutableRawBufferPointer(start: base, count: StopJournal.recordSize), at: sinceOffset)
            atomicMemoryFence(ordering: .releasing)
            base.storeBytes(of: stopped ? Self.stopped : Self.running, toByteOffset: stateOffset, as: UInt64.self)
        }

        /// The wall-clock time as `seconds.micros`, right-aligned in `sinceWidth` bytes.
        static func formatSince<Buffer: MutableCollection>(into buffer: inout Buffer, at offset: Int) where Buffer.Element == UInt8, Buffer.Index == Int {
            var now = timespec()
            clock_gettime(CLOCK_REALTIME, &now)
            var micros = Int(now.tv_nsec / 1000)
            var seconds = max(0, Int(now.tv_sec))
            var at = offset + sinceWidth - 1
            for _ in 0..<6 {
                buffer[at] = UInt8(48 + micros % 10)
                micros /= 10
                at -= 1
            }
            buffer[at] = 0x2E
            at -= 1
            repeat {
                buffer[at] = UInt8(48 + seconds % 10)
                seconds /= 10
                at -= 1
            } while seconds > 0 && at >= offset
            while at >= offset {
                buffer[at] = 0x20
                at -= 1
            }
        }

        static func formatSince(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) {
            var bytes = buffer.bindMemory(to: UInt8.self)
            formatSince(into: &bytes, at: offset)
        }
    }

    let directory: String
    /// The mapped records of the domains this run has journaled, by domain.
    private let records = Mutex<[String: Record]>([:])
    static let recordSize = 1024

    convenience init(stateDirectory: String) throws(GenerationStoreError) {
        try self.init(directory: stateDirectory + "/journal")
    }

    /// Records in `directory`; with `adopting`, the records found in that other journal
    /// directory (where an earlier run kept them, `<state-dir>/journal` before
    /// `--runtime-dir`) are moved here first, so that none is missed.
    init(directory: String, adopting other: String? = nil) throws(GenerationStoreError) {
        self.directory = directory
        try GenerationStore.makeDirectories(directory)
        guard let other, other != directory else { return }
        for name in ((try? GenerationStore.list(other)) ?? []) where name.hasSuffix(".journal") {
            guard let bytes = try? readFile(other + "/" + name) else { continue }
            let partial = directory + "/." + name + ".partial"
            do {
                try writeFile(partial, bytes)
            } catch {
                throw GenerationStoreError(path: partial, reason: "cannot move a stop journal record here: \(error)")
            }
            guard rename(partial, directory + "/" + name) == 0 else {
                throw GenerationStoreError(path: directory + "/" + name, reason: GenerationStore.errnoText())
            }
            unlink(other + "/" + name)
        }
    }

    private func path(for domain: String) -> String {
        // Domain names are operator-chosen: keep the file name to a safe alphabet.
        let safe = domain.unicodeScalars.map { scalar -> String in
            let c = Character(scalar)
            return (c.isLetter || c.isNumber || c == "-" || c == "_" || c == ".") && scalar.isASCII
                ? String(c) : "%" + String(scalar.value, radix: 16)
        }.joined()
        return directory + "/" + safe + ".journal"
    }

    private func write(domain: String, endpoint: String, stopped: Bool) throws(GenerationStoreError) {
        try records.withLock { (records: inout [String: Record]) throws(GenerationStoreError) in
            if let record = records[domain], record.endpoint == endpoint {
                record.set(stopped: stopped)
            } else {
                // First for this domain in this run (or its endpoint changed): the whole record.
                records[domain] = try Record(path: path(for: domain), domain: domain, endpoint: endpoint, stopped: stopped)
            }
        }
    }

    /// Records that `domain` is about to be stopped by this process.
    func willStop(domain: String, endpoint: String) throws(GenerationStoreError) {
        try write(domain: domain, endpoint: endpoint, stopped: true)
    }

    /// Records that `domain` is running again.
    func didResume(domain: String) {
        let known = records.withLock { $0[domain]?.endpoint }
        guard let endpoint = known ?? entries(matching: domain).first?.endpoint else { return }
        try? write(domain: domain, endpoint: endpoint, stopped: false)
    }

    /// Domains recorded as stopped, by this or an earlier process.
    func entries() -> [Entry] {
        entries(matching: nil)
    }

    private func entries(matching name: String?) -> [Entry] {
        let names: [String]
        if let name {
            names = [String(path(for: name).dropFirst(directory.count + 1))]
        } else {
            names = ((try? GenerationStore.list(directory)) ?? []).filter { $0.hasSuffix(".journal") }
        }
        return names.compactMap { file in
            guard let bytes = try? readFile(directory + "/" + file), let json = try? JSONParser.parse(bytes),
                json["state"]?.stringValue == "stopped",
                let domain = json["domain"]?.stringValue, let endpoint = json["endpoint"]?.stringValue
            else { return nil }
            return Entry(
                domain: domain, endpoint: endpoint,
                pid: Int32(truncatingIfNeeded: json["pid"]?.intValue ?? 0),
                since: json["since"]?.doubleValue ?? 0)
        }
    }

    /// Whether the process that wrote `entry` is still alive (then its VMs are its business).
    static func writerIsAlive(_ entry: Entry) -> Bool {
        guard entry.pid > 0, entry.pid != getpid() else { return false }
        return kill(entry.pid, 0) == 0 || errno == EPERM
    }
}
