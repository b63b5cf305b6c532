/*
attention.h: the CPU's self-attention in tiles, without the T x T matrix (FlashAttention-2: T. Dao,
"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", 2023).

Why: attention written as in the math keeps every head's probabilities P (T, T) for the backward
pass, B·NH·T² floats per layer, so its memory grows with the square of the sequence length. Here
only one small tile of scores exists at a time (per thread), and each layer keeps the log-sum-exp
of every query's scores, lse (B, NH, T): memory grows with T.

Forward, for each block of queries i of a head (S = q · k^T / sqrt(hd), masked keys left out): a
running maximum m and sum l per query (the online softmax), and the output rescaled whenever m grows,
    for each key tile j:  m' = max(m, rowmax S_ij),  P = e^(S_ij − m'),
                          l = l · e^(m − m') + rowsum P,  O_i = O_i · e^(m − m') + P · v_j,  m = m'
    then O_i /= l and lse_i = m + log l, so that P = e^(S − lse) exactly as the softmax's.
Backward, for each key tile j and the queries i that see it (in slices of up to
ATTENTION_BACKWARD_ROWS), with D_i = rowsum(dO_i ⊙ O_i) (= rowsum(P ⊙ dP), the softmax's backward
term):
    P = e^(S_ij − lse_i),  dv_j += P^T · dO_i,  dP = dO_i · v_j^T,  dS = P ⊙ (dP − D_i) / sqrt(hd),
    dq_i += dS · k_j,  dk_j += dS^T · q_i.

How: the products are matmul.h's register tiles (micro_kernel, micro_kernel_bf16) on panels packed
once per head, not general products: a tile of scores is a few hundred multiply-adds per value, and
packing q, k and v again for every pair of tiles, and P and dS after every softmax, took as long
as the multiply-adds (doc/cpu.md). So q, k, v and dO are packed once per head (or per block of
queries) in each layout a product reads them in, and the softmax writes P and dS straight into the
packed layout of the product that reads them next. A register tile is GEMM_MR rows by GEMM_NR
columns; the forward computes S^T (keys by queries), so that the softmax runs down the columns, a
vector of GEMM_NR queries at a time, and P^T is already the packed operand of O^T = v^T · P^T; the
backward computes S (queries by keys), so that P and dS are the packed operands of dv^T = dO^T · P
and dk^T = q^T · dS, and only dS is transposed, for dq = dS · k. With BF16 the products' operands
(q, k, v, P, dO, dS) are rounded to bfloat16 and summed in float32, as FlashAttention does on GPUs;
the softmax, its maximum, sum and log-sum-exp, D and dS are float32 in both (doc/precision.md).
e^x is exp_fast.

Determinism: the forward gives each (sequence, head, chunk of queries) to one thread; the backward
gives each (sequence, head) to one thread, since a head's dk and dv rows take gradient from every
query, and walks its tiles in a fixed order. Every sum has a fixed order: results are bitwise
identical for any number of threads. test/test_matmul checks both passes against the attention
that writes P out (test/attention_reference.h) and against float64.
*/
#ifndef ATTENTION_H
#define ATTENTION_H

#include <math.h>
#include "matmul.h"  // defines: micro_kernel(_bf16), pack_panel(_bf16), bf16_pair, MatrixView, exp_fast
#include "utils.h"   // defines: malloc_check

// Forward: keys per step of the online softmax, whole panels of GEMM_MR (an S^T tile of 120 x 32
// floats, 15 KB, stays in L1 while it becomes P^T); queries per work item, whose k and v a thread
// packs once. Backward: keys per tile, whole panels of GEMM_NR; queries per slice, whole panels of
// GEMM_MR (its P and dS, 2 x 264 x 128 floats, stay in L2). Any sizes give the same function:
// every query sees key 0, in the first key tile, so its running maximum is finite from then on, and
// a later tile with no key it sees leaves m and l as they were (e^0 = 1 exactly).
#define ATTENTION_KEY_TILE 120
#define ATTENTION_QUERY_CHUNK 256
#define ATTENTION_BACKWARD_KEYS 128
#define ATTENTION_BACKWARD_ROWS 264
// dv^T and dk^T of a key tile have rows this many floats apart: 128 (512 bytes) would put every
// row of a column in the same 8 of the L1 cache's 64 sets, and reading them out by columns missed.
#define ATTENTION_TILE_STRIDE (ATTENTION_BACKWARD_KEYS + 16)

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

// The first of the queries t0, t0 + 1, ... that sees key j: under the mask query j, else t0; as an
// offset from t0 (negative when they all see it).
static inline int first_query_seeing(const AttentionHead *x, int j, int t0) { return x->causal ? j - t0 : 0; }

// Packed panels in matmul.h's layout, packed[k * width + x], with BF16 pairs of k in one 32-bit
// word: the floats one panel of kc values of k takes, and where value k (even with BF16) starts.
static inline size_t panel_floats(int kc, int width, int bf16) { return (size_t)(bf16 ? (kc + 1) / 2 : kc) * width; }
static inline size_t panel_at(int k, int width, int bf16) { return (size_t)(bf16 ? k / 2 : k) * width; }

// Panels of x = 0 .. nx-1 of v (element (x, k); zeros past nx), `stride` floats apart, over k = 0 .. kc-1.
static void pack_panels(float *packed, size_t stride, MatrixView v, int nx, int kc, int width, int bf16) {
    for (int x0 = 0; x0 < nx; x0 += width) {
        float *panel = packed + (size_t)(x0 / width) * stride;
        if (bf16) {
            pack_panel_bf16((uint32_t *)panel, v, x0, nx - x0, 0, kc, width);
        } else {
            pack_panel(panel, v, x0, nx - x0, 0, kc, width);
        }
    }
}

// tile (GEMM_MR, GEMM_NR) = A panel · B panel over kc values of k.
static inline void panel_product(int kc, const float *a, const float *b, float *tile, int bf16) {
    if (bf16) {
        micro_kernel_bf16((kc + 1) / 2, (const uint32_t *)a, (const uint32_t *)b, tile);
    } else {
        micro_kernel(kc, a, b, tile);
    }
}

// The next n floats of a scratch buffer, each a multiple of 64 bytes after the last (NULL when only
// counting, base NULL).
static float *carve(float *base, size_t *used, size_t n) {
    float *at = base ? base + *used : NULL;
    *used += (n + 15) / 16 * 16;
    return at;
}

// ---------------------------------------------------------------------------------------------
// Forward

// One thread's packed operands and tiles for the forward pass, carved from one buffer at base (the
// floats they take in *floats, when given; base NULL only counts them).
typedef struct {
    float *k_panels;   // keys as A panels (GEMM_MR keys by hd), ceil(T / GEMM_MR) of them
    float *vt_panels;  // v^T as A panels (GEMM_MR dimensions by T keys), vt_stride floats apart
    float *qt_panel;   // a block's queries as a B panel (hd by GEMM_NR queries)
    float *scores;     // S^T, then P^T in place (ATTENTION_KEY_TILE keys by GEMM_NR queries)
    float *pt_pairs;   // with BF16: P^T as a B panel of pairs of keys
    float *out_t;      // O^T (hd, rounded up to GEMM_MR, by GEMM_NR queries)
    size_t vt_stride;
} ForwardScratch;

static ForwardScratch forward_scratch(float *base, int T, int hd, int bf16, size_t *floats) {
    ForwardScratch w;
    size_t used = 0;
    int dim_panels = (hd + GEMM_MR - 1) / GEMM_MR;
    w.vt_stride = panel_floats(T, GEMM_MR, bf16);
    w.k_panels = carve(base, &used, (size_t)(T + GEMM_MR - 1) / GEMM_MR * panel_floats(hd, GEMM_MR, bf16));
    w.vt_panels = carve(base, &used, dim_panels * w.vt_stride);
    w.qt_panel = carve(base, &used, panel_floats(hd, GEMM_NR, bf16));
    w.scores = carve(base, &used, ATTENTION_KEY_TILE * GEMM_NR);
    w.pt_pairs = carve(base, &used, panel_floats(ATTENTION_KEY_TILE, GEMM_NR, 1));
    w.out_t = carve(base, &used, (size_t)dim_panels * GEMM_MR * GEMM_NR);
    if (floats) { *floats = used; }
    return w;
}

// The online softmax of a tile of raw scores S^T: rows r < n_keys are keys j0 + r, columns c are
// queries t0 + c, and each column takes one lane of a vector. In place, P^T = e^(scale · s − m'),
// 0 where the query does not see the key; updates the running maximum
// m and sum l of each query and sets factor = e^(m − m'), the factor of its output summed so far.
static void online_softmax_columns(float *s, int n_keys, const AttentionHead *x, int j0, int t0,
                                   float *m, float *l, float *factor) {
    float scale = 1.0f / sqrtf((float)x->hd), maxval[GEMM_NR], sum[GEMM_NR];
    for (int c = 0; c < GEMM_NR; c++) {
        maxval[c] = m[c];
        sum[c] = 0.0f;
    }
    for (int r = 0; r < n_keys; r++) {  // scaled by a positive number, the largest score stays the largest
        const float *row = s + r * GEMM_NR;
        int first = first_query_seeing(x, j0 + r, t0);
        #pragma omp simd
        for (int c = 0; c < GEMM_NR; c++) {
            maxval[c] = c >= first && row[c] * scale > maxval[c] ? row[c] * scale : maxval[c];
        }
    }
    for (int r = 0; r < n_keys; r++) {
        float *row = s + r * GEMM_NR;
        int first = first_query_seeing(x, j0 + r, t0);
        #pragma omp simd
        for (int c = 0; c < GEMM_NR; c++) {
            float p = exp_fast(row[c] * scale - maxval[c]);
            row[c] = c >= first ? p : 0.0f;
            sum[c] += row[c];
        }
    }
    for (int c = 0; c < GEMM_NR; c++) {
        factor[c] = exp_fast(m[c] - maxval[c]);  // 0 for the first visible keys (m = −∞)
        l[c] = l[c] * factor[c] + sum[c];
        m[c] = maxval[c];
    }
}

// Queries t0 .. t0+nq-1 (nq <= GEMM_NR) of one head, from k and v packed in w: their rows of out
// (ldo floats apart) and of lse.
static void attention_forward_block(float *out, size_t ldo, float *lse, const AttentionHead *x,
                                    const ForwardScratch *w, int t0, int nq) {
    int bf16 = x->precision == BF16, hd = x->hd, dim_panels = (hd + GEMM_MR - 1) / GEMM_MR;
    int key_end = x->causal ? t0 + nq : x->T;
    MatrixView queries = {x->q + t0 * x->ld, NULL, x->ld, 0};
    pack_panels(w->qt_panel, 0, queries, nq, hd, GEMM_NR, bf16);
    float m[GEMM_NR], l[GEMM_NR], factor[GEMM_NR];
    for (int c = 0; c < GEMM_NR; c++) {
        m[c] = -INFINITY;
        l[c] = 0.0f;
    }
    _Alignas(64) float tile[GEMM_MR * GEMM_NR];
    for (int j0 = 0; j0 < key_end; j0 += ATTENTION_KEY_TILE) {
        int n_keys = key_end - j0 < ATTENTION_KEY_TILE ? key_end - j0 : ATTENTION_KEY_TILE;
        for (int r = 0; r < n_keys; r += GEMM_MR) {  // S^T = k_j · q_i^T, unscaled
            panel_product(hd, w->k_panels + (j0 + r) / GEMM_MR * panel_floats(hd, GEMM_MR, bf16), w->qt_panel,
                          w->scores + r * GEMM_NR, bf16);
        }
        online_softmax_columns(w->scores, n_keys, x, j0, t0, m, l, factor);
        const float *pt = w->scores;
        if (bf16) {  // P^T's rows in pairs (an odd n_keys pairs its last row with zeros)
            MatrixView scores = {w->scores, NULL, GEMM_NR, 1};
            pack_panels(w->pt_pairs, 0, scores, GEMM_NR, n_keys, GEMM_NR, 1);
            pt = w->pt_pairs;
        }
        for (int p = 0; p < dim_panels; p++) {  // O^T = O^T · factor + v_j^T · P^T
            panel_product(n_keys, w->vt_panels + p * w->vt_stride + panel_at(j0, GEMM_MR, bf16), pt, tile, bf16);
            float *o = w->out_t + p * GEMM_MR * GEMM_NR;
            if (j0 == 0) {  // the first key tile writes
                memcpy(o, tile, sizeof(tile));
            } else {
                for (int i = 0; i < GEMM_MR * GEMM_NR; i++) { o[i] = o[i] * factor[i % GEMM_NR] + tile[i]; }
            }
        }
    }
    for (int c = 0; c < nq; c++) {
        float *o = out + (t0 + c) * ldo, inv = 1.0f / l[c];
        for (int d = 0; d < hd; d++) { o[d] = w->out_t[d * GEMM_NR + c] * inv; }
        lse[t0 + c] = m[c] + logf(l[c]);
    }
}

// Queries t0 .. t1-1 of one head: k and v packed up to the last key they see, then blocks of
// GEMM_NR queries.
static void attention_forward_chunk(float *out, size_t ldo, float *lse, const AttentionHead *x,
                                    const ForwardScratch *w, int t0, int t1) {
    int bf16 = x->precision == BF16, key_end = x->causal ? t1 : x->T;
    MatrixView keys = {x->k, NULL, x->ld, 0}, values_t = {x->v, NULL, x->ld, 1};
    pack_panels(w->k_panels, panel_floats(x->hd, GEMM_MR, bf16), keys, key_end, x->hd, GEMM_MR, bf16);
    pack_panels(w->vt_panels, w->vt_stride, values_t, x->hd, key_end, GEMM_MR, bf16);
    for (int t = t0; t < t1; t += GEMM_NR) {
        attention_forward_block(out, ldo, lse, x, w, t, t1 - t < GEMM_NR ? t1 - t : GEMM_NR);
    }
}

// out (B, T, C), each head's columns; lse (B, NH, T). qkv (B, T, 3C): q, k, v, RoPE applied.
void attention_forward(float *out, float *lse, const float *qkv, int B, int T, int C, int NH, int causal,
                       Precision precision) {
    int chunks = (T + ATTENTION_QUERY_CHUNK - 1) / ATTENTION_QUERY_CHUNK, hd = C / NH;
    size_t floats;
    forward_scratch(NULL, T, hd, precision == BF16, &floats);
    #pragma omp parallel
    {
        float *scratch = (float *)malloc_check(floats * sizeof(float));
        ForwardScratch w = forward_scratch(scratch, T, hd, precision == BF16, NULL);
        #pragma omp for collapse(3) schedule(dynamic, 1)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                for (int chunk = 0; chunk < chunks; chunk++) {
                    AttentionHead x = attention_head(qkv, b, h, T, C, NH, causal, precision);
                    int t0 = chunk * ATTENTION_QUERY_CHUNK, t1 = t0 + ATTENTION_QUERY_CHUNK;
                    float *o = out + (size_t)b * T * C + h * hd, *head_lse = lse + ((size_t)b * NH + h) * T;
                    attention_forward_chunk(o, C, head_lse, &x, &w, t0, t1 < T ? t1 : T);
                }
            }
        }
        free(scratch);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward

// One thread's packed operands and tiles for the backward pass of one head, carved as forward_scratch's.
typedef struct {
    float *q_panels, *do_panels;   // q and dO as A panels (GEMM_MR queries by hd)
    float *k_panels, *v_panels;    // k and v as B panels (hd by GEMM_NR keys), for S and dP
    float *dot_panels, *qt_panels; // dO^T and q^T as A panels (GEMM_MR dimensions by T queries)
    float *k_rows;                 // k as B panels (T keys by GEMM_NR dimensions), for dq = dS · k
    float *p_panels, *ds_panels;   // P and dS of a slice as B panels (slice queries by GEMM_NR keys)
    float *ds_rows;                // dS of a slice as A panels (GEMM_MR queries by the tile's keys)
    float *dvt, *dkt;              // dv^T and dk^T of a key tile (hd rounded up to GEMM_MR, by its keys)
    float *dq;                     // (T, hd) the head's dq, summed here (in L2) and added to dqkv once
    float *D;                      // (T) rowsum(dO ⊙ O)
    size_t row_stride, key_stride, dim_stride, k_rows_stride, slice_stride, ds_rows_stride;
} BackwardScratch;

static BackwardScratch backward_scratch(float *base, int T, int hd, int bf16, size_t *floats) {
    BackwardScratch w;
    size_t used = 0;
    int row_panels = (T + GEMM_MR - 1) / GEMM_MR, key_panels = (T + GEMM_NR - 1) / GEMM_NR;
    int dim_panels = (hd + GEMM_MR - 1) / GEMM_MR, dim_col_panels = (hd + GEMM_NR - 1) / GEMM_NR;
    int tile_panels = ATTENTION_BACKWARD_KEYS / GEMM_NR;
    w.row_stride = panel_floats(hd, GEMM_MR, bf16), w.key_stride = panel_floats(hd, GEMM_NR, bf16);
    w.dim_stride = panel_floats(T, GEMM_MR, bf16), w.k_rows_stride = panel_floats(T, GEMM_NR, bf16);
    w.slice_stride = panel_floats(ATTENTION_BACKWARD_ROWS, GEMM_NR, bf16);
    w.ds_rows_stride = panel_floats(ATTENTION_BACKWARD_KEYS, GEMM_MR, bf16);
    w.q_panels = carve(base, &used, row_panels * w.row_stride);
    w.do_panels = carve(base, &used, row_panels * w.row_stride);
    w.k_panels = carve(base, &used, key_panels * w.key_stride);
    w.v_panels = carve(base, &used, key_panels * w.key_stride);
    w.dot_panels = carve(base, &used, dim_panels * w.dim_stride);
    w.qt_panels = carve(base, &used, dim_panels * w.dim_stride);
    w.k_rows = carve(base, &used, dim_col_panels * w.k_rows_stride);
    w.p_panels = carve(base, &used, tile_panels * w.slice_stride);
    w.ds_panels = carve(base, &used, tile_panels * w.slice_stride);
    w.ds_rows = carve(base, &used, ATTENTION_BACKWARD_ROWS / GEMM_MR * w.ds_rows_stride);
    w.dvt = carve(base, &used, (size_t)dim_panels * GEMM_MR * ATTENTION_TILE_STRIDE);
    w.dkt = carve(base, &used, (size_t)dim_panels * GEMM_MR * ATTENTION_TILE_STRIDE);
    w.dq = carve(base, &used, (size_t)T * hd);
    w.D = carve(base, &used, T);
    if (floats) { *floats = used; }
    return w;
}

// P and dS of queries t .. t+GEMM_MR-1 against keys key0 .. key0+GEMM_NR-1 (of the tile j0 ..
// key_end-1 and the slice from r0), written into the slice's packed P, dS and dS rows: S and dP
// from two register tiles, then P = e^(scale · S − lse), dS = P ⊙ (dP − D) · scale, 0 where the
// query does not see the key (or is past T, or the key past the tile).
static void softmax_backward_panel(const BackwardScratch *w, const float *lse, const AttentionHead *x, int t,
                                   int key0, int j0, int key_end, int r0) {
    int bf16 = x->precision == BF16, hd = x->hd;
    float scale = 1.0f / sqrtf((float)hd);
    _Alignas(64) float p[GEMM_MR * GEMM_NR], ds[GEMM_MR * GEMM_NR];
    if (x->causal && key0 > t + GEMM_MR - 1) {  // no query of the panel sees these keys
        memset(p, 0, sizeof(p));
        memset(ds, 0, sizeof(ds));
    } else {
        panel_product(hd, w->q_panels + t / GEMM_MR * w->row_stride, w->k_panels + key0 / GEMM_NR * w->key_stride,
                      p, bf16);
        panel_product(hd, w->do_panels + t / GEMM_MR * w->row_stride, w->v_panels + key0 / GEMM_NR * w->key_stride,
                      ds, bf16);
        for (int i = 0; i < GEMM_MR; i++) {
            int row = t + i, last = x->causal && row < key_end ? row + 1 : key_end;  // keys seen: key0 .. last-1
            int seen = row >= x->T ? 0 : last - key0;
            float row_lse = row < x->T ? lse[row] : 0.0f, row_D = row < x->T ? w->D[row] : 0.0f;
            float *pi = p + i * GEMM_NR, *dsi = ds + i * GEMM_NR;
            #pragma omp simd
            for (int j = 0; j < GEMM_NR; j++) {
                float pj = exp_fast(pi[j] * scale - row_lse), dsj = pj * (dsi[j] - row_D) * scale;
                pi[j] = j < seen ? pj : 0.0f;
                dsi[j] = j < seen ? dsj : 0.0f;
            }
        }
    }
    // into the packed layouts (matmul.h's packing, vectorized, transposes the tile for dS's rows)
    int panel = (key0 - j0) / GEMM_NR, slice_row = t - r0;
    float *p_out = w->p_panels + panel * w->slice_stride + panel_at(slice_row, GEMM_NR, bf16);
    float *ds_out = w->ds_panels + panel * w->slice_stride + panel_at(slice_row, GEMM_NR, bf16);
    float *ds_rows = w->ds_rows + slice_row / GEMM_MR * w->ds_rows_stride + panel_at(key0 - j0, GEMM_MR, bf16);
    MatrixView p_tile = {p, NULL, GEMM_NR, 1}, ds_tile = {ds, NULL, GEMM_NR, 1};
    if (bf16) {
        pack_panel_bf16((uint32_t *)p_out, p_tile, 0, GEMM_NR, 0, GEMM_MR, GEMM_NR);
        pack_panel_bf16((uint32_t *)ds_out, ds_tile, 0, GEMM_NR, 0, GEMM_MR, GEMM_NR);
    } else {
        memcpy(p_out, p, sizeof(p));
        memcpy(ds_out, ds, sizeof(ds));
    }
    pack_panels(ds_rows, 0, transposed_view(ds_tile), GEMM_MR, GEMM_NR, GEMM_MR, bf16);
}

// The products of one slice, queries r0 .. r1-1, and key tile j0 .. key_end-1, from its packed P
// and dS: dv^T and dk^T (written by the tile's first slice, then added to) += dO^T · P and q^T · dS
// over the slice's queries, and w->dq's rows of the slice += dS · k_j (written by the first tile, which
// every query sees). Under the mask each product
// starts at the first panel of queries that sees a key of the panel of keys, or stops at the last key
// the panel of queries sees; the first slice starts at most a panel of queries before the tile.
static void slice_products(const BackwardScratch *w, const AttentionHead *x, int r0, int r1, int j0, int key_end,
                           int first) {
    int bf16 = x->precision == BF16, hd = x->hd, n_keys = key_end - j0;
    int dim_panels = (hd + GEMM_MR - 1) / GEMM_MR;
    _Alignas(64) float tile[GEMM_MR * GEMM_NR];
    for (int key = 0; key < n_keys; key += GEMM_NR) {
        int start = x->causal && (j0 + key) / GEMM_MR * GEMM_MR > r0 ? (j0 + key) / GEMM_MR * GEMM_MR : r0;
        const float *b_p = w->p_panels + key / GEMM_NR * w->slice_stride + panel_at(start - r0, GEMM_NR, bf16);
        const float *b_ds = w->ds_panels + key / GEMM_NR * w->slice_stride + panel_at(start - r0, GEMM_NR, bf16);
        for (int p = 0; p < dim_panels; p++) {
            float *dvt = w->dvt + p * GEMM_MR * ATTENTION_TILE_STRIDE + key;
            float *dkt = w->dkt + p * GEMM_MR * ATTENTION_TILE_STRIDE + key;
            size_t at = p * w->dim_stride + panel_at(start, GEMM_MR, bf16);
            panel_product(r1 - start, w->dot_panels + at, b_p, tile, bf16);
            for (int i = 0; i < GEMM_MR; i++) {
                store_tile_row(dvt + i * ATTENTION_TILE_STRIDE, tile + i * GEMM_NR, GEMM_NR, !first);
            }
            panel_product(r1 - start, w->qt_panels + at, b_ds, tile, bf16);
            for (int i = 0; i < GEMM_MR; i++) {
                store_tile_row(dkt + i * ATTENTION_TILE_STRIDE, tile + i * GEMM_NR, GEMM_NR, !first);
            }
        }
    }
    for (int t = r0; t < r1; t += GEMM_MR) {
        int mr = r1 - t < GEMM_MR ? r1 - t : GEMM_MR;
        int seen = x->causal && t + GEMM_MR - j0 < n_keys ? t + GEMM_MR - j0 : n_keys;  // keys the panel sees
        for (int d0 = 0; d0 < hd; d0 += GEMM_NR) {
            panel_product(seen, w->ds_rows + (t - r0) / GEMM_MR * w->ds_rows_stride,
                          w->k_rows + d0 / GEMM_NR * w->k_rows_stride + panel_at(j0, GEMM_NR, bf16), tile, bf16);
            int n = hd - d0 < GEMM_NR ? hd - d0 : GEMM_NR;
            for (int i = 0; i < mr; i++) { store_tile_row(w->dq + (t + i) * hd + d0, tile + i * GEMM_NR, n, j0 > 0); }
        }
    }
}

// The gradient of one head: dq, dk, dv (rows x->ld apart, added to) from dout and out (rows ldo
// apart) and lse (T). Packs q, k, v and dout in each layout a product reads them in, then for each
// key tile (in order) the slices of queries that see it.
static void attention_backward_head(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                    size_t ldo, const float *lse, const AttentionHead *x, const BackwardScratch *w) {
    int T = x->T, hd = x->hd, bf16 = x->precision == BF16;
    for (int t = 0; t < T; t++) { w->D[t] = dot_product(dout + t * ldo, out + t * ldo, hd); }
    MatrixView q = {x->q, NULL, x->ld, 0}, k = {x->k, NULL, x->ld, 0}, v = {x->v, NULL, x->ld, 0};
    MatrixView d = {dout, NULL, ldo, 0};
    pack_panels(w->q_panels, w->row_stride, q, T, hd, GEMM_MR, bf16);
    pack_panels(w->do_panels, w->row_stride, d, T, hd, GEMM_MR, bf16);
    pack_panels(w->k_panels, w->key_stride, k, T, hd, GEMM_NR, bf16);
    pack_panels(w->v_panels, w->key_stride, v, T, hd, GEMM_NR, bf16);
    pack_panels(w->dot_panels, w->dim_stride, transposed_view(d), hd, T, GEMM_MR, bf16);
    pack_panels(w->qt_panels, w->dim_stride, transposed_view(q), hd, T, GEMM_MR, bf16);
    pack_panels(w->k_rows, w->k_rows_stride, transposed_view(k), hd, T, GEMM_NR, bf16);
    for (int j0 = 0; j0 < T; j0 += ATTENTION_BACKWARD_KEYS) {
        int key_end = T - j0 < ATTENTION_BACKWARD_KEYS ? T : j0 + ATTENTION_BACKWARD_KEYS;
        // under the mask, from the panel of queries that holds query j0: those before it see none of the tile
        // in slices of equal length (whole panels): 256 queries are one slice, not 252 and 4
        int first = x->causal ? j0 / GEMM_MR * GEMM_MR : 0;
        int slices = (T - first + ATTENTION_BACKWARD_ROWS - 1) / ATTENTION_BACKWARD_ROWS;
        int slice_rows = ((T - first + slices - 1) / slices + GEMM_MR - 1) / GEMM_MR * GEMM_MR;
        for (int r0 = first; r0 < T; r0 += slice_rows) {
            int r1 = r0 + slice_rows < T ? r0 + slice_rows : T;
            for (int t = r0; t < r1; t += GEMM_MR) {
                for (int key0 = j0; key0 < key_end; key0 += GEMM_NR) {
                    softmax_backward_panel(w, lse, x, t, key0, j0, key_end, r0);
                }
            }
            slice_products(w, x, r0, r1, j0, key_end, r0 == first);
        }
        for (int j = j0; j < key_end; j++) {
            for (int i = 0; i < hd; i++) { dk[j * x->ld + i] += w->dkt[i * ATTENTION_TILE_STRIDE + j - j0]; }
            for (int i = 0; i < hd; i++) { dv[j * x->ld + i] += w->dvt[i * ATTENTION_TILE_STRIDE + j - j0]; }
        }
    }
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < hd; i++) { dq[t * x->ld + i] += w->dq[t * hd + i]; }
    }
}

// dqkv (B, T, 3C) += the gradient of attention_forward's out, given dout (B, T, C), and the out and
// lse that attention_forward wrote.
void attention_backward(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                        int B, int T, int C, int NH, int causal, Precision precision) {
    int hd = C / NH;
    size_t floats;
    backward_scratch(NULL, T, hd, precision == BF16, &floats);
    #pragma omp parallel
    {
        float *scratch = (float *)malloc_check(floats * sizeof(float));
        BackwardScratch w = backward_scratch(scratch, T, hd, precision == BF16, NULL);
        #pragma omp for collapse(2) schedule(dynamic, 1)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                AttentionHead x = attention_head(qkv, b, h, T, C, NH, causal, precision);
                float *dq = dqkv + (size_t)b * T * x.ld + h * hd;
                size_t at = (size_t)b * T * C + h * hd;
                attention_backward_head(dq, dq + C, dq + 2 * C, dout + at, out + at, C,
                                        lse + ((size_t)b * NH + h) * T, &x, &w);
            }
        }
        free(scratch);
    }
}

#endif  // ATTENTION_H
