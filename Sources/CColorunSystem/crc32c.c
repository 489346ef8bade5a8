// CRC-32C (Castagnoli), the checksum ext4, Btrfs and iSCSI use: with the CPU's crc32
// instruction where there is one (SSE 4.2), else bit by bit.
#include "colorun_system.h"

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc32c_sse42(uint32_t crc, const unsigned char *p, size_t n) {
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        crc = (uint32_t)__builtin_ia32_crc32di(crc, word);
        p += 8;
        n -= 8;
    }
    while (n > 0) {
        crc = __builtin_ia32_crc32qi(crc, *p++);
        n--;
    }
    return crc;
}
#endif

static uint32_t crc32c_bitwise(uint32_t crc, const unsigned char *p, size_t n) {
    while (n > 0) {
        crc ^= *p++;
        for (int bit = 0; bit < 8; bit++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
        n--;
    }
    return crc;
}

uint32_t colorun_crc32c(uint32_t crc, const void *data, size_t length) {
    const unsigned char *p = data;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2")) return ~crc32c_sse42(~crc, p, length);
#endif
    return ~crc32c_bitwise(~crc, p, length);
}
