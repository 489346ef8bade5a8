import ColorunTestSupport
import NIOCore
import QEMULab
import QMP
import QMPClient
import Testing

/// Round-trip latency of `query-status` through both APIs (printed; asserted only loosely,
/// since the machine is shared). QEMU itself answers in about 0.25 ms under TCG.
@Suite(.serialized, .timeLimit(.minutes(2)), .machine(.exclusive)) struct LatencyTests {
    static let rounds = 1000

    private func percentiles(_ samples: [Int64]) -> (p50: Double, p99: Double) {
        let sorted = samples.sorted()
        return (Double(sorted[sorted.count / 2]) / 1e6, Double(sorted[sorted.count * 99 / 100]) / 1e6)
    }

    @Test func queryStatusRoundTrips() async throws {
        try await withQEMU { _, connection async throws in
            // Callback API, driven from the loop: each completion sends the next command.
            let loop = connection.eventLoop
            let callbackSamples = try await loop.flatSubmit {
                let promise = loop.makePromise(of: [Int64].self)
                var samples: [Int64] = []
                samples.reserveCapacity(Self.rounds)
                let sync = connection.syncOperations
                func next() {
                    let start = NIODeadline.now()
                    sync.send("query-status") { result in
                        samples.append((NIODeadline.now() - start).nanoseconds)
                        guard case .success = result else {
                            promise.fail(QMPClientError.connectFailed(endpoint: connection.endpoint, reason: "\(result)"))
                            return
                        }
                        if samples.count == Self.rounds { promise.succeed(samples) } else { next() }
                    }
                }
                next()
                return promise.futureResult
            }.get()

            var asyncSamples: [Int64] = []
            for _ in 0..<Self.rounds {
                let start = NIODeadline.now()
                _ = try await connection.execute("query-status")
                asyncSamples.append((NIODeadline.now() - start).nanoseconds)
            }
            let cb = percentiles(callbackSamples)
            let asy = percentiles(asyncSamples)
            print("query-status x\(Self.rounds): callback p50 \(cb.p50) ms p99 \(cb.p99) ms; async p50 \(asy.p50) ms p99 \(asy.p99) ms")
            #expect(callbackSamples.count == Self.rounds && asyncSamples.count == Self.rounds)
            #expect(cb.p50 < 5 && asy.p50 < 5)
        }
    }
}
