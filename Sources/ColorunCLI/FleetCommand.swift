import ArgumentParser
import Colorun
import ColorunOperator
import ColorunSystem
import Etcd
import Fleet
import Logging
import NIOPosix
import UnixSignals

/// `colorun fleet run|add|remove|list|drain|status`: many instances sharing the pairs
/// declared in etcd (module Fleet; docs/operations.md, "A fleet").
struct FleetCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fleet",
        abstract: "Share replicated pairs declared in etcd among many colorun instances.",
        discussion: """
            Pairs are declared in etcd (`colorun fleet add`), one key per pair: its policy, its \
            domains' endpoints, its settings. Every `colorun fleet run` instance holds one lease; \
            each pair is owned by exactly one instance (a key on that lease, whose create revision \
            is the pair's fencing token) and driven by its policy there. A dead instance's pairs are \
            taken over within TTL + 1 s; joining instances get pairs gradually (--max-moves at a \
            time); `colorun fleet drain NODE` moves a node's pairs away.
            """,
        subcommands: [FleetRun.self, FleetAdd.self, FleetRemove.self, FleetList.self, FleetDrain.self, FleetStatus.self]
    )
}

/// `--etcd` and `--prefix`, shared by the fleet subcommands.
struct FleetEtcdArguments: ParsableArguments {
    @Option(name: .customLong("etcd"), help: ArgumentHelp(
        "etcd's client URLs, comma-separated (http://HOST:PORT or https://HOST:PORT).", valueName: "URL[,URL...]"))
    var etcd: String

    @Option(name: .customLong("prefix"), help: ArgumentHelp("The fleet's key prefix in etcd.", valueName: "KEY"))
    var prefix = "/colorun/fleet"

    var endpoints: [String] { (try? etcdEndpoints(etcd)) ?? [] }

    func validateEndpoints() throws {
        _ = try etcdEndpoints(etcd)
        guard prefix.hasPrefix("/"), !prefix.hasSuffix("/") || prefix == "/" else {
            throw ValidationError("--prefix '\(prefix)': a key prefix starts with '/' and does not end with one")
        }
    }

    /// A store for one command; the caller shuts the client down.
    func makeStore() throws -> FleetStore {
        do {
            let client = try EtcdClient(endpoints: endpoints, eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
            return FleetStore(client: client, prefix: prefix)
        } catch {
            throw ValidationError("--etcd: \(error)")
        }
    }

    /// Runs `body` with a store, then closes it; errors print as `colorun fleet: ...` and exit 1.
    func withStore(_ body: (FleetStore) async throws -> Void) async throws {
        let store = try makeStore()
        do {
            try await body(store)
        } catch let error as ValidationError {
            await store.client.shutdown()
            throw error
        } catch let error as ExitCode {
            await store.client.shutdown()
            throw error
        } catch {
            await store.client.shutdown()
            writeStandardError("colorun fleet: \(error)")
            throw ExitCode(1)
        }
        await store.client.shutdown()
    }
}

struct FleetRun: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run", abstract: "Run one fleet instance: own a share of the pairs and drive them.",
        discussion: """
            Runs until SIGTERM or SIGINT: then every pair stops (in-flight checkpoints finish or roll \
            back, paused domains are resumed) and the lease is revoked, so the other instances take \
            the pairs at once. Exit 0 after a signal, 1 when the instance cannot join the fleet.
            """)

    @OptionGroup var etcd: FleetEtcdArguments

    @Option(name: .customLong("node"), help: ArgumentHelp("This instance's name in the fleet (unique).", valueName: "NAME"))
    var node: String

    @Option(name: .customLong("policy-dir"), help: ArgumentHelp("Where the pairs' policies are (a declaration names a .lua file in it).", valueName: "DIR"))
    var policyDirectory: String

    @Option(name: .customLong("state-dir"), help: ArgumentHelp(
        "Each pair's state goes in DIR/pairs/PAIR (generations, stop journal, fencing token): storage every instance shares (default /var/lib/colorun/fleet as root).",
        valueName: "DIR"))
    var stateDirectory: String?

    @Option(name: .customLong("ttl"), help: ArgumentHelp(
        "The instance's lease TTL in whole seconds: renewed every TTL/4; the instance stops driving its pairs after 3/4 TTL without a renewal; its pairs are taken over within TTL + 1 s of its death.",
        valueName: "SECONDS"))
    var ttl: Int64 = 3

    @Option(name: .customLong("max-moves"), help: ArgumentHelp("At most this many pairs move away from this instance at a time (rebalance, drain).", valueName: "K"))
    var maxMoves = 8

    @Option(name: .customLong("log-format"), help: "Log lines on stderr: text, or json (one object per line).")
    var logFormat: LogFormat = .text

    @Option(name: .customLong("log-level"), help: ArgumentHelp("trace, debug, info, notice, warning, error or critical.", valueName: "LEVEL"))
    var logLevel: Logger.Level = .notice

    @Option(name: .customLong("metrics-listen"), help: ArgumentHelp(
        "Serve Prometheus metrics (owned pairs, the fleet's view, every pair's checkpoints) on http://HOST:PORT/metrics.", valueName: "HOST:PORT"))
    var metricsListen: String?

    func validate() throws {
        try etcd.validateEndpoints()
        guard DomainSpec.isValidName(node) else { throw ValidationError("--node '\(node)': use letters, digits, '-', '_' and '.'") }
        guard ttl >= 1 else { throw ValidationError("--ttl '\(ttl)': at least 1 second") }
        guard maxMoves >= 1 else { throw ValidationError("--max-moves '\(maxMoves)': at least 1") }
        var info = stat()
        guard stat(policyDirectory, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR else {
            throw ValidationError("--policy-dir '\(policyDirectory)': not a directory")
        }
    }

    func run() async throws {
        Bootstrap.logging(format: logFormat, level: logLevel)
        let logger = Logger(label: "colorun.fleet")
        var metricsServer: MetricsServer?
        if let metricsListen { metricsServer = try await Bootstrap.metrics(listen: metricsListen, logger: logger) }
        var options = FleetOptions(
            endpoints: etcd.endpoints, node: node, policyDirectory: policyDirectory,
            stateDirectory: stateDirectory ?? (geteuid() == 0 ? "/var/lib/colorun/fleet" : "./colorun-fleet-state"))
        options.prefix = etcd.prefix
        options.ttl = ttl
        options.maxMoves = maxMoves
        let instance: FleetNode
        do {
            instance = try FleetNode(options: options, logger: logger)
        } catch {
            throw ValidationError(error.description)
        }
        let signals = await UnixSignalsSequence(trapping: .sigterm, .sigint)
        let watcher = Task {
            for await signal in signals {
                logger.notice("\(signal == .sigterm ? "SIGTERM" : "SIGINT"): stopping the pairs and leaving the fleet")
                await instance.stop()
                return
            }
        }
        var code: Int32 = 0
        do {
            try await instance.run()
        } catch {
            writeStandardError("colorun fleet run: \(error)")
            code = 1
        }
        watcher.cancel()
        await instance.stop()
        if let metricsServer { try? await metricsServer.channel.close().get() }
        throw ExitCode(code)
    }
}

struct FleetAdd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "add", abstract: "Declare pairs: one on the command line, or many from a JSON file.",
        discussion: """
            Every declaration is checked before anything is written; a pair already declared is an \
            error unless --replace. All or nothing: more pairs than fit in one etcd transaction (128) \
            are written in several, and a failed later one undoes the earlier ones. File format: {"PAIR": {"policy": "remus.lua", "domains": \
            {"primary": "tcp:10.0.0.1:4444", "secondary": "tcp:10.0.0.2:4444"}, "settings": {"interval": "1s"}}, ...}
            """)

    @OptionGroup var etcd: FleetEtcdArguments

    @Argument(help: ArgumentHelp("The pair's name (without --file).", valueName: "PAIR"))
    var pair: String?

    @Option(name: .customLong("policy"), help: ArgumentHelp("The policy: a .lua file name under the instances' --policy-dir.", valueName: "FILE"))
    var policy: String?

    @Option(name: .customLong("domain"), help: ArgumentHelp("A domain of the pair (repeatable).", valueName: "NAME=ENDPOINT"))
    var domains: [String] = []

    @Option(name: .customLong("set"), help: ArgumentHelp("A setting passed to the policy as KEY=VALUE (repeatable).", valueName: "KEY=VALUE"))
    var settings: [String] = []

    @Option(name: .customLong("file"), help: ArgumentHelp("Declarations from a JSON file (see above).", valueName: "FILE"))
    var file: String?

    @Flag(name: .customLong("replace"), help: "Overwrite pairs already declared (their owners restart them).")
    var replace = false

    func declarations() throws -> [PairDeclaration] {
        if let file {
            guard pair == nil, policy == nil, domains.isEmpty, settings.isEmpty else {
                throw ValidationError("--file: give the pairs in the file, not on the command line")
            }
            let bytes: [UInt8]
            do { bytes = try readFile(file) } catch { throw ValidationError("--file: \(error)") }
            do { return try PairDeclaration.parseFile(bytes, path: file) } catch { throw ValidationError(error.description) }
        }
        guard let pair else { throw ValidationError("give a PAIR name with --policy and --domain, or --file FILE") }
        guard let policy else { throw ValidationError("pair '\(pair)': --policy FILE is missing") }
        var domainMap: [String: String] = [:]
        for text in domains {
            guard let eq = text.firstIndex(of: "="), eq != text.startIndex else {
                throw ValidationError("--domain '\(text)': expected NAME=unix:PATH or NAME=tcp:HOST:PORT")
            }
            domainMap[String(text[..<eq])] = String(text[text.index(after: eq)...])
        }
        var settingMap: [String: String] = [:]
        for text in settings {
            guard let eq = text.firstIndex(of: "="), eq != text.startIndex else { throw ValidationError("--set '\(text)': expected KEY=VALUE") }
            settingMap[String(text[..<eq])] = String(text[text.index(after: eq)...])
        }
        let declaration = PairDeclaration(name: pair, policy: policy, domains: domainMap, settings: settingMap)
        do { try declaration.validate() } catch { throw ValidationError(error.description) }
        return [declaration]
    }

    func validate() throws {
        try etcd.validateEndpoints()
        _ = try declarations()
    }

    func run() async throws {
        let declarations = try declarations()
        try await etcd.withStore { store in
            try await store.add(declarations, replace: replace)
            writeStandardOutput("declared \(declarations.count) pair(s)\n")
        }
    }
}

struct FleetRemove: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "remove", abstract: "Remove declared pairs (their owners stop them; domains are resumed).")

    @OptionGroup var etcd: FleetEtcdArguments

    @Argument(help: ArgumentHelp("The pairs to remove.", valueName: "PAIR"))
    var pairs: [String] = []

    func validate() throws {
        try etcd.validateEndpoints()
        guard !pairs.isEmpty else { throw ValidationError("give at least one PAIR") }
    }

    func run() async throws {
        try await etcd.withStore { store in
            try await store.remove(pairs)
            writeStandardOutput("removed \(pairs.count) pair(s)\n")
        }
    }
}

struct FleetList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the declared pairs: owner, fencing token, policy, domains.")

    @OptionGroup var etcd: FleetEtcdArguments

    func validate() throws { try etcd.validateEndpoints() }

    func run() async throws {
        try await etcd.withStore { store in
            let snapshot = try await store.snapshot()
            var out = "PAIR\tOWNER\tTOKEN\tPOLICY\tDOMAINS\n"
            for (name, declaration) in snapshot.declarations.sorted(by: { $0.key < $1.key }) {
                let owner = snapshot.owners[name]
                let domains = declaration.domains.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
                out += "\(name)\t\(owner?.node ?? "-")\t\(owner.map { String($0.token) } ?? "-")\t\(declaration.policy)\t\(domains)\n"
            }
            for (key, error) in snapshot.bad { out += "# bad declaration \(key): \(error)\n" }
            writeStandardOutput(out)
        }
    }
}

struct FleetDrain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drain", abstract: "Move a node's pairs away (it takes none until --undo).",
        discussion: "The node hands its pairs over --max-moves at a time, never one mid-checkpoint. With --wait, returns when it owns none (exit 1 after --timeout).")

    @OptionGroup var etcd: FleetEtcdArguments

    @Argument(help: ArgumentHelp("The node to drain.", valueName: "NODE"))
    var node: String

    @Flag(name: .customLong("undo"), help: "Lift the drain: the node takes pairs again.")
    var undo = false

    @Flag(name: .customLong("wait"), help: "Wait until the node owns no pair.")
    var wait = false

    @Option(name: .customLong("timeout"), help: ArgumentHelp("How long --wait waits, in seconds.", valueName: "SECONDS"))
    var timeout = 300

    func validate() throws {
        try etcd.validateEndpoints()
        guard DomainSpec.isValidName(node) else { throw ValidationError("NODE '\(node)': use letters, digits, '-', '_' and '.'") }
    }

    func run() async throws {
        try await etcd.withStore { store in
            try await store.drain(node, undo: undo)
            writeStandardOutput(undo ? "\(node): drain lifted\n" : "\(node): draining\n")
            guard wait, !undo else { return }
            let clock = ContinuousClock()
            let deadline = clock.now + .seconds(timeout)
            while true {
                let left = try await store.snapshot().view.counts[node] ?? 0
                if left == 0 {
                    writeStandardOutput("\(node): owns no pair\n")
                    return
                }
                if clock.now >= deadline { throw FleetError("\(node) still owns \(left) pair(s) after \(timeout) s") }
                try await Task.sleep(for: .milliseconds(500))
            }
        }
    }
}

struct FleetStatus: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "The fleet's view: nodes, their pairs, draining, unowned pairs.")

    @OptionGroup var etcd: FleetEtcdArguments

    func validate() throws { try etcd.validateEndpoints() }

    func run() async throws {
        try await etcd.withStore { store in
            let snapshot = try await store.snapshot()
            let view = snapshot.view
            var out = "pairs \(view.pairs.count), owned \(view.pairs.count - view.unowned.count), unowned \(view.unowned.count), nodes \(view.nodes.count)\n"
            out += "NODE\tPAIRS\tSHARE\tSTATE\n"
            for node in view.nodes.union(view.draining).union(view.counts.keys).sorted() {
                let state = !view.nodes.contains(node) ? "gone" : view.draining.contains(node) ? "draining" : "active"
                out += "\(node)\t\(view.counts[node] ?? 0)\t\(FleetPlan.quota(of: node, in: view))\t\(state)\n"
            }
            if !view.unowned.isEmpty { out += "unowned: \(view.unowned.prefix(20).joined(separator: " "))\(view.unowned.count > 20 ? " ..." : "")\n" }
            for (key, error) in snapshot.bad { out += "bad declaration \(key): \(error)\n" }
            writeStandardOutput(out)
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension FleetRun: ColorunSubcommand { func execute() async throws { try await run() } }
extension FleetAdd: ColorunSubcommand { func execute() async throws { try await run() } }
extension FleetRemove: ColorunSubcommand { func execute() async throws { try await run() } }
extension FleetList: ColorunSubcommand { func execute() async throws { try await run() } }
extension FleetDrain: ColorunSubcommand { func execute() async throws { try await run() } }
extension FleetStatus: ColorunSubcommand { func execute() async throws { try await run() } }
