/*
test_dataloader: checks dataloader.h on small shards written to a temporary folder.

    test_dataloader

Prints one line per check and ends with "N passed, M failed"; exits 1 if any check failed.
The refusals (bad shards, bad positions) end the process with exit(1), so each runs in a child
process, whose exit status and error message we check.
*/
#define _DEFAULT_SOURCE  // mkdtemp, fork, pipe
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

#include "../dataloader.h"

static char dir[256];


// writes a shard of n tokens: token i is (i + offset) % modulo; magic, version, vocab (header word
// 3) as given, and for version 2 the vocabulary kind in word 4
static void write_shard_kind(const char *name, int n, int offset, int modulo, int magic, int version, int vocab,
                             int truncate, int kind) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(1); }
    int32_t h[256] = {0};
    h[0] = magic; h[1] = version; h[2] = n; h[3] = vocab; h[4] = kind;
    fwrite(h, sizeof h, 1, f);
    for (int i = 0; i < n - truncate; i++) {
        uint16_t t = (uint16_t)((i + offset) % modulo);
        fwrite(&t, 2, 1, f);
    }
    fclose(f);
}

// a version 1 shard, as llm.c and earlier versions of prepro write them
static void write_shard(const char *name, int n, int offset, int modulo, int magic, int version, int vocab, int truncate) {
    write_shard_kind(name, n, offset, modulo, magic, version, vocab, truncate, 0);
}

static char *path_of(const char *pattern) {
    static char buf[512];
    snprintf(buf, sizeof buf, "%s/%s", dir, pattern);
    return buf;
}

// for the refusals: load the shards matching the pattern and read every batch once
static void load_all(const void *pattern) {
    DataLoader l;
    dataloader_init(&l, path_of(pattern), 2, 4, 0, 0);
    for (size_t i = 0; i < l.num_batches; i++) dataloader_next_batch(&l);
    dataloader_free(&l);
}

static long long saved_pos[4];
static void restore_into_other(const void *arg) {
    (void)arg;
    DataLoader l;
    dataloader_init(&l, path_of("good_*.bin"), 2, 5, 1, 43);  // other T and seed
    dataloader_set_position(&l, saved_pos, "test");
}
static void restore_bad_batch(const void *arg) {
    (void)arg;
    DataLoader l;
    dataloader_init(&l, path_of("good_*.bin"), 2, 4, 1, 42);
    long long pos[4];
    dataloader_get_position(&l, pos);
    pos[2] = 1000000;
    dataloader_set_position(&l, pos, "test");
}

// a batch as a hash, to compare sequences of batches
static unsigned long long batch_hash(const DataLoader *l) {
    unsigned long long h = 14695981039346656037ULL;
    for (int i = 0; i < l->B * l->T; i++) h = (h ^ (unsigned)l->inputs[i] ^ ((unsigned long long)l->targets[i] << 20)) * 1099511628211ULL;
    return h;
}

int main(void) {
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/test_dataloader_XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(dir)) { perror("mkdtemp"); return 1; }

    // two good shards; token values encode their position so that every check is exact
    write_shard("good_0.bin", 1001, 0, 60000, SHARD_MAGIC, 1, 60000, 0);
    write_shard("good_1.bin", 503, 10000, 60000, SHARD_MAGIC, 1, 60000, 0);
    int B = 2, T = 4;

    // sequential
    DataLoader l;
    dataloader_init(&l, path_of("good_*.bin"), B, T, 0, 0);
    check(l.num_shards == 2 && l.num_tokens == 1504 && l.vocab_size == 60000, "finds 2 shards, 1504 tokens, vocabulary 60000");
    // shard 0: 1000/4 = 250 windows = 125 batches; shard 1: 502/4 = 125 windows = 62 batches
    check(l.num_batches == 187, "187 batches per epoch (got %zu)", l.num_batches);
    dataloader_next_batch(&l);
    int ok = 1;
    for (int i = 0; i < B * T; i++) ok &= l.inputs[i] == i && l.targets[i] == i + 1;
    check(ok, "first batch is tokens 0..7, targets 1..8");
    dataloader_next_batch(&l);
    check(l.inputs[0] == 8 && l.targets[B * T - 1] == 16, "second batch continues at token 8");
    for (int i = 2; i < 125; i++) dataloader_next_batch(&l);
    check(l.inputs[B * T - 1] == 999 && l.targets[B * T - 1] == 1000, "last batch of shard 0 ends with its last token");
    dataloader_next_batch(&l);
    check(l.inputs[0] == 10000, "then shard 1 begins");
    for (int i = 1; i < 62; i++) dataloader_next_batch(&l);
    check(l.epoch == 1, "epoch 1 after 187 batches");
    dataloader_next_batch(&l);
    check(l.inputs[0] == 0 && l.epoch == 1, "epoch 1 starts again at token 0");
    dataloader_reset(&l);
    dataloader_next_batch(&l);
    check(l.inputs[0] == 0 && l.epoch == 0, "reset goes back to the first batch");
    dataloader_free(&l);

    // shuffled: targets still follow inputs, every window at most once per epoch, deterministic
    DataLoader a, b;
    dataloader_init(&a, path_of("good_*.bin"), B, T, 1, 42);
    dataloader_init(&b, path_of("good_*.bin"), B, T, 1, 42);
    unsigned char seen[20000] = {0};
    int shift_ok = 1, once_ok = 1, same = 1, ordered = 1;
    unsigned long long epoch0[187];
    for (size_t i = 0; i < a.num_batches; i++) {
        dataloader_next_batch(&a);
        dataloader_next_batch(&b);
        epoch0[i] = batch_hash(&a);
        same &= epoch0[i] == batch_hash(&b);
        for (int s = 0; s < B; s++) {
            int first = a.inputs[s * T];
            once_ok &= first % T == 0 && !seen[first];  // windows start at multiples of T (10000 is one too)
            seen[first] = 1;
            for (int t = 0; t < T; t++) shift_ok &= a.targets[s * T + t] == a.inputs[s * T + t] + 1;
        }
        ordered &= a.inputs[0] == (int)(i * B * T);
    }
    check(shift_ok, "shuffled: targets are the inputs shifted by one");
    check(once_ok, "shuffled: every window at most once per epoch");
    check(!ordered, "shuffled: the order is not sequential");
    check(same, "shuffled: same seed gives the same batches");
    int differs = 0;
    for (size_t i = 0; i < a.num_batches; i++) { dataloader_next_batch(&a); differs |= batch_hash(&a) != epoch0[i]; }
    check(differs && a.epoch == 2, "shuffled: epoch 1 has another order than epoch 0");
    dataloader_free(&b);
    dataloader_init(&b, path_of("good_*.bin"), B, T, 1, 43);
    dataloader_next_batch(&b);
    check(batch_hash(&b) != epoch0[0], "shuffled: another seed gives other batches");
    dataloader_free(&b);

    // saving and restoring the position, shuffled and sequential, also across an epoch boundary
    for (int shuffle = 0; shuffle <= 1; shuffle++) {
        int starts[2] = {50, 180};
        for (int k = 0; k < 2; k++) {
            DataLoader x, y;
            dataloader_init(&x, path_of("good_*.bin"), B, T, shuffle, 7);
            for (int i = 0; i < starts[k]; i++) dataloader_next_batch(&x);
            long long pos[4];
            dataloader_get_position(&x, pos);
            dataloader_init(&y, path_of("good_*.bin"), B, T, shuffle, 7);
            dataloader_next_batch(&y);  // y is somewhere else before restoring
            dataloader_set_position(&y, pos, "test");
            int same_after = 1;
            for (int i = 0; i < 30; i++) {
                dataloader_next_batch(&x);
                dataloader_next_batch(&y);
                same_after &= batch_hash(&x) == batch_hash(&y);
            }
            check(same_after, "%s: restoring the position after %d batches gives the same next 30 batches",
                  shuffle ? "shuffled" : "sequential", starts[k]);
            dataloader_free(&x);
            dataloader_free(&y);
        }
    }
    dataloader_get_position(&a, saved_pos);
    dataloader_free(&a);

    // a plain llm.c shard (header word 3 = 0) holds GPT-2 tokens
    write_shard("llmc.bin", 100, 0, 50257, SHARD_MAGIC, 1, 0, 0);
    dataloader_init(&l, path_of("llmc.bin"), B, T, 0, 0);
    check(l.vocab_size == 50257, "header word 3 = 0 means vocabulary 50257");
    check(l.vocab_kind == VOCAB_GPT2, "a version 1 shard of 50257 tokens holds GPT-2 tokens");
    dataloader_free(&l);
    write_shard_kind("v2.bin", 100, 0, 256, SHARD_MAGIC, 2, 256, 0, VOCAB_BYTES);
    dataloader_init(&l, path_of("v2.bin"), B, T, 0, 0);
    check(l.vocab_size == 256 && l.vocab_kind == VOCAB_BYTES, "a version 2 shard's header word 4 is its vocabulary kind");
    dataloader_free(&l);

    // refusals
    write_shard("magic.bin", 100, 0, 100, 12345, 1, 256, 0);
    write_shard("version.bin", 100, 0, 100, SHARD_MAGIC, 3, 256, 0);
    write_shard_kind("kind.bin", 100, 0, 100, SHARD_MAGIC, 2, 256, 0, 7);
    write_shard_kind("kinds_0.bin", 100, 0, 100, SHARD_MAGIC, 2, 256, 0, VOCAB_BYTES);
    write_shard_kind("kinds_1.bin", 100, 0, 100, SHARD_MAGIC, 2, 256, 0, VOCAB_UNKNOWN);
    write_shard("trunc.bin", 100, 0, 100, SHARD_MAGIC, 1, 256, 10);
    write_shard("vocab.bin", 100, 0, 300, SHARD_MAGIC, 1, 256, 0);  // tokens 0..99: all fine
    write_shard("big.bin", 100, 250, 300, SHARD_MAGIC, 1, 256, 0);  // tokens 250..299: 256 and up are too big
    write_shard("short.bin", 8, 0, 100, SHARD_MAGIC, 1, 256, 0);    // B*T+1 = 9 tokens needed
    write_shard("mixed_0.bin", 100, 0, 100, SHARD_MAGIC, 1, 256, 0);
    write_shard("mixed_1.bin", 100, 0, 100, SHARD_MAGIC, 1, 512, 0);
    char hdr[512];
    snprintf(hdr, sizeof hdr, "%s/tiny.bin", dir);
    FILE *f = fopen(hdr, "wb");
    fputs("tiny", f);
    fclose(f);
    check_refuses("a wrong magic number", load_all, "magic.bin", "magic");
    check_refuses("a wrong version", load_all, "version.bin", "version");
    check_refuses("an unknown vocabulary kind", load_all, "kind.bin", "vocabulary kind 7");
    check_refuses("shards of different vocabulary kinds", load_all, "kinds_*.bin", "kinds_1.bin");
    check_refuses("a truncated shard", load_all, "trunc.bin", "trunc.bin");
    check_refuses("a file shorter than the header", load_all, "tiny.bin", "tiny.bin");
    check_refuses("a token id >= vocabulary size", load_all, "big.bin", "offset 6");
    check_refuses("a shard shorter than B*T+1 tokens", load_all, "short.bin", "short.bin");
    check_refuses("shards of different vocabularies", load_all, "mixed_*.bin", "mixed_1.bin");
    check_refuses("a pattern that matches no file", load_all, "nothing_*.bin", "no file matches");
    check_refuses("a position saved with other settings", restore_into_other, NULL, "cannot restore");
    check_refuses("a position beyond the shard", restore_bad_batch, NULL, "invalid data position");
    load_all("vocab.bin");
    check(1, "accepts a shard whose tokens are all below its vocabulary size");

    const char *files[] = {"good_0.bin", "good_1.bin", "llmc.bin", "magic.bin", "version.bin", "trunc.bin", "vocab.bin",
                           "big.bin", "short.bin", "mixed_0.bin", "mixed_1.bin", "tiny.bin", "kind.bin", "kinds_0.bin",
                           "kinds_1.bin", "v2.bin"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) remove(path_of(files[i]));
    rmdir(dir);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
