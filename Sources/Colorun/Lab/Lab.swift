import ColorunSystem
import JSON
import LuaRuntime
import NIOCore
import QEMULab
import QMP
import QMPClient

#if canImport(Glibc)
import Glibc
#endif

/// `colorun --lab`: real QEMU processes (TCG, the counting guest) started for a demo or a
/// test, handed to the policy as domains `primary` and `secondary`, and removed with their
/// sockets and files when the run ends. The `lab` Lua module lets a policy kill or freeze a
/// domain, read the guest's counter, and name a lab-managed standby for `remus.restore`.
///
/// A lab domain's QEMU starts when the policy first asks for it (`domain.get("secondary")`),
/// so a policy that protects one VM does not pay for a second one spinning under TCG.
public final class Lab: PolicyExtension, StandbyLauncher, @unchecked Sendable {
    let spec: QEMUSpec
    /// Where the lab's QEMU run directories (and `colorun --lab`'s state directory) are made.
    public static let runDirectoryParent = QEMUSpec().runDirectoryParent
    /// The names the lab offers.
    let names: [String]
    /// The lab's running domains, by name, in start order (standbys included).
    private(set) var instances: [(name: String, instance: QEMUInstance)] = []

    /// Offers one lab domain per name; `startNow` starts them all at once.
    public init(names: [String] = ["primary", "secondary"], memoryMiB: Int = 64, startNow: Bool = false) throws(QEMULabError) {
        spec = QEMUSpec(memoryMiB: memoryMiB, countingGuest: true)
        self.names = names
        if startNow {
            do {
                for name in names { _ = try start(name) }
            } catch {
                for (_, instance) in instances { instance.kill(SIGKILL) }
                throw error
            }
        }
    }

    /// The lab's QEMU for `name`, started now if it is not running yet.
    @discardableResult
    func start(_ name: String) throws(QEMULabError) -> QEMUInstance {
        if let running = instance(for: name) { return running }
        let instance = try QEMUInstance.start(spec)
        instances.append((name, instance))
        return instance
    }

    /// The domains started so far.
    public var domainSpecs: [DomainSpec] {
        instances.map { DomainSpec(name: $0.name, endpoint: $0.instance.qmpEndpoint) }
    }

    func instance(for name: String) -> QEMUInstance? {
        instances.first { $0.name == name }?.instance
    }

    // MARK: - StandbyLauncher

    func launch(name: String, spec restoreSpec: JSONValue, incoming: String, stateDirectory: String) throws -> LaunchedStandby {
        var standbySpec = spec
        standbySpec.incoming = incoming
        standbySpec.extraArguments += restoreSpec[PolicySession.standbyDiskArgumentsKey]?.arrayValue?.compactMap(\.stringValue) ?? []
        let instance: QEMUInstance
        do {
            instance = try QEMUInstance.start(standbySpec)
        } catch {
            throw LuaHostError.message("lab: cannot start the standby: \(error)")
        }
        instances.append((name, instance))
        return LaunchedStandby(endpoint: instance.qmpEndpoint, pid: instance.pid, stderrPath: instance.stderrPath)
    }

    // MARK: - PolicyExtension

    public func register(in session: PolicySession) throws {
        session.labLauncher = self
        for name in names where session.domains[name] != nil && instance(for: name) == nil {
            throw PolicyError.usage("--lab provides domain '\(name)'; do not name it with --domain too")
        }
        try session.runtime.registerModule("lab", functions: [
            "ensure": .sync { [unowned self] call in
                let name = try call.string(1)
                guard names.contains(name), session.domains[name] == nil else { return }
                do {
                    let instance = try start(name)
                    _ = try session.addDomain(name: name, endpoint: instance.qmpEndpoint, options: session.options.domainOptions)
                    session.logger.info("lab: started QEMU", metadata: ["domain": .string(name), "pid": .stringConvertible(instance.pid)])
                } catch {
                    throw LuaHostError.message("lab: cannot start '\(name)': \(error)")
                }
            },
            "kill": .sync { [unowned self] call in
                let name = try call.string(1)
                let signal = try Self.signal(call.isNil(2) ? "KILL" : try call.string(2))
                guard let instance = instance(for: name) else { throw LuaHostError.message("lab: '\(name)' is not a lab domain") }
                call.push(instance.kill(signal))
            },
            "pid": .sync { [unowned self] call in
                let name = try call.string(1)
                guard let instance = instance(for: name) else { throw LuaHostError.message("lab: '\(name)' is not a lab domain") }
                call.push(Int64(instance.pid))
            },
        ], luaSource: labPrelude)
    }

    public func shutdown(session: PolicySession) -> EventLoopFuture<Void> {
        let promise = session.eventLoop.makePromise(of: Void.self)
        let all = instances.map(\.instance)
        promise.completeWithTask {
            await withTaskGroup(of: Void.self) { group in
                for instance in all { group.addTask { await instance.stop(grace: .milliseconds(500)) } }
            }
        }
        return promise.futureResult
    }

    /// Removes a directory tree (the lab's temporary state directory).
    public static func removeDirectory(_ path: String) {
        removeTree(path)
    }

    static func signal(_ name: String) throws -> Int32 {
        switch name.uppercased() {
        case "KILL", "SIGKILL": return SIGKILL
        case "TERM", "SIGTERM": return SIGTERM
        case "STOP", "SIGSTOP": return SIGSTOP
        case "CONT", "SIGCONT": return SIGCONT
        default: throw LuaHostError.message("lab.kill: unknown signal '\(name)' (KILL, TERM, STOP or CONT)")
        }
    }
}

/// The Lua side of the `lab` module.
let labPrelude = #"""
local L = ...
local raw_kill, raw_pid, ensure = L.kill, L.pid, L.ensure
L.ensure = nil
-- Lab domains start on first use.
local get = domain.get
domain.get = function(name)
  if type(name) == "string" then ensure(name) end
  return get(name)
end
local function name_of(d, fname)
  if domain.is(d) then return d.name end
  if type(d) == "string" then return d end
  error("bad argument #1 to '" .. fname .. "' (domain expected, got " .. type(d) .. ")", 3)
end
L.kill = function(d, signal) return raw_kill(name_of(d, "lab.kill"), signal) end
L.freeze = function(d) return raw_kill(name_of(d, "lab.freeze"), "STOP") end
L.thaw = function(d) return raw_kill(name_of(d, "lab.thaw"), "CONT") end
L.pid = function(d) return raw_pid(name_of(d, "lab.pid")) end
-- The counting guest increments a dword at 0x7e00 while it runs.
L.counter = function(d)
  local out = qmp.execute(d, "human-monitor-command", { ["command-line"] = "xp /1wx 0x7e00" })
  local hex = out:match("0x(%x+)%s*$")
  if hex == nil then error("lab.counter: unexpected monitor output: " .. out, 2) end
  return tonumber(hex, 16)
end
-- A restore spec for a lab-managed standby: remus.restore(lab.standby("standby", primary))
L.standby = function(name, from)
  if type(name) ~= "string" then error("bad argument #1 to 'lab.standby' (name expected, got " .. type(name) .. ")", 2) end
  return { name = name, from = from, lab = true }
end
"""#
