import JSON
/// QMP's message types, as QEMU's qapi/qmp-spec describes them.
///
/// Server to client: a greeting, then replies (`return` or `error`, with the command's
/// `id` echoed back) and asynchronous events. Client to server: commands.

/// The first thing a QMP server says: `{"QMP": {"version": {...}, "capabilities": [...]}}`.
public struct QMPGreeting: Sendable, Hashable {
    public var version: JSONValue
    public var capabilities: [String]

    public init(version: JSONValue, capabilities: [String]) {
        self.version = version
        self.capabilities = capabilities
    }

    /// "7.2.22", from `version.qemu.{major,minor,micro}`.
    public var qemuVersion: String {
        let q = version["qemu"]
        let parts = ["major", "minor", "micro"].map { q?[$0]?.intValue.map(String.init) ?? "?" }
        return parts.joined(separator: ".")
    }

    /// `version.package`, e.g. "Debian 1:7.2+dfsg-7+deb12u18+b3".
    public var package: String { version["package"]?.stringValue ?? "" }

    public var json: JSONValue {
        .object(["QMP": .object(["version": version, "capabilities": .array(capabilities.map { .string($0) })])])
    }
}

/// The body of an error reply: `{"class": "GenericError", "desc": "..."}`.
public struct QMPErrorBody: Sendable, Hashable, CustomStringConvertible {
    public var errorClass: String
    public var desc: String

    public init(errorClass: String, desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }

    public var description: String { "\(errorClass): \(desc)" }

    public var json: JSONValue { .object(["class": .string(errorClass), "desc": .string(desc)]) }
}

/// A reply to a command. `id` is nil when the command had none (or the server could not
/// read it, as for a malformed command).
public struct QMPReply: Sendable, Hashable {
    public var id: JSONValue?
    public var result: Result<JSONValue, QMPErrorBodyError>

    public init(id: JSONValue?, result: Result<JSONValue, QMPErrorBodyError>) {
        self.id = id
        self.result = result
    }

    public var json: JSONValue {
        var members: [String: JSONValue] = [:]
        switch result {
        case .success(let value): members["return"] = value
        case .failure(let error): members["error"] = error.body.json
        }
        if let id { members["id"] = id }
        return .object(members)
    }
}

/// `QMPErrorBody` as an `Error`, so a reply's result can be a `Result`.
public struct QMPErrorBodyError: Error, Sendable, Hashable {
    public var body: QMPErrorBody
    public init(_ body: QMPErrorBody) { self.body = body }
}

/// An asynchronous event: `{"event": "STOP", "data": {...}, "timestamp": {"seconds", "microseconds"}}`.
public struct QMPEvent: Sendable, Hashable {
    public var name: String
    public var data: JSONValue
    /// Seconds since the epoch, from the event's timestamp.
    public var timestamp: Double

    public init(name: String, data: JSONValue = .object([:]), timestamp: Double) {
        self.name = name
        self.data = data
        self.timestamp = timestamp
    }

    public var json: JSONValue {
        let seconds = timestamp.rounded(.down)
        var members: [String: JSONValue] = [
            "event": .string(name),
            "timestamp": .object([
                "seconds": .int(Int64(seconds)),
                "microseconds": .int(Int64(((timestamp - seconds) * 1_000_000).rounded(.down))),
            ]),
        ]
        if data != .object([:]) { members["data"] = data }
        return .object(members)
    }
}

/// Anything a QMP server sends.
public enum QMPServerMessage: Sendable, Hashable {
    case greeting(QMPGreeting)
    case reply(QMPReply)
    case event(QMPEvent)

    /// Classifies one JSON object from the server; throws for anything QMP does not define.
    public init(json: JSONValue) throws(QMPProtocolError) {
        guard case .object(let members) = json else {
            throw .unexpectedMessage("not a JSON object: \(json)")
        }
        if let greeting = members["QMP"] {
            let capabilities = greeting["capabilities"]?.arrayValue?.compactMap(\.stringValue) ?? []
            self = .greeting(QMPGreeting(version: greeting["version"] ?? .null, capabilities: capabilities))
        } else if let value = members["return"] {
            self = .reply(QMPReply(id: members["id"], result: .success(value)))
        } else if let error = members["error"] {
            let body = QMPErrorBody(
                errorClass: error["class"]?.stringValue ?? "GenericError",
                desc: error["desc"]?.stringValue ?? "\(error)")
            self = .reply(QMPReply(id: members["id"], result: .failure(QMPErrorBodyError(body))))
        } else if let name = members["event"]?.stringValue {
            let ts = members["timestamp"]
            let seconds = ts?["seconds"]?.doubleValue ?? 0
            let micros = ts?["microseconds"]?.doubleValue ?? 0
            self = .event(QMPEvent(name: name, data: members["data"] ?? .object([:]), timestamp: seconds + micros / 1_000_000))
        } else {
            throw .unexpectedMessage("neither greeting, reply nor event: \(json)")
        }
    }

    public var json: JSONValue {
        switch self {
        case .greeting(let g): return g.json
        case .reply(let r): return r.json
        case .event(let e): return e.json
        }
    }
}

/// A command from a client: `{"execute": "stop", "arguments": {...}, "id": ...}`
/// (or `exec-oob` for an out-of-band command).
public struct QMPCommand: Sendable, Hashable {
    public var name: String
    public var arguments: [String: JSONValue]?
    public var id: JSONValue?
    public var outOfBand: Bool

    public init(name: String, arguments: [String: JSONValue]? = nil, id: JSONValue? = nil, outOfBand: Bool = false) {
        self.name = name
        self.arguments = arguments
        self.id = id
        self.outOfBand = outOfBand
    }

    public var json: JSONValue {
        var members: [String: JSONValue] = [(outOfBand ? "exec-oob" : "execute"): .string(name)]
        if let arguments { members["arguments"] = .object(arguments) }
        if let id { members["id"] = id }
        return .object(members)
    }
}

/// The protocol went wrong: the connection cannot be trusted any more.
public enum QMPProtocolError: Error, Sendable, Hashable, CustomStringConvertible {
    /// A line was not valid JSON.
    case malformedJSON(JSONParseError)
    /// A line grew past the maximum before its newline arrived.
    case lineTooLong(limit: Int)
    /// Valid JSON that is not a QMP message.
    case unexpectedMessage(String)

    public var description: String {
        switch self {
        case .malformedJSON(let e): return "malformed JSON from peer: \(e)"
        case .lineTooLong(let limit): return "line longer than \(limit) bytes from peer"
        case .unexpectedMessage(let what): return "unexpected message from peer: \(what)"
        }
    }
}
