import JSON
import NIOPosix
import QMP

/// What a checkpoint engine needs of a domain. `Domain` is the real one.
protocol CheckpointTarget: AnyObject, Sendable {
    var name: String { get }
    /// `stop`, journaled first, so a killed colorun's successor resumes the domain.
    func stop() async throws(DomainError)
    /// `cont`, then the journal entry is cleared (also when the monitor is gone).
    func resume() async throws(DomainError)
    func execute(_ command: String, _ arguments: [String: JSONValue]?) async throws(DomainError) -> JSONValue
    /// Drops the monitor connection; the next command opens a new one (after a timeout, a
    /// command stuck ahead in the old connection cannot block the next one).
    func disconnect() async
}

/// A checkpoint that did not complete. Every domain the checkpoint stopped has been
/// resumed (or the failure to resume it is listed in `unresumed`), and the last good
/// generation is untouched.
struct CheckpointError: Error, Sendable, CustomStringConvertible {
    /// The step that failed: `stop`, `save`, `verify`, `restore`, `migrate`, `resume`, `commit`.
    var step: String
    /// The domain the step failed on (empty for a state-directory failure).
    var domain: String
    var cause: String
    /// The QMP or colorun error class when the cause was a domain error.
    var errorClass: String?
    var command: String?
    /// The generation this checkpoint would have been.
    var generation: Int
    /// The newest complete generation, still intact.
    var lastGood: Int?
    /// Domains that could not be resumed (their error); empty when all run again.
    var unresumed: [DomainError]

    var description: String {
        var text = "checkpoint \(generation) failed at \(step)"
        if !domain.isEmpty { text += " on \(domain)" }
        text += ": \(cause)"
        if let lastGood { text += " (last good generation: \(lastGood))" } else { text += " (no good generation yet)" }
        for failure in unresumed { text += "; NOT RESUMED: \(failure)" }
        return text
    }

    var fields: [String: JSONValue] {
        var f: [String: JSONValue] = [
            "step": .string(step), "domain": .string(domain), "desc": .string(cause),
            "generation": .int(Int64(generation)),
            "class": .string(errorClass ?? "CheckpointError"),
        ]
        if let command { f["command"] = .string(command) }
        if let lastGood { f["last_good"] = .int(Int64(lastGood)) }
        if !unresumed.isEmpty { f["unresumed"] = .array(unresumed.map { .string($0.domain) }) }
        return f
    }
}

extension CheckpointError {
    /// A step that failed on a domain.
    init(step: String, _ error: DomainError, generation: Int, lastGood: Int?, unresumed: [DomainError]) {
        self.init(
            step: step, domain: error.domain, cause: error.desc, errorClass: error.errorClass, command: error.command,
            generation: generation, lastGood: lastGood, unresumed: unresumed)
    }
}

/// The outcome of a good checkpoint.
struct CheckpointResult: Sendable, Hashable {
    var generation: Int
    var path: String
    var bytes: Int
    /// From the first `stop` sent to the last `cont` answered.
    var pauseMilliseconds: Double
    var saveMilliseconds: Double
    var restoreMilliseconds: Double
    /// More fields for the result table (a Remus checkpoint's disks and output commit).
    var extra: [String: JSONValue] = [:]

    var fields: [String: JSONValue] {
        extra.merging([
            "generation": .int(Int64(generation)), "path": .string(path), "bytes": .int(Int64(bytes)),
            "pause_ms": .double(pauseMilliseconds), "save_ms": .double(saveMilliseconds),
            "restore_ms": .double(restoreMilliseconds),
        ]) { _, new in new }
    }
}

/// The seed's checkpoint and its Remus-style sibling, with the house rules built in:
/// whatever fails, every domain the checkpoint stopped is resumed, a generation becomes
/// visible only when complete, and a secondary never loads a file that is not a whole
/// device-state file.
enum CheckpointEngine {
    /// QEMU's device-state and migration streams start with `QEVM` and version 3.
    static let stateMagic: [UInt8] = [0x51, 0x45, 0x56, 0x4D, 0x00, 0x00, 0x00, 0x03]

    /// Xen flavour (libxl's COLO checkpoint): stop both, save the primary's device state,
    /// load it on the secondary, resume both.
    ///
    /// `io` runs the blocking file work of the commit (fsync, rename, fsync of the
    /// directory) off the Swift concurrency pool, so that many checkpoints commit at once
    /// (the filesystem batches their fsyncs) without stalling other work.
    static func xenCheckpoint(
        primary: some CheckpointTarget, secondary: some CheckpointTarget, store: GenerationStore, io: NIOThreadPool? = nil
    ) async throws(CheckpointError) -> CheckpointResult {
        let (generation, partial) = store.begin()
        let lastGood = store.lastGood
        let clock = ContinuousClock()
        let pauseStart = clock.now

        func fail(_ step: String, _ error: DomainError, resuming targets: [any CheckpointTarget]) async -> CheckpointError {
            store.discard(generation)
            return CheckpointError(step: step, error, generation: generation, lastGood: lastGood, unresumed: await resumeAll(targets))
        }

        // 1. Stop both at once.
        async let stopPrimary = capture { () async throws(DomainError) in try await primary.stop() }
        async let stopSecondary = capture { () async throws(DomainError) in try await secondary.stop() }
        let stops = await (stopPrimary, stopSecondary)
        for result in [stops.0, stops.1] {
            if case .failure(let error) = result {
                // A stop that timed out may still have stopped its VM: resume both.
                throw await fail("stop", error, resuming: [primary, secondary])
            }
        }

        // 2. Save the primary's device state under the partial name.
        let saveStart = clock.now
        do {
            _ = try await primary.execute("xen-save-devices-state", ["filename": .string(partial), "live": .bool(false)])
        } catch {
            throw await fail("save", error, resuming: [primary, secondary])
        }
        let saveEnd = clock.now

        // 3. Never hand the secondary a torn or foreign file.
        let bytes: Int
        do {
            bytes = try store.validate(generation, magic: stateMagic)
        } catch {
            throw await fail(
                "verify", DomainError(domain: primary.name, command: "xen-save-devices-state", errorClass: "TornCheckpoint", desc: error.description),
                resuming: [primary, secondary])
        }

        // 4. Load it on the secondary.
        do {
            _ = try await secondary.execute("xen-load-devices-state", ["filename": .string(partial)])
        } catch {
            throw await fail("restore", error, resuming: [primary, secondary])
        }
        let restoreEnd = clock.now

        // 5. Resume both at once.
        let unresumed = await resumeAll([primary, secondary])
        let pauseEnd = clock.now
        if let first = unresumed.first {
            store.discard(generation)
            throw CheckpointError(step: "resume", first, generation: generation, lastGood: lastGood, unresumed: unresumed)
        }

        // 6. Make it the last good generation (after the resume: the fsync is not pause time).
        let committed: Generation
        do {
            committed = try await blocking(io) { () throws(GenerationStoreError) in try store.commit(generation) }
        } catch {
            store.discard(generation)
            throw CheckpointError(
                step: "commit", domain: "", cause: error.description, errorClass: "StateDirError", command: nil,
                generation: generation, lastGood: lastGood, unresumed: [])
        }
        return CheckpointResult(
            generation: generation, path: committed.path, bytes: bytes,
            pauseMilliseconds: milliseconds(pauseEnd - pauseStart),
            saveMilliseconds: milliseconds(saveEnd - saveStart),
            restoreMilliseconds: milliseconds(restoreEnd - saveEnd))
    }

    // Remus style on plain QEMU: RemusCheckpoint.swift.

    /// Resumes every target at once. A `cont` that fails for a reason other than a
    /// refused connection is tried again on a fresh connection, up to `attempts` times.
    /// A domain whose monitor is gone (its QEMU is not running) has nothing paused to
    /// resume: its stop is forgotten. Returns the failures that remain.
    static func resumeAll(_ targets: [any CheckpointTarget], attempts: Int = 3) async -> [DomainError] {
        await withTaskGroup(of: DomainError?.self) { group in
            for target in targets {
                group.addTask {
                    var last: DomainError?
                    for attempt in 1...max(attempts, 1) {
                        do throws(DomainError) {
                            try await target.resume()
                            return nil
                        } catch {
                            // Its QEMU is not running: nothing is paused (the domain forgot the stop).
                            if error.monitorGone { return nil }
                            last = error
                            if error.errorClass == DomainError.connectFailed || attempt == attempts { break }
                            if [DomainError.timeout, DomainError.protocolError].contains(error.errorClass) {
                                await target.disconnect()
                            }
                        }
                    }
                    return last
                }
            }
            var failures: [DomainError] = []
            for await failure in group {
                if let failure { failures.append(failure) }
            }
            return failures
        }
    }

    /// Runs blocking file work on `io` (or here, without a pool).
    static func blocking<T: Sendable>(
        _ io: NIOThreadPool?, _ body: @escaping @Sendable () throws(GenerationStoreError) -> T
    ) async throws(GenerationStoreError) -> T {
        guard let io else { return try body() }
        let result: Result<T, GenerationStoreError>
        do {
            result = try await io.runIfActive { () -> Result<T, GenerationStoreError> in
                do throws(GenerationStoreError) { return .success(try body()) } catch { return .failure(error) }
            }
        } catch {
            result = .failure(GenerationStoreError(path: "", reason: "the I/O thread pool is shut down: \(error)"))
        }
        return try result.get()
    }

    static func capture<T, E: Error>(_ body: () async throws(E) -> T) async -> Result<T, E> {
        do throws(E) {
            return .success(try await body())
        } catch {
            return .failure(error)
        }
    }

    static func milliseconds(_ d: Duration) -> Double {
        let (s, attos) = d.components
        return Double(s) * 1000 + Double(attos) / 1e15
    }
}
