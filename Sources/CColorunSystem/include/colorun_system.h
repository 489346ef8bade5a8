#ifndef COLORUN_SYSTEM_H
#define COLORUN_SYSTEM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// How a child started by `colorun_spawn` relates to colorun.
enum {
    /// Dies with colorun: PR_SET_PDEATHSIG(SIGKILL), set in the child, fires when the thread
    /// that forked it ends, so owned children are forked by one thread that never ends.
    COLORUN_SPAWN_OWNED = 0,
    /// Outlives colorun: a session of its own (setsid), no death signal.
    COLORUN_SPAWN_DETACHED = 1,
};

/// Starts `path` (an executable path, no PATH search) with `argv` and `envp` (both
/// NULL-terminated), descriptors `stdin_fd`, `stdout_fd` and `stderr_fd` of the caller as
/// its 0, 1 and 2, every other descriptor closed, the signal mask empty and every signal's
/// disposition the default. `mode` is COLORUN_SPAWN_OWNED or COLORUN_SPAWN_DETACHED.
///
/// Returns 0 and the child's pid in `*pid` once the child has exec'd, or an errno value:
/// the child's own if it could not exec (it has exited and been reaped then).
int colorun_spawn(const char *path, char *const argv[], char *const envp[],
                  int stdin_fd, int stdout_fd, int stderr_fd, int mode, pid_t *pid);

/// Starts writing the file's dirty pages to disk without waiting (sync_file_range with
/// SYNC_FILE_RANGE_WRITE). Before fsyncing many files, starting every file's writeback
/// first lets the filesystem allocate all their blocks in one journal transaction, so
/// the first fsync commits it for all and the others find their data written (a group
/// commit). Returns 0 or an errno value.
int colorun_start_writeback(int fd);

/// syncfs(2): writes every dirty page and the journal of the filesystem holding `fd` and
/// waits for them. Returns 0 or an errno value (Linux 5.8 and later also report writeback
/// errors of the filesystem here).
int colorun_syncfs(int fd);

/// CRC-32C (Castagnoli) of `length` bytes at `data`, continuing from `crc` (0 to start).
/// Uses the CPU's crc32 instruction when it has SSE 4.2.
uint32_t colorun_crc32c(uint32_t crc, const void *data, size_t length);

/// Asks the kernel for a time slice of `nanoseconds` for the calling thread under its
/// normal (fair) policy: sched_setattr(2) with SCHED_OTHER and `sched_runtime`, which Linux
/// 6.12 and later (EEVDF) take as the thread's slice, clamped to 0.1-100 ms (0: the
/// default). A thread with a shorter slice than the one running may preempt it when it
/// wakes, so it runs as soon as its socket is readable. The nice value is kept. Older
/// kernels accept the call and ignore the slice. Returns 0 or an errno value.
int colorun_set_thread_slice(uint64_t nanoseconds);

/// The calling thread's slice as sched_getattr(2) reports it (`sched_runtime`, ns); 0 where
/// the kernel reports none. Returns 0 or an errno value.
int colorun_thread_slice(uint64_t *nanoseconds);

#endif
