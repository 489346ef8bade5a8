#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Starting a QEMU that outlives colorun: a production standby restored from a checkpoint
/// must keep running when colorun exits, unlike the lab's instances.
public enum DetachedQEMU {
    /// Spawns `commandLine` in a session of its own, stdin and stdout on /dev/null, stderr
    /// appended to `stderrPath`. Returns its pid. The child is not reaped by colorun: when
    /// colorun exits, init adopts it.
    public static func start(_ commandLine: [String], stderrPath: String) throws(QEMULabError) -> pid_t {
        guard !commandLine.isEmpty else { throw QEMULabError("empty QEMU command line") }
        return try spawn(commandLine, stderrPath: stderrPath, detached: true)
    }
}
