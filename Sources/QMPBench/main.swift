// qmp-bench: query-status round-trip latency against a QEMU it starts, through the callback
// API (driven on the loop) and the async API. Build it in release:
//   swift build -c release --product qmp-bench && .build/release/qmp-bench [rounds]
import Logging
import NIOCore
import NIOPosix
import QEMULab
import QMPClient

#if canImport(Glibc)
import Glibc
#endif

/// CPU time (user + system) of this process, all threads, in microseconds.
func processCPUMicros() -> Int {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return (usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1_000_000 + Int(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec)
}

let rounds = CommandLine.arguments.dropFirst().first.flatMap { Int($0) } ?? 1000
let logger = Logger(label: "qmp-bench")
let group = MultiThreadedEventLoopGroup.singleton

func summary(_ label: String, _ samples: [Int64], cpuMicros: Int) {
    let sorted = samples.sorted()
    func ms(_ p: Int) -> String {
        let value = Double(sorted[min(sorted.count - 1, sorted.count * p / 100)]) / 1e6
        return String((value * 1000).rounded() / 1000)
    }
    let cpu = Double(cpuMicros) / Double(sorted.count)
    print("\(label): n=\(sorted.count) p50 \(ms(50)) ms  p90 \(ms(90)) ms  p99 \(ms(99)) ms  client CPU \((cpu * 10).rounded() / 10) us/command")
}

let qemu = try QEMUInstance.start()
do {
    let connection = try await qemu.connect(on: group, logger: logger)
    let loop = connection.eventLoop

    for pass in 1...2 {
        var cpuStart = processCPUMicros()
        let callbackSamples = try await loop.flatSubmit {
            let promise = loop.makePromise(of: [Int64].self)
            var samples: [Int64] = []
            samples.reserveCapacity(rounds)
            let sync = connection.syncOperations
            func next() {
                let start = NIODeadline.now()
                sync.send("query-status") { result in
                    samples.append((NIODeadline.now() - start).nanoseconds)
                    if case .failure(let error) = result { promise.fail(error); return }
                    if samples.count == rounds { promise.succeed(samples) } else { next() }
                }
            }
            next()
            return promise.futureResult
        }.get()
        summary("pass \(pass) callback", callbackSamples, cpuMicros: processCPUMicros() - cpuStart)
        cpuStart = processCPUMicros()

        var asyncSamples: [Int64] = []
        asyncSamples.reserveCapacity(rounds)
        for _ in 0..<rounds {
            let start = NIODeadline.now()
            _ = try await connection.execute("query-status")
            asyncSamples.append((NIODeadline.now() - start).nanoseconds)
        }
        summary("pass \(pass) async   ", asyncSamples, cpuMicros: processCPUMicros() - cpuStart)
    }
    await connection.close()
} catch {
    print("error: \(error)\n\(qemu.stderrText())")
}
await qemu.stop()
