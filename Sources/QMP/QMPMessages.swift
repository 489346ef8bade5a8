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
        var known = KnownMembers()
        for (key, value) in members { known.take(key, value) }
        self = try known.message(json: { json })
    }

    /// Classifies one line from the server the reference way: the whole line parsed into a
    /// `JSONValue` (a parse error is `malformedJSON`), then `init(json:)`.
    public init(parsingWholeObject line: UnsafeRawBufferPointer) throws(QMPProtocolError) {
        let json: JSONValue
        do throws(JSONParseError) { json = try JSONParser.parse(line) } catch { throw .malformedJSON(error) }
        try self.init(json: json)
    }

    /// Classifies one line from the server (its JSON text, without the line end) as
    /// `init(parsingWholeObject:)` does, with the same result and the same errors,
    /// but without building the top-level object: its members are read one at a time and
    /// only the values QMP defines are kept (no dictionary, no hashed key). This is the
    /// client's path for every reply and event.
    public init(line: UnsafeRawBufferPointer) throws(QMPProtocolError) {
        guard var reader = JSONObjectReader(line) else {
            // Not an object: the parser's error, or "not a JSON object", as the tree path says.
            try self.init(parsingWholeObject: line)
            return
        }
        var known = KnownMembers()
        do throws(JSONParseError) {
            while let key = try reader.nextKey() {
                known.take(key, try reader.value())
            }
        } catch {
            throw .malformedJSON(error)
        }
        // The whole object is only made again for the text of an error (a message QMP does not define).
        self = try known.message(json: { (try? JSONParser.parse(line)) ?? .null })
    }

    /// The members QMP gives a meaning to, from either form of a server message. A key that
    /// appears twice keeps its last value, as a parsed object does.
    private struct KnownMembers {
        var greeting: JSONValue?
        var returned: JSONValue?
        var error: JSONValue?
        var event: JSONValue?
        var id: JSONValue?
        var data: JSONValue?
        var timestamp: JSONValue?

        mutating func take(_ key: String, _ value: JSONValue) {
            switch key {
            case "return": returned = value
            case "id": id = value
            case "event": event = value
            case "timestamp": timestamp = value
            case "data": data = value
            case "error": error = value
            case "QMP": greeting = value
            default: break
            }
        }

        func message(json: () -> JSONValue) throws(QMPProtocolError) -> QMPServerMessage {
            if let greeting {
                let capabilities = greeting["capabilities"]?.arrayValue?.compactMap(\.stringValue) ?? []
                return .greeting(QMPGreeting(version: greeting["version"] ?? .null, capabilities: capabilities))
            } else if let returned {
                return .reply(QMPReply(id: id, result: .success(returned)))
            } else if let error {
                let body = QMPErrorBody(
                    errorClass: error["class"]?.stringValue ?? "GenericError",
                    desc: error["desc"]?.stringValue ?? "\(error)")
                return .reply(QMPReply(id: id, result: .failure(QMPErrorBodyError(body))))
            } else if let name = event?.stringValue {
                let seconds = timestamp?["seconds"]?.doubleValue ?? 0
                let micros = timestamp?["microseconds"]?.doubleValue ?? 0
                return .event(QMPEvent(name: name, data: data ?? .object([:]), timestamp: seconds + micros / 1_000_000))
            } else {
                throw .unexpectedMessage("neither greeting, reply nor event: \(json())")
            }
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
