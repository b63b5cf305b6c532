/*
make_test_images.c: writes a small generated data set in Fashion-MNIST's layout, so that the tests
of the diffusion transformer need no download: 28 x 28 grey images of 10 classes, each class a
simple shape in its own shade of grey, drawn at a random place and size with a little noise (a bar,
a ring, a cross, a triangle, ...: distinct enough for the classifier of eval_dit to tell apart, simple enough
for a tiny DiT to learn in a few dozen steps). The four IDX files are those that dit/train_dit
reads: train-images-idx3-ubyte, train-labels-idx1-ubyte (3,000 images, 300 per class),
t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (1,000 images, 100 per class). The same files
every time (a fixed seed).

usage: test/make_test_images DIR
*/
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define SIDE 28
#define CLASSES 10

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double uniform(void) {  // xorshift64*, in [0, 1)
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

// Whether pixel (x, y), relative to the shape's centre and in units of its size r, is inside the
// shape of class k.
static int inside(int k, double x, double y) {
    double ax = fabs(x), ay = fabs(y), d = sqrt(x * x + y * y);
    switch (k) {
        case 0: return ax < 0.35 && ay < 1.0;                       // a vertical bar
        case 1: return ax < 1.0 && ay < 0.3;                        // a horizontal bar
        case 2: return d > 0.6 && d < 1.0;                          // a ring
        case 3: return d < 0.8;                                     // a disc
        case 4: return (ax < 0.25 && ay < 1.0) || (ay < 0.25 && ax < 1.0);  // a cross
        case 5: return y > -0.8 && y < 0.9 && ax < (y + 0.8) * 0.6;  // a triangle, point up
        case 6: return ax < 1.0 && ay < 1.0 && !(ax < 0.6 && ay < 0.6);  // a square frame
        case 7: return fabs(x - y) < 0.3 && ax < 1.0 && ay < 1.0;   // a diagonal
        case 8: return ax < 0.9 && (fabs(y + 0.7) < 0.2 || fabs(y) < 0.2 || fabs(y - 0.7) < 0.2);  // three bars
        default: return (ax < 1.0 && ay < 1.0) && ((int)floor((x + 1) * 2) + (int)floor((y + 1) * 2)) % 2 == 0;
    }
}

static void draw(uint8_t *image, int k) {
    double r = 8.0 + 2.0 * uniform(), cx = 14.0 + 2.0 * (uniform() - 0.5), cy = 14.0 + 2.0 * (uniform() - 0.5);
    double bright = 120.0 + 13.0 * k + 10.0 * uniform();  // each class its own shade too
    for (int y = 0; y < SIDE; y++) {
        for (int x = 0; x < SIDE; x++) {
            double v = inside(k, (x - cx) / r, (y - cy) / r) ? bright : 0.0;
            v += 20.0 * (uniform() - 0.5);
            image[y * SIDE + x] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
    }
}

static void put_be32(FILE *f, uint32_t v) {
    uint8_t b[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    fwrite(b, 1, 4, f);
}

static void write_set(const char *dir, const char *images_name, const char *labels_name, int count) {
    char path[4096];
    uint8_t *images = (uint8_t *)malloc((size_t)count * SIDE * SIDE), *labels = (uint8_t *)malloc((size_t)count);
    if (images == NULL || labels == NULL) { fprintf(stderr, "make_test_images: out of memory\n"); exit(1); }
    for (int i = 0; i < count; i++) {
        labels[i] = (uint8_t)(i % CLASSES);
        draw(images + (size_t)i * SIDE * SIDE, labels[i]);
    }
    const char *names[2] = {images_name, labels_name};
    for (int which = 0; which < 2; which++) {
        snprintf(path, sizeof(path), "%s/%s", dir, names[which]);
        FILE *f = fopen(path, "wb");
        if (f == NULL) { perror(path); exit(1); }
        put_be32(f, which == 0 ? 0x00000803u : 0x00000801u);
        put_be32(f, (uint32_t)count);
        if (which == 0) {
            put_be32(f, SIDE);
            put_be32(f, SIDE);
        }
        size_t n = which == 0 ? (size_t)count * SIDE * SIDE : (size_t)count;
        if (fwrite(which == 0 ? images : labels, 1, n, f) != n || fclose(f) != 0) { perror(path); exit(1); }
    }
    free(images);
    free(labels);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR (writes a generated 10-class IDX data set there)\n", argv[0]);
        return 1;
    }
    mkdir(argv[1], 0755);
    write_set(argv[1], "train-images-idx3-ubyte", "train-labels-idx1-ubyte", 3000);
    write_set(argv[1], "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 1000);
    return 0;
}
