import ArgumentParser
import Colorun
import Logging
import LuaRuntime
import NIOCore

/// What `run` and `check` share: the policy file, its domains and its module path.
struct PolicyArguments: ParsableArguments {
    @Argument(help: ArgumentHelp("The policy file (Lua 5.4 text).", valueName: "POLICY.lua"))
    var policy: String

    @Option(name: .customLong("domain"), help: ArgumentHelp(
        "A domain the policy drives, by name: NAME=unix:PATH, NAME=tcp:HOST:PORT or NAME=tls:HOST:PORT[,dir=DIR] (repeatable).",
        valueName: "NAME=ENDPOINT"))
    var domains: [String] = []

    @Option(name: .customLong("shared"), help: ArgumentHelp(
        "Share the monitor of domain NAME with another program (libxl, Proxmox): connect for each command or burst and close again (repeatable).",
        valueName: "NAME"))
    var shared: [String] = []

    @Option(name: .customLong("lua-path"), help: ArgumentHelp(
        "Extra directories searched by require(), colon-separated, after the policy's own directory.",
        valueName: "DIRS"))
    var luaPath: String?

    /// Options built from these arguments; errors name the flag.
    func makeOptions(allowBareDomainNames: Bool = false) throws -> PolicyOptions {
        var options = PolicyOptions(policyPath: policy)
        for text in domains {
            if allowBareDomainNames, !text.contains("="), DomainSpec.isValidName(text) {
                // `check` never connects: a name alone is enough.
                options.domains.append(DomainSpec(name: text, endpoint: .unix(path: "/nonexistent/colorun-check/\(text)")))
                continue
            }
            do {
                options.domains.append(try DomainSpec(parsing: text))
            } catch {
                throw ValidationError(error.description)
            }
        }
        var seen: Set<String> = []
        for spec in options.domains where !seen.insert(spec.name).inserted {
            throw ValidationError("--domain: the name '\(spec.name)' is given twice")
        }
        for name in shared {
            guard let index = options.domains.firstIndex(where: { $0.name == name }) else {
                throw ValidationError("--shared \(name): no --domain \(name)=ENDPOINT names that domain")
            }
            options.domains[index].shared = true
        }
        if let luaPath {
            options.lua.luaPath = luaPath.split(separator: ":").map(String.init)
        }
        return options
    }

    /// Exit 2 with a clear message when the file is missing or does not compile.
    func validatePolicyLoads() throws {
        if let error = LuaRuntime.syntaxError(inFileAt: policy) {
            writeStandardError("colorun: cannot load the policy: \(error)")
            throw ExitCode(2)
        }
    }
}

/// `--duration 30s`, `--time-limit 500ms`: seconds or a number with us/ms/s/m/h.
struct DurationArgument: ExpressibleByArgument, Sendable {
    var duration: LuaDuration
    /// As given on the command line.
    var text: String
    init?(argument: String) {
        guard let d = try? LuaDuration(parsing: argument) else { return nil }
        duration = d
        text = argument
    }
    static var defaultCompletionKind: CompletionKind { .default }
}

/// `--memory-limit 64MiB`: a size with a unit (B, KiB/K, MiB/M, GiB/G, TiB/T, kB, MB, GB,
/// TB), or a bare number of MiB.
struct SizeArgument: ExpressibleByArgument, Sendable {
    var bytes: Int
    var text: String
    init(bytes: Int) {
        self.bytes = bytes
        text = LuaSize(bytes: bytes).description
    }
    init?(argument: String) {
        guard let size = try? LuaSize(parsing: argument, defaultUnit: 1 << 20) else { return nil }
        bytes = size.bytes
        text = argument
    }
    var defaultValueDescription: String { text }
    static var defaultCompletionKind: CompletionKind { .default }
}

extension Logger.Level: @retroactive ExpressibleByArgument {
    public static var allValueStrings: [String] { allCases.map(\.rawValue) }
}

enum LogFormat: String, ExpressibleByArgument, CaseIterable {
    case text, json
}
