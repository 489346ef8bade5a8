import ArgumentParser
import Colorun

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

struct ColorunCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "colorun",
        abstract: "Run VM-replication checkpoint policies (Remus/COLO) written in Lua against QEMU's QMP monitor.",
        discussion: """
            `colorun POLICY.lua` is short for `colorun run POLICY.lua`. Before deploying a \
            policy: `colorun check POLICY.lua` (no VM touched), `colorun --sim POLICY.lua \
            --fault primary=@3s:crash` (simulated domains), and `colorun stubs DIR` for the \
            editor.

            Exit codes: 0 clean end (the policy finished, called policy.stop(), reached \
            --duration, or SIGTERM/SIGINT), 1 the policy failed at run time, 2 usage or load \
            error (bad option, missing file, syntax error).
            """,
        version: colorunVersion,
        subcommands: [RunCommand.self, CheckCommand.self, QMPCommand.self, StubsCommand.self, FleetCommand.self, COLOArgsCommand.self],
        defaultSubcommand: RunCommand.self
    )

    /// Exits with colorun's codes: argument-parser's usage errors (64) become 2.
    static func exitAfter(_ error: any Error) -> Never {
        if let code = error as? ExitCode { processExit(code.rawValue) }
        let code = exitCode(for: error)
        if code == .validationFailure {
            writeStandardError(fullMessage(for: error))
            processExit(2)
        }
        exit(withError: error)
    }
}

/// A subcommand; `execute()` does its work (a name of its own: on an existential,
/// `run()` would pick ParsableCommand's synchronous one).
protocol ColorunSubcommand: AsyncParsableCommand {
    func execute() async throws
}

/// Writes a line to stderr (unbuffered).
func writeStandardError(_ text: String) {
    let line = text.hasSuffix("\n") ? text : text + "\n"
    var bytes = Array(line.utf8)[...]
    while !bytes.isEmpty {
        let n = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
        if n <= 0 { return }
        bytes = bytes.dropFirst(n)
    }
}

/// Writes text to stdout (unbuffered: the live status and the summary must not wait in a buffer).
func writeStandardOutput(_ text: String) {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let n = bytes.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
        if n <= 0 { return }
        bytes = bytes.dropFirst(n)
    }
}

func processExit(_ code: Int32) -> Never { exit(code) }
