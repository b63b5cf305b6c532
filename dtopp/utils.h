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
- threads and the clock: set_num_threads, omp_threads, in_parallel_region, PARALLEL_MIN_WORK, zero_floats,
  wall_seconds.
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
#include <sys/stat.h>
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

// The temporary files of a set written together and not yet published (hold_atomic_write).
static char **held_tmp_paths;
static int num_held_tmp_paths;

static inline void release_held_tmp_paths(int remove_files) {
    for (int i = 0; i < num_held_tmp_paths; i++) {
        if (remove_files) { remove(held_tmp_paths[i]); }
        free(held_tmp_paths[i]);
    }
    free(held_tmp_paths);
    held_tmp_paths = NULL;
    num_held_tmp_paths = 0;
}

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
    release_held_tmp_paths(1);
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

// A path that exists and is not a regular file (a directory, a FIFO, a device) is refused by name
// before it is opened: reading a FIFO would wait for a writer forever, a directory would read as
// "truncated", and replacing a device or a FIFO with a file destroys what was there. A symbolic
// link counts as what it points to.
static inline void refuse_non_regular(const char *path, const char *role) {
    struct stat st;
    if (stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
        fail("%s is not a regular file (%s): refusing it as %s", path,
             S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO"
             : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device" : "not a plain file", role);
    }
}

// Opens a file; one that is read must be a regular file, one that is written must be one or not
// exist yet.
static inline FILE *fopen_check(const char *path, const char *mode) {
    refuse_non_regular(path, mode[0] == 'r' ? "an input" : "an output");
    FILE *f = fopen(path, mode);
    if (f == NULL) { fail("cannot open %s: %s", path, strerror(errno)); }
    return f;
}

// fopen_check for an output (mode "w" or "a"), with the message of a failed write.
static inline FILE *fopen_output(const char *path, const char *mode) {
    refuse_non_regular(path, "an output");
    FILE *f = fopen(path, mode);
    if (f == NULL) { fail("cannot write %s: %s", path, strerror(errno)); }
    return f;
}

// Every write to a stream is checked where the stream is flushed: a write that failed before (a
// full disk, a file size limit) leaves the stream's error flag set, which fflush alone may not report.
static inline void flush_check(FILE *f, const char *path) {
    if (fflush(f) != 0 || ferror(f)) { fail("cannot write %s: %s", path, strerror(errno ? errno : EIO)); }
}

static inline void fclose_check(FILE *f, const char *path) {
    int failed = fflush(f) != 0 || ferror(f);
    if (fclose(f) != 0 || failed) { fail("cannot write %s: %s", path, strerror(errno ? errno : EIO)); }
}

// For the programs whose standard output carries their result (a sample of text, measures): the
// result must have reached it. Returns `status` when it has; stops with an error otherwise.
static inline int stdout_checked(int status) {
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fail("cannot write the standard output: %s", strerror(errno ? errno : EIO));
    }
    return status;
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
// An output that exists and is not a regular file (a FIFO, a device, a directory) is refused, never
// renamed over; so is a ".tmp" of that kind.
static inline FILE *open_for_atomic_write(const char *path, char *tmp_path, size_t tmp_size) {
    size_t len = strlen(path);
    if (len + 5 > tmp_size || len + 5 > sizeof(pending_tmp_path)) { fail("path too long: %s", path); }
    memcpy(tmp_path, path, len);
    memcpy(tmp_path + len, ".tmp", 5);
    refuse_non_regular(path, "an output");
    refuse_non_regular(tmp_path, "a temporary output");  // a FIFO there would block the open
    FILE *f = fopen(tmp_path, "wb");
    if (f == NULL) { fail("cannot write %s: %s", tmp_path, strerror(errno)); }
    memcpy(pending_tmp_path, tmp_path, len + 5);
    return f;
}

// Flushes, syncs and closes the ".tmp" file, checking every write made to it.
static inline void close_atomic_write(FILE *f, const char *tmp_path) {
    if (fflush(f) != 0 || ferror(f) || fsync(fileno(f)) != 0) {
        fail("cannot write %s: %s", tmp_path, strerror(errno ? errno : EIO));
    }
    if (fclose(f) != 0) { fail("cannot write %s: %s", tmp_path, strerror(errno)); }
}

static inline void finish_atomic_write(FILE *f, const char *tmp_path, const char *path) {
    close_atomic_write(f, tmp_path);
    if (rename(tmp_path, path) != 0) { fail("cannot rename %s to %s: %s", tmp_path, path, strerror(errno)); }
    pending_tmp_path[0] = '\0';
}

// A set of files published together (prepro's shards and tokenizer): each is written like an
// atomic write but kept under its ".tmp" name (hold_atomic_write); once every one is complete,
// publish_held renames them all. A failure before (a full disk) removes every ".tmp" of the set
// (fail()), so the files of an earlier set stay as they were, none of them replaced.
static inline void hold_atomic_write(FILE *f, const char *tmp_path) {
    close_atomic_write(f, tmp_path);
    held_tmp_paths = (char **)realloc(held_tmp_paths, (size_t)(num_held_tmp_paths + 1) * sizeof(char *));
    char *copy = (char *)malloc(strlen(tmp_path) + 1);
    if (held_tmp_paths == NULL || copy == NULL) { fail("out of memory"); }
    strcpy(copy, tmp_path);
    held_tmp_paths[num_held_tmp_paths++] = copy;
    pending_tmp_path[0] = '\0';
}

static inline void publish_held(void) {
    for (int i = 0; i < num_held_tmp_paths; i++) {
        char path[4096];
        size_t len = strlen(held_tmp_paths[i]) - 4;  // without ".tmp"
        memcpy(path, held_tmp_paths[i], len);
        path[len] = '\0';
        if (rename(held_tmp_paths[i], path) != 0) {
            fail("cannot rename %s to %s: %s", held_tmp_paths[i], path, strerror(errno));
        }
    }
    release_held_tmp_paths(0);
}

// An output that is written at the end of a long computation is checked before it starts: it is a
// regular file or does not exist, and its folder takes a file (its ".tmp", removed at once).
static inline void check_output_path(const char *path) {
    char tmp[4096];
    FILE *f = open_for_atomic_write(path, tmp, sizeof(tmp));
    fclose(f);
    remove(tmp);
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
#define DIT_STATE_MAGIC 20251219  // diffusion transformer training state (train_dit.c, doc/formats.md)

// What a vocabulary's tokens are, stored in shard and model headers so that a program never has
// to guess how to turn tokens back into text.
// VOCAB_BPE is a vocabulary trained on the corpus by prepro (bpe.h), whose tokenizer file comes
// with the shards.
enum { VOCAB_UNKNOWN = 0, VOCAB_GPT2 = 1, VOCAB_BYTES = 2, VOCAB_BPE = 3 };
static inline const char *vocab_kind_name(int kind) {
    return kind == VOCAB_GPT2 ? "gpt2" : kind == VOCAB_BYTES ? "bytes" : kind == VOCAB_BPE ? "bpe" : "unknown";
}

// The vocabulary sizes each kind allows: bytes are 256 tokens, GPT-2's 50257, a trained BPE 257 to
// 65536 (bpe.h); a vocabulary of unknown kind any size. A header whose kind and size contradict each
// other is refused: 0 if they agree.
static inline int vocab_contradicts(int kind, int vocab_size) {
    return (kind == VOCAB_BYTES && vocab_size != 256) || (kind == VOCAB_GPT2 && vocab_size != 50257) ||
           (kind == VOCAB_BPE && (vocab_size < 257 || vocab_size > 65536));
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

static inline int in_parallel_region(void) {
#ifdef _OPENMP
    return omp_in_parallel();
#else
    return 0;
#endif
}

// x[0 .. n-1] = 0 on all the threads: one thread's memset reaches only part of the memory bandwidth,
// and the gradients and the backward pass's buffers are zeroed every step (tens of MB).
static inline void zero_floats(float *x, size_t n) {
    enum { CHUNK = 16384 };  // floats per piece of work: 64 KB
    long chunks = (long)((n + CHUNK - 1) / CHUNK);
    #pragma omp parallel for schedule(static) if (n >= 4 * PARALLEL_MIN_WORK)
    for (long c = 0; c < chunks; c++) {
        size_t begin = (size_t)c * CHUNK, count = n - begin < CHUNK ? n - begin : CHUNK;
        memset(x + begin, 0, count * sizeof(float));
    }
}

// OpenMP's idle threads spin by default, and where anything else runs they keep the cores from the
// threads that work (make train fell from 27k to 1.9k tokens/s under load). Unless the user chose a
// policy, the program starts again with OMP_WAIT_POLICY=passive (libgomp reads it before main): it
// costs about 16% on an idle machine, which OMP_WAIT_POLICY=active takes back.
static inline void passive_wait_by_default(char **argv) {
#ifdef _OPENMP
    extern char **environ;
    if (getenv("OMP_WAIT_POLICY") != NULL) { return; }
    size_t n = 0;
    while (environ[n] != NULL) { n++; }
    char **env = (char **)malloc((n + 2) * sizeof(char *));
    if (env == NULL) { return; }
    memcpy(env, environ, n * sizeof(char *));
    env[n] = (char *)"OMP_WAIT_POLICY=passive";
    env[n + 1] = NULL;
    execve("/proc/self/exe", argv, env);  // returns only when it failed: the default policy, then
    free(env);
#else
    (void)argv;
#endif
}

// The operands of a matrix product: FLOAT32, or BF16 (rounded to bfloat16, the products summed in
// float32; matmul.h). doc/precision.md says which products of the model may be BF16 and why.
typedef enum { FLOAT32, BF16 } Precision;

static inline double wall_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#endif  // UTILS_H
