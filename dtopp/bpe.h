/*
bpe.h: trains a small byte-level BPE vocabulary on a corpus and writes it as a tokenizer file that
tokenizer.h reads (format in doc/tokenizer.md, vocabulary kind VOCAB_BPE).

GPT-2's 50,257 tokens make the output layer the largest part of a small model, which a laptop
cannot afford; bytes make every word several predictions, most of them easy. A vocabulary of a few
thousand tokens trained on the corpus itself gives tokens that are mostly whole words or common
word pieces, at an output layer a CPU trains quickly. It is trained the way GPT-2's was:

1. The text is cut into pieces by GPT-2's pre-tokenization (pretokenize_next in tokenizer.h), so
   no token crosses a word boundary, and the distinct pieces are counted.
2. Every piece starts as its bytes (token b is byte b). Then, repeatedly, the adjacent pair of
   tokens that occurs most often over all pieces (each piece weighted by its count; on a tie the
   pair with the smaller ids) becomes a new token, and its occurrences in every piece are
   replaced, left to right. This stops when the vocabulary is full or no pair occurs twice.
3. The last token is end-of-text (decoded as "<|endoftext|>"). Merge i makes token 256 + i, so encoding with tokenizer.h,
   which applies the merges in that order, cuts every piece exactly as training left it.

    BpeTrainer b;
    bpe_init(&b);
    bpe_add_text(&b, text, len);            // every document; only the piece counts are kept
    bpe_train(&b, 4096);                    // 256 bytes + up to 3839 merges + end-of-text
    bpe_save(&b, "data/words_tokenizer.bin");
    bpe_free(&b);
*/
#ifndef BPE_H
#define BPE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"  // defines: Tokenizer, tokenizer_init, tokenizer_encode, tokenizer_decode
#include "utils.h"  // defines: fail, checked memory and file I/O, file headers

#define BPE_EOT_TEXT "<|endoftext|>"  // what the end-of-text token decodes to, as in GPT-2's vocabulary
#define BPE_MAX_TOKEN_BYTES 255       // the longest token the tokenizer file stores (an 8-bit length)

typedef struct {
    // the distinct pieces of the corpus: piece i occurs piece_count[i] times, and is now the
    // tokens piece_tokens[piece_start[i] .. piece_start[i] + piece_len[i])
    int npieces, pieces_cap;
    int64_t *piece_count;
    size_t *piece_start;
    int *piece_len;
    int *piece_tokens;
    size_t tokens_used, tokens_cap;
    uint32_t *piece_slot;   // hash table of the pieces' bytes (index + 1, 0 = empty), while counting
    uint32_t piece_mask;
    unsigned char *piece_bytes;  // piece i's bytes start at piece_start[i] here too
    // pair counts: open addressing over keys tokenizer_pair_key_(left, right)
    uint32_t *pair_key;
    int64_t *pair_count;
    uint32_t pair_mask, pairs_used;
    // the result
    int num_merges;
    int32_t *merges;        // merge i joins merges[2i] and merges[2i+1] into token 256 + i
    int64_t corpus_tokens;  // the corpus's length in tokens after the last merge
} BpeTrainer;

void bpe_init(BpeTrainer *b) {
    memset(b, 0, sizeof *b);
    b->piece_mask = (1u << 16) - 1;
    b->piece_slot = (uint32_t *)calloc_check((size_t)b->piece_mask + 1, sizeof(uint32_t));
}

void bpe_free(BpeTrainer *b) {
    free(b->piece_count);
    free(b->piece_start);
    free(b->piece_len);
    free(b->piece_tokens);
    free(b->piece_slot);
    free(b->piece_bytes);
    free(b->pair_key);
    free(b->pair_count);
    free(b->merges);
    memset(b, 0, sizeof *b);
}

static uint32_t bpe_piece_hash_(const BpeTrainer *b, size_t start, int len) {
    return tokenizer_hash_bytes_(b->piece_bytes + start, (size_t)len);
}

// doubles the piece hash table, which is kept at most half full
static void bpe_grow_pieces_(BpeTrainer *b) {
    uint32_t size = 2 * (b->piece_mask + 1);
    free(b->piece_slot);
    b->piece_slot = (uint32_t *)calloc_check(size, sizeof(uint32_t));
    b->piece_mask = size - 1;
    for (int i = 0; i < b->npieces; i++) {
        uint32_t h = bpe_piece_hash_(b, b->piece_start[i], b->piece_len[i]) & b->piece_mask;
        while (b->piece_slot[h] != 0) h = (h + 1) & b->piece_mask;
        b->piece_slot[h] = (uint32_t)i + 1;
    }
}

// counts one occurrence of the piece s[0..n)
static void bpe_count_piece_(BpeTrainer *b, const unsigned char *s, size_t n) {
    if (n > INT32_MAX / 2) fail("a single piece of text of %zu bytes is too long to train a vocabulary on", n);
    uint32_t h = tokenizer_hash_bytes_(s, n) & b->piece_mask;
    for (; b->piece_slot[h] != 0; h = (h + 1) & b->piece_mask) {
        int i = (int)b->piece_slot[h] - 1;
        if ((size_t)b->piece_len[i] == n && memcmp(b->piece_bytes + b->piece_start[i], s, n) == 0) {
            b->piece_count[i]++;
            return;
        }
    }
    if (b->npieces == b->pieces_cap) {
        b->pieces_cap = b->pieces_cap ? 2 * b->pieces_cap : 4096;
        b->piece_count = (int64_t *)realloc_check(b->piece_count, (size_t)b->pieces_cap * sizeof(int64_t));
        b->piece_start = (size_t *)realloc_check(b->piece_start, (size_t)b->pieces_cap * sizeof(size_t));
        b->piece_len = (int *)realloc_check(b->piece_len, (size_t)b->pieces_cap * sizeof(int));
    }
    if (b->tokens_used + n > b->tokens_cap) {
        b->tokens_cap = 2 * (b->tokens_used + n) + 65536;
        b->piece_bytes = (unsigned char *)realloc_check(b->piece_bytes, b->tokens_cap);
    }
    int i = b->npieces++;
    memcpy(b->piece_bytes + b->tokens_used, s, n);
    b->piece_start[i] = b->tokens_used;
    b->piece_len[i] = (int)n;
    b->piece_count[i] = 1;
    b->tokens_used += n;
    b->piece_slot[h] = (uint32_t)i + 1;
    if (2u * (uint32_t)b->npieces > b->piece_mask) bpe_grow_pieces_(b);
}

void bpe_add_text(BpeTrainer *b, const char *text, size_t len) {
    const unsigned char *s = (const unsigned char *)text;
    for (size_t pos = 0; pos < len;) {
        size_t n = pretokenize_next(s + pos, len - pos);
        bpe_count_piece_(b, s + pos, n);
        pos += n;
    }
}

// the slot of pair `key` in the pair table, inserted with count 0 if it is new
static uint32_t bpe_pair_slot_(BpeTrainer *b, uint32_t key) {
    if (2 * (b->pairs_used + 1) > b->pair_mask + 1) {  // keep it at most half full
        uint32_t old_size = b->pair_key ? b->pair_mask + 1 : 0, size = old_size ? 2 * old_size : 1u << 16;
        uint32_t *old_key = b->pair_key;
        int64_t *old_count = b->pair_count;
        b->pair_key = (uint32_t *)malloc_check((size_t)size * sizeof(uint32_t));
        b->pair_count = (int64_t *)calloc_check(size, sizeof(int64_t));
        for (uint32_t i = 0; i < size; i++) b->pair_key[i] = TOKENIZER_EMPTY;
        b->pair_mask = size - 1;
        for (uint32_t i = 0; i < old_size; i++) {
            if (old_key[i] == TOKENIZER_EMPTY) continue;
            uint32_t h = tokenizer_hash_pair_(old_key[i]) & b->pair_mask;
            while (b->pair_key[h] != TOKENIZER_EMPTY) h = (h + 1) & b->pair_mask;
            b->pair_key[h] = old_key[i];
            b->pair_count[h] = old_count[i];
        }
        free(old_key);
        free(old_count);
    }
    uint32_t h = tokenizer_hash_pair_(key) & b->pair_mask;
    while (b->pair_key[h] != TOKENIZER_EMPTY && b->pair_key[h] != key) h = (h + 1) & b->pair_mask;
    if (b->pair_key[h] == TOKENIZER_EMPTY) {
        b->pair_key[h] = key;
        b->pairs_used++;
    }
    return h;
}

// adds `sign` times piece i's count to the count of each of its adjacent pairs
static void bpe_count_pairs_(BpeTrainer *b, int i, int sign) {
    const int *t = b->piece_tokens + b->piece_start[i];
    for (int j = 0; j + 1 < b->piece_len[i]; j++) {
        uint32_t slot = bpe_pair_slot_(b, tokenizer_pair_key_(t[j], t[j + 1]));  // may grow the table
        b->pair_count[slot] += sign * b->piece_count[i];
    }
}

// replaces every occurrence of (left, right) in piece i by `id`, left to right
static void bpe_merge_piece_(BpeTrainer *b, int i, int left, int right, int id) {
    int *t = b->piece_tokens + b->piece_start[i];
    int n = 0;
    for (int j = 0; j < b->piece_len[i]; j++) {
        if (j + 1 < b->piece_len[i] && t[j] == left && t[j + 1] == right) {
            t[n++] = id;
            j++;
        } else {
            t[n++] = t[j];
        }
    }
    b->piece_len[i] = n;
}

static int bpe_piece_has_pair_(const BpeTrainer *b, int i, int left, int right) {
    const int *t = b->piece_tokens + b->piece_start[i];
    for (int j = 0; j + 1 < b->piece_len[i]; j++) {
        if (t[j] == left && t[j + 1] == right) return 1;
    }
    return 0;
}

// learns up to vocab_size - 257 merges (the vocabulary: 256 bytes, the merges, end-of-text)
void bpe_train(BpeTrainer *b, int vocab_size) {
    if (vocab_size < 257 || vocab_size > 65536) {
        fail("a BPE vocabulary must have 257 to 65536 tokens, not %d", vocab_size);
    }
    if (b->npieces == 0) fail("no text to train a vocabulary on");
    free(b->piece_slot);  // counting is over
    b->piece_slot = NULL;
    b->piece_tokens = (int *)malloc_check(b->tokens_used * sizeof(int));
    for (size_t j = 0; j < b->tokens_used; j++) b->piece_tokens[j] = b->piece_bytes[j];
    for (int i = 0; i < b->npieces; i++) bpe_count_pairs_(b, i, +1);
    int max_merges = vocab_size - 257;
    b->merges = (int32_t *)malloc_check(2 * (size_t)(max_merges > 0 ? max_merges : 1) * sizeof(int32_t));
    b->num_merges = 0;
    // every token's length in bytes: a merge whose token would exceed BPE_MAX_TOKEN_BYTES, the
    // most the tokenizer file's 8-bit length holds, is never made (its pair is passed over)
    int *token_bytes = (int *)malloc_check((256 + (size_t)(max_merges > 0 ? max_merges : 1)) * sizeof(int));
    for (int i = 0; i < 256; i++) token_bytes[i] = 1;
    while (b->num_merges < max_merges) {
        // the most frequent pair; ties go to the smaller key so that the result never depends
        // on the order of the hash table
        uint32_t best_key = TOKENIZER_EMPTY;
        int64_t best = 1;
        for (uint32_t h = 0; h <= b->pair_mask; h++) {
            if (b->pair_key[h] == TOKENIZER_EMPTY) continue;
            uint32_t key = b->pair_key[h];
            if (token_bytes[key >> 16] + token_bytes[key & 0xFFFF] > BPE_MAX_TOKEN_BYTES) continue;
            int64_t c = b->pair_count[h];
            if (c > best || (c == best && best > 1 && b->pair_key[h] < best_key)) {
                best = c;
                best_key = b->pair_key[h];
            }
        }
        if (best_key == TOKENIZER_EMPTY) break;  // no pair occurs twice: nothing worth a token
        int left = (int)(best_key >> 16), right = (int)(best_key & 0xFFFF), id = 256 + b->num_merges;
        for (int i = 0; i < b->npieces; i++) {
            if (!bpe_piece_has_pair_(b, i, left, right)) continue;
            bpe_count_pairs_(b, i, -1);
            bpe_merge_piece_(b, i, left, right, id);
            bpe_count_pairs_(b, i, +1);
        }
        b->merges[2 * b->num_merges] = left;
        b->merges[2 * b->num_merges + 1] = right;
        token_bytes[id] = token_bytes[left] + token_bytes[right];
        b->num_merges++;
    }
    free(token_bytes);
    b->corpus_tokens = 0;
    for (int i = 0; i < b->npieces; i++) b->corpus_tokens += b->piece_count[i] * b->piece_len[i];
}

// writes the trained vocabulary as a tokenizer file (doc/tokenizer.md), through a temporary name;
// with hold, kept under that name for publish_held (utils.h), as one of a set of files
static void bpe_write_(const BpeTrainer *b, const char *path, int hold) {
    int M = b->num_merges, V = 256 + M + 1;
    // every token's bytes: the single bytes, then each merge's two halves joined
    size_t *len = (size_t *)malloc_check((size_t)V * sizeof(size_t));
    size_t *off = (size_t *)malloc_check(((size_t)V + 1) * sizeof(size_t));
    off[0] = 0;
    for (int i = 0; i < V; i++) {
        int merged = i >= 256 && i < V - 1;
        len[i] = i < 256 ? 1 : merged ? len[b->merges[2 * (i - 256)]] + len[b->merges[2 * (i - 256) + 1]]
                                      : strlen(BPE_EOT_TEXT);
        if (len[i] > 255) fail("%s: a token of %zu bytes does not fit the format's 8-bit length", path, len[i]);
        off[i + 1] = off[i] + len[i];
    }
    size_t total = off[V];
    unsigned char *bytes = (unsigned char *)malloc_check(total);
    unsigned char *lens = (unsigned char *)malloc_check((size_t)V);
    for (int i = 0; i < V; i++) {
        lens[i] = (unsigned char)len[i];
        if (i < 256) bytes[i] = (unsigned char)i;
        if (i == V - 1) memcpy(bytes + off[i], BPE_EOT_TEXT, len[i]);
        if (i < 256 || i == V - 1) continue;
        int l = b->merges[2 * (i - 256)], r = b->merges[2 * (i - 256) + 1];
        memcpy(bytes + off[i], bytes + off[l], len[l]);
        memcpy(bytes + off[i] + len[l], bytes + off[r], len[r]);
    }
    int32_t header[HEADER_WORDS] = {TOKENIZER_MAGIC, TOKENIZER_VERSION, V, V - 1, M, (int32_t)total, VOCAB_BPE};
    uint64_t hash = tokenizer_vocab_hash(TOKENIZER_HASH_START, &header[2], 4 * sizeof(int32_t));  // words 7-8
    hash = tokenizer_vocab_hash(hash, b->merges, 2 * (size_t)M * sizeof(int32_t));
    hash = tokenizer_vocab_hash(tokenizer_vocab_hash(hash, lens, (size_t)V), bytes, total);
    memcpy(&header[7], &hash, sizeof(hash));
    char tmp[4096];
    FILE *f = open_for_atomic_write(path, tmp, sizeof tmp);
    fwrite_check(header, sizeof header, 1, f, tmp);
    fwrite_check(b->merges, sizeof(int32_t), 2 * (size_t)M, f, tmp);
    fwrite_check(lens, 1, (size_t)V, f, tmp);
    fwrite_check(bytes, 1, total, f, tmp);
    if (hold) hold_atomic_write(f, tmp);
    else finish_atomic_write(f, tmp, path);
    free(len);
    free(off);
    free(lens);
    free(bytes);
}

void bpe_save(const BpeTrainer *b, const char *path) { bpe_write_(b, path, 0); }

#endif
