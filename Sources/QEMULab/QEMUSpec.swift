import ColorunSystem

/// What to start: the fixed machine that answers QMP under TCG (the QEMU facts it relies on
/// are in docs/qemu-notes.md), plus the knobs tests and `colorun --lab` need.
public struct QEMUSpec: Sendable, Hashable {
    public var executable: String
    /// `-M`; `suppress-vmdesc=on` keeps migration streams free of the JSON description.
    public var machine: String
    public var accelerator: String
    public var memoryMiB: Int
    /// `-incoming` (e.g. `exec:cat FILE` for a Remus restore, or `defer`).
    public var incoming: String?
    /// Boot the 512-byte counting guest from a read-only floppy (see `CountingGuest`).
    public var countingGuest: Bool
    public var extraArguments: [String]
    /// The run directory is made under this one (keep it short: UNIX socket paths hold 107 bytes).
    public var runDirectoryParent: String

    public init(
        executable: String = "qemu-system-x86_64",
        machine: String = "pc,suppress-vmdesc=on",
        accelerator: String = "tcg",
        memoryMiB: Int = 64,
        incoming: String? = nil,
        countingGuest: Bool = false,
        extraArguments: [String] = [],
        runDirectoryParent: String = "/tmp"
    ) {
        self.executable = executable
        self.machine = machine
        self.accelerator = accelerator
        self.memoryMiB = memoryMiB
        self.incoming = incoming
        self.countingGuest = countingGuest
        self.extraArguments = extraArguments
        self.runDirectoryParent = runDirectoryParent
    }

    /// The command line (without the executable) for a run directory's files.
    public func arguments(qmpSocket: String, guestImage: String?) -> [String] {
        var args = [
            "-M", machine, "-accel", accelerator, "-nodefaults", "-display", "none", "-m", String(memoryMiB),
            "-global", "migration.send-configuration=off", "-global", "apic.vapic=off",
            "-qmp", "unix:\(qmpSocket),server=on,wait=off",
        ]
        if let guestImage {
            args += ["-drive", "if=floppy,format=raw,file=\(guestImage),readonly=on"]
        }
        if let incoming {
            args += ["-incoming", incoming]
        }
        return args + extraArguments
    }
}

/// Why QEMU could not be started.
public struct QEMULabError: Error, Sendable, Hashable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// How a QEMU process ended (a child process's exit, as `ColorunSystem` reports it).
public typealias QEMUExitStatus = ChildExitStatus
