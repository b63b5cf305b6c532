/*
tokenizer.h: GPT-2's byte-level BPE tokenizer, encoder and decoder, in plain C.

Everything comes from tokenizer.bin (written by tools/make_tokenizer, format in doc/tokenizer.md):
the bytes of every token, for decoding, and the ordered list of merges, for encoding.

Encoding follows OpenAI's original GPT-2 encoder.py exactly, in two steps.
1. Pre-tokenization splits the text into pieces with the regex
       's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
   which we implement by hand (pretokenize_next below) with the Unicode classes of
   unicode_tables.h. Bytes that are not valid UTF-8 count as single characters of no class
   (like punctuation), so any input can be encoded and decode(encode(x)) == x for every x.
2. Each piece, as bytes, starts as one token per byte and is merged by BPE: repeatedly, the
   adjacent pair whose merge has the lowest rank (comes first in vocab.bpe) is merged, leftmost
   first, until no adjacent pair can be merged. Merge of rank r makes token 256 + r.
Special tokens are never produced by the encoder: "<|endoftext|>" in the text is plain text.

    Tokenizer t;
    tokenizer_init(&t, "tokenizer.bin");
    size_t n;
    int *ids = tokenizer_encode(&t, text, strlen(text), &n);   // free(ids) when done
    size_t len;
    const unsigned char *bytes = tokenizer_decode(&t, ids[0], &len);
    tokenizer_free(&t);

Note that one token may hold part of a UTF-8 character: to print text, write out the bytes of the
tokens one after the other.
*/
#ifndef TOKENIZER_H
#define TOKENIZER_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "utils.h"  // defines: fail, checked memory and file I/O, file headers

#include "unicode_tables.h"  // defines: the Unicode letter, number and space classes

#define TOKENIZER_VERSION 2  // version 2 added the vocabulary kind (word 6); version 1 is GPT-2's

typedef struct {
    uint32_t key;  // tokenizer_pair_key_(left, right), TOKENIZER_EMPTY if the slot is empty
    int32_t id;   // the token the merge makes; its rank is id - 256
} TokenizerMerge;

typedef struct {
    int vocab_kind;             // VOCAB_GPT2, or VOCAB_BPE for a vocabulary trained by bpe.h
    int vocab_size;             // 50257 for GPT-2
    int eot;                    // the end-of-text token, 50256 for GPT-2
    int num_merges;             // 50000 for GPT-2
    unsigned char *token_bytes; // bytes of all tokens, concatenated
    uint32_t *token_offset;     // token i is token_bytes[token_offset[i] .. token_offset[i+1])
    int byte_to_id[256];        // the single-byte token of every byte value
    TokenizerMerge *merges;     // hash table of merges (open addressing), merge_mask + 1 slots
    uint32_t merge_mask;
    uint64_t vocab_hash;        // tokenizer_vocab_hash of the file: which vocabulary this is
} Tokenizer;

// The identity of a vocabulary (doc/formats.md): FNV-1a 64 over header words 2-5 of its tokenizer
// file (V, end-of-text, merges, total bytes) and its payload (merges, token lengths, token bytes),
// never 0. Models and shards record it, so that a tokenizer of another corpus is refused. Chained:
// pass the previous value as h, starting from TOKENIZER_HASH_START.
#define TOKENIZER_HASH_START 14695981039346656037ull
static uint64_t tokenizer_vocab_hash(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    for (size_t i = 0; i < n; i++) { h = (h ^ p[i]) * 1099511628211ull; }
    return h != 0 ? h : 1;
}

// Token ids are below 65535 in a merge (the last id of a vocabulary of at most 65536 is the
// end-of-text token), so a pair packs into 32 bits without overflow and never equals the empty
// marker. Unsigned: left * 65536 overflows an int32 for left >= 32768.
#define TOKENIZER_EMPTY 0xFFFFFFFFu
static uint32_t tokenizer_pair_key_(int left, int right) { return (uint32_t)left << 16 | (uint32_t)right; }

static uint32_t tokenizer_hash_pair_(uint32_t key) {
    return key * 2654435761u;  // Knuth's multiplicative hash
}

// the token made by merging left and right, or -1 if they do not merge
static int tokenizer_merge_(const Tokenizer *t, int left, int right) {
    uint32_t key = tokenizer_pair_key_(left, right);
    for (uint32_t h = tokenizer_hash_pair_(key) & t->merge_mask;; h = (h + 1) & t->merge_mask) {
        if (t->merges[h].key == key) return t->merges[h].id;
        if (t->merges[h].key == TOKENIZER_EMPTY) return -1;
    }
}

void tokenizer_init(Tokenizer *t, const char *path) {
    memset(t, 0, sizeof *t);
    static const int versions[] = {1, TOKENIZER_VERSION};
    int32_t h[HEADER_WORDS];
    long file_bytes;
    FILE *f = open_with_header(path, h, TOKENIZER_MAGIC, versions, 2, "tokenizer file (tokenizer.bin)",
                               &file_bytes);
    int V = h[2], eot = h[3], M = h[4], total = h[5], kind = h[1] == 1 ? VOCAB_GPT2 : h[6];
    if (kind != VOCAB_GPT2 && kind != VOCAB_BPE) fail("%s: unknown vocabulary kind %d", path, kind);
    // token ids must fit the uint16 of the token shards; merges come after the 256 bytes and
    // before the special tokens, and end-of-text is a special token
    if (V < 257 || V > 65536 || M < 0 || M >= V - 256 || eot < 256 + M || eot >= V || total < V)
        fail("%s: header holds inconsistent sizes", path);
    check_payload_size(path, file_bytes, 8 * (size_t)M + (size_t)V + (size_t)total);

    int32_t *pairs = (int32_t *)malloc(sizeof(int32_t) * 2 * (size_t)(M > 0 ? M : 1));
    unsigned char *lens = (unsigned char *)malloc((size_t)V);
    t->token_bytes = (unsigned char *)malloc((size_t)total);
    t->token_offset = (uint32_t *)malloc(sizeof(uint32_t) * ((size_t)V + 1));
    if (!pairs || !lens || !t->token_bytes || !t->token_offset) fail("%s: out of memory", path);
    if (fread(pairs, sizeof(int32_t), 2 * (size_t)M, f) != 2 * (size_t)M ||
        fread(lens, 1, (size_t)V, f) != (size_t)V ||
        fread(t->token_bytes, 1, (size_t)total, f) != (size_t)total)
        fail("%s: read error", path);
    fclose(f);
    uint64_t hash = tokenizer_vocab_hash(TOKENIZER_HASH_START, &h[2], 4 * sizeof(int32_t));
    hash = tokenizer_vocab_hash(hash, pairs, 2 * (size_t)M * sizeof(int32_t));
    hash = tokenizer_vocab_hash(tokenizer_vocab_hash(hash, lens, (size_t)V), t->token_bytes, (size_t)total);
    uint64_t stored = h[1] == 1 ? 0 : (uint64_t)(uint32_t)h[7] | (uint64_t)(uint32_t)h[8] << 32;
    if (stored != 0 && stored != hash) fail("%s: its tokens do not match the vocabulary hash of its header", path);
    t->vocab_hash = hash;
    t->vocab_kind = kind;
    t->vocab_size = V;
    t->eot = eot;
    t->num_merges = M;
    t->token_offset[0] = 0;
    for (int i = 0; i < V; i++) t->token_offset[i + 1] = t->token_offset[i] + lens[i];
    if (t->token_offset[V] != (uint32_t)total)
        fail("%s: token lengths do not add up to the header's total", path);

    // the first 256 tokens are the 256 byte values, each exactly once
    for (int b = 0; b < 256; b++) t->byte_to_id[b] = -1;
    for (int i = 0; i < 256; i++) {
        int b = t->token_bytes[t->token_offset[i]];
        if (lens[i] != 1 || t->byte_to_id[b] != -1)
            fail("%s: tokens 0..255 are not the 256 single bytes", path);
        t->byte_to_id[b] = i;
    }
    // merge i joins two earlier tokens into token 256 + i, whose bytes must be theirs
    uint32_t size = 1;
    while (size < 2u * (uint32_t)M + 2) size *= 2;  // at most half full: short probe sequences
    t->merge_mask = size - 1;
    t->merges = (TokenizerMerge *)malloc(sizeof(TokenizerMerge) * size);
    if (!t->merges) fail("%s: out of memory", path);
    for (uint32_t i = 0; i < size; i++) t->merges[i].key = TOKENIZER_EMPTY;
    for (int i = 0; i < M; i++) {
        int a = pairs[2 * i], b = pairs[2 * i + 1], id = 256 + i;
        if (a < 0 || b < 0 || a >= id || b >= id) fail("%s: a merge refers to a later token", path);
        uint32_t la = lens[a], lb = lens[b];
        const unsigned char *tb = t->token_bytes;
        if (lens[id] != la + lb || memcmp(tb + t->token_offset[id], tb + t->token_offset[a], la) != 0 ||
            memcmp(tb + t->token_offset[id] + la, tb + t->token_offset[b], lb) != 0)
            fail("%s: a merged token's bytes are not those of its two halves", path);
        uint32_t key = tokenizer_pair_key_(a, b);
        uint32_t h = tokenizer_hash_pair_(key) & t->merge_mask;
        while (t->merges[h].key != TOKENIZER_EMPTY) {
            if (t->merges[h].key == key) fail("%s: the same merge appears twice", path);
            h = (h + 1) & t->merge_mask;
        }
        t->merges[h].key = key;
        t->merges[h].id = id;
    }
    free(pairs);
    free(lens);
}

int tokenizer_vocab_size(const Tokenizer *t) { return t->vocab_size; }
int tokenizer_eot(const Tokenizer *t) { return t->eot; }

// returns the raw bytes of token id (not NUL-terminated) and their count in *len;
// an id outside [0, vocab_size) gives NULL and *len = 0
const unsigned char *tokenizer_decode(const Tokenizer *t, int id, size_t *len) {
    if (id < 0 || id >= t->vocab_size) { *len = 0; return NULL; }
    *len = t->token_offset[id + 1] - t->token_offset[id];
    return t->token_bytes + t->token_offset[id];
}

void tokenizer_free(Tokenizer *t) {
    free(t->token_bytes);
    free(t->token_offset);
    free(t->merges);
    memset(t, 0, sizeof *t);
}

// ----------------------------------------------------------------------------
// step 1: pre-tokenization

enum { TOK_OTHER = 0, TOK_LETTER = 1, TOK_NUMBER = 2, TOK_SPACE = 3 };

// decodes the character at s[0..n), n >= 1: sets its class and returns its length in bytes.
// A byte that does not start a valid UTF-8 sequence (stray continuation byte, truncated or
// overlong sequence, surrogate, beyond U+10FFFF) is one character of class TOK_OTHER.
static int tokenizer_char_(const unsigned char *s, size_t n, int *cls) {
    unsigned c = s[0], cp;
    int len;
    if (c < 0x80) {
        // ASCII fast path: most text is ASCII
        if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') *cls = TOK_LETTER;
        else if (c >= '0' && c <= '9') *cls = TOK_NUMBER;
        else if (c == ' ' || (c >= 0x09 && c <= 0x0D)) *cls = TOK_SPACE;
        else *cls = TOK_OTHER;
        return 1;
    }
    if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; }
    else { *cls = TOK_OTHER; return 1; }
    if ((size_t)len > n) { *cls = TOK_OTHER; return 1; }
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) { *cls = TOK_OTHER; return 1; }
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) {
        *cls = TOK_OTHER;
        return 1;
    }
    // binary search in the sorted ranges; code points in no range are TOK_OTHER
    int lo = 0, hi = UNICODE_NUM_RANGES - 1;
    *cls = TOK_OTHER;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < unicode_ranges[mid].lo) hi = mid - 1;
        else if (cp > unicode_ranges[mid].hi) lo = mid + 1;
        else { *cls = (int)unicode_ranges[mid].cls; break; }
    }
    return len;
}

// the length in bytes of the regex match at s[0..n), n >= 1. The alternatives are tried in order
// and the first that matches wins (not the longest), exactly as the regex engine does.
static size_t pretokenize_next(const unsigned char *s, size_t n) {
    // 's|'t|'re|'ve|'m|'ll|'d  (lowercase only)
    if (s[0] == '\'' && n >= 2) {
        unsigned char c = s[1];
        if (c == 's' || c == 't' || c == 'm' || c == 'd') return 2;
        if (n >= 3 && ((c == 'r' && s[2] == 'e') || (c == 'v' && s[2] == 'e') || (c == 'l' && s[2] == 'l')))
            return 3;
    }
    int cls;
    size_t i = (size_t)tokenizer_char_(s, n, &cls);
    // ' ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+': a space may lead a run of any other class
    if (s[0] == ' ' && n > 1) {
        int next;
        size_t len = (size_t)tokenizer_char_(s + 1, n - 1, &next);
        if (next != TOK_SPACE) { cls = next; i = 1 + len; }
    }
    if (cls != TOK_SPACE) {
        // extend the run while the class stays the same
        while (i < n) {
            int c;
            size_t len = (size_t)tokenizer_char_(s + i, n - i, &c);
            if (c != cls) break;
            i += len;
        }
        return i;
    }
    // '\s+(?!\S)|\s+': the whole run of whitespace if it ends the text, else all but its last
    // character (which then leads the next piece, e.g. " world"), but at least one character
    size_t last = 0;  // start of the run's last character
    while (i < n) {
        int c;
        size_t len = (size_t)tokenizer_char_(s + i, n - i, &c);
        if (c != TOK_SPACE) break;
        last = i;
        i += len;
    }
    if (i == n || last == 0) return i;
    return last;
}

// ----------------------------------------------------------------------------
// step 2: byte pair encoding of one piece

// A candidate merge in the heap: merging symbol `pos` with its right neighbour makes token `id`.
// Smaller id = lower rank = merged first; on ties the leftmost (smaller pos) goes first.
typedef struct { int32_t id, pos; } TokenizerCand;

static int tokenizer_cand_less_(TokenizerCand a, TokenizerCand b) {
    return a.id < b.id || (a.id == b.id && a.pos < b.pos);
}

static void tokenizer_heap_push_(TokenizerCand *heap, int *n, TokenizerCand c) {
    int i = (*n)++;
    while (i > 0 && tokenizer_cand_less_(c, heap[(i - 1) / 2])) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = c;
}

static TokenizerCand tokenizer_heap_pop_(TokenizerCand *heap, int *n) {
    TokenizerCand top = heap[0], last = heap[--(*n)];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && tokenizer_cand_less_(heap[c + 1], heap[c])) c++;
        if (!tokenizer_cand_less_(heap[c], last)) break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = last;
    return top;
}

// BPE of the n bytes at s; writes the tokens to out (room for n) and returns their count.
// work must have room for 9*n ints. The symbols form a linked list over the byte positions
// (a merged symbol lives at the position of its first byte); a heap holds the candidate merges,
// which lets long pieces (a megabyte of one letter) take O(n log n) rather than O(n^2).
// Heap entries are not removed when a merge invalidates them; they are checked when popped.
static size_t tokenizer_bpe_(const Tokenizer *t, const unsigned char *s, size_t n, int *out, int *work) {
    int *id = work, *next = work + n, *prev = work + 2 * n;
    TokenizerCand *heap = (TokenizerCand *)(work + 3 * n);  // pushes: n - 1, then at most 2 per merge: < 3n
    int nheap = 0;
    for (size_t i = 0; i < n; i++) {
        id[i] = t->byte_to_id[s[i]];
        next[i] = i + 1 < n ? (int)i + 1 : -1;
        prev[i] = (int)i - 1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        int m = tokenizer_merge_(t, id[i], id[i + 1]);
        if (m >= 0) tokenizer_heap_push_(heap, &nheap, (TokenizerCand){m, (int)i});
    }
    while (nheap > 0) {
        TokenizerCand c = tokenizer_heap_pop_(heap, &nheap);
        int r = next[c.pos];
        // stale if the symbol was absorbed into its left neighbour (id -1) or changed
        if (id[c.pos] < 0 || r < 0 || tokenizer_merge_(t, id[c.pos], id[r]) != c.id) continue;
        id[c.pos] = c.id;
        id[r] = -1;
        next[c.pos] = next[r];
        if (next[r] >= 0) prev[next[r]] = c.pos;
        int p = prev[c.pos], q = next[c.pos], m;
        if (p >= 0 && (m = tokenizer_merge_(t, id[p], c.id)) >= 0)
            tokenizer_heap_push_(heap, &nheap, (TokenizerCand){m, p});
        if (q >= 0 && (m = tokenizer_merge_(t, c.id, id[q])) >= 0)
            tokenizer_heap_push_(heap, &nheap, (TokenizerCand){m, c.pos});
    }
    size_t k = 0;
    for (int i = 0; i >= 0; i = next[i]) out[k++] = id[i];
    return k;
}

// ----------------------------------------------------------------------------
// encoding a text

// Real text repeats the same words over and over, so tokenizer_encode remembers the tokens of
// every piece it has seen: a hash table whose entries point at the first occurrence of the piece
// in the text and of its tokens in the output. It lives only for one call, so the Tokenizer stays
// read-only and may be shared between threads.
typedef struct { size_t text_off, out_off; uint32_t text_len, ntok, hash; } TokenizerCacheEntry;

static uint32_t tokenizer_hash_bytes_(const unsigned char *s, size_t n) {
    uint32_t h = 2166136261u;  // FNV-1a
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 16777619u;
    return h | 1;              // 0 marks an empty slot
}

int *tokenizer_encode(const Tokenizer *t, const char *text, size_t len, size_t *n_tokens) {
    const unsigned char *s = (const unsigned char *)text;
    size_t cap = len / 3 + 16, n = 0;  // English averages about 4 bytes per token
    int *out = (int *)malloc_check(cap * sizeof(int));
    size_t work_cap = 64;
    int *work = (int *)malloc_check(9 * work_cap * sizeof(int));
    size_t cache_size = 1024, cache_used = 0;
    TokenizerCacheEntry *cache = (TokenizerCacheEntry *)calloc_check(cache_size, sizeof *cache);

    for (size_t pos = 0; pos < len;) {
        size_t plen = pretokenize_next(s + pos, len - pos);
        if (plen > INT32_MAX / 9) {  // the BPE below indexes a piece's bytes with ints
            fail("a single piece of text (one word or run of spaces) of %zu bytes is too long to tokenize",
                 plen);
        }
        if (n + plen > cap) {  // a piece never has more tokens than bytes
            cap = 2 * (n + plen);
            out = (int *)realloc_check(out, cap * sizeof(int));
        }
        uint32_t h = tokenizer_hash_bytes_(s + pos, plen);
        size_t slot = h & (cache_size - 1);
        while (cache[slot].hash != 0 && !(cache[slot].hash == h && cache[slot].text_len == plen &&
                                          memcmp(s + cache[slot].text_off, s + pos, plen) == 0))
            slot = (slot + 1) & (cache_size - 1);
        if (cache[slot].hash != 0) {  // seen before: copy its tokens
            memcpy(out + n, out + cache[slot].out_off, cache[slot].ntok * sizeof(int));
            n += cache[slot].ntok;
            pos += plen;
            continue;
        }
        if (plen > work_cap) {
            work_cap = 2 * plen;
            free(work);
            work = (int *)malloc_check(9 * work_cap * sizeof(int));
        }
        size_t k = tokenizer_bpe_(t, s + pos, plen, out + n, work);
        cache[slot] = (TokenizerCacheEntry){pos, n, (uint32_t)plen, (uint32_t)k, h};
        if (2 * ++cache_used > cache_size) {  // keep it at most half full: rehash into twice the size
            TokenizerCacheEntry *old = cache;
            size_t old_size = cache_size;
            cache_size *= 2;
            cache = (TokenizerCacheEntry *)calloc_check(cache_size, sizeof *cache);
            for (size_t i = 0; i < old_size; i++) {
                if (old[i].hash == 0) continue;
                size_t j = old[i].hash & (cache_size - 1);
                while (cache[j].hash != 0) j = (j + 1) & (cache_size - 1);
                cache[j] = old[i];
            }
            free(old);
        }
        n += k;
        pos += plen;
    }
    free(cache);
    free(work);
    *n_tokens = n;
    return out;
}

#endif
