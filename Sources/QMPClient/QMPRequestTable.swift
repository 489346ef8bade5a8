import JSON
import NIOCore
import QMP

/// The bookkeeping for commands in flight on one connection, without any I/O: it hands out
/// ids, remembers which command each id belongs to, and routes replies.
///
/// Ids are increasing integers, so the oldest pending command is the one with the smallest id.
/// Each command has a deadline; the owner runs one timer for the earliest deadline and calls
/// `removeExpired(now:)` when it fires (no timer per command).
struct QMPRequestTable<Token> {
    struct Pending {
        var command: String
        var deadline: NIODeadline
        var timeout: TimeAmount
        var token: Token
    }

    /// How a reply was matched.
    enum Routing {
        /// The reply's id belongs to a pending command (now removed).
        case matched(id: Int64, Pending)
        /// The reply names an id that is not pending (timed out already, or never sent).
        case unknownID(JSONValue)
        /// An error reply without an id (QEMU's answer to a command it could not read):
        /// charged to the oldest pending command (now removed).
        case idlessErrorMatchedOldest(id: Int64, Pending)
        /// A reply without an id and nothing it could belong to.
        case unmatched
    }

    private var nextID: Int64 = 1
    private var entries: [Int64: Pending] = [:]

    var count: Int { entries.count }
    var isEmpty: Bool { entries.isEmpty }

    /// The id the next `insert` must use; call `insert` with it before reserving another.
    mutating func reserveID() -> Int64 {
        defer { nextID += 1 }
        return nextID
    }

    mutating func insert(id: Int64, command: String, timeout: TimeAmount, deadline: NIODeadline, token: Token) {
        entries[id] = Pending(command: command, deadline: deadline, timeout: timeout, token: token)
    }

    /// The earliest deadline of any pending command.
    var earliestDeadline: NIODeadline? {
        entries.values.lazy.map(\.deadline).min()
    }

    /// Removes the commands whose deadline is at or before `now`, oldest first.
    mutating func removeExpired(now: NIODeadline) -> [(id: Int64, pending: Pending)] {
        let expired = entries.filter { $0.value.deadline <= now }.sorted { $0.key < $1.key }
        for (id, _) in expired { entries.removeValue(forKey: id) }
        return expired.map { (id: $0.key, pending: $0.value) }
    }

    mutating func remove(id: Int64) -> Pending? {
        entries.removeValue(forKey: id)
    }

    mutating func route(_ reply: QMPReply) -> Routing {
        if let id = reply.id {
            guard let number = id.intValue, let pending = entries.removeValue(forKey: number) else {
                return .unknownID(id)
            }
            return .matched(id: number, pending)
        }
        guard case .failure = reply.result, let oldest = entries.keys.min(), let pending = entries.removeValue(forKey: oldest) else {
            return .unmatched
        }
        return .idlessErrorMatchedOldest(id: oldest, pending)
    }

    /// Empties the table, oldest first.
    mutating func removeAll() -> [(id: Int64, pending: Pending)] {
        let all = entries.sorted { $0.key < $1.key }.map { (id: $0.key, pending: $0.value) }
        entries.removeAll()
        return all
    }
}
