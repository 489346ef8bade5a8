import JSON
import Logging
import NIOCore
import QMP
import QMPClient

/// `colorun qmp ENDPOINT COMMAND [JSON-ARGS]`: one command on one monitor, for operators.
public enum QMPOneShot {
    public enum Failure: Error, Sendable, CustomStringConvertible {
        /// Bad input: endpoint or arguments (exit 2).
        case usage(String)
        /// The monitor answered with an error, or could not be reached (exit 1): `class: desc`.
        case command(errorClass: String, desc: String)

        public var description: String {
            switch self {
            case .usage(let text): return text
            case .command(let errorClass, let desc): return "\(errorClass): \(desc)"
            }
        }
    }

    /// Parses the command-line arguments: the endpoint and the optional JSON object.
    public static func parse(endpoint: String, arguments: String?) throws(Failure) -> (QMPEndpoint, [String: JSONValue]?) {
        let parsedEndpoint: QMPEndpoint
        do {
            parsedEndpoint = try QMPEndpoint(parsing: endpoint)
        } catch {
            throw .usage("ENDPOINT '\(endpoint)': \(error)")
        }
        guard let arguments else { return (parsedEndpoint, nil) }
        let value: JSONValue
        do {
            value = try JSONParser.parse(arguments)
        } catch {
            throw .usage("JSON-ARGS: \(error)")
        }
        guard case .object(let members) = value else {
            throw .usage("JSON-ARGS: expected a JSON object such as '{\"filename\": \"/tmp/x\"}'")
        }
        return (parsedEndpoint, members)
    }

    /// Connects, runs the command, closes; returns the reply's `return` value.
    public static func execute(endpoint: QMPEndpoint, command: String, arguments: [String: JSONValue]?,
                               timeout: TimeAmount, on group: any EventLoopGroup, logger: Logger) async throws(Failure) -> JSONValue {
        let connection: QMPConnection
        do {
            connection = try await QMPConnection.connect(
                to: endpoint, on: group, connectTimeout: timeout, greetingTimeout: timeout, commandTimeout: timeout, logger: logger)
        } catch {
            throw .command(errorClass: "ConnectFailed", desc: error.description)
        }
        do {
            let reply = try await connection.execute(command, arguments: arguments)
            _ = await connection.close()
            return reply
        } catch {
            _ = await connection.close()
            if let body = error.qmpError { throw .command(errorClass: body.errorClass, desc: body.desc) }
            throw .command(errorClass: "Error", desc: error.description)
        }
    }

    /// Indented JSON, object keys sorted.
    public static func pretty(_ value: JSONValue, indent: String = "") -> String {
        let inner = indent + "  "
        switch value {
        case .array(let items):
            if items.isEmpty { return "[]" }
            return "[\n" + items.map { inner + pretty($0, indent: inner) }.joined(separator: ",\n") + "\n" + indent + "]"
        case .object(let members):
            if members.isEmpty { return "{}" }
            let body = members.keys.sorted().map { key in
                var out: [UInt8] = []
                JSONEncoding.writeString(key, into: &out)
                return inner + String(decoding: out, as: UTF8.self) + ": " + pretty(members[key]!, indent: inner)
            }
            return "{\n" + body.joined(separator: ",\n") + "\n" + indent + "}"
        default:
            return compact(value)
        }
    }

    public static func compact(_ value: JSONValue) -> String {
        String(decoding: JSONEncoding.encode(value), as: UTF8.self)
    }
}
