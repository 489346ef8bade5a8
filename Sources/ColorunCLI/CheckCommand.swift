import ArgumentParser
import Colorun
import ColorunOperator
import Logging

struct CheckCommand: ColorunSubcommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Load and validate a policy without touching any VM.",
        discussion: """
            Compiles the file; then a static pass over the compiled chunk finds, in every \
            function (timer, event and failover handlers included), globals nothing defines \
            and names that are not part of colorun's API or the standard libraries \
            (qmp.stpo, polcy.every), each reported as FILE:LINE with a suggestion. Then the \
            main chunk runs in a dry run: a throw-away state directory, and domains whose \
            monitors are never connected. Errors at top level (bad arguments, unknown fields \
            of option tables) are reported as FILE:LINE. The dry run ends with the main chunk \
            (timers and event handlers it sets up never run) or at its first QMP command, \
            which passes. exec.run is refused.

            Without --domain, any domain name the policy asks for is accepted and listed; \
            with --domain NAME (an endpoint may be given but is never used), only those. \
            --lab checks a policy meant for `colorun --lab`: the lab module exists, and the \
            Xen cycle (colo.checkpoint, qmp.restore), which --lab refuses, fails the check.

            Exit codes: 0 the policy loads; 2 it does not (or bad usage).
            """
    )

    @OptionGroup var policy: PolicyArguments

    @Flag(name: .shortAndLong, help: "Print nothing when the policy is fine.")
    var quiet = false

    @Flag(name: .customLong("lab"), help: "Check a policy for `colorun --lab`: the lab module and its domains exist.")
    var lab = false

    func validate() throws {
        _ = try policy.makeOptions(allowBareDomainNames: true)
    }

    func run() async throws { try await execute() }

    func execute() async throws {
        let options = try policy.makeOptions(allowBareDomainNames: true)
        var logger = Logger(label: "colorun.check") { _ in SwiftLogNoOpLogHandler() }
        logger.logLevel = .critical
        switch await PolicyCheck.check(options, lab: lab, logger: logger) {
        case .success(let passed):
            if !quiet {
                for note in passed.notes { writeStandardOutput("\(policy.policy): note: \(note)\n") }
                if options.domains.isEmpty && !passed.domains.isEmpty {
                    let given = lab ? " (the lab provides primary and secondary)" : " (name them with --domain NAME=ENDPOINT when you run it)"
                    writeStandardOutput("\(policy.policy): domains: \(passed.domains.joined(separator: ", "))\(given)\n")
                }
                writeStandardOutput("\(policy.policy): ok\n")
            }
        case .failure(let failure):
            writeStandardError("colorun check: \(failure)")
            throw ExitCode(2)
        }
    }
}
