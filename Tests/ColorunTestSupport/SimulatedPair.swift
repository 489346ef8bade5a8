import QEMUSimulator

/// A pair of simulated domains, `web-p` and `web-s`, listening on `p.sock` and `s.sock` in
/// a fresh directory.
public struct SimulatedPair: Sendable {
    public let sim: QEMUSimulator
    public let primary: SimulatedDomain
    public let secondary: SimulatedDomain
    public let directory: String

    /// Starts both domains. Prefer `withSimulatedPair`, which also stops them; a caller of
    /// `start` must await `shutdown()` on every path.
    public static func start(_ tag: String = "colorun-sim") async throws -> SimulatedPair {
        let dir = makeTempDirectory(tag)
        let sim = QEMUSimulator()
        do {
            let p = try await sim.start(socketPath: dir + "/p.sock", name: "web-p")
            let s = try await sim.start(socketPath: dir + "/s.sock", name: "web-s")
            return SimulatedPair(sim: sim, primary: p, secondary: s, directory: dir)
        } catch {
            await sim.shutdown()
            removeDirectory(dir)
            throw error
        }
    }

    /// `(name, endpoint)` of both domains.
    public var domains: [(String, String)] {
        [("web-p", "unix:\(directory)/p.sock"), ("web-s", "unix:\(directory)/s.sock")]
    }

    /// Both domains as `colorun` arguments: `--domain web-p=unix:... --domain web-s=unix:...`.
    public var domainArguments: [String] {
        domains.flatMap { ["--domain", "\($0.0)=\($0.1)"] }
    }

    /// Closes both domains and their sockets, stops the simulator's loop and removes the
    /// directory; returns when all of that is done.
    public func shutdown() async {
        await sim.shutdown()
        removeDirectory(directory)
    }
}

/// Runs `body` with a fresh simulated pair; the simulator is stopped before this returns,
/// also when `body` throws.
public func withSimulatedPair<T>(
    _ tag: String = "colorun-sim", _ body: (SimulatedPair) async throws -> T
) async throws -> T {
    let pair = try await SimulatedPair.start(tag)
    do {
        let result = try await body(pair)
        await pair.shutdown()
        return result
    } catch {
        await pair.shutdown()
        throw error
    }
}

/// Runs `body` with a simulator (no domains yet) and a fresh directory for its sockets; the
/// simulator is stopped and the directory removed before this returns, also when `body` throws.
public func withSimulator<T>(
    _ tag: String = "colorun-sim", _ body: (QEMUSimulator, String) async throws -> T
) async throws -> T {
    let dir = makeTempDirectory(tag)
    let sim = QEMUSimulator()
    do {
        let result = try await body(sim, dir)
        await sim.shutdown()
        removeDirectory(dir)
        return result
    } catch {
        await sim.shutdown()
        removeDirectory(dir)
        throw error
    }
}
