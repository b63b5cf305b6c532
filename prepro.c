/*
prepro: turns UTF-8 text files into token shards for training.

    prepro [options] input.txt [more.txt ...]

Every input file is a document (--split also cuts files into documents at a separator line).
The documents are tokenized one after the other into one stream of tokens; the last --val
fraction of that stream is the validation split, the rest the training split:

    PREFIX_train.bin   PREFIX_val.bin

A split with more than --shard-tokens tokens is cut into several shards instead,
PREFIX_train_000.bin, PREFIX_train_001.bin, ...; the dataloader takes them all with the glob
pattern "PREFIX_train*.bin".

A shard is llm.c's format: a header of 256 int32 (magic 20240520, version 2, number of tokens,
vocabulary size, vocabulary kind), then the tokens as uint16. See doc/formats.md.

With --vocab bpe, prepro first trains a vocabulary of --bpe-tokens tokens on all the documents
(bpe.h) and writes it as PREFIX_tokenizer.bin, the file that decodes the shards' tokens.
*/
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>

#include "bpe.h"
#include "tokenizer.h"
#include "utils.h"

static void usage(void) {
    fprintf(stderr,
            "usage: prepro [options] input.txt [more.txt ...]\n"
            "  -o PREFIX            write PREFIX_train.bin and PREFIX_val.bin\n"
            "                       (default: the first input's path without its .txt)\n"
            "  --val FRAC           fraction of the tokens, at the end, for validation (default 0.1;\n"
            "                       0 writes no validation split)\n"
            "  --eot                put the end-of-text token before every document\n"
            "  --split LINE         also cut every file into documents at each line equal to LINE\n"
            "                       (the separator lines are dropped)\n"
            "  --vocab gpt2|bytes|bpe\n"
            "                       GPT-2's BPE (50257 tokens, default), one token per byte (256), or a\n"
            "                       BPE vocabulary trained on the inputs, saved as PREFIX_tokenizer.bin\n"
            "  --bpe-tokens N       size of the trained vocabulary, end-of-text included (default 4096)\n"
            "  --tokenizer PATH     GPT-2 tokenizer file (default tokenizer.bin)\n"
            "  --shard-tokens N     at most N tokens per shard (default 100000000)\n");
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// the whole token stream, as it will be stored
static uint16_t *toks;
static size_t ntoks, toks_cap;

static void push_token(int id) {
    if (ntoks == toks_cap) {
        toks_cap = toks_cap ? 2 * toks_cap : 1 << 20;
        toks = realloc_check(toks, toks_cap * sizeof *toks);
    }
    toks[ntoks++] = (uint16_t)id;
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
static void write_shard(const char *path, size_t begin, size_t end, int vocab_size, int vocab_kind) {
    int32_t header[HEADER_WORDS] = {SHARD_MAGIC, SHARD_VERSION, (int32_t)(end - begin), vocab_size,
                                    vocab_kind};
    char tmp[4096];
    FILE *f = open_for_atomic_write(path, tmp, sizeof tmp);
    fwrite_check(header, sizeof header, 1, f, tmp);
    fwrite_check(toks + begin, sizeof *toks, end - begin, f, tmp);
    finish_atomic_write(f, tmp, path);
    printf("  %-40s %12zu tokens\n", path, end - begin);
}

// writes tokens [begin, end) as PREFIX_NAME.bin, or as numbered shards if they do not fit in one
static void write_split(const char *prefix, const char *name, size_t begin, size_t end, size_t shard_tokens,
                        int vocab_size, int vocab_kind) {
    size_t n = end - begin;
    char path[4096];
    if (n <= shard_tokens) {
        snprintf(path, sizeof path, "%s_%s.bin", prefix, name);
        write_shard(path, begin, end, vocab_size, vocab_kind);
        return;
    }
    size_t nshards = (n + shard_tokens - 1) / shard_tokens;
    for (size_t s = 0; s < nshards; s++) {
        snprintf(path, sizeof path, "%s_%s_%03zu.bin", prefix, name, s);
        size_t b = begin + s * shard_tokens;
        write_shard(path, b, b + shard_tokens < end ? b + shard_tokens : end, vocab_size, vocab_kind);
    }
}

int main(int argc, char **argv) {
    toks = NULL;  // main may run more than once in a process (the fuzz target does)
    ntoks = toks_cap = 0;
    const char *prefix = NULL, *split_line = NULL, *vocab = "gpt2", *tokenizer_path = "tokenizer.bin";
    double val_frac = 0.1;
    int eot = 0;
    long long shard_tokens = 100000000;
    int bpe_tokens = 4096;
    int ninputs = 0;
    const char **inputs = malloc_check(sizeof(char *) * (size_t)argc);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_value = i + 1 < argc;
        if (strcmp(a, "--eot") == 0) eot = 1;
        else if (strcmp(a, "-o") == 0 && has_value) prefix = argv[++i];
        else if (strcmp(a, "--val") == 0 && has_value) {
            char *end;
            val_frac = strtod(argv[++i], &end);
            if (*end || !(val_frac >= 0 && val_frac < 1)) fail("--val must be a number in [0, 1)");
        } else if (strcmp(a, "--split") == 0 && has_value) split_line = argv[++i];
        else if (strcmp(a, "--vocab") == 0 && has_value) vocab = argv[++i];
        else if (strcmp(a, "--tokenizer") == 0 && has_value) tokenizer_path = argv[++i];
        else if (strcmp(a, "--bpe-tokens") == 0 && has_value) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (*end || n < 257 || n > 65536) fail("--bpe-tokens must be in [257, 65536]");
            bpe_tokens = (int)n;
        }
        else if (strcmp(a, "--shard-tokens") == 0 && has_value) {
            char *end;
            shard_tokens = strtoll(argv[++i], &end, 10);
            // a shard's header stores its token count as an int32
            if (*end || shard_tokens < 1 || shard_tokens > INT32_MAX)
                fail("--shard-tokens must be in [1, 2^31)");
        } else if (a[0] == '-' && a[1] != 0) usage();
        else inputs[ninputs++] = a;
    }
    if (ninputs == 0) usage();
    int bytes = strcmp(vocab, "bytes") == 0, bpe = strcmp(vocab, "bpe") == 0;
    if (!bytes && !bpe && strcmp(vocab, "gpt2") != 0) fail("--vocab must be gpt2, bytes or bpe");
    if (bytes && eot) fail("--eot needs --vocab gpt2 or bpe: the byte vocabulary has no end-of-text token");

    // default prefix: the first input without its extension, data/input.txt -> data/input
    char default_prefix[4096];
    if (!prefix) {
        snprintf(default_prefix, sizeof default_prefix, "%s", inputs[0]);
        char *dot = strrchr(default_prefix, '.'), *slash = strrchr(default_prefix, '/');
        if (dot && (!slash || dot > slash + 1)) *dot = 0;
        prefix = default_prefix;
    }

    char tokenizer_out[4096];
    if (bpe) {  // train the vocabulary on every document first, then encode with the file it is saved to
        BpeTrainer trainer;
        bpe_init(&trainer);
        double t0 = now();
        for (int i = 0; i < ninputs; i++) {
            size_t len;
            char *text = read_text(inputs[i], &len);
            for (size_t doc = 0, doc_end, next; doc < len; doc = next) {
                next = next_document(text, len, doc, split_line, &doc_end);
                bpe_add_text(&trainer, text + doc, doc_end - doc);
            }
            free(text);
        }
        bpe_train(&trainer, bpe_tokens);
        if (snprintf(tokenizer_out, sizeof tokenizer_out, "%s_tokenizer.bin", prefix) >= (int)sizeof tokenizer_out) {
            fail("the output prefix %s is too long", prefix);
        }
        bpe_save(&trainer, tokenizer_out);
        printf("bpe: %d distinct pieces, %d merges (vocabulary %d tokens), %lld tokens after training, "
               "%.1f s -> %s\n", trainer.npieces, trainer.num_merges, trainer.num_merges + 257,
               (long long)trainer.corpus_tokens, now() - t0, tokenizer_out);
        bpe_free(&trainer);
        tokenizer_path = tokenizer_out;
    }
    Tokenizer tok;
    int vocab_size = 256;
    if (!bytes) {
        tokenizer_init(&tok, tokenizer_path);
        vocab_size = tokenizer_vocab_size(&tok);
        if (tok.vocab_kind != (bpe ? VOCAB_BPE : VOCAB_GPT2)) {
            fail("%s is a %s vocabulary, but --vocab is %s", tokenizer_path, vocab_kind_name(tok.vocab_kind), vocab);
        }
    }
    size_t total_bytes = 0, ndocs = 0;
    double t_encode = 0, t_start = now();
    for (int i = 0; i < ninputs; i++) {
        size_t len;
        char *text = read_text(inputs[i], &len);
        total_bytes += len;
        size_t file_docs = 0, file_start_tokens = ntoks;
        for (size_t doc = 0, doc_end, next; doc < len; doc = next) {
            next = next_document(text, len, doc, split_line, &doc_end);
            if (doc_end == doc) continue;  // empty documents (two separators in a row) are skipped
            if (eot) push_token(tokenizer_eot(&tok));
            if (bytes) {
                for (size_t j = doc; j < doc_end; j++) push_token((unsigned char)text[j]);
            } else {
                double t0 = now();
                size_t n;
                int *ids = tokenizer_encode(&tok, text + doc, doc_end - doc, &n);
                t_encode += now() - t0;
                for (size_t j = 0; j < n; j++) push_token(ids[j]);
                free(ids);
            }
            file_docs++;
        }
        printf("%s: %zu bytes, %zu document%s, %zu tokens\n", inputs[i], len, file_docs,
               file_docs == 1 ? "" : "s", ntoks - file_start_tokens);
        ndocs += file_docs;
        free(text);
    }
    if (ntoks < 2) fail("the input gives only %zu token(s), too little to train on", ntoks);

    size_t nval = (size_t)(val_frac * (double)ntoks + 0.5);
    if (val_frac > 0 && nval == 0) nval = 1;
    size_t ntrain = ntoks - nval;
    printf("%zu tokens (vocabulary %s, %d tokens) from %zu bytes in %zu document%s: %zu train, %zu val\n",
           ntoks, vocab, vocab_size, total_bytes, ndocs, ndocs == 1 ? "" : "s", ntrain, nval);
    int kind = bytes ? VOCAB_BYTES : bpe ? VOCAB_BPE : VOCAB_GPT2;
    write_split(prefix, "train", 0, ntrain, (size_t)shard_tokens, vocab_size, kind);
    if (nval > 0) write_split(prefix, "val", ntrain, ntoks, (size_t)shard_tokens, vocab_size, kind);
    double t_total = now() - t_start;
    if (!bytes) {
        printf("tokenizer: %.3f s, %.1f MB/s, %.2f M tokens/s\n", t_encode, total_bytes / 1e6 / t_encode,
               ntoks / 1e6 / t_encode);
        tokenizer_free(&tok);
    }
    printf("total: %.3f s (reading, tokenizing, writing)\n", t_total);
    free(toks);
    free(inputs);
    return 0;
}
