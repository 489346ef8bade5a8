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
    /// load it on the secondary, resume both, commit the generation.
    ///
    /// Runs on the domains' event loop (the session's) as one straight line of callbacks:
    /// each QMP reply continues the checkpoint where it arrives, with no hop to another thread
    /// (`XenCheckpoint`). The commit (fsync, rename, fsync of the directory) goes to
    /// `committer`, which makes the generations of many pairs durable together off the loop;
    /// without one it runs here, on the loop. `resumed`, if given, runs on the loop when both
    /// domains run again with the secondary holding the state, before the commit (with
    /// `durable` false in the result's fields: a pipelined caller may answer there) and says
    /// whether the caller was answered (then nobody waits for the commit, which may wait a
    /// little for other pairs' commits to share its group).
    /// `completion` runs on the loop, once, after the commit.
    static func xenCheckpoint(
        primary: Domain, secondary: Domain, store: GenerationStore, committer: GroupCommitter?,
        resumed: ((CheckpointResult) -> Bool)? = nil,
        _ completion: @escaping (Result<CheckpointResult, CheckpointError>) -> Void
    ) {
        XenCheckpoint(primary: primary, secondary: secondary, store: store, committer: committer, resumed: resumed, completion: completion).start()
    }

    /// Resumes every domain at once, on their loop (the callback twin of the async
    /// `resumeAll`, same rules); `completion` gets the failures that remain.
    static func resumeAll(_ domains: [Domain], attempts: Int = 3, _ completion: @escaping ([DomainError]) -> Void) {
        var failures: [DomainError?] = Array(repeating: nil, count: domains.count)
        var left = domains.count
        for (i, domain) in domains.enumerated() {
            resume(domain, attempt: 1, attempts: max(attempts, 1)) { failure in
                failures[i] = failure
                left -= 1
                if left == 0 { completion(failures.compactMap { $0 }) }
            }
        }
    }

    private static func resume(_ domain: Domain, attempt: Int, attempts: Int, _ done: @escaping (DomainError?) -> Void) {
        domain.sendResume { result in
            guard case .failure(let error) = result else { return done(nil) }
            // Its QEMU is not running: nothing is paused (the domain forgot the stop).
            if error.monitorGone { return done(nil) }
            if error.errorClass == DomainError.connectFailed || attempt >= attempts { return done(error) }
            if [DomainError.timeout, DomainError.protocolError].contains(error.errorClass) { domain.dropConnection() }
            resume(domain, attempt: attempt + 1, attempts: attempts, done)
        }
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

/// One Xen-flavour checkpoint in progress, on the loop: each step is started by the reply
/// to the previous one. Whatever fails, every domain it stopped is resumed and the partial
/// file removed; the last good generation is untouched.
private final class XenCheckpoint {
    let primary: Domain
    let secondary: Domain
    let store: GenerationStore
    let committer: GroupCommitter?
    let resumed: ((CheckpointResult) -> Bool)?
    let completion: (Result<CheckpointResult, CheckpointError>) -> Void
    let generation: Int
    let partial: String
    let lastGood: Int?
    let clock = ContinuousClock()
    let pauseStart: ContinuousClock.Instant
    var saveStart: ContinuousClock.Instant
    var saveEnd: ContinuousClock.Instant
    var restoreEnd: ContinuousClock.Instant
    var pauseEnd: ContinuousClock.Instant
    var bytes = 0
    /// Which of primary, secondary has answered its `stop` (a failed stop fails the checkpoint at once).
    var stopped = [false, false]
    var saved = false
    /// The save was sent and has not been answered: a failure leaves its file to the reply.
    var saveInFlight = false
    /// The checkpoint failed: replies still due (the save queued behind a failed stop, the
    /// other domain's stop) change nothing.
    var finished = false
    /// The secondary's `cont` sent behind its load.
    var secondaryResume = PipelinedResume.notSent

    enum PipelinedResume {
        case notSent
        /// Sent, not answered yet; `waiting` (if set) takes the answer.
        case sent(waiting: ((Result<Void, DomainError>) -> Void)?)
        case answered(Result<Void, DomainError>)
    }

    init(primary: Domain, secondary: Domain, store: GenerationStore, committer: GroupCommitter?,
         resumed: ((CheckpointResult) -> Bool)?, completion: @escaping (Result<CheckpointResult, CheckpointError>) -> Void) {
        self.primary = primary
        self.secondary = secondary
        self.store = store
        self.committer = committer
        self.resumed = resumed
        self.completion = completion
        (generation, partial) = store.begin()
        lastGood = store.lastGood
        pauseStart = clock.now
        (saveStart, saveEnd, restoreEnd, pauseEnd) = (pauseStart, pauseStart, pauseStart, pauseStart)
    }

    /// 1. Stop both at once, 2. and save the primary's device state under the partial name,
    /// sent behind its `stop` in the same write: QEMU runs a monitor's commands one after
    /// the other, so the save starts when the primary is stopped, without waiting a round
    /// trip for the stop's reply (nor for the secondary's). A stop that fails fails the
    /// checkpoint whatever the save does (QEMU's save of a running VM pauses it for the
    /// save and lets it run again); what arrives after the checkpoint failed is ignored.
    func start() {
        primary.eventLoop.preconditionInEventLoop()
        for (i, domain) in [primary, secondary].enumerated() {
            domain.sendStop(deferFlush: i == 0) { result in
                guard !self.finished else { return }
                if i == 0 { self.saveStart = self.clock.now }
                // A stop that timed out may still have stopped its VM: resume both.
                if case .failure(let error) = result { return self.fail("stop", error) }
                self.stopped[i] = true
                self.loadIfReady()
            }
        }
        guard !finished else { return }  // the primary's stop failed before it was sent
        saveInFlight = true
        primary.send("xen-save-devices-state", ["filename": .string(partial), "live": .bool(false)]) { result in
            self.saveInFlight = false
            guard !self.finished else {
                // Failed meanwhile: the file is removed now that QEMU has done with it.
                return self.store.discard(self.generation)
            }
            if case .failure(let error) = result { return self.fail("save", error) }
            self.saveEnd = self.clock.now
            self.saved = true
            self.loadIfReady()
        }
    }

    /// Both stopped and the primary saved: on to the load.
    private func loadIfReady() {
        guard saved, stopped[0], stopped[1] else { return }
        verifyAndLoad()
    }

    /// 3. Never hand the secondary a torn or foreign file (a read of its head, from the page
    /// cache), 4. then load it on the secondary, with its `cont` right behind in the same
    /// write: QEMU runs them in order, so the secondary runs again as soon as it holds the
    /// state, without waiting a round trip for the load's reply. A load that fails leaves the
    /// secondary running its own state, as the rollback would: that `cont` is the rollback's
    /// for the secondary (`resumeBoth`).
    func verifyAndLoad() {
        do {
            bytes = try store.validate(generation, magic: CheckpointEngine.stateMagic)
        } catch {
            return fail("verify", DomainError(domain: primary.name, command: "xen-save-devices-state", errorClass: "TornCheckpoint", desc: error.description))
        }
        secondary.send("xen-load-devices-state", ["filename": .string(partial)], deferFlush: true) { result in
            guard !self.finished else { return }
            if case .failure(let error) = result { return self.fail("restore", error) }
            self.restoreEnd = self.clock.now
            self.resume()
        }
        guard !finished else { return }  // the load was refused before it was sent
        secondaryResume = .sent(waiting: nil)
        secondary.sendResume { result in
            guard case .sent(let waiting) = self.secondaryResume else { return }
            self.secondaryResume = .answered(result)
            waiting?(result)
        }
    }

    /// 5. Resume the primary once the secondary holds the state.
    func resume() {
        resumeBoth { self.bothResumed(unresumed: $0) }
    }

    /// Resumes both at once, as `CheckpointEngine.resumeAll` does, with the secondary's `cont`
    /// sent behind its load standing for the secondary's (tried again as `resumeAll` does
    /// if it failed); `done` gets the failures that remain.
    func resumeBoth(_ done: @escaping ([DomainError]) -> Void) {
        var unresumed: [DomainError] = []
        var left = 2
        let one = { (failures: [DomainError]) in
            unresumed += failures
            left -= 1
            if left == 0 { done(unresumed) }
        }
        CheckpointEngine.resumeAll([primary], one)
        let secondary = self.secondary
        let answered = { (result: Result<Void, DomainError>) in
            if case .failure = result { CheckpointEngine.resumeAll([secondary], one) } else { one([]) }
        }
        switch secondaryResume {
        case .notSent: CheckpointEngine.resumeAll([secondary], one)
        case .sent: secondaryResume = .sent(waiting: answered)
        case .answered(let result): answered(result)
        }
    }

    /// Both run again (or the ones in `unresumed` could not be resumed).
    func bothResumed(unresumed: [DomainError]) {
        pauseEnd = clock.now
        if let first = unresumed.first {
            store.discard(generation)
            return completion(.failure(CheckpointError(
                step: "resume", first, generation: generation, lastGood: lastGood, unresumed: unresumed)))
        }
        let answered = resumed?(outcome(path: store.path(of: generation), durable: false)) ?? false
        commit(urgent: !answered)
    }

    /// 6. Make it the last good generation (after the resume: the fsync is not pause time).
    /// `urgent`: the caller waits for it.
    func commit(urgent: Bool) {
        guard let committer else {
            return committed(Result { () throws(GenerationStoreError) in try store.commit(generation) })
        }
        committer.commit(store, generation, urgent: urgent) { self.committed($0) }
    }

    func committed(_ result: Result<Generation, GenerationStoreError>) {
        switch result {
        case .failure(let error):
            store.discard(generation)
            completion(.failure(CheckpointError(
                step: "commit", domain: "", cause: error.description, errorClass: "StateDirError", command: nil,
                generation: generation, lastGood: lastGood, unresumed: [])))
        case .success(let generation):
            completion(.success(outcome(path: generation.path, durable: true)))
        }
    }

    func outcome(path: String, durable: Bool) -> CheckpointResult {
        CheckpointResult(
            generation: generation, path: path, bytes: bytes,
            pauseMilliseconds: CheckpointEngine.milliseconds(pauseEnd - pauseStart),
            saveMilliseconds: CheckpointEngine.milliseconds(saveEnd - saveStart),
            restoreMilliseconds: CheckpointEngine.milliseconds(restoreEnd - saveEnd),
            extra: ["durable": .bool(durable)])
    }

    func fail(_ step: String, _ error: DomainError) {
        finished = true
        // The save still queued behind a failed stop writes its file yet: removed (and its
        // slot given back) when its reply comes, which is before the primary's `cont`'s.
        if !saveInFlight { store.discard(generation) }
        resumeBoth { unresumed in
            self.completion(.failure(CheckpointError(
                step: step, error, generation: self.generation, lastGood: self.lastGood, unresumed: unresumed)))
        }
    }
}
