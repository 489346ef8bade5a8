import LuaRuntime
import NIOCore

/// `policy.every` and `policy.after`: runs a Lua function as a new task on a schedule.
///
/// Ticks of `every` are on a fixed grid (start + k × interval), so lateness does not
/// accumulate. A tick that comes while the previous run is still going is skipped and
/// counted (logged once), so runs never overlap. The timer holds the run open until it is
/// cancelled (or, for `after`, has fired).
final class PolicyTimer: PolicyHandle {
    let id: Int
    let interval: TimeAmount?
    let delay: TimeAmount
    let function: LuaRef
    let name: String
    unowned let session: PolicySession
    private var hold: LuaRunHold?
    private var scheduled: Scheduled<Void>?
    private var running: LuaTask?
    private var start = NIODeadline.now()
    private var tick: Int64 = 0
    private(set) var skipped = 0
    private(set) var runs = 0

    init(id: Int, session: PolicySession, delay: TimeAmount, interval: TimeAmount?, function: LuaRef, name: String) {
        self.id = id
        self.session = session
        self.delay = delay
        self.interval = interval
        self.function = function
        self.name = name
    }

    func arm() {
        hold = session.runtime.holdRun()
        start = NIODeadline.now() + delay
        schedule(at: start)
    }

    private func schedule(at deadline: NIODeadline) {
        scheduled = session.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in fire() }
    }

    private func fire() {
        guard hold != nil, !session.stopping else { return }
        if let running, !running.isFinished {
            skipped += 1
            session.report.skippedTicks += 1
            if skipped == 1 {
                session.logger.warning("\(name): a tick came while the previous run was still going; skipping it (logged once, counted in the summary)")
            }
        } else {
            runs += 1
            running = try? session.runtime.spawn(function, arguments: [], name: name)
        }
        guard let interval else {
            cancel()
            return
        }
        tick += 1
        var next = start + TimeAmount.nanoseconds(interval.nanoseconds * tick)
        let now = NIODeadline.now()
        if next < now {
            // Far behind (a long stall): skip the missed grid points instead of bursting.
            let missed = (now - start).nanoseconds / max(interval.nanoseconds, 1)
            tick = missed + 1
            next = start + TimeAmount.nanoseconds(interval.nanoseconds * tick)
        }
        schedule(at: next)
    }

    func cancel() {
        scheduled?.cancel()
        scheduled = nil
        if let hold {
            self.hold = nil
            hold.release()
        }
        session.handles[id] = nil
    }
}
