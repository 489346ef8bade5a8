import AsyncHTTPClient
import JSON
import Logging
import NIOCore
import NIOHTTP1
import NIOSSL
import Synchronization

/// TLS to etcd: the CA that signed the members' certificates, and a client certificate and
/// key when the members ask for one (`--client-cert-auth`). PEM files.
public struct EtcdTLS: Sendable, Hashable {
    public var caFile: String?
    public var certFile: String?
    public var keyFile: String?

    public init(caFile: String? = nil, certFile: String? = nil, keyFile: String? = nil) {
        self.caFile = caFile
        self.certFile = certFile
        self.keyFile = keyFile
    }
}

/// A small etcd v3 client over etcd's JSON gateway (`POST /v3/...`, keys and values in
/// base64), on AsyncHTTPClient: key-values, transactions with revision compares, leases,
/// watches and member status.
///
/// Why the gateway and not gRPC: the gateway is plain HTTP/1.1 and JSON, so the client needs
/// no generated code (grpc-swift would need the etcd protos compiled and committed) and no
/// extra build weight beyond AsyncHTTPClient, whose swift-nio-ssl gives https endpoints; and
/// every request can be replayed with `curl`. What it costs: a watch is one HTTP stream per
/// watched key, and keep-alives are one request each (both fine for a handful of keys).
///
/// Endpoints: a request goes to the endpoint that answered last; one that cannot be reached
/// (refused, unreachable, no answer in time, or a member that says it has no leader) is
/// skipped for the next, and the error of a request that no endpoint answered names each
/// endpoint and what happened there. Every request has a timeout (`requestTimeout` unless
/// the call gives one) that bounds all its attempts together.
///
/// Call `shutdown()` before dropping the client.
public final class EtcdClient: Sendable {
    public let endpoints: [String]
    public let requestTimeout: TimeAmount
    private let http: HTTPClient
    private let preferred = Mutex(0)
    private let logger: Logger

    /// `endpoints`: `http://HOST:PORT` or `https://HOST:PORT` (port 2379 if left out).
    /// `eventLoopGroup`: the group whose loops run the connections (share the session's).
    public init(
        endpoints: [String], tls: EtcdTLS? = nil, requestTimeout: TimeAmount = .seconds(2),
        eventLoopGroup: any EventLoopGroup, logger: Logger = Logger(label: "colorun.etcd")
    ) throws(EtcdError) {
        guard !endpoints.isEmpty else { throw EtcdError(kind: .usage, endpoint: nil, message: "no endpoint given") }
        self.endpoints = try endpoints.map { text throws(EtcdError) in try Self.normalize(text) }
        self.requestTimeout = requestTimeout
        self.logger = logger
        var configuration = HTTPClient.Configuration(
            timeout: .init(connect: max(requestTimeout, .seconds(1))))
        configuration.httpVersion = .http1Only
        if let tls {
            configuration.tlsConfiguration = try Self.tlsConfiguration(tls)
        } else if self.endpoints.contains(where: { $0.hasPrefix("https://") }) {
            configuration.tlsConfiguration = TLSConfiguration.makeClientConfiguration()
        }
        http = HTTPClient(eventLoopGroup: eventLoopGroup, configuration: configuration, backgroundActivityLogger: logger)
    }

    /// Closes the connections. Call once, before dropping the client.
    public func shutdown() async {
        try? await http.shutdown()
    }

    static func normalize(_ text: String) throws(EtcdError) -> String {
        var url = text
        while url.hasSuffix("/") { url.removeLast() }
        guard url.hasPrefix("http://") || url.hasPrefix("https://") else {
            throw EtcdError(kind: .usage, endpoint: text, message: "an endpoint is http://HOST:PORT or https://HOST:PORT")
        }
        let rest = url.drop(while: { $0 != "/" }).dropFirst(2)
        guard !rest.isEmpty, !rest.contains("/") else {
            throw EtcdError(kind: .usage, endpoint: text, message: "an endpoint is http://HOST:PORT or https://HOST:PORT (no path)")
        }
        // A bracketed IPv6 address holds colons of its own.
        let hostPort = rest.hasPrefix("[") ? String(rest.drop(while: { $0 != "]" })) : String(rest)
        if !hostPort.contains(":") { url += ":2379" }
        return url
    }

    static func tlsConfiguration(_ tls: EtcdTLS) throws(EtcdError) -> TLSConfiguration {
        var configuration = TLSConfiguration.makeClientConfiguration()
        do {
            if let ca = tls.caFile {
                configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(ca))
            }
            if let cert = tls.certFile {
                configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(cert).map { .certificate($0) }
            }
            if let key = tls.keyFile {
                configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
            }
        } catch {
            throw EtcdError(kind: .usage, endpoint: nil, message: "TLS files (CA \(tls.caFile ?? "system"), cert \(tls.certFile ?? "none"), key \(tls.keyFile ?? "none")): \(error)")
        }
        guard (tls.certFile == nil) == (tls.keyFile == nil) else {
            throw EtcdError(kind: .usage, endpoint: nil, message: "a client certificate needs its key and a key its certificate")
        }
        return configuration
    }

    // MARK: - Key-values

    /// The key-values of `key` (or of every key starting with `key` when `prefix`), and the store's revision.
    public func range(_ key: String, prefix: Bool = false, timeout: TimeAmount? = nil) async throws(EtcdError) -> (kvs: [EtcdKeyValue], revision: Int64) {
        let reply = try await call("/v3/kv/range", .object(Self.rangeFields(key, prefix: prefix)), timeout: timeout)
        var kvs: [EtcdKeyValue] = []
        for kv in reply.value["kvs"]?.arrayValue ?? [] { kvs.append(try EtcdKeyValue(kv)) }
        return (kvs, reply.value.headerRevision)
    }

    /// The key's key-value, nil if it does not exist.
    public func get(_ key: String, timeout: TimeAmount? = nil) async throws(EtcdError) -> EtcdKeyValue? {
        try await range(key, timeout: timeout).kvs.first
    }

    /// Writes a key (attached to `lease` unless 0); returns the store's new revision.
    @discardableResult
    public func put(_ key: String, _ value: String, lease: Int64 = 0, timeout: TimeAmount? = nil) async throws(EtcdError) -> Int64 {
        var body: [String: JSONValue] = ["key": .string(Base64.encode(key)), "value": .string(Base64.encode(value))]
        if lease != 0 { body["lease"] = .string(String(lease)) }
        return try await call("/v3/kv/put", .object(body), timeout: timeout).value.headerRevision
    }

    /// Deletes a key (or every key under a prefix); returns how many were deleted.
    @discardableResult
    public func delete(_ key: String, prefix: Bool = false, timeout: TimeAmount? = nil) async throws(EtcdError) -> Int64 {
        try await call("/v3/kv/deleterange", .object(Self.rangeFields(key, prefix: prefix)), timeout: timeout).value["deleted"].int64
    }

    /// A transaction: if every comparison holds, `success` runs, else `failure`, atomically.
    public func txn(
        compare: [EtcdCompare], success: [EtcdOperation], failure: [EtcdOperation] = [], timeout: TimeAmount? = nil
    ) async throws(EtcdError) -> EtcdTxnResult {
        let body: JSONValue = [
            "compare": .array(compare.map(\.json)), "success": .array(success.map(\.json)), "failure": .array(failure.map(\.json)),
        ]
        let (reply, endpoint) = try await call("/v3/kv/txn", body, timeout: timeout)
        var ranges: [[EtcdKeyValue]] = []
        for response in reply["responses"]?.arrayValue ?? [] {
            var kvs: [EtcdKeyValue] = []
            for kv in response["response_range"]?["kvs"]?.arrayValue ?? [] {
                do { kvs.append(try EtcdKeyValue(kv)) } catch { throw EtcdError(kind: .badResponse, endpoint: endpoint, message: error.message) }
            }
            ranges.append(kvs)
        }
        return EtcdTxnResult(succeeded: reply["succeeded"]?.boolValue ?? false, revision: reply.headerRevision, ranges: ranges)
    }

    static func rangeFields(_ key: String, prefix: Bool) -> [String: JSONValue] {
        var fields: [String: JSONValue] = ["key": .string(Base64.encode(key))]
        if prefix { fields["range_end"] = .string(Base64.encode(prefixEnd(Array(key.utf8)))) }
        return fields
    }

    /// The first key after every key starting with `prefix` (etcd's range_end for a prefix).
    static func prefixEnd(_ prefix: [UInt8]) -> [UInt8] {
        var end = prefix
        while let last = end.last {
            if last < 0xFF {
                end[end.count - 1] = last + 1
                return end
            }
            end.removeLast()
        }
        return [0]   // every key
    }

    // MARK: - Leases

    /// Grants a lease of `ttl` seconds (etcd raises a TTL below its minimum to the minimum).
    public func grantLease(ttl: Int64, timeout: TimeAmount? = nil) async throws(EtcdError) -> EtcdLease {
        let (reply, endpoint) = try await call("/v3/lease/grant", ["TTL": .string(String(ttl))], timeout: timeout)
        let id = reply["ID"].int64
        guard id != 0 else {
            throw EtcdError(kind: .server(code: 0), endpoint: endpoint, message: "lease not granted: \(reply["error"]?.stringValue ?? "\(reply)")")
        }
        return EtcdLease(id: id, ttl: reply["TTL"].int64)
    }

    /// Renews a lease once; returns the TTL it has again, in seconds: 0 when the lease has
    /// expired or does not exist (the keys attached to it are gone).
    public func keepAlive(_ lease: Int64, timeout: TimeAmount? = nil) async throws(EtcdError) -> Int64 {
        try await call("/v3/lease/keepalive", ["ID": .string(String(lease))], timeout: timeout).value["TTL"].int64
    }

    /// Revokes a lease (its keys are deleted at once). A lease already gone is not an error.
    public func revokeLease(_ lease: Int64, timeout: TimeAmount? = nil) async throws(EtcdError) {
        do {
            _ = try await call("/v3/lease/revoke", ["ID": .string(String(lease))], timeout: timeout)
        } catch where error.isNotFound {
            return
        }
    }

    /// The seconds a lease has left (-1 when it does not exist).
    public func timeToLive(_ lease: Int64, timeout: TimeAmount? = nil) async throws(EtcdError) -> Int64 {
        let reply = try await call("/v3/lease/timetolive", ["ID": .string(String(lease))], timeout: timeout).value
        guard let ttl = reply["TTL"] else { return 0 }
        return Optional(ttl).int64
    }

    // MARK: - Members

    /// The status of one member (not the whole cluster): ask each endpoint for the leader.
    public func status(of endpoint: String, timeout: TimeAmount? = nil) async throws(EtcdError) -> EtcdStatus {
        let url = try Self.normalize(endpoint)
        let reply = try await request(url, "/v3/maintenance/status", [:], deadline: .now() + (timeout ?? requestTimeout))
        return EtcdStatus(
            memberID: reply["header"]?["member_id"]?.stringValue ?? "", leaderID: reply["leader"]?.stringValue ?? "",
            raftTerm: reply["raftTerm"].int64, version: reply["version"]?.stringValue ?? "")
    }

    // MARK: - Requests

    /// POSTs `body` to `path`, trying each endpoint from the one that answered last; the
    /// reply's `result` object for streaming calls (keep-alive), and the endpoint that answered.
    func call(_ path: String, _ body: JSONValue, timeout: TimeAmount?) async throws(EtcdError) -> (value: JSONValue, endpoint: String) {
        let deadline = NIODeadline.now() + (timeout ?? requestTimeout)
        let first = preferred.withLock { $0 }
        var failures: [String] = []
        for offset in 0..<endpoints.count {
            let index = (first + offset) % endpoints.count
            let endpoint = endpoints[index]
            let left = endpoints.count - offset
            let now = NIODeadline.now()
            guard now < deadline else { break }
            // The time left, shared among the endpoints not tried yet.
            let attemptDeadline = now + .nanoseconds((deadline - now).nanoseconds / Int64(left))
            do {
                let value = try await request(endpoint, path, body, deadline: attemptDeadline)
                if offset > 0 {
                    preferred.withLock { $0 = index }
                    logger.info("etcd: using another endpoint", metadata: ["endpoint": .string(endpoint), "skipped": .string(failures.joined(separator: "; "))])
                }
                return (value, endpoint)
            } catch {
                switch error.kind {
                case .unavailable, .timeout, .badResponse:
                    failures.append("\(endpoint): \(error.message)")
                case .server(let code) where code == 14 || code == 4:
                    // Unavailable or deadline exceeded: a member without a leader, or cut off from its quorum.
                    failures.append("\(endpoint): \(error.message)")
                default:
                    throw error
                }
            }
        }
        if failures.count == 1, let only = endpoints.first, endpoints.count == 1 {
            throw EtcdError(kind: .unavailable, endpoint: only, message: String(failures[0].dropFirst(only.count + 2)))
        }
        let untried = endpoints.count - failures.count
        throw EtcdError(
            kind: .unavailable, endpoint: nil,
            message: "no endpoint answered \(path) within \(Self.text(timeout ?? requestTimeout)): " + failures.joined(separator: "; ")
                + (untried > 0 ? " (\(untried) endpoint(s) not tried: out of time)" : ""))
    }

    /// One POST to one endpoint.
    func request(_ endpoint: String, _ path: String, _ body: JSONValue, deadline: NIODeadline) async throws(EtcdError) -> JSONValue {
        var request = HTTPClientRequest(url: endpoint + path)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: JSONEncoding.encode(body)))
        let bytes: ByteBuffer
        let status: HTTPResponseStatus
        do {
            let response = try await http.execute(request, deadline: deadline, logger: logger)
            status = response.status
            bytes = try await response.body.collect(upTo: 16 << 20)
        } catch {
            throw Self.transportError(error, endpoint: endpoint, deadline: deadline)
        }
        let parsed: JSONValue
        do {
            parsed = try JSONParser.parse(bytes.readableBytesView)
        } catch {
            let text = String(decoding: bytes.readableBytesView.prefix(120), as: UTF8.self)
            throw EtcdError(kind: .badResponse, endpoint: endpoint, message: "\(path): HTTP \(status.code), not etcd's JSON: \(text.isEmpty ? "(empty body)" : text)")
        }
        // An error: {"error": TEXT, "code": N, "message": TEXT} (gRPC codes map to HTTP
        // statuses: 5 not found is 404); streaming calls (keep-alive) wrap each reply in
        // {"result": ...} or {"error": {"grpc_code": N, "message": ...}}.
        if let code = parsed["code"]?.intValue, let message = parsed["message"]?.stringValue ?? parsed["error"]?.stringValue {
            throw EtcdError(kind: .server(code: Int(code)), endpoint: endpoint, message: "\(path): \(message)")
        }
        if let error = parsed["error"], case .object = error {
            let code = error["grpc_code"]?.intValue ?? error["code"]?.intValue ?? 0
            throw EtcdError(kind: .server(code: Int(code)), endpoint: endpoint, message: "\(path): \(error["message"]?.stringValue ?? "\(error)")")
        }
        let reply = parsed["result"] ?? parsed
        guard status == .ok else {
            throw EtcdError(kind: .badResponse, endpoint: endpoint, message: "\(path): HTTP \(status.code)")
        }
        return reply
    }

    static func transportError(_ error: any Error, endpoint: String, deadline: NIODeadline) -> EtcdError {
        if let error = error as? HTTPClientError {
            if error == .deadlineExceeded || error == .readTimeout || error == .connectTimeout || error == .getConnectionFromPoolTimeout {
                return EtcdError(kind: .timeout, endpoint: endpoint, message: "no answer in time (\(error))")
            }
            if error == .alreadyShutdown {
                return EtcdError(kind: .shutDown, endpoint: endpoint, message: "the client is shut down")
            }
        }
        if error is CancellationError {
            return EtcdError(kind: .timeout, endpoint: endpoint, message: "cancelled")
        }
        if NIODeadline.now() >= deadline {
            return EtcdError(kind: .timeout, endpoint: endpoint, message: "no answer in time (\(error))")
        }
        return EtcdError(kind: .unavailable, endpoint: endpoint, message: "\(error)")
    }

    static func text(_ amount: TimeAmount) -> String {
        let ms = amount.nanoseconds / 1_000_000
        return ms % 1000 == 0 ? "\(ms / 1000) s" : "\(ms) ms"
    }

    var httpClient: HTTPClient { http }
    var endpointIndex: Int { preferred.withLock { $0 } }
    var logging: Logger { logger }
}
