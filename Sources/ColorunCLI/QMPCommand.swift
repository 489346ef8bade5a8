import ArgumentParser
import Colorun
import ColorunOperator
import Logging
import NIOPosix

struct QMPCommand: ColorunSubcommand {
    static let configuration = CommandConfiguration(
        commandName: "qmp",
        abstract: "Send one QMP command to a monitor and print the reply.",
        discussion: """
            Connects to ENDPOINT (unix:PATH, tcp:HOST:PORT or tls:HOST:PORT[,dir=DIR]), negotiates capabilities, sends \
            COMMAND with JSON-ARGS (a JSON object) and prints the reply's `return` value as \
            JSON on stdout. QEMU serves one client per monitor: while a colorun run holds the \
            monitor, this command waits for the greeting and times out.

            Examples:
              colorun qmp unix:/run/qemu/web.qmp query-status
              colorun qmp unix:/run/q.qmp migrate '{"uri": "exec:cat >/tmp/vm"}'
              colorun qmp --compact tcp:127.0.0.1:4444 query-migrate
              colorun qmp tls:10.0.0.12:4444,dir=/etc/colorun/tls query-status

            Exit codes: 0 the command succeeded; 1 the monitor answered an error or could not \
            be reached (`CLASS: desc` on stderr); 2 bad usage.
            """
    )

    @Argument(help: ArgumentHelp("The monitor: unix:PATH, tcp:HOST:PORT or tls:HOST:PORT[,OPTION=VALUE]... (options dir=, ca=, cert=, key=, hostname=).", valueName: "ENDPOINT"))
    var endpoint: String

    @Argument(help: ArgumentHelp("The QMP command, e.g. query-status.", valueName: "COMMAND"))
    var command: String

    @Argument(help: ArgumentHelp("The command's arguments as a JSON object.", valueName: "JSON-ARGS"))
    var arguments: String?

    @Flag(name: .shortAndLong, help: "Print the reply on one line.")
    var compact = false

    @Option(name: .customLong("timeout"), help: ArgumentHelp("How long to wait for the monitor and the reply.", valueName: "D"))
    var timeout: DurationArgument?

    func run() async throws { try await execute() }

    func execute() async throws {
        let failure: QMPOneShot.Failure
        do throws(QMPOneShot.Failure) {
            let (parsedEndpoint, parsedArguments) = try QMPOneShot.parse(endpoint: endpoint, arguments: arguments)
            let logger = Logger(label: "colorun.qmp") { _ in SwiftLogNoOpLogHandler() }
            let reply = try await QMPOneShot.execute(
                endpoint: parsedEndpoint, command: command, arguments: parsedArguments,
                timeout: timeout?.duration.timeAmount ?? .seconds(5), on: MultiThreadedEventLoopGroup.singleton, logger: logger)
            writeStandardOutput((compact ? QMPOneShot.compact(reply) : QMPOneShot.pretty(reply)) + "\n")
            return
        } catch {
            failure = error
        }
        switch failure {
        case .usage(let text):
            writeStandardError("colorun qmp: \(text)")
            throw ExitCode(2)
        case .command:
            writeStandardError(failure.description)
            throw ExitCode(1)
        }
    }
}
