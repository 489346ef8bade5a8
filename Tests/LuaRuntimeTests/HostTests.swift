import Foundation
import JSON
import LuaRuntime
import NIOCore
import Synchronization
import Testing

let deferCount = Mutex(0)
let deinitCount = Mutex(0)

final class Tracked {
    let name: String
    init(name: String) { self.name = name }
    deinit { deinitCount.withLock { $0 += 1 } }
}

struct Boom: Error, CustomStringConvertible {
    var description: String { "boom from Swift" }
}

let captured = Mutex<[JSONValue]>([])

extension LuaRuntimeSuite {
@Suite struct HostTests {
    @Test func swiftErrorBecomesLuaErrorAndDeferDeinitRun() async throws {
        deferCount.withLock { $0 = 0 }
        deinitCount.withLock { $0 = 0 }
        let r = try await runPolicy("""
            local ok, e = pcall(boom, 1)
            print(ok, e)
            local ok2, e2 = pcall(boom, "x")
            print(ok2, e2)
            """, setup: { rt in
                try rt.registerGlobal("boom", .sync { call in
                    let t = Tracked(name: "temp")
                    defer { deferCount.withLock { $0 += 1 } }
                    _ = t.name
                    _ = try call.integer(1)
                    throw Boom()
                })
            })
        #expect(r.finished, "\(r.outcome)")
        #expect(r.printed == [
            "false\tpolicy.lua:1: boom from Swift",
            "false\tpolicy.lua:3: bad argument #1 to 'boom' (integer expected, got string)",
        ])
        #expect(deferCount.withLock { $0 } == 2)
        #expect(deinitCount.withLock { $0 } == 2)
    }

    @Test func userdataWithMethodsAndGC() async throws {
        deinitCount.withLock { $0 = 0 }
        let r = try await runPolicy("""
            do
              local o = make("alpha")
              print(o:name(), o:shout("hi"), tostring(o):match("^thing") ~= nil)
              local ok, e = pcall(o.name, 42)
              print(e)
            end
            collect()
            """, setup: { rt in
                try rt.registerType(Tracked.self, name: "thing", methods: [
                    "name": .sync { call in call.push(try call.object(1, as: Tracked.self).name) },
                ], luaSource: "local methods = ...\nfunction methods:shout(s) return self:name() .. ': ' .. s:upper() end")
                try rt.registerGlobal("make", .sync { call in call.push(object: Tracked(name: try call.string(1))) })
                try rt.registerGlobal("collect", .sync { call in
                    call.runtime.collectGarbage()
                })
            })
        #expect(r.finished, "\(r.outcome)")
        #expect(r.printed == ["alpha\talpha: HI\ttrue", "policy.lua:4: bad argument #1 to 'thing:name' (thing expected, got number)"])
        #expect(deinitCount.withLock { $0 } == 1)
    }

    @Test func jsonRoundTrips() async throws {
        captured.withLock { $0 = [] }
        let value: JSONValue = [
            "int": 42, "float": 1.0, "neg": -7, "big": .int(Int64.max), "pi": 3.25,
            "null": nil, "list": [1, 2.5, "three", nil, [], [:]], "nested": ["a": ["b": true]],
            "empty": [], "obj": [:],
        ]
        let r = try await runPolicy("""
            local v = get()
            print(math.type(v.int), math.type(v.float), math.type(v.big), v.null == json.null, v.list[4] == json.null)
            print(#v.list, json.isarray(v.empty), json.isarray(v.obj), v.nested.a.b)
            put(v)
            put({1, 2, 3})
            put({x = 1.5, y = json.null, z = {}})
            put(json.array())
            put(json.decode('{"a":[1,2.0,null],"b":"s"}'))
            print(json.encode({b = 1, a = {true, false}}))
            print(pcall(put, {1, 2, x = 3}))
            print(pcall(put, {print}))
            print(pcall(put, 0/0))
            """, setup: { rt in
                try rt.registerGlobal("get", .sync { call in call.push(json: value) })
                try rt.registerGlobal("put", .sync { call in
                    let v = try call.json(1)
                    captured.withLock { $0.append(v) }
                })
            })
        #expect(r.finished, "\(r.outcome)")
        try #require(r.printed.count == 6, "\(r.printed)")
        #expect(r.printed[0] == "integer\tfloat\tinteger\ttrue\ttrue")
        #expect(r.printed[1] == "6\ttrue\tfalse\ttrue")
        #expect(r.printed[2] == #"{"a":[true,false],"b":1}"#)
        #expect(r.printed[3].contains("cannot convert a table with both array and string keys to JSON"))
        #expect(r.printed[4].contains("cannot convert a function to JSON"))
        #expect(r.printed[5].contains("cannot convert"))
        let c = captured.withLock { $0 }
        #expect(c.count == 5)
        #expect(c[0] == value)
        #expect(c[1] == [1, 2, 3])
        #expect(c[2] == ["x": 1.5, "y": nil, "z": [:]])
        #expect(c[3] == [])
        #expect(c[4] == ["a": [1, 2.0, nil], "b": "s"])
    }

    @Test func asyncHostFunctionsAndStructuredErrors() async throws {
        let r = try await runPolicy("""
            print(qmp.query("web-p"))
            local ok, e = pcall(qmp.stop, "web-p")
            print(ok, e.domain, e.class, e.desc, e.where)
            print(tostring(e))
            local ok2, e2 = pcall(qmp.fail, "plain")
            print(e2)
            qmp.stop("db")
            """, setup: { rt in
                try rt.registerModule("qmp", functions: [
                    "query": .async { call, completion in
                        let d = try call.string(1)
                        call.runtime.eventLoop.scheduleTask(in: .milliseconds(2)) {
                            completion.succeed([.string(d), .json(["status": "running"]), .integer(3)])
                            completion.succeed([.string("late")])  // ignored
                        }
                    },
                    "stop": .async { call, completion in
                        let d = try call.string(1)
                        DispatchQueue.global().async {  // completions hop to the loop
                            completion.fail(LuaHostError.structured(
                                ["domain": .string(d), "command": "stop", "class": "GenericError", "desc": "Cannot stop"],
                                message: "\(d): stop: GenericError: Cannot stop"))
                        }
                    },
                    "fail": .async { call, completion in completion.fail(LuaHostError.message(try call.string(1))) },
                ], luaSource: "local qmp = ...\nfunction qmp.status(d) local _, s = qmp.query(d) return s.status end")
            })
        let f = try #require(r.failure, "\(r.outcome)")
        try #require(r.printed.count == 4, "\(r.printed)")
        #expect(r.printed[0].hasPrefix("web-p\ttable: "))
        #expect(r.printed[0].hasSuffix("\t3"))
        #expect(r.printed[1] == "false\tweb-p\tGenericError\tCannot stop\t\(r.printed[1].split(separator: "\t").last!)")
        #expect(r.printed[1].hasSuffix("policy.lua:2: "))
        #expect(r.printed[2].hasSuffix("policy.lua:2: web-p: stop: GenericError: Cannot stop"))
        #expect(r.printed[3].hasSuffix("policy.lua:5: plain"))
        #expect(f.message.hasSuffix("policy.lua:7: db: stop: GenericError: Cannot stop"), "\(f.message)")
    }

    /// `completeNow` on the loop resumes the waiting task before it returns (the reply's
    /// handler runs the coroutine, as OpenResty's cosocket does); from inside a running task
    /// (a host function completing at once) the result waits for the task to yield and the
    /// loop's next drain, as with `complete`. With `complete` in `later`, "returned" would come
    /// before "after".
    @Test func completeNowResumesTheTaskBeforeItReturns() async throws {
        let order = Mutex<[String]>([])
        let r = try await runPolicy("""
            h.mark("before")
            print(h.later())
            h.mark("after")
            print(h.atOnce())
            h.mark("end")
            """, setup: { rt in
                try rt.registerModule("h", functions: [
                    "mark": .sync { call in
                        let text = try call.string(1)
                        order.withLock { $0.append(text) }
                    },
                    "later": .async { call, completion in
                        call.runtime.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(1)) {
                            order.withLock { $0.append("completeNow") }
                            completion.completeNow(.success([.string("later")]))
                            order.withLock { $0.append("returned") }
                        }
                    },
                    "atOnce": .async { _, completion in completion.completeNow(.success([.string("at once")])) },
                ])
            })
        #expect(r.finished, "\(r.outcome)")
        #expect(r.printed == ["later", "at once"])
        // "after": resumed inside completeNow; "end": atOnce's task went on at the next drain,
        // not inside its own host call.
        #expect(order.withLock { $0 } == ["before", "completeNow", "after", "returned", "end"])
    }

    /// Async host functions yield from their C trampoline (no Lua wrapper): what the call
    /// returns is exactly what the completion gave, never the call's own arguments left on
    /// the C function's stack, in a task, a pcall and a user coroutine alike.
    @Test func asyncCallsReturnOnlyTheirResults() async throws {
        let r = try await runPolicy("""
            print(select("#", h.none("a", "b", "c")))
            print(h.echo(1, 2, 3))
            print(pcall(h.echo, "x", nil, "z"))
            local co = coroutine.wrap(function(...)
              local n = select("#", h.none(...))
              local ok, e = pcall(h.fail, "inner")
              coroutine.yield(n, ok, e)
              return h.echo("after")
            end)
            print(co(7, 8))
            print(co())
            """, setup: { rt in
                try rt.registerModule("h", functions: [
                    "none": .async { _, completion in completion.succeed([]) },
                    "echo": .async { call, completion in
                        var values: [LuaValue] = []
                        for i in stride(from: 1, through: call.argumentCount, by: 1) { values.append(try call.value(i)) }
                        completion.succeed(values)
                    },
                    "fail": .async { call, completion in completion.fail(LuaHostError.message(try call.string(1))) },
                ])
            })
        #expect(r.failure == nil, "\(r.outcome)")
        try #require(r.printed.count == 5, "\(r.printed)")
        #expect(Array(r.printed[0..<3]) == ["0", "1\t2\t3", "true\tx\tnil\tz"])
        #expect(r.printed[3].hasPrefix("0\tfalse\tpolicy.lua:") && r.printed[3].hasSuffix(": inner"), "\(r.printed[3])")
        #expect(r.printed[4] == "after")
    }

    @Test func swiftCallsLuaFunctions() async throws {
        let r = try await runPolicy("""
            function double(x) return x * 2, "ok", {1, 2} end
            print(apply(double, 21))
            print(pcall(apply, function() error("inner") end, 1))
            print(pcall(apply, function() sleep(0) end, 1))
            """, setup: { rt in
                try rt.registerGlobal("apply", .sync { call in
                    let fn = try call.function(1)
                    let results = try call.runtime.call(fn, arguments: [try call.value(2)])
                    for v in results { call.push(v) }
                })
            })
        #expect(r.finished, "\(r.outcome)")
        try #require(r.printed.count == 3, "\(r.printed)")
        #expect(r.printed[0].hasPrefix("42\tok\tjson.array: "))
        #expect(r.printed[1] == "false\tpolicy.lua:3: inner")
        #expect(r.printed[2].hasPrefix("false\tpolicy.lua:4: sleep cannot wait here"))
    }

    @Test func sandbox() async throws {
        let r = try await runPolicy("""
            local function try(f) local ok, e = pcall(f) return e end
            print(try(function() return io end))
            print(try(function() return debug end))
            print(try(function() return collectgarbage end))
            print(try(function() return dofile end))
            print(os.execute, os.remove, string.dump, ("x").dump, try(function() return package end))
            print(load("\\27Lua garbage"))
            print(load("return 1 + 1")())
            print(try(function() setmetatable({}, {__gc = print}) end))
            print(type(os.time()), type(os.clock()), type(os.date()), os.getenv("HOME") ~= nil)
            print(type(string.format), type(table.concat), type(math.floor), type(utf8.char))
            x = 5
            print(x, _G.x)
            """)
        #expect(r.finished, "\(r.outcome)")
        try #require(r.printed.count == 11, "\(r.printed)")
        #expect(r.printed[0] == "policy.lua:2: undefined global 'io'")
        #expect(r.printed[1] == "policy.lua:3: undefined global 'debug'")
        #expect(r.printed[2] == "policy.lua:4: undefined global 'collectgarbage'")
        #expect(r.printed[3] == "policy.lua:5: undefined global 'dofile'")
        #expect(r.printed[4] == "nil\tnil\tnil\tnil\tpolicy.lua:6: undefined global 'package'")
        #expect(r.printed[5].contains("attempt to load a binary chunk"))
        #expect(r.printed[6] == "2")
        #expect(r.printed[7].contains("__gc metamethods are not available"))
        #expect(r.printed[8] == "number\tnumber\tstring\ttrue")
        #expect(r.printed[10] == "5\t5")
    }

    @Test func undefinedGlobalUncaught() async throws {
        let r = try await runPolicy("local a = 1\nprint(undefined_thing)\n")
        let f = try #require(r.failure)
        #expect(f.message.hasSuffix("policy.lua:2: undefined global 'undefined_thing'"))
    }

    @Test func requireSiblingsAndLuaPath() async throws {
        let extra = try makePolicyDir(["extra.lua": "return {name = 'extra'}"])
        var options = LuaRuntimeOptions()
        options.luaPath = [extra]
        let r = try await runPolicy("""
            local util = require("util")
            print(util.twice(21), require("util") == util)
            print(require("lib.deep").value)
            print(require("extra").name)
            print(require("json") == json)
            print(pcall(require, "missing"))
            local ok, e = pcall(require, "broken")
            print(e)
            """, files: [
                "util.lua": "local M = {}\nfunction M.twice(x) return 2 * x end\nreturn M\n",
                "lib/deep.lua": "return {value = rawget(_G, 'shared_value') or 'deep'}\n",
                "broken.lua": "local x = \nreturn x\n",
            ], options: options)
        #expect(r.finished, "\(r.outcome)")
        try #require(r.printed.count == 6, "\(r.printed)")
        #expect(r.printed[0] == "42\ttrue")
        #expect(r.printed[1] == "deep")
        #expect(r.printed[2] == "extra")
        #expect(r.printed[3] == "true")
        #expect(r.printed[4].contains("policy.lua:6: module 'missing' not found (tried "))
        #expect(r.printed[5].contains("broken.lua:2:"), "\(r.printed[5])")
    }
}
}
