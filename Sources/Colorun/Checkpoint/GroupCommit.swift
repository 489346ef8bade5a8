import NIOCore
import NIOPosix

/// Commits the generations of a session's checkpoints in groups, off the event loop.
///
/// One group at a time is written on the blocking-I/O pool (`GenerationStore.commitAll`: one
/// `syncfs` for the bytes and one for the index records or renames, instead of two fsyncs per
/// checkpoint); the commits asked for meanwhile form the next group. A commit someone waits
/// for (`urgent`: a `colo.checkpoint` that returns when durable) starts a group at once, or
/// right after the group being written. A commit nobody waits for (a pipelined call answered
/// already) may wait up to `gatherWindow` for others to join it: with 100 pairs every 25 ms,
/// groups of one or two generations each cost two disk flushes, while a window of a few
/// milliseconds gathers a dozen or more into the same two.
/// A generation is reported committed only once its bytes and its record (or name) are on
/// disk. Completions run on the session's loop, one hop per group.
///
/// Loop-bound: `commit` is called on `eventLoop`, and all of the committer's state lives there.
final class GroupCommitter: @unchecked Sendable {
    private struct Job {
        let store: GenerationStore
        let number: Int
        let done: (Result<Generation, GenerationStoreError>) -> Void
    }

    /// How long a commit nobody waits for may wait for company.
    static let gatherWindow = TimeAmount.milliseconds(4)

    private let pool: NIOThreadPool
    private let eventLoop: any EventLoop
    private let window: TimeAmount
    private var waiting: [Job] = []
    /// When the oldest waiting job arrived.
    private var oldest = NIODeadline.distantFuture
    private var urgentWaiting = false
    /// A group is being written on the pool.
    private var writing = false
    private var timer: Scheduled<Void>?
    /// Groups written so far (read on the loop).
    private(set) var groupsWritten = 0

    init(pool: NIOThreadPool, eventLoop: any EventLoop, gatherWindow: TimeAmount = GroupCommitter.gatherWindow) {
        self.pool = pool
        self.eventLoop = eventLoop
        self.window = gatherWindow
    }

    /// Commits generation `number` of `store` with a group; `done` runs on the loop.
    /// `urgent`: a caller waits for it, so it does not wait for company.
    func commit(_ store: GenerationStore, _ number: Int, urgent: Bool = true,
                _ done: @escaping (Result<Generation, GenerationStoreError>) -> Void) {
        eventLoop.preconditionInEventLoop()
        if waiting.isEmpty { oldest = .now() }
        waiting.append(Job(store: store, number: number, done: done))
        urgentWaiting = urgentWaiting || urgent
        startGroupIfDue()
    }

    /// Starts writing the waiting jobs when nothing is being written and one is urgent or the
    /// oldest has waited out the window; else makes sure a timer comes back when it has.
    private func startGroupIfDue() {
        guard !writing, !waiting.isEmpty else { return }
        let due = oldest + window
        guard urgentWaiting || due <= .now() else {
            if timer == nil {
                timer = eventLoop.scheduleTask(deadline: due) { [self] in
                    timer = nil
                    startGroupIfDue()
                }
            }
            return
        }
        timer?.cancel()
        timer = nil
        let group = waiting
        waiting = []
        urgentWaiting = false
        oldest = .distantFuture
        writing = true
        groupsWritten += 1
        let jobs = UncheckedSendable(group)
        pool.submit { [self] state in
            let results: [Result<Generation, GenerationStoreError>]
            if case .active = state {
                results = GenerationStore.commitAll(jobs.value.map { (store: $0.store, number: $0.number) })
            } else {
                let error = GenerationStoreError(path: "", reason: "the I/O thread pool is shut down")
                results = Array(repeating: .failure(error), count: jobs.value.count)
            }
            let outcome = UncheckedSendable(results)
            eventLoop.execute { [self] in
                writing = false
                for (job, result) in zip(jobs.value, outcome.value) { job.done(result) }
                startGroupIfDue()
            }
        }
    }
}
