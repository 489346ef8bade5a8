import ArgumentParser
import Colorun
import ColorunOperator
import Logging

struct CheckCommand: ColorunSubcommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Load and validate a policy without touching any VM.",
        discussion: """
            Compiles the file, then runs its main chunk in a dry run: a throw-away state \
            directory, and domains whose monitors are never connected. Errors at top level \
            (syntax errors, undefined globals, bad arguments, unknown domains) are reported \
            as FILE:LINE. The dry run ends with the main chunk (timers and event handlers it \
            sets up never run) or at its first QMP command, which passes. exec.run is refused.

            Name the domains the policy expects with --domain NAME (an endpoint may be given \
            but is never used).

            Exit codes: 0 the policy loads; 2 it does not (or bad usage).
            """
    )

    @OptionGroup var policy: PolicyArguments

    @Flag(name: .shortAndLong, help: "Print nothing when the policy is fine.")
    var quiet = false

    func validate() throws {
        _ = try policy.makeOptions(allowBareDomainNames: true)
    }

    func run() async throws { try await execute() }

    func execute() async throws {
        let options = try policy.makeOptions(allowBareDomainNames: true)
        var logger = Logger(label: "colorun.check") { _ in SwiftLogNoOpLogHandler() }
        logger.logLevel = .critical
        switch await PolicyCheck.check(options, logger: logger) {
        case .success(let passed):
            if !quiet {
                for note in passed.notes { writeStandardOutput("\(policy.policy): note: \(note)\n") }
                writeStandardOutput("\(policy.policy): ok\n")
            }
        case .failure(let failure):
            writeStandardError("colorun check: \(failure)")
            throw ExitCode(2)
        }
    }
}
