/*
fuzz.h: what every libFuzzer target of the project shares (fuzz/README.md).

The readers stop on bad input with fail() (utils.h), which prints a message and exits. Under the
fuzzer a refused input is a normal outcome, not the end of the process, so:
- fail_hook jumps back to the target, which runs the reader inside fuzz_run();
- every malloc/calloc/realloc/free and fopen/fclose of the code under test goes through the
  functions below, which track what is live, so that whatever a refused input had allocated or
  opened is released afterwards: millions of refused inputs leak neither memory nor files. After
  an accepted input nothing may remain live: that would be a leak, and it aborts.
- inputs reach the readers as files (they take paths), written to a scratch directory.

Include this first, then the code under test.
*/
#ifndef FUZZ_H
#define FUZZ_H

#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <float.h>
#include <glob.h>
#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

// ----------------------------------------------------------------------------
// tracked memory and files

#define FUZZ_MAX_LIVE 4096
static void *fuzz_live_memory[FUZZ_MAX_LIVE];
static int fuzz_num_memory;
static FILE *fuzz_live_files[FUZZ_MAX_LIVE];
static int fuzz_num_files;

static void fuzz_track(void **live, int *n, void *ptr) {
    if (ptr == NULL) { return; }
    if (*n == FUZZ_MAX_LIVE) { abort(); }  // more live objects than any reader needs: a leak
    live[(*n)++] = ptr;
}

static void fuzz_untrack(void **live, int *n, void *ptr) {
    for (int i = *n - 1; i >= 0; i--) {
        if (live[i] == ptr) {
            live[i] = live[--(*n)];
            return;
        }
    }
}

static void *fuzz_malloc(size_t size) {
    void *ptr = malloc(size);
    fuzz_track(fuzz_live_memory, &fuzz_num_memory, ptr);
    return ptr;
}

static void *fuzz_calloc(size_t count, size_t size) {
    void *ptr = calloc(count, size);
    fuzz_track(fuzz_live_memory, &fuzz_num_memory, ptr);
    return ptr;
}

static void *fuzz_realloc(void *old, size_t size) {
    void *ptr = realloc(old, size);
    if (ptr != NULL) {
        fuzz_untrack(fuzz_live_memory, &fuzz_num_memory, old);
        fuzz_track(fuzz_live_memory, &fuzz_num_memory, ptr);
    }
    return ptr;
}

static void fuzz_free(void *ptr) {
    fuzz_untrack(fuzz_live_memory, &fuzz_num_memory, ptr);
    free(ptr);
}

static FILE *fuzz_fopen(const char *path, const char *mode) {
    FILE *f = fopen(path, mode);
    fuzz_track((void **)fuzz_live_files, &fuzz_num_files, f);
    return f;
}

static int fuzz_fclose(FILE *f) {
    fuzz_untrack((void **)fuzz_live_files, &fuzz_num_files, f);
    return fclose(f);
}

// What is live now stays for the whole process (e.g. a tokenizer loaded once): no longer tracked.
static void fuzz_keep_all(void) { fuzz_num_memory = fuzz_num_files = 0; }

static void fuzz_release_all(void) {
    while (fuzz_num_memory > 0) { free(fuzz_live_memory[--fuzz_num_memory]); }
    while (fuzz_num_files > 0) { fclose(fuzz_live_files[--fuzz_num_files]); }
}

#define malloc(size) fuzz_malloc(size)
#define calloc(count, size) fuzz_calloc(count, size)
#define realloc(ptr, size) fuzz_realloc(ptr, size)
#define free(ptr) fuzz_free(ptr)
#define fopen(path, mode) fuzz_fopen(path, mode)
#define fclose(f) fuzz_fclose(f)

// ----------------------------------------------------------------------------
// catching fail()

#include "../dtopp/utils.h"

static jmp_buf fuzz_escape;

static void fuzz_on_fail(const char *message) {
    (void)message;
    longjmp(fuzz_escape, 1);
}

// Runs body(data, size); a fail() inside it returns here, and what it left live is released.
// Returns 1 if the input was accepted, 0 if refused.
static int fuzz_run(void (*body)(const uint8_t *, size_t), const uint8_t *data, size_t size) {
    fail_hook = fuzz_on_fail;
    if (setjmp(fuzz_escape) != 0) {
        fuzz_release_all();
        return 0;
    }
    body(data, size);
    if (fuzz_num_memory != 0 || fuzz_num_files != 0) {
        fprintf(stderr, "fuzz: an accepted input left %d allocations and %d files open\n", fuzz_num_memory,
                fuzz_num_files);
        abort();
    }
    return 1;
}

// ----------------------------------------------------------------------------
// inputs as files

// A path in the scratch directory (tmpfs when there is one), unique to this process.
static void fuzz_path(char *path, size_t size, const char *name) {
    const char *dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(path, size, "%s/dtopp_fuzz_%d_%s", dir, (int)getpid(), name);
}

static void fuzz_write_file(const char *path, const uint8_t *data, size_t size) {
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(data, 1, size, f) != size || fclose(f) != 0) { abort(); }
}

#endif  // FUZZ_H
