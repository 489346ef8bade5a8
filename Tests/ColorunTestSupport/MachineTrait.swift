#if canImport(Glibc)
import Glibc
#endif
import Testing

/// How a suite uses the machine, for `swift test` running suites in parallel.
///
/// `.serialized` orders the tests of one suite only. Suites that start QEMU guests (each keeps
/// a core busy) or assert timing (a failover within 1 s, a dead peer noticed quickly) must not
/// share a 2-core machine with other suites, whatever their target: they are `.exclusive`.
/// Every other suite is `.shared`: shared suites run alongside each other, never alongside an
/// exclusive one. Under `swift test --no-parallel` everything runs one at a time anyway and the
/// lock is never contended.
public enum MachineUse: Sendable, Equatable {
    case shared
    case exclusive
}

/// The suite trait behind `.machine(_:)`: the whole suite (every test in it) runs while holding
/// a process-wide readers-writer lock, shared or exclusive. The test bundle is one process for
/// all test targets, so the lock orders suites across targets.
///
/// A suite trait only, and not recursive: the lock is taken once around the suite, never per
/// test, so a waiting suite holds nothing its peers need. A suite nested in one that holds the
/// lock runs under its parent's hold.
public struct MachineTrait: SuiteTrait, TestScoping {
    public let use: MachineUse

    public var isRecursive: Bool { false }

    public func provideScope(
        for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void
    ) async throws {
        if let held = MachineLock.held {
            precondition(held == .exclusive || use == .shared,
                         "\(test.name): an exclusive suite nested in a shared one would deadlock")
            try await function()
            return
        }
        await MachineLock.shared.acquire(use)
        do {
            try await MachineLock.$held.withValue(use) { try await function() }
        } catch {
            await MachineLock.shared.release(use)
            throw error
        }
        await MachineLock.shared.release(use)
    }
}

extension Trait where Self == MachineTrait {
    /// Runs the suite alone (`.exclusive`) or beside other shared suites only (`.shared`).
    public static func machine(_ use: MachineUse) -> Self { MachineTrait(use: use) }
}

/// A fair (first come, first served) readers-writer lock for async code: a waiting exclusive
/// holder is not overtaken by shared holders arriving after it.
actor MachineLock {
    static let shared = MachineLock()

    /// What the current task (and its child tasks: the suite's tests) holds.
    @TaskLocal static var held: MachineUse?

    private var sharedHolders = 0
    private var exclusiveHeld = false
    private var waiting: [(use: MachineUse, continuation: CheckedContinuation<Void, Never>)] = []

    func acquire(_ use: MachineUse) async {
        if waiting.isEmpty && canGrant(use) {
            grant(use)
            return
        }
        await withCheckedContinuation { waiting.append((use, $0)) }
    }

    func release(_ use: MachineUse) {
        switch use {
        case .shared: sharedHolders -= 1
        case .exclusive: exclusiveHeld = false
        }
        while let first = waiting.first, canGrant(first.use) {
            waiting.removeFirst()
            grant(first.use)
            first.continuation.resume()
        }
    }

    private func canGrant(_ use: MachineUse) -> Bool {
        switch use {
        case .shared: !exclusiveHeld
        case .exclusive: !exclusiveHeld && sharedHolders == 0
        }
    }

    private func grant(_ use: MachineUse) {
        switch use {
        case .shared: sharedHolders += 1
        case .exclusive: exclusiveHeld = true
        }
    }
}

/// True when the running kernel's release (uname) is at least MAJOR.MINOR.
public func linuxAtLeast(_ major: Int, _ minor: Int) -> Bool {
    var name = utsname()
    guard uname(&name) == 0 else { return false }
    let release = withUnsafeBytes(of: &name.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
    let parts = release.split(whereSeparator: { !$0.isNumber }).prefix(2).compactMap { Int($0) }
    guard parts.count == 2 else { return false }
    return (parts[0], parts[1]) >= (major, minor)
}
