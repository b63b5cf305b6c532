/*
attention.h: the CPU's self-attention in tiles, without the T x T matrix (FlashAttention-2: T. Dao,
"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", 2023).

Why: attention written as in the math keeps every head's probabilities P (T, T) for the backward
pass, B·NH·T² floats per layer, so its memory grows with the square of the sequence length. Here
the queries go in tiles of ATTENTION_QUERY_TILE and the keys in tiles of ATTENTION_KEY_TILE, only
one tile of scores exists at a time (per thread), and each layer keeps the log-sum-exp of every
query's scores, lse (B, NH, T): memory grows with T.

Forward, for each query tile i of a head (S = q · k^T / sqrt(hd), masked keys left out): a running
maximum m and sum l per query (the online softmax), and the output rescaled whenever m grows,
    for each key tile j:  m' = max(m, rowmax S_ij),  P = e^(S_ij − m'),
                          l = l · e^(m − m') + rowsum P,  O_i = O_i · e^(m − m') + P · v_j,  m = m'
    then O_i /= l and lse_i = m + log l, so that P = e^(S − lse) exactly as the softmax's.
Backward, for each key tile j and the queries i that see it (in slices of up to
ATTENTION_BACKWARD_ROWS, larger than the forward's tiles: fewer, larger products), with
D_i = rowsum(dO_i ⊙ O_i) (= rowsum(P ⊙ dP), the softmax's backward term):
    P = e^(S_ij − lse_i),  dv_j += P^T · dO_i,  dP = dO_i · v_j^T,  dS = P ⊙ (dP − D_i) / sqrt(hd),
    dq_i += dS · k_j,  dk_j += dS^T · q_i.
The products are matmul_nt / nn / tn (matmul.h) on the calling thread, in the model's precision:
with BF16 their operands (q, k, v, P, dO, dS) are rounded to bfloat16 and summed in float32, as
FlashAttention does on GPUs; the softmax, its maximum, sum and log-sum-exp, D and dS are float32
in both (doc/precision.md). e^x is exp_fast.

Determinism: the forward gives each (sequence, head, query tile) to one thread; the backward gives
each (sequence, head) to one thread, since a head's dk and dv rows take gradient from every query
tile, and walks its tiles in a fixed order. Results are bitwise identical for any number of threads.
test/test_matmul checks both passes against the attention that writes P out
(test/attention_reference.h) and against float64.
*/
#ifndef ATTENTION_H
#define ATTENTION_H

#include <math.h>
#include "matmul.h"  // defines: matmul_nt, matmul_nn, matmul_tn, dot_product, exp_fast
#include "utils.h"   // defines: malloc_check

// A forward tile of scores is 64 x 128 floats (32 KB), in cache while it turns into probabilities.
// Any sizes give the same function: every query sees key 0, in the first key tile, so its running
// maximum is finite from then on, and a later tile with no key it sees leaves m and l as they were.
#define ATTENTION_QUERY_TILE 64
#define ATTENTION_KEY_TILE 128
#define ATTENTION_BACKWARD_ROWS 256

// One head of one sequence: its (T, hd) queries, keys and values are columns of qkv, rows ld apart;
// and the precision of its products.
typedef struct {
    const float *q, *k, *v;
    size_t ld;
    int T, hd, causal;
    Precision precision;
} AttentionHead;

static AttentionHead attention_head(const float *qkv, int b, int h, int T, int C, int NH, int causal,
                                    Precision precision) {
    size_t ld = 3 * (size_t)C;
    int hd = C / NH;
    const float *q = qkv + (size_t)b * T * ld + h * hd;
    AttentionHead x = {q, q + C, q + 2 * C, ld, T, hd, causal, precision};
    return x;
}

// How many keys query t sees of the n keys that start at j0: all, or under the mask those up to t.
static inline int keys_seen(const AttentionHead *x, int t, int j0, int n) {
    int seen = x->causal ? t + 1 - j0 : n;
    return seen < 0 ? 0 : seen < n ? seen : n;
}

// The online softmax of one row of raw scores s (n) of which the first `seen` are visible: in place
// P = e^(scale · s − m'), 0 for the rest; updates the running maximum m and sum l and returns
// e^(m − m'), the factor of what the row's output has summed so far.
static inline float online_softmax_row(float *s, int seen, int n, float scale, float *m, float *l) {
    for (int j = seen; j < n; j++) { s[j] = 0.0f; }
    if (seen == 0) { return 1.0f; }
    float maxval = *m, sum = 0.0f;
    #pragma omp simd reduction(max : maxval)
    for (int j = 0; j < seen; j++) {
        s[j] *= scale;
        maxval = s[j] > maxval ? s[j] : maxval;
    }
    #pragma omp simd reduction(+ : sum)
    for (int j = 0; j < seen; j++) {
        s[j] = exp_fast(s[j] - maxval);
        sum += s[j];
    }
    float factor = exp_fast(*m - maxval);  // 0 for the first visible keys (m = −∞)
    *l = *l * factor + sum;
    *m = maxval;
    return factor;
}

// Queries t0 .. t1-1 of one head: their rows of out (ldo floats apart) and of lse.
static void attention_forward_tile(float *out, size_t ldo, float *lse, const AttentionHead *x, int t0, int t1) {
    _Alignas(64) float s[ATTENTION_QUERY_TILE * ATTENTION_KEY_TILE];
    float m[ATTENTION_QUERY_TILE], l[ATTENTION_QUERY_TILE];
    float scale = 1.0f / sqrtf((float)x->hd);
    int n_queries = t1 - t0, key_end = x->causal ? t1 : x->T;
    for (int i = 0; i < n_queries; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
    for (int j0 = 0; j0 < key_end; j0 += ATTENTION_KEY_TILE) {
        int n_keys = key_end - j0 < ATTENTION_KEY_TILE ? key_end - j0 : ATTENTION_KEY_TILE;
        matmul_nt(s, n_keys, x->q + t0 * x->ld, x->ld, x->k + j0 * x->ld, x->ld, n_queries, n_keys, x->hd, 0,
                  x->precision);
        for (int i = 0; i < n_queries; i++) {
            float factor = online_softmax_row(s + i * n_keys, keys_seen(x, t0 + i, j0, n_keys), n_keys, scale,
                                              &m[i], &l[i]);
            float *o = out + (t0 + i) * ldo;
            if (j0 > 0) {
                for (int d = 0; d < x->hd; d++) { o[d] *= factor; }
            }
        }
        // O_i (+)= P · v_j; the first key tile writes
        matmul_nn(out + t0 * ldo, ldo, s, n_keys, x->v + j0 * x->ld, x->ld, n_queries, x->hd, n_keys, j0 > 0,
                  x->precision);
    }
    for (int i = 0; i < n_queries; i++) {
        float *o = out + (t0 + i) * ldo, inv = 1.0f / l[i];
        for (int d = 0; d < x->hd; d++) { o[d] *= inv; }
        lse[t0 + i] = m[i] + logf(l[i]);
    }
}

// out (B, T, C), each head's columns; lse (B, NH, T). qkv (B, T, 3C): q, k, v, RoPE applied.
void attention_forward(float *out, float *lse, const float *qkv, int B, int T, int C, int NH, int causal,
                       Precision precision) {
    int tiles = (T + ATTENTION_QUERY_TILE - 1) / ATTENTION_QUERY_TILE, hd = C / NH;
    #pragma omp parallel for collapse(3) schedule(dynamic, 1)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int tile = 0; tile < tiles; tile++) {
                AttentionHead x = attention_head(qkv, b, h, T, C, NH, causal, precision);
                int t0 = tile * ATTENTION_QUERY_TILE, t1 = t0 + ATTENTION_QUERY_TILE;
                float *o = out + (size_t)b * T * C + h * hd, *head_lse = lse + ((size_t)b * NH + h) * T;
                attention_forward_tile(o, C, head_lse, &x, t0, t1 < T ? t1 : T);
            }
        }
    }
}

// Rows r0 .. r1-1 of P (in s, raw scores on entry) and of dS (in ds, dP on entry) against the n_keys
// keys from j0, from lse and D (indexed by query); the keys a row does not see 0.
static void attention_softmax_backward_tile(float *s, float *ds, const float *lse, const float *D,
                                            const AttentionHead *x, int r0, int r1, int j0, int n_keys) {
    float scale = 1.0f / sqrtf((float)x->hd);
    for (int t = r0; t < r1; t++) {
        float *p = s + (t - r0) * n_keys, *dp = ds + (t - r0) * n_keys, row_lse = lse[t], row_D = D[t];
        int seen = keys_seen(x, t, j0, n_keys);
        #pragma omp simd
        for (int j = 0; j < seen; j++) {
            p[j] = exp_fast(p[j] * scale - row_lse);
            dp[j] = p[j] * (dp[j] - row_D) * scale;
        }
        for (int j = seen; j < n_keys; j++) { p[j] = dp[j] = 0.0f; }
    }
}

// The gradient of one head: dq, dk, dv (rows x->ld apart, added to) from dout and out (rows ldo
// apart) and lse (T). For each key tile j (outer, in order) the queries that see it, r0 .. T-1, go
// in slices of up to ATTENTION_BACKWARD_ROWS, each a few products much larger than a tile pair's
// (less packing per multiply-add). Scratch: s and ds (ATTENTION_BACKWARD_ROWS, ATTENTION_KEY_TILE),
// D (T) = rowsum(dout ⊙ out).
static void attention_backward_head(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                    size_t ldo, const float *lse, const AttentionHead *x, float *s, float *ds,
                                    float *D) {
    size_t ld = x->ld;
    int hd = x->hd;
    Precision precision = x->precision;
    for (int t = 0; t < x->T; t++) { D[t] = dot_product(dout + t * ldo, out + t * ldo, hd); }
    for (int j0 = 0; j0 < x->T; j0 += ATTENTION_KEY_TILE) {
        int n_keys = x->T - j0 < ATTENTION_KEY_TILE ? x->T - j0 : ATTENTION_KEY_TILE;
        const float *k = x->k + j0 * ld, *v = x->v + j0 * ld;
        for (int r0 = x->causal ? j0 : 0; r0 < x->T; r0 += ATTENTION_BACKWARD_ROWS) {
            int r1 = r0 + ATTENTION_BACKWARD_ROWS < x->T ? r0 + ATTENTION_BACKWARD_ROWS : x->T, rows = r1 - r0;
            const float *q = x->q + r0 * ld, *d = dout + r0 * ldo;
            matmul_nt(s, n_keys, q, ld, k, ld, rows, n_keys, hd, 0, precision);   // S (unscaled)
            matmul_nt(ds, n_keys, d, ldo, v, ld, rows, n_keys, hd, 0, precision);  // dP = dO · v_j^T
            attention_softmax_backward_tile(s, ds, lse, D, x, r0, r1, j0, n_keys);
            matmul_tn(dv + j0 * ld, ld, s, n_keys, d, ldo, n_keys, hd, rows, 1, precision);   // dv_j += P^T · dO
            matmul_tn(dk + j0 * ld, ld, ds, n_keys, q, ld, n_keys, hd, rows, 1, precision);   // dk_j += dS^T · q
            matmul_nn(dq + r0 * ld, ld, ds, n_keys, k, ld, rows, hd, n_keys, 1, precision);   // dq += dS · k_j
        }
    }
}

// dqkv (B, T, 3C) += the gradient of attention_forward's out, given dout (B, T, C), and the out and
// lse that attention_forward wrote.
void attention_backward(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                        int B, int T, int C, int NH, int causal, Precision precision) {
    int hd = C / NH;
    #pragma omp parallel
    {
        float *s = (float *)malloc_check((size_t)ATTENTION_BACKWARD_ROWS * ATTENTION_KEY_TILE * sizeof(float));
        float *ds = (float *)malloc_check((size_t)ATTENTION_BACKWARD_ROWS * ATTENTION_KEY_TILE * sizeof(float));
        float *D = (float *)malloc_check((size_t)T * sizeof(float));
        #pragma omp for collapse(2) schedule(dynamic, 1)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                AttentionHead x = attention_head(qkv, b, h, T, C, NH, causal, precision);
                float *dq = dqkv + (size_t)b * T * x.ld + h * hd;
                size_t at = (size_t)b * T * C + h * hd;
                attention_backward_head(dq, dq + C, dq + 2 * C, dout + at, out + at, C,
                                        lse + ((size_t)b * NH + h) * T, &x, s, ds, D);
            }
        }
        free(s);
        free(ds);
        free(D);
    }
}

#endif  // ATTENTION_H
