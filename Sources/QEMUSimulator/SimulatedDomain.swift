import JSON
import NIOCore
import QMP
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where a simulated domain listens: `unix:/path/dom0.sock` or `tcp:127.0.0.1:4444`
/// (port 0 picks a free one; `SimulatedDomain.address` then has the real port).
public enum SimulatorAddress: Sendable, Hashable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: Int)

    public init?(parsing text: String) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { return nil }
            self = .unix(path: path)
        } else if text.hasPrefix("tcp:"), let colon = text.lastIndex(of: ":"), colon > text.index(text.startIndex, offsetBy: 3) {
            var host = String(text[text.index(text.startIndex, offsetBy: 4)..<colon])
            if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            guard let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port), !host.isEmpty else { return nil }
            self = .tcp(host: host, port: port)
        } else if text.hasPrefix("/") {
            self = .unix(path: text)
        } else {
            return nil
        }
    }

    public var description: String {
        switch self {
        case .unix(let path): "unix:\(path)"
        case .tcp(let host, let port): host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)"
        }
    }
}

/// How a domain starts.
public struct SimulatedDomainConfiguration: Sendable {
    /// `running` (default), `paused`, `prelaunch` (QEMU's `-S`), `inmigrate` (`-incoming defer`), ...
    public var runState: RunState
    public var faults: [SimulatedFault]
    public var coloMode: COLOMode
    public var deviceStateSize: Int

    public init(runState: RunState = .running, faults: [SimulatedFault] = [], coloMode: COLOMode = .none, deviceStateSize: Int = DeviceStateFile.defaultSize) {
        self.runState = runState
        self.faults = faults
        self.coloMode = coloMode
        self.deviceStateSize = deviceStateSize
    }
}

/// One simulated QEMU on one QMP socket, running inside a `QEMUSimulator`.
///
/// Everything it knows is readable from any thread; faults and management actions can be
/// changed while clients are connected.
public final class SimulatedDomain: Sendable {
    public let name: String
    let eventLoop: any EventLoop

    struct IO {
        var address: SimulatorAddress
        var server: (any Channel)?
        var connections: [Int: any Channel] = [:]
        /// Each connection's client address (`IP:PORT` for TCP), kept after it closes.
        var peers: [Int: String] = [:]
        var nextConnection = 1
        var timers: [Scheduled<Void>] = []
    }

    let core: Mutex<DomainCore>
    let io: Mutex<IO>

    init(name: String, address: SimulatorAddress, configuration: SimulatedDomainConfiguration, eventLoop: any EventLoop) {
        self.name = name
        self.eventLoop = eventLoop
        let now = wallClock()
        var machine = SimulatedQEMU(name: name, runState: configuration.runState, now: now)
        machine.coloMode = configuration.coloMode
        machine.deviceStateSize = configuration.deviceStateSize
        core = Mutex(DomainCore(machine: machine, faults: FaultSchedule(configuration.faults), startedAt: now))
        io = Mutex(IO(address: address))
    }

    // MARK: - Inspection

    /// Where it listens (with the real port for `tcp:…:0`).
    public var address: SimulatorAddress { io.withLock { $0.address } }
    /// The socket path for a `unix:` domain.
    public var socketPath: String? {
        if case .unix(let path) = address { return path }
        return nil
    }
    public var runState: RunState { core.withLock { $0.machine.runState } }
    public var saveCounter: Int { core.withLock { $0.machine.saveCounter } }
    /// Every state `xen-load-devices-state` loaded, oldest first.
    public var loadedStates: [LoadedDeviceState] { core.withLock { $0.machine.loadedStates } }
    /// Every file `xen-save-devices-state` or `migrate` wrote, oldest first.
    public var savedStates: [SavedDeviceState] { core.withLock { $0.machine.savedStates } }
    public var commandLog: [CommandLogEntry] { core.withLock { $0.log } }
    public var faults: [SimulatedFault] { core.withLock { $0.faults.faults } }
    public var isAlive: Bool { core.withLock { $0.isAlive } }
    public var isFrozen: Bool { core.withLock { $0.isFrozen } }
    public var guestCounter: UInt32 { core.withLock { $0.machine.guestCounter(at: wallClock()) } }
    public var coloMode: COLOMode { core.withLock { $0.machine.coloMode } }
    /// Open client connections (the one holding the monitor and those waiting for it).
    public var connectionCount: Int { io.withLock { $0.connections.count } }
    /// The client address a connection (as numbered in `commandLog`) came from: `IP:PORT` for
    /// a TCP client, nil for a UNIX socket client or an unknown connection. With clients on
    /// different hosts, it names which host sent each logged command.
    public func peer(of connection: Int) -> String? { io.withLock { $0.peers[connection] } }

    // MARK: - Control

    public func setRunState(_ state: RunState) {
        core.withLock { $0.machine.setRunState(state, now: wallClock()) }
    }

    public func setCOLOMode(_ mode: COLOMode) {
        core.withLock { $0.machine.coloMode = mode }
    }

    /// Replaces every fault (counters start again).
    public func setFaults(_ faults: [SimulatedFault]) {
        core.withLock { $0.faults = FaultSchedule(faults) }
        scheduleTimedFaults(faults)
    }

    public func addFault(_ fault: SimulatedFault) {
        core.withLock { $0.faults.add(fault) }
        scheduleTimedFaults([fault])
    }

    /// Adds faults in the text form (`stop:delay=200ms`, one per line).
    public func addFaults(parsing text: String) throws(SimulatedFaultSyntaxError) {
        for fault in try SimulatedFault.parseList(text) { addFault(fault) }
    }

    public func clearFaults() { setFaults([]) }

    /// Stops answering anything (heartbeats included) while keeping sockets open.
    public func freeze() { core.withLock { $0.freeze() } }

    public func unfreeze() {
        let greet = core.withLock { $0.unfreeze() }
        if let greet { sendGreeting(to: greet) }
    }

    /// Sends an event to the client holding the monitor, if it negotiated.
    public func emitEvent(_ name: String, data: JSONValue = [:]) {
        let event = QMPEvent(name: name, data: data, timestamp: wallClock()).json
        if let channel = activeChannel() { channel.writeAndFlush(QMPServerOutput.json(event), promise: nil) }
    }

    /// Closes every client connection; the domain lives on and accepts new ones.
    public func dropConnections() {
        for channel in io.withLock({ Array($0.connections.values) }) { channel.close(promise: nil) }
    }

    /// Like SIGKILL: no event, connections reset, the socket file stays and refuses connections.
    public func kill() async {
        core.withLock { $0.markDead() }
        await closeEverything(removeSocket: false)
    }

    // MARK: - Connection plumbing (called by the channel handler, on the domain's event loop)

    func connectionOpened(_ channel: any Channel) -> (Int, [DomainStep]) {
        let id = io.withLock { io in
            let id = io.nextConnection
            io.nextConnection += 1
            io.connections[id] = channel
            if let remote = channel.remoteAddress, let ip = remote.ipAddress, let port = remote.port { io.peers[id] = "\(ip):\(port)" }
            return id
        }
        return (id, core.withLock { $0.connect(id) })
    }

    func connectionClosed(_ id: Int) {
        io.withLock { _ = $0.connections.removeValue(forKey: id) }
        if let next = core.withLock({ $0.disconnect(id) }) { sendGreeting(to: next) }
    }

    func receive(_ input: QMPInput, from id: Int, arrived: Double) -> [DomainStep]? {
        core.withLock { core in
            guard core.isServing(id) || core.isFrozen else { return nil }
            return core.receive(input, from: id, now: wallClock(), arrived: arrived)
        }
    }

    func isServing(_ id: Int) -> Bool { core.withLock { $0.isServing(id) } }

    private func activeChannel() -> (any Channel)? {
        guard let id = core.withLock({ core in core.active.flatMap { core.isServing($0) ? $0 : nil } }) else { return nil }
        return io.withLock { $0.connections[id] }
    }

    private func sendGreeting(to id: Int) {
        guard let channel = io.withLock({ $0.connections[id] }) else { return }
        channel.pipeline.fireUserInboundEventTriggered(DomainSignal.greet)
    }

    /// The process died (crash, kill) or quit: stop listening, drop every client.
    func closeEverything(removeSocket: Bool) async {
        let (server, connections, timers, address) = io.withLock { io in
            let result = (io.server, Array(io.connections.values), io.timers, io.address)
            io.server = nil
            io.timers = []
            return result
        }
        for timer in timers { timer.cancel() }
        // Listener first, so a client that sees its connection end finds the socket refusing.
        try? await server?.close()
        if case .unix(let path) = address {
            // NIO removes the socket file when the listener closes. A killed QEMU leaves it
            // behind, refusing connections: put back a bound, never-listening socket file.
            unlink(path)
            if !removeSocket { leaveDeadSocketFile(at: path) }
        }
        for channel in connections {
            try? await channel.close()
        }
    }

    func attach(server: any Channel, address: SimulatorAddress) {
        io.withLock {
            $0.server = server
            $0.address = address
        }
        scheduleTimedFaults(faults)
    }

    // MARK: - Faults by time

    private func scheduleTimedFaults(_ faults: [SimulatedFault]) {
        let startedAt = core.withLock { $0.startedAt }
        for fault in faults {
            guard case .time(let at) = fault.trigger else { continue }
            let due = startedAt + Double(at.components.seconds) + Double(at.components.attoseconds) * 1e-18
            let delay = max(0, due - wallClock())
            let action = fault.action
            let task = eventLoop.scheduleTask(in: .nanoseconds(Int64(delay * 1e9))) { [self] in
                self.fire(action)
            }
            io.withLock { $0.timers.append(task) }
        }
    }

    /// A fault that fires by itself.
    func fire(_ action: SimulatedFault.Action) {
        switch action {
        case .freeze: freeze()
        case .crash:
            core.withLock { $0.markDead() }
            Task { await closeEverything(removeSocket: false) }
        case .drop: dropConnections()
        case .hang:
            if let channel = activeChannel() { channel.pipeline.fireUserInboundEventTriggered(DomainSignal.hang) }
        case .flood(let n):
            guard let channel = activeChannel() else { return }
            let now = wallClock()
            for _ in 0..<n { channel.write(QMPServerOutput.json(DomainCore.floodEvent(now: now)), promise: nil) }
            channel.flush()
        case .junk(let text):
            activeChannel()?.writeAndFlush(QMPServerOutput.raw(Array(text.utf8) + [0x0D, 0x0A]), promise: nil)
        case .oversized(let n):
            activeChannel()?.writeAndFlush(QMPServerOutput.raw(DomainCore.oversizedLine(bytes: n, now: wallClock())), promise: nil)
        case .delay, .error, .wrongID:
            break  // these only make sense for a command
        }
    }
}

/// Signals from the domain to a connection's handler.
enum DomainSignal: Sendable {
    /// This connection now holds the monitor: send the greeting and serve queued input.
    case greet
    /// Answer nothing more.
    case hang
}

/// Wall-clock seconds (QMP event timestamps use the wall clock).
func wallClock() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Leaves a UNIX socket file at `path` that nobody listens on: connect() gets ECONNREFUSED,
/// as after a QEMU was killed.
func leaveDeadSocketFile(at path: String) {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return }
    defer { close(fd) }
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return }
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    _ = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
}
