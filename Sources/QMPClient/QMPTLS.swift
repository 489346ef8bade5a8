import Logging
import NIOCore
import NIOSSL
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A TLS failure put in words for the operator (the channel's error, as the core sees it).
struct QMPTLSFailure: Error, CustomStringConvertible {
    var description: String
}

/// The files a `tls:` endpoint uses, resolved from its options and directory.
struct QMPTLSFiles: Sendable, Hashable {
    var caCertificate: String
    var clientCertificate: String?
    var clientKey: String?

    /// Resolves explicit files first, then the directory's QEMU layout. A missing CA
    /// certificate, or a named file that does not exist, is an error that names the file.
    init(_ credentials: QMPTLSCredentials) throws(QMPTLSFailure) {
        let directory = credentials.directory ?? QMPTLSCredentials.defaultDirectory
        func exists(_ path: String) -> Bool { access(path, R_OK) == 0 }
        func named(_ path: String, _ what: String) throws(QMPTLSFailure) -> String {
            guard exists(path) else { throw QMPTLSFailure(description: "cannot read the \(what) \(path): \(String(cString: strerror(errno)))") }
            return path
        }
        if let ca = credentials.caCertificate {
            caCertificate = try named(ca, "CA certificate (ca=)")
        } else {
            let path = directory + "/ca-cert.pem"
            guard exists(path) else {
                throw QMPTLSFailure(description: "no CA certificate: cannot read \(path) (give dir=DIR holding ca-cert.pem, or ca=FILE)")
            }
            caCertificate = path
        }
        if let cert = credentials.clientCertificate, let key = credentials.clientKey {
            clientCertificate = try named(cert, "client certificate (cert=)")
            clientKey = try named(key, "client key (key=)")
        } else if exists(directory + "/client-cert.pem") {
            clientCertificate = directory + "/client-cert.pem"
            clientKey = try named(directory + "/client-key.pem", "client key")
        } else {
            clientCertificate = nil
            clientKey = nil
        }
    }
}

enum QMPTLS {
    /// The client-side TLS handler for `endpoint`: the CA is the only trust root, the
    /// monitor's certificate must name the host (or `hostname=`; an IP address host is
    /// checked against the certificate's IP subjectAltNames), the client certificate is sent
    /// when there is one. Certificate files are read at each connect, so renewed files
    /// take effect on the next connection.
    static func makeHandler(host: String, credentials: QMPTLSCredentials) throws(QMPTLSFailure) -> (NIOSSLClientHandler, QMPTLSFiles) {
        let files = try QMPTLSFiles(credentials)
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        configuration.certificateVerification = .fullVerification
        do {
            configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(files.caCertificate))
        } catch {
            throw QMPTLSFailure(description: "cannot load the CA certificate \(files.caCertificate): \(error)")
        }
        if let cert = files.clientCertificate, let key = files.clientKey {
            do {
                configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(cert).map { .certificate($0) }
            } catch {
                throw QMPTLSFailure(description: "cannot load the client certificate \(cert): \(error)")
            }
            do {
                configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
            } catch {
                throw QMPTLSFailure(description: "cannot load the client key \(key): \(error)")
            }
        }
        let serverName: String?
        if let name = credentials.hostname {
            serverName = name
        } else if (try? SocketAddress(ipAddress: host, port: 0)) != nil {
            serverName = nil  // verified against the peer's address
        } else {
            serverName = host
        }
        do {
            let context = try NIOSSLContext(configuration: configuration)
            return (try NIOSSLClientHandler(context: context, serverHostname: serverName), files)
        } catch {
            throw QMPTLSFailure(description: "cannot set up TLS: \(error)")
        }
    }

    /// Plain TCP to a host off this machine carries full control of the VM in clear text:
    /// warn, once per endpoint and process.
    static func warnIfCleartextRemote(_ endpoint: QMPEndpoint, logger: Logger) -> Bool {
        guard case .tcp = endpoint, !endpoint.isLocal else { return false }
        let first = warnedEndpoints.withLock { $0.insert(endpoint).inserted }
        guard first else { return false }
        logger.warning(
            "QMP in clear text to another host: anyone on the network path can read and drive this monitor; use tls:HOST:PORT (docs/operations.md)",
            metadata: ["qmp.endpoint": "\(endpoint)"])
        return true
    }

    private static let warnedEndpoints = Mutex<Set<QMPEndpoint>>([])
}

/// Sits right after the TLS handler and
/// - turns what TLS reports into errors that say what went wrong: an untrusted monitor
///   certificate, a peer that does not speak TLS, a monitor that refused this client's
///   certificate (QEMU closes the connection after the handshake, before its greeting, when
///   the client certificate is expired, from another CA or not allowed by `tls-authz`);
/// - follows every write with a TLS record holding a newline. QEMU 7.2 reads a TLS monitor
///   one record late: a record waits in GnuTLS's buffer until the next one arrives, so a
///   command alone is never answered (docs/qemu-notes.md). The newline record, sent in the
///   same flush, carries the command through; QMP ignores the blank line it becomes.
final class QMPTLSDiagnosisHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let files: QMPTLSFiles
    private var sawData = false
    private var reported = false

    init(files: QMPTLSFiles) {
        self.files = files
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        sawData = true
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        context.write(data, promise: promise)
        // A write of its own: NIOSSL makes one record per write.
        var newline = context.channel.allocator.buffer(capacity: 1)
        newline.writeInteger(UInt8(ascii: "\n"))
        context.write(wrapOutboundOut(newline), promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard !reported else { return }
        if sawData {
            context.fireErrorCaught(error)
            return
        }
        reported = true
        context.fireErrorCaught(QMPTLSFailure(description: explain(error)))
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !sawData, !reported {
            reported = true
            context.fireErrorCaught(QMPTLSFailure(description: refusedText))
        }
        context.fireChannelInactive()
    }

    private var refusedText: String {
        let client = files.clientCertificate.map { "the client certificate \($0)" } ?? "a client without a certificate (no client-cert.pem)"
        return "the monitor closed the TLS connection before its greeting: it refused \(client) "
            + "(expired, not signed by the CA the monitor trusts, or a name its tls-authz does not allow); QEMU's standard error says which"
    }

    private func explain(_ error: any Error) -> String {
        let text = "\(error)"
        if let extra = error as? NIOSSLExtraError, extra == .failedToValidateHostname {
            return "the monitor's certificate does not carry the name connected to (\(text)); "
                + "add the host to its subjectAltName, or give hostname=NAME for the name it carries"
        }
        if let ssl = error as? NIOSSLError {
            switch ssl {
            case .uncleanShutdown:
                return refusedText
            case .handshakeFailed:
                if text.contains("CERTIFICATE_VERIFY_FAILED") {
                    return "the monitor's certificate is not trusted: it is not signed by the CA in \(files.caCertificate), or it expired (\(text))"
                }
                if ["WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_RECORD", "HTTP_REQUEST", "RECORD_TOO_LARGE", "DECODE_ERROR"]
                    .contains(where: text.contains)
                {
                    return "the peer does not speak TLS (a plain-text monitor? use tcp:, or give QEMU's -chardev tls-creds=) (\(text))"
                }
                if text.contains("ALERT") {
                    return "the monitor refused the TLS handshake (\(text)): check the client certificate and the CA"
                }
                return "the TLS handshake failed: \(text)"
            default:
                break
            }
        }
        return "the TLS connection failed before the greeting: \(text)"
    }
}

@available(*, unavailable)
extension QMPTLSDiagnosisHandler: Sendable {}
