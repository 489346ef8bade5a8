import JSON
import QMP

/// A device state that a `xen-load-devices-state` loaded, as tests read it back.
public struct LoadedDeviceState: Sendable, Hashable {
    /// The path the command named.
    public var path: String
    /// What the file said: which domain saved it, its save counter, the guest counter.
    public var file: DeviceStateFile
    /// Wall-clock seconds when it was loaded.
    public var loadedAt: Double
}

/// A file that a successful `xen-save-devices-state` or `migrate` wrote.
public struct SavedDeviceState: Sendable, Hashable {
    public var path: String
    public var file: DeviceStateFile
}

/// QEMU 7.2's monitor and VM, as a plain state machine: a command in, replies and events
/// out. It owns no socket and no clock: `now` (wall-clock seconds) comes with each call.
/// Its only side effects are the state files that `xen-save-devices-state`,
/// `xen-load-devices-state` and `migrate` read or write, as QEMU's do.
public struct SimulatedQEMU: Sendable {
    /// QEMU's version as the greeting reports it.
    public static let version: JSONValue = [
        "qemu": ["micro": 22, "minor": 2, "major": 7],
        "package": "colorun simulated QEMU",
    ]

    public static var greeting: QMPGreeting { QMPGreeting(version: version, capabilities: ["oob"]) }

    /// The commands it implements, besides the simulator's own `x-sim-*`.
    public static let commands: Set<String> = [
        "qmp_capabilities", "query-status", "stop", "cont", "xen-save-devices-state",
        "xen-load-devices-state", "migrate", "query-migrate", "query-colo-status",
        "x-colo-lost-heartbeat", "human-monitor-command", "quit", "query-version",
        "migrate-set-parameters", "migrate-set-capabilities",
    ]

    /// The domain's name, written into every state file it saves.
    public let name: String
    public private(set) var runState: RunState
    /// `cont` or `stop` during `inmigrate` only sets this (QEMU's `autostart`).
    public private(set) var autostart = true
    /// Successful `xen-save-devices-state` and `migrate` so far.
    public private(set) var saveCounter = 0
    public private(set) var loadedStates: [LoadedDeviceState] = []
    public private(set) var savedStates: [SavedDeviceState] = []
    public private(set) var migration: SimulatedMigration?
    public var coloMode: COLOMode = .none
    public private(set) var coloLastMode: COLOMode = .none
    public private(set) var coloReason = "none"
    /// Size in bytes of each device-state file it writes.
    public var deviceStateSize = DeviceStateFile.defaultSize

    /// The guest's counter at 0x7e00: it counts microseconds of running time, and a load
    /// sets it to the loaded file's value, so a resumed VM continues from its checkpoint.
    private var counterBase: UInt32 = 0
    private var runningSince: Double?

    public init(name: String, runState: RunState = .running, now: Double = 0) {
        self.name = name
        self.runState = runState
        if runState == .running { runningSince = now }
    }

    public func guestCounter(at now: Double) -> UInt32 {
        guard let since = runningSince else { return counterBase }
        let elapsed = max(0, now - since) * 1_000_000
        return counterBase &+ UInt32(truncatingIfNeeded: Int64(elapsed.rounded(.down)))
    }

    /// Sets the run state from outside (a test, a command line), as a management action.
    public mutating func setRunState(_ state: RunState, now: Double) {
        transition(to: state, now: now)
    }

    private mutating func transition(to state: RunState, now: Double) {
        if runState == .running, state != .running {
            counterBase = guestCounter(at: now)
            runningSince = nil
        } else if runState != .running, state == .running {
            runningSince = now
        }
        runState = state
    }

    // MARK: - Dispatch

    /// Parses and runs one input. `x-sim-*` commands are the caller's: here they are
    /// `CommandNotFound` like any other unknown command.
    public mutating func handle(_ input: QMPInput, session: inout QMPSessionState, now: Double) -> CommandOutcome {
        switch input.parseCommand(session: session) {
        case .failure(let error): return CommandOutcome(reply: error.reply)
        case .success(let command): return execute(command, session: &session, now: now)
        }
    }

    /// Runs a command that passed the envelope checks.
    public mutating func execute(_ command: ParsedCommand, session: inout QMPSessionState, now: Double) -> CommandOutcome {
        let id = command.id
        func ok(_ value: JSONValue = [:]) -> QMPReply { QMPReply(id: id, result: .success(value)) }
        func fail(_ body: QMPErrorBody) -> CommandOutcome {
            CommandOutcome(reply: QMPReply(id: id, result: .failure(QMPErrorBodyError(body))))
        }
        func event(_ name: String, _ data: JSONValue = [:]) -> QMPEvent { QMPEvent(name: name, data: data, timestamp: now) }

        if !session.negotiated {
            guard command.name == "qmp_capabilities" else {
                return fail(.commandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'"))
            }
        } else if command.name == "qmp_capabilities" {
            return fail(.commandNotFound("Capabilities negotiation is already complete, command ignored"))
        }
        guard Self.commands.contains(command.name) else {
            return fail(.commandNotFound("The command \(command.name) has not been found"))
        }
        if command.outOfBand {
            return fail(.generic("The command \(command.name) does not support OOB"))
        }
        if let spec = Self.parameters[command.name], let error = Self.check(command.arguments, against: spec) {
            return fail(error)
        }
        let args = command.arguments

        switch command.name {
        case "qmp_capabilities":
            var oob = false
            if case .array(let enable) = args["enable"] {
                for item in enable {
                    guard case .string(let s) = item else { return fail(.generic("Invalid parameter type for 'null', expected: string")) }
                    guard s == "oob" else { return fail(.generic("Parameter 'null' does not accept value '\(s)'")) }
                    oob = true
                }
            }
            session.negotiated = true
            session.outOfBandEnabled = oob
            return CommandOutcome(reply: ok())

        case "query-status":
            return CommandOutcome(reply: ok(["status": .string(runState.rawValue), "singlestep": false, "running": .bool(runState.isRunning)]))

        case "query-version":
            return CommandOutcome(reply: ok(Self.version))

        case "stop":
            if runState == .inmigrate {
                autostart = false
                return CommandOutcome(reply: ok())
            }
            guard runState == .running else { return CommandOutcome(reply: ok()) }
            transition(to: .paused, now: now)
            return CommandOutcome(eventsBefore: [event("STOP")], reply: ok())

        case "cont":
            switch runState {
            case .internalError, .shutdown, .guestPanicked:
                return fail(.generic("Resetting the Virtual Machine is required"))
            case .inmigrate:
                autostart = true
                return CommandOutcome(reply: ok())
            case .running:
                return CommandOutcome(reply: ok())
            default:
                transition(to: .running, now: now)
                return CommandOutcome(eventsBefore: [event("RESUME")], reply: ok())
            }

        case "xen-save-devices-state":
            let path = args["filename"]!.stringValue!
            let wasRunning = runState == .running
            var before: [QMPEvent] = []
            if wasRunning {
                transition(to: .saveVM, now: now)
                before.append(event("STOP"))
            }
            let file = DeviceStateFile(
                domain: name, save: saveCounter + 1, guestCounter: guestCounter(at: now),
                runState: wasRunning ? .running : runState, savedAt: now, size: deviceStateSize)
            var result: Result<JSONValue, QMPErrorBodyError> = .success([:])
            do throws(SimFileIO.Failure) {
                try SimFileIO.writeFile(file.encode(), to: path)
                saveCounter += 1
                appendSaved(SavedDeviceState(path: path, file: file))
            } catch {
                switch error {
                case .open(let why): result = .failure(QMPErrorBodyError(.generic("Unable to open \(path): \(why)")))
                case .io: result = .failure(QMPErrorBodyError(.generic("An IO error has occurred")))
                }
            }
            if wasRunning {
                transition(to: .running, now: now)
                before.append(event("RESUME"))
            }
            return CommandOutcome(eventsBefore: before, reply: QMPReply(id: id, result: result))

        case "xen-load-devices-state":
            let path = args["filename"]!.stringValue!
            guard runState != .running else { return fail(.generic("Cannot update device state while vm is running")) }
            let bytes: [UInt8]
            do throws(SimFileIO.Failure) {
                bytes = try SimFileIO.readFile(path)
            } catch {
                switch error {
                case .open(let why): return fail(.generic("Unable to open \(path): \(why)"))
                case .io: return fail(.generic("An IO error has occurred"))
                }
            }
            guard let file = DeviceStateFile.decode(bytes), file.kind == .deviceState else {
                return fail(.generic("An IO error has occurred"))
            }
            if loadedStates.count >= 2 * DomainCore.historyLimit { loadedStates.removeFirst(DomainCore.historyLimit) }
            loadedStates.append(LoadedDeviceState(path: path, file: file, loadedAt: now))
            counterBase = file.guestCounter
            return CommandOutcome(reply: ok())

        case "migrate":
            let uri = args["uri"]!.stringValue!
            if runState == .inmigrate { return fail(.generic("Guest is waiting for an incoming migration")) }
            if runState == .postmigrate { return fail(.generic("Can't migrate the vm that was paused due to previous migration")) }
            let schemes = ["exec:", "tcp:", "unix:", "fd:", "rdma:", "vsock:"]
            guard schemes.contains(where: { uri.hasPrefix($0) }) else {
                return fail(.generic("Parameter 'uri' expects a valid migration protocol"))
            }
            guard let target = Self.catTarget(uri) else {
                migration = .failed(errorDesc: "colorun simulated QEMU migrates only to exec:cat > FILE")
                return CommandOutcome(reply: ok())
            }
            let wasRunning = runState == .running
            let file = DeviceStateFile(
                kind: .migration, domain: name, save: saveCounter + 1, guestCounter: guestCounter(at: now),
                runState: runState, savedAt: now, size: 590_986)
            do throws(SimFileIO.Failure) {
                try SimFileIO.writeFile(file.encode(), to: target)
            } catch {
                migration = .failed(errorDesc: "Unable to write to command: Broken pipe")
                return CommandOutcome(reply: ok())
            }
            saveCounter += 1
            appendSaved(SavedDeviceState(path: target, file: file))
            migration = .completed(uri: uri, bytes: file.size, totalTimeMs: 80)
            transition(to: .postmigrate, now: now)
            return CommandOutcome(reply: ok(), eventsAfter: wasRunning ? [event("STOP")] : [])

        case "query-migrate":
            return CommandOutcome(reply: ok(migrationInfo))

        case "migrate-set-parameters", "migrate-set-capabilities":
            return CommandOutcome(reply: ok())

        case "query-colo-status":
            return CommandOutcome(reply: ok([
                "mode": .string(coloMode.rawValue), "last-mode": .string(coloLastMode.rawValue), "reason": .string(coloReason),
            ]))

        case "x-colo-lost-heartbeat":
            guard coloMode != .none else { return fail(.generic("The feature 'colo' is not enabled")) }
            let mode = coloMode
            coloLastMode = mode
            coloMode = .none
            coloReason = "request"
            if runState != .running { transition(to: .running, now: now) }
            return CommandOutcome(reply: ok(), eventsAfter: [event("COLO_EXIT", ["mode": .string(mode.rawValue), "reason": "request"])])

        case "human-monitor-command":
            return CommandOutcome(reply: ok(.string(humanMonitor(args["command-line"]!.stringValue!, now: now))))

        case "quit":
            transition(to: .shutdown, now: now)
            return CommandOutcome(
                eventsBefore: [event("SHUTDOWN", ["guest": false, "reason": "host-qmp-quit"])], reply: ok(), closesConnection: true)

        default:
            return fail(.commandNotFound("The command \(command.name) has not been found"))
        }
    }

    // MARK: - Helpers

    private mutating func appendSaved(_ saved: SavedDeviceState) {
        if savedStates.count >= 2 * DomainCore.historyLimit { savedStates.removeFirst(DomainCore.historyLimit) }
        savedStates.append(saved)
    }

    var migrationInfo: JSONValue {
        switch migration {
        case nil: return [:]
        case .failed(let desc): return ["status": "failed", "error-desc": .string(desc)]
        case .completed(_, let bytes, let total):
            let ram: JSONValue = [
                "total": 67_641_344, "postcopy-requests": 0, "dirty-sync-count": 2, "multifd-bytes": 0,
                "pages-per-second": 0, "downtime-bytes": .int(Int64(bytes)), "page-size": 4096, "remaining": 0,
                "postcopy-bytes": 0, "mbps": 49.3, "transferred": .int(Int64(bytes)), "dirty-sync-missed-zero-copy": 0,
                "precopy-bytes": 0, "duplicate": 16_406, "dirty-pages-rate": 0, "skipped": 0, "normal-bytes": 442_368,
                "normal": 108,
            ]
            return ["status": "completed", "setup-time": 3, "downtime": 2, "total-time": .int(Int64(total)), "ram": ram]
        }
    }

    /// The file of `exec:cat > FILE` (also `cat >FILE`, `cat>FILE`); nil for any other URI.
    static func catTarget(_ uri: String) -> String? {
        guard uri.hasPrefix("exec:") else { return nil }
        var rest = Substring(uri.dropFirst(5)).drop(while: { $0 == " " })
        guard rest.hasPrefix("cat") else { return nil }
        rest = rest.dropFirst(3).drop(while: { $0 == " " })
        guard rest.hasPrefix(">") else { return nil }
        let path = rest.dropFirst().trimmingSpaces
        guard !path.isEmpty, !path.contains(where: { " ;|&<>$`'\"".contains($0) }) else { return nil }
        return String(path)
    }

    func humanMonitor(_ line: String, now: Double) -> String {
        let words = line.split(separator: " ", omittingEmptySubsequences: true)
        guard let first = words.first else { return "" }
        if words.map(String.init) == ["xp", "/1wx", "0x7e00"] {
            let hex = String(guestCounter(at: now), radix: 16)
            return "0000000000007e00: 0x" + String(repeating: "0", count: max(0, 8 - hex.count)) + hex + "\r\n"
        }
        if words.map(String.init) == ["info", "status"] {
            switch runState {
            case .running: return "VM status: running\r\n"
            case .paused: return "VM status: paused\r\n"
            default: return "VM status: paused (\(runState.rawValue))\r\n"
            }
        }
        return "unknown command: '\(first)'\r\n"
    }

    // MARK: - Arguments

    enum ParameterType: Sendable {
        case string, boolean, integer, array, any

        var name: String {
            switch self {
            case .string: "string"
            case .boolean: "boolean"
            case .integer: "integer"
            case .array: "array"
            case .any: "any"
            }
        }

        func accepts(_ value: JSONValue) -> Bool {
            switch (self, value) {
            case (.any, _), (.string, .string), (.boolean, .bool), (.integer, .int), (.array, .array): true
            default: false
            }
        }
    }

    struct Parameter: Sendable {
        var name: String
        var type: ParameterType
        var required: Bool
    }

    /// Each command's arguments in QEMU's declaration order; a command not listed takes any.
    static let parameters: [String: [Parameter]] = [
        "qmp_capabilities": [Parameter(name: "enable", type: .array, required: false)],
        "query-status": [], "stop": [], "cont": [], "query-migrate": [], "query-colo-status": [],
        "x-colo-lost-heartbeat": [], "quit": [], "query-version": [],
        "xen-save-devices-state": [
            Parameter(name: "filename", type: .string, required: true),
            Parameter(name: "live", type: .boolean, required: false),
        ],
        "xen-load-devices-state": [Parameter(name: "filename", type: .string, required: true)],
        "migrate": [
            Parameter(name: "uri", type: .string, required: true),
            Parameter(name: "blk", type: .boolean, required: false),
            Parameter(name: "inc", type: .boolean, required: false),
            Parameter(name: "detach", type: .boolean, required: false),
            Parameter(name: "resume", type: .boolean, required: false),
        ],
        "human-monitor-command": [
            Parameter(name: "command-line", type: .string, required: true),
            Parameter(name: "cpu-index", type: .integer, required: false),
        ],
    ]

    /// QEMU's QAPI input visitor: members in declaration order (missing, then type), then
    /// the first unexpected member.
    static func check(_ arguments: [String: JSONValue], against spec: [Parameter]) -> QMPErrorBody? {
        for parameter in spec {
            guard let value = arguments[parameter.name] else {
                if parameter.required { return .generic("Parameter '\(parameter.name)' is missing") }
                continue
            }
            if !parameter.type.accepts(value) {
                return .generic("Invalid parameter type for '\(parameter.name)', expected: \(parameter.type.name)")
            }
        }
        let known = Set(spec.map(\.name))
        if let unexpected = arguments.keys.sorted().first(where: { !known.contains($0) }) {
            return .generic("Parameter '\(unexpected)' is unexpected")
        }
        return nil
    }
}

extension Substring {
    var trimmingSpaces: Substring {
        var s = self
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return s
    }
}
