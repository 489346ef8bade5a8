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
/// 2. A static pass over the compiled chunk (`LuaGlobalScan`) finds, in every function of
///    the file (timer, event and failover handlers included), reads of globals that nothing
///    defines (`polcy`) and fields of colorun's modules and the standard libraries that do
///    not exist (`qmp.stpo`), each as `path:line: message` with a suggestion. What counts
///    as defined: the policy's environment after the dry run (so globals its main chunk and
///    its required modules set are known) and every global and module field the file assigns.
/// 3. The main chunk runs in a dry session: a throw-away state directory, and domains whose
///    monitors are never connected (every QMP command fails with class `DryRun`). Without
///    `--domain`, any domain name is accepted and listed; with them, only those names. An
///    error at top level fails the check; the chunk's first VM access ends the dry run
///    there, as a pass. Timers and event handlers the chunk sets up are never run.
/// 4. With `lab: true` the `lab` module exists (its functions end the dry run like a VM
///    access), and a policy that uses the Xen cycle is refused as `colorun --lab` refuses it.
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
        /// The domains the main chunk asked for (or was given), in order.
        public var domains: [String] = []
    }

    public static let dryRunRefusal = "colorun check: this dry run never touches a VM"

    /// Checks `options.policyPath`. `options.domains` name the domains the policy expects
    /// (their endpoints are never used). `mainChunkLimit` bounds a main chunk that sleeps
    /// or loops.
    public static func check(_ options: PolicyOptions, lab: Bool = false, logger: Logger,
                             mainChunkLimit: TimeAmount = .milliseconds(500)) async -> Result<Passed, Failure> {
        let scan: LuaGlobalScan
        switch LuaGlobalScan.scan(fileAt: options.policyPath) {
        case .failure(let error): return .failure(Failure(message: error.description, traceback: ""))
        case .success(let s): scan = s
        }
        var findings: [String] = []
        if lab {
            for use in Lab.xenCycleUses(scan) {
                findings.append("\(options.policyPath):\(use.line): \(use.name): refused under --lab: \(Lab.xenCycleRefusal)")
            }
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
        dry.acceptAnyDomain = options.domains.isEmpty
        if lab {
            // Every domain is a lab domain: the Xen cycle is refused as --lab refuses it.
            dry.domainOptions.refusedCommands["xen-load-devices-state"] = Lab.xenCycleRefusal
            // The lab's names exist whatever else --domain names.
            for name in ["primary", "secondary"] where !dry.domains.contains(where: { $0.name == name }) && !dry.domains.isEmpty {
                dry.domains.append(DomainSpec(name: name, endpoint: .unix(path: "/nonexistent/colorun-check/\(name)")))
            }
        }

        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let session: PolicySession
        do {
            session = try await loop.submit { [dry] in
                try PolicySession(options: dry, eventLoop: loop, logger: logger, extensions: lab ? [DryLab()] : [])
            }.get()
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
        let environment = (try? await session.environmentSnapshot().get()) ?? LuaEnvironmentSnapshot()
        passed.domains = (try? await session.domainNames().get()) ?? []
        findings += staticFindings(scan, environment: environment, path: options.policyPath, lab: lab)
        if timedOut.value {
            passed.notes.append("the main chunk was still running after \(mainChunkLimit.nanoseconds / 1_000_000) ms (a loop or sleep at top level); checked up to there")
        }
        if case .failed(let failure) = report.outcome {
            if failure.message.contains(dryRunRefusal) {
                passed.notes.append("the dry run stopped at the first VM access: \(firstLine(failure.message))")
            } else {
                if findings.isEmpty { return .failure(Failure(message: failure.message, traceback: failure.traceback)) }
                // The static pass may have named the same line already.
                let position = failure.message.split(separator: " ", maxSplits: 1).first.map(String.init) ?? ""
                if !(position.hasSuffix(":") && findings.contains { $0.hasPrefix(position) }) {
                    findings.append(failure.message)
                }
            }
        }
        if !findings.isEmpty {
            return .failure(Failure(message: findings.joined(separator: "\n"), traceback: ""))
        }
        return .success(passed)
    }

    /// The static pass's verdicts, `path:line: message`, in line order.
    static func staticFindings(_ scan: LuaGlobalScan, environment: LuaEnvironmentSnapshot, path: String, lab: Bool) -> [String] {
        let written = Set(scan.accesses.filter { $0.kind == .write }.map(\.name))
        var seen: Set<String> = []
        var findings: [String] = []
        for access in scan.accesses where access.kind == .read {
            let parts = access.name.split(separator: ".").map(String.init)
            guard !written.contains(parts[0]) else { continue }   // the policy sets that global itself
            var message: String?
            if parts.count == 1 {
                if !environment.globals.contains(access.name) {
                    message = "undefined global '\(access.name)'"
                    if LuaAPI.labOnly.contains(access.name) && !lab {
                        message! += " (the lab module exists only under --lab: check with --lab)"
                    } else if let guess = closest(access.name, among: environment.globals.union(written)) {
                        message! += " (did you mean '\(guess)'?)"
                    }
                }
            } else {
                let table = parts.dropLast().joined(separator: ".")
                if let fields = environment.tables[table], !fields.contains(parts.last!), !written.contains(access.name) {
                    let colorunModule = LuaAPI.entries.contains { $0.name.hasPrefix(table + ".") }
                    message = colorunModule
                        ? "'\(access.name)' is not part of colorun's API"
                        : "'\(access.name)' does not exist"
                    if let guess = closest(parts.last!, among: fields) {
                        message! += " (did you mean '\(table).\(guess)'?)"
                    } else {
                        message! += " (\(table) has: \(fields.sorted().joined(separator: ", ")))"
                    }
                }
            }
            if let message {
                let line = "\(path):\(access.line): \(message)"
                if seen.insert(line).inserted { findings.append(line) }
            }
        }
        return findings
    }

    /// The candidate nearest to `name` (edit distance at most 2, and less than its length).
    static func closest(_ name: String, among candidates: Set<String>) -> String? {
        let limit = min(2, max(1, name.count - 1))
        var best: (String, Int)?
        for candidate in candidates.sorted() {
            let d = editDistance(name, candidate)
            if d <= limit, d < (best?.1 ?? Int.max) { best = (candidate, d) }
        }
        return best?.0
    }

    static func firstLine(_ text: String) -> String {
        String(text.split(separator: "\n", maxSplits: 1).first ?? "")
    }

    /// Levenshtein distance, a swap of two neighbours counting as one edit.
    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        if a.isEmpty || b.isEmpty { return max(a.count, b.count) }
        var older = [Int](repeating: 0, count: b.count + 1)
        var previous = Array(0...b.count)
        for i in 1...a.count {
            var current = [i] + Array(repeating: 0, count: b.count)
            for j in 1...b.count {
                current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
                if i > 1, j > 1, a[i - 1] == b[j - 2], a[i - 2] == b[j - 1] { current[j] = min(current[j], older[j - 2] + 1) }
            }
            older = previous
            previous = current
        }
        return previous[b.count]
    }
}

/// Set on the loop, read after the run's future completed (which orders the two).
private final class LoopFlag: @unchecked Sendable {
    var value = false
}

/// The `lab` module in a dry run (`colorun check --lab`): every function ends the dry run
/// like a VM access, except `lab.standby`, which only builds a table.
final class DryLab: PolicyExtension {
    func register(in session: PolicySession) throws {
        var functions: [String: LuaHostFunction] = [:]
        for entry in LuaAPI.entries where entry.name.hasPrefix("lab.") {
            let name = String(entry.name.dropFirst(4))
            functions[name] = .sync { _ in throw LuaHostError.message("\(entry.name): \(PolicyCheck.dryRunRefusal)") }
        }
        try session.runtime.registerModule("lab", functions: functions, luaSource: """
            local L = ...
            L.standby = function(name, from) return { name = name, from = from, lab = true } end
            """)
    }

    func shutdown(session: PolicySession) -> EventLoopFuture<Void> {
        session.eventLoop.makeSucceededVoidFuture()
    }
}
