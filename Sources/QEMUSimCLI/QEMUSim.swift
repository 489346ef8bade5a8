import ArgumentParser
import ColorunSystem
import Dispatch
import QEMUSimulator
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `qemu-sim`: simulated QEMU 7.2 monitors on UNIX sockets (or TCP), for scripts and
/// load tests. The work is in the QEMUSimulator library; this only parses and waits.
@main
struct QEMUSim: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qemu-sim",
        abstract: "Simulated QEMU 7.2 QMP monitors with scriptable faults.",
        discussion: """
            Starts --count domains named <prefix>0… on <dir>/<prefix>N.sock, plus one per
            --listen. Prints each domain's address, then a line 'ready N', and serves until
            SIGINT or SIGTERM (which remove the socket files). Fault lines look like
            'stop:delay=200ms', 'xen-save-devices-state:crash-after-bytes=4096',
            '*:hang,after=3', '@2s:freeze' (see docs/simulator.md).
            """,
        version: "0.1.0")

    @Option(help: "Directory for the domains' sockets (created if missing).")
    var dir: String?

    @Option(help: "How many domains to start in --dir.")
    var count: Int = 1

    @Option(help: "Name prefix of the domains in --dir.")
    var prefix: String = "dom"

    @Option(name: .customLong("listen"), help: "One more domain on unix:PATH or tcp:HOST:PORT (repeatable).")
    var listen: [String] = []

    @Option(help: "A file of faults, one per line, applied to every domain.")
    var faults: String?

    @Option(name: .customLong("fault"), help: "A fault applied to every domain (repeatable).")
    var faultSpecs: [String] = []

    @Option(help: "Run state at start: running, paused, prelaunch, inmigrate, …")
    var state: String = "running"

    @Option(help: "COLO mode at start: none, primary, secondary.")
    var colo: String = "none"

    @Option(help: "Event loop threads.")
    var threads: Int = 1

    @Flag(help: "Print only the 'ready N' line.")
    var quiet = false

    func validate() throws {
        guard dir != nil || !listen.isEmpty else { throw ValidationError("give --dir or --listen") }
        guard count >= 0, count <= 100_000 else { throw ValidationError("--count must be 0…100000") }
        guard RunState(rawValue: state) != nil else { throw ValidationError("unknown run state '\(state)'") }
        guard COLOMode(rawValue: colo) != nil else { throw ValidationError("unknown COLO mode '\(colo)'") }
        for address in listen where SimulatorAddress(parsing: address) == nil {
            throw ValidationError("bad address '\(address)' (unix:PATH or tcp:HOST:PORT)")
        }
    }

    func run() async throws {
        // Thousands of domains: a listening socket and a connection each.
        raiseOpenFileLimit()
        var faultList: [SimulatedFault] = []
        if let faults {
            guard let text = readText(faults) else { throw ValidationError("cannot read \(faults)") }
            faultList += try SimulatedFault.parseList(text)
        }
        for spec in faultSpecs { faultList.append(try SimulatedFault(parsing: spec)) }
        let configuration = SimulatedDomainConfiguration(
            runState: RunState(rawValue: state)!, faults: faultList, coloMode: COLOMode(rawValue: colo)!)

        let simulator = QEMUSimulator(threads: threads)
        var started: [SimulatedDomain] = []
        if let dir {
            mkdir(dir, 0o755)
            started += try await simulator.startDomains(count: count, directory: dir, prefix: prefix, configuration: configuration)
        }
        for (i, text) in listen.enumerated() {
            let address = SimulatorAddress(parsing: text)!
            started.append(try await simulator.start(name: "listen\(i)", address: address, configuration: configuration))
        }
        if !quiet {
            for domain in started { print("\(domain.name) \(domain.address)") }
        }
        print("ready \(started.count)")
        fflush(nil)

        await waitForTermination()
        await simulator.shutdown()
    }

    private func readText(_ path: String) -> String? {
        guard let file = fopen(path, "r") else { return nil }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = fread(&buffer, 1, buffer.count, file)
            if n == 0 { break }
            bytes += buffer[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    private func waitForTermination() async {
        let latch = SignalLatch()
        var sources: [any DispatchSourceSignal] = []
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { latch.fire() }
            source.resume()
            sources.append(source)
        }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            latch.wait(continuation)
        }
        for source in sources { source.cancel() }
    }
}

/// Resumes the one waiter once, on the first signal (even one that came before the wait).
final class SignalLatch: Sendable {
    private struct State {
        var fired = false
        var waiter: CheckedContinuation<Void, Never>?
    }
    private let state = Mutex(State())

    func fire() {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.fired = true
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume()
    }

    func wait(_ continuation: CheckedContinuation<Void, Never>) {
        let resumeNow = state.withLock { state -> Bool in
            if state.fired { return true }
            state.waiter = continuation
            return false
        }
        if resumeNow { continuation.resume() }
    }
}
