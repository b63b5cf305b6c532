// fuzz_prepro: prepro's path from text to shards (make_shards, dtopp/shards.h). The first byte picks the options (vocabulary,
// --eot, --split, --val, a stale numbered shard of an earlier run), the rest is the text. Without
// --split the shards must hold the text exactly: their tokens, decoded, give back every byte
// (end-of-text tokens aside). The output set is one run's: an accepted input leaves exactly its
// shards (the stale one removed), a refused one leaves the earlier files as they were, and neither
// leaves a temporary file. BPE uses the
// small tokenizer of the seeds (GPT-2's first 40 merges): loading all of tokenizer.bin for every
// input would leave little time for anything else, and fuzz_encoder covers it.
#include "fuzz.h"
#include "../dtopp/shards.h"  // defines: ShardOptions, make_shards

#define SMALL_TOKENIZER "fuzz/corpus/tokenizer/small.bin"
static Tokenizer gpt2;

// Appends the decoded tokens of the shard at path to out; returns the new length.
static size_t decode_shard(const char *path, int bytes, unsigned char *out, size_t at, size_t cap) {
    if (access(path, F_OK) != 0) { return at; }
    int32_t header[HEADER_WORDS];
    long size;
    static const int versions[] = {SHARD_VERSION};
    FILE *f = open_with_header(path, header, SHARD_MAGIC, versions, 1, "shard", &size);
    for (int i = 0; i < header[2]; i++) {
        uint16_t token;
        fread_check(&token, sizeof(token), 1, f, path);
        size_t len = 1;
        const unsigned char *piece = bytes ? (const unsigned char *)&token : tokenizer_decode(&gpt2, token, &len);
        if (!bytes && token == tokenizer_eot(&gpt2)) { continue; }
        if (piece == NULL || at + len > cap) { abort(); }
        memcpy(out + at, piece, len);
        at += len;
    }
    fclose(f);
    return at;
}

static void text_to_shards(const uint8_t *data, size_t size) {
    if (size < 1) { return; }
    int flags = data[0], bytes = flags & 1, split = (flags & 4) && !bytes;
    char input[4096], prefix[4096], train[4200], val[4200];
    fuzz_path(input, sizeof(input), "input.txt");
    fuzz_path(prefix, sizeof(prefix), "shards");
    snprintf(train, sizeof(train), "%s_train.bin", prefix);
    snprintf(val, sizeof(val), "%s_val.bin", prefix);
    remove(train);
    remove(val);
    char stale[4200];
    snprintf(stale, sizeof(stale), "%s_train_000.bin", prefix);
    remove(stale);
    if (flags & 16) { fuzz_write_file(stale, (const uint8_t *)"stale", 5); }
    fuzz_write_file(input, data + 1, size - 1);
    const char *inputs[1] = {input};
    ShardOptions o = {.inputs = inputs, .ninputs = 1, .prefix = prefix, .split_line = split ? "---" : NULL,
                      .vocab = bytes ? "bytes" : "gpt2", .tokenizer_path = SMALL_TOKENIZER,
                      .val_frac = (flags & 8) ? 0.0 : 0.1, .eot = (flags & 2) && !bytes, .bpe_tokens = 4096,
                      .shard_tokens = 100000000};
    make_shards(&o);
    if (access(stale, F_OK) == 0 || access(train, F_OK) != 0) { abort(); }  // one run's set, published
    if (split) { return; }
    unsigned char *decoded = (unsigned char *)malloc_check(size);
    size_t n = decode_shard(train, bytes, decoded, 0, size);
    n = decode_shard(val, bytes, decoded, n, size);
    if (n != size - 1 || memcmp(decoded, data + 1, n) != 0) { abort(); }
    free(decoded);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (gpt2.vocab_size == 0) {  // for decoding, loaded once
        tokenizer_init(&gpt2, SMALL_TOKENIZER);
        fuzz_keep_all();
    }
    int accepted = fuzz_run(text_to_shards, data, size);
    char pattern[4200];  // never a temporary file left, whatever the outcome
    fuzz_path(pattern, sizeof(pattern), "shards*.tmp");
    glob_t g;
    if (glob(pattern, 0, NULL, &g) == 0) { abort(); }
    if (!accepted && size > 0 && (data[0] & 16)) {  // a refused run removes nothing of the earlier files
        char stale[4200];
        fuzz_path(stale, sizeof(stale), "shards_train_000.bin");
        if (access(stale, F_OK) != 0) { abort(); }
    }
    return 0;
}
