// File plumbing Swift's Glibc module does not show (it needs _GNU_SOURCE).
#define _GNU_SOURCE
#include "colorun_system.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

int colorun_start_writeback(int fd) {
    return sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) == 0 ? 0 : errno;
}

int colorun_syncfs(int fd) {
    return syncfs(fd) == 0 ? 0 : errno;
}
