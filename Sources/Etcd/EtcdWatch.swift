import AsyncHTTPClient
import JSON
import NIOCore

extension EtcdClient {
    /// Watches `key` (or every key under it when `prefix`) from revision `fromRevision`
    /// (0: from now), calling `onEvents` with each batch of changes until it returns false,
    /// `deadline` passes (then it returns normally), or the stream fails (it throws; watch
    /// again from the revision after the last event seen).
    ///
    /// The watch is one streaming POST to `/v3/watch` on the first endpoint that accepts it.
    public func watch(
        _ key: String, prefix: Bool = false, fromRevision: Int64 = 0, until deadline: NIODeadline? = nil,
        _ onEvents: ([EtcdWatchEvent]) async -> Bool
    ) async throws(EtcdError) {
        var create = Self.rangeFields(key, prefix: prefix)
        if fromRevision > 0 { create["start_revision"] = .string(String(fromRevision)) }
        let body = JSONEncoding.encode(["create_request": .object(create)])
        let end = deadline ?? .distantFuture
        let first = endpointIndex
        var failures: [String] = []
        for offset in 0..<endpoints.count {
            let endpoint = endpoints[(first + offset) % endpoints.count]
            var request = HTTPClientRequest(url: endpoint + "/v3/watch")
            request.method = .POST
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: body))
            let response: HTTPClientResponse
            do {
                // The connect (and the first answer) gets the request timeout; the stream then runs to `end`.
                response = try await httpClient.execute(request, deadline: end, logger: logging)
            } catch {
                if NIODeadline.now() >= end { return }
                failures.append("\(endpoint): \(Self.transportError(error, endpoint: endpoint, deadline: end).message)")
                continue
            }
            guard response.status == .ok else {
                failures.append("\(endpoint): /v3/watch: HTTP \(response.status.code)")
                continue
            }
            // The response's deadline covers its head only: the stream is read by a task of
            // its own, which a timer cancels at `end` (as does leaving this function).
            let (stream, continuation) = AsyncStream<Result<ByteBuffer, any Error>>.makeStream()
            let reader = Task {
                do {
                    for try await chunk in response.body { continuation.yield(.success(chunk)) }
                } catch {
                    continuation.yield(.failure(error))
                }
                continuation.finish()
            }
            let remaining = max(0, (end - .now()).nanoseconds)
            let timer = Task {
                try? await Task.sleep(nanoseconds: UInt64(remaining))
                continuation.finish()
                reader.cancel()
            }
            defer {
                reader.cancel()
                timer.cancel()
            }
            var pending: [UInt8] = []
            for await item in stream {
                let chunk: ByteBuffer
                switch item {
                case .success(let bytes):
                    chunk = bytes
                case .failure(let error):
                    if NIODeadline.now() >= end { return }
                    throw EtcdError(kind: .unavailable, endpoint: endpoint, message: "watch stream of \(key) broke: \(Self.transportError(error, endpoint: endpoint, deadline: end).message)")
                }
                pending += chunk.readableBytesView
                while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                    let line = Array(pending[..<newline])
                    pending.removeFirst(newline + 1)
                    guard !line.isEmpty else { continue }
                    let events = try Self.watchEvents(line, endpoint: endpoint)
                    if !events.isEmpty, !(await onEvents(events)) { return }
                }
            }
            if NIODeadline.now() >= end { return }
            throw EtcdError(kind: .unavailable, endpoint: endpoint, message: "watch stream of \(key) ended")
        }
        throw EtcdError(kind: .unavailable, endpoint: nil, message: "no endpoint accepted a watch of \(key): " + failures.joined(separator: "; "))
    }

    /// The events of one line of a watch stream; throws for an error or a cancelled watch.
    static func watchEvents(_ line: [UInt8], endpoint: String) throws(EtcdError) -> [EtcdWatchEvent] {
        guard let json = try? JSONParser.parse(line) else {
            throw EtcdError(kind: .badResponse, endpoint: endpoint, message: "watch: not etcd's JSON: \(String(decoding: line.prefix(120), as: UTF8.self))")
        }
        if let error = json["error"] {
            throw EtcdError(kind: .server(code: Int(error["code"]?.intValue ?? 0)), endpoint: endpoint, message: "watch: \(error["message"]?.stringValue ?? "\(error)")")
        }
        guard let result = json["result"] else { return [] }
        if result["canceled"]?.boolValue == true {
            let compacted = result["compact_revision"].int64
            throw EtcdError(
                kind: .server(code: 11), endpoint: endpoint,
                message: compacted > 0 ? "watch cancelled: revisions before \(compacted) are compacted" : "watch cancelled: \(result["cancel_reason"]?.stringValue ?? "no reason given")")
        }
        var events: [EtcdWatchEvent] = []
        for event in result["events"]?.arrayValue ?? [] {
            guard let kv = event["kv"] else { continue }
            let keyValue = try EtcdKeyValue(kv)
            events.append(EtcdWatchEvent(kind: event["type"]?.stringValue == "DELETE" ? .delete : .put, keyValue: keyValue))
        }
        return events
    }
}
