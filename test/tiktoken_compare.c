/*
tiktoken_compare: the C side of test/tiktoken_compare.sh and bench/bench_prepro.sh.

    tiktoken_compare tokenizer.bin text.txt            writes the token ids, one per line, to stdout
    tiktoken_compare tokenizer.bin text.txt --bench    encodes the text a few times and prints
                                                       "tokens N seconds S tokens_per_s R" (best run)
*/
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../dtopp/tokenizer.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 3 && !(argc == 4 && strcmp(argv[3], "--bench") == 0)) {
        fprintf(stderr, "usage: %s tokenizer.bin text.txt [--bench]\n", argv[0]);
        return 1;
    }
    Tokenizer t;
    tokenizer_init(&t, argv[1]);
    FILE *f = fopen(argv[2], "rb");
    if (!f) { fprintf(stderr, "tiktoken_compare: cannot open %s\n", argv[2]); return 1; }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)size + 1);
    if (!text || fread(text, 1, (size_t)size, f) != (size_t)size) { fprintf(stderr, "tiktoken_compare: cannot read %s\n", argv[2]); return 1; }
    fclose(f);
    size_t n;
    if (argc == 4) {
        // best of 3 runs, like the JavaScript side, to smooth out a busy machine
        double best = 1e30;
        for (int run = 0; run < 3; run++) {
            double t0 = now();
            int *ids = tokenizer_encode(&t, text, (size_t)size, &n);
            double dt = now() - t0;
            free(ids);
            if (dt < best) best = dt;
        }
        printf("tokens %zu seconds %.4f tokens_per_s %.0f\n", n, best, (double)n / best);
    } else {
        int *ids = tokenizer_encode(&t, text, (size_t)size, &n);
        for (size_t i = 0; i < n; i++) printf("%d\n", ids[i]);
        free(ids);
    }
    free(text);
    tokenizer_free(&t);
    return 0;
}
