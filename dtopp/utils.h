/*
utils.h: what every program of the project shares about errors and files.

- fail(): the one way to stop on bad input or a failed system call. It prints "error: " and the
  message (which names the file and the problem) to stderr and exits with status 1. Before that
  it removes the temporary file of an unfinished atomic write, so no ".tmp" file is left behind.
  Fuzz targets set fail_hook to catch failures instead (fuzz/fuzz.h); programs never set it.
- checked memory and file calls (malloc_check, fopen_check, fread_check, ...) that fail() with the
  file's name instead of returning an error code the caller could forget.
- the 256-word header that starts every binary file (doc/formats.md): the magic numbers of every
  file kind live here, and header fields are described by tables (HeaderField) that saving and
  loading both walk, so the two cannot disagree.
- atomic writes: a file is written to "path.tmp" and renamed over "path" only once complete.
- splitmix64, the project's random number generator: its whole state is one integer; uniform
  and normal floats from it.
- threads and the clock: set_num_threads, omp_threads, PARALLEL_MIN_WORK, wall_seconds.
- HOST_DEVICE, which marks a function that both the C compiler and nvcc compile (the AdamW rule).
*/
#ifndef UTILS_H
#define UTILS_H

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif
#ifdef __CUDACC__
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif

// ----------------------------------------------------------------------------
// fatal errors

// The temporary file of the atomic write in progress (see open_for_atomic_write), "" if none.
static char pending_tmp_path[4096];

// When set, fail() calls it instead of printing and exiting; it must not return (a fuzz target
// jumps back to its harness). The message is in `message`.
static void (*fail_hook)(const char *message);

static inline void fail(const char *fmt, ...) {
    char message[8192];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof(message), fmt, args);
    va_end(args);
    if (pending_tmp_path[0] != '\0') {
        remove(pending_tmp_path);
        pending_tmp_path[0] = '\0';
    }
    if (fail_hook != NULL) { fail_hook(message); }
    fprintf(stderr, "error: %s\n", message);
    exit(EXIT_FAILURE);
}

static inline void *malloc_check(size_t size) {
    void *ptr = malloc(size > 0 ? size : 1);
    if (ptr == NULL) { fail("out of memory allocating %zu bytes", size); }
    return ptr;
}

static inline void *calloc_check(size_t count, size_t size) {
    void *ptr = calloc(count > 0 ? count : 1, size);
    if (ptr == NULL) { fail("out of memory allocating %zu x %zu bytes", count, size); }
    return ptr;
}

static inline void *realloc_check(void *ptr, size_t size) {
    void *out = realloc(ptr, size > 0 ? size : 1);
    if (out == NULL) { fail("out of memory growing a buffer to %zu bytes", size); }
    return out;
}

// ----------------------------------------------------------------------------
// checked file I/O

static inline FILE *fopen_check(const char *path, const char *mode) {
    FILE *f = fopen(path, mode);
    if (f == NULL) { fail("cannot open %s: %s", path, strerror(errno)); }
    return f;
}

static inline long file_size(FILE *f, const char *path) {
    if (fseek(f, 0, SEEK_END) != 0) { fail("cannot seek in %s", path); }
    long size = ftell(f);
    if (size < 0 || fseek(f, 0, SEEK_SET) != 0) { fail("cannot seek in %s", path); }
    return size;
}

static inline void fread_check(void *ptr, size_t size, size_t count, FILE *f, const char *path) {
    if (fread(ptr, size, count, f) != count) { fail("%s is truncated", path); }
}

static inline void fwrite_check(const void *ptr, size_t size, size_t count, FILE *f, const char *path) {
    if (fwrite(ptr, size, count, f) != count) { fail("cannot write %s: %s", path, strerror(errno)); }
}

// Writes go to "path.tmp" first and are renamed over the target only once complete, so a crash
// or a full disk never destroys the previous file; a failed write removes its ".tmp" (fail()).
// One atomic write at a time.
static inline FILE *open_for_atomic_write(const char *path, char *tmp_path, size_t tmp_size) {
    size_t len = strlen(path);
    if (len + 5 > tmp_size || len + 5 > sizeof(pending_tmp_path)) { fail("path too long: %s", path); }
    memcpy(tmp_path, path, len);
    memcpy(tmp_path + len, ".tmp", 5);
    FILE *f = fopen(tmp_path, "wb");
    if (f == NULL) { fail("cannot write %s: %s", tmp_path, strerror(errno)); }
    memcpy(pending_tmp_path, tmp_path, len + 5);
    return f;
}

static inline void finish_atomic_write(FILE *f, const char *tmp_path, const char *path) {
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) { fail("cannot write %s: %s", tmp_path, strerror(errno)); }
    if (fclose(f) != 0) { fail("cannot write %s: %s", tmp_path, strerror(errno)); }
    if (rename(tmp_path, path) != 0) { fail("cannot rename %s to %s: %s", tmp_path, path, strerror(errno)); }
    pending_tmp_path[0] = '\0';
}

// ----------------------------------------------------------------------------
// binary files: a header of 256 int32 words (magic, version, fields), then the payload

#define HEADER_WORDS 256
#define HEADER_BYTES (HEADER_WORDS * sizeof(int32_t))

// The magic number (word 0) of every file kind; doc/formats.md describes each.
#define SHARD_MAGIC 20240520      // token shard, written by prepro (llm.c's magic)
#define SHARD_VERSION 2           // the version prepro writes; dataloader.h also reads version 1
#define MODEL_MAGIC 20251213      // model checkpoint: configuration, parameters, controller state
#define STATE_MAGIC 20251214      // training state: AdamW moments, step, data position, sampler
#define FIXTURE_MAGIC 20251215    // reference fixture of the tests, written by reference/
#define TOKENIZER_MAGIC 20251216  // tokenizer file: a vocabulary and its merges (GPT-2's, or trained)
#define DIT_MAGIC 20251217        // diffusion transformer checkpoint (train_dit.c, doc/dit.md)
#define DIT_FIXTURE_MAGIC 20251218  // reference fixture of the diffusion transformer's test

// What a vocabulary's tokens are, stored in shard and model headers so that a program never has
// to guess how to turn tokens back into text.
// VOCAB_BPE is a vocabulary trained on the corpus by prepro (bpe.h), whose tokenizer file comes
// with the shards.
enum { VOCAB_UNKNOWN = 0, VOCAB_GPT2 = 1, VOCAB_BYTES = 2, VOCAB_BPE = 3 };
static inline const char *vocab_kind_name(int kind) {
    return kind == VOCAB_GPT2 ? "gpt2" : kind == VOCAB_BYTES ? "bytes" : kind == VOCAB_BPE ? "bpe" : "unknown";
}

// One field of a header: `bytes` bytes (a multiple of 4) at word `word`, copied bit for bit from
// or to `value`. A table of them describes a header; saving and loading walk the same table.
typedef struct {
    int word;
    size_t bytes;
    void *value;
} HeaderField;

static inline void header_pack(int32_t *header, const HeaderField *fields, int n) {
    for (int i = 0; i < n; i++) { memcpy(&header[fields[i].word], fields[i].value, fields[i].bytes); }
}

static inline void header_unpack(const int32_t *header, const HeaderField *fields, int n) {
    for (int i = 0; i < n; i++) { memcpy(fields[i].value, &header[fields[i].word], fields[i].bytes); }
}

// Opens a file and checks its header's magic and version (one of the `versions` accepted). The
// payload's size depends on fields of the header, so the caller checks it afterwards with
// check_payload_size.
static inline FILE *open_with_header(const char *path, int32_t *header, int32_t magic, const int *versions,
                              int num_versions, const char *what, long *size) {
    FILE *f = fopen_check(path, "rb");
    *size = file_size(f, path);
    if (*size < (long)HEADER_BYTES) { fail("%s is too short to be a %s (%ld bytes)", path, what, *size); }
    fread_check(header, sizeof(int32_t), HEADER_WORDS, f, path);
    if (header[0] != magic) { fail("%s is not a %s (magic %d, expected %d)", path, what, header[0], magic); }
    for (int i = 0; i < num_versions; i++) {
        if (header[1] == versions[i]) { return f; }
    }
    fail("%s: unsupported %s version %d (expected %d)", path, what, header[1], versions[num_versions - 1]);
    return NULL;
}

static inline void check_payload_size(const char *path, long size, size_t payload_bytes) {
    size_t expected = HEADER_BYTES + payload_bytes;
    if ((size_t)size < expected) { fail("%s is truncated: %ld bytes, expected %zu", path, size, expected); }
    if ((size_t)size > expected) {
        fail("%s has %ld bytes, expected %zu: trailing data", path, size, expected);
    }
}

// ----------------------------------------------------------------------------
// splitmix64: small, fast, and its whole state is one integer, which checkpoints save.

static inline uint64_t random_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline float random_f32(uint64_t *state) {  // uniform in [0, 1)
    return (random_u64(state) >> 40) * (1.0f / 16777216.0f);
}

static inline float random_normal(uint64_t *state) {  // Box-Muller
    double u1 = ((random_u64(state) >> 11) + 1.0) / 9007199254740993.0;  // (0, 1]
    double u2 = (random_u64(state) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}

// ----------------------------------------------------------------------------
// threads and the clock

// Below PARALLEL_MIN_WORK elements or multiply-adds, starting the threads costs more than the work
// (sampling runs every layer on one position): such loops run on the calling thread. On a busy
// machine this also saves waiting for a thread that shares its core with another program.
#define PARALLEL_MIN_WORK 32768

// OpenMP threads of the host code (0: OpenMP's default, all cores).
static inline void set_num_threads(int threads) {
#ifdef _OPENMP
    if (threads > 0) { omp_set_num_threads(threads); }
#else
    (void)threads;
#endif
}

static inline int omp_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static inline double wall_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#endif  // UTILS_H
