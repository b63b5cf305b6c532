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

This file is the command line; the work is make_shards in dtopp/shards.h.
*/
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtopp/shards.h"  // defines: ShardOptions, make_shards (and through it fail, malloc_check)

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

int main(int argc, char **argv) {
    ShardOptions o = {.vocab = "gpt2", .tokenizer_path = "tokenizer.bin", .val_frac = 0.1, .bpe_tokens = 4096};
    long long shard_tokens = 100000000;
    int ninputs = 0;
    const char **inputs = malloc_check(sizeof(char *) * (size_t)argc);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_value = i + 1 < argc;
        if (strcmp(a, "--eot") == 0) o.eot = 1;
        else if (strcmp(a, "-o") == 0 && has_value) o.prefix = argv[++i];
        else if (strcmp(a, "--val") == 0 && has_value) {
            char *end;
            o.val_frac = strtod(argv[++i], &end);
            if (*end || !(o.val_frac >= 0 && o.val_frac < 1)) fail("--val must be a number in [0, 1)");
        } else if (strcmp(a, "--split") == 0 && has_value) o.split_line = argv[++i];
        else if (strcmp(a, "--vocab") == 0 && has_value) o.vocab = argv[++i];
        else if (strcmp(a, "--tokenizer") == 0 && has_value) o.tokenizer_path = argv[++i];
        else if (strcmp(a, "--bpe-tokens") == 0 && has_value) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (*end || n < 257 || n > 65536) fail("--bpe-tokens must be in [257, 65536]");
            o.bpe_tokens = (int)n;
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
    int bytes = strcmp(o.vocab, "bytes") == 0, bpe = strcmp(o.vocab, "bpe") == 0;
    if (!bytes && !bpe && strcmp(o.vocab, "gpt2") != 0) fail("--vocab must be gpt2, bytes or bpe");
    if (bytes && o.eot) fail("--eot needs --vocab gpt2 or bpe: the byte vocabulary has no end-of-text token");

    // default prefix: the first input without its extension, data/input.txt -> data/input
    char default_prefix[4096];
    if (!o.prefix) {
        snprintf(default_prefix, sizeof default_prefix, "%s", inputs[0]);
        char *dot = strrchr(default_prefix, '.'), *slash = strrchr(default_prefix, '/');
        if (dot && (!slash || dot > slash + 1)) *dot = 0;
        o.prefix = default_prefix;
    }
    o.inputs = inputs;
    o.ninputs = ninputs;
    o.shard_tokens = (size_t)shard_tokens;
    make_shards(&o);
    free(inputs);
    return 0;
}
