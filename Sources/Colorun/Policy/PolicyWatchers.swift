import JSON
import LuaRuntime
import NIOCore
import QMP

/// Something Lua holds by id and may cancel: a timer, an event subscription, a watch.
protocol PolicyHandle: AnyObject {
    func cancel()
}

/// `d:on(event, fn)`: a task per matching QMP event. Holds the run open until cancelled.
final class EventSubscription: PolicyHandle {
    let id: Int
    let domain: Domain
    var handlerID: Int?
    var hold: LuaRunHold?
    unowned let session: PolicySession

    init(id: Int, domain: Domain, session: PolicySession) {
        self.id = id
        self.domain = domain
        self.session = session
    }

    func cancel() {
        if let handlerID { domain.removeHandler(handlerID) }
        handlerID = nil
        hold?.release()
        hold = nil
        session.handles[id] = nil
    }
}

/// `policy.on_lost(d, fn, {heartbeat=, timeout=})`: fires once, when the domain's monitor
/// connection drops or a heartbeat (`query-status`) goes unanswered for `timeout`.
final class LostWatch: PolicyHandle {
    let id: Int
    let domain: Domain
    let function: LuaRef
    let heartbeat: TimeAmount
    let timeout: TimeAmount
    unowned let session: PolicySession
    private var hold: LuaRunHold?
    private var closeHandlerID: Int?
    private var beat: Scheduled<Void>?
    private var beatOutstanding = false
    private var fired = false

    init(id: Int, session: PolicySession, domain: Domain, function: LuaRef, heartbeat: TimeAmount, timeout: TimeAmount) {
        self.id = id
        self.session = session
        self.domain = domain
        self.function = function
        self.heartbeat = heartbeat
        self.timeout = timeout
    }

    func arm() {
        hold = session.runtime.holdRun()
        closeHandlerID = domain.onClose { [weak self] reason in self?.fire("monitor connection lost: \(reason)") }
        // Open the connection now, so a drop is seen even before the first command.
        probe()
        scheduleBeat()
    }

    private func scheduleBeat() {
        beat = session.eventLoop.assumeIsolated().scheduleTask(in: heartbeat) { [weak self] in
            guard let self, !fired else { return }
            probe()
            scheduleBeat()
        }
    }

    private func probe() {
        guard !fired, !beatOutstanding else { return }
        beatOutstanding = true
        do {
            let d = domain
            d.send("query-status", nil, timeout: timeout) { [weak self] result in
                guard let self else { return }
                beatOutstanding = false
                if case .failure(let error) = result,
                    [DomainError.timeout, DomainError.disconnected, DomainError.connectFailed, DomainError.protocolError].contains(error.errorClass)
                {
                    fire("heartbeat failed: \(error.errorClass): \(error.desc)")
                }
            }
        }
    }

    private func fire(_ reason: String) {
        guard !fired, !session.stopping else { return }
        fired = true
        session.logger.warning("domain lost", metadata: ["domain": .string(domain.name), "reason": .string(reason)])
        _ = try? session.runtime.spawn(function, arguments: [.string(reason)], name: "on_lost \(domain.name)")
        cancel()
    }

    func cancel() {
        beat?.cancel()
        beat = nil
        if let closeHandlerID { domain.removeHandler(closeHandlerID) }
        closeHandlerID = nil
        hold?.release()
        hold = nil
        session.handles[id] = nil
    }
}

extension PolicySession {
    func makeHandleID() -> Int {
        defer { nextHandleID += 1 }
        return nextHandleID
    }

    func addTimer(delay: TimeAmount, interval: TimeAmount?, function: LuaRef, name: String) throws -> Int {
        guard !stopping else { throw LuaHostError.message("the run is stopping: no new timer") }
        let timer = PolicyTimer(id: makeHandleID(), session: self, delay: delay, interval: interval, function: function, name: name)
        handles[timer.id] = timer
        timer.arm()
        return timer.id
    }

    func subscribe(_ domain: Domain, event: String, function: LuaRef) -> Int {
        let subscription = EventSubscription(id: makeHandleID(), domain: domain, session: self)
        let task = "on \(event) \(domain.name)"
        subscription.handlerID = domain.onEvent(event) { [unowned self] qmpEvent in
            guard !stopping else { return }
            let table: JSONValue = [
                "event": .string(qmpEvent.name), "data": qmpEvent.data,
                "timestamp": .double(qmpEvent.timestamp), "domain": .string(domain.name),
            ]
            _ = try? runtime.spawn(function, arguments: [.json(table)], name: task)
        }
        // Events flow only over an open connection: open it now.
        domain.withConnection { _ in }
        subscription.hold = runtime.holdRun()
        handles[subscription.id] = subscription
        return subscription.id
    }

    func watchLost(_ domain: Domain, function: LuaRef, heartbeat: TimeAmount, timeout: TimeAmount) -> Int {
        let watch = LostWatch(id: makeHandleID(), session: self, domain: domain, function: function, heartbeat: heartbeat, timeout: timeout)
        handles[watch.id] = watch
        watch.arm()
        return watch.id
    }

    func cancelHandle(_ id: Int) {
        handles[id]?.cancel()
    }
}
