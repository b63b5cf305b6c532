/*
test_tokenizer: checks tokenizer.h against GPT-2's known encodings, and the vocabularies bpe.h trains.

    DATA_DIR=folder/with/tinyshakespeare.txt+kjv.txt test_tokenizer [tokenizer.bin]

DATA_DIR must hold tinyshakespeare.txt and kjv.txt for the golden token counts; without it
those checks fail, unless SKIP_DATA_TESTS=1 is set, which skips them visibly.
Prints one line per check and ends with "N passed, M failed"; exits 1 if any check failed.
Refusing a bad tokenizer.bin ends the process with exit(1), so those checks run in a child process.
*/
#define _DEFAULT_SOURCE  // mkdtemp, fork, pipe
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

#include "../dtopp/bpe.h"
#include "../dtopp/tokenizer.h"

static Tokenizer tok;


static void load(const void *path) {
    Tokenizer t;
    tokenizer_init(&t, path);
    tokenizer_free(&t);
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)size + 1);
    if (fread(buf, 1, (size_t)size, f) != (size_t)size) { fclose(f); free(buf); return NULL; }
    fclose(f);
    *len = (size_t)size;
    return buf;
}

static void write_file(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, len, f) != len || fclose(f) != 0) { perror(path); exit(1); }
}

// decode(encode(text)) == text, and all ids valid
static int round_trip(const char *text, size_t len, size_t *ntok) {
    size_t n;
    int *ids = tokenizer_encode(&tok, text, len, &n);
    char *back = malloc(len + 1);
    size_t pos = 0;
    int ok = 1;
    for (size_t i = 0; i < n && ok; i++) {
        size_t l;
        const unsigned char *b = tokenizer_decode(&tok, ids[i], &l);
        ok = b != NULL && ids[i] < tokenizer_eot(&tok) && pos + l <= len;
        if (ok) { memcpy(back + pos, b, l); pos += l; }
    }
    ok = ok && pos == len && memcmp(back, text, len) == 0;
    free(back);
    free(ids);
    if (ntok) *ntok = n;
    return ok;
}

// the pieces of the pre-tokenizer, joined with '|', to check the regex by hand
static void pieces(const char *s, char *out) {
    size_t n = strlen(s), pos = 0;
    out[0] = 0;
    while (pos < n) {
        size_t l = pretokenize_next((const unsigned char *)s + pos, n - pos);
        if (pos > 0) strcat(out, "|");
        strncat(out, s + pos, l);
        pos += l;
    }
}

static void check_pieces(const char *text, const char *expect) {
    char got[1024];
    pieces(text, got);
    check(strcmp(got, expect) == 0, "pre-tokenizes \"%s\" as %s (got %s)", text, expect, got);
}

static void check_file(const char *dir, const char *name, size_t expect_tokens, const int *first, int nfirst) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    size_t len, n;
    char *text = read_file(path, &len);
    if (!text) { check(0, "%s: cannot read %s", name, path); return; }
    int *ids = tokenizer_encode(&tok, text, len, &n);
    int ok = n == expect_tokens;
    for (int i = 0; i < nfirst && ok; i++) ok = ids[i] == first[i];
    check(ok, "%s encodes to %zu tokens%s (got %zu)", name, expect_tokens, nfirst ? " starting 5962 22307 25 198 ..." : "", n);
    check(round_trip(text, len, NULL), "%s: decode(encode(x)) == x", name);
    free(ids);
    free(text);
}

// a text of made-up words from a few syllables, most of them frequent, some rare, with punctuation,
// digits and a little UTF-8: enough pairs to fill a vocabulary of a few hundred tokens
static char *made_up_text(size_t *len) {
    static const char *syllables[] = {"ka", "lo", "mi", "ren", "tha", "su", "vor", "é", "ing", "qu"};
    size_t cap = 200000, n = 0;
    char *text = malloc(cap);
    uint64_t rng = 7;
    while (n + 64 < cap) {
        int nsyl = 1 + (int)(random_u64(&rng) % 3);
        text[n++] = ' ';
        for (int i = 0; i < nsyl; i++) {
            uint64_t r = random_u64(&rng) % 100;
            const char *syl = syllables[r < 60 ? r % 4 : r % 10];
            memcpy(text + n, syl, strlen(syl));
            n += strlen(syl);
        }
        uint64_t r = random_u64(&rng) % 20;
        if (r == 0) n += (size_t)sprintf(text + n, ", %d", (int)(random_u64(&rng) % 1000));
        if (r == 1) text[n++] = '\n';
        if (r == 2) text[n++] = '.';
    }
    *len = n;
    return text;
}

// bpe.h: the trained file loads as a BPE vocabulary, encodes the training text into exactly as many
// tokens as training left it in, decodes back, and training is deterministic
static void check_trained_vocabulary(const char *dir) {
    size_t len;
    char *text = made_up_text(&len);
    char path_a[600], path_b[600];
    snprintf(path_a, sizeof path_a, "%s/bpe_a.bin", dir);
    snprintf(path_b, sizeof path_b, "%s/bpe_b.bin", dir);
    int64_t corpus_tokens = 0;
    int merges = 0;
    for (int run = 0; run < 2; run++) {
        BpeTrainer b;
        bpe_init(&b);
        bpe_add_text(&b, text, len / 2);  // two documents: pieces never span them
        bpe_add_text(&b, text + len / 2, len - len / 2);
        bpe_train(&b, 400);
        bpe_save(&b, run == 0 ? path_a : path_b);
        corpus_tokens = b.corpus_tokens;
        merges = b.num_merges;
        bpe_free(&b);
    }
    size_t la, lb;
    char *a = read_file(path_a, &la), *b = read_file(path_b, &lb);
    check(a && b && la == lb && memcmp(a, b, la) == 0, "bpe: training twice writes the same file (%zu bytes)", la);
    free(a);
    free(b);
    Tokenizer trained;
    tokenizer_init(&trained, path_a);
    check(trained.vocab_kind == VOCAB_BPE && merges == 143 && tokenizer_vocab_size(&trained) == 400 &&
              tokenizer_eot(&trained) == 399,
          "bpe: a 400-token vocabulary of kind bpe: 256 bytes, %d merges, end-of-text 399", merges);
    size_t n1, n2, n_eot;
    int *ids1 = tokenizer_encode(&trained, text, len / 2, &n1);
    int *ids2 = tokenizer_encode(&trained, text + len / 2, len - len / 2, &n2);
    check((int64_t)(n1 + n2) == corpus_tokens && corpus_tokens < (int64_t)len / 2,
          "bpe: encoding the training text gives the %lld tokens training ended with (from %zu bytes)",
          (long long)corpus_tokens, len);
    Tokenizer saved = tok;
    tok = trained;
    check(round_trip(text, len, NULL), "bpe: decode(encode(x)) == x with the trained vocabulary");
    tok = saved;
    const unsigned char *eot = tokenizer_decode(&trained, 399, &n_eot);
    check(n_eot == 13 && memcmp(eot, "<|endoftext|>", 13) == 0, "bpe: end-of-text decodes to <|endoftext|>");
    free(ids1);
    free(ids2);
    tokenizer_free(&trained);
    free(text);
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "tokenizer.bin";
    tokenizer_init(&tok, path);
    check(tokenizer_vocab_size(&tok) == 50257 && tokenizer_eot(&tok) == 50256, "vocabulary 50257, end-of-text 50256");
    size_t len;
    const unsigned char *b = tokenizer_decode(&tok, 50256, &len);
    check(len == 13 && memcmp(b, "<|endoftext|>", 13) == 0, "token 50256 decodes to <|endoftext|>");
    b = tokenizer_decode(&tok, 15496, &len);
    check(len == 5 && memcmp(b, "Hello", 5) == 0, "token 15496 decodes to Hello");
    check(tokenizer_decode(&tok, 50257, &len) == NULL && len == 0 && tokenizer_decode(&tok, -1, &len) == NULL,
          "decoding an id out of range gives NULL");

    size_t n;
    int *ids = tokenizer_encode(&tok, "Hello world", 11, &n);
    check(n == 2 && ids[0] == 15496 && ids[1] == 995, "\"Hello world\" -> [15496, 995]");
    free(ids);
    ids = tokenizer_encode(&tok, "", 0, &n);
    check(n == 0, "empty text -> no tokens");
    free(ids);
    ids = tokenizer_encode(&tok, "<|endoftext|>", 13, &n);
    check(n > 1, "\"<|endoftext|>\" in the text is plain text, not the special token (%zu tokens)", n);
    free(ids);

    // the regex, alternative by alternative
    check_pieces("Hello world", "Hello| world");
    check_pieces("it's we're they've I'm you'll he'd don't", "it|'s| we|'re| they|'ve| I|'m| you|'ll| he|'d| don|'t");
    check_pieces("IT'S 'sup ''s", "IT|'|S| '|sup| ''|s");  // only lowercase contractions
    check_pieces("abc123 4x", "abc|123| 4|x");
    check_pieces("a   b", "a|  | b");
    check_pieces("a\n\n b\t\tc", "a|\n\n| b|\t|\t|c");  // only U+0020 may lead a word
    check_pieces("end  \n", "end|  \n");
    check_pieces("x!!! ...y", "x|!!!| ...|y");
    check_pieces("caf\xc3\xa9 \xce\xb1\xce\xb2 \xe4\xb8\xad\xe6\x96\x87", "caf\xc3\xa9| \xce\xb1\xce\xb2| \xe4\xb8\xad\xe6\x96\x87");
    check_pieces("x\xc2\xb2 \xe2\x85\xab \xd9\xa3", "x|\xc2\xb2| \xe2\x85\xab| \xd9\xa3");  // x² Ⅻ ٣: numbers
    check_pieces("a\xc2\xa0\xc2\xa0" "b", "a|\xc2\xa0|\xc2\xa0|b");  // NBSP is \s
    // U+0085 is \s in Python's regex (Unicode White_Space), U+FEFF is not (JavaScript differs on both)
    check_pieces("x \xc2\x85y", "x| |\xc2\x85|y");
    check_pieces("x \xef\xbb\xbfy", "x| \xef\xbb\xbf|y");
    check_pieces("a\xff\xfe b\x80", "a|\xff\xfe| b|\x80");  // bytes that are not UTF-8 are like punctuation

    // round trips
    const char *tricky = "Caf\xc3\xa9 na\xc3\xafve \xce\x9a\xce\xb1\xce\xbb\xce\xb7\xce\xbc\xce\xad\xcf\x81\xce\xb1 "
                         "\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e "
                         "\xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x91\xa7 \xf0\x9f\x87\xab\xf0\x9f\x87\xb7 "
                         "\xd9\xa0\xd9\xa1\xd9\xa2 x\xc2\xb2 \xe2\x85\xab  \t\n\n  It's DON'T\n   ";
    int ok = round_trip(tricky, strlen(tricky), &n);
    check(ok, "decode(encode(x)) == x on a tricky UTF-8 text (%zu tokens)", n);
    const char invalid[] = "ok \xff\xfe bad \xc0\x80 overlong \xed\xa0\x80 surrogate \xf4\x90\x80\x80 too big \x80\x80 cont "
                           "\xe2\x82 cut \xf0\x9f\x98";
    ok = round_trip(invalid, sizeof invalid - 1, &n);
    check(ok, "invalid UTF-8 is encoded and decodes back unchanged (%zu tokens)", n);
    unsigned long long rng = 1;
    int fuzz_ok = 1;
    char buf[4096];
    for (int i = 0; i < 300; i++) {
        size_t l = (size_t)(i * 13 % 4000);
        for (size_t j = 0; j < l; j++) {
            rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
            unsigned char c = (unsigned char)(rng >> 56);
            // mix plain bytes with letters, spaces and apostrophes so all paths are exercised
            buf[j] = (char)(i % 3 == 0 ? c : (c < 64 ? ' ' : c < 96 ? '\'' : c < 200 ? 'a' + c % 26 : c));
        }
        fuzz_ok &= round_trip(buf, l, NULL);
    }
    check(fuzz_ok, "decode(encode(x)) == x on 300 random byte strings");
    size_t big = 1 << 20;
    char *same = malloc(big);
    memset(same, 'a', big);
    ok = round_trip(same, big, &n);
    check(ok, "1 MB of one letter (one piece of 1 MB): %zu tokens", n);
    memset(same, ' ', big);
    ok = round_trip(same, big, &n);
    check(ok, "1 MB of spaces: %zu tokens", n);
    free(same);

    // golden values on real text
    const char *dir = getenv("DATA_DIR");
    const char *skip = getenv("SKIP_DATA_TESTS");
    if (dir && *dir) {
        static const int first[] = {5962, 22307, 25, 198, 8421, 356, 5120, 597};
        check_file(dir, "tinyshakespeare.txt", 338025, first, 8);
        check_file(dir, "kjv.txt", 1024544, NULL, 0);
    } else if (skip && strcmp(skip, "1") == 0) {
        printf("skip golden counts on tinyshakespeare.txt and kjv.txt: DATA_DIR is not set (SKIP_DATA_TESTS=1)\n");
    } else {
        check(0, "golden counts on tinyshakespeare.txt and kjv.txt: DATA_DIR is not set (set SKIP_DATA_TESTS=1 to skip)");
    }

    // a bad tokenizer.bin is refused with a message naming the file
    const char *tmp = getenv("TMPDIR");
    char dirbuf[256], bad[512];
    snprintf(dirbuf, sizeof dirbuf, "%s/test_tokenizer_XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(dirbuf)) { perror("mkdtemp"); return 1; }
    size_t flen;
    char *file = read_file(path, &flen);
    snprintf(bad, sizeof bad, "%s/missing.bin", dirbuf);
    check_refuses("a missing file", load, bad, "missing.bin: No such file");
    snprintf(bad, sizeof bad, "%s/empty.bin", dirbuf);
    write_file(bad, file, 0);
    check_refuses("an empty file", load, bad, "empty.bin is too short");
    snprintf(bad, sizeof bad, "%s/truncated.bin", dirbuf);
    write_file(bad, file, flen - 1000);
    check_refuses("a truncated file", load, bad, "truncated.bin is truncated");
    snprintf(bad, sizeof bad, "%s/magic.bin", dirbuf);
    file[0] ^= 1;
    write_file(bad, file, flen);
    check_refuses("a wrong magic number", load, bad, "magic.bin is not a tokenizer file");
    file[0] ^= 1;
    snprintf(bad, sizeof bad, "%s/version.bin", dirbuf);
    file[4] = 3;
    write_file(bad, file, flen);
    check_refuses("a wrong version", load, bad, "version.bin: unsupported tokenizer file");
    file[4] = 2;
    snprintf(bad, sizeof bad, "%s/kind.bin", dirbuf);
    file[24] = 7;  // word 6, the vocabulary kind
    write_file(bad, file, flen);
    check_refuses("an unknown vocabulary kind", load, bad, "kind.bin: unknown vocabulary kind 7");
    file[24] = VOCAB_GPT2;
    snprintf(bad, sizeof bad, "%s/merges.bin", dirbuf);
    int32_t merges, huge = 0x7fffffdd;  // word 4, the number of merges: 256 + huge overflows an int
    memcpy(&merges, file + 16, 4);
    memcpy(file + 16, &huge, 4);
    write_file(bad, file, flen);
    check_refuses("a merge count near INT_MAX", load, bad, "merges.bin: header holds inconsistent sizes");
    memcpy(file + 16, &merges, 4);
    snprintf(bad, sizeof bad, "%s/corrupt.bin", dirbuf);
    file[flen - 100] ^= 0x20;  // one byte of a token's text
    write_file(bad, file, flen);
    check_refuses("a corrupted token", load, bad, "corrupt.bin: a merged token");
    check_trained_vocabulary(dirbuf);
    const char *names[] = {"empty.bin", "truncated.bin", "magic.bin", "version.bin", "kind.bin", "merges.bin",
                           "corrupt.bin", "bpe_a.bin", "bpe_b.bin"};
    for (int i = 0; i < 9; i++) {
        snprintf(bad, sizeof bad, "%s/%s", dirbuf, names[i]);
        remove(bad);
    }
    rmdir(dirbuf);
    free(file);
    tokenizer_free(&tok);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
