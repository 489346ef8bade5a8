import ColorunSystem
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The owner record of a run directory (`colorun-owner` in it): the process that made the
/// directory and the processes it started there. A directory whose owner is gone is swept
/// (`RunDirectorySweep`): its processes killed, the directory removed.
///
/// The owner is named by pid and start time (`/proc/PID/stat`, field 22), so a pid reused
/// by an unrelated process does not keep a dead owner's directory alive.
public struct RunDirectoryOwner: Sendable, Hashable {
    public static let fileName = "colorun-owner"

    public var pid: pid_t
    /// The owner's start time in clock ticks since boot; 0 if unknown.
    public var startTime: UInt64
    /// Processes the owner started for this directory (QEMU).
    public var children: [pid_t]

    public init(pid: pid_t, startTime: UInt64, children: [pid_t] = []) {
        self.pid = pid
        self.startTime = startTime
        self.children = children
    }

    /// This process, with `children`.
    public static func current(children: [pid_t] = []) -> RunDirectoryOwner {
        let pid = getpid()
        return RunDirectoryOwner(pid: pid, startTime: ProcessInfoFile.stat(pid)?.startTime ?? 0, children: children)
    }

    /// Writes the record into `directory` (a whole new file renamed into place, so a reader
    /// never sees half of one).
    public func write(to directory: String) throws(SystemError) {
        var text = "pid \(pid)\nstart \(startTime)\n"
        for child in children { text += "child \(child)\n" }
        let partial = "\(directory)/.\(Self.fileName).partial"
        try writeFile(partial, Array(text.utf8))
        guard rename(partial, "\(directory)/\(Self.fileName)") == 0 else {
            let code = errno
            throw SystemError("cannot write \(directory)/\(Self.fileName): \(errnoText(code))", code: code)
        }
    }

    /// The record in `directory`, nil if there is none (or it is not one).
    public static func read(from directory: String) -> RunDirectoryOwner? {
        guard let bytes = try? readFile("\(directory)/\(fileName)") else { return nil }
        var pid: pid_t?
        var start: UInt64 = 0
        var children: [pid_t] = []
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            let words = line.split(separator: " ")
            guard words.count == 2 else { return nil }
            switch words[0] {
            case "pid": pid = pid_t(words[1])
            case "start": start = UInt64(words[1]) ?? 0
            case "child": if let child = pid_t(words[1]) { children.append(child) }
            default: return nil
            }
        }
        guard let pid, pid > 0 else { return nil }
        return RunDirectoryOwner(pid: pid, startTime: start, children: children)
    }

    /// Whether the owner still runs: its pid exists, is not a zombie, and started when the
    /// record says.
    public var isAlive: Bool {
        if pid == getpid() { return true }
        guard kill(pid, 0) == 0 || errno == EPERM else { return false }
        guard let stat = ProcessInfoFile.stat(pid) else { return true }
        if stat.state == "Z" { return false }
        return startTime == 0 || stat.startTime == startTime
    }
}

/// Cleans up after owners that died without cleaning up (SIGKILL, OOM, a crash): run
/// directories under a parent whose `RunDirectoryOwner` is gone. Their processes are killed
/// (SIGKILL), if they are still running and really are theirs (the command line names the
/// directory), and the directories removed. Directories without an owner record are left
/// alone: they are being made right now, or were not made by colorun's code.
public enum RunDirectorySweep {
    /// A swept directory.
    public struct Swept: Sendable, Hashable {
        public var path: String
        public var owner: pid_t
        /// Processes killed (they were still running).
        public var killed: [pid_t]
    }

    /// Directory names the sweep looks at: colorun's run and state directories.
    public static let namePrefix = "colorun-"

    private static let sweptParents = Mutex(Set<String>())

    /// Sweeps `parent` unless this process has already; what `QEMUInstance.start` and
    /// `colorun --lab` call before they make a directory there.
    @discardableResult
    public static func sweepOnce(_ parent: String, logger: Logger) -> [Swept] {
        let first = sweptParents.withLock { $0.insert(parent).inserted }
        return first ? sweep(parent, logger: logger) : []
    }

    /// Sweeps `parent` now, logging each directory swept (notice level).
    @discardableResult
    public static func sweep(_ parent: String, logger: Logger) -> [Swept] {
        var swept: [Swept] = []
        let me = getuid()
        for name in (try? listDirectory(parent)) ?? [] where name.hasPrefix(namePrefix) {
            let path = "\(parent)/\(name)"
            var info = stat()
            guard lstat(path, &info) == 0, info.st_mode & S_IFMT == S_IFDIR, info.st_uid == me,
                let owner = RunDirectoryOwner.read(from: path), !owner.isAlive
            else { continue }
            var killed: [pid_t] = []
            for pid in Set(owner.children + processesNaming(path)) where pid != getpid() {
                guard let stat = ProcessInfoFile.stat(pid), stat.state != "Z", commandLine(of: pid).contains(path + "/") else { continue }
                if kill(pid, SIGKILL) == 0 { killed.append(pid) }
            }
            removeTree(path)
            let entry = Swept(path: path, owner: owner.pid, killed: killed.sorted())
            logger.notice("swept a run directory whose owner is gone", metadata: [
                "directory": .string(path), "owner_pid": .stringConvertible(owner.pid),
                "killed_pids": .string(entry.killed.map(String.init).joined(separator: ",")),
            ])
            swept.append(entry)
        }
        return swept
    }

    /// Pids of this user's processes whose command line names a file under `directory`.
    static func processesNaming(_ directory: String) -> [pid_t] {
        let me = getuid()
        return ((try? listDirectory("/proc")) ?? []).compactMap { name -> pid_t? in
            guard let pid = pid_t(name) else { return nil }
            var info = stat()
            guard stat("/proc/\(name)", &info) == 0, info.st_uid == me else { return nil }
            return commandLine(of: pid).contains(directory + "/") ? pid : nil
        }
    }

    /// `/proc/PID/cmdline` with the arguments joined by spaces ("" if unreadable).
    static func commandLine(of pid: pid_t) -> String {
        let bytes = (try? readFile("/proc/\(pid)/cmdline")) ?? []
        return String(decoding: bytes.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
    }
}

/// `/proc/PID/stat`, the fields used here.
public enum ProcessInfoFile {
    public struct Stat: Sendable {
        /// R, S, D, Z, T, ...
        public var state: Character
        public var parent: pid_t
        /// Clock ticks since boot.
        public var startTime: UInt64
    }

    public static func stat(_ pid: pid_t) -> Stat? {
        guard let bytes = try? readFile("/proc/\(pid)/stat") else { return nil }
        let text = String(decoding: bytes, as: UTF8.self)
        // The command name (field 2) is in parentheses and may hold spaces and parentheses.
        guard let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // fields[0] is field 3 (state), fields[1] field 4 (ppid), fields[19] field 22 (starttime).
        guard fields.count > 19, let state = fields[0].first, let parent = pid_t(fields[1]), let start = UInt64(fields[19]) else {
            return nil
        }
        return Stat(state: state, parent: parent, startTime: start)
    }
}
