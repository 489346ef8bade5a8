import ColorunSystem
import JSON
import LuaRuntime
import NIOCore
import NIOPosix
import QEMULab
import QMP
import QMPClient

#if canImport(Glibc)
import Glibc
#endif

/// Where the lab's ledger connections run.
private let ledgerGroup = MultiThreadedEventLoopGroup.singleton

/// `colorun --lab`: real QEMU processes (TCG) started for a demo or a test, handed to the
/// policy as domains `primary` and `secondary`, and removed with their sockets and files
/// when the run ends. The `lab` Lua module lets a policy kill or freeze a domain, read the
/// guest's counter, and name a lab-managed standby for `remus.restore`.
///
/// The guest is the counting boot sector, or (`--guest linux`) the Linux lab guest of
/// guest/README.md with its qcow2 disk and a NIC forwarding a host port to its ledger: then
/// the lab offers `primary` alone (one disk), a restored standby is that guest's QEMU on the
/// disk remus.restore provides and on a new host port, and the `lab` module also talks to
/// the ledgers (`lab.ready`, `lab.record`, `lab.ledger`, `lab.reboot`).
///
/// A lab domain's QEMU starts when the policy first asks for it (`domain.get("secondary")`),
/// so a policy that protects one VM does not pay for a second one spinning under TCG.
public final class Lab: PolicyExtension, StandbyLauncher, @unchecked Sendable {
    /// What the lab's domains run.
    public enum Guest: Sendable {
        /// The counting boot sector (no disk, no NIC).
        case counting
        /// The Linux lab guest with its disk and NIC.
        case linux(LinuxGuest)
        /// COLO-shaped QEMUs under KVM (see `COLOLab`).
        case colo(COLOLab)
    }

    let spec: QEMUSpec
    let guest: Guest
    /// The Linux guest's QEMUs, by domain name: their ledger port and serial log (boots and
    /// standbys), and the disk file each one writes.
    private var linuxBoots: [String: LinuxGuestBoot] = [:]
    private var diskFiles: [String: String] = [:]
    /// `lab.record`'s connection per domain, and the domains with a record in flight.
    private var writers: [String: LedgerClient] = [:]
    private var writing: Set<String> = []
    /// QEMUs `lab.reboot` started on a domain's disk.
    private var checkBoots = 0
    /// Where the lab's QEMU run directories (and `colorun --lab`'s state directory) are made.
    public static let runDirectoryParent = QEMUSpec().runDirectoryParent
    /// The names the lab offers.
    let names: [String]
    /// The lab's running domains, by name, in start order (standbys included).
    private(set) var instances: [(name: String, instance: QEMUInstance)] = []

    /// Offers one lab domain per name; `startNow` starts them all at once.
    public init(names: [String] = ["primary", "secondary"], memoryMiB: Int = 64, startNow: Bool = false) throws(QEMULabError) {
        spec = QEMUSpec(memoryMiB: memoryMiB, countingGuest: true)
        guest = .counting
        self.names = names
        try startAll(startNow)
    }

    /// Offers the Linux lab guest `linux` as domain `primary` (the only name: it has one disk).
    public init(linux: LinuxGuest, startNow: Bool = false) throws(QEMULabError) {
        spec = QEMUSpec(memoryMiB: linux.options.memoryMiB)
        guest = .linux(linux)
        names = ["primary"]
        try startAll(startNow)
    }

    /// COLO-shaped `primary` and `secondary` under KVM (`colorun --lab --guest colo`); more
    /// secondaries come from `lab.colo_secondary`.
    public init(colo: COLOLab, startNow: Bool = false) throws(QEMULabError) {
        spec = QEMUSpec(accelerator: "kvm")
        guest = .colo(colo)
        names = ["primary", "secondary"]
        try startAll(startNow)
    }

    /// Builds the Linux guest's image (scripts/build-guest) and makes it a fresh disk under
    /// `parent`: the lab of `colorun --lab --guest linux`.
    public static func linux(parent: String = Lab.runDirectoryParent) async throws(QEMULabError) -> Lab {
        let guest = try await LinuxGuest.create(parent: parent)
        // Owned by this process: the start-up sweep removes it if this process is killed.
        do {
            try RunDirectoryOwner.current().write(to: guest.directory)
        } catch {
            throw QEMULabError("\(error)")
        }
        return try Lab(linux: guest)
    }

    private func startAll(_ startNow: Bool) throws(QEMULabError) {
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
        let instance: QEMUInstance
        switch guest {
        case .counting:
            instance = try QEMUInstance.start(spec)
        case .linux(let linux):
            let boot = try linux.boot()
            instance = boot.qemu
            linuxBoots[name] = boot
            diskFiles[name] = linux.diskPath
        case .colo(let colo):
            instance = try QEMUInstance.start(try colo.spec(name))
        }
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
        let diskArguments = restoreSpec[PolicySession.standbyDiskArgumentsKey]?.arrayValue?.compactMap(\.stringValue) ?? []
        standbySpec.extraArguments += diskArguments
        let instance: QEMUInstance
        do {
            switch guest {
            case .counting:
                instance = try QEMUInstance.start(standbySpec)
            case .colo:
                throw LuaHostError.message("lab: the COLO lab has no remus standbys (use lab.colo_secondary)")
            case .linux(let linux):
                // The same machine on a new host port, its disk the overlay remus.restore made;
                // a generation without disks (`disks = false`) leaves the standby the live
                // disk, writes made after the checkpoint included, as such a restore would.
                let overlay = RemusDisks.overlayFiles(diskArguments).first
                let boot = try linux.boot(base: QEMUSpec(incoming: incoming, extraArguments: diskArguments),
                                          disk: overlay == nil ? .own : .providedElsewhere)
                instance = boot.qemu
                linuxBoots[name] = boot
                diskFiles[name] = overlay ?? linux.diskPath
                restoredNames.insert(name)
            }
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
                    var domainOptions = session.options.domainOptions
                    domainOptions.refusedCommands["xen-load-devices-state"] = Self.xenCycleRefusal
                    let domain = try session.addDomain(name: name, endpoint: instance.qmpEndpoint, options: domainOptions)
                    domain.connectFailureContext = { Self.whatBecameOf(instance) }
                    session.logger.info("lab: started QEMU", metadata: ["domain": .string(name), "pid": .stringConvertible(instance.pid)])
                } catch {
                    throw LuaHostError.message("lab: cannot start '\(name)': \(error)")
                }
            },
            "colo_secondary": .sync { [unowned self] call in
                let name = try call.string(1)
                guard case .colo = guest else { throw LuaHostError.message("lab.colo_secondary: the lab is not a COLO lab (run with --guest colo)") }
                guard session.domains[name] == nil, instance(for: name) == nil else {
                    throw LuaHostError.message("lab.colo_secondary: a domain '\(name)' exists already")
                }
                do {
                    let instance = try start(name)
                    let domain = try session.addDomain(name: name, endpoint: instance.qmpEndpoint, options: session.options.domainOptions)
                    domain.connectFailureContext = { Self.whatBecameOf(instance) }
                    session.logger.info("lab: started a COLO secondary", metadata: ["domain": .string(name), "pid": .stringConvertible(instance.pid)])
                } catch {
                    throw LuaHostError.message("lab.colo_secondary: cannot start '\(name)': \(error)")
                }
            },
            "colo": .sync { [unowned self] call in
                let name = try call.string(1)
                guard case .colo(let colo) = guest, let addresses = colo.addresses(name) else {
                    throw LuaHostError.message("lab.colo: '\(name)' is not a COLO lab domain")
                }
                _ = addresses
                call.push(json: colo.json(name))
            },
            // A fresh file name for lab.disk_pattern's copy of a COLO lab domain's disk.
            "scratch": .sync { [unowned self] call in
                guard case .colo(let colo) = guest else { throw LuaHostError.message("lab.disk_pattern: only in the COLO lab (--guest colo)") }
                scratchFiles += 1
                call.push("\(colo.directory)/disk-copy-\(scratchFiles).raw")
            },
            // The byte that fills [offset, offset+length) of a file, or -1 if they differ.
            "pattern": .sync { call in
                let path = try call.string(1)
                let offset = Int(try call.integer(2))
                let length = Int(try call.integer(3))
                let bytes: [UInt8]
                do { bytes = try readFile(path) } catch { throw LuaHostError.message("lab.disk_pattern: \(error)") }
                defer { unlink(path) }
                guard offset >= 0, length > 0, offset + length <= bytes.count else {
                    throw LuaHostError.message("lab.disk_pattern: \(offset)+\(length) is outside the disk (\(bytes.count) bytes)")
                }
                let first = bytes[offset]
                call.push(Int64(bytes[offset..<(offset + length)].allSatisfy { $0 == first } ? Int(first) : -1))
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
            "ready": .async { [unowned self] call, completion in
                let name = try call.string(1)
                let timeout = call.isNil(2) ? Duration.seconds(120) : Duration.nanoseconds(try call.duration(2).timeAmount.nanoseconds)
                let boot = try linuxBoot(name, "lab.ready")
                // A boot prints its READY line on its own console; a restored standby's guest
                // printed it before the checkpoint (its console is new): its ledger answers.
                let booted = !restoredNames.contains(name)
                session.track({ () async -> Result<Double, any Error> in
                    let clock = ContinuousClock()
                    let start = clock.now
                    do {
                        if booted { try await boot.waitUntilReady(timeout: timeout) }
                        let client = try await boot.ledger(on: ledgerGroup, timeout: max(timeout - (clock.now - start), .seconds(1)))
                        client.close()
                        return .success(Self.milliseconds(clock.now - start))
                    } catch {
                        return .failure(error)
                    }
                }) { result in
                    switch result {
                    case .success(let ms): completion.succeed([.number(ms)])
                    case .failure(let error): completion.fail(LuaHostError.message("lab.ready: '\(name)': \(error)"))
                    }
                }
            },
            "record": .async { [unowned self] call, completion in
                let name = try call.string(1)
                let number = Int(try call.integer(2))
                let timeout = call.isNil(3) ? Duration.seconds(10) : Duration.nanoseconds(try call.duration(3).timeAmount.nanoseconds)
                let boot = try linuxBoot(name, "lab.record")
                guard !writing.contains(name) else {
                    throw LuaHostError.message("lab.record: a record to '\(name)' is in flight (one at a time per domain)")
                }
                writing.insert(name)
                let existing = writers[name]
                session.track({ () async -> Result<LedgerClient, LedgerError> in
                    let client: LedgerClient
                    do throws(LedgerError) {
                        if let existing {
                            client = existing
                        } else {
                            client = try await boot.ledger(on: ledgerGroup, timeout: min(timeout, .seconds(5)))
                        }
                    } catch {
                        return .failure(error)
                    }
                    do throws(LedgerError) {
                        try await client.record(number, timeout: timeout)
                        return .success(client)
                    } catch {
                        client.close()
                        return .failure(error)
                    }
                }) { [unowned self] result in
                    writing.remove(name)
                    switch result {
                    case .success(let client):
                        writers[name] = client
                        completion.succeed()
                    case .failure(let error):
                        writers[name] = nil
                        completion.fail(LuaHostError.structured(["class": "LedgerError", "desc": .string(error.description)],
                                                                message: "lab.record: '\(name)': \(error)"))
                    }
                }
            },
            "ledger": .async { [unowned self] call, completion in
                let name = try call.string(1)
                let boot = try linuxBoot(name, "lab.ledger")
                session.track({ () async -> Result<JSONValue, LedgerError> in
                    do throws(LedgerError) {
                        let client = try await boot.ledger(on: ledgerGroup)
                        defer { client.close() }
                        return .success(Self.ledgerFields(try await client.dump(), fsck: try await client.fsck()))
                    } catch {
                        return .failure(error)
                    }
                }) { result in
                    switch result {
                    case .success(let fields): completion.succeed([.json(fields)])
                    case .failure(let error): completion.fail(LuaHostError.message("lab.ledger: '\(name)': \(error)"))
                    }
                }
            },
            "reboot": .async { [unowned self] call, completion in
                let name = try call.string(1)
                let boot = try linuxBoot(name, "lab.reboot")
                guard case .linux(let linux) = guest, let disk = diskFiles[name] else {
                    throw LuaHostError.message("lab.reboot: '\(name)' has no disk the lab knows")
                }
                writers.removeValue(forKey: name)?.close()
                session.track({ () async -> Result<Void, any Error> in
                    // Cleanly off if it still runs: its disk is then what the guest left.
                    guard boot.qemu.exitStatus == nil else { return .success(()) }
                    do {
                        let client = try await boot.ledger(on: ledgerGroup)
                        try await client.powerOff()
                        client.close()
                        guard let status = await boot.qemu.waitForExit(timeout: .seconds(60)) else {
                            throw QEMULabError("the guest did not power off within 60 s")
                        }
                        guard status == .exited(code: 0) else { throw QEMULabError("its QEMU \(status) at power-off") }
                        return .success(())
                    } catch {
                        return .failure(error)
                    }
                }) { [unowned self] result in
                    if case .failure(let error) = result {
                        completion.fail(LuaHostError.message("lab.reboot: '\(name)': power-off: \(error)"))
                        return
                    }
                    let check: LinuxGuestBoot
                    do {
                        check = try linux.boot(disk: .image(disk))
                    } catch {
                        completion.fail(LuaHostError.message("lab.reboot: '\(name)': \(error)"))
                        return
                    }
                    checkBoots += 1
                    instances.append(("\(name)-reboot-\(checkBoots)", check.qemu))
                    session.track({ () async -> Result<JSONValue, any Error> in
                        do {
                            try await check.waitUntilReady()
                            let client = try await check.ledger(on: ledgerGroup)
                            let fields = Self.ledgerFields(try await client.dump(), fsck: try await client.fsck())
                            try await client.powerOff()
                            client.close()
                            _ = await check.qemu.waitForExit(timeout: .seconds(60))
                            return .success(fields)
                        } catch {
                            return .failure(QEMULabError("\(error)\n\(check.diagnostics())"))
                        }
                    }) { result in
                        check.qemu.kill(SIGKILL)
                        switch result {
                        case .success(let fields): completion.succeed([.json(fields)])
                        case .failure(let error): completion.fail(LuaHostError.message("lab.reboot: '\(name)': \(error)"))
                        }
                    }
                }
            },
        ], luaSource: labPrelude)
    }

    /// The boot (or restored standby) of the Linux guest that domain `name` runs.
    private func linuxBoot(_ name: String, _ function: String) throws -> LinuxGuestBoot {
        guard case .linux = guest else { throw LuaHostError.message("\(function): the lab's guest has no ledger (run with --guest linux)") }
        guard let boot = linuxBoots[name] else { throw LuaHostError.message("\(function): '\(name)' is not a lab domain") }
        return boot
    }

    /// Disk copies made by lab.disk_pattern.
    private var scratchFiles = 0

    /// The domains that are restored standbys (their guest booted before the checkpoint).
    private var restoredNames: Set<String> = []

    static func ledgerFields(_ contents: LedgerContents, fsck: String) -> JSONValue {
        [
            "records": .array(contents.records.map { .int(Int64($0)) }), "count": .int(Int64(contents.records.count)),
            "bad": .int(Int64(contents.bad)), "fsck": .string(fsck),
        ]
    }

    static func milliseconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) * 1000 + Double(duration.components.attoseconds) / 1e15
    }

    public func shutdown(session: PolicySession) -> EventLoopFuture<Void> {
        for client in writers.values { client.close() }
        writers = [:]
        let promise = session.eventLoop.makePromise(of: Void.self)
        let all = instances.map(\.instance)
        var coloDirectory: String?
        if case .colo(let colo) = guest { coloDirectory = colo.directory }
        promise.completeWithTask { [coloDirectory] in
            await withTaskGroup(of: Void.self) { group in
                for instance in all { group.addTask { await instance.stop(grace: .milliseconds(500)) } }
            }
            // The COLO lab's images and sockets go with the run.
            if let coloDirectory { removeTree(coloDirectory) }
        }
        return promise.futureResult
    }

    /// Stops every QEMU the lab started (tests call it when a run could not shut the lab down).
    public func stopAll() async {
        for instance in instances.map(\.instance) { await instance.stop(grace: .milliseconds(500)) }
    }

    /// Every QEMU the lab started: name, pid, and how it ended with the tail of its stderr
    /// (for a test's failure message: a QEMU that aborted says why there).
    public func processReport() -> String {
        instances.map { "\($0.name): \(Self.whatBecameOf($0.instance))" }.joined(separator: "\n")
    }

    /// For a lab domain's connect failure: whether its QEMU exited (and what it said on
    /// stderr) or runs with its monitor socket gone.
    static func whatBecameOf(_ instance: QEMUInstance) -> String {
        if let status = instance.exitStatus {
            let stderr = instance.stderrText().split(separator: "\n").suffix(5).joined(separator: " | ")
            return "its QEMU (pid \(instance.pid)) \(status)" + (stderr.isEmpty ? "" : "; stderr: \(stderr)")
        }
        if access(instance.qmpSocketPath, F_OK) != 0 {
            let directory = access(instance.runDirectory, F_OK) == 0 ? "" : " (its run directory \(instance.runDirectory) is gone too)"
            return "its QEMU (pid \(instance.pid)) runs but its socket \(instance.qmpSocketPath) does not exist\(directory)"
        }
        return "its QEMU (pid \(instance.pid)) runs"
    }

    /// Why a lab domain refuses `xen-load-devices-state` (before sending it).
    public static let xenCycleRefusal = "the lab's QEMU is plain QEMU, not Xen's: xen-load-devices-state would abort its incoming state and every later checkpoint would fail; run the Xen cycle (colo.checkpoint, qmp.restore, colo.policy in mode \"xen\") with --sim, or use remus.checkpoint in the lab"

    /// The places a policy uses the Xen cycle (`colo.checkpoint`, `qmp.restore`, or a
    /// `xen-load-devices-state` it sends itself), which `--lab` refuses up front.
    public static func xenCycleUses(_ scan: LuaGlobalScan) -> [LuaGlobalScan.Access] {
        scan.accesses.filter { $0.kind == .read && ["colo.checkpoint", "qmp.restore"].contains($0.name) }
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
-- The COLO lab (--guest colo): a new COLO-shaped secondary, and the addresses
-- colo.native.start/reprotect need to use a domain as the secondary ({uri=, nbd=, net=}).
local raw_colo_secondary, raw_colo = L.colo_secondary, L.colo
L.colo_secondary = function(name)
  if type(name) ~= "string" then error("bad argument #1 to 'lab.colo_secondary' (name expected, got " .. type(name) .. ")", 2) end
  raw_colo_secondary(name)
  return get(name)
end
L.colo = function(d) return raw_colo(name_of(d, "lab.colo")) end
-- The byte that fills [offset, offset+length) of a COLO lab domain's guest disk (-1 if the
-- bytes differ): the disk is copied to a file with drive-backup (QEMU 7.2's HMP qemu-io
-- prints what it reads on QEMU's stdout, not in the reply).
local raw_scratch, raw_pattern = L.scratch, L.pattern
L.scratch, L.pattern = nil, nil
L.disk_pattern = function(d, offset, length)
  if not domain.is(d) then d = get(name_of(d, "lab.disk_pattern")) end
  local path = raw_scratch()
  local result
  local sub = d:on("BLOCK_JOB_COMPLETED", function(ev) if ev.data.device == "lab-disk-copy" then result = ev.data end end)
  local ok, err = pcall(qmp.execute, d, "drive-backup",
    { ["job-id"] = "lab-disk-copy", device = "colo-disk0", target = path, format = "raw", sync = "full" })
  for _ = 1, 5000 do
    if not ok or result ~= nil then break end
    sleep(0.002)
  end
  sub.cancel()
  if not ok then error(err, 2) end
  if result == nil then error("lab.disk_pattern: " .. d.name .. ": the disk copy did not end within 10 s", 2) end
  if result.error ~= nil then error("lab.disk_pattern: " .. d.name .. ": " .. result.error, 2) end
  return raw_pattern(path, offset, length)
end
-- The Linux guest's ledger (--guest linux).
for _, f in ipairs({"ready", "record", "ledger", "reboot"}) do
  local raw = L[f]
  L[f] = function(d, ...) return raw(name_of(d, "lab." .. f), ...) end
end
-- A restore spec for a lab-managed standby: remus.restore(lab.standby("standby", primary))
L.standby = function(name, from)
  if type(name) ~= "string" then error("bad argument #1 to 'lab.standby' (name expected, got " .. type(name) .. ")", 2) end
  return { name = name, from = from, lab = true }
end
"""#
