/*
dit/png.h: writes an 8-bit grayscale PNG without a compression library.

A PNG is a signature and chunks (length, type, data, CRC-32 of type and data): IHDR (size and
pixel format), IDAT (the image as a zlib stream), IEND. The zlib stream here uses deflate's
"stored" blocks, which hold up to 65,535 bytes each without compression, followed by the Adler-32
checksum of the data. Each image row is preceded by its filter type, 0 (none). The file is written
atomically (dtopp/utils.h): a crash never leaves half a picture under the real name.
*/
#ifndef PNG_H
#define PNG_H

#include <stdint.h>
#include "../dtopp/utils.h"  // defines: fail, checked memory and file I/O

static uint32_t png_crc_update(uint32_t crc, const uint8_t *data, size_t n) {
    for (size_t i = 0; i < n; i++) {  // bit by bit: the pictures are small
        crc ^= data[i];
        for (int k = 0; k < 8; k++) { crc = crc & 1 ? 0xEDB88320u ^ (crc >> 1) : crc >> 1; }
    }
    return crc;
}

static void png_put_u32(uint8_t *out, uint32_t v) {  // big-endian, as every PNG and zlib number
    out[0] = v >> 24, out[1] = v >> 16, out[2] = v >> 8, out[3] = v;
}

static void png_chunk(FILE *f, const char *type, const uint8_t *data, size_t n, const char *path) {
    uint8_t word[4];
    png_put_u32(word, (uint32_t)n);
    fwrite_check(word, 1, 4, f, path);
    fwrite_check(type, 1, 4, f, path);
    if (n > 0) { fwrite_check(data, 1, n, f, path); }
    uint32_t crc = png_crc_update(0xFFFFFFFFu, (const uint8_t *)type, 4);
    png_put_u32(word, png_crc_update(crc, data, n) ^ 0xFFFFFFFFu);
    fwrite_check(word, 1, 4, f, path);
}

// pixels: (height, width), 0 black .. 255 white.
static void png_write_gray(const char *path, const uint8_t *pixels, int width, int height) {
    size_t row = (size_t)width + 1, raw_size = row * height;  // each row: filter byte, pixels
    size_t blocks = raw_size / 65535 + 1;
    size_t zsize = 2 + raw_size + 5 * blocks + 4;
    uint8_t *z = (uint8_t *)malloc_check(zsize), *p = z;
    *p++ = 0x78, *p++ = 0x01;  // zlib: deflate, 32K window, no dictionary; (0x78 << 8 | 0x01) % 31 == 0
    uint32_t a = 1, b = 0;     // Adler-32 of the raw data
    size_t done = 0;
    for (size_t k = 0; k < blocks; k++) {
        size_t n = raw_size - done < 65535 ? raw_size - done : 65535;
        *p++ = k == blocks - 1;  // BFINAL on the last block, BTYPE 00: stored
        *p++ = n & 0xFF, *p++ = n >> 8, *p++ = ~n & 0xFF, *p++ = (~n >> 8) & 0xFF;
        for (size_t i = done; i < done + n; i++) {
            size_t y = i / row, x = i % row;
            uint8_t v = x == 0 ? 0 : pixels[y * width + x - 1];
            *p++ = v;
            a = (a + v) % 65521;
            b = (b + a) % 65521;
        }
        done += n;
    }
    png_put_u32(p, b << 16 | a);
    uint8_t ihdr[13] = {0};
    png_put_u32(ihdr, (uint32_t)width);
    png_put_u32(ihdr + 4, (uint32_t)height);
    ihdr[8] = 8;  // bit depth; colour type 0 (grayscale), deflate, no filter method, no interlace
    char tmp[4096];
    FILE *f = open_for_atomic_write(path, tmp, sizeof(tmp));
    fwrite_check("\x89PNG\r\n\x1a\n", 1, 8, f, tmp);
    png_chunk(f, "IHDR", ihdr, sizeof(ihdr), tmp);
    png_chunk(f, "IDAT", z, zsize, tmp);
    png_chunk(f, "IEND", NULL, 0, tmp);
    finish_atomic_write(f, tmp, path);
    free(z);
}

#endif  // PNG_H
