import Colorun
import ColorunOperator
import Dispatch
import Logging
import LuaRuntime
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization
import UnixSignals

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One `colorun run`: the session, its services under swift-service-lifecycle, the signals,
/// the live status and the summary.
///
/// The run is a `ServiceGroup`: the services given to `run(alongside:)` (the metrics server)
/// first, the policy last. The group turns the first SIGTERM or SIGINT into a graceful
/// shutdown, in reverse order: the policy stops (no new checkpoint starts, in-flight ones
/// finish or roll back, every domain the run stopped is resumed, the summary is printed),
/// then the metrics server closes. A policy that ends by itself (finished, `policy.stop()`,
/// failed, `--duration`) shuts the group down the same way. ServiceGroup acts on the first
/// signal only; the second one ("stop waiting") is colorun's own, read from a
/// `UnixSignalsSequence` of the same package that also names the signal in the log.
struct PolicyRunner {
    var options: PolicyOptions
    var logger: Logger
    var liveStatus: Bool
    /// After a second signal, the process exits this long later whatever the session does.
    var hardDeadline: DispatchTimeInterval = .seconds(5)
    /// Extra Lua modules and shutdown work for the session (the place for `--lab`), made on
    /// the session's event loop.
    var makeExtensions: @Sendable () throws -> [any PolicyExtension] = { [] }

    /// Runs the policy, with `services` started before it and stopped after it, and returns
    /// the exit code.
    func run(alongside services: [any Service] = []) async -> Int32 {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let session: PolicySession
        do {
            session = try await loop.submit { [options, logger, makeExtensions] in
                try PolicySession(options: options, eventLoop: loop, logger: logger, extensions: try makeExtensions())
            }.get()
        } catch {
            writeStandardError("colorun: \(error)")
            return 2
        }
        // Trapped before the group starts, so no signal goes by unnamed.
        let signals = await UnixSignalsSequence(trapping: .sigterm, .sigint)
        let policy = PolicyService(runner: self, session: session, signals: signals)
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(
            services: services.map {
                // A metrics server that fails leaves the policy running.
                ServiceGroupConfiguration.ServiceConfiguration(service: $0, successTerminationBehavior: .ignore, failureTerminationBehavior: .ignore)
            } + [
                ServiceGroupConfiguration.ServiceConfiguration(
                    service: policy, successTerminationBehavior: .gracefullyShutdownGroup, failureTerminationBehavior: .gracefullyShutdownGroup),
            ],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        do {
            try await group.run()
        } catch {
            logger.error("the run's services ended with an error", metadata: ["error": .string("\(error)")])
        }
        return policy.exitCode ?? 1
    }

    /// The policy run as a service: runs the session until the policy ends; a graceful
    /// shutdown stops it cleanly; a second signal stops waiting.
    final class PolicyService: Service, CustomStringConvertible {
        let runner: PolicyRunner
        let session: PolicySession
        let signals: UnixSignalsSequence
        private let result = Mutex<Int32?>(nil)

        init(runner: PolicyRunner, session: PolicySession, signals: UnixSignalsSequence) {
            self.runner = runner
            self.session = session
            self.signals = signals
        }

        var description: String { "policy \(runner.options.policyPath)" }
        var exitCode: Int32? { result.withLock { $0 } }

        func run() async throws {
            let code = await runPolicy()
            result.withLock { $0 = code }
        }

        private func runPolicy() async -> Int32 {
            let (options, logger, session) = (runner.options, runner.logger, self.session)
            let started = NIODeadline.now()
            let watcher = Task { [signals, hardDeadline = runner.hardDeadline] in
                var count = 0
                for await signal in signals {
                    count += 1
                    let name = signal == .sigterm ? "SIGTERM" : signal == .sigint ? "SIGINT" : "\(signal)"
                    if count == 1 {
                        logger.notice("\(name): stopping; in-flight checkpoints finish or roll back, stopped domains are resumed (send it again to stop waiting)")
                        // The group's graceful shutdown stops the session too; whichever comes first.
                        session.stop()
                    } else if count == 2 {
                        logger.warning("\(name) again: not waiting for in-flight checkpoints; resuming stopped domains now, exiting within \(hardDeadline)")
                        session.stop()
                        _ = session.resumeStoppedDomainsNow()
                        DispatchQueue.global().asyncAfter(deadline: .now() + hardDeadline) {
                            PolicyRunner.giveUp(session: session, started: started, policy: options.policyPath)
                        }
                    }
                }
            }
            defer { watcher.cancel() }

            let loop = session.eventLoop
            let ticker = runner.liveStatus ? loop.scheduleRepeatedTask(initialDelay: .milliseconds(250), delay: .milliseconds(250)) { _ in
                session.status().whenSuccess { status in
                    let elapsed = Double((NIODeadline.now() - started).nanoseconds) / 1e9
                    writeStandardOutput("\r\u{1B}[2K" + status.line(elapsedSeconds: elapsed))
                }
            } : nil

            let report: PolicyReport
            do {
                report = try await withGracefulShutdownHandler {
                    try await session.run().get()
                } onGracefulShutdown: {
                    session.stop()
                }
            } catch {
                // The run future does not fail; be safe anyway.
                ticker?.cancel()
                writeStandardError("colorun: \(error)")
                return 1
            }
            ticker?.cancel()
            if runner.liveStatus { writeStandardOutput("\r\u{1B}[2K") }

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
        writeStandardError("colorun: exiting before the session ended; NOT RESUMED: \(stillStopped.joined(separator: ", ")) -- these VMs may still be paused; the next colorun run with the same --state-dir (and --runtime-dir, if given) resumes them")
        exit(1)
    }
}
