import ColorunSystem
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The fencing token of an owner of a pair (a fleet instance): the create revision of its
/// ownership key in etcd, and how long this process may still believe it holds that key.
///
/// The generation store checks it before every commit (`GenerationStore.commitAll`, the one
/// place a generation becomes visible, alone or grouped), so an owner that lost the pair without knowing it
/// yet cannot write a generation:
/// - locally: once `validUntil` has passed (its lease was not renewed in time) or the token
///   was `revoke`d, every commit is refused;
/// - in the pair's state directory, which every owner of the pair shares: the file
///   `fencing-token` holds the highest token any owner claimed (`claim()`, done by the new
///   owner before it runs the pair); a commit with a lower token is refused.
public final class FencingToken: Sendable {
    public let token: Int64
    /// The file holding the highest token claimed for the pair.
    public let path: String
    private let state: Mutex<(validUntil: ContinuousClock.Instant, revoked: String?)>

    public init(token: Int64, path: String, validUntil: ContinuousClock.Instant) {
        self.token = token
        self.path = path
        self.state = Mutex((validUntil, nil))
    }

    /// The owner's lease was renewed: the token is good until `instant`.
    public func extend(until instant: ContinuousClock.Instant) {
        state.withLock { $0.validUntil = max($0.validUntil, instant) }
    }

    /// The owner gave the pair up or lost it: no commit from now on.
    public func revoke(_ reason: String) {
        state.withLock { if $0.revoked == nil { $0.revoked = reason } }
    }

    /// The token recorded in `path` (0 when there is none).
    public static func recorded(at path: String) -> Int64 {
        guard let bytes = try? readFile(path) else { return 0 }
        return Int64(String(decoding: bytes, as: UTF8.self).trimmingWhitespace) ?? 0
    }

    /// Records this token as the pair's newest (after winning ownership, before running the
    /// pair). Refused when a newer token is recorded already.
    public func claim() throws(SystemError) {
        let recorded = Self.recorded(at: path)
        guard recorded <= token else {
            throw SystemError("\(path): fencing token \(token) is stale: the pair's token is \(recorded) (another owner claimed it since)")
        }
        if recorded == token { return }
        let directory = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        if !directory.isEmpty { try makeDirectories(directory) }
        let partial = path + ".partial-\(getpid())"
        try writeFile(partial, Array("\(token)\n".utf8))
        guard rename(partial, path) == 0 else {
            let text = errnoText()
            unlink(partial)
            throw SystemError("\(path): cannot record fencing token \(token): \(text)")
        }
    }

    /// Why a commit must be refused now, nil when it may go ahead.
    func refusal() -> String? {
        let (validUntil, revoked) = state.withLock { ($0.validUntil, $0.revoked) }
        if let revoked { return "fencing token \(token) was given up: \(revoked)" }
        if ContinuousClock.now >= validUntil { return "fencing token \(token) is no longer held: the owner's lease was not renewed in time" }
        let recorded = Self.recorded(at: path)
        if recorded > token { return "fencing token \(token) is stale: the pair is owned with token \(recorded) now" }
        return nil
    }

    private func makeDirectories(_ path: String) throws(SystemError) {
        var current = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            current += "/" + component
            if mkdir(current, 0o700) != 0 && errno != EEXIST {
                throw SystemError("\(current): cannot create directory: \(errnoText())")
            }
        }
    }
}

extension String {
    fileprivate var trimmingWhitespace: String {
        String(drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
    }
}
