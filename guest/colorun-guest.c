/*
 * colorun-guest: the program of colorun's Linux lab guest (see guest/README.md).
 *
 *   colorun-guest ledger PORT FILE   serve the ledger on TCP PORT, records appended to FILE
 *   colorun-guest dirty MIB [RATE]   fill MIB MiB of memory, then keep dirtying it
 *                                    (RATE pages per second, 0 or absent: as fast as it can)
 *
 * The ledger speaks lines of text; every request gets exactly one reply line, except
 * `dump`, whose reply ends with its `end` line:
 *   ping              -> pong
 *   record N [TEXT]   -> ack N          (only once the record is durable: write + fdatasync)
 *                        error N REASON (nothing acknowledged)
 *   count             -> count K BAD
 *   dump              -> r N ... (one line per valid record, in file order), then end K BAD
 *   fsck              -> fsck RESULT    (what /run/colorun-fsck says: the boot's check)
 *   dirty MIB [RATE]  -> dirty ready MIB (a child process fills MIB MiB, then keeps dirtying;
 *                        a later `dirty` replaces it, `dirty 0` stops it)
 *   poweroff          -> bye, then sync, unmount the ledger's filesystem, power off
 * Anything else gets `error unknown`.
 *
 * A record is the line "N CRC TEXT\n" in FILE, CRC the CRC-32 (hex) of "N TEXT". At start
 * the file is scanned: a line whose CRC does not match counts as bad; an incomplete last
 * line (a write that was never acknowledged) is cut off.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLIENTS 16
#define LINE_MAX_LEN 4096

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32(const char *data, size_t len) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++) c = crc_table[(c ^ (uint8_t)data[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static void console(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void console(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    /* stdout is the serial console: one write per line so lines do not interleave. */
    size_t n = strlen(buf);
    if (n < sizeof buf - 1) { buf[n++] = '\n'; }
    ssize_t unused = write(1, buf, n);
    (void)unused;
}

/* ---------- dirty mode ---------- */

static volatile sig_atomic_t dirty_stop;

static void on_term(int sig) { (void)sig; dirty_stop = 1; }

/* Fills mib MiB with non-zero data (so migration cannot send zero pages), calls ready(),
 * then writes one word in every page, round after round, at rate pages/s (0: no limit). */
static void dirty_run(long mib, long rate, void (*ready)(long)) {
    size_t len = (size_t)mib << 20;
    long page = sysconf(_SC_PAGESIZE);
    unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) { console("DIRTY error mmap %ld MiB: %s", mib, strerror(errno)); _exit(1); }
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t off = 0; off < len; off += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        *(uint64_t *)(mem + off) = x | 1;
    }
    ready(mib);
    size_t pages = len / (size_t)page;
    uint64_t round = 0;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    uint64_t written = 0;
    while (!dirty_stop) {
        round++;
        for (size_t i = 0; i < pages && !dirty_stop; i++) {
            *(uint64_t *)(mem + i * (size_t)page + (round % ((size_t)page / 8)) * 8) += round;
            written++;
            if (rate > 0 && written % 64 == 0) {
                struct timespec now;
                clock_gettime(CLOCK_MONOTONIC, &now);
                double elapsed = (double)(now.tv_sec - start.tv_sec) + (double)(now.tv_nsec - start.tv_nsec) / 1e9;
                double due = (double)written / (double)rate;
                if (due > elapsed) {
                    double wait = due - elapsed;
                    struct timespec ts = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
                    nanosleep(&ts, NULL);
                }
            }
        }
    }
    _exit(0);
}

static void dirty_ready_console(long mib) { console("DIRTY ready mib=%ld", mib); }

static int dirty_ready_fd = -1;
static void dirty_ready_pipe(long mib) {
    console("DIRTY ready mib=%ld", mib);
    char c = 1;
    ssize_t unused = write(dirty_ready_fd, &c, 1);
    (void)unused;
    close(dirty_ready_fd);
}

static pid_t dirty_child = -1;

/* Starts a dirtying child; returns 0 once it has filled its memory. */
static int dirty_start(long mib, long rate) {
    if (dirty_child > 0) {
        kill(dirty_child, SIGTERM);
        waitpid(dirty_child, NULL, 0);
        dirty_child = -1;
    }
    if (mib <= 0) return 0;
    int fds[2];
    if (pipe(fds) != 0) return -1;
    pid_t pid = fork();
    if (pid < 0) { close(fds[0]); close(fds[1]); return -1; }
    if (pid == 0) {
        close(fds[0]);
        signal(SIGTERM, on_term);
        dirty_ready_fd = fds[1];
        dirty_run(mib, rate, dirty_ready_pipe);
    }
    close(fds[1]);
    char c;
    ssize_t n;
    do { n = read(fds[0], &c, 1); } while (n < 0 && errno == EINTR);
    close(fds[0]);
    if (n != 1) { waitpid(pid, NULL, 0); return -1; }
    dirty_child = pid;
    return 0;
}

/* ---------- ledger ---------- */

static int ledger_fd = -1;
static long records, bad_records;
static const char *ledger_path;

/* Checks one line (without its newline); returns the record number, or -1 if bad. */
static long check_line(const char *line, size_t len) {
    char buf[LINE_MAX_LEN + 64];
    if (len >= sizeof buf) return -1;
    memcpy(buf, line, len);
    buf[len] = 0;
    char *sp1 = strchr(buf, ' ');
    if (!sp1) return -1;
    char *sp2 = strchr(sp1 + 1, ' ');
    char *crc_end = sp2 ? sp2 : buf + len;
    char *end;
    long n = strtol(buf, &end, 10);
    if (end != sp1 || n < 0) return -1;
    unsigned long crc = strtoul(sp1 + 1, &end, 16);
    if (end != crc_end) return -1;
    /* The CRC covers "N TEXT" (or "N" alone when there is no text). */
    char covered[LINE_MAX_LEN + 64];
    size_t nlen = (size_t)(sp1 - buf);
    memcpy(covered, buf, nlen);
    size_t clen = nlen;
    if (sp2) {
        size_t tlen = len - (size_t)(sp2 - buf);
        memcpy(covered + clen, sp2, tlen);
        clen += tlen;
    }
    return crc32(covered, clen) == (uint32_t)crc ? n : -1;
}

/* Calls each(n) for every valid record; counts records and bad lines; cuts a torn tail
 * when repair is set. */
static int ledger_scan(void (*each)(long, void *), void *arg, int repair) {
    struct stat st;
    if (fstat(ledger_fd, &st) != 0) return -1;
    size_t size = (size_t)st.st_size;
    char *data = size ? malloc(size) : NULL;
    if (size && !data) return -1;
    size_t got = 0;
    while (got < size) {
        ssize_t n = pread(ledger_fd, data + got, size - got, (off_t)got);
        if (n <= 0) { free(data); return -1; }
        got += (size_t)n;
    }
    long good = 0, bad = 0;
    size_t pos = 0;
    while (pos < size) {
        char *nl = memchr(data + pos, '\n', size - pos);
        if (!nl) break;
        size_t len = (size_t)(nl - (data + pos));
        long n = check_line(data + pos, len);
        if (n >= 0) { good++; if (each) each(n, arg); } else bad++;
        pos += len + 1;
    }
    if (pos < size && repair) {
        console("LEDGER cut an incomplete last record at byte %zu of %zu", pos, size);
        if (ftruncate(ledger_fd, (off_t)pos) != 0 || fsync(ledger_fd) != 0) { free(data); return -1; }
    }
    free(data);
    records = good;
    bad_records = bad;
    return 0;
}

static int ledger_open(const char *path) {
    ledger_path = path;
    ledger_fd = open(path, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (ledger_fd < 0) { console("LEDGER error open %s: %s", path, strerror(errno)); return -1; }
    if (ledger_scan(NULL, NULL, 1) != 0) { console("LEDGER error scan %s: %s", path, strerror(errno)); return -1; }
    /* The file's directory entry must be durable too, for the first record's sake. */
    char dir[256];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = 0;
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) { fsync(dfd); close(dfd); }
    }
    console("LEDGER records=%ld bad=%ld", records, bad_records);
    return 0;
}

/* Appends one record and makes it durable; 0 on success. */
static int ledger_append(long n, const char *text, char *why, size_t whylen) {
    char covered[LINE_MAX_LEN + 32];
    int clen = text && *text ? snprintf(covered, sizeof covered, "%ld %s", n, text) : snprintf(covered, sizeof covered, "%ld", n);
    if (clen < 0 || (size_t)clen >= sizeof covered) { snprintf(why, whylen, "too-long"); return -1; }
    char line[LINE_MAX_LEN + 64];
    int len = text && *text
        ? snprintf(line, sizeof line, "%ld %08x %s\n", n, crc32(covered, (size_t)clen), text)
        : snprintf(line, sizeof line, "%ld %08x\n", n, crc32(covered, (size_t)clen));
    ssize_t w = write(ledger_fd, line, (size_t)len);
    if (w != len) { snprintf(why, whylen, "write:%s", w < 0 ? strerror(errno) : "short"); return -1; }
    if (fdatasync(ledger_fd) != 0) { snprintf(why, whylen, "fdatasync:%s", strerror(errno)); return -1; }
    records++;
    return 0;
}

struct client { int fd; char buf[LINE_MAX_LEN + 64]; size_t len; };

static int send_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static int reply(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int reply(int fd, const char *fmt, ...) {
    char buf[LINE_MAX_LEN + 128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return -1;
    if ((size_t)n > sizeof buf - 2) n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    return send_all(fd, buf, (size_t)n);
}

struct dump_out { int fd; char buf[8192]; size_t len; int failed; };

static void dump_each(long n, void *arg) {
    struct dump_out *out = arg;
    if (out->len > sizeof out->buf - 32) {
        if (send_all(out->fd, out->buf, out->len) != 0) out->failed = 1;
        out->len = 0;
    }
    out->len += (size_t)snprintf(out->buf + out->len, sizeof out->buf - out->len, "r %ld\n", n);
}

static void power_off(void) {
    if (dirty_child > 0) { kill(dirty_child, SIGTERM); waitpid(dirty_child, NULL, 0); }
    if (ledger_fd >= 0) { fsync(ledger_fd); close(ledger_fd); }
    sync();
    if (umount2("/mnt", 0) == 0) console("GUEST unmounted /mnt");
    else console("GUEST umount /mnt: %s", strerror(errno));
    sync();
    console("GUEST power off");
    reboot(RB_POWER_OFF);
    _exit(1);
}

/* Handles one request line; returns -1 to drop the client. */
static int handle(int fd, char *line) {
    size_t len = strlen(line);
    if (len && line[len - 1] == '\r') line[--len] = 0;
    if (strcmp(line, "ping") == 0) return reply(fd, "pong");
    if (strncmp(line, "record ", 7) == 0) {
        char *end;
        long n = strtol(line + 7, &end, 10);
        if (end == line + 7 || (*end && *end != ' ') || n < 0) return reply(fd, "error bad-record");
        const char *text = *end == ' ' ? end + 1 : "";
        if (strchr(text, '\n')) return reply(fd, "error %ld bad-text", n);
        char why[128];
        if (ledger_append(n, text, why, sizeof why) != 0) return reply(fd, "error %ld %s", n, why);
        return reply(fd, "ack %ld", n);
    }
    if (strcmp(line, "count") == 0) {
        if (ledger_scan(NULL, NULL, 0) != 0) return reply(fd, "error scan:%s", strerror(errno));
        return reply(fd, "count %ld %ld", records, bad_records);
    }
    if (strcmp(line, "dump") == 0) {
        struct dump_out out = {.fd = fd};
        if (ledger_scan(dump_each, &out, 0) != 0) return reply(fd, "error scan:%s", strerror(errno));
        if (out.len && send_all(fd, out.buf, out.len) != 0) return -1;
        if (out.failed) return -1;
        return reply(fd, "end %ld %ld", records, bad_records);
    }
    if (strcmp(line, "fsck") == 0) {
        char result[256] = "none";
        int f = open("/run/colorun-fsck", O_RDONLY | O_CLOEXEC);
        if (f >= 0) {
            ssize_t n = read(f, result, sizeof result - 1);
            close(f);
            result[n > 0 ? n : 0] = 0;
            char *nl = strchr(result, '\n');
            if (nl) *nl = 0;
        }
        return reply(fd, "fsck %s", result);
    }
    if (strncmp(line, "dirty ", 6) == 0) {
        char *end;
        long mib = strtol(line + 6, &end, 10);
        long rate = 0;
        if (*end == ' ') rate = strtol(end + 1, &end, 10);
        if (*end || mib < 0 || rate < 0) return reply(fd, "error bad-dirty");
        if (dirty_start(mib, rate) != 0) return reply(fd, "error dirty:%s", strerror(errno));
        return reply(fd, "dirty ready %ld", mib);
    }
    if (strcmp(line, "poweroff") == 0) {
        reply(fd, "bye");
        power_off();
    }
    return reply(fd, "error unknown");
}

static int ledger_serve(int port, const char *path) {
    if (ledger_open(path) != 0) return 1;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(ls, 16) != 0) {
        console("LEDGER error listen %d: %s", port, strerror(errno));
        return 1;
    }
    console("COLORUN-GUEST READY ledger=%d records=%ld", port, records);
    static struct client clients[MAX_CLIENTS];
    for (int i = 0; i < MAX_CLIENTS; i++) clients[i].fd = -1;
    for (;;) {
        struct pollfd pfd[MAX_CLIENTS + 1];
        int map[MAX_CLIENTS + 1];
        int n = 0;
        pfd[n].fd = ls; pfd[n].events = POLLIN; map[n++] = -1;
        for (int i = 0; i < MAX_CLIENTS; i++)
            if (clients[i].fd >= 0) { pfd[n].fd = clients[i].fd; pfd[n].events = POLLIN; map[n++] = i; }
        if (poll(pfd, (nfds_t)n, -1) < 0) { if (errno == EINTR) continue; return 1; }
        for (int k = 0; k < n; k++) {
            if (!pfd[k].revents) continue;
            if (map[k] < 0) {
                int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
                if (c < 0) continue;
                int slot = -1;
                for (int i = 0; i < MAX_CLIENTS; i++) if (clients[i].fd < 0) { slot = i; break; }
                if (slot < 0) { reply(c, "error busy"); close(c); continue; }
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                clients[slot].fd = c;
                clients[slot].len = 0;
                continue;
            }
            struct client *cl = &clients[map[k]];
            ssize_t r = recv(cl->fd, cl->buf + cl->len, sizeof cl->buf - 1 - cl->len, 0);
            if (r <= 0) { close(cl->fd); cl->fd = -1; continue; }
            cl->len += (size_t)r;
            int drop = 0;
            for (;;) {
                char *nl = memchr(cl->buf, '\n', cl->len);
                if (!nl) break;
                *nl = 0;
                if (handle(cl->fd, cl->buf) != 0) { drop = 1; break; }
                size_t used = (size_t)(nl - cl->buf) + 1;
                memmove(cl->buf, nl + 1, cl->len - used);
                cl->len -= used;
            }
            if (!drop && cl->len >= sizeof cl->buf - 1) { reply(cl->fd, "error line-too-long"); drop = 1; }
            if (drop) { close(cl->fd); cl->fd = -1; }
        }
    }
}

int main(int argc, char **argv) {
    crc_init();
    signal(SIGPIPE, SIG_IGN);
    if (argc == 4 && strcmp(argv[1], "ledger") == 0) return ledger_serve(atoi(argv[2]), argv[3]);
    if ((argc == 3 || argc == 4) && strcmp(argv[1], "dirty") == 0) {
        signal(SIGTERM, on_term);
        dirty_run(atol(argv[2]), argc == 4 ? atol(argv[3]) : 0, dirty_ready_console);
    }
    fprintf(stderr, "usage: colorun-guest ledger PORT FILE | colorun-guest dirty MIB [RATE]\n");
    return 2;
}
