import NIOCore
import NIOPosix
import QMP
import Synchronization

/// A process-full of simulated QEMUs: each domain answers QMP on its own socket as QEMU
/// 7.2 does, all on one (or a few) NIO event loops.
///
///     let sim = QEMUSimulator()
///     let dom = try await sim.start(socketPath: "/tmp/x/dom0.sock")
///     dom.addFault(SimulatedFault("stop", .delay(.milliseconds(200))))
///     ...
///     await sim.shutdown()
public final class QEMUSimulator: Sendable {
    private let group: any EventLoopGroup
    private let ownsGroup: Bool
    private let registry = Mutex<[SimulatedDomain]>([])

    /// Runs on its own event loop group of `threads` threads.
    public init(threads: Int = 1) {
        group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, threads))
        ownsGroup = true
    }

    /// Runs on a group owned by the caller.
    public init(eventLoopGroup: any EventLoopGroup) {
        group = eventLoopGroup
        ownsGroup = false
    }

    public var domains: [SimulatedDomain] { registry.withLock { $0 } }

    public func domain(named name: String) -> SimulatedDomain? {
        registry.withLock { $0.first { $0.name == name } }
    }

    /// Starts a domain listening on a UNIX socket (an old socket file there is replaced).
    @discardableResult
    public func start(
        socketPath: String, name: String? = nil, configuration: SimulatedDomainConfiguration = SimulatedDomainConfiguration()
    ) async throws -> SimulatedDomain {
        let fallback = socketPath.split(separator: "/").last.map { String($0.split(separator: ".").first ?? $0) } ?? "dom"
        return try await start(name: name ?? fallback, address: .unix(path: socketPath), configuration: configuration)
    }

    /// Starts a domain listening on `address`.
    @discardableResult
    public func start(
        name: String, address: SimulatorAddress, configuration: SimulatedDomainConfiguration = SimulatedDomainConfiguration()
    ) async throws -> SimulatedDomain {
        let loop = group.next()
        let domain = SimulatedDomain(name: name, address: address, configuration: configuration, eventLoop: loop)
        let bootstrap = ServerBootstrap(group: loop)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers(
                        ByteToMessageHandler(QMPInputDecoder()),
                        MessageToByteHandler(QMPServerOutputEncoder()),
                        DomainConnectionHandler(domain: domain))
                }
            }
        let server: any Channel
        var bound = address
        switch address {
        case .unix(let path):
            server = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
        case .tcp(let host, let port):
            server = try await bootstrap.bind(host: host, port: port).get()
            if let actual = server.localAddress?.port { bound = .tcp(host: host, port: actual) }
        }
        domain.attach(server: server, address: bound)
        registry.withLock { $0.append(domain) }
        return domain
    }

    /// Starts `count` domains named `<prefix>0`… on `<directory>/<prefix>N.sock`.
    @discardableResult
    public func startDomains(
        count: Int, directory: String, prefix: String = "dom", configuration: SimulatedDomainConfiguration = SimulatedDomainConfiguration()
    ) async throws -> [SimulatedDomain] {
        var started: [SimulatedDomain] = []
        started.reserveCapacity(count)
        for i in 0..<count {
            started.append(try await start(name: "\(prefix)\(i)", address: .unix(path: "\(directory)/\(prefix)\(i).sock"), configuration: configuration))
        }
        return started
    }

    /// Closes every domain (removing their socket files) and, if it owns it, the event loop group.
    public func shutdown() async {
        let all = registry.withLock { domains in
            defer { domains = [] }
            return domains
        }
        await withTaskGroup(of: Void.self) { group in
            for domain in all {
                group.addTask {
                    domain.core.withLock { $0.markDead() }
                    await domain.closeEverything(removeSocket: true)
                }
            }
        }
        if ownsGroup { try? await group.shutdownGracefully() }
    }
}
