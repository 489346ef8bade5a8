import ColorunSystem

/// Starting a QEMU that outlives colorun: a production standby restored from a checkpoint is
/// a production VM, and must keep running when colorun exits or is killed, unlike the lab's
/// and the tests' instances (QEMULab), which die with their owner.
enum DetachedQEMU {
    /// Spawns `commandLine` in a session of its own (no death signal), stdin and stdout on
    /// /dev/null, stderr appended to `stderrPath`. Returns its pid. colorun does not reap
    /// it: when colorun exits, init adopts it.
    static func start(_ commandLine: [String], stderrPath: String) throws(SystemError) -> Int32 {
        try spawnChild(commandLine, lifetime: .detached, standardError: .appendingTo(stderrPath))
    }
}
