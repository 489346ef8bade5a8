import CLua
import CLuaShims
import JSON
import Logging
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

extension LuaRuntime {
    /// Opens the standard libraries, builds the policy environment and the built-in modules
    /// (sleep, task, json, log, print, require).
    func installSandbox() throws {
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        luaL_openlibs(L)
        clua_newtable(L)
        lua_pushstring(L, "colorun.env")
        lua_pushvalue(L, -2)
        lua_rawset(L, clua_registryindex())  // env stays at top
        let envIndex = lua_gettop(L)
        clua_newtable(L)
        lua_pushstring(L, "colorun.modules")
        lua_pushvalue(L, -2)
        lua_rawset(L, clua_registryindex())
        let modulesIndex = lua_gettop(L)

        try registerType(LuaTask.self, name: "task", methods: taskMethods())

        let status = preludeSource.withCString { p in clua_loadbuffer(L, p, preludeSource.utf8.count, "=[host prelude]") }
        guard status == LUA_OK else { throw LuaHostError(message: String(lua: L, at: -1) ?? "prelude", addsPosition: false) }
        // H: the raw host functions
        clua_newtable(L)
        clua_pushcfunction(L, clua_l_forced)
        clua_rawsetfield(L, -2, "forced")
        for f in rawHostFunctions() {
            let box = HostFunctionBox(name: f.public, body: f.body, runtime: self)
            owner.hostFunctions.append(box)
            clua_pushhostfunction(L, Unmanaged.passUnretained(box).toOpaque())
            clua_rawsetfield(L, -2, f.raw)
        }
        lua_pushvalue(L, envIndex)
        lua_pushvalue(L, modulesIndex)
        _ = clua_getregistryfield(L, "colorun.type.task")
        _ = clua_rawgetfield(L, -1, "__index")
        clua_remove(L, -2)
        try pcallHost(4, 1)
        for key in ["make_async", "null", "jsonarray", "errormt"] {
            _ = clua_rawgetfield(L, -1, key)
            if key == "null" { nullPointer = lua_topointer(L, -1) }
            lua_pushstring(L, "colorun.\(key)")
            clua_insert(L, -2)
            lua_rawset(L, clua_registryindex())
        }
    }

    private func taskMethods() -> [String: LuaHostFunction] {
        [
            "id": .sync { call in call.push(Int64(try call.object(1, as: LuaTask.self).id)) },
            "name": .sync { call in call.push(try call.object(1, as: LuaTask.self).name) },
            "status": .sync { call in
                let t = try call.object(1, as: LuaTask.self)
                let s: String
                switch t.outcome {
                case nil: s = t.state == .waiting ? "waiting" : "running"
                case .success?: s = "done"
                case .failure?: s = "failed"
                case .cancelled?: s = "cancelled"
                }
                call.push(s)
            },
            "cancel": .sync { call in
                let t = try call.object(1, as: LuaTask.self)
                call.runtime.cancel(t)
            },
        ]
    }

    private func rawHostFunctions() -> [(raw: String, public: String, body: LuaHostFunction)] {
        [
            // log(level, message, fields): print and log.* of the prelude; the members of
            // `fields` (a table or nil) join the task name in the log metadata.
            ("log", "log", .sync { call in
                let level = try call.string(1)
                let message = try call.string(2)
                let rt = call.runtime
                var meta: Logger.Metadata = ["task": .string(rt.currentTask?.name ?? "-")]
                if !call.isNil(3), case .object(let fields) = try call.json(3) {
                    for (key, value) in fields { meta[key] = .string(value.stringValue ?? value.description) }
                }
                switch level {
                case "debug": rt.logger.debug("\(message)", metadata: meta)
                case "warn": rt.logger.warning("\(message)", metadata: meta)
                case "error": rt.logger.error("\(message)", metadata: meta)
                default: rt.logger.info("\(message)", metadata: meta)
                }
            }),
            ("sleep", "sleep", .async { call, completion in
                let d = try call.duration(1)
                let scheduled = call.runtime.eventLoop.scheduleTask(in: d.timeAmount) { completion.succeed() }
                completion.onCancel { scheduled.cancel() }
            }),
            ("yield", "task.yield", .async { _, completion in completion.succeed() }),
            ("abandon", "coroutine.resume", .sync { call in
                let rt = call.runtime
                let c = rt.ctx
                if c.pointee.killed != 0 {
                    throw LuaHostError.message("time limit exceeded")
                }
                c.pointee.forced_yield = 0
                if let task = rt.currentTask, task.waiting {
                    rt.abandonRequest(task)
                    throw LuaHostError.message("a host call cannot wait here: its coroutine was resumed from code that cannot yield (a table.sort comparator, a string.gsub callback, a metamethod called from C)")
                }
            }),
            ("current", "task.current", .sync { call in
                if let t = call.runtime.currentTask { call.push(object: t) } else { call.push(.nil) }
            }),
            ("spawn", "task.spawn", .sync { call in
                guard call.type(1) == .function else { throw call.typeError(1, "function") }
                let rt = call.runtime
                guard rt.runState == .running else { throw LuaHostError.message("the run has ended") }
                let S = call.state
                let n = Int32(call.argumentCount)
                lua_pushvalue(S, 1)
                let t = rt.spawnTask(functionOn: S, name: "task", pushArguments: { co in
                    _ = lua_checkstack(S, n)
                    for i in stride(from: 2, through: n, by: 1) { lua_pushvalue(S, i) }
                    lua_xmove(S, co, max(n - 1, 0))
                    return max(n - 1, 0)
                })
                t.keepResults = true
                call.push(object: t)
            }),
            ("spawn_joined", "task.all", .sync { call in
                let rt = call.runtime
                let S = call.state
                lua_pushvalue(S, 1)
                let t = rt.spawnTask(functionOn: S, name: "\(rt.currentTask?.name ?? "task")/all", pushArguments: { _ in 0 })
                t.keepResults = true
                t.joined = true
                rt.currentTask?.children.append(t)
                call.push(object: t)
            }),
            ("join", "task.wait", .async { call, completion in
                let t = try call.object(1, as: LuaTask.self)
                let deliver: (LuaTask) -> Void = { t in
                    switch t.outcome {
                    case .success?:
                        completion.succeed([.bool(true), t.resultRef.map { .ref($0) } ?? .json(.array([]))])
                    case .failure(let f)?:
                        completion.succeed([.bool(false), t.resultRef.map { .ref($0) } ?? .string(f.message)])
                    case .cancelled?, nil:
                        completion.succeed([.bool(false), .string("task \(t.id) was cancelled")])
                    }
                }
                if t.state == .done { deliver(t) } else { t.joinWaiters.append(deliver) }
            }),
            ("encode", "json.encode", .sync { call in
                let v = try call.json(1)
                var out: [UInt8] = []
                JSONEncoding.write(v, into: &out)
                call.push(String(decoding: out, as: UTF8.self))
            }),
            ("decode", "json.decode", .sync { call in
                let s = try call.string(1)
                do {
                    call.push(json: try JSONParser.parse(s))
                } catch {
                    throw LuaHostError.message("json.decode: \(error)")
                }
            }),
            ("loadmodule", "require", .sync { call in try call.runtime.loadModule(&call) }),
        ]
    }

    /// require(name): finds name.lua (dots become slashes) in the policy's directory, then in
    /// luaPath; loads it as text with the policy's globals; returns (chunk, path).
    func loadModule(_ call: inout LuaCall) throws {
        let name = try call.string(1)
        guard !name.isEmpty, !name.contains(".."), !name.hasPrefix("/") else {
            throw LuaHostError.message("bad module name '\(name)'")
        }
        let rel = name.replacingDots() + ".lua"
        var tried: [String] = []
        for dir in [policyDirectory] + options.luaPath {
            let path = dir.isEmpty ? rel : (dir.hasSuffix("/") ? dir + rel : dir + "/" + rel)
            tried.append(path)
            guard access(path, R_OK) == 0 else { continue }
            let S = call.state
            if luaL_loadfilex(S, path, "t") != LUA_OK {
                let msg = String(lua: S, at: -1) ?? "cannot load \(path)"
                throw LuaHostError(message: msg, addsPosition: false)
            }
            _ = clua_getregistryfield(S, "colorun.env")
            _ = lua_setupvalue(S, -2, 1)
            call.resultCount += 1
            call.push(path)
            return
        }
        throw LuaHostError.message("module '\(name)' not found (tried \(tried.joined(separator: ", ")))")
    }
}

extension String {
    func replacingDots() -> String {
        String(map { $0 == "." ? "/" : $0 })
    }
}
