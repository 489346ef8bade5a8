/// Where a QMP monitor listens: `unix:/path/to/socket`, `tcp:host:port`, or
/// `tls:host:port[,dir=DIR][,ca=FILE][,cert=FILE][,key=FILE][,hostname=NAME]`.
///
/// The text forms match QEMU's `-qmp` syntax (without the `,server=on,...` options).
/// `init(parsing:)` is the only place that reads them; `description` writes them back, so a
/// text written by `description` parses to the same endpoint (the stop journal relies on it).
public enum QMPEndpoint: Sendable, Hashable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: Int)
    /// TCP wrapped in TLS: the monitor's certificate is checked against the CA, and the
    /// client certificate (if any) is sent, as QEMU's `tls-creds-x509,verify-peer=on` wants.
    case tls(host: String, port: Int, credentials: QMPTLSCredentials)

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
            let (host, port) = try Self.hostAndPort(text.dropFirst("tcp:".count), scheme: "tcp", invalid: invalid)
            self = .tcp(host: host, port: port)
        } else if text.hasPrefix("tls:") {
            var parts = text.dropFirst("tls:".count).split(separator: ",", omittingEmptySubsequences: false)
            let address = parts.removeFirst()
            let (host, port) = try Self.hostAndPort(address, scheme: "tls", invalid: invalid)
            var credentials = QMPTLSCredentials()
            var seen: Set<Substring> = []
            for part in parts {
                guard let eq = part.firstIndex(of: "="), eq != part.startIndex else {
                    throw invalid("expected NAME=VALUE after ',', got '\(part)' (options: \(QMPTLSCredentials.optionNames))")
                }
                let name = part[..<eq]
                let value = String(part[part.index(after: eq)...])
                guard seen.insert(name).inserted else { throw invalid("the option '\(name)' is given twice") }
                guard !value.isEmpty else { throw invalid("the option '\(name)' is empty") }
                switch name {
                case "dir": credentials.directory = value
                case "ca": credentials.caCertificate = value
                case "cert": credentials.clientCertificate = value
                case "key": credentials.clientKey = value
                case "hostname": credentials.hostname = value
                default: throw invalid("unknown option '\(name)' (options: \(QMPTLSCredentials.optionNames))")
                }
            }
            guard (credentials.clientCertificate == nil) == (credentials.clientKey == nil) else {
                throw invalid("give cert= and key= together (the client certificate and its private key)")
            }
            self = .tls(host: host, port: port, credentials: credentials)
        } else {
            throw invalid("expected unix:PATH, tcp:HOST:PORT or tls:HOST:PORT[,dir=DIR]")
        }
    }

    private static func hostAndPort(
        _ rest: Substring, scheme: String, invalid: (String) -> QMPClientError
    ) throws(QMPClientError) -> (String, Int) {
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
            guard let colon = rest.lastIndex(of: ":") else { throw invalid("expected \(scheme):HOST:PORT") }
            host = rest[..<colon]
            portText = rest[rest.index(after: colon)...]
            guard !host.contains(":") else { throw invalid("write an IPv6 address in brackets: \(scheme):[ADDRESS]:PORT") }
        }
        guard !host.isEmpty else { throw invalid("the host is empty") }
        guard !portText.isEmpty, portText.allSatisfy(\.isASCII), let port = Int(portText), (1...65535).contains(port) else {
            throw invalid("the port '\(portText)' is not a number from 1 to 65535")
        }
        return (String(host), port)
    }

    public var description: String {
        switch self {
        case .unix(let path): return "unix:\(path)"
        case .tcp(let host, let port):
            return "tcp:" + Self.address(host, port)
        case .tls(let host, let port, let credentials):
            return "tls:" + Self.address(host, port) + credentials.optionText
        }
    }

    private static func address(_ host: String, _ port: Int) -> String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    /// The host of a `tcp:` or `tls:` endpoint, nil for `unix:`.
    public var host: String? {
        switch self {
        case .unix: return nil
        case .tcp(let host, _), .tls(let host, _, _): return host
        }
    }

    /// True when the endpoint cannot leave this machine: a UNIX socket, `localhost`, an
    /// address in 127.0.0.0/8, or `::1`.
    public var isLocal: Bool {
        guard let host else { return true }
        let lower = host.lowercased()
        if lower == "localhost" || lower.hasSuffix(".localhost") || lower == "::1" { return true }
        let v4 = lower.hasPrefix("::ffff:") ? String(lower.dropFirst("::ffff:".count)) : lower
        let octets = v4.split(separator: ".", omittingEmptySubsequences: false)
        return octets.count == 4 && octets[0] == "127" && octets.allSatisfy { UInt8($0) != nil }
    }
}

/// Where a `tls:` endpoint finds its CA certificate, client certificate and key.
///
/// Files not given one by one come from `directory`, laid out as QEMU's
/// `tls-creds-x509,dir=` for a client: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
/// Without `dir=`, the directory is `defaultDirectory`. The client certificate is optional
/// (a monitor with `verify-peer=off` asks for none); the CA certificate is not.
public struct QMPTLSCredentials: Sendable, Hashable {
    public static let defaultDirectory = "/etc/colorun/tls"
    static let optionNames = "dir=, ca=, cert=, key=, hostname="

    public var directory: String?
    public var caCertificate: String?
    public var clientCertificate: String?
    public var clientKey: String?
    /// The DNS name the monitor's certificate must carry, when it is not the endpoint's host.
    /// (An IP subjectAltName equal to the address connected to also satisfies the check.)
    public var hostname: String?

    public init(directory: String? = nil, caCertificate: String? = nil, clientCertificate: String? = nil,
                clientKey: String? = nil, hostname: String? = nil) {
        self.directory = directory
        self.caCertificate = caCertificate
        self.clientCertificate = clientCertificate
        self.clientKey = clientKey
        self.hostname = hostname
    }

    /// `,dir=...,ca=...` as written in an endpoint (empty when nothing is given).
    var optionText: String {
        var text = ""
        for (name, value) in [("dir", directory), ("ca", caCertificate), ("cert", clientCertificate), ("key", clientKey), ("hostname", hostname)] {
            if let value { text += ",\(name)=\(value)" }
        }
        return text
    }
}
