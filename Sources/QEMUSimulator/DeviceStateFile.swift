import JSON
import QMP

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The simulator's own device-state (and migration-stream) file format.
///
/// It begins as QEMU's does, with `QEVM` and version 3 (`51 45 56 4d 00 00 00 03`), then a
/// marker line, one line of JSON that names the domain and the save counter, and zero
/// padding up to `size` bytes (12,723 by default: what QEMU 7.2 writes for `-M pc`). A
/// load checks the magic, the marker, the JSON and the length, so a truncated file (a
/// crash mid-save) is rejected as QEMU rejects a broken stream.
public struct DeviceStateFile: Sendable, Hashable {
    public static let magic: [UInt8] = [0x51, 0x45, 0x56, 0x4D, 0x00, 0x00, 0x00, 0x03]
    public static let deviceStateMarker = "colorun-sim-device-state"
    public static let migrationMarker = "colorun-sim-migration"
    public static let defaultSize = 12_723

    public enum Kind: String, Sendable, Hashable {
        case deviceState = "device-state"
        case migration
    }

    public var kind: Kind
    /// The domain that saved it.
    public var domain: String
    /// The domain's save counter: 1 for its first successful save, and so on.
    public var save: Int
    /// The guest's counter at 0x7e00 when it was saved.
    public var guestCounter: UInt32
    /// The run state the VM had when the save began.
    public var runState: RunState
    /// Wall-clock seconds when it was saved.
    public var savedAt: Double
    /// The file's total length in bytes.
    public var size: Int

    public init(kind: Kind = .deviceState, domain: String, save: Int, guestCounter: UInt32, runState: RunState, savedAt: Double, size: Int = DeviceStateFile.defaultSize) {
        self.kind = kind
        self.domain = domain
        self.save = save
        self.guestCounter = guestCounter
        self.runState = runState
        self.savedAt = savedAt
        self.size = size
    }

    private var marker: String { kind == .migration ? Self.migrationMarker : Self.deviceStateMarker }

    /// The whole file.
    public func encode() -> [UInt8] {
        var bytes = Self.magic
        bytes.append(contentsOf: "\(marker)\n".utf8)
        let header: JSONValue = [
            "domain": .string(domain),
            "save": .int(Int64(save)),
            "guest-counter": .int(Int64(guestCounter)),
            "run-state": .string(runState.rawValue),
            "saved-at": .double(savedAt),
            "size": .int(Int64(size)),
        ]
        bytes.append(contentsOf: JSONEncoding.encode(header))
        bytes.append(0x0A)
        if bytes.count < size { bytes.append(contentsOf: repeatElement(0, count: size - bytes.count)) }
        return bytes
    }

    /// Parses a whole file; nil when it is not a complete file of this format.
    public static func decode(_ bytes: [UInt8]) -> DeviceStateFile? {
        guard bytes.count > magic.count, Array(bytes.prefix(magic.count)) == magic else { return nil }
        let rest = bytes.dropFirst(magic.count)
        guard let markerEnd = rest.firstIndex(of: 0x0A) else { return nil }
        let kind: Kind
        switch String(decoding: rest[rest.startIndex..<markerEnd], as: UTF8.self) {
        case deviceStateMarker: kind = .deviceState
        case migrationMarker: kind = .migration
        default: return nil
        }
        let jsonPart = bytes[(markerEnd + 1)...]
        guard let jsonEnd = jsonPart.firstIndex(of: 0x0A),
            let header = try? JSONParser.parse(bytes[jsonPart.startIndex..<jsonEnd]),
            let domain = header["domain"]?.stringValue,
            let save = header["save"]?.intValue,
            let counter = header["guest-counter"]?.intValue,
            let state = header["run-state"]?.stringValue.flatMap(RunState.init(rawValue:)),
            let savedAt = header["saved-at"]?.doubleValue,
            let size = header["size"]?.intValue,
            size == bytes.count
        else { return nil }
        return DeviceStateFile(
            kind: kind, domain: domain, save: Int(save), guestCounter: UInt32(truncatingIfNeeded: counter),
            runState: state, savedAt: savedAt, size: Int(size))
    }
}

/// Small POSIX file helpers that report errors as QEMU words them (`strerror`).
enum SimFileIO {
    enum Failure: Error {
        case open(String)
        case io(String)
    }

    static func describe(_ code: Int32) -> String { String(cString: strerror(code)) }

    /// Creates or truncates `path` (mode 0660, as QEMU) and writes `bytes`.
    static func writeFile(_ bytes: some Collection<UInt8>, to path: String) throws(Failure) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o660)
        guard fd >= 0 else { throw .open(describe(errno)) }
        defer { close(fd) }
        let array = Array(bytes)
        var written = 0
        while written < array.count {
            let n = array.withUnsafeBytes { raw in
                write(fd, raw.baseAddress! + written, raw.count - written)
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw .io(describe(errno))
            }
            written += n
        }
    }

    /// Reads the whole of `path` (at most `limit` bytes), in reads of the file's size (and
    /// one byte more, to meet its end): a device state of a few KiB is one `read` into its
    /// own array, with no chunk to clear and copy.
    static func readFile(_ path: String, limit: Int = 64 * 1024 * 1024) throws(Failure) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .open(describe(errno)) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw .io(describe(errno)) }
        var result: [UInt8] = []
        while result.count < limit {
            let want = min(max(Int(info.st_size) + 1 - result.count, 4096), limit - result.count)
            var failure: Int32 = 0
            let chunk = [UInt8](unsafeUninitializedCapacity: want) { buffer, count in
                count = 0
                while true {
                    let n = read(fd, buffer.baseAddress!, want)
                    if n >= 0 { count = n; return }
                    if errno != EINTR { failure = errno; return }
                }
            }
            if failure != 0 { throw .io(describe(failure)) }
            if chunk.isEmpty { break }
            if result.isEmpty { result = chunk } else { result += chunk }
        }
        return result
    }
}
