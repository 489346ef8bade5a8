import ColorunSystem
import Logging
import LuaRuntime
import NIOCore
import QEMULab
import QEMUSimulator

/// `colorun --sim`: every domain the policy asks for (`domain.get("web-p")`) is a simulated
/// QEMU (QEMUSimulator, in this process, on a UNIX socket in a temporary directory), with the
/// faults given by `--fault`: a site tries its checkpoint and failover logic, the Xen cycle
/// included, before it meets production VMs. The domains and the directory are removed when
/// the run ends.
public final class SimulatedDomains: PolicyExtension, @unchecked Sendable {
    /// A `--fault` option: `NAME=FAULT` for one domain, `FAULT` for every domain; FAULT is
    /// the simulator's fault language (docs/simulator.md), e.g. `web-p=@3s:crash`.
    public struct Fault: Sendable {
        public var domain: String?
        public var fault: SimulatedFault

        public init(parsing text: String) throws(PolicyError) {
            var body = Substring(text)
            if let eq = text.firstIndex(of: "="), text.firstIndex(of: ":").map({ eq < $0 }) ?? true {
                let name = String(text[..<eq])
                guard DomainSpec.isValidName(name) else {
                    throw .usage("--fault '\(text)': a domain name may use letters, digits, '-', '_' and '.'")
                }
                domain = name
                body = text[text.index(after: eq)...]
            }
            do {
                fault = try SimulatedFault(parsing: String(body))
            } catch {
                throw .usage("--fault '\(text)': \(error.reason) (expected [NAME=]TRIGGER:ACTION, e.g. web-p=@3s:crash or xen-load-devices-state:error=GenericError)")
            }
        }
    }

    let faults: [Fault]
    let simulator = QEMUSimulator()
    let directory: String
    /// Loop-confined: the domains being started or started, by name.
    private var starting: [String: Task<SimulatedDomain?, Never>] = [:]

    public init(faults: [Fault]) throws(PolicyError) {
        self.faults = faults
        do {
            directory = try makeTemporaryDirectory(in: Lab.runDirectoryParent, prefix: "colorun-sim")
            try RunDirectoryOwner.current().write(to: directory)
        } catch {
            throw .setup("--sim: cannot make a directory for the simulated domains: \(error)")
        }
    }

    /// The simulated domains started so far.
    public var domains: [SimulatedDomain] { simulator.domains }

    public func register(in session: PolicySession) throws {
        if let given = session.options.domains.first {
            throw PolicyError.usage("--sim simulates every domain the policy asks for; do not name '\(given.name)' with --domain")
        }
        session.domainProvider = { [unowned self, unowned session] name throws(LuaHostError) in
            let path = directory + "/" + name + ".sock"
            let domain: Domain
            do {
                domain = try session.addDomain(name: name, endpoint: .unix(path: path), options: session.options.domainOptions)
            } catch {
                throw LuaHostError.message("--sim: \(error)")
            }
            let mine = faults.filter { $0.domain == nil || $0.domain == name }.map(\.fault)
            let simulator = simulator
            // The domain connects on its first command and waits for the socket meanwhile.
            starting[name] = Task {
                try? await simulator.start(socketPath: path, name: name, configuration: SimulatedDomainConfiguration(faults: mine))
            }
            session.logger.info("sim: simulated domain", metadata: [
                "domain": .string(name), "faults": .string(mine.map(\.description).joined(separator: "; ")),
            ])
            return domain
        }
    }

    public func shutdown(session: PolicySession) -> EventLoopFuture<Void> {
        let promise = session.eventLoop.makePromise(of: Void.self)
        let tasks = Array(starting.values)
        let simulator = simulator
        let directory = directory
        promise.completeWithTask {
            for task in tasks { _ = await task.value }
            await simulator.shutdown()
            removeTree(directory)
        }
        return promise.futureResult
    }
}
