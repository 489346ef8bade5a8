#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import QMP

/// The domains this colorun has stopped and not yet resumed, on disk.
///
/// Before colorun sends `stop` to a domain it writes `<state-dir>/journal/<domain>.paused`
/// (the domain's name, QMP endpoint and colorun's pid); after `cont` succeeds it removes
/// it. If colorun is killed in between (SIGKILL, OOM), a later run finds the entry and
/// resumes the domain. Entries are written with write(2), not fsynced: they must survive
/// the death of the colorun process, not of the host (which takes its VMs with it).
public final class StopJournal: @unchecked Sendable {
    public struct Entry: Sendable, Hashable {
        public var domain: String
        public var endpoint: String
        public var pid: Int32
        public var since: Double
    }

    public let directory: String

    public init(stateDirectory: String) throws(GenerationStoreError) {
        directory = stateDirectory + "/journal"
        try GenerationStore.makeDirectories(directory)
    }

    private func path(for domain: String) -> String {
        // Domain names are operator-chosen: keep the file name to a safe alphabet.
        let safe = domain.unicodeScalars.map { scalar -> String in
            let c = Character(scalar)
            return (c.isLetter || c.isNumber || c == "-" || c == "_" || c == ".") && scalar.isASCII
                ? String(c) : "%" + String(scalar.value, radix: 16)
        }.joined()
        return directory + "/" + safe + ".paused"
    }

    /// Records that `domain` is about to be stopped by this process.
    public func willStop(domain: String, endpoint: String) throws(GenerationStoreError) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let entry: JSONValue = [
            "domain": .string(domain),
            "endpoint": .string(endpoint),
            "pid": .int(Int64(getpid())),
            "since": .double(Double(now.tv_sec) + Double(now.tv_nsec) / 1e9),
        ]
        let target = path(for: domain)
        let bytes = JSONEncoding.encode(entry) + [0x0A]
        let fd = open(target, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw GenerationStoreError(path: target, reason: "cannot write stop journal: \(GenerationStore.errnoText())")
        }
        defer { close(fd) }
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard written == bytes.count else {
            throw GenerationStoreError(path: target, reason: "cannot write stop journal: \(GenerationStore.errnoText())")
        }
    }

    /// Records that `domain` is running again.
    public func didResume(domain: String) {
        unlink(path(for: domain))
    }

    /// Entries left behind, by this or an earlier process.
    public func entries() -> [Entry] {
        guard let names = try? GenerationStore.list(directory) else { return [] }
        return names.filter { $0.hasSuffix(".paused") }.compactMap { name in
            let full = directory + "/" + name
            guard let bytes = Self.readFile(full), let json = try? JSONParser.parse(bytes),
                let domain = json["domain"]?.stringValue, let endpoint = json["endpoint"]?.stringValue
            else { return nil }
            return Entry(
                domain: domain, endpoint: endpoint,
                pid: Int32(truncatingIfNeeded: json["pid"]?.intValue ?? 0),
                since: json["since"]?.doubleValue ?? 0)
        }
    }

    /// Whether the process that wrote `entry` is still alive (then its VMs are its business).
    public static func writerIsAlive(_ entry: Entry) -> Bool {
        guard entry.pid > 0, entry.pid != getpid() else { return false }
        return kill(entry.pid, 0) == 0 || errno == EPERM
    }

    static func readFile(_ path: String) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            result.append(contentsOf: chunk[0..<n])
        }
        return result
    }
}
