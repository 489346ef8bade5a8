import JSON
import NIOPosix
import QMP

#if canImport(Glibc)
import Glibc
#endif

extension CheckpointEngine {
    /// Remus style on plain QEMU. Before the pause: wait for colorun's disk merges, find the
    /// disks, install the output buffers. In the pause: `stop`, one `transaction` of
    /// `blockdev-snapshot-sync` (each disk's active layer frozen under a new overlay),
    /// `migrate` the whole VM to a new generation file, wait for `completed`. Then the
    /// generation is made durable (memory file fsynced and renamed, frozen images fsynced,
    /// manifest written last) and the VM resumed: with output commit, durable first, then
    /// the held packets released, then `cont`; without, `cont` first (the fsyncs are not
    /// pause time). Last, off the pause, the disk housekeeping.
    ///
    /// Whatever fails, the VM is resumed; a failure before the commit releases no packet
    /// (they stay held for the next checkpoint) and leaves no manifest (the generation is torn).
    ///
    /// The defaults here are the memory file alone; `remus.checkpoint` passes `.all` and
    /// `.auto` unless the policy says otherwise.
    static func remusCheckpoint(
        _ domain: some CheckpointTarget, store: GenerationStore, io: NIOThreadPool? = nil,
        disks selection: RemusDiskSelection = .none, outputCommit: OutputCommitSelection = .off,
        state: RemusDomainState = RemusDomainState(), fencingToken: Int64? = nil,
        pollInterval: Duration = .milliseconds(1), timeout: Duration = .seconds(30)
    ) async throws(CheckpointError) -> CheckpointResult {
        let (generation, partial) = store.begin()
        let lastGood = store.lastGood
        let clock = ContinuousClock()
        let own = RemusDisks.directory(of: store)

        func fail(_ step: String, _ error: DomainError) async -> CheckpointError {
            // A migration still writing would keep the file open; cancel it first.
            if step == "migrate" { _ = try? await domain.execute("migrate_cancel", nil) }
            store.discard(generation)
            return CheckpointError(step: step, error, generation: generation, lastGood: lastGood, unresumed: await resumeAll([domain]))
        }
        func stateDirectoryError(_ step: String, _ error: GenerationStoreError, unresumed: [DomainError]) -> CheckpointError {
            CheckpointError(step: step, domain: domain.name, cause: error.description, errorClass: "StateDirError", command: nil,
                            generation: generation, lastGood: lastGood, unresumed: unresumed)
        }

        guard !partial.contains("'") else {
            throw CheckpointError(
                step: "migrate", domain: domain.name, cause: "state path contains a quote: \(partial)", errorClass: "StateDirError",
                command: "migrate", generation: generation, lastGood: lastGood, unresumed: [])
        }

        // Before the pause (nothing is stopped yet).
        var live: [LiveDisk] = []
        var held: [String] = []
        do throws(DomainError) {
            if selection != .none {
                try await RemusDisks.waitForMerges(domain, timeout: timeout)
                live = try await RemusDisks.discover(domain, selection: selection, ownDirectory: own)
            }
            held = try await OutputCommit.prepare(domain, outputCommit, state: state)
        } catch {
            store.discard(generation)
            throw CheckpointError(step: "prepare", error, generation: generation, lastGood: lastGood, unresumed: [])
        }
        let snapshot = RemusDisks.snapshot(live, generation: generation, token: state.token, ownDirectory: own)
        if !live.isEmpty {
            do throws(GenerationStoreError) {
                try GenerationStore.makeDirectories(own)
                // QEMU would overwrite an existing file: never one that may be in a chain.
                if let taken = snapshot.overlays.first(where: { access($0, F_OK) == 0 }) {
                    throw GenerationStoreError(path: taken, reason: "a new overlay's name is taken")
                }
            } catch {
                store.discard(generation)
                throw stateDirectoryError("snapshot", error, unresumed: [])
            }
        }

        let pauseStart = clock.now
        do {
            try await domain.stop()
        } catch {
            throw await fail("stop", error)
        }
        if !live.isEmpty {
            do {
                _ = try await domain.execute("transaction", snapshot.arguments)
            } catch {
                throw await fail("snapshot", error)
            }
        }
        let saveStart = clock.now
        do throws(DomainError) {
            _ = try await domain.execute("migrate", ["uri": .string("exec:cat > '\(partial)'")])
            let deadline = clock.now + timeout
            while true {
                let info = try await domain.execute("query-migrate", nil)
                let status = info["status"]?.stringValue ?? ""
                if status == "completed" { break }
                if status == "failed" || status == "cancelled" {
                    let reason = info["error-desc"]?.stringValue ?? "migration \(status)"
                    throw DomainError(domain: domain.name, command: "migrate", errorClass: "MigrationFailed", desc: reason)
                }
                if clock.now > deadline {
                    throw DomainError(domain: domain.name, command: "query-migrate", errorClass: DomainError.timeout, desc: "migration did not complete within \(timeout)")
                }
                try? await Task.sleep(for: pollInterval)
            }
        } catch {
            throw await fail("migrate", error)
        }
        let saveEnd = clock.now

        // Durable: the memory file, the frozen images, then the manifest that names them.
        let frozen = snapshot.frozen
        let netdevs = held
        let commitWork = { @Sendable () throws(GenerationStoreError) -> (Int, Generation) in
            let bytes = try store.validate(generation, magic: stateMagic)
            for disk in frozen {
                for file in disk.chain { try QCOW2Chain.sync(file) }
            }
            if !frozen.isEmpty { GenerationStore.syncDirectory(own) }
            let committed = try store.commit(generation)
            do throws(GenerationStoreError) {
                var manifest = GenerationManifest(generation: generation, memoryPath: committed.path, memoryBytes: bytes, disks: frozen, outputCommit: netdevs)
                manifest.fencingToken = fencingToken
                try manifest.write(in: store)
            } catch {
                unlink(committed.path)
                throw error
            }
            // The store pruned the memory files of generations beyond `keep`: their manifests go too.
            GenerationManifest.prune(in: store)
            return (bytes, committed)
        }
        var committed: (bytes: Int, generation: Generation)?
        var commitMilliseconds = 0.0
        if !held.isEmpty {
            let commitStart = clock.now
            do {
                committed = try await blocking(io, commitWork)
            } catch {
                store.discard(generation)
                throw stateDirectoryError("commit", error, unresumed: await resumeAll([domain]))
            }
            commitMilliseconds = milliseconds(clock.now - commitStart)
            do {
                try await OutputCommit.release(domain, held)
            } catch {
                // The generation is good; its packets stay held until the next checkpoint releases them.
                throw CheckpointError(step: "release", error, generation: generation, lastGood: generation, unresumed: await resumeAll([domain]))
            }
        }
        let unresumed = await resumeAll([domain])
        let pauseEnd = clock.now
        if let first = unresumed.first {
            if committed == nil { store.discard(generation) }
            throw CheckpointError(step: "resume", first, generation: generation, lastGood: committed == nil ? lastGood : generation, unresumed: unresumed)
        }
        if committed == nil {
            do {
                committed = try await blocking(io, commitWork)
            } catch {
                store.discard(generation)
                throw CheckpointError(
                    step: "commit", domain: domain.name, cause: error.description, errorClass: "TornCheckpoint", command: "migrate",
                    generation: generation, lastGood: lastGood, unresumed: [])
            }
        }
        guard let committed else { fatalError("committed above") }
        var extra: [String: JSONValue] = [
            "disks": .array(frozen.map { ["device": .string($0.device), "frozen": .string($0.top)] }),
            "output_commit": .array(held.map { .string($0) }),
        ]
        if !held.isEmpty { extra["commit_ms"] = .double(commitMilliseconds) }
        if !live.isEmpty {
            extra["housekeeping"] = .object(await RemusDisks.housekeep(domain, store: store, selection: selection, generation: generation))
        }
        var result = CheckpointResult(
            generation: generation, path: committed.generation.path, bytes: committed.bytes,
            pauseMilliseconds: milliseconds(pauseEnd - pauseStart),
            saveMilliseconds: milliseconds(saveEnd - saveStart), restoreMilliseconds: 0)
        result.extra = extra
        return result
    }
}
