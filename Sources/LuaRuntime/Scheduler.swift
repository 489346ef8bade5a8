import CLua
import CLuaShims
import NIOCore

/// How a task ended.
public enum LuaTaskOutcome: Sendable {
    case success
    case failure(LuaTaskFailure)
    /// Killed by `stop()`, `cancel()` or the end of the run; never resumed again.
    case cancelled
}

/// A coroutine task: the main chunk, a callback, or a `task.spawn`ed function.
public final class LuaTask: @unchecked Sendable {
    public let id: Int
    public let name: String
    /// Set once the task has ended.
    public internal(set) var outcome: LuaTaskOutcome?

    enum State { case queued, running, waiting, done }

    var thread: OpaquePointer?
    var threadRef: Int32 = LUA_NOREF
    var state: State = .queued
    var initialArguments: Int32 = 0
    /// An async host request is outstanding.
    var waiting = false
    var token: UInt64 = 0
    var pendingResult: Result<[LuaValue], LuaHostError>?
    /// The next resume passes `pendingResult` (a host call's result); else no values.
    var resumeWithResult = false
    var cancelHandlers: [() -> Void] = []
    var sliceStart: Int64 = 0
    /// A task.all child: its error goes to the joiner, not to the uncaught-error policy.
    var joined = false
    var handlesErrors = false
    var keepResults = false
    /// Packed results ({n=..., ...}) or the error value, for joiners.
    var resultRef: LuaRef?
    var joinWaiters: [(LuaTask) -> Void] = []
    var children: [LuaTask] = []
    var onFinish: ((LuaTaskOutcome) -> Void)?

    init(id: Int, name: String) {
        self.id = id
        self.name = name
    }

    public var isFinished: Bool { state == .done }
}

/// Completes one async host call. Call `succeed` or `fail` once, on any thread (it hops to
/// the runtime's loop); the coroutine is resumed exactly once, and completions for a task
/// that was cancelled or killed meanwhile are ignored.
public final class LuaCompletion: @unchecked Sendable {
    unowned let runtime: LuaRuntime
    let task: LuaTask
    let token: UInt64

    init(runtime: LuaRuntime, task: LuaTask, token: UInt64) {
        self.runtime = runtime
        self.task = task
        self.token = token
    }

    public var eventLoop: any EventLoop { runtime.eventLoop }

    /// The task that made the call.
    public var taskName: String { task.name }

    /// True once the task no longer waits for this completion (killed, stopped, completed).
    public var isCancelled: Bool { task.state == .done || task.token != token || !task.waiting }

    /// Resumes the task with these return values.
    public func succeed(_ values: [LuaValue] = []) { complete(.success(values)) }

    /// Resumes the task raising `error` (a `LuaHostError` keeps its fields; any other error
    /// becomes a plain message) at the Lua line that made the call.
    public func fail(_ error: any Error) { complete(.failure(LuaHostError(error))) }

    public func complete(_ result: Result<[LuaValue], LuaHostError>) {
        if runtime.eventLoop.inEventLoop {
            runtime.deliver(result, to: task, token: token)
        } else {
            let box = UncheckedBox(result)
            runtime.eventLoop.execute { self.runtime.deliver(box.value, to: self.task, token: self.token) }
        }
    }

    /// Completes the call as `complete` does, but when no Lua code runs at this moment the
    /// task is resumed before this returns, not at the loop's next turn (OpenResty's cosocket
    /// model: the reply's handler runs the coroutine). For a result read from the network as
    /// the last step of its handler, such as a QMP reply: the task's next command goes out in
    /// the same turn of the loop, without a trip through the loop's task queue.
    ///
    /// The resumed code may call any host function, close the connection the result came
    /// from or end the run: call this only where nothing after it can be disturbed by that.
    /// Off the loop, or while a task runs (a host function completing at once), it is
    /// `complete`.
    public func completeNow(_ result: Result<[LuaValue], LuaHostError>) {
        guard runtime.eventLoop.inEventLoop else { return complete(result) }
        runtime.deliver(result, to: task, token: token, resumeNow: true)
    }

    /// Runs `body` on the loop if the task is killed or the run stops before completion
    /// (cancel a timer, kill a process...). Call on the loop.
    public func onCancel(_ body: @escaping () -> Void) {
        if task.token == token && task.waiting { task.cancelHandlers.append(body) }
    }
}

struct UncheckedBox<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}

/// Keeps a run alive (e.g. while a repeating timer is armed); `release()` it when done.
public final class LuaRunHold: @unchecked Sendable {
    unowned let runtime: LuaRuntime
    var released = false
    init(runtime: LuaRuntime) { self.runtime = runtime }

    /// Ends the hold; the run completes once no task and no hold remains. Call on the loop.
    public func release() {
        guard !released else { return }
        released = true
        runtime.holds -= 1
        runtime.checkRunComplete()
    }
}

extension LuaRuntime {
    // MARK: async host calls

    func startAsync(_ call: inout LuaCall, _ body: (inout LuaCall, LuaCompletion) throws -> Void) -> Int32 {
        let S = call.state
        guard let task = currentTask, runState == .running else {
            pushError(.message("\(call.functionName) can only be called from a running policy task"), on: S, positionFrom: S)
            return CLUA_RAISE
        }
        guard lua_isyieldable(S) != 0 else {
            pushError(
                .message("\(call.functionName) cannot wait here: this code cannot yield (a table.sort comparator, a string.gsub callback, a __tostring or other metamethod called from C); call it from ordinary policy code"),
                on: S, positionFrom: S)
            return CLUA_RAISE
        }
        task.token &+= 1
        task.waiting = true
        task.pendingResult = nil
        ctx.pointee.pending = 1
        let completion = LuaCompletion(runtime: self, task: task, token: task.token)
        do {
            try body(&call, completion)
        } catch {
            abandonRequest(task)
            pushError(LuaHostError(error), on: S, positionFrom: S)
            return CLUA_RAISE
        }
        return 0
    }

    /// Drops the outstanding host request of a running task (its completion is ignored).
    func abandonRequest(_ task: LuaTask) {
        task.waiting = false
        task.token &+= 1
        task.pendingResult = nil
        ctx.pointee.pending = 0
        let handlers = task.cancelHandlers
        task.cancelHandlers = []
        for h in handlers { h() }
    }

    func deliver(_ result: Result<[LuaValue], LuaHostError>, to task: LuaTask, token: UInt64, resumeNow: Bool = false) {
        assertOnLoop()
        guard task.state != .done, task.token == token, task.waiting, task.pendingResult == nil else { return }
        task.pendingResult = result
        task.cancelHandlers.removeAll()
        if task.state == .waiting {
            if resumeNow && currentTask == nil && synchronousCalls == 0 && runState == .running {
                // Not queued: resumed here (LuaCompletion.completeNow). References dropped on
                // other threads are freed as a drain would, so a task that only ever resumes
                // this way does not hold them until some other task is queued.
                owner.drainUnrefs()
                task.resumeWithResult = true
                resume(task)
            } else {
                enqueue(task, withResult: true)
            }
        }
        // else: still running (completed synchronously) or queued after a forced yield; the
        // result is taken when the task yields for it.
    }

    // MARK: spawning

    /// Spawns a task running `function(arguments...)`. `onFinish` is told how it ended. With
    /// `handlesErrors`, an error goes only to `onFinish` (not to the uncaught-error policy).
    @discardableResult
    public func spawn(_ function: LuaRef, arguments: [LuaValue] = [], name: String = "task",
                      handlesErrors: Bool = false, onFinish: ((LuaTaskOutcome) -> Void)? = nil) throws -> LuaTask {
        assertOnLoop()
        guard runState == .running else { throw LuaHostError.message("the run has ended; cannot spawn \(name)") }
        function.push(L)
        let task = spawnTask(functionOn: L, name: name, pushArguments: { co in
            for a in arguments { self.push(a, on: co) }
            return Int32(arguments.count)
        })
        task.handlesErrors = handlesErrors
        task.onFinish = onFinish
        return task
    }

    /// Creates a task from the function on top of `S` (popped); `pushArguments` pushes its
    /// arguments onto the new coroutine and returns their count.
    func spawnTask(functionOn S: OpaquePointer, name: String, pushArguments: (OpaquePointer) -> Int32) -> LuaTask {
        let task = LuaTask(id: nextTaskID, name: name)
        nextTaskID += 1
        let co = lua_newthread(S)!
        task.threadRef = luaL_ref(S, clua_registryindex())
        task.thread = co
        lua_xmove(S, co, 1)
        task.initialArguments = pushArguments(co)
        tasks[task.id] = task
        enqueue(task, withResult: false)
        return task
    }

    // MARK: the scheduler

    func enqueue(_ task: LuaTask, withResult: Bool) {
        task.state = .queued
        task.resumeWithResult = withResult
        readyQueue.append(task)
        if !drainScheduled {
            drainScheduled = true
            eventLoop.execute { self.drain() }
        }
    }

    /// Resumes every task that was ready when the drain started; tasks that become ready
    /// meanwhile wait for the next drain, so timers and I/O run in between.
    func drain() {
        drainScheduled = false
        owner.drainUnrefs()
        swap(&readyQueue, &drainBuffer)
        for task in drainBuffer where task.state == .queued {
            resume(task)
        }
        drainBuffer.removeAll(keepingCapacity: true)
    }

    /// Runs `task` until it next yields, waits, ends or fails: one slice.
    func resume(_ task: LuaTask) {
        guard let co = task.thread, runState == .running else { return }
        task.state = .running
        let nargs = pushResumeArguments(task, on: co)
        let (status, nres) = runSlice(task, co, nargs)
        if task.state == .done {
            releaseCancelledThread(task)
            return
        }
        if let whereText = takeKill() {
            let seconds = Double(options.timeLimit.nanoseconds) / 1e9
            fail(task, message: "\(whereText) time limit exceeded (\(seconds) s)", co: co)
            return
        }
        switch status {
        case LUA_YIELD: suspended(task, co, results: nres)
        case LUA_OK: returned(task, co, results: nres)
        default: raised(task, co, status: status)
        }
    }

    /// Pushes what `task` is resumed with: its initial arguments (first run), or the host
    /// result it waited for as `true, values...` or `false, error` (the prelude's `finish`).
    /// Returns the argument count.
    private func pushResumeArguments(_ task: LuaTask, on co: OpaquePointer) -> Int32 {
        var nargs: Int32 = task.initialArguments
        task.initialArguments = 0
        guard task.resumeWithResult else { return nargs }
        task.resumeWithResult = false
        task.waiting = false
        task.sliceStart = 0
        let result = task.pendingResult
        task.pendingResult = nil
        _ = lua_checkstack(co, 4)
        switch result {
        case .success(let values)?:
            lua_pushboolean(co, 1)
            _ = lua_checkstack(co, Int32(values.count) + 2)
            for v in values { push(v, on: co) }
            nargs = Int32(values.count) + 1
        case .failure(let error)?:
            lua_pushboolean(co, 0)
            pushError(error, on: co, positionFrom: co)
            nargs = 2
        case nil:
            nargs = 0
        }
        return nargs
    }

    /// `lua_resume` with the slice's deadline armed (the slice starts when the task is
    /// started or resumed with a host result); returns the status and the result count.
    private func runSlice(_ task: LuaTask, _ co: OpaquePointer, _ nargs: Int32) -> (status: Int32, results: Int32) {
        let now = clua_monotonic_ns()
        if task.sliceStart == 0 { task.sliceStart = now }
        ctx.pointee.deadline_ns = task.sliceStart + options.timeLimit.nanoseconds
        currentTask = task
        var nres: Int32 = 0
        let status = clua_resume(co, L, nargs, &nres)
        currentTask = nil
        ctx.pointee.deadline_ns = 0
        return (status, nres)
    }

    /// A task cancelled while it ran (stop() or cancel() from a host function): clears the
    /// hook's flags and lets its thread go.
    private func releaseCancelledThread(_ task: LuaTask) {
        let c = ctx
        c.pointee.killed = 0
        c.pointee.forced_yield = 0
        c.pointee.pending = 0
        if task.threadRef != LUA_NOREF {
            luaL_unref(L, clua_registryindex(), task.threadRef)
            task.threadRef = LUA_NOREF
        }
        task.thread = nil
    }

    /// If the count hook killed the slice (time limit), clears the flags and returns where
    /// the task was (`file:line:`); nil otherwise.
    private func takeKill() -> String? {
        let c = ctx
        guard c.pointee.killed != 0 else { return nil }
        c.pointee.killed = 0
        c.pointee.forced_yield = 0
        c.pointee.pending = 0
        return withUnsafeBytes(of: &c.pointee.kill_where) { b in
            String(decoding: b.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
    }

    /// The task yielded: a forced yield (the instruction slice) or a bare `coroutine.yield()`
    /// queues it again; a host call leaves it waiting, unless its result is already there.
    private func suspended(_ task: LuaTask, _ co: OpaquePointer, results nres: Int32) {
        let c = ctx
        lua_settop(co, lua_gettop(co) - nres)
        c.pointee.pending = 0
        if c.pointee.forced_yield != 0 {
            c.pointee.forced_yield = 0
            enqueue(task, withResult: false)
        } else if task.waiting {
            if task.pendingResult != nil {
                enqueue(task, withResult: true)
            } else {
                task.state = .waiting
            }
        } else {
            enqueue(task, withResult: false)  // a bare coroutine.yield(): resumed soon
        }
    }

    /// The task's function returned: keeps its results (as `{n=, ...}`) if asked, and
    /// finishes it.
    private func returned(_ task: LuaTask, _ co: OpaquePointer, results nres: Int32) {
        if task.keepResults {
            lua_createtable(L, nres, 1)
            lua_xmove(co, L, nres)
            var i = nres
            while i > 0 {
                lua_rawseti(L, -(i + 1), lua_Integer(i))
                i -= 1
            }
            lua_pushinteger(L, lua_Integer(nres))
            clua_rawsetfield(L, -2, "n")
            task.resultRef = makeRef(L, -1)
            clua_pop(L, 1)
        }
        finish(task, .success)
    }

    /// The task raised an error: keeps the error value if asked, and fails the task.
    private func raised(_ task: LuaTask, _ co: OpaquePointer, status: Int32) {
        lua_xmove(co, L, 1)
        var message = describeError(at: -1)
        if status == LUA_ERRMEM {
            // Lua's "not enough memory" carries no position: name the line that allocated.
            clua_pushwhere_from(co, 0, L)
            message = (String(lua: L, at: -1) ?? "") + message
            clua_pop(L, 1)
        }
        if task.keepResults { task.resultRef = makeRef(L, -1) }
        clua_pop(L, 1)
        fail(task, message: message, co: co, errorRefSet: true)
    }

    /// tostring() of the error value at `idx` of the main thread; a user `__tostring` runs
    /// under pcall with the time limit armed, so it can neither raise through us nor hang.
    func describeError(at idx: Int32) -> String {
        let c = ctx
        let savedDeadline = c.pointee.deadline_ns
        c.pointee.deadline_ns = clua_monotonic_ns() + options.timeLimit.nanoseconds
        var len = 0
        let p = clua_safe_tostring(L, idx, &len)
        let message = p.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: len), as: UTF8.self) } ?? "?"
        clua_pop(L, 1)
        if c.pointee.killed != 0 {
            c.pointee.killed = 0
            clua_sethook(L)  // the hook switched the main thread to every instruction
        }
        c.pointee.deadline_ns = savedDeadline
        return message
    }

    func traceback(of co: OpaquePointer) -> String {
        luaL_traceback(L, co, nil, 0)
        defer { clua_pop(L, 1) }
        return String(lua: L, at: -1) ?? ""
    }

    func fail(_ task: LuaTask, message: String, co: OpaquePointer, errorRefSet: Bool = false) {
        let failure = LuaTaskFailure(task: task.name, message: message, traceback: traceback(of: co))
        if task.keepResults && !errorRefSet {
            push(.string(message), on: L)
            task.resultRef = makeRef(L, -1)
            clua_pop(L, 1)
        }
        finish(task, .failure(failure))
    }

    func finish(_ task: LuaTask, _ outcome: LuaTaskOutcome) {
        guard task.state != .done else { return }
        let wasRunning = task === currentTask
        task.state = .done
        task.outcome = outcome
        task.waiting = false
        tasks.removeValue(forKey: task.id)
        if !wasRunning {  // a running coroutine stays anchored until resume() returns
            if task.threadRef != LUA_NOREF {
                luaL_unref(L, clua_registryindex(), task.threadRef)
                task.threadRef = LUA_NOREF
            }
            task.thread = nil
        }
        let handlers = task.cancelHandlers
        task.cancelHandlers = []
        let children = task.children
        task.children = []
        if case .cancelled = outcome {
            for h in handlers { h() }
        }
        for child in children where child.state != .done { finish(child, .cancelled) }
        task.onFinish?(outcome)
        task.onFinish = nil
        let waiters = task.joinWaiters
        task.joinWaiters = []
        for w in waiters { w(task) }
        if case .failure(let failure) = outcome, !task.joined, !task.handlesErrors {
            if task.name == "main" || options.uncaughtErrors == .failRun {
                endRun(.failed(failure))
                return
            }
            logger.error("uncaught error in task \(task.name): \(failure)")
        }
        checkRunComplete()
    }

    /// Kills a task: it is never resumed again; its pending host calls are cancelled.
    public func cancel(_ task: LuaTask) {
        assertOnLoop()
        finish(task, .cancelled)
    }

    // MARK: the run

    /// Loads the policy file (text only; chunk name = `path` as given, so errors read
    /// `path:line: message`), runs its main chunk as task "main", and completes when every task
    /// has ended and no hold remains, when `stop()` is called, or when a task fails with an
    /// uncaught error (see `LuaRuntimeOptions.uncaughtErrors`). Shutdown hooks run before it
    /// completes. Callable from any thread.
    public func start(policyAt path: String, arguments: [String] = []) -> EventLoopFuture<LuaRunOutcome> {
        eventLoop.flatSubmit {
            self.startRun(path: path, arguments: arguments)
        }
    }

    /// `start(policyAt:)`, awaited.
    public func run(policyAt path: String, arguments: [String] = []) async -> LuaRunOutcome {
        // the future never fails
        (try? await start(policyAt: path, arguments: arguments).get()) ?? .stopped
    }

    func startRun(path: String, arguments: [String]) -> EventLoopFuture<LuaRunOutcome> {
        guard runState == .idle else {
            return eventLoop.makeSucceededFuture(.failed(LuaTaskFailure(task: "main", message: "this runtime has already run a policy", traceback: "")))
        }
        let promise = eventLoop.makePromise(of: LuaRunOutcome.self)
        runPromise = promise
        runState = .running
        if let slash = path.lastIndex(of: "/") {
            policyDirectory = String(path[..<slash])
            if policyDirectory.isEmpty { policyDirectory = "/" }
        } else {
            policyDirectory = ""
        }
        let status = luaL_loadfilex(L, path, "t")
        if status != LUA_OK {
            let msg = String(lua: L, at: -1) ?? "cannot load \(path)"
            clua_pop(L, 1)
            endRun(.failed(LuaTaskFailure(task: "main", message: msg, traceback: "")))
            return promise.futureResult
        }
        _ = clua_getregistryfield(L, "colorun.env")
        _ = lua_setupvalue(L, -2, 1)
        _ = spawnTask(functionOn: L, name: "main", pushArguments: { co in
            for a in arguments { self.push(.string(a), on: co) }
            return Int32(arguments.count)
        })
        return promise.futureResult
    }

    /// Ends the run: cancels every task (and their pending timers and host calls); the run
    /// completes with `.stopped`. Callable from any thread.
    public func stop() {
        if eventLoop.inEventLoop {
            endRun(.stopped)
        } else {
            eventLoop.execute { self.endRun(.stopped) }
        }
    }

    /// Keeps the run alive until `release()` (for timers that will spawn tasks later).
    public func holdRun() -> LuaRunHold {
        assertOnLoop()
        holds += 1
        return LuaRunHold(runtime: self)
    }

    /// Adds a hook that runs when the run ends, whatever the outcome, before `run` completes
    /// (hooks run one after another, the last added first). For cleanup such as resuming
    /// paused VMs.
    public func addShutdownHook(_ hook: @escaping (LuaRunOutcome) -> EventLoopFuture<Void>) {
        assertOnLoop()
        shutdownHooks.append(hook)
    }

    /// The tasks alive now.
    public var liveTaskCount: Int { tasks.count }

    func checkRunComplete() {
        if runState == .running && tasks.isEmpty && holds <= 0 {
            endRun(.finished)
        }
    }

    func endRun(_ outcome: LuaRunOutcome) {
        guard runState == .running else { return }
        runState = .ending
        for task in tasks.values.sorted(by: { $0.id < $1.id }) { finish(task, .cancelled) }
        tasks.removeAll()
        readyQueue.removeAll()
        let hooks = UncheckedBox(Array(shutdownHooks.reversed()))
        shutdownHooks = []
        @Sendable func step(_ i: Int) {
            guard i < hooks.value.count else {
                runState = .ended
                // host functions may capture the runtime: drop them to break the cycle
                // (no Lua code runs after the run has ended)
                owner.hostFunctions.removeAll()
                runPromise?.succeed(outcome)
                runPromise = nil
                return
            }
            hooks.value[i](outcome).whenComplete { result in
                if case .failure(let error) = result { self.logger.error("shutdown hook failed: \(error)") }
                step(i + 1)
            }
        }
        step(0)
    }
}
