// fuzz_encoder: GPT-2's encoder on arbitrary bytes (tokenizer.bin of the repository, found from the
// working directory or DTOPP_TOKENIZER): every id in the vocabulary, and decode(encode(x)) == x.
#include "fuzz.h"
#include "../dtopp/tokenizer.h"

static Tokenizer gpt2;

static void round_trip(const uint8_t *data, size_t size) {
    size_t n, len, at = 0;
    int *ids = tokenizer_encode(&gpt2, (const char *)data, size, &n);
    if (n > size) { abort(); }  // never more tokens than bytes
    for (size_t i = 0; i < n; i++) {
        const unsigned char *bytes = tokenizer_decode(&gpt2, ids[i], &len);
        if (bytes == NULL || ids[i] == tokenizer_eot(&gpt2) || at + len > size || memcmp(bytes, data + at, len) != 0) {
            abort();
        }
        at += len;
    }
    if (at != size) { abort(); }
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (gpt2.vocab_size == 0) {  // loaded once, outside the tracked allocations of each input
        const char *path = getenv("DTOPP_TOKENIZER") ? getenv("DTOPP_TOKENIZER") : "tokenizer.bin";
        tokenizer_init(&gpt2, path);
        fuzz_keep_all();
    }
    fuzz_run(round_trip, data, size);
    return 0;
}
