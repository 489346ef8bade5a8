import Colorun
import ColorunSystem
import CoreMetrics
import Logging
import LuaRuntime
import NIOCore
import NIOPosix

/// `colorun check`: loads a policy and runs its main chunk without touching any VM.
///
/// 1. The file is compiled in a bare Lua state (syntax errors, `path:line: message`).
/// 2. The main chunk runs in a dry session: a throw-away state directory, and domains whose
///    monitors are never connected (every QMP command fails with class `DryRun`). An error
///    at top level (an undefined global, a bad argument, an unknown domain) fails the check.
///    The chunk's first VM access ends the dry run there, as a pass. Timers and event
///    handlers the chunk set up are never run; the dry run ends when the main chunk ends.
public enum PolicyCheck {
    public struct Failure: Error, Sendable, CustomStringConvertible {
        /// `path:line: message` (or why the file cannot be read).
        public var message: String
        public var traceback: String
        public var description: String { traceback.isEmpty ? message : "\(message)\n\(traceback)" }
    }

    /// What a passing check has to say (e.g. where the dry run stopped).
    public struct Passed: Sendable {
        public var notes: [String] = []
    }

    public static let dryRunRefusal = "colorun check: this dry run never touches a VM"

    /// Checks `options.policyPath`. `options.domains` name the domains the policy expects
    /// (their endpoints are never used). `mainChunkLimit` bounds a main chunk that sleeps
    /// or loops.
    public static func check(_ options: PolicyOptions, logger: Logger,
                             mainChunkLimit: TimeAmount = .milliseconds(500)) async -> Result<Passed, Failure> {
        if let error = LuaRuntime.syntaxError(inFileAt: options.policyPath) {
            return .failure(Failure(message: error, traceback: ""))
        }
        let stateDirectory: String
        do {
            stateDirectory = try makeTemporaryDirectory(prefix: "colorun-check")
        } catch {
            return .failure(Failure(message: "cannot create a temporary state directory: \(error)", traceback: ""))
        }
        defer { removeTree(stateDirectory) }

        var dry = options
        dry.stateDirectory = stateDirectory
        dry.duration = nil
        dry.domainOptions.refuseConnections = dryRunRefusal
        dry.domainOptions.metrics = ColorunMetrics(factory: NOOPMetricsHandler.instance)
        dry.allowExec = false
        dry.lua.uncaughtErrors = .logAndContinue

        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let session: PolicySession
        do {
            session = try await loop.submit { [dry] in try PolicySession(options: dry, eventLoop: loop, logger: logger) }.get()
        } catch {
            return .failure(Failure(message: "\(error)", traceback: ""))
        }
        var passed = Passed()
        let timedOut = LoopFlag()
        let future = session.run()
        // End the dry run as soon as the main chunk is done (timers it armed never fire).
        let deadline = NIODeadline.now() + mainChunkLimit
        let poll = loop.scheduleRepeatedTask(initialDelay: .milliseconds(1), delay: .milliseconds(1)) { task in
            if session.runtime.mainTaskHasEnded {
                task.cancel()
                session.stop()
            } else if NIODeadline.now() > deadline {
                task.cancel()
                timedOut.value = true
                session.stop()
            }
        }
        let report: PolicyReport
        do {
            report = try await future.get()
        } catch {
            poll.cancel()
            return .failure(Failure(message: "\(error)", traceback: ""))
        }
        poll.cancel()
        if timedOut.value {
            passed.notes.append("the main chunk was still running after \(mainChunkLimit.nanoseconds / 1_000_000) ms (a loop or sleep at top level); checked up to there")
        }
        if case .failed(let failure) = report.outcome {
            if failure.message.contains(dryRunRefusal) {
                passed.notes.append("the dry run stopped at the first VM access: \(firstLine(failure.message))")
            } else {
                return .failure(Failure(message: failure.message, traceback: failure.traceback))
            }
        }
        return .success(passed)
    }

    static func firstLine(_ text: String) -> String {
        String(text.split(separator: "\n", maxSplits: 1).first ?? "")
    }
}

/// Set on the loop, read after the run's future completed (which orders the two).
private final class LoopFlag: @unchecked Sendable {
    var value = false
}
