/*
shards.h: text to token shards, the work of prepro (prepro.c keeps its command line).

make_shards reads the input files as documents (a file is one document, or with a separator line
several), tokenizes them one after the other into one stream of tokens (bytes, GPT-2's BPE, or a
BPE vocabulary it first trains on all the documents, bpe.h, and saves as PREFIX_tokenizer.bin),
and writes the last val_frac of the stream as the validation split, the rest as the training
split: PREFIX_train.bin and PREFIX_val.bin, or numbered shards PREFIX_train_000.bin, ... when a
split has more than shard_tokens tokens. A shard is llm.c's format (doc/formats.md): a header of
256 int32 (magic, version, number of tokens, vocabulary size, vocabulary kind, vocabulary hash),
then the tokens as uint16. It reports each file, the split and the speed on stdout, and stops with fail() on bad
input. One run writes one set: everything under temporary names first, then the earlier run's
shards that the new set does not replace are removed and the new set is renamed into place; a
failure before that (a full disk) leaves the earlier set as it was (publish_shards).

    ShardOptions o = {.inputs = paths, .ninputs = 1, .prefix = "data/input", .vocab = "bytes",
                      .tokenizer_path = "tokenizer.bin", .val_frac = 0.1, .bpe_tokens = 4096,
                      .shard_tokens = 100000000};
    make_shards(&o);
*/
#ifndef SHARDS_H
#define SHARDS_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <glob.h>

#include "bpe.h"        // defines: BpeTrainer, bpe_init, bpe_add_text, bpe_train, bpe_save, bpe_free
#include "tokenizer.h"  // defines: Tokenizer, tokenizer_init, tokenizer_encode, tokenizer_eot
#include "utils.h"      // defines: fail, checked memory and file I/O, file headers, wall_seconds

typedef struct {
    const char *const *inputs;  // the text files, in order
    int ninputs;
    const char *prefix;          // output: PREFIX_train.bin, PREFIX_val.bin (and PREFIX_tokenizer.bin)
    const char *split_line;      // NULL: every file is one document; else the line between documents
    const char *vocab;           // "gpt2", "bytes" or "bpe" (the caller has checked it)
    const char *tokenizer_path;  // GPT-2's tokenizer file (vocab "gpt2")
    double val_frac;             // in [0, 1): the share of the tokens, at the end, for validation
    int eot;                     // the end-of-text token before every document (not with "bytes")
    int bpe_tokens;              // "bpe": size of the trained vocabulary, end-of-text included
    size_t shard_tokens;         // at most this many tokens per shard (below 2^31)
} ShardOptions;

// the whole token stream, as it will be stored
typedef struct {
    uint16_t *toks;
    size_t ntoks, cap;
} TokenStream;

static void push_token(TokenStream *s, int id) {
    if (s->ntoks == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 1 << 20;
        s->toks = realloc_check(s->toks, s->cap * sizeof *s->toks);
    }
    s->toks[s->ntoks++] = (uint16_t)id;
}

static char *read_text(const char *path, size_t *len) {
    struct stat st;
    if (stat(path, &st) != 0) fail("cannot open %s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) fail("%s is not a regular file", path);
    FILE *f = fopen_check(path, "rb");
    off_t size = st.st_size;
    if (size == 0) fail("%s is empty", path);
    char *text = malloc_check((size_t)size);
    fread_check(text, 1, (size_t)size, f, path);
    fclose(f);
    *len = (size_t)size;
    return text;
}

// The document that starts at text[doc]: sets *doc_end to where it ends and returns where the next
// one starts. Without a separator line the rest of the file is one document; with one, the
// document ends before the next line equal to it (a trailing \r is ignored), which is dropped.
static size_t next_document(const char *text, size_t len, size_t doc, const char *split_line, size_t *doc_end) {
    *doc_end = len;
    if (!split_line) return len;
    size_t seplen = strlen(split_line);
    for (size_t line = doc; line < len;) {
        const char *nl = memchr(text + line, '\n', len - line);
        size_t line_end = nl ? (size_t)(nl - text) : len;
        size_t l = line_end - line;
        if (l > 0 && text[line_end - 1] == '\r') l--;
        if (l == seplen && memcmp(text + line, split_line, seplen) == 0) {
            *doc_end = line;
            return nl ? line_end + 1 : len;
        }
        line = nl ? line_end + 1 : len;
    }
    return len;
}

// writes tokens [begin, end) of the stream as one shard
static void write_shard(const TokenStream *s, const char *path, size_t begin, size_t end, int vocab_size,
                        int vocab_kind, uint64_t vocab_hash) {
    int32_t header[HEADER_WORDS] = {SHARD_MAGIC, SHARD_VERSION, (int32_t)(end - begin), vocab_size,
                                    vocab_kind};
    memcpy(&header[5], &vocab_hash, sizeof(vocab_hash));  // words 5-6: the tokenizer's (0: bytes)
    char tmp[4096];
    FILE *f = open_for_atomic_write(path, tmp, sizeof tmp);
    fwrite_check(header, sizeof header, 1, f, tmp);
    fwrite_check(s->toks + begin, sizeof *s->toks, end - begin, f, tmp);
    hold_atomic_write(f, tmp);  // published with the rest of the set (publish_shards)
    printf("  %-40s %12zu tokens\n", path, end - begin);
}

// ----------------------------------------------------------------------------
// one run, one set: the files of a prefix (PREFIX_train*.bin, PREFIX_val*.bin, which the
// dataloader takes by those patterns) all come from the same run. What prepro writes is written
// under temporary names and published together once all of it is complete; the shards of an
// earlier run that the new set does not replace (numbered ones, a validation split) are removed
// first. A file that matches the patterns but is not a name prepro writes is refused at the start.

// Whether `name` is PREFIX_SPLIT.bin or PREFIX_SPLIT_DDD.bin (three digits or more), a shard name
// prepro writes for the split.
static int is_shard_name(const char *name, const char *prefix, const char *split) {
    size_t np = strlen(prefix), ns = strlen(split);
    if (strncmp(name, prefix, np) != 0 || name[np] != '_' || strncmp(name + np + 1, split, ns) != 0) return 0;
    const char *rest = name + np + 1 + ns;
    if (strcmp(rest, ".bin") == 0) return 1;
    if (rest[0] != '_') return 0;
    size_t digits = 0;
    while (rest[1 + digits] >= '0' && rest[1 + digits] <= '9') digits++;
    return digits >= 3 && strcmp(rest + 1 + digits, ".bin") == 0;
}

// Calls visit(path, context) for every file matching PREFIX_SPLIT*.bin of both splits; glob's
// special characters in the prefix are matched literally by comparing names afterwards.
static void for_each_split_file(const char *prefix, void (*visit)(const char *, const char *, void *),
                                void *context) {
    static const char *splits[2] = {"train", "val"};
    for (int k = 0; k < 2; k++) {
        char pattern[4200];
        snprintf(pattern, sizeof pattern, "%s_%s*.bin", prefix, splits[k]);
        glob_t g;
        if (glob(pattern, 0, NULL, &g) != 0) continue;
        for (size_t i = 0; i < g.gl_pathc; i++) visit(g.gl_pathv[i], splits[k], context);
        globfree(&g);
    }
}

static void refuse_foreign_(const char *path, const char *split, void *prefix) {
    if (!is_shard_name(path, (const char *)prefix, split)) {
        fail("%s matches %s_%s*.bin, the pattern that takes this prefix's shards, but is not a shard "
             "prepro writes: move it away, or choose another -o", path, (const char *)prefix, split);
    }
}

// Before any work: nothing but prepro's own shards may match the prefix's patterns.
static void refuse_foreign_shards(const char *prefix) { for_each_split_file(prefix, refuse_foreign_, (void *)prefix); }

static void remove_stale_(const char *path, const char *split, void *context) {
    (void)split;
    for (int i = 0; i < num_held_tmp_paths; i++) {  // replaced by the rename of a new file
        if (strncmp(held_tmp_paths[i], path, strlen(path)) == 0 && strcmp(held_tmp_paths[i] + strlen(path), ".tmp") == 0) return;
    }
    if (remove(path) != 0) fail("cannot remove %s, a shard of an earlier run: %s", path, strerror(errno));
    printf("  removed %s, a shard of an earlier run that this one does not replace\n", path);
    ++*(int *)context;
}

// Removes the earlier run's shards that the new set does not replace, then renames the new set
// (written under temporary names) into place.
static void publish_shards(const char *prefix) {
    int removed = 0;
    for_each_split_file(prefix, remove_stale_, &removed);
    publish_held();
}

// writes tokens [begin, end) as PREFIX_NAME.bin, or as numbered shards if they do not fit in one
static void write_split(const TokenStream *s, const char *prefix, const char *name, size_t begin, size_t end,
                        size_t shard_tokens, int vocab_size, int vocab_kind, uint64_t vocab_hash) {
    size_t n = end - begin;
    char path[4096];
    if (n <= shard_tokens) {
        snprintf(path, sizeof path, "%s_%s.bin", prefix, name);
        write_shard(s, path, begin, end, vocab_size, vocab_kind, vocab_hash);
        return;
    }
    size_t nshards = (n + shard_tokens - 1) / shard_tokens;
    for (size_t k = 0; k < nshards; k++) {
        snprintf(path, sizeof path, "%s_%s_%03zu.bin", prefix, name, k);
        size_t b = begin + k * shard_tokens;
        write_shard(s, path, b, b + shard_tokens < end ? b + shard_tokens : end, vocab_size, vocab_kind,
                    vocab_hash);
    }
}

// Tokenizes the inputs and writes the shards (and, with vocab "bpe", first trains the vocabulary).
static void make_shards(const ShardOptions *o) {
    int bytes = strcmp(o->vocab, "bytes") == 0, bpe = strcmp(o->vocab, "bpe") == 0;
    const char *prefix = o->prefix, *split_line = o->split_line, *tokenizer_path = o->tokenizer_path;
    TokenStream s = {NULL, 0, 0};
    char tokenizer_out[4100];
    refuse_foreign_shards(prefix);
    if (bpe) {  // train the vocabulary on every document first, then encode with the file it is saved to
        BpeTrainer trainer;
        bpe_init(&trainer);
        double t0 = wall_seconds();
        for (int i = 0; i < o->ninputs; i++) {
            size_t len;
            char *text = read_text(o->inputs[i], &len);
            for (size_t doc = 0, doc_end, next; doc < len; doc = next) {
                next = next_document(text, len, doc, split_line, &doc_end);
                bpe_add_text(&trainer, text + doc, doc_end - doc);
            }
            free(text);
        }
        bpe_train(&trainer, o->bpe_tokens);
        if (snprintf(tokenizer_out, sizeof tokenizer_out, "%s_tokenizer.bin", prefix) >= (int)sizeof tokenizer_out - 4) {
            fail("the output prefix %s is too long", prefix);
        }
        bpe_write_(&trainer, tokenizer_out, 1);  // published with the shards; read from its .tmp until then
        printf("bpe: %d distinct pieces, %d merges (vocabulary %d tokens), %lld tokens after training, "
               "%.1f s -> %s\n", trainer.npieces, trainer.num_merges, trainer.num_merges + 257,
               (long long)trainer.corpus_tokens, wall_seconds() - t0, tokenizer_out);
        bpe_free(&trainer);
        strcat(tokenizer_out, ".tmp");
        tokenizer_path = tokenizer_out;
    }
    Tokenizer tok;
    int vocab_size = 256;
    if (!bytes) {
        tokenizer_init(&tok, tokenizer_path);
        vocab_size = tokenizer_vocab_size(&tok);
        if (tok.vocab_kind != (bpe ? VOCAB_BPE : VOCAB_GPT2)) {
            fail("%s is a %s vocabulary, but --vocab is %s", tokenizer_path, vocab_kind_name(tok.vocab_kind),
                 o->vocab);
        }
    }
    size_t total_bytes = 0, ndocs = 0;
    double t_encode = 0, t_start = wall_seconds();
    for (int i = 0; i < o->ninputs; i++) {
        size_t len;
        char *text = read_text(o->inputs[i], &len);
        total_bytes += len;
        size_t file_docs = 0, file_start_tokens = s.ntoks;
        for (size_t doc = 0, doc_end, next; doc < len; doc = next) {
            next = next_document(text, len, doc, split_line, &doc_end);
            if (doc_end == doc) continue;  // empty documents (two separators in a row) are skipped
            if (o->eot) push_token(&s, tokenizer_eot(&tok));
            if (bytes) {
                for (size_t j = doc; j < doc_end; j++) push_token(&s, (unsigned char)text[j]);
            } else {
                double t0 = wall_seconds();
                size_t n;
                int *ids = tokenizer_encode(&tok, text + doc, doc_end - doc, &n);
                t_encode += wall_seconds() - t0;
                for (size_t j = 0; j < n; j++) push_token(&s, ids[j]);
                free(ids);
            }
            file_docs++;
        }
        printf("%s: %zu bytes, %zu document%s, %zu tokens\n", o->inputs[i], len, file_docs,
               file_docs == 1 ? "" : "s", s.ntoks - file_start_tokens);
        ndocs += file_docs;
        free(text);
    }
    if (s.ntoks < 2) fail("the input gives only %zu token(s), too little to train on", s.ntoks);

    size_t nval = (size_t)(o->val_frac * (double)s.ntoks + 0.5);
    if (o->val_frac > 0 && nval == 0) nval = 1;
    size_t ntrain = s.ntoks - nval;
    if (ntrain < 2 || (nval > 0 && nval < 2)) {  // a split of 0 or 1 token holds nothing to train or measure on
        fail("--val %g splits the %zu tokens of the input into %zu for training and %zu for validation: a "
             "split needs 2 tokens or more (give more text, or another --val)", o->val_frac, s.ntoks, ntrain, nval);
    }
    printf("%zu tokens (vocabulary %s, %d tokens) from %zu bytes in %zu document%s: %zu train, %zu val\n",
           s.ntoks, o->vocab, vocab_size, total_bytes, ndocs, ndocs == 1 ? "" : "s", ntrain, nval);
    int kind = bytes ? VOCAB_BYTES : bpe ? VOCAB_BPE : VOCAB_GPT2;
    uint64_t hash = bytes ? 0 : tok.vocab_hash;
    write_split(&s, prefix, "train", 0, ntrain, o->shard_tokens, vocab_size, kind, hash);
    if (nval > 0) write_split(&s, prefix, "val", ntrain, s.ntoks, o->shard_tokens, vocab_size, kind, hash);
    publish_shards(prefix);
    double t_total = wall_seconds() - t_start;
    if (!bytes) {
        printf("tokenizer: %.3f s, %.1f MB/s, %.2f M tokens/s\n", t_encode, total_bytes / 1e6 / t_encode,
               s.ntoks / 1e6 / t_encode);
        tokenizer_free(&tok);
    }
    printf("total: %.3f s (reading, tokenizing, writing)\n", t_total);
    free(s.toks);
}

#endif  // SHARDS_H
