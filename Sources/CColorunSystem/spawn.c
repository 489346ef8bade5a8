// Child processes that die with colorun, or outlive it.
//
// Between fork and exec the child calls only async-signal-safe functions (prctl, getppid,
// setsid, fcntl, dup2, syscall, sigprocmask, execve, write, _exit): everything it needs is
// prepared by the parent before the fork.
#define _GNU_SOURCE
#include "colorun_system.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

// The kernel's sigset_t: 64 signals on the architectures colorun runs on.
#define KERNEL_SIGSET_SIZE 8

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

struct request {
    const char *path;
    char *const *argv;
    char *const *envp;
    int fds[3];
    int mode;
    pid_t pid;
    int result;
    int done;
};

/// In the child: reports `code` to the parent through the error pipe and exits.
__attribute__((noreturn)) static void child_fail(int error_fd, int code) {
    ssize_t ignored = write(error_fd, &code, sizeof code);
    (void)ignored;
    _exit(127);
}

__attribute__((noreturn)) static void child(const struct request *r, pid_t parent, int error_fd, int max_fd) {
    if (r->mode == COLORUN_SPAWN_OWNED) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) child_fail(error_fd, errno);
        // The parent may have died before the death signal was armed: then nobody will send
        // it, and nobody reads the error pipe either.
        if (getppid() != parent) _exit(127);
    } else if (setsid() < 0) {
        child_fail(error_fd, errno);
    }

    // Move the three descriptors out of the way first (a source may itself be 0, 1 or 2),
    // then onto 0, 1 and 2; dup2 clears close-on-exec on the copies.
    int high[3];
    for (int i = 0; i < 3; i++) {
        high[i] = fcntl(r->fds[i], F_DUPFD_CLOEXEC, 3);
        if (high[i] < 0) child_fail(error_fd, errno);
    }
    for (int i = 0; i < 3; i++) {
        if (dup2(high[i], i) < 0) child_fail(error_fd, errno);
    }
    // Every other descriptor closes at exec (the error pipe too: EOF tells the parent the
    // exec worked).
#ifdef SYS_close_range
    long marked = syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC);
#else
    long marked = -1;
#endif
    if (marked != 0) {
        for (int fd = 3; fd < max_fd; fd++) {
            if (fd != error_fd) (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
        }
    }

    // Every disposition back to the default, through the system call: glibc's sigaction
    // refuses the signals it reserves (32 and 33), and an ignored one survives exec.
    // All zeros is SIG_DFL, no flags, an empty mask, in the kernel's struct sigaction.
    unsigned long defaults[8];
    memset(defaults, 0, sizeof defaults);
    for (int signo = 1; signo < NSIG; signo++) {
        if (signo != SIGKILL && signo != SIGSTOP) (void)syscall(SYS_rt_sigaction, signo, defaults, NULL, KERNEL_SIGSET_SIZE);
    }
    sigset_t none;
    sigemptyset(&none);
    (void)sigprocmask(SIG_SETMASK, &none, NULL);

    execve(r->path, r->argv, r->envp);
    child_fail(error_fd, errno);
}

static int fork_exec(struct request *r) {
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) return errno;
    struct rlimit limit;
    int max_fd = 65536;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY && limit.rlim_cur < (rlim_t)max_fd) {
        max_fd = (int)limit.rlim_cur;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        int error = errno;
        close(pipe_fds[0]);
        close(pipe_fds[1]);
        return error;
    }
    if (pid == 0) {
        close(pipe_fds[0]);
        child(r, parent, pipe_fds[1], max_fd);
    }
    close(pipe_fds[1]);
    int child_error = 0;
    ssize_t n;
    do {
        n = read(pipe_fds[0], &child_error, sizeof child_error);
    } while (n < 0 && errno == EINTR);
    close(pipe_fds[0]);
    if (n == (ssize_t)sizeof child_error) {
        // The child could not exec and has exited: reap it here.
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
        return child_error != 0 ? child_error : ECHILD;
    }
    r->pid = pid;
    return 0;
}

// MARK: - The spawner thread

// Owned children are forked by this one thread, which starts on first use and never ends:
// PR_SET_PDEATHSIG fires when the forking *thread* exits, and Swift's and Dispatch's worker
// threads come and go.
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t one_caller = PTHREAD_MUTEX_INITIALIZER;
static struct request *pending;
static pthread_once_t started = PTHREAD_ONCE_INIT;
static int start_error;

static void *spawner_main(void *unused) {
    (void)unused;
    pthread_mutex_lock(&lock);
    for (;;) {
        while (pending == NULL || pending->done) pthread_cond_wait(&changed, &lock);
        struct request *r = pending;
        pthread_mutex_unlock(&lock);
        int result = fork_exec(r);
        pthread_mutex_lock(&lock);
        r->result = result;
        r->done = 1;
        pthread_cond_broadcast(&changed);
    }
    return NULL;
}

static void start_spawner(void) {
    // The thread blocks every signal (it inherits the mask), so no handler runs on it.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    start_error = pthread_create(&thread, &attributes, spawner_main, NULL);
    pthread_attr_destroy(&attributes);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

int colorun_spawn(const char *path, char *const argv[], char *const envp[],
                  int stdin_fd, int stdout_fd, int stderr_fd, int mode, pid_t *pid) {
    struct request r = {
        .path = path, .argv = argv, .envp = envp,
        .fds = {stdin_fd, stdout_fd, stderr_fd},
        .mode = mode, .pid = -1, .result = 0, .done = 0,
    };
    if (mode == COLORUN_SPAWN_DETACHED) {
        r.result = fork_exec(&r);
    } else {
        pthread_once(&started, start_spawner);
        if (start_error != 0) return start_error;
        pthread_mutex_lock(&one_caller);
        pthread_mutex_lock(&lock);
        pending = &r;
        pthread_cond_broadcast(&changed);
        while (!r.done) pthread_cond_wait(&changed, &lock);
        pending = NULL;
        pthread_mutex_unlock(&lock);
        pthread_mutex_unlock(&one_caller);
    }
    if (r.result == 0) *pid = r.pid;
    return r.result;
}
