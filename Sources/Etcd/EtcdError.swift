/// What went wrong talking to etcd; the text names the endpoint (or every endpoint tried).
public struct EtcdError: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Kind: Sendable, Hashable {
        /// No endpoint could be reached in time (refused, unreachable, timed out).
        case unavailable
        /// The request did not complete within its timeout.
        case timeout
        /// etcd answered with an error (`code` is the gRPC status code: 5 not found, 3 invalid argument, ...).
        case server(code: Int)
        /// The answer is not what etcd's JSON gateway sends (not etcd, or a proxy in the way).
        case badResponse
        /// Bad input from the caller (an endpoint URL, TLS files).
        case usage
        /// The client was shut down.
        case shutDown
    }

    public var kind: Kind
    /// The endpoint that answered or failed last, if any.
    public var endpoint: String?
    public var message: String

    public init(kind: Kind, endpoint: String?, message: String) {
        self.kind = kind
        self.endpoint = endpoint
        self.message = message
    }

    /// gRPC code 5: the lease (or another object) is not found.
    public var isNotFound: Bool { kind == .server(code: 5) }

    public var description: String {
        endpoint.map { "etcd \($0): \(message)" } ?? "etcd: \(message)"
    }
}
