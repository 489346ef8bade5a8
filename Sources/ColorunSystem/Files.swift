import CColorunSystem
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A failed system call, said the way an operator reads it: what was attempted, on what, and
/// the system's reason.
public struct SystemError: Error, Sendable, Hashable, CustomStringConvertible {
    public var description: String
    /// The errno value, 0 if the failure was not a system call's.
    public var code: Int32

    public init(_ description: String, code: Int32 = 0) {
        self.description = description
        self.code = code
    }
}

/// `strerror` text with the number: "No such file or directory (errno 2)".
public func errnoText(_ code: Int32 = errno) -> String {
    "\(String(cString: strerror(code))) (errno \(code))"
}

/// The whole content of the file at `path`.
public func readFile(_ path: String) throws(SystemError) -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else {
        let code = errno
        throw SystemError("cannot open \(path): \(errnoText(code))", code: code)
    }
    defer { close(fd) }
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 {
            let code = errno
            if code == EINTR { continue }
            throw SystemError("cannot read \(path): \(errnoText(code))", code: code)
        }
        if n == 0 { return out }
        out.append(contentsOf: chunk[0..<n])
    }
}

/// Creates (or truncates) the file at `path` and writes `bytes` to it.
public func writeFile(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o644) throws(SystemError) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
    guard fd >= 0 else {
        let code = errno
        throw SystemError("cannot create \(path): \(errnoText(code))", code: code)
    }
    defer { close(fd) }
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
        if n < 0 {
            let code = errno
            if code == EINTR { continue }
            throw SystemError("cannot write \(path): \(errnoText(code))", code: code)
        }
        offset += n
    }
}

/// Removes a directory and everything under it, following no symbolic links; a missing
/// path is not an error, and whatever cannot be removed is left.
public func removeTree(_ path: String) {
    for name in (try? listDirectory(path)) ?? [] {
        let child = "\(path)/\(name)"
        var info = stat()
        if lstat(child, &info) == 0, info.st_mode & S_IFMT == S_IFDIR {
            removeTree(child)
        } else {
            unlink(child)
        }
    }
    rmdir(path)
}

/// The names in directory `path` (without "." and "..").
public func listDirectory(_ path: String) throws(SystemError) -> [String] {
    guard let dir = opendir(path) else {
        let code = errno
        throw SystemError("cannot list \(path): \(errnoText(code))", code: code)
    }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
        // Read the name in place: a copy of `d_name` copies all 256 bytes, past the end of a
        // short record, which can be past the end of readdir's buffer (a crash).
        let name = withUnsafeMutablePointer(to: &entry.pointee.d_name) { field in
            String(cString: UnsafeRawPointer(field).assumingMemoryBound(to: CChar.self))
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names
}

/// A new, empty directory `<parent>/<prefix>-XXXXXX` (mkdtemp: mode 0700, a unique name).
public func makeTemporaryDirectory(in parent: String = "/tmp", prefix: String) throws(SystemError) -> String {
    var template = Array("\(parent)/\(prefix)-XXXXXX".utf8CString)
    guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
        let code = errno
        throw SystemError("cannot create a directory under \(parent): \(errnoText(code))", code: code)
    }
    return String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Starts writing `fd`'s dirty pages to disk without waiting for them (Linux's
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`): a later `fsync` finds them written. Fsyncing a
/// batch of files after starting each one's writeback commits the filesystem's journal once
/// for all of them instead of once per file. Best effort: an error only means the `fsync`
/// does the work.
public func startWriteback(_ fd: Int32) {
    _ = colorun_start_writeback(fd)
}

/// Makes everything written to the filesystem holding `fd` durable, in one call (Linux's
/// `syncfs`): data, metadata and the journal of every file on it, other processes' included.
public func syncFilesystem(_ fd: Int32) throws(SystemError) {
    let code = colorun_syncfs(fd)
    guard code == 0 else { throw SystemError("syncfs failed: \(errnoText(code))", code: code) }
}

/// CRC-32C (Castagnoli, as ext4 and iSCSI use) of `bytes`, continuing from `crc` (0 to
/// start): the CPU's crc32 instruction where it has one.
public func crc32c(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
    guard let base = bytes.baseAddress else { return crc }
    return colorun_crc32c(crc, base, bytes.count)
}

/// CRC-32C of `bytes`.
public func crc32c(_ bytes: [UInt8]) -> UInt32 {
    bytes.withUnsafeBytes { crc32c($0) }
}
