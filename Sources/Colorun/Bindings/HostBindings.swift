import ColorunSystem
import JSON
import Logging
#if canImport(Glibc)
import Glibc
#endif
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
    /// The public module tables, filled in by the prelude.
    static let publicModules = ["domain", "qmp", "colo", "remus", "policy"]

    func registerBindings() throws {
        for module in Self.publicModules {
            try runtime.registerModule(module, functions: [:])
        }
        try registerExec()
        try runtime.registerModule("colorun", functions: hostFunctions(), luaSource: colorunPrelude)
    }

    private func hostFunctions() -> [String: LuaHostFunction] {
        [
            "version": .sync { call in call.push(colorunVersion) },
            "seconds": .sync { call in call.push(try call.duration(1).seconds) },

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
                do {
                    call.push(json: info(try addDomain(name: name, endpoint: endpoint, options: domainOptions)))
                } catch {
                    throw LuaHostError.message("domain.open: \(error)")
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
                do {
                    let d = domain
                    d.send(command, arguments, timeout: timeout) { result in
                        switch result {
                        case .success(let value): completion.succeed([.json(value)])
                        case .failure(let error): completion.fail(LuaHostError(error))
                        }
                    }
                }
            },
            "stop": .async { [unowned self] call, completion in
                let domain = try domain(named: try call.string(1))
                do {
                    let d = domain
                    d.sendStop { result in
                        switch result {
                        case .success: completion.succeed()
                        case .failure(let error): completion.fail(LuaHostError(error))
                        }
                    }
                }
            },
            "resume": .async { [unowned self] call, completion in
                let domain = try domain(named: try call.string(1))
                do {
                    let d = domain
                    d.sendResume { result in
                        switch result {
                        case .success: completion.succeed()
                        case .failure(let error): completion.fail(LuaHostError(error))
                        }
                    }
                }
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
            "colo_checkpoint": .async { [unowned self] call, completion in
                let primary = try domain(named: try call.string(1))
                let secondary = try domain(named: try call.string(2))
                guard primary !== secondary else { throw LuaHostError.message("colo.checkpoint: primary and secondary are the same domain '\(primary.name)'") }
                let keep = try keepOption(call, 3)
                let series = "\(primary.name)+\(secondary.name)"
                let store = try store(series: series, fileExtension: "devstate", keep: keep)
                let io = blockingIO
                try startCheckpoint(series: series, domains: [primary, secondary], completion: completion) {
                    await CheckpointEngine.capture { () async throws(CheckpointError) in
                        try await CheckpointEngine.xenCheckpoint(primary: primary, secondary: secondary, store: store, io: io)
                    }
                }
            },
            "remus_checkpoint": .async { [unowned self] call, completion in
                let domain = try domain(named: try call.string(1))
                let keep = try keepOption(call, 2)
                let store = try store(series: domain.name, fileExtension: "vmstate", keep: keep)
                let tune = !tunedForRemus.contains(domain.name)
                tunedForRemus.insert(domain.name)
                let io = blockingIO
                try startCheckpoint(series: domain.name, domains: [domain], completion: completion) {
                    if tune {
                        // QEMU's default migration bandwidth (128 MiB/s) stretches every pause.
                        _ = try? await domain.execute("migrate-set-parameters", ["max-bandwidth": .int(107_374_182_400)])
                    }
                    return await CheckpointEngine.capture { () async throws(CheckpointError) in
                        try await CheckpointEngine.remusCheckpoint(domain, store: store, io: io)
                    }
                }
            },
            "remus_restore": .async { [unowned self] call, completion in
                try restoreStandby(spec: try call.json(1), generation: call.isNil(2) ? nil : Int(try call.integer(2)), completion: completion)
            },
            "generations": .sync { [unowned self] call in
                let series = try call.string(1)
                let list = (try? stores[series]?.generations()) ?? []
                call.push(json: .array(list.map { ["generation": .int(Int64($0.number)), "path": .string($0.path), "bytes": .int(Int64($0.bytes))] }))
            },
            "set_declarative": .sync { [unowned self] call in declarative = try call.function(1) },
            "colo_policy": .sync { [unowned self] call in
                try DeclarativePolicy.validate(call)
                guard let declarative else { throw LuaHostError.message("colo.policy is not available") }
                let spec = call.ref(1)
                try runtime.spawn(declarative, arguments: [.ref(spec)], name: "colo.policy \(call.callerPosition)")
                call.push(.ref(spec))
            },
            "count_failover": .sync { [unowned self] _ in countFailover() },

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

    func countFailover() {
        report.failovers += 1
        options.domainOptions.metrics.failover()
    }

    func info(_ domain: Domain) -> JSONValue {
        ["name": .string(domain.name), "endpoint": .string(domain.endpoint.description)]
    }

    private func keepOption(_ call: LuaCall, _ index: Int) throws -> Int {
        guard !call.isNil(index) else { return options.keepGenerations }
        let keep = try call.integer(index)
        guard keep >= 1 else { throw LuaHostError.message("keep must be at least 1 (got \(keep))") }
        return Int(keep)
    }

    func store(series: String, fileExtension: String, keep: Int) throws -> GenerationStore {
        if let store = stores[series] {
            store.keep = keep
            return store
        }
        let store: GenerationStore
        do {
            store = try GenerationStore(directory: options.stateDirectory + "/checkpoints/" + series, fileExtension: fileExtension, keep: keep)
        } catch {
            throw LuaHostError.structured(
                ["class": "StateDirError", "desc": .string(error.description), "step": "open"], message: "state directory: \(error)")
        }
        if !store.removedPartials.isEmpty {
            logger.warning("removed \(store.removedPartials.count) partial checkpoint file(s) left by an earlier run", metadata: ["series": .string(series)])
        }
        stores[series] = store
        return store
    }

    /// `remus.restore(spec, generation)`: starts a standby QEMU reading a Remus generation
    /// of `spec.from`, waits for the load, resumes it and returns it as a new domain.
    private func restoreStandby(spec: JSONValue, generation wanted: Int?, completion: LuaCompletion) throws {
        guard !stopping else { throw LuaHostError.message("the run is stopping: no standby is restored") }
        guard let name = spec["name"]?.stringValue, DomainSpec.isValidName(name) else {
            throw LuaHostError.message("remus.restore: 'name' must be a domain name (letters, digits, '-', '_', '.')")
        }
        guard domains[name] == nil else { throw LuaHostError.message("remus.restore: a domain named '\(name)' already exists") }
        guard let series = spec["from"]?.stringValue else { throw LuaHostError.message("remus.restore: 'from' is required") }
        let store = try store(series: series, fileExtension: "vmstate", keep: stores[series]?.keep ?? options.keepGenerations)
        let generations = (try? store.generations()) ?? []
        guard let generation = wanted.map({ n in generations.first { $0.number == n } }) ?? generations.last else {
            let have = generations.map { String($0.number) }.joined(separator: ", ")
            throw LuaHostError.structured(
                ["class": "NoCheckpoint", "desc": .string("no generation \(wanted.map(String.init) ?? "at all") of \(series) (have: \(have.isEmpty ? "none" : have))"), "step": "restore"],
                message: "remus.restore: no good checkpoint of \(series)\(wanted.map { " numbered \($0)" } ?? "") (have: \(have.isEmpty ? "none" : have))")
        }
        do {
            _ = try GenerationStore.validate(path: generation.path, magic: CheckpointEngine.stateMagic)
        } catch {
            throw LuaHostError.structured(["class": "TornCheckpoint", "desc": .string(error.description), "step": "restore"], message: "remus.restore: \(error)")
        }
        guard !generation.path.contains("'") else { throw LuaHostError.message("remus.restore: the state path contains a quote") }
        let launcher: any StandbyLauncher = spec["lab"]?.boolValue == true ? (labLauncher ?? detachedLauncher) : detachedLauncher
        let launched = try launcher.launch(name: name, spec: spec, incoming: "exec:cat '\(generation.path)'", stateDirectory: options.stateDirectory)
        let domain: Domain
        do {
            domain = try addDomain(name: name, endpoint: launched.endpoint, options: options.domainOptions)
        } catch {
            kill(launched.pid, SIGKILL)
            throw LuaHostError.message("remus.restore: \(error)")
        }
        logger.warning("restoring a standby from a checkpoint", metadata: [
            "domain": .string(name), "from": .string(series), "generation": .stringConvertible(generation.number), "pid": .stringConvertible(launched.pid),
        ])
        let resume = spec["paused"]?.boolValue != true
        track({ await CheckpointEngine.capture { () async throws(DomainError) in try await CheckpointEngine.bringUpStandby(domain, resume: resume) } }) { [self] result in
            switch result {
            case .success(let milliseconds):
                if !resume { try? domain.adoptPaused() }
                report.failovers += 1
                logger.warning("standby running", metadata: ["domain": .string(name), "restore_ms": .stringConvertible(milliseconds)])
                completion.succeed([.json([
                    "name": .string(name), "endpoint": .string(launched.endpoint.description),
                    "generation": .int(Int64(generation.number)), "restore_ms": .double(milliseconds), "pid": .int(Int64(launched.pid)),
                ])])
            case .failure(let error):
                kill(launched.pid, SIGKILL)
                let stderr = String(decoding: (try? readFile(launched.stderrPath)) ?? [], as: UTF8.self)
                let detail = stderr.split(separator: "\n").suffix(3).joined(separator: " | ")
                var fields = error.fields
                fields["step"] = "restore"
                if !detail.isEmpty { fields["qemu_stderr"] = .string(detail) }
                completion.fail(LuaHostError.structured(fields, message: "\(error)\(detail.isEmpty ? "" : " (QEMU said: \(detail))")"))
            }
        }
    }

    private func startCheckpoint(series: String, domains involved: [Domain], completion: LuaCompletion,
                                 _ operation: @escaping @Sendable () async -> Result<CheckpointResult, CheckpointError>) throws {
        guard !stopping else { throw LuaHostError.message("the run is stopping: no new checkpoint is started") }
        if let busy = involved.first(where: { busyDomains.contains($0.name) }) {
            throw LuaHostError.structured(
                ["class": "Busy", "domain": .string(busy.name), "desc": "a checkpoint of this domain is in progress", "step": "start"],
                message: "\(busy.name): a checkpoint of this domain is in progress; checkpoints of one domain never overlap")
        }
        for domain in involved { busyDomains.insert(domain.name) }
        let started = NIODeadline.now()
        track(operation) { [self] result in
            for domain in involved { busyDomains.remove(domain.name) }
            recordMetrics(series: series, started: started, result)
            switch result {
            case .success(let checkpoint):
                report.checkpoints += 1
                report.pauseMilliseconds.append(checkpoint.pauseMilliseconds)
                report.lastGood[series] = checkpoint.generation
                completion.succeed([.json(.object(checkpoint.fields))])
            case .failure(let error):
                report.failedCheckpoints += 1
                logger.error("checkpoint failed", metadata: ["series": .string(series), "error": .string(error.description)])
                for failure in error.unresumed {
                    if let domain = domains[failure.domain] { keepResuming(domain) }
                }
                completion.fail(LuaHostError(error))
            }
        }
    }

    /// Feeds the metrics from a finished checkpoint (called on the loop by the bindings).
    func recordMetrics(series: String, started: NIODeadline, _ result: Result<CheckpointResult, CheckpointError>) {
        let metrics = options.domainOptions.metrics
        switch result {
        case .success(let checkpoint):
            let seconds = Double((NIODeadline.now() - started).nanoseconds) / 1e9
            metrics.checkpointSucceeded(series: series, durationSeconds: seconds, pauseMilliseconds: checkpoint.pauseMilliseconds)
        case .failure(let error):
            metrics.checkpointFailed(series: series, step: error.step)
        }
    }
}
