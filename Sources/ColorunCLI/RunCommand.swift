import ArgumentParser
import Colorun
import ColorunOperator
import ColorunSystem
import Logging
import LuaRuntime
import NIOCore
import QEMULab
import ServiceLifecycle

struct RunCommand: ColorunSubcommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a policy against the named domains until it ends or colorun is stopped.",
        discussion: """
            Domains are named with --domain NAME=unix:PATH (QEMU's -qmp unix socket), \
            NAME=tcp:HOST:PORT or NAME=tls:HOST:PORT[,dir=DIR] (or ,ca=FILE,cert=FILE,key=FILE: \
            TLS with the monitor's certificate checked against the CA; DIR holds ca-cert.pem, \
            client-cert.pem and client-key.pem as QEMU's tls-creds-x509 dir= does, default \
            /etc/colorun/tls); the policy gets them with domain.get("NAME"). Arguments after \
            `--` are passed to the policy's main chunk as `...`. With --lab they are real lab \
            QEMUs (the Xen cycle, colo.checkpoint and qmp.restore, is refused up front: the \
            lab's QEMU is not Xen's); with --sim, simulated ones (any name) with the faults \
            of --fault, to rehearse a policy's failover logic.

            A monitor that another program also uses (libxl's qmp-libxl-DOMID, Proxmox's \
            VMID.qmp) is named with --shared NAME as well: colorun then connects for each \
            command or burst and closes again, so the other program gets in between; events \
            arrive only while a command is in flight and heartbeats become polls \
            (docs/operations.md).

            Before the policy starts, colorun resumes any domain a previous, killed run left \
            paused (its stop journal is in STATE-DIR/journal). Checkpoint generations are kept \
            in STATE-DIR/checkpoints/SERIES/.

            On a terminal, a one-line status is refreshed on stdout; at the end a summary is \
            printed on stdout (counts, pause p50/p99/max, failovers, last good generation per \
            series, domains resumed or NOT resumed). Logs go to stderr.

            Signals: SIGTERM or SIGINT stops the run cleanly: no new checkpoint starts, \
            in-flight checkpoints finish or roll back, every domain this run stopped is \
            resumed, the summary is printed, the metrics endpoint closes, exit 0. A second signal stops waiting for \
            in-flight checkpoints: colorun resumes the stopped domains at once and exits within \
            5 s whatever happens (exit 1 if a domain may still be paused; the next run resumes \
            it from the journal).

            Two hosts: with --etcd and --node, each host's colorun holds or waits for the pair's \
            key /colorun/pairs/PAIR/active in etcd; only the holder may run as primary \
            (cluster.acquire), checkpoints and promotions (remus.restore, policy.on_lost, \
            colo.native.failover, colo.policy) need the key, and a holder that cannot renew its \
            lease within 3/4 of --etcd-ttl pauses its guarded domains (fenced). See \
            docs/operations.md, "Two hosts with etcd".

            Exit codes: 0 clean end; 1 the policy failed (its error and traceback on stderr); \
            2 usage or load error (bad option, missing file, syntax error).
            """
    )

    @OptionGroup var policy: PolicyArguments

    @Option(name: .customLong("state-dir"), help: ArgumentHelp(
        "Where checkpoints and the stop journal live (default /var/lib/colorun as root, ~/.local/state/colorun otherwise).",
        valueName: "DIR"))
    var stateDirectory: String?

    @Option(name: .customLong("runtime-dir"), help: ArgumentHelp(
        "A directory in memory (tmpfs, such as /run/colorun/NAME) for what must outlive colorun but not the host: the stop journal, and colo.checkpoint's device states before their commit copies them into slot files of the state directory (listed in each series' generations.index). Keep it across runs, one per run, as --state-dir; both QEMUs must reach it.",
        valueName: "DIR"))
    var runtimeDirectory: String?

    @Flag(name: .customLong("allow-exec"), help: "Let the policy run commands with exec.run.")
    var allowExec = false

    @Option(name: .customLong("log-format"), help: "Log lines on stderr: text, or json (one object per line).")
    var logFormat: LogFormat = .text

    @Option(name: .customLong("log-level"), help: ArgumentHelp(
        "trace, debug, info, notice, warning, error or critical.", valueName: "LEVEL"))
    var logLevel: Logger.Level = .info

    @Option(name: .customLong("metrics-listen"), help: ArgumentHelp(
        "Serve Prometheus metrics on http://HOST:PORT/metrics.", valueName: "HOST:PORT"))
    var metricsListen: String?

    @Option(name: .customLong("duration"), help: ArgumentHelp(
        "Stop cleanly after this long (e.g. 90s, 10m, 2h).", valueName: "D"))
    var duration: DurationArgument?

    @Option(name: .customLong("keep"), help: ArgumentHelp(
        "Checkpoint generations kept per series unless the policy says otherwise.", valueName: "N"))
    var keep: Int = 3

    @Option(name: .customLong("loop-slice"), help: ArgumentHelp(
        "The time slice colorun's event-loop thread asks the kernel for (Linux 6.12 and later; older kernels ignore it): 100us (the default) to 100ms, or 0 for the kernel's default. A short slice lets colorun run as soon as a monitor answers instead of after a vCPU thread's slice.",
        valueName: "D"))
    var loopSlice: DurationArgument?

    /// `--loop-slice` in nanoseconds (rounded: "100us" is not exactly 1e-4 s in binary).
    var loopSliceNanoseconds: Int64 {
        loopSlice.map { Int64(($0.duration.seconds * 1e9).rounded()) } ?? PolicyOptions.defaultLoopSlice.nanoseconds
    }

    @Option(name: .customLong("memory-limit"), help: ArgumentHelp(
        "Memory cap of the Lua state: a size (64MiB, 1GiB, 512K) or a number of MiB.", valueName: "SIZE"))
    var memoryLimit: SizeArgument = SizeArgument(bytes: 64 << 20)

    @Option(name: .customLong("time-limit"), help: ArgumentHelp(
        "How long policy code may run between two host calls before it fails.", valueName: "D"))
    var timeLimit: DurationArgument?

    @Flag(name: .customLong("lab"), help: ArgumentHelp(
        "Run against lab domains 'primary' and 'secondary': real QEMU processes (TCG; the guest is chosen with --guest) started on first use and removed, with their files, at the end. The state directory is a temporary one unless --state-dir is given."))
    var lab = false

    @Flag(name: .customLong("sim"), help: ArgumentHelp(
        "Run against simulated domains: every domain the policy asks for is a simulated QEMU in this process (docs/simulator.md), with the faults of --fault. The state directory is a temporary one unless --state-dir is given."))
    var sim = false

    @Option(name: .customLong("fault"), help: ArgumentHelp(
        "With --sim, a fault in the simulator's language for domain NAME (or every domain without NAME=), e.g. web-p=@3s:crash or web-s=xen-load-devices-state:error=GenericError (repeatable).",
        valueName: "[NAME=]SPEC"))
    var faults: [String] = []

    @Option(name: .customLong("guest"), help: ArgumentHelp(
        "With --lab, what the lab's QEMU runs: 'counting' (a boot sector counting in memory, the default) or 'linux' (the Linux lab guest of guest/README.md, built by scripts/build-guest: a qcow2 disk, a NIC forwarding a host port to its ledger; the lab then offers 'primary' alone and the lab module talks to the ledger) or 'colo' (COLO-shaped QEMUs under KVM for colo.native.*: quorum disks made with qemu-img, a NIC on a loopback socket netdev; lab.colo_secondary starts more secondaries).",
        valueName: "KIND"))
    var guest: LabGuestKind = .counting

    @OptionGroup(title: "Two hosts: the etcd arbiter") var arbiter: ArbiterArguments

    @Argument(parsing: .postTerminator, help: ArgumentHelp("Arguments for the policy (after --).", valueName: "ARGS"))
    var policyArguments: [String] = []

    func validate() throws {
        _ = try policy.makeOptions()
        guard keep >= 1 else { throw ValidationError("--keep '\(keep)': keep at least 1 generation") }
        guard (1 << 20...1 << 40).contains(memoryLimit.bytes) else {
            throw ValidationError("--memory-limit '\(memoryLimit.text)': give from 1MiB to 1TiB")
        }
        if sim && lab { throw ValidationError("--sim and --lab: choose one") }
        if !faults.isEmpty && !sim { throw ValidationError("--fault: only with --sim") }
        for fault in faults {
            do { _ = try SimulatedDomains.Fault(parsing: fault) } catch { throw ValidationError(error.description) }
        }
        if sim, let given = policy.domains.first {
            throw ValidationError("--sim simulates every domain the policy asks for; do not name any with --domain (got '\(given)')")
        }
        if let duration, duration.duration.seconds <= 0 {
            throw ValidationError("--duration '\(duration.duration)': must be longer than 0")
        }
        if let timeLimit, timeLimit.duration.seconds <= 0 {
            throw ValidationError("--time-limit '\(timeLimit.duration)': must be longer than 0")
        }
        if let loopSlice, loopSliceNanoseconds != 0 && !(100_000...100_000_000).contains(loopSliceNanoseconds) {
            throw ValidationError("--loop-slice '\(loopSlice.text)': must be 0 (the kernel's default) or from 100us to 100ms")
        }
        if guest != .counting && !lab {
            throw ValidationError("--guest \(guest.rawValue): only with --lab")
        }
        if let metricsListen {
            do { _ = try MetricsServer.parseListenAddress(metricsListen) } catch { throw ValidationError(error.description) }
        }
        _ = try arbiter.makeOptions(policyPath: policy.policy)
    }

    func makeOptions() throws -> PolicyOptions {
        var options = try policy.makeOptions()
        options.arguments = policyArguments
        if let stateDirectory {
            options.stateDirectory = stateDirectory
        } else if lab || sim {
            options.stateDirectory = try temporaryDirectory(lab ? "colorun-lab-state" : "colorun-sim-state")
            // Owned by this process: swept by a later run if this one is killed.
            do { try RunDirectoryOwner.current().write(to: options.stateDirectory) } catch { throw ValidationError(error.description) }
        }
        options.runtimeDirectory = runtimeDirectory
        options.keepGenerations = keep
        options.loopSlice = .nanoseconds(loopSliceNanoseconds)
        options.allowExec = allowExec
        options.lua.memoryLimit = memoryLimit.bytes
        if let timeLimit { options.lua.timeLimit = timeLimit.duration.timeAmount }
        options.duration = duration?.duration.timeAmount
        options.arbiter = try arbiter.makeOptions(policyPath: policy.policy)
        return options
    }

    func run() async throws { try await execute() }

    func execute() async throws {
        let options = try makeOptions()
        try policy.validatePolicyLoads()
        // --lab refuses the Xen cycle up front: it aborts a plain QEMU's incoming state.
        if lab, case .success(let scan) = LuaGlobalScan.scan(fileAt: options.policyPath) {
            let uses = Lab.xenCycleUses(scan)
            if !uses.isEmpty {
                let places = uses.map { "\(options.policyPath):\($0.line): \($0.name)" }.joined(separator: "\n")
                writeStandardError("colorun: --lab refuses this policy:\n\(places)\n\(Lab.xenCycleRefusal)")
                if stateDirectory == nil { Lab.removeDirectory(options.stateDirectory) }
                throw ExitCode(2)
            }
        }
        Bootstrap.logging(format: logFormat, level: logLevel)
        let logger = Logger(label: "colorun")
        // Listening before the run starts: a port that is taken is a usage error (exit 2).
        var services: [any Service] = []
        if let metricsListen {
            services.append(MetricsService(server: try await Bootstrap.metrics(listen: metricsListen, logger: logger)))
        }
        var runner = PolicyRunner(options: options, logger: logger, liveStatus: isatty(1) != 0)
        if lab {
            // Lab QEMUs and state directories of lab runs that were killed (QEMU itself dies
            // with its colorun; the directories stay).
            RunDirectorySweep.sweepOnce(Lab.runDirectoryParent, logger: logger)
            let lab: Lab
            do {
                switch guest {
                case .counting: lab = try Lab()
                case .linux: lab = try await Lab.linux()
                case .colo: lab = try Lab(colo: try COLOLab())
                }
            } catch {
                writeStandardError("colorun: --lab: \(error)")
                throw ExitCode(2)
            }
            runner.makeExtensions = { [lab] in [lab] }
        }
        if sim {
            RunDirectorySweep.sweepOnce(Lab.runDirectoryParent, logger: logger)
            let parsed = try faults.map { text in
                do { return try SimulatedDomains.Fault(parsing: text) } catch { throw ValidationError("\(error)") }
            }
            let simulated: SimulatedDomains
            do {
                simulated = try SimulatedDomains(faults: parsed)
            } catch {
                writeStandardError("colorun: \(error)")
                throw ExitCode(2)
            }
            runner.makeExtensions = { [simulated] in [simulated] }
        }
        let code = await runner.run(alongside: services)
        if (lab || sim) && stateDirectory == nil { Lab.removeDirectory(options.stateDirectory) }
        throw ExitCode(code)
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `--guest`: what the lab's QEMU runs.
enum LabGuestKind: String, ExpressibleByArgument, CaseIterable {
    case counting, linux, colo
}

/// A new directory under the lab's parent directory (/tmp).
func temporaryDirectory(_ prefix: String) throws -> String {
    do {
        return try makeTemporaryDirectory(in: Lab.runDirectoryParent, prefix: prefix)
    } catch {
        throw ValidationError(error.description)
    }
}

/// The metrics endpoint as a service of the run: serves until the run's graceful shutdown
/// (after the policy has stopped) or cancellation, then closes its socket.
struct MetricsService: Service, CustomStringConvertible {
    let server: MetricsServer

    var description: String { "metrics server on \(server.localAddress.map { "\($0)" } ?? "?")" }

    func run() async throws {
        let channel = server.channel
        try await withTaskCancellationOrGracefulShutdownHandler {
            try await channel.closeFuture.get()
        } onCancelOrGracefulShutdown: {
            channel.close(promise: nil)
        }
    }
}
