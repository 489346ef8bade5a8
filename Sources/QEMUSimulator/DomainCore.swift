import JSON
import QMP

/// One command as the simulator received it.
public struct CommandLogEntry: Sendable, Hashable {
    /// Wall-clock seconds when it arrived (was read from the socket; it may have been served
    /// later, behind a delayed command).
    public var time: Double
    /// Which connection sent it (1, 2, ... per domain).
    public var connection: Int
    public var name: String
    public var arguments: [String: JSONValue]
    public var id: JSONValue?
    /// The fault applied to it, if any.
    public var fault: SimulatedFault.Action?
}

/// What a connection must do, in order, after an input or a connection event.
public enum DomainStep: Sendable, Hashable {
    case send(QMPServerOutput)
    /// Wait this long before the next step (later input queues behind).
    case wait(Duration)
    /// Answer nothing more on this connection.
    case hang
    /// Close this connection.
    case close
    /// The process dies: every connection drops, the socket refuses new ones.
    case die
    /// The process exits cleanly (`quit`): like `die`, and the socket file goes.
    case exit
}

/// A simulated domain without I/O: the QEMU state machine, the faults in force, the
/// command log and which connection holds the monitor. Inputs in, steps out.
public struct DomainCore: Sendable {
    public var machine: SimulatedQEMU
    public var faults: FaultSchedule
    /// The newest commands (at least `historyLimit` of them are kept).
    public private(set) var log: [CommandLogEntry] = []
    /// How much history (commands, loads, saves) a long-running domain keeps.
    public static let historyLimit = 10_000
    public private(set) var isFrozen = false
    public private(set) var isAlive = true
    /// Wall-clock seconds when the domain started; `at=` and `@` faults count from here.
    public let startedAt: Double

    private var sessions: [Int: QMPSessionState] = [:]
    /// The connection that holds the monitor (QEMU serves one client per `-qmp` socket).
    public private(set) var active: Int?
    private var activeGreeted = false
    public private(set) var waiting: [Int] = []

    public init(machine: SimulatedQEMU, faults: FaultSchedule = FaultSchedule(), startedAt: Double) {
        self.machine = machine
        self.faults = faults
        self.startedAt = startedAt
    }

    // MARK: - Connections

    /// A client connected. It gets the greeting now if it is the only one and the domain
    /// is not frozen, else later (see `disconnect`, `unfreeze`).
    public mutating func connect(_ connection: Int) -> [DomainStep] {
        guard isAlive else { return [.close] }
        sessions[connection] = QMPSessionState()
        guard active == nil else {
            waiting.append(connection)
            return []
        }
        active = connection
        return greetActiveIfPossible() == nil ? [] : [.send(.json(SimulatedQEMU.greeting.json))]
    }

    /// A client went away; returns the connection that now gets the greeting, if any.
    public mutating func disconnect(_ connection: Int) -> Int? {
        sessions[connection] = nil
        waiting.removeAll { $0 == connection }
        guard active == connection else { return nil }
        active = nil
        activeGreeted = false
        guard isAlive, !waiting.isEmpty else { return nil }
        active = waiting.removeFirst()
        return greetActiveIfPossible()
    }

    private mutating func greetActiveIfPossible() -> Int? {
        guard let active, !activeGreeted, !isFrozen, isAlive else { return nil }
        activeGreeted = true
        return active
    }

    /// True when `connection` holds the monitor and has had its greeting.
    public func isServing(_ connection: Int) -> Bool { active == connection && activeGreeted && !isFrozen && isAlive }

    public mutating func freeze() { isFrozen = true }

    /// Ends a freeze; returns the connection that still needs its greeting, if any.
    public mutating func unfreeze() -> Int? {
        isFrozen = false
        return greetActiveIfPossible()
    }

    public mutating func markDead() {
        isAlive = false
        active = nil
        waiting = []
    }

    // MARK: - Input

    /// One input from `connection`, which must hold the monitor. `now` is wall-clock seconds;
    /// `arrived`, when the input was read from the socket (it may have waited behind a
    /// delayed command since): the command log's time, `now` if not given.
    public mutating func receive(_ input: QMPInput, from connection: Int, now: Double, arrived: Double? = nil) -> [DomainStep] {
        guard isAlive else { return [] }
        guard !isFrozen else { return [] }
        var session = sessions[connection] ?? QMPSessionState()
        defer { sessions[connection] = session }

        let command: ParsedCommand
        switch input.parseCommand(session: session) {
        case .failure(let error): return [.send(.json(error.reply.json))]
        case .success(let c): command = c
        }
        let elapsed = Duration.nanoseconds(Int64(max(0, now - startedAt) * 1e9))
        let fault = faults.action(for: command.name, elapsed: elapsed)
        if log.count >= 2 * Self.historyLimit { log.removeFirst(log.count - Self.historyLimit) }
        log.append(CommandLogEntry(time: arrived ?? now, connection: connection, name: command.name, arguments: command.arguments, id: command.id, fault: fault))

        func errorReply(_ cls: String, _ desc: String) -> JSONValue {
            QMPReply(id: command.id, result: .failure(QMPErrorBodyError(QMPErrorBody(errorClass: cls, desc: desc)))).json
        }

        // Faults that replace the command.
        switch fault {
        case .hang?: return [.hang]
        case .drop?: return [.close]
        case .error(let cls, let desc)?: return [.send(.json(errorReply(cls, desc)))]
        case .freeze?:
            isFrozen = true
            return []
        case .crash(let bytes)?:
            writePartialFile(for: command, bytes: bytes ?? 0, now: now)
            markDead()
            return [.die]
        default: break
        }

        var outcome: CommandOutcome
        if command.name.hasPrefix("x-sim-") {
            outcome = CommandOutcome(reply: simulatorCommand(command))
        } else {
            outcome = machine.execute(command, session: &session, now: now)
        }

        var steps: [DomainStep] = []
        switch fault {
        case .delay(let d)?: steps.append(.wait(d))
        case .junk(let text)?: steps.append(.send(.raw(Array(text.utf8) + [0x0D, 0x0A])))
        case .oversized(let n)?: steps.append(.send(.raw(Self.oversizedLine(bytes: n, now: now))))
        case .flood(let n)?:
            steps.append(contentsOf: (0..<n).map { _ in .send(.json(Self.floodEvent(now: now))) })
        case .wrongID?: outcome.reply.id = .string("x-sim-unknown-id-\(log.count)")
        default: break
        }
        steps.append(contentsOf: outcome.messages.map { .send(.json($0)) })
        if outcome.closesConnection {
            markDead()
            steps.append(.exit)
        }
        return steps
    }

    /// The event a `flood` fault repeats.
    public static func floodEvent(now: Double) -> JSONValue {
        QMPEvent(name: "RTC_CHANGE", data: ["offset": 0, "qom-path": "/machine/unattached/device[3]"], timestamp: now).json
    }

    /// One line of exactly `bytes` bytes (CRLF included, at least a minimal event).
    public static func oversizedLine(bytes: Int, now: Double) -> [UInt8] {
        let prefix = Array(#"{"event":"X-SIM-OVERSIZED","data":{"pad":""#.utf8)
        let suffix = Array(#""}}"#.utf8) + [0x0D, 0x0A]
        let pad = max(0, bytes - prefix.count - suffix.count)
        return prefix + [UInt8](repeating: UInt8(ascii: "x"), count: pad) + suffix
    }

    /// A crash mid-save: the first `bytes` bytes of the file the command would have written.
    private func writePartialFile(for command: ParsedCommand, bytes: Int, now: Double) {
        let path: String?
        var kind = DeviceStateFile.Kind.deviceState
        var size = machine.deviceStateSize
        switch command.name {
        case "xen-save-devices-state": path = command.arguments["filename"]?.stringValue
        case "migrate":
            path = command.arguments["uri"]?.stringValue.flatMap(SimulatedQEMU.catTarget)
            kind = .migration
            size = 590_986
        default: path = nil
        }
        guard let path else { return }
        let file = DeviceStateFile(
            kind: kind, domain: machine.name, save: machine.saveCounter + 1, guestCounter: machine.guestCounter(at: now),
            runState: machine.runState, savedAt: now, size: size)
        try? SimFileIO.writeFile(file.encode().prefix(bytes), to: path)
    }

    // MARK: - x-sim-* commands

    private mutating func simulatorCommand(_ command: ParsedCommand) -> QMPReply {
        func ok(_ v: JSONValue) -> QMPReply { QMPReply(id: command.id, result: .success(v)) }
        func fail(_ desc: String) -> QMPReply { QMPReply(id: command.id, result: .failure(QMPErrorBodyError(.generic(desc)))) }
        switch command.name {
        case "x-sim-fault":
            if command.arguments["clear"] == .bool(true) { faults = FaultSchedule() }
            if let spec = command.arguments["fault"] {
                guard let text = spec.stringValue else { return fail("Invalid parameter type for 'fault', expected: string") }
                do throws(SimulatedFaultSyntaxError) {
                    faults.add(try SimulatedFault(parsing: text))
                } catch {
                    return fail(error.description)
                }
            }
            return ok(["faults": .array(faults.faults.map { .string($0.description) })])
        case "x-sim-status":
            return ok(status)
        default:
            return QMPReply(id: command.id, result: .failure(QMPErrorBodyError(.commandNotFound("The command \(command.name) has not been found"))))
        }
    }

    /// What `x-sim-status` answers: the domain's state for scripts.
    public var status: JSONValue {
        func describe(_ path: String, _ file: DeviceStateFile) -> JSONValue {
            ["path": .string(path), "domain": .string(file.domain), "save": .int(Int64(file.save)), "guest-counter": .int(Int64(file.guestCounter))]
        }
        return [
            "name": .string(machine.name),
            "status": .string(machine.runState.rawValue),
            "save-counter": .int(Int64(machine.saveCounter)),
            "loaded": .array(machine.loadedStates.map { describe($0.path, $0.file) }),
            "saved": .array(machine.savedStates.map { describe($0.path, $0.file) }),
            "commands": .int(Int64(log.count)),
            "faults": .array(faults.faults.map { .string($0.description) }),
        ]
    }
}
