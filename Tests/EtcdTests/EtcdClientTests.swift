import ClusterLab
import ColorunSystem
import ColorunTestSupport
import Etcd
import NIOCore
import NIOPosix
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Starts one etcd member (or `members`), runs `body` with a client on all of them, and
/// stops everything, whatever `body` does.
func withEtcd(
    members: Int = 1, timeout: TimeAmount = .seconds(2),
    _ body: (EtcdServer, EtcdClient) async throws -> Void
) async throws {
    let server = try EtcdServer.start(count: members)
    do {
        try await server.waitHealthy()
        try await withClient({ try EtcdClient(endpoints: server.clientURLs, requestTimeout: timeout, eventLoopGroup: MultiThreadedEventLoopGroup.singleton) }) { client in
            try await body(server, client)
        }
    } catch {
        await server.stop()
        throw error
    }
    await server.stop()
}

/// Runs `body` with a client made by `make` and shuts the client down whatever `body` does
/// (AsyncHTTPClient insists on it).
func withClient<T>(_ make: () throws -> EtcdClient, _ body: (EtcdClient) async throws -> T) async throws -> T {
    let client = try make()
    do {
        let result = try await body(client)
        await client.shutdown()
        return result
    } catch {
        await client.shutdown()
        throw error
    }
}

/// A client URL nobody listens on (a port just picked free and closed again).
func deadEndpoint() throws -> String {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
    }
    return "http://127.0.0.1:\(UInt16(bigEndian: address.sin_port))"
}

@Suite(.timeLimit(.minutes(3)), .machine(.shared)) struct EtcdClientTests {
    @Test func keysValuesAndPrefixes() async throws {
        try await withEtcd { _, etcd in
            let first = try await etcd.put("/t/a", "one")
            try await etcd.put("/t/b", "two ünïcode")
            try await etcd.put("/u", "other")
            let a = try #require(try await etcd.get("/t/a"))
            #expect(a.value == "one")
            #expect(a.createRevision == first)
            #expect(try await etcd.get("/t/missing") == nil)
            let (under, revision) = try await etcd.range("/t/", prefix: true)
            #expect(under.map(\.key) == ["/t/a", "/t/b"])
            #expect(under.map(\.value) == ["one", "two ünïcode"])
            #expect(revision >= first + 2)
            #expect(try await etcd.delete("/t/", prefix: true) == 2)
            #expect(try await etcd.range("/t/", prefix: true).kvs.isEmpty)
            #expect(try await etcd.get("/u")?.value == "other")
        }
    }

    @Test func createRevisionZeroLetsOnlyTheFirstWin() async throws {
        try await withEtcd { _, etcd in
            func claim(_ node: String) async throws -> EtcdTxnResult {
                try await etcd.txn(
                    compare: [.createRevision("/pair/active", .equal, 0)],
                    success: [.put(key: "/pair/active", value: node)], failure: [.range(key: "/pair/active")])
            }
            let a = try await claim("a")
            #expect(a.succeeded)
            let b = try await claim("b")
            #expect(!b.succeeded)
            let holder = try #require(b.ranges.first?.first)
            #expect(holder.value == "a")
            // The token: the create revision is the revision of the winning transaction.
            #expect(holder.createRevision == a.revision)

            // A compare on the token: holds for the holder's token only; a rewrite keeps the token.
            let token = a.revision
            let stale = try await etcd.txn(compare: [.createRevision("/pair/active", .equal, token - 1)], success: [.put(key: "/pair/x", value: "no")])
            #expect(!stale.succeeded)
            let fresh = try await etcd.txn(
                compare: [.createRevision("/pair/active", .equal, token), .value("/pair/active", .equal, "a")],
                success: [.put(key: "/pair/active", value: "a")])
            #expect(fresh.succeeded)
            let rewritten = try #require(try await etcd.get("/pair/active"))
            #expect(rewritten.createRevision == token)
            #expect(rewritten.modRevision == fresh.revision)
            let modCompare = try await etcd.txn(compare: [.modRevision("/pair/active", .less, rewritten.modRevision)], success: [.delete(key: "/pair/active")])
            #expect(!modCompare.succeeded)
            #expect(try await etcd.get("/pair/x") == nil)
        }
    }

    @Test func aKeyOnALeaseLivesWhileRenewedAndGoesWhenItExpires() async throws {
        try await withEtcd { _, etcd in
            let lease = try await etcd.grantLease(ttl: 1)
            #expect(lease.ttl == 1)   // the lab's election timeout makes 1 s the minimum TTL
            try await etcd.put("/leased", "x", lease: lease.id)
            #expect(try await etcd.get("/leased")?.lease == lease.id)
            // Renewed every 300 ms for 2.5 s (more than twice the TTL): the key stays.
            let clock = ContinuousClock()
            let end = clock.now + .milliseconds(2500)
            while clock.now < end {
                #expect(try await etcd.keepAlive(lease.id) == 1)
                try await Task.sleep(for: .milliseconds(300))
            }
            #expect(try await etcd.get("/leased") != nil)
            // Left alone, the lease expires and takes the key with it.
            try await waitUntil("the leased key to go", timeout: .seconds(10), interval: .milliseconds(50)) {
                try await etcd.get("/leased") == nil
            }
            #expect(try await etcd.keepAlive(lease.id) == 0)
            // Revoking: at once, and revoking a lease that is gone is not an error.
            let second = try await etcd.grantLease(ttl: 30)
            try await etcd.put("/leased2", "y", lease: second.id)
            try await etcd.revokeLease(second.id)
            #expect(try await etcd.get("/leased2") == nil)
            try await etcd.revokeLease(second.id)
        }
    }

    @Test func aWatchSeesPutsAndDeletes() async throws {
        try await withEtcd { _, etcd in
            let start = try await etcd.put("/w/other", "ignored")
            let writer = Task {
                try await Task.sleep(for: .milliseconds(200))
                try await etcd.put("/w/key", "1")
                try await etcd.put("/w/key", "2")
                try await etcd.delete("/w/key")
            }
            var seen: [String] = []
            try await etcd.watch("/w/key", fromRevision: start + 1, until: .now() + .seconds(10)) { events in
                for event in events { seen.append(event.kind == .delete ? "delete" : "put \(event.keyValue.value)") }
                return !events.contains { $0.kind == .delete }
            }
            try await writer.value
            #expect(seen == ["put 1", "put 2", "delete"])
            // A watch that sees nothing returns at its deadline.
            let clock = ContinuousClock()
            let began = clock.now
            try await etcd.watch("/w/quiet", until: .now() + .milliseconds(300)) { _ in true }
            #expect(clock.now - began >= .milliseconds(250))
        }
    }

    @Test func aDeadEndpointIsSkippedAndNamed() async throws {
        try await withEtcd { server, _ in
            let dead = try deadEndpoint()
            try await withClient({ try EtcdClient(endpoints: [dead] + server.clientURLs, requestTimeout: .seconds(2), eventLoopGroup: MultiThreadedEventLoopGroup.singleton) }) { etcd in
                try await etcd.put("/failover", "ok")
                #expect(try await etcd.get("/failover")?.value == "ok")
            }
            let other = try deadEndpoint()
            try await withClient({ try EtcdClient(endpoints: [dead, other], requestTimeout: .seconds(2), eventLoopGroup: MultiThreadedEventLoopGroup.singleton) }) { allDead in
                let error = await #expect(throws: EtcdError.self) { try await allDead.get("/x") }
                #expect(error?.kind == .unavailable)
                #expect(error?.description.contains(dead) == true, "\(String(describing: error))")
                #expect(error?.description.contains("/v3/kv/range") == true)
            }
        }
    }

    @Test func somethingThatIsNotEtcdIsNamedAsSuch() async throws {
        try await withEtcd { server, _ in
            // The member's peer port speaks HTTP, but not the client API.
            let peer = server.members[0].peerURL
            try await withClient({ try EtcdClient(endpoints: [peer], requestTimeout: .seconds(2), eventLoopGroup: MultiThreadedEventLoopGroup.singleton) }) { etcd in
                let error = await #expect(throws: EtcdError.self) { try await etcd.put("/x", "y") }
                #expect(error?.description.contains(peer) == true, "\(String(describing: error))")
                #expect(error?.description.contains("not etcd's JSON") == true || error?.description.contains("HTTP 404") == true, "\(String(describing: error))")
            }
        }
        #expect(throws: EtcdError.self) { try EtcdClient(endpoints: ["ftp://x"], eventLoopGroup: MultiThreadedEventLoopGroup.singleton) }
        #expect(throws: EtcdError.self) { try EtcdClient(endpoints: [], eventLoopGroup: MultiThreadedEventLoopGroup.singleton) }
    }

    @Test func aStoppedMemberTimesOutWithinTheRequestTimeout() async throws {
        try await withEtcd { server, _ in
            try await withClient({ try EtcdClient(endpoints: server.clientURLs, requestTimeout: .milliseconds(500), eventLoopGroup: MultiThreadedEventLoopGroup.singleton) }) { etcd in
                try await etcd.put("/frozen", "before", timeout: .seconds(5))
                server.members[0].kill(SIGSTOP)
                // The signal is delivered after kill returns: a request sent before it takes
                // effect would still be answered.
                try await waitUntil("etcd stopped by SIGSTOP") { server.members[0].isStopped }
                let clock = ContinuousClock()
                let began = clock.now
                let error = await #expect(throws: EtcdError.self) { try await etcd.get("/frozen") }
                let took = clock.now - began
                server.members[0].kill(SIGCONT)
                #expect(error?.kind == .unavailable || error?.kind == .timeout, "\(String(describing: error))")
                #expect(took < .seconds(3), "the request timeout bounds the call (took \(took))")
                #expect(try await etcd.get("/frozen", timeout: .seconds(5))?.value == "before")
            }
        }
    }
}

@Suite(.timeLimit(.minutes(3)), .machine(.shared)) struct EtcdClusterTests {
    @Test func aLeaseSurvivesTheLeadersDeath() async throws {
        try await withEtcd(members: 3) { server, etcd in
            let lease = try await etcd.grantLease(ttl: 3)
            try await etcd.put("/survives", "yes", lease: lease.id)
            let leader = try #require(await server.killLeader())
            // The others elect a new leader; the client moves to a live member by itself.
            try await waitUntil("a new leader", timeout: .seconds(15), interval: .milliseconds(50)) {
                await server.leader().map { $0.name != leader.name } ?? false
            }
            #expect(try await etcd.keepAlive(lease.id) > 0)
            #expect(try await etcd.get("/survives")?.value == "yes")
            try await server.restart(leader)
            try await server.waitHealthy()
        }
    }
}

/// Runs a tool to completion; throws with its stderr when it fails.
func runTool(_ argv: [String], in dir: String) throws {
    let log = dir + "/tool.log"
    let pid = try spawnChild(argv, lifetime: .owned, standardOutput: .appendingTo(log), standardError: .appendingTo(log))
    guard reapChild(pid, blocking: true) == .exited(code: 0) else {
        throw ClusterLabError("\(argv.joined(separator: " ")) failed: \(String(decoding: (try? readFile(log)) ?? [], as: UTF8.self))")
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
func makeCertificates(in dir: String, prefix: String = "") throws {
    func key(_ name: String) -> [String] { ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "\(dir)/\(prefix)\(name).key"] }
    try runTool(["openssl", "req", "-x509"] + key("ca") + ["-out", "\(dir)/\(prefix)ca.pem", "-days", "2", "-subj", "/CN=colorun test CA \(prefix)"], in: dir)
    try ColorunSystem.writeFile("\(dir)/\(prefix)ext.cnf", Array("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n".utf8))
    for name in ["server", "client"] {
        try runTool(["openssl", "req"] + key(name) + ["-out", "\(dir)/\(prefix)\(name).csr", "-subj", "/CN=\(name)"], in: dir)
        try runTool(["openssl", "x509", "-req", "-in", "\(dir)/\(prefix)\(name).csr", "-CA", "\(dir)/\(prefix)ca.pem", "-CAkey", "\(dir)/\(prefix)ca.key",
                     "-CAcreateserial", "-out", "\(dir)/\(prefix)\(name).pem", "-days", "2", "-extfile", "\(dir)/\(prefix)ext.cnf"], in: dir)
    }
}

@Suite(.timeLimit(.minutes(3)), .machine(.shared)) struct EtcdTLSTests {
    @Test func httpsWithAClientCertificate() async throws {
        let dir = makeTempDirectory("colorun-etls")
        defer { removeDirectory(dir) }
        try makeCertificates(in: dir)
        try makeCertificates(in: dir, prefix: "other-")
        let server = try EtcdServer.start(tls: .init(certFile: "\(dir)/server.pem", keyFile: "\(dir)/server.key", caFile: "\(dir)/ca.pem"))
        let good = EtcdTLS(caFile: "\(dir)/ca.pem", certFile: "\(dir)/client.pem", keyFile: "\(dir)/client.key")
        server.clientTLS = good
        do {
            try await server.waitHealthy()
            #expect(server.clientURLs[0].hasPrefix("https://"))
            try await withClient({ try EtcdClient(endpoints: server.clientURLs, tls: good, requestTimeout: .seconds(5), eventLoopGroup: MultiThreadedEventLoopGroup.singleton) }) { etcd in
                try await etcd.put("/tls", "ok")
                #expect(try await etcd.get("/tls")?.value == "ok")
            }

            // A server certificate from a CA we do not trust: refused, naming the endpoint.
            try await withClient({
                try EtcdClient(
                    endpoints: server.clientURLs, tls: EtcdTLS(caFile: "\(dir)/other-ca.pem", certFile: "\(dir)/client.pem", keyFile: "\(dir)/client.key"),
                    requestTimeout: .seconds(2), eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
            }) { wrongCA in
                let untrusted = await #expect(throws: EtcdError.self) { try await wrongCA.get("/tls") }
                #expect(untrusted?.description.contains(server.clientURLs[0]) == true, "\(String(describing: untrusted))")
            }

            // No client certificate: the member refuses the handshake.
            _ = try await withClient({
                try EtcdClient(endpoints: server.clientURLs, tls: EtcdTLS(caFile: "\(dir)/ca.pem"), requestTimeout: .seconds(2), eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
            }) { anonymous in
                await #expect(throws: EtcdError.self) { try await anonymous.get("/tls") }
            }

            // Files that do not exist: a usage error naming them, before any connection.
            let missing = #expect(throws: EtcdError.self) {
                try EtcdClient(endpoints: server.clientURLs, tls: EtcdTLS(caFile: "\(dir)/nope.pem"), eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
            }
            #expect(missing?.kind == .usage)
            #expect(missing?.description.contains("nope.pem") == true, "\(String(describing: missing))")
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}
