#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import LuaRuntime
import NIOCore
import NIOPosix
import QMPClient

/// A domain named on the command line: `NAME=unix:/path`, `NAME=tcp:host:port` or `NAME=tls:host:port[,dir=DIR]`.
public struct DomainSpec: Sendable, Hashable {
    public var name: String
    var endpoint: QMPEndpoint
    /// Shared mode (`--shared NAME`): a connection per command or burst (see `DomainOptions.shared`).
    public var shared = false

    public init(name: String, endpoint: QMPEndpoint, shared: Bool = false) {
        self.name = name
        self.endpoint = endpoint
        self.shared = shared
    }

    /// Parses `NAME=ENDPOINT`; the error names the bad text.
    public init(parsing text: String) throws(PolicyError) {
        guard let eq = text.firstIndex(of: "="), eq != text.startIndex else {
            throw PolicyError.usage("--domain '\(text)': expected NAME=unix:PATH, NAME=tcp:HOST:PORT or NAME=tls:HOST:PORT[,dir=DIR]")
        }
        let name = String(text[..<eq])
        guard DomainSpec.isValidName(name) else {
            throw PolicyError.usage("--domain '\(text)': a domain name may use letters, digits, '-', '_' and '.'")
        }
        do {
            self.init(name: name, endpoint: try QMPEndpoint(parsing: String(text[text.index(after: eq)...])))
        } catch {
            throw PolicyError.usage("--domain '\(text)': \(error)")
        }
    }

    public static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && name.allSatisfy { ($0.isLetter || $0.isNumber || "-_.".contains($0)) && $0.isASCII }
    }
}

/// What went wrong before or around a policy run (not inside it).
public enum PolicyError: Error, Sendable, CustomStringConvertible {
    /// Bad command-line input (exit code 2).
    case usage(String)
    /// The state directory or another resource could not be set up.
    case setup(String)

    public var description: String {
        switch self {
        case .usage(let text), .setup(let text): return text
        }
    }
}

/// Everything a policy run is configured with.
public struct PolicyOptions: Sendable {
    public var policyPath: String
    /// Arguments passed to the policy's main chunk as `...`.
    public var arguments: [String] = []
    public var domains: [DomainSpec] = []
    /// Generations, the stop journal and the like live here.
    public var stateDirectory: String = PolicyOptions.defaultStateDirectory
    /// `--runtime-dir`: a directory in memory (tmpfs: /run/colorun/NAME, /dev/shm/NAME) for
    /// what must outlive the colorun process but not the host, kept off the state
    /// directory's filesystem (whose commits would otherwise write it back every time):
    /// - `journal/`: the stop journal (else `<state-dir>/journal`); records found in
    ///   `<state-dir>/journal` are moved here when the run starts;
    /// - `staging/colorun-staging-*/`: the Xen cycle's device states, saved by the primary
    ///   and loaded by the secondary there; the commit copies each in place into a slot file
    ///   of the state directory and lists it in the series' index (`GenerationIndex`: no new
    ///   inode, no rename per generation). Each run
    ///   makes its own and removes it at its end (a killed run's is swept by the next).
    /// Both QEMUs must reach it, as they must reach the state directory. One per run, as the
    /// state directory. nil: all of it in the state directory.
    public var runtimeDirectory: String?

    /// Where the stop journal's records are.
    var journalDirectory: String { (runtimeDirectory ?? stateDirectory) + "/journal" }
    /// How many checkpoint generations to keep per pair unless a call says otherwise.
    public var keepGenerations = 3
    public var lua = LuaRuntimeOptions()
    /// Lets policies run commands with `exec.run` (the `--allow-exec` option).
    public var allowExec = false
    /// Timeout of `exec.run` when the call gives none.
    var execDefaultTimeout: TimeAmount = .seconds(60)
    public var domainOptions = DomainOptions()
    /// End the run (as a clean stop) after this long.
    public var duration: TimeAmount?
    /// `colorun check` without `--domain`: any domain name the policy asks for is accepted
    /// (bound to a monitor that is never connected) and listed in the check's report.
    public var acceptAnyDomain = false
    /// The etcd arbiter of a two-host pair (`--etcd`, `--node`, `--pair`, `--etcd-ttl`).
    public var arbiter: ArbiterOptions?
    /// The fencing token of a fleet instance that owns this pair: every generation commit
    /// checks it (`FencingToken`).
    public var fencing: FencingToken?
    /// A thread pool for blocking file work shared by many sessions (a fleet instance runs
    /// one session per pair); nil: the session starts and stops a pool of its own.
    public var sharedBlockingIO: NIOThreadPool?
    /// `--loop-slice`: the time slice the session's event-loop thread asks the kernel for
    /// (`setThreadSlice`; Linux 6.12 and later). A short one lets the loop run as soon as a
    /// monitor answers, ahead of a vCPU thread or QEMU's own loop that is in the middle of a
    /// longer one, instead of after it. `.zero`: the kernel's default; nil: the thread is
    /// left as it is. The thread keeps it after the session (it is the loop's thread).
    public var loopSlice: TimeAmount? = PolicyOptions.defaultLoopSlice
    /// 0.1 ms, the shortest slice the kernel grants.
    public static let defaultLoopSlice = TimeAmount.microseconds(100)

    public init(policyPath: String) {
        self.policyPath = policyPath
    }

    /// `/var/lib/colorun` for root, `$HOME/.local/state/colorun` otherwise.
    static var defaultStateDirectory: String {
        if geteuid() == 0 { return "/var/lib/colorun" }
        let home = getenv("HOME").map { String(cString: $0) } ?? "."
        return home + "/.local/state/colorun"
    }
}
