/* The blocking C baseline of colorun-bench: query-status round trips over a QMP unix socket.
 *
 *   bench_qmp_client SOCK N [epoll]   prints {"samples_ns": [...]} (N samples after 20 warm-up)
 *
 * One connection; each round trip writes the command with one write() and reads with
 * blocking read() until the line holding "return" (events are skipped). No JSON parsing
 * beyond finding the reply line: what a lean C client would do. With `epoll` the socket is
 * non-blocking and every read waits in epoll_wait first, as an event loop does (SwiftNIO,
 * libuv, QEMU's own): the same client, only the way it waits differs. scripts/bench compiles
 * it with `cc -O2` into .build-bench/.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define WARMUP 20

static char buf[1 << 16];
static size_t have;
/* With `epoll`: the epoll instance the socket is registered in (level-triggered), else -1. */
static int ep = -1;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Reads lines until one is not an event; returns 0 for a "return", -1 otherwise. */
static int read_reply(int fd) {
    for (;;) {
        char *nl;
        while ((nl = memchr(buf, '\n', have)) == NULL) {
            if (ep >= 0) {
                struct epoll_event ev;
                int ready = epoll_wait(ep, &ev, 1, -1);
                if (ready < 0 && errno == EINTR) continue;
                if (ready != 1) return -1;
            }
            ssize_t n = read(fd, buf + have, sizeof buf - have);
            if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (n <= 0) return -1;
            have += (size_t)n;
        }
        size_t len = (size_t)(nl - buf) + 1;
        int is_return = memmem(buf, len, "\"return\"", 8) != NULL;
        int is_error = memmem(buf, len, "\"error\"", 7) != NULL;
        memmove(buf, buf + len, have - len);
        have -= len;
        if (is_return) return 0;
        if (is_error) return -1;
        /* the greeting or an event: keep reading */
    }
}

static int send_all(int fd, const char *s) {
    size_t len = strlen(s), off = 0;
    while (off < len) {
        ssize_t n = write(fd, s + off, len - off);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) return -1;
        off += (size_t)n;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3 && !(argc == 4 && strcmp(argv[3], "epoll") == 0)) {
        fprintf(stderr, "usage: %s SOCK N [epoll]\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[2]);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("connect");
        return 1;
    }
    if (argc == 4) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        ep = epoll_create1(EPOLL_CLOEXEC);
        if (ep < 0 || fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
            perror("epoll");
            return 1;
        }
    }
    /* The greeting is a line without "return": send the capabilities and read to its reply. */
    if (send_all(fd, "{\"execute\": \"qmp_capabilities\"}\n") || read_reply(fd)) {
        fprintf(stderr, "no QMP handshake\n");
        return 1;
    }
    long long *samples = calloc((size_t)n, sizeof *samples);
    /* The bytes colorun sends (compact, no id): QEMU reads a command one byte per main-loop
       iteration, so a longer line would cost the baseline time that is not the client's. */
    const char *cmd = "{\"execute\":\"query-status\"}\n";
    for (int i = 0; i < WARMUP + n; i++) {
        long long t = now_ns();
        if (send_all(fd, cmd) || read_reply(fd)) {
            fprintf(stderr, "query-status failed\n");
            return 1;
        }
        if (i >= WARMUP) samples[i - WARMUP] = now_ns() - t;
    }
    printf("{\"samples_ns\": [");
    for (int i = 0; i < n; i++) printf("%s%lld", i ? ", " : "", samples[i]);
    printf("]}\n");
    return 0;
}
