import NIOCore

extension PolicySession {
    /// Sends `cont` now to every domain this run stopped, without waiting for in-flight
    /// checkpoints (a checkpoint caught in the middle fails at its next step and rolls back).
    /// For an operator's second SIGTERM. Callable from any thread.
    public func resumeStoppedDomainsNow() -> EventLoopFuture<Void> {
        eventLoop.flatSubmit { [self] in resumeStoppedDomains() }
    }

    /// Domains this run stopped and has not resumed (yet). Callable from any thread.
    public func domainsStoppedByThisRun() -> EventLoopFuture<[String]> {
        eventLoop.submit { [self] in domainOrder.filter { domains[$0]?.stoppedByUs ?? false } }
    }
}
