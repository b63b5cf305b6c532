// fuzz_tokenizer: a tokenizer file; once accepted, it must encode and decode text exactly:
// decode(encode(x)) == x for a text that exercises every class of the pre-tokenizer.
#include "fuzz.h"
#include "../dtopp/tokenizer.h"

static void load_tokenizer(const uint8_t *data, size_t size) {
    char path[4096];
    fuzz_path(path, sizeof(path), "tokenizer.bin");
    fuzz_write_file(path, data, size);
    Tokenizer t;
    tokenizer_init(&t, path);
    static const char text[] = "Hello world's 123  numbers,\n\tand \xc3\xa9t\xc3\xa9 \xff\xfe bytes";
    size_t n, len, at = 0;
    int *ids = tokenizer_encode(&t, text, sizeof(text) - 1, &n);
    for (size_t i = 0; i < n; i++) {
        const unsigned char *bytes = tokenizer_decode(&t, ids[i], &len);
        if (bytes == NULL || at + len > sizeof(text) - 1 || memcmp(bytes, text + at, len) != 0) { abort(); }
        at += len;
    }
    if (at != sizeof(text) - 1) { abort(); }
    free(ids);
    tokenizer_free(&t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_run(load_tokenizer, data, size);
    return 0;
}
