import ColorunSystem
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A fresh directory `/tmp/TAG-XXXXXX` (mkdtemp). The path is kept short on purpose: UNIX
/// socket paths made in it are limited to 107 bytes. A test cannot go on without it, so a
/// failure stops the test process with the reason.
/// Made directories are removed when the test process exits (state directories of Remus
/// tests hold hundreds of MiB each: a suite run left tens of GiB in /tmp before).
public func makeTempDirectory(_ tag: String = "colorun") -> String {
    do {
        let path = try makeTemporaryDirectory(prefix: tag)
        madeDirectories.withLock { made in
            if made.isEmpty { atexit { for path in madeDirectories.withLock({ $0 }) { removeTree(path) } } }
            made.append(path)
        }
        return path
    } catch {
        fatalError("\(error)")
    }
}

/// Every directory `makeTempDirectory` made in this process.
private let madeDirectories = Mutex<[String]>([])

/// Removes a directory and everything in it (no error if it is gone already).
public func removeDirectory(_ path: String) {
    removeTree(path)
}

/// A temporary directory as a value: `file(_:)` names a file in it, `cleanup()` removes it.
public struct TempDir: Sendable {
    public let path: String

    public init(_ tag: String = "sim") {
        path = makeTempDirectory(tag)
    }

    public func file(_ name: String) -> String { "\(path)/\(name)" }

    public func cleanup() { removeDirectory(path) }
}

/// Runs `body` with a fresh temporary directory and removes the directory afterwards, also
/// when `body` throws.
public func withTempDirectory<T>(
    _ tag: String = "colorun", _ body: (TempDir) async throws -> T
) async rethrows -> T {
    let dir = TempDir(tag)
    defer { dir.cleanup() }
    return try await body(dir)
}
