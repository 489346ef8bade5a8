/// colorun's Lua API as data: every global, module function, method and value a policy can
/// use, with its parameters (and the fields each table parameter accepts), its return types
/// and a one-line summary.
///
/// It is the one source of
/// - the fields each table argument accepts: the prelude rejects any other, naming the field
///   and the policy line (`LuaAPI.acceptedFields`; to accept a new field, add it here);
/// - the editor files `colorun stubs DIR` writes: a luacheck standard (`.luacheckrc`) and a
///   lua-language-server `---@meta` file (`LuaAPIStubs`);
/// - `colorun check`'s list of the `lab` module's functions in a dry run.
///
/// Tests hold it to the code and the docs: every function of the modules a session binds has
/// an entry and every entry a function (`LuaAPITests`), and docs/lua-api.md names every entry.
public enum LuaAPI {
    /// The options of colo.native.start and colo.native.reprotect.
    static let coloNativeFields: [LuaAPIField] = [
        .init("uri", "string", "where the secondary's -incoming listens (required)"),
        .init("nbd", "string", "HOST:PORT of the secondary's NBD server (required)"),
        .init("net", "string", "HOST:PORT of the primary's mirror/compare chardevs, 4 ports from PORT (required)"),
        .init("delay", "colorun.Duration", "x-checkpoint-delay (default 200ms)"),
        .init("netdev", "string", "the netdev the filters attach to (default hn0)"),
        .init("timeout", "colorun.Duration", "how long to wait for COLO mode (default 10s)"),
        .init("resync_timeout", "colorun.Duration", "reprotect: how long the resync may take (default 120s)"),
        .init("check", "boolean", "false skips the layout check"),
    ]

    public static let entries: [LuaAPIEntry] = runtime + domains + qmpFunctions + checkpoints + policyFunctions + clusterFunctions + labFunctions

    /// The entry named `name` (`"qmp.stop"`, `"Domain:alive"`).
    public static func entry(_ name: String) -> LuaAPIEntry? {
        entries.first { $0.name == name }
    }

    /// For each table parameter, `"FUNCTION#N"` (N the parameter's position, methods counting
    /// `self` as 1) and the field names it accepts.
    public static var acceptedFields: [String: [String]] {
        var result: [String: [String]] = [:]
        for entry in entries {
            let offset = entry.kind == .method ? 2 : 1
            for (i, p) in entry.parameters.enumerated() where !p.fields.isEmpty {
                result["\(entry.name)#\(i + offset)"] = p.fields.map(\.name)
            }
        }
        return result
    }

    /// The module tables (and global functions) bound only under `--lab`.
    public static let labOnly: Set<String> = ["lab"]

    /// Classes the stubs describe (values of these shapes are returned or passed around).
    public static let classes: [LuaAPIClass] = [
        LuaAPIClass(name: "colorun.Domain", summary: "A VM as colorun sees it: a name and a QMP monitor (read-only).", fields: [
            .init("name", "string", "the domain's name"), .init("endpoint", "string", "its monitor: unix:PATH, tcp:HOST:PORT or tls:HOST:PORT[,OPTIONS]"),
            .init("shared", "boolean", "true when colorun connects per command (a monitor shared with another program)"),
        ]),
        LuaAPIClass(name: "colorun.Handle", summary: "A subscription or watch; cancel() ends it.", fields: [
            .init("cancel", "fun()", "ends it"),
        ]),
        LuaAPIClass(name: "colorun.TimerHandle", summary: "A timer of policy.every or policy.after.", fields: [
            .init("cancel", "fun()", "stops the timer"),
            .init("stats", "fun(): {runs: integer, skipped: integer, active: boolean}", "its counts"),
        ]),
        LuaAPIClass(name: "colorun.Task", summary: "A task's handle (task.spawn, task.current).", fields: [
            .init("wait", "fun(self: colorun.Task): any", "waits for the task, returns its results or raises its error"),
            .init("id", "fun(self: colorun.Task): integer", "its number"),
            .init("name", "fun(self: colorun.Task): string", "its name"),
            .init("status", "fun(self: colorun.Task): string", "running, waiting, done, failed or cancelled"),
            .init("cancel", "fun(self: colorun.Task)", "never resumed again"),
        ]),
        LuaAPIClass(name: "colorun.CheckpointResult", summary: "What a good checkpoint returns.", fields: [
            .init("generation", "integer", "the generation's number"), .init("path", "string", "its device-state or memory file"),
            .init("bytes", "integer", "the file's size"), .init("pause_ms", "number", "from the first stop sent to the last cont answered"),
            .init("save_ms", "number", "the save (or migration)"), .init("restore_ms", "number?", "the load on the secondary (colo.checkpoint)"),
            .init("commit_ms", "number?", "the commit inside the pause (remus.checkpoint with output commit)"),
            .init("durable", "boolean?", "colo.checkpoint: whether the generation was on disk when the call returned (false only with pipeline)"),
            .init("disks", "table?", "remus.checkpoint: {{device=, frozen=}...}"),
            .init("output_commit", "string[]?", "remus.checkpoint: the buffered netdevs"),
            .init("housekeeping", "table?", "remus.checkpoint: {deleted_layers=, merges_started=, merge_errors=}"),
        ]),
        LuaAPIClass(name: "colorun.Generation", summary: "A good generation on disk.", fields: [
            .init("generation", "integer", "its number"), .init("path", "string", "its file"), .init("bytes", "integer", "the file's size"),
        ]),
        LuaAPIClass(name: "colorun.ExecResult", summary: "What exec.run returns.", fields: [
            .init("ok", "boolean", "exit status 0"), .init("status", "integer?", "the exit status"),
            .init("signal", "integer?", "the signal that killed it"), .init("stdout", "string", "captured standard output"),
            .init("stderr", "string", "captured standard error"),
        ]),
    ]

    // MARK: - The runtime's globals

    static let runtime: [LuaAPIEntry] = [
        .function("print", [.init("...", "any")], [], "Logs its arguments, tab-separated, at level info."),
        .function("sleep", [.init("duration", "colorun.Duration")], [], "Suspends the calling task for at least duration; other tasks run."),
        .function("require", [.init("name", "string")], ["any"], "Loads a module next to the policy (or on --lua-path), once."),
        .function("retry", [
            .init("opts", "table", optional: true, fields: [
                .init("attempts", "integer", "tries (default 3)"), .init("backoff", "colorun.Duration", "first sleep (default 100ms)"),
                .init("max_backoff", "colorun.Duration", "cap of the doubling sleep (default 5s)"),
                .init("jitter", "number", "sleeps vary by ±jitter (default 0.1)"),
                .init("retry_on", "fun(err: any): boolean", "false stops early"),
                .init("on_retry", "fun(err: any, attempt: integer)", "runs before each sleep"),
            ]),
            .init("fn", "fun(attempt: integer): any"),
        ], ["any"], "Calls fn(attempt) until it succeeds, with exponential backoff; raises the last error."),
        .function("task.spawn", [.init("fn", "function"), .init("...", "any")], ["colorun.Task"], "Starts fn(...) as a new task."),
        .function("task.all", [.init("...", "function")], ["any"], "Runs the functions as tasks, waits for all, returns one value each."),
        .function("task.yield", [], [], "Lets the other ready tasks run."),
        .function("task.current", [], ["colorun.Task"], "The running task's handle."),
        .function("exec.run", [.init("spec", "table", fields: [
            .init("timeout", "colorun.Duration", "kill the process after this long (default 60s)"),
        ], doc: "the argument vector as its sequence part, and options")],
                  ["colorun.ExecResult"], "Runs a command (no shell) and waits for it; only with --allow-exec."),
        .function("log.debug", [.init("...", "any")], [], "Logs at level debug (a table as the last of two arguments: structured fields)."),
        .function("log.info", [.init("...", "any")], [], "Logs at level info."),
        .function("log.warn", [.init("...", "any")], [], "Logs at level warning."),
        .function("log.error", [.init("...", "any")], [], "Logs at level error."),
        .value("json.null", "lightuserdata", "JSON null (keeps keys and array slots)."),
        .function("json.encode", [.init("value", "any")], ["string"], "Compact JSON text, keys sorted."),
        .function("json.decode", [.init("text", "string")], ["any"], "Parses JSON text."),
        .function("json.array", [.init("t", "table", optional: true)], ["table"], "Marks t (or a new table) as a JSON array."),
        .function("json.isarray", [.init("t", "table")], ["boolean"], "True if t is marked as an array."),
        .value("colorun.version", "string", "colorun's version."),
    ]

    // MARK: - domain

    static let timeoutField = LuaAPIField("timeout", "colorun.Duration", "the command's timeout (default 5s)")

    static let domains: [LuaAPIEntry] = [
        .function("domain.get", [.init("name", "string")], ["colorun.Domain"], "A domain named on the command line, by the lab, or opened earlier."),
        .function("domain.open", [.init("spec", "table", fields: [
            .init("name", "string", "the domain's name (required)"),
            .init("qmp", "string", "unix:PATH, tcp:HOST:PORT or tls:HOST:PORT[,dir=DIR][,ca=FILE][,cert=FILE][,key=FILE][,hostname=NAME] (required)"),
            timeoutField,
            .init("shared", "boolean", "connect per command or burst, for a monitor another program uses (default false)"),
            .init("tls", "table", "a tls: endpoint's options as a table: {dir=, ca=, cert=, key=, hostname=}"),
        ])], ["colorun.Domain"], "Binds a name to a monitor from the script."),
        .function("domain.xen", [.init("domid", "integer"), .init("opts", "table", optional: true, fields: [
            .init("run_dir", "string", "libxl's run directory (default /var/run/xen)"), .init("name", "string", "default xen-DOMID"),
            .init("monitor", "string", "colorun's own monitor (an endpoint), held for the run"),
            timeoutField,
        ])], ["colorun.Domain"], "A Xen domain's device model: RUN_DIR/qmp-colorun-NAME if it exists (held), else libxl's qmp-libxl-DOMID (shared)."),
        .function("domain.list", [], ["colorun.Domain[]"], "Every domain known to this run, in the order they were added."),
        .function("domain.is", [.init("value", "any")], ["boolean"], "True if value is a domain."),
        .method("Domain:status", [.init("opts", "table", optional: true, fields: [timeoutField])], ["table"], "qmp.status as a method."),
        .method("Domain:stop", [], [], "qmp.stop as a method."),
        .method("Domain:resume", [], [], "qmp.resume as a method."),
        .method("Domain:save", [.init("path", "string"), .init("opts", "table", optional: true, fields: saveFields)], [], "qmp.save as a method."),
        .method("Domain:restore", [.init("path", "string"), .init("opts", "table", optional: true, fields: [timeoutField])], [], "qmp.restore as a method."),
        .method("Domain:execute", [.init("command", "string"), .init("args", "table", optional: true),
                                   .init("opts", "table", optional: true, fields: [timeoutField])], ["any"], "qmp.execute as a method."),
        .method("Domain:alive", [.init("timeout", "colorun.Duration", optional: true)], ["boolean"], "True if the monitor answers query-status in time (default 1s); never raises."),
        .method("Domain:on", [.init("event", "string"), .init("fn", "fun(ev: {event: string, data: table, timestamp: table, domain: string})")],
                ["colorun.Handle"], "Runs fn(ev) as a task for each QMP event named event (\"*\": all)."),
        .method("Domain:stats", [], ["{commands: integer, failures: integer, connects: integer, disconnects: integer, mean_latency_ms: number}"],
                "The domain's command and connection counts."),
    ]

    // MARK: - qmp

    static let saveFields = [LuaAPIField("live", "boolean", "xen-save-devices-state's live flag"), timeoutField]

    static let qmpFunctions: [LuaAPIEntry] = [
        .function("qmp.execute", [.init("d", "colorun.DomainRef"), .init("command", "string"), .init("args", "table", optional: true),
                                  .init("opts", "table", optional: true, fields: [timeoutField])], ["any"], "Sends any QMP command; returns its return value."),
        .function("qmp.stop", [.init("d", "colorun.DomainRef")], [], "stop (journaled first)."),
        .function("qmp.resume", [.init("d", "colorun.DomainRef")], [], "cont."),
        .function("qmp.save", [.init("d", "colorun.DomainRef"), .init("path", "string"), .init("opts", "table", optional: true, fields: saveFields)],
                  [], "xen-save-devices-state to path."),
        .function("qmp.restore", [.init("d", "colorun.DomainRef"), .init("path", "string"), .init("opts", "table", optional: true, fields: [timeoutField])],
                  [], "xen-load-devices-state from path (Xen's QEMU only)."),
        .function("qmp.status", [.init("d", "colorun.DomainRef"), .init("opts", "table", optional: true, fields: [timeoutField])],
                  ["{status: string, running: boolean, singlestep: boolean}"], "query-status."),
    ]

    // MARK: - colo, remus

    static let checkpoints: [LuaAPIEntry] = [
        .function("colo.checkpoint", [.init("primary", "colorun.DomainRef"), .init("secondary", "colorun.DomainRef"),
                                      .init("opts", "table", optional: true, fields: [
                                          .init("keep", "integer", "generations to keep (default --keep)"),
                                          .init("pipeline", "boolean", "return when both run again; the generation commits in the background (default false)"),
                                      ])],
                  ["colorun.CheckpointResult"], "The Xen-flavour cycle: stop both, save, load on the secondary, resume both, commit."),
        .function("colo.generations", [.init("primary", "colorun.DomainRef"), .init("secondary", "colorun.DomainRef")],
                  ["colorun.Generation[]"], "The pair's good generations, oldest first."),
        .function("colo.policy", [.init("spec", "table", fields: [
            .init("primary", "colorun.Domain", "required"), .init("secondary", "colorun.Domain", "required"),
            .init("interval", "colorun.Duration", "required"), .init("mode", "string", "\"xen\" (default) or \"remus\""),
            .init("keep", "integer", "generations to keep"), .init("retry", "table", "retry's options around each checkpoint"),
            .init("on_checkpoint", "fun(result: colorun.CheckpointResult)", "after each good checkpoint"),
            .init("on_checkpoint_error", "fun(err: any)", "after a checkpoint failed all its attempts"),
            .init("on_failover", "fun(primary: colorun.Domain, secondary: colorun.Domain, reason: string)", "when the primary is lost"),
            .init("heartbeat", "colorun.Duration", "policy.on_lost's heartbeat"), .init("heartbeat_timeout", "colorun.Duration", "and its timeout"),
        ])], ["table"], "The declarative form: one protected pair; several per file."),
        .function("colo.native.start", [.init("primary", "colorun.DomainRef"), .init("secondary", "colorun.DomainRef"), .init("opts", "table", fields: coloNativeFields)],
                  ["table"], "Wires QEMU's own COLO over QMP (NBD, replication, chardevs, filters, colo-compare), migrates, waits for COLO."),
        .function("colo.native.check", [.init("d", "colorun.DomainRef"), .init("role", "string")], ["boolean", "string[]"],
                  "Whether d has the COLO command-line layout for role (\"primary\" or \"secondary\"), and what is missing."),
        .function("colo.native.status", [.init("d", "colorun.DomainRef")], ["table"], "query-colo-status."),
        .function("colo.native.failover", [.init("secondary", "colorun.DomainRef")], ["table"],
                  "The primary is lost: promotes the secondary (nbd-server-stop, x-colo-lost-heartbeat, its redirectors removed); a failover."),
        .function("colo.native.drop_secondary", [.init("primary", "colorun.DomainRef")], ["table"],
                  "The secondary is lost: the primary goes on alone (replication child, filters, colo-compare removed); a failover."),
        .function("colo.native.reprotect", [.init("survivor", "colorun.DomainRef"), .init("new_secondary", "colorun.DomainRef"), .init("opts", "table", fields: coloNativeFields)],
                  ["table"], "Resyncs a fresh secondary from the survivor (blockdev-mirror), then restarts COLO; reports the survivor's pause."),
        .function("colo.native.checkpoint", [.init("primary", "colorun.DomainRef"), .init("opts", "table", optional: true, fields: [
            .init("delay", "colorun.Duration", "a new x-checkpoint-delay"),
            .init("timeout", "colorun.Duration", "how long to wait for the checkpoint (default 10s)"),
        ])], ["number"], "Forces a COLO checkpoint now and waits for it; returns its milliseconds."),
        .function("colo.native.on_exit", [.init("d", "colorun.DomainRef"), .init("fn", "fun(ev: table)")], ["colorun.Handle"], "d:on(\"COLO_EXIT\", fn)."),
        .value("colo.native.ids", "table<string, string>", "The ids colo.native gives the disk, nodes, chardevs and objects."),
        .function("remus.checkpoint", [.init("d", "colorun.DomainRef"), .init("opts", "table", optional: true, fields: [
            .init("keep", "integer", "generations to keep (default --keep)"),
            .init("disks", "string[]|false", "disks to snapshot (default: every writable qcow2 disk)"),
            .init("output_commit", "string[]|false", "netdevs whose output is held (default: every NIC)"),
            .init("series", "string", "the generation series written (default: the domain's name)"),
        ])], ["colorun.CheckpointResult"], "A whole-VM checkpoint on plain QEMU (memory, disks, output commit)."),
        .function("remus.restore", [.init("spec", "table", fields: [
            .init("name", "string", "the standby's domain name (required)"),
            .init("from", "colorun.DomainRef", "whose checkpoints (required)"),
            .init("qemu", "string[]", "the standby's QEMU command line"),
            .init("qmp", "string", "the monitor that command line opens"),
            .init("paused", "boolean", "load but do not resume"),
            .init("lab", "boolean", "under --lab: the lab starts the standby"),
        ]), .init("generation", "integer", optional: true)],
                  ["colorun.Domain", "{name: string, endpoint: string, generation: integer, restore_ms: number, pid: integer}"],
                  "Starts a standby QEMU from a generation (default the newest good one); a failover."),
        .function("remus.generations", [.init("d", "colorun.DomainRef")], ["colorun.Generation[]"], "The good generations, oldest first."),
    ]

    // MARK: - policy

    static let policyFunctions: [LuaAPIEntry] = [
        .function("policy.every", [.init("interval", "colorun.Duration"), .init("fn", "fun()")], ["colorun.TimerHandle"],
                  "Runs fn() as a task every interval (a tick during the previous run is skipped)."),
        .function("policy.after", [.init("delay", "colorun.Duration"), .init("fn", "fun()")], ["colorun.TimerHandle"], "Runs fn() once after delay."),
        .function("policy.on_lost", [.init("d", "colorun.DomainRef"), .init("fn", "fun(d: colorun.Domain, reason: string)"),
                                     .init("opts", "table", optional: true, fields: [
                                        .init("heartbeat", "colorun.Duration", "query-status every (default 1s)"),
                                        .init("timeout", "colorun.Duration", "unanswered for this long: lost (default 1s)"),
                                     ])], ["colorun.Handle"], "Runs fn(d, reason) once when d's monitor drops or misses its heartbeat."),
        .function("policy.stop", [], [], "Ends the run cleanly (every task cancelled, stopped domains resumed)."),
        .function("policy.seconds", [.init("duration", "colorun.Duration")], ["number"], "A duration in seconds."),
        .function("policy.bytes", [.init("size", "colorun.Size")], ["integer"], "A size (\"64MiB\", 1024) in bytes."),
    ]

    // MARK: - cluster

    static let clusterFunctions: [LuaAPIEntry] = [
        .function("cluster.enabled", [], ["boolean"], "True when the run has an etcd arbiter (--etcd)."),
        .function("cluster.node", [], ["string"], "This host's name in the pair (--node)."),
        .function("cluster.pair", [], ["string"], "The pair's name (--pair; default the policy file's name)."),
        .function("cluster.acquire", [.init("opts", "table", optional: true, fields: [
            .init("wait", "boolean|colorun.Duration", "true: until won; a duration: at most that long (default: one try)"),
        ])], ["boolean", "integer|{node: string, token: integer, lease: integer}"],
                  "Tries to win the pair's key: true, token, or false and the holder."),
        .function("cluster.is_primary", [], ["boolean"], "True while this host holds the key."),
        .function("cluster.token", [], ["integer?"], "The fencing token while this host holds the key."),
        .function("cluster.holder", [.init("pair", "string", optional: true)], ["{node: string, token: integer, lease: integer}?"],
                  "Who holds the key of pair (default this run's), read from etcd."),
        .function("cluster.guard", [.init("d", "colorun.DomainRef")], [], "d runs under the key: paused, and refusing cont, while this host is fenced."),
        .function("cluster.on_fenced", [.init("fn", "fun(reason: string)")], ["colorun.Handle"], "Runs fn(reason) each time this host is fenced."),
        .function("cluster.release", [], ["boolean"], "Gives the key up: guarded domains paused, then the key deleted."),
        .function("cluster.override", [.init("reason", "string")], [], "Checkpoints and promotions no longer need the key (logged at every use)."),
        .function("cluster.status", [], ["table"], "{enabled=, node=, pair=, key=, ttl=, holding=, token=, lease=, fenced=, override=, guarded=}."),
    ]

    // MARK: - lab

    static let labFunctions: [LuaAPIEntry] = [
        .function("lab.kill", [.init("d", "colorun.DomainRef"), .init("signal", "string", optional: true)], ["boolean"],
                  "Sends KILL (default), TERM, STOP or CONT to a lab domain's QEMU."),
        .function("lab.freeze", [.init("d", "colorun.DomainRef")], ["boolean"], "SIGSTOP."),
        .function("lab.thaw", [.init("d", "colorun.DomainRef")], ["boolean"], "SIGCONT."),
        .function("lab.counter", [.init("d", "colorun.DomainRef")], ["integer"], "The counting guest's counter."),
        .function("lab.pid", [.init("d", "colorun.DomainRef")], ["integer"], "The lab QEMU's process id."),
        .function("lab.standby", [.init("name", "string"), .init("from", "colorun.DomainRef")], ["table"], "A remus.restore spec for a lab-managed standby."),
        .function("lab.ready", [.init("d", "colorun.DomainRef"), .init("timeout", "colorun.Duration", optional: true)], ["number"],
                  "--guest linux: waits until d's ledger answers; the milliseconds waited."),
        .function("lab.record", [.init("d", "colorun.DomainRef"), .init("n", "integer"), .init("timeout", "colorun.Duration", optional: true)], [],
                  "--guest linux: writes record n, returns at its ack."),
        .function("lab.ledger", [.init("d", "colorun.DomainRef")], ["{records: integer[], count: integer, bad: integer, fsck: string}"],
                  "--guest linux: the ledger's records."),
        .function("lab.colo", [.init("d", "colorun.DomainRef")], ["{uri: string, nbd: string, net: string, netdev: string}"],
                  "--guest colo: the addresses colo.native needs to use d as the secondary."),
        .function("lab.colo_secondary", [.init("name", "string")], ["colorun.Domain"], "--guest colo: a fresh COLO-shaped secondary."),
        .function("lab.disk_pattern", [.init("d", "colorun.DomainRef"), .init("offset", "integer"), .init("length", "integer")], ["integer"],
                  "--guest colo: the byte filling that range of d's guest disk, -1 if the bytes differ."),
        .function("lab.reboot", [.init("d", "colorun.DomainRef")], ["{records: integer[], count: integer, bad: integer, fsck: string}"],
                  "--guest linux: powers d off, boots its disk again, returns what that boot found."),
    ]
}

/// One function, method or value of the API.
public struct LuaAPIEntry: Sendable {
    public enum Kind: Sendable { case function, method, value }
    /// `module.function`, `Class:method`, or a global's name.
    public var name: String
    public var kind: Kind
    public var parameters: [LuaAPIParameter]
    /// Lua-language-server types of the results (for a value: its type).
    public var returns: [String]
    public var summary: String

    static func function(_ name: String, _ parameters: [LuaAPIParameter], _ returns: [String], _ summary: String) -> LuaAPIEntry {
        LuaAPIEntry(name: name, kind: .function, parameters: parameters, returns: returns, summary: summary)
    }

    static func method(_ name: String, _ parameters: [LuaAPIParameter], _ returns: [String], _ summary: String) -> LuaAPIEntry {
        LuaAPIEntry(name: name, kind: .method, parameters: parameters, returns: returns, summary: summary)
    }

    static func value(_ name: String, _ type: String, _ summary: String) -> LuaAPIEntry {
        LuaAPIEntry(name: name, kind: .value, parameters: [], returns: [type], summary: summary)
    }

    /// The global it lives in (`qmp` for `qmp.stop`, `sleep` for `sleep`; nil for methods).
    public var global: String? {
        kind == .method ? nil : String(name.split(separator: ".").first ?? "")
    }
}

public struct LuaAPIParameter: Sendable {
    public var name: String
    /// A lua-language-server type (`string`, `colorun.Duration`, `fun(d: colorun.Domain)`).
    public var type: String
    public var optional: Bool
    /// For a table of options or a spec: the fields it accepts (any other is an error).
    public var fields: [LuaAPIField]
    public var doc: String

    init(_ name: String, _ type: String, optional: Bool = false, fields: [LuaAPIField] = [], doc: String = "") {
        self.name = name
        self.type = type
        self.optional = optional
        self.fields = fields
        self.doc = doc
    }
}

public struct LuaAPIField: Sendable {
    public var name: String
    public var type: String
    public var doc: String

    init(_ name: String, _ type: String, _ doc: String) {
        self.name = name
        self.type = type
        self.doc = doc
    }
}

public struct LuaAPIClass: Sendable {
    public var name: String
    public var summary: String
    public var fields: [LuaAPIField]
}
