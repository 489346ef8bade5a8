import NIOCore
import NIOPosix
import Synchronization

/// Commits the generations of a session's checkpoints in groups, off the event loop.
///
/// A commit asked for while a group is being written waits for the next group, which takes
/// everything that arrived meanwhile: with 100 pairs checkpointing 40 times a second, one
/// thread of the blocking-I/O pool makes each group durable with one journal commit for the
/// files and one for the renames (`GenerationStore.commitAll`) instead of two per checkpoint.
/// A generation is reported committed only once its file, name and directory are on disk.
/// Completions run on the session's loop, one hop per group.
final class GroupCommitter: Sendable {
    private struct Job {
        let store: GenerationStore
        let number: Int
        let done: (Result<Generation, GenerationStoreError>) -> Void
    }

    private struct Queue {
        var jobs: [Job] = []
        var draining = false
    }

    private let pool: NIOThreadPool
    private let eventLoop: any EventLoop
    private let queue = Mutex<UncheckedSendable<Queue>>(UncheckedSendable(Queue()))

    init(pool: NIOThreadPool, eventLoop: any EventLoop) {
        self.pool = pool
        self.eventLoop = eventLoop
    }

    /// Commits generation `number` of `store` with the next group; `done` runs on the loop.
    func commit(_ store: GenerationStore, _ number: Int, _ done: @escaping (Result<Generation, GenerationStoreError>) -> Void) {
        let job = UncheckedSendable(Job(store: store, number: number, done: done))
        let start = queue.withLock { queue -> Bool in
            queue.value.jobs.append(job.value)
            guard !queue.value.draining else { return false }
            queue.value.draining = true
            return true
        }
        guard start else { return }
        pool.submit { [self] state in
            guard case .active = state else {
                let jobs = takeAll(stopDraining: true)
                let error = GenerationStoreError(path: "", reason: "the I/O thread pool is shut down")
                deliver(jobs.value.map { ($0, .failure(error)) })
                return
            }
            drain()
        }
    }

    /// On the pool: commits groups until none is waiting.
    private func drain() {
        while true {
            let jobs = takeAll(stopDraining: false)
            if jobs.value.isEmpty { return }
            let results = GenerationStore.commitAll(jobs.value.map { ($0.store, $0.number) })
            deliver(Array(zip(jobs.value, results)))
        }
    }

    /// Takes the waiting jobs; when there are none, the drain ends (under the same lock, so a
    /// job added later starts a new drain).
    private func takeAll(stopDraining: Bool) -> UncheckedSendable<[Job]> {
        queue.withLock { queue in
            let jobs = queue.value.jobs
            queue.value.jobs = []
            if jobs.isEmpty || stopDraining { queue.value.draining = false }
            return UncheckedSendable(jobs)
        }
    }

    private func deliver(_ outcomes: [(Job, Result<Generation, GenerationStoreError>)]) {
        guard !outcomes.isEmpty else { return }
        let box = UncheckedSendable(outcomes)
        eventLoop.execute {
            for (job, result) in box.value { job.done(result) }
        }
    }
}
