#define _GNU_SOURCE
#include "colorun_system.h"

#include <errno.h>
#include <sched.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

/* glibc 2.36 has no wrapper for sched_setattr/sched_getattr: the kernel's struct. */
struct colorun_sched_attr {
    uint32_t size;
    uint32_t sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime;
    uint64_t sched_deadline;
    uint64_t sched_period;
};

int colorun_set_thread_slice(uint64_t nanoseconds) {
    struct colorun_sched_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.sched_policy = SCHED_OTHER;
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, 0); /* this thread's nice value (Linux: per thread) */
    if (nice == -1 && errno != 0) return errno;
    attr.sched_nice = nice;
    attr.sched_runtime = nanoseconds;
    if (syscall(SYS_sched_setattr, 0, &attr, 0) != 0) return errno;
    return 0;
}

int colorun_thread_slice(uint64_t *nanoseconds) {
    struct colorun_sched_attr attr;
    memset(&attr, 0, sizeof attr);
    if (syscall(SYS_sched_getattr, 0, &attr, sizeof attr, 0) != 0) return errno;
    *nanoseconds = attr.sched_runtime;
    return 0;
}
