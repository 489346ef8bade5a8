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
/// Each domain has a small record `<state-dir>/journal/<domain>.journal` (its name, QMP
/// endpoint, colorun's pid and whether colorun has it stopped). Before colorun sends `stop`
/// it writes "stopped"; after `cont` succeeds it writes "running". If colorun is killed in
/// between (SIGKILL, OOM), a later run finds the record and resumes the domain. Each
/// update is one `pwrite` of a fixed-size record into a file kept open, not fsynced: it
/// must survive the death of the colorun process (one write call is all or nothing then),
/// not of the host, which takes its VMs with it.
final class StopJournal: @unchecked Sendable {
    struct Entry: Sendable, Hashable {
        var domain: String
        var endpoint: String
        var pid: Int32
        var since: Double
    }

    let directory: String
    /// Open journal files and their domains' endpoints, by domain.
    private let files = Mutex<[String: (fd: Int32, endpoint: String)]>([:])
    static let recordSize = 1024

    init(stateDirectory: String) throws(GenerationStoreError) {
        directory = stateDirectory + "/journal"
        try GenerationStore.makeDirectories(directory)
    }

    deinit {
        files.withLock { for file in $0.values { close(file.fd) } }
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
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let record: JSONValue = [
            "domain": .string(domain),
            "endpoint": .string(endpoint),
            "pid": .int(Int64(getpid())),
            "since": .double(Double(now.tv_sec) + Double(now.tv_nsec) / 1e9),
            "state": .string(stopped ? "stopped" : "running"),
        ]
        var bytes = JSONEncoding.encode(record)
        guard bytes.count < Self.recordSize else {
            throw GenerationStoreError(path: path(for: domain), reason: "journal record too long")
        }
        bytes += [UInt8](repeating: 0x20, count: Self.recordSize - 1 - bytes.count) + [0x0A]
        let target = path(for: domain)
        let fd: Int32 = try files.withLock { (open: inout [String: (fd: Int32, endpoint: String)]) throws(GenerationStoreError) -> Int32 in
            if let file = open[domain] { return file.fd }
            let fd = Glibc.open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
            guard fd >= 0 else {
                throw GenerationStoreError(path: target, reason: "cannot write stop journal: \(GenerationStore.errnoText())")
            }
            open[domain] = (fd, endpoint)
            return fd
        }
        let written = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        guard written == bytes.count else {
            throw GenerationStoreError(path: target, reason: "cannot write stop journal: \(GenerationStore.errnoText())")
        }
    }

    /// Records that `domain` is about to be stopped by this process.
    func willStop(domain: String, endpoint: String) throws(GenerationStoreError) {
        try write(domain: domain, endpoint: endpoint, stopped: true)
    }

    /// Records that `domain` is running again.
    func didResume(domain: String) {
        let known = files.withLock { $0[domain]?.endpoint }
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
