import Colorun
import ColorunOperator
import Dispatch
import Logging
import LuaRuntime
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One `colorun run`: the session, the signals, the live status and the summary.
struct PolicyRunner {
    var options: PolicyOptions
    var logger: Logger
    var liveStatus: Bool
    /// After a second signal, the process exits this long later whatever the session does.
    var hardDeadline: DispatchTimeInterval = .seconds(5)
    /// Extra Lua modules and shutdown work for the session (the place for `--lab`), made on
    /// the session's event loop.
    var makeExtensions: @Sendable () throws -> [any PolicyExtension] = { [] }

    /// Runs the policy and returns the exit code.
    func run() async -> Int32 {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let started = NIODeadline.now()
        let session: PolicySession
        do {
            session = try await loop.submit { [options, logger, makeExtensions] in
                try PolicySession(options: options, eventLoop: loop, logger: logger, extensions: try makeExtensions())
            }.get()
        } catch {
            writeStandardError("colorun: \(error)")
            return 2
        }

        let signals = SignalWatcher(signals: [SIGTERM, SIGINT]) { [logger, hardDeadline] name, count in
            if count == 1 {
                logger.notice("\(name): stopping; in-flight checkpoints finish or roll back, stopped domains are resumed (send it again to stop waiting)")
                session.stop()
            } else if count == 2 {
                logger.warning("\(name) again: not waiting for in-flight checkpoints; resuming stopped domains now, exiting within \(hardDeadline)")
                session.stop()
                _ = session.resumeStoppedDomainsNow()
                DispatchQueue.global().asyncAfter(deadline: .now() + hardDeadline) {
                    Self.giveUp(session: session, started: started, policy: options.policyPath)
                }
            }
        }

        let ticker = liveStatus ? loop.scheduleRepeatedTask(initialDelay: .milliseconds(250), delay: .milliseconds(250)) { _ in
            session.status().whenSuccess { status in
                let elapsed = Double((NIODeadline.now() - started).nanoseconds) / 1e9
                writeStandardOutput("\r\u{1B}[2K" + status.line(elapsedSeconds: elapsed))
            }
        } : nil

        let report: PolicyReport
        do {
            report = try await session.run().get()
        } catch {
            // The run future does not fail; be safe anyway.
            ticker?.cancel()
            writeStandardError("colorun: \(error)")
            return 1
        }
        ticker?.cancel()
        signals.cancel()
        if liveStatus { writeStandardOutput("\r\u{1B}[2K") }

        let elapsed = Double((NIODeadline.now() - started).nanoseconds) / 1e9
        writeStandardOutput(PolicySummary.format(report, policy: options.policyPath, elapsedSeconds: elapsed) + "\n")
        switch report.outcome {
        case .finished, .stopped:
            return 0
        case .failed(let failure):
            if failure.task == "main" && failure.traceback.isEmpty {
                // The file did not load (it changed since the check before the run).
                writeStandardError("colorun: cannot load the policy: \(failure.message)")
                return 2
            }
            writeStandardError("colorun: the policy failed: \(failure.message)" + (failure.traceback.isEmpty ? "" : "\n\(failure.traceback)"))
            return 1
        }
    }

    /// The hard deadline after a second signal: say what is known, then exit.
    static func giveUp(session: PolicySession, started: NIODeadline, policy: String) -> Never {
        let stillStopped = (try? session.domainsStoppedByThisRun().wait()) ?? ["(unknown: the session did not answer)"]
        if let status = try? session.status().wait() {
            let elapsed = Double((NIODeadline.now() - started).nanoseconds) / 1e9
            writeStandardOutput("colorun: \(policy) gave up waiting: \(status.line(elapsedSeconds: elapsed))\n")
        }
        if stillStopped.isEmpty {
            writeStandardError("colorun: exiting before the session ended; every domain this run stopped was resumed")
            exit(0)
        }
        writeStandardError("colorun: exiting before the session ended; NOT RESUMED: \(stillStopped.joined(separator: ", ")) -- these VMs may still be paused; the next colorun run with the same --state-dir resumes them")
        exit(1)
    }
}

/// SIGTERM/SIGINT through Dispatch signal sources; `handler(name, count)` runs on a private queue.
final class SignalWatcher: @unchecked Sendable {
    private let queue = DispatchQueue(label: "colorun.signals")
    private var sources: [any DispatchSourceSignal] = []
    private var count = 0

    init(signals: [Int32], handler: @escaping @Sendable (String, Int) -> Void) {
        for signo in signals {
            signal(signo, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signo, queue: queue)
            let name = signo == SIGTERM ? "SIGTERM" : signo == SIGINT ? "SIGINT" : "signal \(signo)"
            source.setEventHandler { [unowned self] in
                count += 1
                handler(name, count)
            }
            source.resume()
            sources.append(source)
        }
    }

    func cancel() {
        queue.sync {
            for source in sources { source.cancel() }
        }
    }
}
