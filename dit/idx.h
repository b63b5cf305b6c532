/*
dit/idx.h: reads the IDX files of MNIST and Fashion-MNIST (the format of LeCun's MNIST page).

An IDX file is a 4-byte magic (two zero bytes, a type byte, the number of dimensions), then each
dimension as a big-endian 32-bit integer, then the values, row-major. Images are type 0x08
(unsigned bytes) with 3 dimensions (count, rows, columns); labels are type 0x08 with 1 dimension.
Every header field and the file's exact size are checked before the data is trusted: a file that
is not what it should be stops the program with a message naming it (fail, dtopp/utils.h).
The files must be decompressed (scripts/get_fashion_mnist.sh does it).
*/
#ifndef IDX_H
#define IDX_H

#include <stdint.h>
#include "../dtopp/utils.h"  // defines: fail, checked memory and file I/O

#define IDX_TYPE_UBYTE 0x08
#define IDX_MAX_SIDE 4096  // rows and columns of one image

typedef struct {
    int count;       // images (or labels)
    int rows, cols;  // size of one image (1 x 1 for labels)
    uint8_t *data;   // (count, rows, cols) pixels 0..255, or (count) labels
} IdxData;

// Reads an IDX file of unsigned bytes with `dims` dimensions (3: images, 1: labels); `what`
// names it in messages.
static IdxData idx_read(const char *path, int dims, const char *what) {
    FILE *f = fopen_check(path, "rb");
    long size = file_size(f, path);
    uint8_t head[16];
    long head_bytes = 4 + 4 * dims;
    if (size < head_bytes) { fail("%s is too short to be an IDX %s file (%ld bytes)", path, what, size); }
    fread_check(head, 1, head_bytes, f, path);
    if (head[0] == 0x1f && head[1] == 0x8b) {
        fail("%s is gzip-compressed: decompress it first (scripts/get_fashion_mnist.sh does)", path);
    }
    if (head[0] != 0 || head[1] != 0 || head[2] != IDX_TYPE_UBYTE || head[3] != dims) {
        fail("%s is not an IDX %s file (magic %02x %02x %02x %02x, expected 00 00 08 %02x)", path, what,
             head[0], head[1], head[2], head[3], dims);
    }
    uint32_t shape[3] = {1, 1, 1};
    for (int d = 0; d < dims; d++) {
        const uint8_t *b = head + 4 + 4 * d;
        shape[d] = (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
    }
    if (shape[0] < 1 || shape[0] > INT32_MAX || shape[1] < 1 || shape[1] > IDX_MAX_SIDE || shape[2] < 1 ||
        shape[2] > IDX_MAX_SIDE) {
        fail("%s: bad IDX dimensions %u x %u x %u", path, shape[0], shape[1], shape[2]);
    }
    size_t values = (size_t)shape[0] * shape[1] * shape[2];
    if ((size_t)size != head_bytes + values) {
        fail("%s has %ld bytes, but its header announces %zu values after %ld header bytes", path, size,
             values, head_bytes);
    }
    IdxData out = {(int)shape[0], (int)shape[1], (int)shape[2], (uint8_t *)malloc_check(values)};
    fread_check(out.data, 1, values, f, path);
    fclose(f);
    return out;
}

// A labelled image set: the images, and labels (one per image, each below num_classes).
static void idx_read_dataset(IdxData *images, IdxData *labels, const char *images_path,
                             const char *labels_path, int num_classes) {
    *images = idx_read(images_path, 3, "images");
    *labels = idx_read(labels_path, 1, "labels");
    if (labels->count != images->count) {
        fail("%s holds %d labels but %s holds %d images", labels_path, labels->count, images_path,
             images->count);
    }
    for (int i = 0; i < labels->count; i++) {
        if (labels->data[i] >= num_classes) {
            fail("%s: label %d of image %d is not a class (0..%d)", labels_path, labels->data[i], i,
                 num_classes - 1);
        }
    }
}

#endif  // IDX_H
