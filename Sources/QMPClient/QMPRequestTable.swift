import JSON
import NIOCore
import QMP

/// The bookkeeping for commands in flight on one connection, without any I/O: it keeps the
/// commands in the order they were sent and routes each reply to the oldest.
///
/// Commands go out without an `id`. QEMU answers in-band commands strictly in the order it
/// read them (one dispatcher runs them one at a time, and a line it cannot parse is answered
/// with an error in its place); the QMP specification asks for an id only to match
/// out-of-band replies, which overtake, and colorun sends no out-of-band command. The id
/// would cost more than bookkeeping: QEMU 7.2 reads a command from its socket one byte per
/// main-loop iteration, about 3.6 µs a byte on this project's test host, so the 6 to 12
/// bytes of `,"id":N` were 20 to 40 µs of every round trip (docs/qemu-notes.md).
///
/// A command that timed out keeps its place, abandoned: QEMU still answers it, and that
/// late answer must not be taken for the next command's. Each command has a deadline; the
/// owner runs one timer for the earliest and calls `expire(now:)` when it fires (no timer
/// per command).
struct QMPRequestTable<Token> {
    struct Pending {
        var command: String
        var deadline: NIODeadline
        var timeout: TimeAmount
        var token: Token
    }

    /// How a reply was matched.
    enum Routing {
        /// The reply answers the oldest command in flight (now removed).
        case matched(Pending)
        /// The reply answers a command that timed out already (its place is now freed).
        case late(command: String)
        /// The reply carries an id; colorun sends none, so it answers nothing colorun asked.
        case unexpectedID(JSONValue)
        /// Nothing is in flight.
        case unmatched
    }

    private enum Entry {
        case waiting(Pending)
        case abandoned(command: String)
    }

    /// Every command whose reply has not arrived yet, oldest first.
    private var line = CircularBuffer<Entry>(initialCapacity: 4)
    /// How many of `line` still wait (not abandoned).
    private(set) var count = 0

    var isEmpty: Bool { count == 0 }

    mutating func append(command: String, timeout: TimeAmount, deadline: NIODeadline, token: Token) {
        line.append(.waiting(Pending(command: command, deadline: deadline, timeout: timeout, token: token)))
        count += 1
    }

    /// The earliest deadline of any waiting command.
    var earliestDeadline: NIODeadline? {
        var earliest: NIODeadline?
        for case .waiting(let pending) in line where earliest.map({ pending.deadline < $0 }) ?? true {
            earliest = pending.deadline
        }
        return earliest
    }

    /// Abandons the waiting commands whose deadline is at or before `now` and returns them,
    /// oldest first; their places stay in line for their late replies.
    mutating func expire(now: NIODeadline) -> [Pending] {
        var expired: [Pending] = []
        for index in line.indices {
            guard case .waiting(let pending) = line[index], pending.deadline <= now else { continue }
            expired.append(pending)
            line[index] = .abandoned(command: pending.command)
        }
        count -= expired.count
        return expired
    }

    mutating func route(_ reply: QMPReply) -> Routing {
        if let id = reply.id { return .unexpectedID(id) }
        guard let oldest = line.popFirst() else { return .unmatched }
        switch oldest {
        case .waiting(let pending):
            count -= 1
            return .matched(pending)
        case .abandoned(let command):
            return .late(command: command)
        }
    }

    /// Empties the table; returns the commands still waiting, oldest first.
    mutating func removeAll() -> [Pending] {
        let waiting = line.compactMap { entry -> Pending? in
            if case .waiting(let pending) = entry { return pending }
            return nil
        }
        line.removeAll()
        count = 0
        return waiting
    }
}
