import Logging
import Synchronization
import Testing
@testable import ColorunTestSupport

/// The shared test support: the lock behind `.machine(_:)` and the log collector.
@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct TestSupportTests {
    /// An exclusive holder overlaps nobody; shared holders overlap each other.
    @Test func machineLockExcludesAndShares() async {
        let lock = MachineLock()
        let seen = Holders()
        await withTaskGroup(of: Void.self) { group in
            for i in 0..<40 {
                let use: MachineUse = i % 4 == 0 ? .exclusive : .shared
                group.addTask {
                    await lock.acquire(use)
                    seen.state.withLock { s in
                        if s.exclusive > 0 || (use == .exclusive && s.shared > 0) { s.violations += 1 }
                        if use == .exclusive { s.exclusive += 1 } else { s.shared += 1 }
                        s.maxShared = max(s.maxShared, s.shared)
                    }
                    try? await Task.sleep(for: .milliseconds(5))   // the hold
                    seen.state.withLock { s in
                        if use == .exclusive { s.exclusive -= 1 } else { s.shared -= 1 }
                    }
                    await lock.release(use)
                }
            }
        }
        let result = seen.state.withLock { $0 }
        #expect(result.violations == 0)
        #expect(result.maxShared > 1, "shared holders run together")
    }

    @Test func logCollectorKeepsLevelMessageAndSortedMetadata() {
        let logs = LogCollector()
        var logger = logs.logger("t", level: .debug)
        logger[metadataKey: "z"] = "last"
        logger.debug("hello", metadata: ["a": "first"])
        logger.trace("below the level")
        logs.append("raw line")
        #expect(logs.lines == ["debug hello a=first z=last", "raw line"])
        #expect(logs.contains("a=first") && logs.count("hello") == 1)
    }
}

/// Who holds the lock in `machineLockExcludesAndShares`, and what went wrong.
private final class Holders: Sendable {
    struct Seen { var shared = 0, exclusive = 0, violations = 0, maxShared = 0 }
    let state = Mutex(Seen())
}
