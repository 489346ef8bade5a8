import JSON
import QMP

/// One unit of client input, as QEMU's JSON streamer delivers it to the monitor: a complete
/// JSON value, or a parse error (QEMU answers it with a `GenericError` and goes on).
public enum QMPInput: Sendable, Hashable {
    case value(JSONValue)
    /// `desc` is the whole error text, e.g. `JSON parse error, invalid keyword 'bad'`.
    case invalid(desc: String)
}

/// A command that passed QMP's envelope checks: `execute` is a string, `arguments` an
/// object, no unexpected member.
public struct ParsedCommand: Sendable, Hashable {
    public var name: String
    public var arguments: [String: JSONValue]
    public var id: JSONValue?
    public var outOfBand: Bool

    public init(name: String, arguments: [String: JSONValue] = [:], id: JSONValue? = nil, outOfBand: Bool = false) {
        self.name = name
        self.arguments = arguments
        self.id = id
        self.outOfBand = outOfBand
    }
}

/// What one connection has negotiated.
public struct QMPSessionState: Sendable, Hashable {
    /// `qmp_capabilities` succeeded.
    public var negotiated = false
    /// The client enabled the `oob` capability.
    public var outOfBandEnabled = false

    public init() {}
}

/// The replies and events one command produced, in the order QEMU sends them.
public struct CommandOutcome: Sendable, Hashable {
    /// Events sent before the reply (STOP before `stop`'s reply, SHUTDOWN before `quit`'s).
    public var eventsBefore: [QMPEvent] = []
    public var reply: QMPReply
    /// Events sent after the reply (STOP after `migrate`'s reply, COLO_EXIT).
    public var eventsAfter: [QMPEvent] = []
    /// The monitor closes the connection after the reply (`quit`).
    public var closesConnection = false

    public init(eventsBefore: [QMPEvent] = [], reply: QMPReply, eventsAfter: [QMPEvent] = [], closesConnection: Bool = false) {
        self.eventsBefore = eventsBefore
        self.reply = reply
        self.eventsAfter = eventsAfter
        self.closesConnection = closesConnection
    }

    /// Every message, in wire order.
    public var messages: [JSONValue] {
        eventsBefore.map(\.json) + [reply.json] + eventsAfter.map(\.json)
    }
}

extension QMPInput {
    /// QMP's envelope checks (QEMU's `qmp_dispatch_check_obj`), with QEMU's error texts.
    /// Returns the command, or the error reply to send instead.
    public func parseCommand(session: QMPSessionState) -> Result<ParsedCommand, QMPReplyError> {
        let members: [String: JSONValue]
        switch self {
        case .invalid(let desc):
            return .failure(QMPReplyError(id: nil, body: QMPErrorBody(errorClass: "GenericError", desc: desc)))
        case .value(.object(let m)):
            members = m
        case .value:
            return .failure(QMPReplyError(id: nil, body: .generic("QMP input must be a JSON object")))
        }
        let id = members["id"]
        func fail(_ desc: String) -> Result<ParsedCommand, QMPReplyError> {
            .failure(QMPReplyError(id: id, body: .generic(desc)))
        }
        var name: String?
        var outOfBand = false
        for key in members.keys.sorted() {
            let value = members[key]!
            switch key {
            case "execute":
                guard case .string(let s) = value else { return fail("QMP input member 'execute' must be a string") }
                name = s
            case "exec-oob" where session.outOfBandEnabled:
                guard case .string(let s) = value else { return fail("QMP input member 'exec-oob' must be a string") }
                name = s
                outOfBand = true
            case "arguments":
                guard case .object = value else { return fail("QMP input member 'arguments' must be an object") }
            case "id":
                break
            default:
                return fail("QMP input member '\(key)' is unexpected")
            }
        }
        if members["execute"] != nil, members["exec-oob"] != nil, session.outOfBandEnabled {
            return fail("QMP input must not have both 'execute' and 'exec-oob'")
        }
        guard let name else { return fail("QMP input lacks member 'execute'") }
        var arguments: [String: JSONValue] = [:]
        if case .object(let a) = members["arguments"] { arguments = a }
        return .success(ParsedCommand(name: name, arguments: arguments, id: id, outOfBand: outOfBand))
    }
}

/// An error reply that QMP's envelope checks produced before any command ran.
public struct QMPReplyError: Error, Sendable, Hashable {
    public var id: JSONValue?
    public var body: QMPErrorBody

    public var reply: QMPReply { QMPReply(id: id, result: .failure(QMPErrorBodyError(body))) }
}

extension QMPErrorBody {
    static func generic(_ desc: String) -> QMPErrorBody { QMPErrorBody(errorClass: "GenericError", desc: desc) }
    static func commandNotFound(_ desc: String) -> QMPErrorBody { QMPErrorBody(errorClass: "CommandNotFound", desc: desc) }
}
