// libFuzzer target for the policy loader: arbitrary text loaded as a policy in a sandboxed
// LuaRuntime with small limits, run until it ends or 100 ms pass. Built and run only by
// scripts/fuzz (COLORUN_FUZZ=1, -sanitize=fuzzer).
import Foundation
import FuzzDriver
import Logging
import LuaRuntime
import NIOCore
import NIOPosix

enum Fuzz {
    static let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    static let loop = group.next()
    static let directory: String = {
        var template = Array("/dev/shm/colorun-fuzz-XXXXXX".utf8CString)
        return template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    }()
    static let path = directory + "/policy.lua"
    static let logger: Logger = {
        var l = Logger(label: "fuzz") { _ in SwiftLogNoOpLogHandler() }
        l.logLevel = .critical
        return l
    }()
}

func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let bytes = data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? []
    let loop = Fuzz.loop
    let path = Fuzz.path
    guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else { return 0 }
    var options = LuaRuntimeOptions()
    options.memoryLimit = 4 << 20
    options.timeLimit = .milliseconds(30)
    let log = Fuzz.logger
    let opts = options
    do {
        let runtime = try loop.submit { try LuaRuntime(eventLoop: loop, options: opts, logger: log) }.wait()
        let stop = loop.scheduleTask(in: .milliseconds(100)) { runtime.stop() }
        _ = try runtime.start(policyAt: path).wait()
        stop.cancel()
        // Drop the runtime on its loop, as its owner would.
        try loop.submit { _ = runtime }.wait()
    } catch {
        print("runtime error: \(error)")
        abort()
    }
    return 0
}

runFuzzer { data, size in fuzzOne(data, size) }
