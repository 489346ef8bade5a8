import ColorunSystem
import JSON
import Logging
#if canImport(Glibc)
import Glibc
#endif
import LuaRuntime
import NIOCore
import QEMULab

/// The checkpoint and restore bindings of a session: `colo.checkpoint`, `remus.checkpoint`
/// and `remus.restore` start the engine's operations, keep the session's books (busy
/// domains, generation stores, the report, metrics) and answer the Lua call.
extension PolicySession {
    /// `colo.checkpoint(p, s, {keep=, pipeline=})`: the Xen-flavour cycle of a pair.
    func coloCheckpoint(_ call: LuaCall, _ completion: LuaCompletion) throws {
        let primary = try domain(named: try call.string(1))
        let secondary = try domain(named: try call.string(2))
        guard primary !== secondary else { throw LuaHostError.message("colo.checkpoint: primary and secondary are the same domain '\(primary.name)'") }
        try refuseXenCycle(on: secondary, in: "colo.checkpoint")
        let keep = try keepOption(call, 3)
        let pipeline = call.boolean(4)
        let series = "\(primary.name)+\(secondary.name)"
        try requireHolding("colo.checkpoint")
        // A pipelined generation whose commit failed after its call returned: the pair's next
        // call raises it, before anything is stopped.
        if var failed = pipelinedCommitFailures.removeValue(forKey: series) {
            failed.cause = "an earlier pipelined generation was not committed: " + failed.cause
            failed.lastGood = stores[series]?.lastGood ?? failed.lastGood
            throw LuaHostError(failed)
        }
        let start = { [self] (store: GenerationStore) throws in
            guard pipeline else {
                return try startCheckpoint(series: series, domains: [primary, secondary], completion: completion) { [committer] done in
                    CheckpointEngine.xenCheckpoint(primary: primary, secondary: secondary, store: store, committer: committer, done)
                }
            }
            try startPipelinedCheckpoint(series: series, primary: primary, secondary: secondary, store: store, completion: completion)
        }
        if let store = try openedStore(series: series, fileExtension: "devstate", keep: keep) {
            return try start(store)
        }
        // The pair's first checkpoint: its store opens on the I/O pool (directories made,
        // listed, the index read), not on the loop that serves every other pair.
        openStore(series: series, keep: keep) { [self] opened in
            do {
                let store = try opened.get()
                store.keep = keep
                try requireHolding("colo.checkpoint")
                try start(store)
            } catch {
                completion.fail(error)
            }
        }
    }

    /// Opens the device-state store of `series` on the I/O pool; `done` runs on the loop (at
    /// once if it is open already). Two calls for one series share the opening.
    func openStore(series: String, keep: Int, _ done: @escaping (Result<GenerationStore, LuaHostError>) -> Void) {
        if let store = stores[series] { return done(.success(store)) }
        if storesOpening[series] != nil {
            storesOpening[series]!.append(done)
            return
        }
        storesOpening[series] = [done]
        let open: @Sendable () throws(GenerationStoreError) -> GenerationStore
        do {
            open = try storeOpener(series: series, fileExtension: "devstate", keep: keep)
        } catch {
            return finishOpening(series: series, .failure(Self.storeOpenError(error)))
        }
        blockingIO.runIfActive(eventLoop: eventLoop) {
            UncheckedSendable(try open())
        }.whenComplete { [self] result in
            switch result {
            case .success(let store): finishOpening(series: series, .success(store.value))
            case .failure(let error as GenerationStoreError): finishOpening(series: series, .failure(Self.storeOpenError(error)))
            case .failure(let error): finishOpening(series: series, .failure(LuaHostError.message("state directory: \(error)")))
            }
        }
    }

    private func finishOpening(series: String, _ result: Result<GenerationStore, LuaHostError>) {
        var result = result
        if case .success(let store) = result {
            if let open = stores[series] {
                result = .success(open)
            } else {
                adopt(store, series: series)
            }
        }
        for waiter in storesOpening.removeValue(forKey: series) ?? [] { waiter(result) }
    }

    private static func storeOpenError(_ error: GenerationStoreError) -> LuaHostError {
        LuaHostError.structured(["class": "StateDirError", "desc": .string(error.description), "step": "open"], message: "state directory: \(error)")
    }

    private func adopt(_ store: GenerationStore, series: String) {
        if !store.removedPartials.isEmpty {
            logger.warning("removed \(store.removedPartials.count) partial checkpoint file(s) left by an earlier run", metadata: ["series": .string(series)])
        }
        stores[series] = store
    }

    /// How many generations of one pair may commit after their calls returned: two, so that a
    /// pair's next tick does not wait when its previous commit met a group already being
    /// written (it waits for that group, then for its own).
    static let pipelineDepth = 2

    /// A pipelined `colo.checkpoint`: the call returns once both domains run again with the
    /// secondary holding the state (`durable` false) and the generation is committed with the
    /// next group while the pair goes on, so the pair's rate follows the disk's throughput,
    /// not its latency (Remus's pipelined checkpoints; the secondary, not the file, is what a
    /// failover of this flavour needs). At most `pipelineDepth` generations per pair commit after
    /// their calls returned: when that many are still committing, the call waits for its own
    /// commit (`durable` true). A generation becomes the last good one only once durable; a
    /// failed commit is logged, counted, and raised by the pair's next call.
    private func startPipelinedCheckpoint(series: String, primary: Domain, secondary: Domain, store: GenerationStore,
                                          completion: LuaCompletion) throws {
        let involved = [primary, secondary]
        try claim(involved)
        let started = NIODeadline.now()
        var answered = false
        track({ [self] done in
            CheckpointEngine.xenCheckpoint(primary: primary, secondary: secondary, store: store, committer: committer, resumed: { [self] running in
                guard pipelinedCommits[series, default: 0] < Self.pipelineDepth else { return false }
                answered = true
                pipelinedCommits[series, default: 0] += 1
                for domain in involved { busyDomains.remove(domain.name) }
                completion.succeed([.json(.object(running.fields))])
                return true
            }, done)
        }) { [self] result in
            if answered {
                pipelinedCommits[series, default: 1] -= 1
                if pipelinedCommits[series] == 0 { pipelinedCommits[series] = nil }
            } else {
                for domain in involved { busyDomains.remove(domain.name) }
            }
            finishCheckpoint(series: series, started: started, result, completion: answered ? nil : completion)
            if answered, case .failure(let error) = result { pipelinedCommitFailures[series] = error }
        }
    }

    /// `remus.checkpoint(d, {keep=, disks=, output_commit=, series=})`: a whole-VM checkpoint of
    /// one domain, into the series named after the domain unless `series` names another (the
    /// two hosts of a pair write one series: each era's VM has a domain name of its own).
    func remusCheckpoint(_ call: LuaCall, _ completion: LuaCompletion) throws {
        let domain = try domain(named: try call.string(1))
        let keep = try keepOption(call, 2)
        let seriesName = try call.optionalString(5) ?? domain.name
        guard DomainSpec.isValidName(seriesName) else {
            throw LuaHostError.message("remus.checkpoint: 'series' must be a name (letters, digits, '-', '_', '.')")
        }
        try requireHolding("remus.checkpoint")
        let fencingToken = self.fencingToken
        let store = try store(series: seriesName, fileExtension: "vmstate", keep: keep)
        let (disks, outputCommit) = try remusOptions(call, disks: 3, outputCommit: 4)
        let remusState = remusState(domain.name)
        let tune = !tunedForRemus.contains(domain.name)
        tunedForRemus.insert(domain.name)
        let io = blockingIO
        try startCheckpoint(series: seriesName, domains: [domain], completion: completion, inTask: {
            if tune {
                // QEMU's default migration bandwidth (128 MiB/s) stretches every pause.
                _ = try? await domain.execute("migrate-set-parameters", ["max-bandwidth": .int(107_374_182_400)])
            }
            return await CheckpointEngine.capture { () async throws(CheckpointError) in
                try await CheckpointEngine.remusCheckpoint(
                    domain, store: store, io: io, disks: disks, outputCommit: outputCommit, state: remusState, fencingToken: fencingToken)
            }
        })
    }

    /// Raises before anything is stopped when `secondary` refuses the Xen cycle's load (a lab
    /// domain: plain QEMU).
    func refuseXenCycle(on secondary: Domain, in function: String) throws {
        guard let why = secondary.options.refusedCommands["xen-load-devices-state"] else { return }
        let error = DomainError(domain: secondary.name, command: "xen-load-devices-state", errorClass: DomainError.refused, desc: why)
        throw LuaHostError.structured(error.fields, message: "\(function): \(error)")
    }

    private func keepOption(_ call: LuaCall, _ index: Int) throws -> Int {
        guard !call.isNil(index) else { return options.keepGenerations }
        let keep = try call.integer(index)
        guard keep >= 1 else { throw LuaHostError.message("keep must be at least 1 (got \(keep))") }
        return Int(keep)
    }

    /// The store of `series` if it is open (its `keep` set to this call's), nil if not yet;
    /// raises for a `keep` the store cannot hold.
    func openedStore(series: String, fileExtension: String, keep: Int) throws -> GenerationStore? {
        // A staged store lists its generations in one index record (GenerationIndex).
        if fileExtension == "devstate" && options.runtimeDirectory != nil && keep > GenerationIndex.maxEntries {
            throw LuaHostError.message("keep must be at most \(GenerationIndex.maxEntries) with --runtime-dir (got \(keep))")
        }
        guard let store = stores[series] else { return nil }
        store.keep = keep
        return store
    }

    /// The store of `series`, opened here on the loop if it is not open yet.
    func store(series: String, fileExtension: String, keep: Int) throws -> GenerationStore {
        if let store = try openedStore(series: series, fileExtension: fileExtension, keep: keep) { return store }
        let store: GenerationStore
        do {
            store = try storeOpener(series: series, fileExtension: fileExtension, keep: keep)()
        } catch {
            throw Self.storeOpenError(error)
        }
        adopt(store, series: series)
        return store
    }

    /// What opening the store of `series` takes, worked out on the loop (the run's staging
    /// directory is made with the first staged store); the closure opens it, on any thread.
    private func storeOpener(series: String, fileExtension: String, keep: Int) throws(GenerationStoreError)
        -> @Sendable () throws(GenerationStoreError) -> GenerationStore {
        // Device states (the Xen cycle's, small) go through the staging directory if there is
        // one; Remus streams (the guest's memory) never do.
        let staging = fileExtension == "devstate" ? try stagingDirectory().map { $0 + "/" + series } : nil
        let directory = options.stateDirectory + "/checkpoints/" + series
        let fencing = options.fencing
        return { () throws(GenerationStoreError) in
            try GenerationStore(directory: directory, fileExtension: fileExtension, keep: keep, fencing: fencing, staging: staging)
        }
    }

    /// This run's staging directory (made on first use under `<runtime-dir>/staging`, after
    /// sweeping those of runs that died), nil without `--runtime-dir`.
    func stagingDirectory() throws(GenerationStoreError) -> String? {
        guard let root = options.runtimeDirectory.map({ $0 + "/staging" }) else { return nil }
        if let stagingRun { return stagingRun }
        try GenerationStore.makeDirectories(root)
        RunDirectorySweep.sweepOnce(root, logger: logger)
        do {
            let run = try makeTemporaryDirectory(in: root, prefix: "colorun-staging")
            try RunDirectoryOwner.current().write(to: run)
            stagingRun = run
            return run
        } catch {
            throw GenerationStoreError(path: root, reason: "cannot make the staging directory: \(error)")
        }
    }

    /// `remus.restore(spec, generation)`: starts a standby QEMU reading a Remus generation
    /// of `spec.from`, waits for the load, resumes it and returns it as a new domain.
    func restoreStandby(spec: JSONValue, generation wanted: Int?, completion: LuaCompletion) throws {
        guard !stopping else { throw LuaHostError.message("the run is stopping: no standby is restored") }
        guard let name = spec["name"]?.stringValue, DomainSpec.isValidName(name) else {
            throw LuaHostError.message("remus.restore: 'name' must be a domain name (letters, digits, '-', '_', '.')")
        }
        guard domains[name] == nil else { throw LuaHostError.message("remus.restore: a domain named '\(name)' already exists") }
        guard let series = spec["from"]?.stringValue else { throw LuaHostError.message("remus.restore: 'from' is required") }
        let store = try store(series: series, fileExtension: "vmstate", keep: stores[series]?.keep ?? options.keepGenerations)
        let generations = remusGenerations(store)
        guard let generation = wanted.map({ n in generations.first { $0.number == n } }) ?? generations.last else {
            let have = generations.map { String($0.number) }.joined(separator: ", ")
            throw LuaHostError.structured(
                ["class": "NoCheckpoint", "desc": .string("no generation \(wanted.map(String.init) ?? "at all") of \(series) (have: \(have.isEmpty ? "none" : have))"), "step": "restore"],
                message: "remus.restore: no good checkpoint of \(series)\(wanted.map { " numbered \($0)" } ?? "") (have: \(have.isEmpty ? "none" : have))")
        }
        let manifest = try standbyManifest(spec: spec, generation: generation.number, store: store)
        guard !generation.path.contains("'") else { throw LuaHostError.message("remus.restore: the state path contains a quote") }
        let directory = options.stateDirectory + "/standby/" + name
        let io = blockingIO
        // qemu-img runs off the event loop: the other domains' checkpoints go on meanwhile.
        track({ () async -> Result<[String], GenerationStoreError> in
            do throws(GenerationStoreError) {
                return .success(try await Self.standbyOverlays(manifest, directory: directory, io: io))
            } catch {
                return .failure(error)
            }
        }) { [self] result in
            switch result {
            case .failure(let error):
                completion.fail(Self.restoreFailed(error))
            case .success(let diskArguments):
                do {
                    try launchStandby(name: name, series: series, spec: spec, diskArguments: diskArguments, generation: generation, completion: completion)
                } catch {
                    RemusDisks.removeOverlays(diskArguments)
                    completion.fail(error)
                }
            }
        }
    }

    /// Starts the standby's QEMU on the generation (its overlays made), adds it as a domain
    /// and resumes it once loaded. A standby that fails to come up is killed and its overlays
    /// deleted: they hold nothing but what its failed load wrote.
    private func launchStandby(
        name: String, series: String, spec: JSONValue, diskArguments: [String], generation: Generation, completion: LuaCompletion
    ) throws {
        guard !stopping else { throw LuaHostError.message("the run is stopping: no standby is restored") }
        guard domains[name] == nil else { throw LuaHostError.message("remus.restore: a domain named '\(name)' already exists") }
        var spec = spec
        if case .object(var members) = spec {
            members[Self.standbyDiskArgumentsKey] = diskArguments.isEmpty ? nil : .array(diskArguments.map { .string($0) })
            spec = .object(members)
        }
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
                // A standby this node promoted runs under the key: fenced with the node.
                if arbiter != nil { guarded.insert(name) }
                if !resume { try? domain.adoptPaused() }
                countFailover(of: [series, name])
                logger.warning("standby running", metadata: ["domain": .string(name), "restore_ms": .stringConvertible(milliseconds)])
                completion.succeed([.json([
                    "name": .string(name), "endpoint": .string(launched.endpoint.description),
                    "generation": .int(Int64(generation.number)), "restore_ms": .double(milliseconds), "pid": .int(Int64(launched.pid)),
                ])])
            case .failure(let error):
                kill(launched.pid, SIGKILL)
                RemusDisks.removeOverlays(diskArguments)
                let stderr = String(decoding: (try? readFile(launched.stderrPath)) ?? [], as: UTF8.self)
                let detail = stderr.split(separator: "\n").suffix(3).joined(separator: " | ")
                var fields = error.fields
                fields["step"] = "restore"
                if !detail.isEmpty { fields["qemu_stderr"] = .string(detail) }
                completion.fail(LuaHostError.structured(fields, message: "\(error)\(detail.isEmpty ? "" : " (QEMU said: \(detail))")"))
            }
        }
    }

    /// Starts a checkpoint that runs as a Swift `Task` (Remus).
    private func startCheckpoint(series: String, domains involved: [Domain], completion: LuaCompletion,
                                 inTask operation: @escaping @Sendable () async -> Result<CheckpointResult, CheckpointError>) throws {
        let loop = eventLoop
        try startCheckpoint(series: series, domains: involved, completion: completion) { done in
            let finish = UncheckedSendable(done)
            Task {
                let result = await operation()
                loop.execute { finish.value(result) }
            }
        }
    }

    /// Starts a checkpoint that runs on the loop: `operation` calls its argument once, on the
    /// loop, with the outcome.
    private func startCheckpoint(series: String, domains involved: [Domain], completion: LuaCompletion,
                                 _ operation: (@escaping (Result<CheckpointResult, CheckpointError>) -> Void) -> Void) throws {
        try claim(involved)
        let started = NIODeadline.now()
        track(operation) { [self] result in
            for domain in involved { busyDomains.remove(domain.name) }
            finishCheckpoint(series: series, started: started, result, completion: completion)
        }
    }

    /// Marks the domains of a new checkpoint busy, or raises when the run is stopping or one
    /// of them is in a checkpoint already.
    private func claim(_ involved: [Domain]) throws {
        guard !stopping else { throw LuaHostError.message("the run is stopping: no new checkpoint is started") }
        if let busy = involved.first(where: { busyDomains.contains($0.name) }) {
            throw LuaHostError.structured(
                ["class": "Busy", "domain": .string(busy.name), "desc": "a checkpoint of this domain is in progress", "step": "start"],
                message: "\(busy.name): a checkpoint of this domain is in progress; checkpoints of one domain never overlap")
        }
        for domain in involved { busyDomains.insert(domain.name) }
    }

    /// The books of a finished checkpoint (metrics, report, resume keepers) and its answer to
    /// Lua, unless the call was answered already (a pipelined one).
    private func finishCheckpoint(series: String, started: NIODeadline, _ result: Result<CheckpointResult, CheckpointError>,
                                  completion: LuaCompletion?) {
        recordMetrics(series: series, started: started, result)
        switch result {
        case .success(let checkpoint):
            report.checkpoints += 1
            report.pauseMilliseconds.append(checkpoint.pauseMilliseconds)
            report.lastGood[series] = checkpoint.generation
            completion?.succeed([.json(.object(checkpoint.fields))])
        case .failure(let error):
            report.failedCheckpoints += 1
            logger.error("checkpoint failed", metadata: ["series": .string(series), "error": .string(error.description)])
            for failure in error.unresumed {
                if let domain = domains[failure.domain] { keepResuming(domain) }
            }
            completion?.fail(LuaHostError(error))
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
