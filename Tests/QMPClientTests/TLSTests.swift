import ColorunSystem
import ColorunTestSupport
import JSON
import Logging
import NIOCore
import QEMULab
import QMP
@testable import QMPClient
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Certificates for the TLS tests, made once per test process with `openssl` (EC P-256 keys:
/// quick to make). The monitor's CA signs the server certificate (SAN IP:127.0.0.1 and DNS
/// localhost) and three client certificates: `O=colorun,CN=runner1` (the one tls-authz
/// allows), the same name expired, and `O=colorun,CN=intruder`. A second CA signs nothing
/// the monitor knows.
struct TestCertificates: Sendable {
    let directory: String
    /// QEMU's dir= for the monitor: ca-cert.pem, server-cert.pem, server-key.pem.
    var serverDirectory: String { directory + "/server" }
    /// A client directory in QEMU's layout: ca-cert.pem, client-cert.pem, client-key.pem.
    var clientDirectory: String { directory + "/client" }
    func file(_ name: String) -> String { directory + "/" + name }

    static let shared: Result<TestCertificates, TLSTestSetupError> = Result { () throws(TLSTestSetupError) in try make() }

    static func make() throws(TLSTestSetupError) -> TestCertificates {
        let dir = makeTempDirectory("colorun-tls")
        let log = dir + "/openssl.log"
        func openssl(_ arguments: [String]) throws(TLSTestSetupError) {
            let pid: pid_t
            do {
                pid = try spawnChild(["openssl"] + arguments, lifetime: .owned, standardOutput: .appendingTo(log), standardError: .appendingTo(log))
            } catch {
                throw TLSTestSetupError(description: "\(error)")
            }
            guard reapChild(pid, blocking: true) == .exited(code: 0) else {
                let text = (try? readFile(log)).map { String(decoding: $0, as: UTF8.self) } ?? ""
                throw TLSTestSetupError(description: "openssl \(arguments.joined(separator: " ")) failed: \(text)")
            }
        }
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        func ca(_ name: String) throws(TLSTestSetupError) {
            try openssl(["req", "-x509"] + ec + ["-keyout", "\(dir)/\(name)-key.pem", "-out", "\(dir)/\(name)-cert.pem",
                                                 "-subj", "/CN=colorun test \(name)", "-days", "2"])
        }
        func leaf(_ name: String, subject: String, days: Int, extensions: String? = nil) throws(TLSTestSetupError) {
            try openssl(["req"] + ec + ["-keyout", "\(dir)/\(name)-key.pem", "-out", "\(dir)/\(name).csr", "-subj", subject])
            var arguments = ["x509", "-req", "-in", "\(dir)/\(name).csr", "-CA", "\(dir)/ca-cert.pem", "-CAkey", "\(dir)/ca-key.pem",
                             "-CAcreateserial", "-out", "\(dir)/\(name)-cert.pem", "-days", String(days)]
            if let extensions {
                do {
                    try writeFile("\(dir)/\(name).ext", Array(extensions.utf8))
                } catch {
                    throw TLSTestSetupError(description: "\(error)")
                }
                arguments += ["-extfile", "\(dir)/\(name).ext"]
            }
            try openssl(arguments)
        }
        try ca("ca")
        try ca("other-ca")
        try leaf("server", subject: "/O=colorun/CN=localhost", days: 2, extensions: "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        try leaf("client", subject: "/O=colorun/CN=runner1", days: 2)
        // notAfter a day before notBefore: expired from the start.
        try leaf("expired", subject: "/O=colorun/CN=runner1", days: -1)
        try leaf("intruder", subject: "/O=colorun/CN=intruder", days: 2)
        do {
            for (sub, files) in [("server", ["ca-cert", "server-cert", "server-key"]), ("client", ["ca-cert", "client-cert", "client-key"])] {
                try makeDirectory("\(dir)/\(sub)")
                for name in files {
                    try writeFile("\(dir)/\(sub)/\(name).pem", try readFile("\(dir)/\(name).pem"), mode: 0o600)
                }
            }
        } catch {
            throw TLSTestSetupError(description: "\(error)")
        }
        return TestCertificates(directory: dir)
    }
}

struct TLSTestSetupError: Error, CustomStringConvertible {
    var description: String
}

private func makeDirectory(_ path: String) throws(SystemError) {
    guard mkdir(path, 0o700) == 0 else { throw SystemError("mkdir \(path): \(errnoText())") }
}

/// A QEMU with three monitors: the lab's UNIX one, a TLS one (`tls-creds-x509,verify-peer=on`
/// and `authz-simple` allowing `O=colorun,CN=runner1` only) and a plain TCP one, both on
/// ports QEMU picks (read back with `query-chardev`).
struct TLSMonitorQEMU {
    let qemu: QEMUInstance
    let tlsPort: Int
    let plainPort: Int

    static func start(_ certificates: TestCertificates) async throws -> TLSMonitorQEMU {
        let qemu = try QEMUInstance.start(QEMUSpec(extraArguments: [
            "-object", "tls-creds-x509,id=tls0,dir=\(certificates.serverDirectory),endpoint=server,verify-peer=on",
            "-object", "authz-simple,id=authz0,identity=O=colorun,,CN=runner1",
            "-chardev", "socket,id=qmptls,host=127.0.0.1,port=0,server=on,wait=off,tls-creds=tls0,tls-authz=authz0",
            "-mon", "chardev=qmptls,mode=control",
            "-chardev", "socket,id=qmpplain,host=127.0.0.1,port=0,server=on,wait=off",
            "-mon", "chardev=qmpplain,mode=control",
        ]))
        do {
            let lab = try await qemu.connect(on: testGroup, logger: Logger(label: "lab", factory: { _ in SwiftLogNoOpLogHandler() }))
            let chardevs = try await lab.execute("query-chardev")
            await lab.close()
            func port(_ label: String) throws -> Int {
                // "disconnected:tcp:127.0.0.1:41469,server=on"
                guard case .array(let list) = chardevs,
                      let entry = list.first(where: { $0["label"] == .string(label) }),
                      case .string(let filename) = entry["filename"],
                      let address = filename.split(separator: ",").first?.split(separator: ":").last,
                      let port = Int(address)
                else { throw TLSTestSetupError(description: "no port for \(label) in \(chardevs)") }
                return port
            }
            return TLSMonitorQEMU(qemu: qemu, tlsPort: try port("qmptls"), plainPort: try port("qmpplain"))
        } catch {
            Issue.record("QEMU stderr: \(qemu.stderrText())")
            await qemu.stop()
            throw error
        }
    }

    func tls(_ options: String = "") -> String { "tls:127.0.0.1:\(tlsPort)" + options }
}

/// Connects, expecting a failure; returns the error and how long it took.
private func connectFailure(_ text: String, logs: LogCollector = LogCollector()) async throws -> (QMPClientError?, Duration) {
    let endpoint = try QMPEndpoint(parsing: text)
    let clock = ContinuousClock()
    let started = clock.now
    do {
        let connection = try await QMPConnection.connect(
            to: endpoint, on: testGroup, connectTimeout: .seconds(2), greetingTimeout: .seconds(2), commandTimeout: .seconds(2),
            logger: logs.logger("tls-test"))
        await connection.close()
        return (nil, clock.now - started)
    } catch {
        return (error, clock.now - started)
    }
}

@Suite(.serialized, .timeLimit(.minutes(3)), .machine(.exclusive)) struct TLSTests {
    @Test func aVerifiedMonitorAnswersThroughADirectoryOrNamedFiles() async throws {
        let certificates = try TestCertificates.shared.get()
        let monitor = try await TLSMonitorQEMU.start(certificates)
        defer { Task { await monitor.qemu.stop() } }
        let c = certificates
        for text in [
            monitor.tls(",dir=\(c.clientDirectory)"),
            monitor.tls(",ca=\(c.file("ca-cert.pem")),cert=\(c.file("client-cert.pem")),key=\(c.file("client-key.pem"))"),
            // By name: checked against the certificate's DNS subjectAltName.
            "tls:localhost:\(monitor.tlsPort),dir=\(c.clientDirectory)",
        ] {
            let endpoint = try QMPEndpoint(parsing: text)
            #expect(endpoint.description == text)
            let connection = try await QMPConnection.connect(to: endpoint, on: testGroup, logger: LogCollector().logger("tls-test"))
            #expect(connection.greeting.qemuVersion.hasPrefix("7."))
            #expect(try await connection.execute("query-status")["status"] == "running", "\(text)")
            await connection.close()
        }
        await monitor.qemu.stop()
    }

    @Test func everyRefusalNamesTheEndpointAndEndsWithinTheTimeouts() async throws {
        let c = try TestCertificates.shared.get()
        let monitor = try await TLSMonitorQEMU.start(c)
        defer { Task { await monitor.qemu.stop() } }
        let cases: [(what: String, endpoint: String, expected: String)] = [
            ("wrong CA", monitor.tls(",ca=\(c.file("other-ca-cert.pem")),cert=\(c.file("client-cert.pem")),key=\(c.file("client-key.pem"))"),
             "certificate is not trusted"),
            ("expired client certificate", monitor.tls(",ca=\(c.file("ca-cert.pem")),cert=\(c.file("expired-cert.pem")),key=\(c.file("expired-key.pem"))"),
             "refused the client certificate \(c.file("expired-cert.pem"))"),
            ("unauthorized client", monitor.tls(",ca=\(c.file("ca-cert.pem")),cert=\(c.file("intruder-cert.pem")),key=\(c.file("intruder-key.pem"))"),
             "tls-authz"),
            ("no client certificate", monitor.tls(",ca=\(c.file("ca-cert.pem"))"), "without a certificate"),
            ("plain-text peer", "tls:127.0.0.1:\(monitor.plainPort),dir=\(c.clientDirectory)", "does not speak TLS"),
            ("no CA file", "tls:127.0.0.1:\(monitor.tlsPort),dir=\(c.directory)/nonexistent", "no CA certificate"),
        ]
        for (what, text, expected) in cases {
            let (error, elapsed) = try await connectFailure(text)
            guard let error else {
                Issue.record("\(what): connected")
                continue
            }
            #expect(error.description.contains("at \(text):"), "\(what): \(error)")
            #expect(error.description.contains(expected), "\(what): \(error)")
            // Never a hang: every failure comes from TLS or from the 2 s timeouts.
            #expect(elapsed < .seconds(4), "\(what) took \(elapsed)")
            print("TLS refusal, \(what) (\(elapsed)): \(error)")
        }
        // A TLS monitor spoken to in clear text: the greeting never comes, and the error says why.
        let (plain, _) = try await connectFailure("tcp:127.0.0.1:\(monitor.tlsPort)")
        #expect(plain?.description.contains("use tls:HOST:PORT") == true, "\(String(describing: plain))")
        // The monitor is not wedged by all that: the authorized client still gets in.
        let (none, _) = try await connectFailure(monitor.tls(",dir=\(c.clientDirectory)"))
        #expect(none == nil, "\(String(describing: none))")
        await monitor.qemu.stop()
    }

    @Test func parsesTLSOptionsAndRefusesBadOnes() throws {
        let endpoint = try QMPEndpoint(parsing: "tls:[::1]:4444,dir=/etc/x,hostname=web")
        #expect(endpoint == .tls(host: "::1", port: 4444, credentials: QMPTLSCredentials(directory: "/etc/x", hostname: "web")))
        #expect(endpoint.description == "tls:[::1]:4444,dir=/etc/x,hostname=web")
        #expect(try QMPEndpoint(parsing: "tls:h:1").description == "tls:h:1")
        for bad in ["tls:h:1,dir=", "tls:h:1,bogus=1", "tls:h:1,dir=/a,dir=/b", "tls:h:1,cert=/c", "tls:h:1,key=/k", "tls:h", "tls:h:1,dir"] {
            #expect(throws: QMPClientError.self, "\(bad)") { try QMPEndpoint(parsing: bad) }
        }
    }

    @Test func clearTextToAnotherHostWarnsOncePerEndpoint() throws {
        let logs = LogCollector()
        let logger = logs.logger("tls-test")
        // Decided without connecting anywhere: the warning is logged when a connect starts.
        let remote = try QMPEndpoint(parsing: "tcp:192.0.2.7:4444")
        #expect(QMPTLS.warnIfCleartextRemote(remote, logger: logger))
        #expect(!QMPTLS.warnIfCleartextRemote(remote, logger: logger))
        for local in ["tcp:127.0.0.1:4444", "tcp:localhost:4444", "tcp:[::1]:4444", "unix:/tmp/x", "tls:192.0.2.7:4444"] {
            #expect(!QMPTLS.warnIfCleartextRemote(try QMPEndpoint(parsing: local), logger: logger), "\(local)")
        }
        let warnings = logs.records.filter { $0.level == .warning }
        #expect(warnings.count == 1)
        #expect(warnings.first?.message.contains("clear text") == true)
    }
}
