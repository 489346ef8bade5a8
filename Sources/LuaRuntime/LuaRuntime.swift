import CLua
import CLuaShims
import JSON
import Logging
import NIOCore

/// Options of a `LuaRuntime`.
public struct LuaRuntimeOptions: Sendable {
    /// Memory cap of the Lua state in bytes (default 64 MiB). The task whose allocation hits
    /// it fails with "not enough memory"; the runtime lives on.
    public var memoryLimit: Int = 64 << 20
    /// Instructions a task runs before the count hook forces it to yield (default 10,000).
    public var instructionSlice: Int32 = 10_000
    /// Wall-clock limit of one slice-run of a task: the time from being resumed with a host
    /// result (or started) until it next waits on a host operation (default 5 s). A task over
    /// it fails with "file:line: time limit exceeded"; `pcall` cannot catch that.
    public var timeLimit: TimeAmount = .seconds(5)
    /// Extra directories searched by `require` after the policy's own directory.
    public var luaPath: [String] = []
    /// What an uncaught error in a task other than the main chunk does.
    public var uncaughtErrors: UncaughtErrorPolicy = .failRun

    public enum UncaughtErrorPolicy: Sendable {
        /// End the run as failed with the error and its traceback (default).
        case failRun
        /// Log the error and its traceback; the run goes on.
        case logAndContinue
    }

    public init() {}
}

/// A failed task: its error message (`file:line: message`) and the traceback.
public struct LuaTaskFailure: Error, Sendable, CustomStringConvertible {
    public var task: String
    public var message: String
    public var traceback: String

    public var description: String { traceback.isEmpty ? message : "\(message)\n\(traceback)" }
}

/// How a run ended.
public enum LuaRunOutcome: Sendable, CustomStringConvertible {
    /// Every task finished and no timer or hold keeps the run alive.
    case finished
    /// `stop()` was called.
    case stopped
    /// A task failed with an uncaught error (or the policy did not load).
    case failed(LuaTaskFailure)

    public var description: String {
        switch self {
        case .finished: "finished"
        case .stopped: "stopped"
        case .failed(let f): "failed: \(f)"
        }
    }
}

/// The Lua runtime: one sandboxed Lua state confined to one NIO event loop, running every
/// piece of policy code as a coroutine task.
///
/// Every method must be called on `eventLoop` (use `eventLoop.execute { ... }` from
/// elsewhere); `run`, `stop` and `LuaCompletion` hop there themselves.
public final class LuaRuntime: @unchecked Sendable {
    public let eventLoop: any EventLoop
    public let options: LuaRuntimeOptions
    public let logger: Logger

    let owner: LuaStateOwner
    var L: OpaquePointer { owner.L }
    var ctx: UnsafeMutablePointer<clua_ctx> { owner.ctx }

    var nullPointer: UnsafeRawPointer?
    var typeNames: [ObjectIdentifier: String] = [:]
    var policyDirectory: String = "."

    // scheduler state (see Scheduler.swift)
    var tasks: [Int: LuaTask] = [:]
    var nextTaskID = 1
    var readyQueue: [LuaTask] = []
    var drainBuffer: [LuaTask] = []
    var drainScheduled = false
    var currentTask: LuaTask?
    /// `call(_:arguments:)`s running now (Lua code outside any task's slice).
    var synchronousCalls = 0
    var runState: RunState = .idle
    var runPromise: EventLoopPromise<LuaRunOutcome>?
    var holds = 0
    var shutdownHooks: [(LuaRunOutcome) -> EventLoopFuture<Void>] = []

    enum RunState { case idle, running, ending, ended }

    /// Creates the state, the sandbox and the built-in modules. Call on `eventLoop`.
    public init(eventLoop: any EventLoop, options: LuaRuntimeOptions = LuaRuntimeOptions(), logger: Logger? = nil) throws {
        self.eventLoop = eventLoop
        self.options = options
        self.logger = logger ?? Logger(label: "colorun.lua")
        self.owner = try LuaStateOwner(memoryLimit: options.memoryLimit, instructionSlice: options.instructionSlice)
        try installSandbox()
    }

    deinit {
        for task in tasks.values { task.thread = nil }
    }

    @inline(__always)
    func assertOnLoop() {
        #if DEBUG
            eventLoop.preconditionInEventLoop()
        #endif
    }

    /// Runs a full garbage collection (finalizers of Swift objects run).
    public func collectGarbage() {
        assertOnLoop()
        _ = clua_gc_collect(L)
    }

    /// Bytes currently allocated by the Lua state.
    public var memoryInUse: Int { ctx.pointee.used }

    // MARK: registration

    /// Pushes a host function onto `L` (an async one yields from its C trampoline).
    func pushHostFunction(_ name: String, _ body: LuaHostFunction) throws {
        guard runState != .ended else { throw LuaHostError.message("the run has ended") }
        let box = HostFunctionBox(name: name, body: body, runtime: self)
        owner.hostFunctions.append(box)
        clua_pushhostfunction(L, Unmanaged.passUnretained(box).toOpaque())
    }

    /// Registers (or extends) a global module table `name` made of host functions, then runs
    /// `luaSource` (if any) as host code with the module table as `...` (so thin Lua
    /// wrappers can be written in Lua). `require(name)` also returns the module.
    public func registerModule(_ name: String, functions: [String: LuaHostFunction], luaSource: String? = nil) throws {
        assertOnLoop()
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        try pushModuleTable(name)
        for (fname, body) in functions.sorted(by: { $0.key < $1.key }) {
            try pushHostFunction("\(name).\(fname)", body)
            clua_rawsetfield(L, -2, fname)
        }
        if let luaSource {
            try runHostLua(luaSource, name: name, pushArguments: { lua_pushvalue(self.L, -2) ; return 1 })
        }
    }

    /// Registers a global function `name`.
    public func registerGlobal(_ name: String, _ body: LuaHostFunction) throws {
        assertOnLoop()
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        _ = clua_getregistryfield(L, "colorun.env")
        try pushHostFunction(name, body)
        clua_rawsetfield(L, -2, name)
    }

    /// Pushes module table `name` (creating it in the env and in the module list if needed).
    func pushModuleTable(_ name: String) throws {
        _ = clua_getregistryfield(L, "colorun.modules")
        if clua_rawgetfield(L, -1, name) != LUA_TTABLE {
            clua_pop(L, 1)
            clua_newtable(L)
            lua_pushvalue(L, -1)
            clua_rawsetfield(L, -3, name)
            _ = clua_getregistryfield(L, "colorun.env")
            lua_pushvalue(L, -2)
            clua_rawsetfield(L, -2, name)
            clua_pop(L, 1)
        }
        clua_remove(L, -2)
    }

    /// Declares a Swift class as a Lua userdata type: pushed with `.object(x)`, its methods
    /// are called as `obj:method(...)` (the object is argument 1), and `__gc` releases it.
    /// `luaSource` runs as host code with the methods table as `...` (add Lua methods there).
    public func registerType<T: AnyObject>(_ type: T.Type, name: String, methods: [String: LuaHostFunction] = [:],
                                           luaSource: String? = nil) throws {
        assertOnLoop()
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        let mtName = "colorun.type.\(name)"
        typeNames[ObjectIdentifier(type)] = mtName
        clua_newtable(L)  // metatable
        lua_pushstring(L, name)
        clua_rawsetfield(L, -2, "__name")
        lua_pushboolean(L, 0)
        clua_rawsetfield(L, -2, "__metatable")
        clua_newtable(L)  // methods
        for (mname, body) in methods.sorted(by: { $0.key < $1.key }) {
            try pushHostFunction("\(name):\(mname)", body)
            clua_rawsetfield(L, -2, mname)
        }
        lua_pushvalue(L, -1)
        clua_rawsetfield(L, -3, "__index")
        if let luaSource {
            try runHostLua(luaSource, name: name, pushArguments: { lua_pushvalue(self.L, -2); return 1 })
        }
        clua_pop(L, 1)
        lua_pushstring(L, mtName)
        clua_insert(L, -2)
        lua_rawset(L, clua_registryindex())
    }

    func typeName<T>(of type: T.Type) -> String {
        typeNames[ObjectIdentifier(type)].map { String($0.dropFirst("colorun.type.".count)) } ?? "\(type)"
    }

    /// Runs host Lua code (chunk name "=[host name]", environment the policy's globals).
    /// Host code is skipped when error positions are computed, so errors raised by thin
    /// wrappers point at the policy line that called them.
    public func runHostLua(_ source: String, name: String) throws {
        assertOnLoop()
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        try runHostLua(source, name: name, pushArguments: { 0 })
    }

    func runHostLua(_ source: String, name: String, pushArguments: () -> Int32) throws {
        guard runState != .ended else { throw LuaHostError.message("the run has ended") }
        let status = source.withCString { p in clua_loadbuffer(L, p, source.utf8.count, "=[host \(name)]") }
        guard status == LUA_OK else {
            let msg = String(lua: L, at: -1) ?? "?"
            clua_pop(L, 1)
            throw LuaHostError(message: msg, addsPosition: false)
        }
        _ = clua_getregistryfield(L, "colorun.env")
        _ = lua_setupvalue(L, -2, 1)
        let n = pushArguments()
        try pcallHost(n, 0)
    }

    /// lua_pcall from Swift on the main state (host code: no memory cap, no deadline).
    func pcallHost(_ nargs: Int32, _ nresults: Int32) throws {
        if clua_pcall(L, nargs, nresults, 0) != LUA_OK {
            var len = 0
            let p = clua_safe_tostring(L, -1, &len)
            let msg = p.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: len), as: UTF8.self) } ?? "?"
            clua_pop(L, 2)
            throw LuaHostError(message: msg, addsPosition: false)
        }
    }

    // MARK: calls from Swift

    /// The policy global `name` (raw lookup), anchored; nil if unset.
    public func global(_ name: String) -> LuaRef? {
        assertOnLoop()
        _ = clua_getregistryfield(L, "colorun.env")
        defer { clua_pop(L, 2) }
        guard clua_rawgetfield(L, -1, name) != LUA_TNIL else { return nil }
        return makeRef(L, -1)
    }

    /// Calls a Lua function synchronously, outside any task, under `pcall`, with the memory
    /// cap and the time limit: for short pure callbacks (filters, formatters). It cannot wait
    /// on host operations (they raise); use `spawn` for anything that may. Lua errors are
    /// thrown as `LuaTaskFailure` (task "call").
    public func call(_ function: LuaRef, arguments: [LuaValue] = []) throws -> [LuaValue] {
        assertOnLoop()
        guard runState != .ended else { throw LuaHostError.message("the run has ended") }
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        _ = lua_checkstack(L, Int32(arguments.count) + 4)
        function.push(L)
        for a in arguments { push(a, on: L) }
        let c = ctx
        let savedDeadline = c.pointee.deadline_ns
        c.pointee.deadline_ns = clua_monotonic_ns() + options.timeLimit.nanoseconds
        synchronousCalls += 1
        let status = clua_pcall_enforced(L, Int32(arguments.count), LUA_MULTRET)
        synchronousCalls -= 1
        let killed = c.pointee.killed != 0
        if killed {
            c.pointee.killed = 0
            clua_sethook(L)
        }
        c.pointee.deadline_ns = savedDeadline
        guard status == LUA_OK else {
            let message = killed ? "time limit exceeded" : describeError(at: -1)
            throw LuaTaskFailure(task: "call", message: message, traceback: "")
        }
        var results: [LuaValue] = []
        let n = lua_gettop(L)
        if n > top {
            for i in (top + 1)...n { results.append(try readValue(L, i)) }
        }
        return results
    }

    // MARK: errors

    /// Pushes the Lua error value for `error`: "where message" or a structured table.
    func pushError(_ error: LuaHostError, on S: OpaquePointer, positionFrom P: OpaquePointer?) {
        _ = lua_checkstack(S, 6)
        var whereText = ""
        if error.addsPosition, let P {
            clua_pushwhere(P)
            whereText = String(lua: P, at: -1) ?? ""
            clua_pop(P, 1)
        }
        guard let fields = error.fields else {
            push(.string(whereText + error.message), on: S)
            return
        }
        lua_createtable(S, 0, Int32(fields.count + 2))
        for (k, v) in fields {
            pushJSON(v, on: S)
            clua_rawsetfield(S, -2, k)
        }
        push(.string(error.message), on: S)
        clua_rawsetfield(S, -2, "message")
        push(.string(whereText), on: S)
        clua_rawsetfield(S, -2, "where")
        _ = clua_getregistryfield(S, "colorun.errormt")
        _ = lua_setmetatable(S, -2)
    }
}
