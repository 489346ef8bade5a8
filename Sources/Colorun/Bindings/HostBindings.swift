#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import JSON
import Logging
import LuaRuntime
import NIOCore
import QMP
import QMPClient

/// colorun's version, shown by `colorun --version` and `colorun.version` in Lua.
public let colorunVersion = "0.1.0"

extension LuaHostError {
    /// A domain error raised in Lua as `{domain=, command=, class=, desc=}`.
    init(_ error: DomainError) {
        self = .structured(error.fields, message: error.description)
    }

    init(_ error: CheckpointError) {
        self = .structured(error.fields, message: error.description)
    }
}

extension PolicySession {
    /// The module tables, filled in by the prelude.
    static let publicModules = ["domain", "qmp", "colo", "remus", "policy", "cluster"]

    func registerBindings() throws {
        for module in Self.publicModules {
            try runtime.registerModule(module, functions: [:])
        }
        try registerExec()
        try runtime.registerModule(
            "colorun", functions: hostFunctions().merging(clusterFunctions()) { a, _ in a },
            luaSource: colorunPrelude + nativeCOLOPrelude + clusterPrelude)
    }

    private func hostFunctions() -> [String: LuaHostFunction] {
        [
            "version": .sync { call in call.push(colorunVersion) },
            "seconds": .sync { call in call.push(try call.duration(1).seconds) },
            "bytes": .sync { call in
                let bad = { (text: String) in LuaHostError.message("bad argument #1 to 'policy.bytes' (\(text))") }
                if call.type(1) == .number, let n = try? call.integer(1) {
                    guard n >= 0 else { throw bad("bad size \(n): must not be negative") }
                    call.push(n)
                } else {
                    let text = try call.string(1)
                    do throws(LuaHostError) {
                        call.push(Int64(try LuaSize(parsing: text).bytes))
                    } catch {
                        throw bad(error.message)
                    }
                }
            },
            "accepted_fields": .sync { call in
                call.push(json: .object(LuaAPI.acceptedFields.mapValues { .array($0.map { .string($0) }) }))
            },
            // A monotonic clock in seconds (colo.native measures pauses and failovers with it).
            "clock": .sync { call in call.push(Double(NIODeadline.now().uptimeNanoseconds) / 1e9) },

            // Domains
            "domain_get": .sync { [unowned self] call in
                call.push(json: info(try domain(named: try call.string(1))))
            },
            "domain_open": .sync { [unowned self] call in
                let name = try call.string(1)
                let endpoint: QMPEndpoint
                do {
                    endpoint = try QMPEndpoint(parsing: try call.string(2))
                } catch {
                    throw LuaHostError.message("domain.open: \(error)")
                }
                var domainOptions = options.domainOptions
                if !call.isNil(3) { domainOptions.commandTimeout = try call.duration(3).timeAmount }
                domainOptions.shared = call.boolean(4)
                do {
                    call.push(json: info(try addDomain(name: name, endpoint: endpoint, options: domainOptions)))
                } catch {
                    throw LuaHostError.message("domain.open: \(error)")
                }
            },
            "xen_monitor": .sync { call in
                // domain.xen: colorun's own monitor when the domain has one, else libxl's, shared.
                let domid = try call.integer(1)
                let name = try call.string(2)
                let runDirectory = try call.string(3)
                let dedicated = "\(runDirectory)/qmp-colorun-\(name)"
                var info = stat()
                if stat(dedicated, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK {
                    call.push(json: ["qmp": .string("unix:" + dedicated), "shared": false])
                } else {
                    call.push(json: ["qmp": .string("unix:\(runDirectory)/qmp-libxl-\(domid)"), "shared": true])
                }
            },
            "domain_list": .sync { [unowned self] call in
                call.push(json: .array(domainOrder.compactMap { domains[$0].map(info) }))
            },
            "domain_stats": .sync { [unowned self] call in
                let domain = try domain(named: try call.string(1))
                let stats = domain.stats
                call.push(json: [
                    "commands": .int(Int64(stats.commands)), "failures": .int(Int64(stats.failures)),
                    "connects": .int(Int64(stats.connects)), "disconnects": .int(Int64(stats.disconnects)),
                    "mean_latency_ms": .double(stats.commands > 0 ? stats.totalLatencySeconds * 1000 / Double(stats.commands) : 0),
                ])
            },

            // QMP commands
            "execute": .async { [unowned self] call, completion in
                let domain = try domain(named: try call.string(1))
                let command = try call.string(2)
                var arguments: [String: JSONValue]?
                if !call.isNil(3) {
                    guard case .object(let members) = try call.json(3) else {
                        throw call.argumentError(3, "table of named arguments expected")
                    }
                    arguments = members
                }
                let timeout = call.isNil(4) ? nil : try call.duration(4).timeAmount
                domain.send(command, arguments, timeout: timeout, completing(completion, answeredBy: domain) { [.json($0)] })
            },
            // Several commands sent at once on one monitor (QEMU runs them in order): one round
            // trip instead of one each. Never raises for a failed command: returns one entry per
            // command, {ok=, value=} or {ok=false, error={domain=, command=, class=, desc=}},
            // with ms, the time from the send to that reply.
            "execute_batch": .async { [unowned self] call, completion in
                let domain = try domain(named: try call.string(1))
                guard case .array(let list) = try call.json(2) else { throw call.argumentError(2, "list of {command, args} expected") }
                var commands: [(String, [String: JSONValue]?)] = []
                for item in list {
                    guard case .array(let pair) = item, let command = pair.first?.stringValue else {
                        throw call.argumentError(2, "each entry must be {command [, args]}")
                    }
                    var arguments: [String: JSONValue]?
                    if pair.count > 1, case .object(let members) = pair[1] { arguments = members }
                    commands.append((command, arguments))
                }
                guard !commands.isEmpty else {
                    completion.succeed([.json(.array([]))])
                    return
                }
                let started = NIODeadline.now()
                var entries = [JSONValue](repeating: .null, count: commands.count)
                var pending = commands.count
                for (i, (command, arguments)) in commands.enumerated() {
                    domain.send(command, arguments) { result in
                        let ms = JSONValue.double(Double((NIODeadline.now() - started).nanoseconds) / 1e6)
                        switch result {
                        case .success(let value): entries[i] = ["ok": true, "value": value, "ms": ms]
                        case .failure(let error): entries[i] = ["ok": false, "error": .object(error.fields), "ms": ms]
                        }
                        pending -= 1
                        if pending == 0 { completion.succeed([.json(.array(entries))]) }
                    }
                }
            },
            "stop": .async { [unowned self] call, completion in
                let domain = try domain(named: try call.string(1))
                domain.sendStop(completing(completion, answeredBy: domain))
            },
            "resume": .async { [unowned self] call, completion in
                let domain = try domain(named: try call.string(1))
                domain.sendResume(completing(completion, answeredBy: domain))
            },
            "mark_resumed": .sync { [unowned self] call in
                try domain(named: try call.string(1)).markResumed()
            },
            "alive": .async { [unowned self] call, completion in
                let domain = try domain(named: try call.string(1))
                let timeout = call.isNil(2) ? TimeAmount.seconds(1) : try call.duration(2).timeAmount
                do {
                    let d = domain
                    d.send("query-status", nil, timeout: timeout) { result in
                        if case .success = result { completion.succeed([.bool(true)]) } else { completion.succeed([.bool(false)]) }
                    }
                }
            },
            "on_event": .sync { [unowned self] call in
                let domain = try domain(named: try call.string(1))
                let event = try call.string(2)
                let function = try call.function(3)
                call.push(Int64(subscribe(domain, event: event, function: function)))
            },

            // Checkpoints
            "colo_checkpoint": .async { [unowned self] call, completion in try coloCheckpoint(call, completion) },
            "remus_checkpoint": .async { [unowned self] call, completion in try remusCheckpoint(call, completion) },
            "remus_restore": .async { [unowned self] call, completion in
                try restoreStandby(spec: try call.json(1), generation: call.isNil(2) ? nil : Int(try call.integer(2)), completion: completion)
            },
            "generations": .sync { [unowned self] call in
                let series = try call.string(1)
                let list = stores[series].map { remusGenerations($0) } ?? []
                call.push(json: .array(list.map { ["generation": .int(Int64($0.number)), "path": .string($0.path), "bytes": .int(Int64($0.bytes))] }))
            },
            "set_declarative": .sync { [unowned self] call in declarative = try call.function(1) },
            "colo_policy": .sync { [unowned self] call in
                try DeclarativePolicy.validate(call)
                if (try call.field(1, "mode"))?.stringValue ?? "xen" == "xen",
                   let name = try call.field(1, "secondary")?["name"]?.stringValue, let secondary = domains[name] {
                    try refuseXenCycle(on: secondary, in: "colo.policy")
                }
                guard let declarative else { throw LuaHostError.message("colo.policy is not available") }
                let spec = call.ref(1)
                try runtime.spawn(declarative, arguments: [.ref(spec)], name: "colo.policy \(call.callerPosition)")
                call.push(.ref(spec))
            },
            "count_failover": .sync { [unowned self] call in
                countFailover(of: call.isNil(1) ? [] : [try call.string(1)])
            },
            "failover_begin": .sync { [unowned self] call in
                // Counted now (a handler cut short by policy.stop() was a failover too);
                // what the handler does for the same pair is not counted again.
                countFailover()
                nextFailoverWindow += 1
                let window = nextFailoverWindow
                windowCounted[window] = true
                for name in [try call.string(1), try call.string(2)] { failoverWindows[name] = window }
                call.push(Int64(window))
            },
            "failover_end": .sync { [unowned self] call in
                let window = Int(try call.integer(1))
                windowCounted[window] = nil
                failoverWindows = failoverWindows.filter { $0.value != window }
            },

            // Timers and the run
            "every": .sync { [unowned self] call in
                let interval = try call.duration(1).timeAmount
                guard interval.nanoseconds > 0 else { throw call.argumentError(1, "interval must be greater than zero") }
                call.push(Int64(try addTimer(delay: interval, interval: interval, function: try call.function(2), name: "every \(call.callerPosition)")))
            },
            "after": .sync { [unowned self] call in
                let delay = try call.duration(1).timeAmount
                call.push(Int64(try addTimer(delay: delay, interval: nil, function: try call.function(2), name: "after \(call.callerPosition)")))
            },
            "timer_stats": .sync { [unowned self] call in
                let id = Int(try call.integer(1))
                let timer = handles[id] as? PolicyTimer
                call.push(json: ["runs": .int(Int64(timer?.runs ?? 0)), "skipped": .int(Int64(timer?.skipped ?? 0)), "active": .bool(timer != nil)])
            },
            "cancel": .sync { [unowned self] call in
                cancelHandle(Int(try call.integer(1)))
            },
            "on_lost": .sync { [unowned self] call in
                let domain = try domain(named: try call.string(1))
                let function = try call.function(2)
                let heartbeat = call.isNil(3) ? TimeAmount.seconds(1) : try call.duration(3).timeAmount
                let timeout = call.isNil(4) ? TimeAmount.seconds(1) : try call.duration(4).timeAmount
                call.push(Int64(watchLost(domain, function: function, heartbeat: heartbeat, timeout: timeout)))
            },
            "stop_run": .async { [unowned self] _, _ in
                // The calling task is cancelled with every other one; it never resumes.
                eventLoop.execute { [self] in stop() }
            },
        ]
    }

    /// Counts a failover, once per failover: within a declarative pair's failover window
    /// (`failover_begin`, which counts it, to `failover_end`, keyed by the pair's domain
    /// names) a standby restored or a native failover of one of its domains is the same
    /// failover as the pair's.
    func countFailover(of names: [String] = []) {
        if let window = names.lazy.compactMap({ self.failoverWindows[$0] }).first {
            guard windowCounted[window] == false else { return }
            windowCounted[window] = true
        }
        report.failovers += 1
        options.domainOptions.metrics.failover()
    }

    func info(_ domain: Domain) -> JSONValue {
        ["name": .string(domain.name), "endpoint": .string(domain.endpoint.description), "shared": .bool(domain.isShared)]
    }

    /// The completion handler of a domain operation that answers a Lua call: the values
    /// `values` makes of the result, or the domain error raised in Lua as a structured error.
    ///
    /// With `answeredBy`, the operation is one QMP command on that domain, whose completion is
    /// the last thing its reply's handler does: QEMU's answer on a monitor that stays open
    /// resumes the task right there (`completeNow`), so the task's next command goes out in
    /// this turn of the loop. A lost connection's failure waits for the loop's next turn, when
    /// the domain has taken in the loss.
    private func completing<T>(_ completion: LuaCompletion, answeredBy domain: Domain? = nil,
                               _ values: @escaping (T) -> [LuaValue] = { _ in [] }) -> (Result<T, DomainError>) -> Void {
        { result in
            let lua = result.map(values).mapError { LuaHostError($0) }
            if let domain, domain.isConnected {
                completion.completeNow(lua)
            } else {
                completion.complete(lua)
            }
        }
    }
}
