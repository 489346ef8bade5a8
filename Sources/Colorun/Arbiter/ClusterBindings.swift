import Etcd
import JSON
import LuaRuntime
import NIOCore

/// `cluster.on_fenced(fn)`: runs `fn(reason)` in a task of its own each time this node is fenced.
final class FenceHandler: PolicyHandle {
    let id: Int
    let function: LuaRef
    unowned let session: PolicySession

    init(id: Int, function: LuaRef, session: PolicySession) {
        self.id = id
        self.function = function
        self.session = session
    }

    func cancel() {
        session.handles[id] = nil
    }
}

/// The `cluster` module's host half and the session's side of the arbiter: guarded domains,
/// fencing them, gating promotions and checkpoints.
extension PolicySession {
    /// Creates the arbiter when the run has one (`--etcd`). Called by `init`.
    func startArbiter() throws(PolicyError) {
        guard let arbiterOptions = options.arbiter else { return }
        let arbiter: Arbiter
        do {
            arbiter = try Arbiter(options: arbiterOptions, eventLoop: eventLoop, logger: logger, metrics: options.domainOptions.metrics)
        } catch {
            throw .usage("--etcd: \(error)")
        }
        arbiter.onFence = { [unowned self] reason in
            let paused = fenceGuarded(reason)
            for case let handler as FenceHandler in handles.sorted(by: { $0.key < $1.key }).map(\.value) {
                _ = try? runtime.spawn(handler.function, arguments: [.string(reason)], name: "cluster.on_fenced")
            }
            return paused
        }
        arbiter.onWin = { [unowned self] in
            for name in guarded { domains[name]?.unfence() }
            // The other node may have written generations meanwhile: open the stores again.
            stores.removeAll()
        }
        self.arbiter = arbiter
        arbiter.start()
        logger.info("arbiter: etcd \(arbiterOptions.endpoints.joined(separator: ",")), key \(arbiterOptions.key), ttl \(arbiterOptions.ttlSeconds) s",
                    metadata: ["node": .string(arbiterOptions.node)])
    }

    /// Pauses every guarded domain for a fence; true when each is paused (or its QEMU gone).
    func fenceGuarded(_ reason: String) -> EventLoopFuture<Bool> {
        let timeout = options.arbiter?.margin ?? .seconds(1)
        var futures: [EventLoopFuture<Bool>] = []
        for name in domainOrder where guarded.contains(name) {
            guard let domain = domains[name] else { continue }
            let promise = eventLoop.makePromise(of: Bool.self)
            domain.fence(reason: reason, timeout: timeout) { [self] result in
                switch result {
                case .success:
                    logger.warning("fenced: domain paused", metadata: ["domain": .string(name)])
                    promise.succeed(true)
                case .failure(let error):
                    logger.critical("fence: could NOT pause a guarded domain: \(error)", metadata: ["domain": .string(name)])
                    promise.succeed(false)
                }
            }
            futures.append(promise.futureResult)
        }
        return EventLoopFuture.whenAllComplete(futures, on: eventLoop).map { results in
            results.allSatisfy { (try? $0.get()) == true }
        }
    }

    /// Refuses `what` (a checkpoint) unless this node holds the key, when there is an arbiter.
    func requireHolding(_ what: String) throws {
        guard let arbiter, !arbiter.isHolding, arbiter.overrideReason == nil else { return }
        let why = arbiter.fencedReason.map { "fenced: \($0)" } ?? "call cluster.acquire() first"
        throw LuaHostError.structured(
            ["class": "NotHolder", "desc": .string("this node does not hold \(arbiter.options.key) (\(why))"), "step": "start"],
            message: "\(what): this node does not hold the arbiter's key \(arbiter.options.key) (\(why))")
    }

    /// The fencing token while this node holds the key (for manifests and site hooks).
    var fencingToken: Int64? { arbiter?.token ?? options.fencing?.token }

    func clusterFunctions() -> [String: LuaHostFunction] {
        [
            "cluster_info": .sync { [unowned self] call in
                if arbiter == nil, let refusal = options.domainOptions.refuseConnections {
                    // `colorun check`: the first cluster call ends the dry run, like a VM access.
                    throw LuaHostError.message("cluster: \(refusal) (nor etcd)")
                }
                guard let arbiter else {
                    call.push(json: ["enabled": false])
                    return
                }
                var info: [String: JSONValue] = [
                    "enabled": true, "node": .string(arbiter.options.node), "pair": .string(arbiter.options.pair),
                    "key": .string(arbiter.options.key), "ttl": .int(arbiter.options.ttlSeconds),
                    "holding": .bool(arbiter.isHolding), "lease": .int(arbiter.lease),
                    "guarded": .array(domainOrder.filter { guarded.contains($0) }.map { .string($0) }),
                ]
                if let token = arbiter.token { info["token"] = .int(token) }
                if let reason = arbiter.fencedReason { info["fenced"] = .string(reason) }
                if let reason = arbiter.overrideReason { info["override"] = .string(reason) }
                call.push(json: .object(info))
            },
            "cluster_acquire": .async { [unowned self] call, completion in
                let arbiter = try requireArbiter("cluster.acquire")
                // wait: nil/false one try; true until won; a duration until won or that long.
                var waits = false
                var limit: TimeAmount?
                switch call.type(1) {
                case .none, .nil: break
                case .boolean: waits = call.boolean(1)
                default:
                    waits = true
                    limit = try call.duration(1).timeAmount
                }
                let answer: @Sendable (Arbiter.Attempt) -> [LuaValue] = { attempt in
                    switch attempt {
                    case .won(let token): return [.bool(true), .integer(token)]
                    case .held(let holder, _): return [.bool(false), .json(Self.holderTable(holder))]
                    }
                }
                guard waits else {
                    arbiter.tryAcquire().whenComplete { result in
                        switch result {
                        case .success(let attempt): completion.succeed(answer(attempt))
                        case .failure(let error): completion.fail(LuaHostError.message("cluster.acquire: \(error)"))
                        }
                    }
                    return
                }
                let deadline = limit.map { NIODeadline.now() + $0 }
                let loop = eventLoop
                let task = Task {
                    let token = await arbiter.waitToWin(until: deadline)
                    loop.execute {
                        guard !completion.isCancelled else { return }
                        if let token {
                            completion.succeed([.bool(true), .integer(token)])
                        } else {
                            arbiter.tryAcquire().whenComplete { result in
                                switch result {
                                case .success(let attempt): completion.succeed(answer(attempt))
                                case .failure(let error): completion.fail(LuaHostError.message("cluster.acquire: \(error)"))
                                }
                            }
                        }
                    }
                }
                completion.onCancel { task.cancel() }
            },
            "cluster_holder": .async { [unowned self] call, completion in
                let arbiter = try requireArbiter("cluster.holder")
                let pair = try call.optionalString(1) ?? arbiter.options.pair
                guard ArbiterOptions.isValidName(pair) else { throw call.argumentError(1, "pair name expected (letters, digits, '-', '_', '.')") }
                let loop = eventLoop
                Task {
                    do {
                        let holder = try await arbiter.holder(pair: pair)
                        loop.execute { completion.succeed([holder.map { .json(Self.holderTable($0)) } ?? .nil]) }
                    } catch {
                        loop.execute { completion.fail(LuaHostError.message("cluster.holder: \(error)")) }
                    }
                }
            },
            "cluster_guard": .sync { [unowned self] call in
                let arbiter = try requireArbiter("cluster.guard")
                let domain = try domain(named: try call.string(1))
                guarded.insert(domain.name)
                if !arbiter.isHolding, arbiter.fencedReason != nil {
                    // Guarding a domain on a fenced node fences it now.
                    let reason = arbiter.fencedReason ?? "fenced"
                    domain.fence(reason: reason, timeout: arbiter.options.margin) { _ in }
                }
            },
            "cluster_on_fenced": .sync { [unowned self] call in
                _ = try requireArbiter("cluster.on_fenced")
                let handler = FenceHandler(id: makeHandleID(), function: try call.function(1), session: self)
                handles[handler.id] = handler
                call.push(Int64(handler.id))
            },
            "cluster_release": .async { [unowned self] _, completion in
                let arbiter = try requireArbiter("cluster.release")
                guard arbiter.isHolding else {
                    completion.succeed([.bool(false)])
                    return
                }
                arbiter.fence("released by the policy (cluster.release)")
                completion.succeed([.bool(true)])
            },
            "cluster_override": .sync { [unowned self] call in
                let arbiter = try requireArbiter("cluster.override")
                let reason = try call.string(1)
                guard !reason.isEmpty else { throw call.argumentError(1, "say why (the reason is logged with every promotion it lets through)") }
                arbiter.overrideReason = reason
                logger.critical("ARBITER OVERRIDE set at \(call.callerPosition): promotions and checkpoints no longer wait for the key: \(reason)")
            },
            "cluster_gate": .async { [unowned self] call, completion in
                let what = try call.string(1)
                let position = call.callerPosition
                guard let arbiter else {
                    completion.succeed([])
                    return
                }
                if let reason = arbiter.overrideReason {
                    logger.critical("ARBITER OVERRIDE: \(what) at \(position) promotes WITHOUT checking the key: \(reason)",
                                    metadata: ["what": .string(what)])
                    completion.succeed([])
                    return
                }
                let loop = eventLoop
                let confirm: () -> Void = {
                    arbiter.confirmPromotion(what).whenComplete { result in
                        switch result {
                        case .success(let token): completion.succeed([.integer(token)])
                        case .failure(let error): completion.fail(LuaHostError.structured(
                            ["class": "NotHolder", "desc": .string("\(error)"), "step": "promote"], message: "\(what): \(error)"))
                        }
                    }
                }
                if arbiter.isHolding {
                    confirm()
                    return
                }
                logger.notice("\(what) at \(position) waits until this node wins \(arbiter.options.key)")
                let confirmBox = UncheckedSendable(confirm)
                let task = Task {
                    let token = await arbiter.waitToWin(until: nil)
                    loop.execute {
                        guard !completion.isCancelled else { return }
                        guard token != nil else {
                            completion.fail(LuaHostError.message("\(what): the run ended before this node won the key"))
                            return
                        }
                        confirmBox.value()
                    }
                }
                completion.onCancel { task.cancel() }
            },
        ]
    }

    private func requireArbiter(_ function: String) throws -> Arbiter {
        if arbiter == nil, let refusal = options.domainOptions.refuseConnections {
            throw LuaHostError.message("\(function): \(refusal) (nor etcd)")
        }
        guard let arbiter else {
            throw LuaHostError.message("\(function): no arbiter: start colorun with --etcd URL --node NAME")
        }
        return arbiter
    }

    static func holderTable(_ holder: EtcdKeyValue) -> JSONValue {
        ["node": .string(holder.value), "token": .int(holder.createRevision), "lease": .int(holder.lease)]
    }
}

/// The Lua half of the `cluster` module (appended to the colorun prelude: it shares `raw`).
let clusterPrelude = #"""
-- cluster.* -----------------------------------------------------------------------------
cluster.enabled = function() return raw.cluster_info().enabled end
cluster.status = function() return raw.cluster_info() end
cluster.node = function() return raw.cluster_info().node end
cluster.pair = function() return raw.cluster_info().pair end
cluster.is_primary = function() return raw.cluster_info().holding == true end
cluster.token = function() return raw.cluster_info().token end
cluster.acquire = function(opts)
  opts = opt_table(opts, "cluster.acquire", 1)
  return raw.cluster_acquire(opts.wait)
end
cluster.holder = function(pair)
  if pair ~= nil and type(pair) ~= "string" then
    error("bad argument #1 to 'cluster.holder' (pair name expected, got " .. type(pair) .. ")", 2)
  end
  return raw.cluster_holder(pair)
end
cluster.guard = function(d) raw.cluster_guard(name_of(d, "cluster.guard")) end
cluster.on_fenced = function(fn)
  if type(fn) ~= "function" then error("bad argument #1 to 'cluster.on_fenced' (function expected, got " .. type(fn) .. ")", 2) end
  local id = raw.cluster_on_fenced(fn)
  return { cancel = function() raw.cancel(id) end }
end
cluster.release = function() return raw.cluster_release() end
cluster.override = function(reason)
  if type(reason) ~= "string" then error("bad argument #1 to 'cluster.override' (reason expected, got " .. type(reason) .. ")", 2) end
  raw.cluster_override(reason)
end
"""#
