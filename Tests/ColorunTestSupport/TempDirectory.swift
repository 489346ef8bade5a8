import ColorunSystem

/// A fresh directory `/tmp/TAG-XXXXXX` (mkdtemp). The path is kept short on purpose: UNIX
/// socket paths made in it are limited to 107 bytes. A test cannot go on without it, so a
/// failure stops the test process with the reason.
public func makeTempDirectory(_ tag: String = "colorun") -> String {
    do {
        return try makeTemporaryDirectory(prefix: tag)
    } catch {
        fatalError("\(error)")
    }
}

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
