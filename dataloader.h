/*
dataloader.h: hands out batches of B sequences of T tokens from token shards written by prepro.

    DataLoader l;
    dataloader_init(&l, "data/input_train*.bin", B, T, shuffle, seed);
    dataloader_next_batch(&l);   // l.inputs[b*T + t] is a token, l.targets[b*T + t] the one after it
    dataloader_free(&l);

A shard (llm.c's format, see doc/formats.md) is a header of 256 int32: magic 20240520, version 2,
number of tokens, vocabulary size (0 means GPT-2's 50257), vocabulary kind (VOCAB_* of utils.h),
then the tokens as uint16. Version 1 shards (no kind; llm.c's own) are still read, their kind
inferred from the vocabulary size.
Every shard matching the pattern is checked when the loader starts, header and every token, so
that a bad file is found at once and not hours into training.

Each shard of n tokens is cut into (n - 1) / T windows of T + 1 tokens; window w starts at token
w*T, so consecutive windows overlap by one token and every token is a target once. The input of a
sequence is the first T tokens of a window and its target the last T. A batch is B windows of one
shard; the windows that do not fill a last batch are left out of that epoch.
  - sequential (shuffle = 0): the shards in the sorted order of their names, the windows in order,
    so a batch is B*T+1 consecutive tokens, as in llm.c;
  - shuffled (shuffle = 1): every epoch visits the shards in a random order and the windows of
    each shard in a random order. Both orders are a function of (seed, epoch, shard) only.
Because of that the position of the loader is just (epoch, shard, batch): dataloader_get_position
returns it, and dataloader_set_position on a fresh loader continues exactly where the saved one
was, with no random generator state to carry along.
*/
#ifndef DATALOADER_H
#define DATALOADER_H

#include <glob.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "dtopp/utils.h"  // defines: fail, checked memory and file I/O, file headers

#define SHARD_GPT2_VOCAB 50257

typedef struct {
    // what the training program uses
    int B, T;
    int *inputs;              // B*T token ids of the current batch
    int *targets;             // B*T token ids: targets[i] follows inputs[i] in the text
    int vocab_size;           // of the tokens, from the shard headers
    int vocab_kind;           // VOCAB_*: what the tokens are, from the shard headers
    uint64_t vocab_hash;      // the tokenizer's hash from the shard headers (0: bytes, or not recorded)
    size_t num_tokens;        // in all shards together
    size_t num_batches;       // batches in one epoch
    long long epoch;          // the epoch of the next batch
    // the shards
    int num_shards;
    char **shard_path;
    size_t *shard_tokens;     // tokens in each shard
    // the position of the next batch: batch `batch` of the shard shard_order[shard_pos] of `epoch`
    int shard_pos;
    long long batch;
    int shuffle;
    unsigned long long seed;
    unsigned long long fingerprint;  // of the data and settings, to check restored positions
    int *shard_order;         // this epoch's order of the shards
    long long order_epoch;    // the epoch shard_order was made for (-1: none yet)
    size_t *window_order;     // this epoch's order of the windows of shard window_shard
    int window_shard;         // (-1: none yet)
    FILE *file;               // the open shard
    int file_shard;           // which one it is (-1: none)
    uint16_t *buffer;         // one window, T + 1 tokens
} DataLoader;

// a random generator state that depends only on (seed, epoch, shard)
static uint64_t dataloader_stream_(uint64_t seed, long long epoch, long long shard) {
    uint64_t s = seed;
    s = random_u64(&s) ^ (unsigned long long)epoch;
    s = random_u64(&s) ^ (unsigned long long)shard;
    random_u64(&s);
    return s;
}

static size_t dataloader_windows_(const DataLoader *l, int shard) {
    return (l->shard_tokens[shard] - 1) / (size_t)l->T;
}
static long long dataloader_batches_(const DataLoader *l, int shard) {
    return (long long)(dataloader_windows_(l, shard) / (size_t)l->B);
}

// every token of the shard must be below the vocabulary size: checked once, at the start
static void dataloader_check_tokens_(const char *path, size_t num_tokens, int vocab) {
    FILE *f = fopen_check(path, "rb");
    if (fseek(f, (long)HEADER_BYTES, SEEK_SET) != 0) fail("cannot seek in %s", path);
    enum { CHUNK = 1 << 16 };
    uint16_t *chunk = (uint16_t *)malloc_check(CHUNK * sizeof(uint16_t));
    for (size_t done = 0; done < num_tokens;) {
        size_t n = num_tokens - done < CHUNK ? num_tokens - done : CHUNK;
        fread_check(chunk, sizeof(uint16_t), n, f, path);
        for (size_t i = 0; i < n; i++) {
            if (chunk[i] >= vocab) {
                fail("%s: token %d at offset %zu (in tokens after the header) is >= the vocabulary size %d",
                     path, chunk[i], done + i, vocab);
            }
        }
        done += n;
    }
    free(chunk);
    fclose(f);
}

// makes sure shard_order is this epoch's and window_order that of the current shard
static void dataloader_prepare_(DataLoader *l) {
    if (l->order_epoch != l->epoch) {
        for (int i = 0; i < l->num_shards; i++) l->shard_order[i] = i;
        if (l->shuffle) {  // Fisher-Yates (the modulo bias is negligible for these sizes)
            uint64_t s = dataloader_stream_(l->seed, l->epoch, -1);
            for (int i = l->num_shards - 1; i > 0; i--) {
                int j = (int)(random_u64(&s) % (unsigned long long)(i + 1));
                int tmp = l->shard_order[i]; l->shard_order[i] = l->shard_order[j]; l->shard_order[j] = tmp;
            }
        }
        l->order_epoch = l->epoch;
        l->window_shard = -1;
    }
    int shard = l->shard_order[l->shard_pos];
    if (l->shuffle && l->window_shard != shard) {
        size_t n = dataloader_windows_(l, shard);
        free(l->window_order);
        l->window_order = (size_t *)malloc_check(n * sizeof(size_t));
        for (size_t i = 0; i < n; i++) l->window_order[i] = i;
        uint64_t s = dataloader_stream_(l->seed, l->epoch, shard);
        for (size_t i = n - 1; i > 0; i--) {
            size_t j = (size_t)(random_u64(&s) % (unsigned long long)(i + 1));
            size_t tmp = l->window_order[i];
            l->window_order[i] = l->window_order[j];
            l->window_order[j] = tmp;
        }
        l->window_shard = shard;
    }
    if (l->file_shard != shard) {
        if (l->file) fclose(l->file);
        l->file = fopen(l->shard_path[shard], "rb");
        if (!l->file) fail("%s: cannot open (was it removed?)", l->shard_path[shard]);
        l->file_shard = shard;
    }
}

void dataloader_reset(DataLoader *l) {
    l->epoch = 0;
    l->shard_pos = 0;
    l->batch = 0;
}

void dataloader_init(DataLoader *l, const char *pattern, int B, int T, int shuffle, unsigned long long seed) {
    memset(l, 0, sizeof *l);
    if (B < 1 || T < 1) { fail("dataloader: B and T must be positive (got B=%d, T=%d)", B, T); }
    l->B = B;
    l->T = T;
    l->shuffle = shuffle != 0;
    l->seed = seed;
    glob_t g;
    if (glob(pattern, 0, NULL, &g) != 0 || g.gl_pathc == 0) fail("%s: no file matches this pattern", pattern);
    l->num_shards = (int)g.gl_pathc;
    l->shard_path = (char **)malloc_check(sizeof(char *) * g.gl_pathc);
    l->shard_tokens = (size_t *)malloc_check(sizeof(size_t) * g.gl_pathc);
    for (int i = 0; i < l->num_shards; i++) {
        l->shard_path[i] = (char *)malloc_check(strlen(g.gl_pathv[i]) + 1);
        strcpy(l->shard_path[i], g.gl_pathv[i]);
    }
    globfree(&g);
    // the fingerprint mixes everything a position depends on (FNV-1a over 64-bit words)
    unsigned long long fp = 14695981039346656037ULL;
    unsigned long long words[4] = {(unsigned long long)l->shuffle, l->shuffle ? seed : 0,
                                   (unsigned long long)B, (unsigned long long)T};
    for (int i = 0; i < 4; i++) fp = (fp ^ words[i]) * 1099511628211ULL;
    for (int i = 0; i < l->num_shards; i++) {
        const char *path = l->shard_path[i];
        static const int versions[] = {1, SHARD_VERSION};
        int32_t h[HEADER_WORDS];
        long size;
        FILE *f =
            open_with_header(path, h, SHARD_MAGIC, versions, 2, "token shard (make one with prepro)", &size);
        fclose(f);
        int vocab = h[3] == 0 ? SHARD_GPT2_VOCAB : h[3];  // 0: a plain llm.c shard, GPT-2 tokens
        if (h[2] < 0 || vocab < 1 || vocab > 65536)
            fail("%s: header holds an invalid token count or vocabulary size", path);
        int kind = h[1] == 1 ? (vocab == 256                ? VOCAB_BYTES
                                : vocab == SHARD_GPT2_VOCAB ? VOCAB_GPT2
                                                            : VOCAB_UNKNOWN)
                             : h[4];
        if (kind < VOCAB_UNKNOWN || kind > VOCAB_BPE)
            fail("%s: header holds an unknown vocabulary kind %d", path, kind);
        if (vocab_contradicts(kind, vocab))
            fail("%s: header says %s tokens but a vocabulary of %d: the two contradict each other", path,
                 vocab_kind_name(kind), vocab);
        check_payload_size(path, size, 2 * (size_t)h[2]);
        dataloader_check_tokens_(path, (size_t)h[2], vocab);
        if ((long long)h[2] < (long long)B * T + 1) {
            fail("%s: has %d tokens, fewer than the B*T+1 = %lld that one batch needs", path, h[2],
                 (long long)B * T + 1);
        }
        uint64_t hash = h[1] == 1 ? 0 : (uint64_t)(uint32_t)h[5] | (uint64_t)(uint32_t)h[6] << 32;
        if (i > 0 && hash != l->vocab_hash) {
            fail("%s: made with another vocabulary than %s (vocabulary hash %016llx, not %016llx)", path,
                 l->shard_path[0], (unsigned long long)hash, (unsigned long long)l->vocab_hash);
        }
        l->vocab_hash = hash;
        if (i > 0 && (vocab != l->vocab_size || kind != l->vocab_kind)) {
            fail("%s: vocabulary of %d %s tokens, but %s has %d %s tokens", path, vocab,
                 vocab_kind_name(kind), l->shard_path[0], l->vocab_size, vocab_kind_name(l->vocab_kind));
        }
        l->vocab_size = vocab;
        l->vocab_kind = kind;
        l->shard_tokens[i] = (size_t)h[2];
        l->num_tokens += (size_t)h[2];
        fp = (fp ^ (unsigned long long)h[2]) * 1099511628211ULL;
    }
    l->fingerprint = fp >> 1;  // stored in a long long: keep it non-negative
    for (int i = 0; i < l->num_shards; i++) l->num_batches += (size_t)dataloader_batches_(l, i);
    l->inputs = (int *)malloc_check(sizeof(int) * (size_t)B * (size_t)T);
    l->targets = (int *)malloc_check(sizeof(int) * (size_t)B * (size_t)T);
    l->buffer = (uint16_t *)malloc_check(sizeof(uint16_t) * ((size_t)T + 1));
    l->shard_order = (int *)malloc_check(sizeof(int) * (size_t)l->num_shards);
    l->order_epoch = -1;
    l->window_shard = -1;
    l->file_shard = -1;
    dataloader_reset(l);
}

void dataloader_next_batch(DataLoader *l) {
    dataloader_prepare_(l);
    int shard = l->shard_order[l->shard_pos];
    const char *path = l->shard_path[shard];
    int B = l->B, T = l->T;
    for (int b = 0; b < B; b++) {
        size_t w = (size_t)l->batch * (size_t)B + (size_t)b;
        if (l->shuffle) w = l->window_order[w];
        size_t start = w * (size_t)T;  // in tokens, from the start of the shard's tokens
        if (fseek(l->file, 1024L + 2L * (long)start, SEEK_SET) != 0 ||
            fread(l->buffer, sizeof(uint16_t), (size_t)T + 1, l->file) != (size_t)T + 1)
            fail("%s: read error (was the file changed?)", path);
        for (int t = 0; t <= T; t++) {  // checked at the start; the file may have changed since
            if (l->buffer[t] >= l->vocab_size) {
                fail("%s: token %d at offset %zu is >= the vocabulary size %d (was the file changed?)",
                     path, l->buffer[t], start + (size_t)t, l->vocab_size);
            }
        }
        for (int t = 0; t < T; t++) {
            l->inputs[b * T + t] = l->buffer[t];
            l->targets[b * T + t] = l->buffer[t + 1];
        }
    }
    // move on to the next batch, the next shard, the next epoch
    if (++l->batch == dataloader_batches_(l, shard)) {
        l->batch = 0;
        if (++l->shard_pos == l->num_shards) {
            l->shard_pos = 0;
            l->epoch++;
        }
    }
}

// the position of the next batch: epoch, index in the epoch's order of shards, batch in the
// shard, and a fingerprint of the data and settings that set_position checks
void dataloader_get_position(const DataLoader *l, long long pos[4]) {
    pos[0] = l->epoch;
    pos[1] = l->shard_pos;
    pos[2] = l->batch;
    pos[3] = (long long)l->fingerprint;
}

// source: where the position comes from (a state file), for messages
void dataloader_set_position(DataLoader *l, const long long pos[4], const char *source) {
    if (pos[3] != (long long)l->fingerprint) {
        fail("%s: cannot restore the data position: it was saved over other shards or with other B, T, "
             "shuffle or seed (first shard now: %s)", source, l->shard_path[0]);
    }
    // a run has at most INT_MAX steps, each of one batch: no more epochs than that
    if (pos[0] < 0 || pos[0] > INT32_MAX || pos[1] < 0 || pos[1] >= l->num_shards) {
        fail("%s: invalid data position (epoch %lld, shard %lld of %d)", source, pos[0], pos[1],
             l->num_shards);
    }
    l->epoch = pos[0];
    l->shard_pos = (int)pos[1];
    dataloader_prepare_(l);  // to know which shard that is in this epoch
    long long nb = dataloader_batches_(l, l->shard_order[l->shard_pos]);
    if (pos[2] < 0 || pos[2] >= nb) {
        fail("%s: invalid data position: batch %lld of a shard with %lld batches", source, pos[2], nb);
    }
    l->batch = pos[2];
}

void dataloader_free(DataLoader *l) {
    if (l->file) fclose(l->file);
    for (int i = 0; i < l->num_shards; i++) free(l->shard_path[i]);
    free(l->shard_path);
    free(l->shard_tokens);
    free(l->inputs);
    free(l->targets);
    free(l->buffer);
    free(l->shard_order);
    free(l->window_order);
    memset(l, 0, sizeof *l);
}

#endif
