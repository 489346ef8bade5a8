/// `waitUntil` gave up.
public struct WaitTimeout: Error, CustomStringConvertible {
    public var what: String
    public var after: Duration
    public var description: String { "timed out after \(after) waiting for \(what)" }
}

/// Polls `condition` every `interval` until it holds; throws `WaitTimeout` naming `what` if it
/// still does not after `timeout`. For states that offer no signal to await (another process's
/// files, a simulated VM's run state); the deadline is generous because a loaded machine is slow,
/// and a test that passes returns as soon as the state is reached.
public func waitUntil(
    _ what: String, timeout: Duration = .seconds(10), interval: Duration = .milliseconds(10),
    _ condition: () async throws -> Bool
) async throws {
    let clock = ContinuousClock()
    let deadline = clock.now + timeout
    while true {
        if try await condition() { return }
        if clock.now >= deadline { throw WaitTimeout(what: what, after: timeout) }
        try await Task.sleep(for: interval)
    }
}
