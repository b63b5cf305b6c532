/*
make_tokenizer: converts GPT-2's BPE files into tokenizer.bin, the one file our encoder and decoder
need (format: doc/tokenizer.md).

    make_tokenizer vocab.bpe encoder.json tokenizer.bin

GPT-2 writes every token as a string of printable unicode characters, one character per byte
(the "byte-to-unicode" table of OpenAI's encoder.py, which avoids spaces and control characters
inside the files). We turn every token back into its raw bytes:
  - ids 0..255 are the 256 single bytes, in the order of that table;
  - line i of vocab.bpe after the "#version" line, "A B", is the merge of rank i, and makes the
    token A+B with id 256+i;
  - id 50256 is <|endoftext|>.
encoder.json (token string -> id) is not needed to build the table; we read it only to check that
every id it lists has exactly the bytes we derived, so a wrong input file cannot go unnoticed.
*/
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../dtopp/utils.h"
#define TOKENIZER_VERSION 2
#define MAX_VOCAB 65536

// the bytes of every token, concatenated; token i is tok_bytes[tok_off[i] .. tok_off[i+1])
static unsigned char *tok_bytes;
static size_t tok_cap, tok_used;
static size_t tok_off[MAX_VOCAB + 1];
static int ntok;

static void add_token(const unsigned char *b, size_t n) {
    if (ntok >= MAX_VOCAB) fail("%s: too many tokens", "vocab.bpe");
    if (tok_used + n > tok_cap) {
        tok_cap = 2 * (tok_used + n) + 4096;
        tok_bytes = realloc(tok_bytes, tok_cap);
        if (!tok_bytes) fail("%s: out of memory", "memory");
    }
    memcpy(tok_bytes + tok_used, b, n);
    tok_off[ntok] = tok_used;
    tok_used += n;
    tok_off[++ntok] = tok_used;
}

// hash table from token bytes to id, to look up the two halves of every merge
#define HSIZE (1 << 17)
static int htab[HSIZE];  // id + 1, 0 = empty

static uint32_t hash_bytes(const unsigned char *b, size_t n) {
    uint32_t h = 2166136261u;  // FNV-1a
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 16777619u;
    return h;
}

static int lookup(const unsigned char *b, size_t n, int insert_id) {
    for (uint32_t h = hash_bytes(b, n) & (HSIZE - 1);; h = (h + 1) & (HSIZE - 1)) {
        if (htab[h] == 0) {
            if (insert_id >= 0) htab[h] = insert_id + 1;
            return -1;
        }
        int id = htab[h] - 1;
        size_t len = tok_off[id + 1] - tok_off[id];
        if (len == n && memcmp(tok_bytes + tok_off[id], b, n) == 0) return id;
    }
}

// GPT-2's byte-to-unicode table: bytes that are printable keep their code point, the other 68
// bytes are mapped to 256, 257, ... in increasing order. order[i] = the byte of token i.
static int unicode_to_byte[324];
static int order[256];

static void init_byte_table(void) {
    int n = 0, extra = 0;
    for (int b = 0; b < 256; b++) unicode_to_byte[b] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        if (printable) { unicode_to_byte[b] = b; order[n++] = b; }
    }
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        if (!printable) { unicode_to_byte[256 + extra] = b; order[n++] = b; extra++; }
    }
}

// turns GPT-2's printable form (UTF-8 text) of a token into raw bytes; returns the length or -1
static int printable_to_bytes(const unsigned char *s, size_t n, unsigned char *out) {
    int len = 0;
    for (size_t i = 0; i < n;) {
        unsigned cp;
        if (s[i] < 0x80) { cp = s[i]; i += 1; }
        else if ((s[i] & 0xE0) == 0xC0 && i + 1 < n) { cp = ((s[i] & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu); i += 2; }
        else return -1;  // the table only uses code points below 324: at most 2 UTF-8 bytes
        if (cp >= 324 || unicode_to_byte[cp] < 0) return -1;
        out[len++] = (unsigned char)unicode_to_byte[cp];
    }
    return len;
}

static char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) fail("%s: cannot open", path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (size <= 0) fail("%s: empty file", path);
    char *buf = malloc((size_t)size + 1);
    if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size) fail("%s: cannot read", path);
    buf[size] = 0;
    fclose(f);
    *n = (size_t)size;
    return buf;
}

// appends the UTF-8 encoding of code point cp
static size_t put_utf8(unsigned cp, unsigned char *out) {
    if (cp < 0x80) { out[0] = (unsigned char)cp; return 1; }
    if (cp < 0x800) { out[0] = (unsigned char)(0xC0 | (cp >> 6)); out[1] = (unsigned char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | (cp >> 12)); out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F)); return 3;
    }
    out[0] = (unsigned char)(0xF0 | (cp >> 18)); out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F)); out[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

// checks encoder.json, a flat JSON object {"token": id, ...}, against the table we built
static void check_encoder_json(const char *path) {
    size_t n;
    char *js = read_file(path, &n);
    const char *p = js;
    int count = 0;
    unsigned char str[1024], raw[1024];
    while ((p = strchr(p, '"')) != NULL) {
        // read one JSON string key, undoing its escapes
        size_t len = 0;
        for (p++; *p != '"'; p++) {
            if (!*p || len + 4 > sizeof str) fail("%s: malformed JSON string", path);
            if (*p != '\\') { str[len++] = (unsigned char)*p; continue; }
            p++;
            if (*p == 'u') {
                unsigned cp = (unsigned)strtoul((char[]){p[1], p[2], p[3], p[4], 0}, NULL, 16);
                p += 4;
                if (cp >= 0xD800 && cp < 0xDC00 && p[1] == '\\' && p[2] == 'u') {  // surrogate pair
                    unsigned lo = (unsigned)strtoul((char[]){p[3], p[4], p[5], p[6], 0}, NULL, 16);
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    p += 6;
                }
                len += put_utf8(cp, str + len);
            } else {
                const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
                const char *e = strchr(from, *p);
                if (!*p || !e) fail("%s: bad escape in JSON string", path);
                str[len++] = (unsigned char)to[e - from];
            }
        }
        p++;
        while (*p == ' ' || *p == ':') p++;
        char *end;
        long id = strtol(p, &end, 10);
        if (end == p || id < 0 || id >= ntok) fail("%s: token id missing or out of range", path);
        p = end;
        int rawlen;
        if (id == ntok - 1) {  // <|endoftext|> is stored as plain text
            memcpy(raw, str, len);
            rawlen = (int)len;
        } else {
            rawlen = printable_to_bytes(str, len, raw);
        }
        size_t tlen = tok_off[id + 1] - tok_off[id];
        if (rawlen < 0 || (size_t)rawlen != tlen || memcmp(raw, tok_bytes + tok_off[id], tlen) != 0) {
            fail("%s: token %ld differs from the one built from vocab.bpe", path, id);
        }
        count++;
    }
    if (count != ntok) {
        fail("%s: lists %d tokens, vocab.bpe makes %d", path, count, ntok);
    }
    free(js);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: make_tokenizer vocab.bpe encoder.json tokenizer.bin\n");
        return 1;
    }
    const char *bpe_path = argv[1], *json_path = argv[2], *out_path = argv[3];
    init_byte_table();
    for (int i = 0; i < 256; i++) {
        unsigned char b = (unsigned char)order[i];
        add_token(&b, 1);
        lookup(&b, 1, i);
    }

    size_t n;
    char *bpe = read_file(bpe_path, &n);
    if (strncmp(bpe, "#version", 8) != 0) fail("%s: does not start with a #version line", bpe_path);
    char *line = strchr(bpe, '\n');
    int nmerges = 0;
    static int32_t merges[2 * MAX_VOCAB];
    unsigned char a[1024], b[1024];
    while (line && *++line) {
        char *eol = strchr(line, '\n');
        if (eol) *eol = 0;
        if (eol && eol > line && eol[-1] == '\r') eol[-1] = 0;
        char *sp = strchr(line, ' ');
        if (!sp || strchr(sp + 1, ' ') || strlen(line) >= sizeof a) {
            fail("%s: line %d is not a merge \"A B\"", bpe_path, nmerges + 2);
        }
        int na = printable_to_bytes((unsigned char *)line, (size_t)(sp - line), a);
        int nb = printable_to_bytes((unsigned char *)sp + 1, strlen(sp + 1), b);
        int ia = na > 0 ? lookup(a, (size_t)na, -1) : -1;
        int ib = nb > 0 ? lookup(b, (size_t)nb, -1) : -1;
        if (ia < 0 || ib < 0) {
            fail("%s: line %d merges a token that does not exist yet", bpe_path, nmerges + 2);
        }
        memcpy(a + na, b, (size_t)nb);
        if (lookup(a, (size_t)(na + nb), ntok) >= 0) {
            fail("%s: line %d makes a token that already exists", bpe_path, nmerges + 2);
        }
        if (na + nb > 255) fail("%s: a token is longer than 255 bytes", bpe_path);
        add_token(a, (size_t)(na + nb));
        merges[2 * nmerges] = ia;
        merges[2 * nmerges + 1] = ib;
        nmerges++;
        line = eol;
    }
    free(bpe);
    const char *eot = "<|endoftext|>";
    add_token((const unsigned char *)eot, strlen(eot));
    check_encoder_json(json_path);

    int32_t header[256] = {0};
    header[0] = TOKENIZER_MAGIC;
    header[1] = TOKENIZER_VERSION;
    header[2] = ntok;
    header[3] = ntok - 1;  // end-of-text
    header[4] = nmerges;
    header[5] = (int32_t)tok_used;
    header[6] = VOCAB_GPT2;
    unsigned char lens[MAX_VOCAB];
    for (int i = 0; i < ntok; i++) lens[i] = (unsigned char)(tok_off[i + 1] - tok_off[i]);
    FILE *f = fopen(out_path, "wb");
    if (!f) fail("%s: cannot open for writing", out_path);
    int ok = fwrite(header, sizeof header, 1, f) == 1
          && fwrite(merges, sizeof(int32_t), 2 * (size_t)nmerges, f) == 2 * (size_t)nmerges
          && fwrite(lens, 1, (size_t)ntok, f) == (size_t)ntok
          && fwrite(tok_bytes, 1, tok_used, f) == tok_used;
    if (fclose(f) != 0 || !ok) fail("%s: write failed", out_path);
    printf("make_tokenizer: wrote %s: %d tokens (%d merges, end-of-text %d), %zu token bytes\n",
           out_path, ntok, nmerges, ntok - 1, tok_used);
    return 0;
}
