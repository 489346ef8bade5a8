/// Where a QMP monitor listens: `unix:/path/to/socket` or `tcp:host:port`.
///
/// The text forms match QEMU's `-qmp` syntax (without the `,server=on,...` options).
/// `init(parsing:)` is the only place that reads them; `description` writes them back.
public enum QMPEndpoint: Sendable, Hashable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: Int)

    /// The longest path a `sockaddr_un` holds (108 bytes including the terminating NUL).
    public static let maxUnixPathLength = 107

    public init(parsing text: String) throws(QMPClientError) {
        func invalid(_ reason: String) -> QMPClientError { .invalidEndpoint(text: text, reason: reason) }
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst("unix:".count))
            guard !path.isEmpty else { throw invalid("the socket path is empty") }
            guard !path.utf8.contains(0) else { throw invalid("the socket path contains a NUL byte") }
            guard path.utf8.count <= Self.maxUnixPathLength else {
                throw invalid("the socket path is \(path.utf8.count) bytes long, more than a UNIX socket allows (\(Self.maxUnixPathLength))")
            }
            self = .unix(path: path)
        } else if text.hasPrefix("tcp:") {
            let rest = text.dropFirst("tcp:".count)
            let host: Substring
            let portText: Substring
            if rest.hasPrefix("[") {
                // An IPv6 literal: tcp:[::1]:4444
                guard let close = rest.firstIndex(of: "]") else { throw invalid("missing ']' after the IPv6 address") }
                host = rest[rest.index(after: rest.startIndex)..<close]
                let afterClose = rest[rest.index(after: close)...]
                guard afterClose.hasPrefix(":") else { throw invalid("expected ':PORT' after the IPv6 address") }
                portText = afterClose.dropFirst()
            } else {
                guard let colon = rest.lastIndex(of: ":") else { throw invalid("expected tcp:HOST:PORT") }
                host = rest[..<colon]
                portText = rest[rest.index(after: colon)...]
                guard !host.contains(":") else { throw invalid("write an IPv6 address in brackets: tcp:[ADDRESS]:PORT") }
            }
            guard !host.isEmpty else { throw invalid("the host is empty") }
            guard !portText.isEmpty, portText.allSatisfy(\.isASCII), let port = Int(portText), (1...65535).contains(port) else {
                throw invalid("the port '\(portText)' is not a number from 1 to 65535")
            }
            self = .tcp(host: String(host), port: port)
        } else {
            throw invalid("expected unix:PATH or tcp:HOST:PORT")
        }
    }

    public var description: String {
        switch self {
        case .unix(let path): return "unix:\(path)"
        case .tcp(let host, let port):
            return host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)"
        }
    }
}
