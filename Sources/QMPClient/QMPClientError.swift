import NIOCore
import QMP

/// Why a connection ended.
public enum QMPCloseReason: Sendable, Hashable, CustomStringConvertible {
    /// This side closed it (`close()`), or gave up during connect.
    case closedByClient
    /// The peer closed it: a 0-byte read (QEMU quit, or died and the kernel closed the socket).
    case endOfFile
    /// ECONNRESET: QEMU died (SIGKILL) with data in flight.
    case connectionReset
    /// Any other I/O error, as text.
    case ioError(String)
    /// The peer broke the protocol (malformed JSON, an overlong line, a non-QMP message).
    case protocolError(QMPProtocolError)
    /// TLS failed (`tls:` endpoints): an untrusted certificate, a refused client, a peer
    /// that does not speak TLS; the text says which.
    case tlsFailure(String)

    public var description: String {
        switch self {
        case .closedByClient: return "closed by the client"
        case .endOfFile: return "the peer closed the connection (end of file)"
        case .connectionReset: return "connection reset by the peer"
        case .ioError(let text): return "I/O error: \(text)"
        case .protocolError(let error): return "protocol error: \(error)"
        case .tlsFailure(let text): return "TLS: \(text)"
        }
    }
}

/// Everything that can go wrong with a QMP connection or one of its commands.
///
/// Messages name the endpoint and, where there is one, the command.
public enum QMPClientError: Error, Sendable, Hashable, CustomStringConvertible {
    /// A text that is not `unix:PATH`, `tcp:HOST:PORT` or `tls:HOST:PORT[,OPTIONS]`.
    case invalidEndpoint(text: String, reason: String)
    /// No connection could be made (after retrying ENOENT/ECONNREFUSED until the connect timeout).
    case connectFailed(endpoint: QMPEndpoint, reason: String)
    /// Connected, but no greeting came: another client probably holds the monitor.
    case greetingTimeout(endpoint: QMPEndpoint, after: TimeAmount)
    /// QEMU answered with an error (`{"error": {"class": ..., "desc": ...}}`).
    case commandFailed(command: String, QMPErrorBody, endpoint: QMPEndpoint)
    /// No reply within the command's timeout. A late reply is dropped (and logged).
    case timeout(command: String, after: TimeAmount, endpoint: QMPEndpoint)
    /// The connection ended (EOF, ECONNRESET, `close()`) before the reply came, or was already closed.
    case disconnected(command: String, reason: QMPCloseReason, endpoint: QMPEndpoint)
    /// The peer broke the protocol; the connection was closed. `command` is the command that was pending, if any.
    case protocolError(QMPProtocolError, command: String?, endpoint: QMPEndpoint)

    /// The QMP error body of a `.commandFailed`, nil otherwise.
    public var qmpError: QMPErrorBody? {
        if case .commandFailed(_, let body, _) = self { return body }
        return nil
    }

    /// The command the error belongs to, if any.
    public var command: String? {
        switch self {
        case .commandFailed(let command, _, _), .timeout(let command, _, _), .disconnected(let command, _, _):
            return command
        case .protocolError(_, let command, _):
            return command
        case .invalidEndpoint, .connectFailed, .greetingTimeout:
            return nil
        }
    }

    public var description: String {
        switch self {
        case .invalidEndpoint(let text, let reason):
            return "invalid QMP endpoint '\(text)': \(reason)"
        case .connectFailed(let endpoint, let reason):
            return "cannot connect to the QMP monitor at \(endpoint): \(reason)"
        case .greetingTimeout(let endpoint, let after):
            var text = "the QMP monitor at \(endpoint) sent no greeting within \(formatDuration(after)): "
                + "another client may hold the monitor (QEMU serves one client per -qmp socket)"
            if case .tcp = endpoint { text += ", or the monitor expects TLS (tls-creds=): use tls:HOST:PORT" }
            return text
        case .commandFailed(let command, let body, let endpoint):
            return "QMP command '\(command)' on \(endpoint) failed: \(body.errorClass): \(body.desc)"
        case .timeout(let command, let after, let endpoint):
            return "QMP command '\(command)' on \(endpoint) got no reply within \(formatDuration(after))"
        case .disconnected(let command, let reason, let endpoint):
            return "QMP command '\(command)' on \(endpoint) failed: connection lost (\(reason))"
        case .protocolError(let error, let command, let endpoint):
            let what = command.map { "QMP command '\($0)' on \(endpoint) failed" } ?? "QMP connection to \(endpoint) failed"
            return "\(what): \(error); the connection was closed"
        }
    }
}

/// "250 ms", "1.5 ms", "3 s".
func formatDuration(_ amount: TimeAmount) -> String {
    let ns = amount.nanoseconds
    if ns % 1_000_000_000 == 0 { return "\(ns / 1_000_000_000) s" }
    if ns % 1_000_000 == 0 { return "\(ns / 1_000_000) ms" }
    let ms = Double(ns) / 1_000_000
    return "\((ms * 1000).rounded() / 1000) ms"
}
