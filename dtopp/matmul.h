/*
matmul.h: the CPU's matrix products, and the e^x its softmaxes and SiLU use.

- matmul_forward / matmul_backward: the products of a linear layer, out (rows, OC) = inp (rows, IC)
  · weight (OC, IC)^T and its backward pass, with an optional gather of input rows (the tokens of
  one expert). They run the packed sgemm below, which reaches most of the FMA units' speed.
- matmul_forward_reference / matmul_backward_reference: the same products as simple loops, which
  test/test_matmul.c checks the fast ones against.
- sgemm / sgemm_serial on MatrixView operands, and the products on the calling thread that
  attention is written with: matmul_nt (a · b^T, the scores q · k^T), matmul_nn (a · b, P · v) and
  matmul_tn (a^T · b, in the backward pass).
- exp_fast: e^x in plain C that the compiler vectorizes.

Determinism: every output is computed by one thread, in an order that does not depend on the
number of threads, so results are bitwise identical for any number of threads.
*/
#ifndef MATMUL_H
#define MATMUL_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "utils.h"  // defines: fail, checked memory and file I/O, file headers
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BF16_NATIVE_BUILD 1  // the compiler can emit vdpbf16ps; the CPU is asked at run time
#endif

static inline float dot_product(const float *a, const float *b, int n) {
    float sum = 0.0f;
    #pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) { sum += a[i] * b[i]; }
    return sum;
}

static inline const float *input_row(const float *inp, const int *inp_rows, int r, int IC) {
    return inp + (size_t)(inp_rows ? inp_rows[r] : r) * IC;
}

// The matrix products of a linear layer: out (rows, OC) = inp (rows, IC) · weight (OC, IC)^T and
// its backward pass. Input row r is inp_rows[r] when inp_rows is given (the gathered tokens of one
// expert), else r. First the reference: the simple loops, kept for reading and for testing the
// fast products below against (test/test_matmul.c). Each output is one dot product, or one sum
// over rows, in a fixed order whatever thread computes it.
#define TILE_ROWS 16
#define TILE_OUT 64

void matmul_forward_reference(float *out, const float *inp, const int *inp_rows, const float *weight,
                              int rows, int IC, int OC) {
    // tiles of weight rows and input rows that stay in cache while every output of the tile is computed
    int row_tiles = (rows + TILE_ROWS - 1) / TILE_ROWS, out_tiles = (OC + TILE_OUT - 1) / TILE_OUT;
    #pragma omp parallel for collapse(2) schedule(static) if ((size_t)rows * IC * OC >= PARALLEL_MIN_WORK)
    for (int rt = 0; rt < row_tiles; rt++) {
        for (int ot = 0; ot < out_tiles; ot++) {
            int r_end = rt * TILE_ROWS + TILE_ROWS < rows ? rt * TILE_ROWS + TILE_ROWS : rows;
            int o_end = ot * TILE_OUT + TILE_OUT < OC ? ot * TILE_OUT + TILE_OUT : OC;
            for (int r = rt * TILE_ROWS; r < r_end; r++) {
                const float *x = input_row(inp, inp_rows, r, IC);
                float *y = out + (size_t)r * OC;
                for (int o = ot * TILE_OUT; o < o_end; o++) {
                    y[o] = dot_product(weight + (size_t)o * IC, x, IC);
                }
            }
        }
    }
}

void matmul_backward_reference(float *dinp, float *dweight, const float *dout, const float *inp,
                               const int *inp_rows, const float *weight, int rows, int IC, int OC) {
    // dinp (rows, IC) += dout · weight: each thread owns whole rows of dinp
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        float *dx = dinp + (size_t)r * IC;
        const float *d = dout + (size_t)r * OC;
        for (int o = 0; o < OC; o++) {
            const float *w = weight + (size_t)o * IC;
            float s = d[o];
            #pragma omp simd
            for (int i = 0; i < IC; i++) { dx[i] += s * w[i]; }
        }
    }
    // dweight (OC, IC) += dout^T · inp: each thread owns whole rows of dweight, summed over r in order
    #pragma omp parallel for schedule(static)
    for (int o = 0; o < OC; o++) {
        float *dw = dweight + (size_t)o * IC;
        for (int r = 0; r < rows; r++) {
            float s = dout[(size_t)r * OC + o];
            const float *x = input_row(inp, inp_rows, r, IC);
            #pragma omp simd
            for (int i = 0; i < IC; i++) { dw[i] += s * x[i]; }
        }
    }
}

// The fast products. All three are one operation, C (M, N) = or += A (M, K) · B (K, N), on
// different views of the same arrays:
//   forward   out     (rows, OC) =  inp (rows, IC) · weight^T   A: inp, gathered rows   B: weight^T
//   backward  dinp    (rows, IC) += dout · weight               A: dout                 B: weight
//             dweight (OC, IC)   += dout^T · inp                A: dout^T   B: inp, gathered rows; K = rows
// sgemm computes it the way optimized BLAS libraries do (K. Goto and R. van de Geijn, "Anatomy of
// high-performance matrix multiplication", 2008). A micro-kernel keeps a GEMM_MR x GEMM_NR block
// of C in vector registers (12 x 32 floats: 24 of the 32 AVX-512 registers) and adds one outer
// product per k: 24 fused multiply-adds for 2 vector loads and 12 broadcasts, so it runs at the
// speed of the FMA units rather than of memory. It reads A and B from packed copies laid out in
// the order it uses them: GEMM_KC values of k at a time, a GEMM_MC x GEMM_KC block of A that
// stays in the L2 cache and a GEMM_KC x GEMM_NC block of B whose GEMM_NR-wide panels stay in L1.
// Packing also gathers rows, transposes, and pads the edges with zeros, so the kernel has a
// single shape; the padded results are never stored.
//
// Determinism: C[m][n] is summed over k in order within each block of GEMM_KC (one register,
// one FMA per k), and the blocks are added to C in order; GEMM_KC is a constant, so the sum is
// the same for any number of threads. Threads take disjoint tiles of C.
#define GEMM_MR 12
#define GEMM_NR 32
#define GEMM_KC 256
#define GEMM_MC 144
#define GEMM_NC 256

// One operand: element (i, j) is data[row(i) * ld + j], or data[row(j) * ld + i] if transposed;
// row(x) = rows[x] when a gather index is given, else x.
typedef struct {
    const float *data;
    const int *rows;
    size_t ld;
    int transposed;
} MatrixView;

static inline const float *view_row(MatrixView v, int r) {
    return v.data + (size_t)(v.rows ? v.rows[r] : r) * v.ld;
}

// Packs A (m0 .. m0+mr-1, k0 .. k0+kc-1) as packed[k * GEMM_MR + i], zeros for i >= mr.
static void pack_a_panel(float *restrict packed, MatrixView a, int m0, int mr, int k0, int kc) {
    if (!a.transposed) {
        for (int i = 0; i < GEMM_MR; i++) {
            const float *src = i < mr ? view_row(a, m0 + i) + k0 : NULL;
            for (int k = 0; k < kc; k++) { packed[k * GEMM_MR + i] = src ? src[k] : 0.0f; }
        }
    } else {
        for (int k = 0; k < kc; k++) {
            const float *src = view_row(a, k0 + k) + m0;
            for (int i = 0; i < GEMM_MR; i++) { packed[k * GEMM_MR + i] = i < mr ? src[i] : 0.0f; }
        }
    }
}

// Packs B (k0 .. k0+kc-1, n0 .. n0+nr-1) as packed[k * GEMM_NR + j], zeros for j >= nr.
static void pack_b_panel(float *restrict packed, MatrixView b, int n0, int nr, int k0, int kc) {
    if (!b.transposed) {
        for (int k = 0; k < kc; k++) {
            const float *src = view_row(b, k0 + k) + n0;
            for (int j = 0; j < GEMM_NR; j++) { packed[k * GEMM_NR + j] = j < nr ? src[j] : 0.0f; }
        }
    } else {
        for (int j = 0; j < GEMM_NR; j++) {
            const float *src = j < nr ? view_row(b, n0 + j) + k0 : NULL;
            for (int k = 0; k < kc; k++) { packed[k * GEMM_NR + j] = src ? src[k] : 0.0f; }
        }
    }
}

// tile (GEMM_MR, GEMM_NR) = packed A panel · packed B panel over kc values of k. Plain C: with
// -O3 the compiler keeps acc in registers and unrolls i into broadcast + FMA on vectors of j.
static void micro_kernel(int kc, const float *restrict a, const float *restrict b, float *restrict tile) {
    float acc[GEMM_MR][GEMM_NR] = {{0.0f}};
    for (int k = 0; k < kc; k++) {
        for (int i = 0; i < GEMM_MR; i++) {
            for (int j = 0; j < GEMM_NR; j++) { acc[i][j] += a[k * GEMM_MR + i] * b[k * GEMM_NR + j]; }
        }
    }
    memcpy(tile, acc, sizeof(acc));
}

// bfloat16: the top 16 bits of a float32 (sign, 8 exponent bits, 7 significand bits), so the same
// range with 8 significant bits instead of 24. A product of two bfloat16 values is exact in
// float32, which is what makes them cheap to accumulate there.
//
// float32 -> bfloat16, rounding to nearest, ties to even: the result is the top 16 bits of the
// returned word (the bottom 16 are zero). Values below float32's normal range become a signed zero,
// as the AVX-512 instructions treat them (DAZ), so both kernels below see the same operands; a NaN
// stays a NaN (quiet). Written without branches, so that the packing loops vectorize.
static inline uint32_t bf16_round_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof(bits));
    uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
    rounded = (bits & 0x7fffffffu) > 0x7f800000u ? bits | 0x00400000u : rounded;  // NaN
    rounded = (bits & 0x7f800000u) == 0 ? bits & 0x80000000u : rounded;           // zero, subnormal
    return rounded & 0xffff0000u;
}

static inline uint16_t bf16_round(float x) { return (uint16_t)(bf16_round_bits(x) >> 16); }

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, sizeof(x));
    return x;
}

// The bf16 kernels read pairs of k: pairs[p * width + i] holds element (i, k = 2p) in its low half
// and (i, 2p + 1) in its high half, from a packed float32 panel (panel[k * width + i], kc values of
// k), rounded; an odd kc ends in a zero.
static void pack_pairs_bf16(uint32_t *restrict pairs, const float *restrict panel, int kc, int width) {
    for (int p = 0; p < kc / 2; p++) {
        const float *even = panel + 2 * p * width, *odd = even + width;
        #pragma omp simd
        for (int i = 0; i < width; i++) { pairs[p * width + i] = bf16_round_bits(even[i]) >> 16 | bf16_round_bits(odd[i]); }
    }
    if (kc % 2) {
        const float *even = panel + (kc - 1) * width;
        for (int i = 0; i < width; i++) { pairs[kc / 2 * width + i] = bf16_round_bits(even[i]) >> 16; }
    }
}

// The bf16 micro-kernel: tile = A panel · B panel over `pairs` pairs of k. Per pair and output it
// adds the odd product, then the even one, each rounded once to float32 (exact products, so one
// fused multiply-add each), and flushes a subnormal sum to zero: what AVX-512's vdpbf16ps does
// (Intel SDM, VDPBF16PS). This portable version and the one below give the same bits, which
// test_matmul checks.
static inline float flush_subnormal(float x) { return fabsf(x) < 0x1p-126f ? copysignf(0.0f, x) : x; }

static void micro_kernel_bf16_portable(int pairs, const uint32_t *restrict a, const uint32_t *restrict b,
                                       float *restrict tile) {
    float acc[GEMM_MR][GEMM_NR] = {{0.0f}};
    for (int p = 0; p < pairs; p++) {
        const uint32_t *ap = a + p * GEMM_MR, *bp = b + p * GEMM_NR;
        for (int i = 0; i < GEMM_MR; i++) {
            float a_even = bf16_to_float((uint16_t)ap[i]), a_odd = bf16_to_float((uint16_t)(ap[i] >> 16));
            for (int j = 0; j < GEMM_NR; j++) {
                float b_even = bf16_to_float((uint16_t)bp[j]), b_odd = bf16_to_float((uint16_t)(bp[j] >> 16));
                float sum = flush_subnormal(fmaf(a_odd, b_odd, acc[i][j]));
                acc[i][j] = flush_subnormal(fmaf(a_even, b_even, sum));
            }
        }
    }
    memcpy(tile, acc, sizeof(acc));
}

#ifdef BF16_NATIVE_BUILD
// The same with vdpbf16ps: per pair of k, two loads of B (32 columns), and for each of the 12 rows
// one broadcast of A's pair and two dot-product instructions, each 32 multiply-adds.
__attribute__((target("avx512f,avx512bf16"))) static void micro_kernel_bf16_avx512(
    int pairs, const uint32_t *restrict a, const uint32_t *restrict b, float *restrict tile) {
    __m512 acc[GEMM_MR][2];
    for (int i = 0; i < GEMM_MR; i++) { acc[i][0] = acc[i][1] = _mm512_setzero_ps(); }
    for (int p = 0; p < pairs; p++) {
        __m512bh b_low = (__m512bh)_mm512_loadu_si512(b + p * GEMM_NR);
        __m512bh b_high = (__m512bh)_mm512_loadu_si512(b + p * GEMM_NR + 16);
        for (int i = 0; i < GEMM_MR; i++) {
            __m512bh a_pair = (__m512bh)_mm512_set1_epi32((int)a[p * GEMM_MR + i]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a_pair, b_low);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a_pair, b_high);
        }
    }
    for (int i = 0; i < GEMM_MR; i++) {
        _mm512_storeu_ps(tile + i * GEMM_NR, acc[i][0]);
        _mm512_storeu_ps(tile + i * GEMM_NR + 16, acc[i][1]);
    }
}
#endif

// Which bf16 kernel runs: AVX-512 BF16 where the CPU has it (asked once), unless
// DTOPP_BF16_PORTABLE=1 asks for the portable one. -1 until asked; the tests set it to compare.
static int bf16_native_kernel = -1;

static int bf16_native(void) {
    if (bf16_native_kernel < 0) {
        int has = 0;
#ifdef BF16_NATIVE_BUILD
        __builtin_cpu_init();
        has = __builtin_cpu_supports("avx512bf16");
#endif
        const char *portable = getenv("DTOPP_BF16_PORTABLE");
        bf16_native_kernel = has && !(portable && strcmp(portable, "1") == 0);
    }
    return bf16_native_kernel;
}

static void micro_kernel_bf16(int pairs, const uint32_t *a, const uint32_t *b, float *tile) {
#ifdef BF16_NATIVE_BUILD
    if (bf16_native()) {
        micro_kernel_bf16_avx512(pairs, a, b, tile);
        return;
    }
#endif
    micro_kernel_bf16_portable(pairs, a, b, tile);
}

// The view of the block of v that starts at element (i0, j0).
static MatrixView view_offset(MatrixView v, int i0, int j0) {
    int row0 = v.transposed ? j0 : i0, col0 = v.transposed ? i0 : j0;
    if (v.rows) { v.rows += row0; } else { v.data += (size_t)row0 * v.ld; }
    v.data += col0;
    return v;
}

// C (M, N) (row-major, ldc floats between rows) = A · B, or += when accumulate is set; on the
// calling thread. With BF16 operands the packed panels are rounded to bfloat16 pairs (the same
// blocks, so the same order of sums per block of GEMM_KC). The packed blocks live on its stack
// (about 600 KB).
static void sgemm_serial(int M, int N, int K, MatrixView a, MatrixView b, float *c, size_t ldc,
                         int accumulate, Precision precision) {
    if (M <= 0 || N <= 0) { return; }
    if (K <= 0) {
        for (int m = 0; !accumulate && m < M; m++) { memset(c + m * ldc, 0, N * sizeof(float)); }
        return;
    }
    _Alignas(64) float packed_a[GEMM_MC * GEMM_KC];
    _Alignas(64) float packed_b[GEMM_KC * GEMM_NC];
    _Alignas(64) uint32_t packed_a16[GEMM_MC * GEMM_KC / 2 + GEMM_MR];  // + the odd kc's zero
    _Alignas(64) uint32_t packed_b16[GEMM_KC * GEMM_NC / 2 + GEMM_NC];
    _Alignas(64) float tile[GEMM_MR * GEMM_NR];
    int bf16 = precision == BF16;
    for (int nb = 0; nb < N; nb += GEMM_NC) {
        int nb_end = nb + GEMM_NC < N ? nb + GEMM_NC : N;
        for (int k0 = 0; k0 < K; k0 += GEMM_KC) {
            int kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC, pairs = (kc + 1) / 2;
            int add = accumulate || k0 > 0;
            for (int n0 = nb; n0 < nb_end; n0 += GEMM_NR) {
                pack_b_panel(packed_b + (n0 - nb) * kc, b, n0, nb_end - n0, k0, kc);
                if (bf16) { pack_pairs_bf16(packed_b16 + (n0 - nb) * pairs, packed_b + (n0 - nb) * kc, kc, GEMM_NR); }
            }
            for (int mb = 0; mb < M; mb += GEMM_MC) {
                int mb_end = mb + GEMM_MC < M ? mb + GEMM_MC : M;
                for (int m0 = mb; m0 < mb_end; m0 += GEMM_MR) {
                    pack_a_panel(packed_a + (m0 - mb) * kc, a, m0, mb_end - m0, k0, kc);
                    if (bf16) { pack_pairs_bf16(packed_a16 + (m0 - mb) * pairs, packed_a + (m0 - mb) * kc, kc, GEMM_MR); }
                }
                for (int n0 = nb; n0 < nb_end;
                     n0 += GEMM_NR) {  // the B panel stays in L1 across the A panels
                    int nr = nb_end - n0 < GEMM_NR ? nb_end - n0 : GEMM_NR;
                    for (int m0 = mb; m0 < mb_end; m0 += GEMM_MR) {
                        int mr = mb_end - m0 < GEMM_MR ? mb_end - m0 : GEMM_MR;
                        if (bf16) {
                            micro_kernel_bf16(pairs, packed_a16 + (m0 - mb) * pairs,
                                              packed_b16 + (n0 - nb) * pairs, tile);
                        } else {
                            micro_kernel(kc, packed_a + (m0 - mb) * kc, packed_b + (n0 - nb) * kc, tile);
                        }
                        for (int i = 0; i < mr; i++) {
                            float *dst = c + (size_t)(m0 + i) * ldc + n0;
                            const float *src = tile + i * GEMM_NR;
                            if (add) {
                                for (int j = 0; j < nr; j++) { dst[j] += src[j]; }
                            } else {
                                for (int j = 0; j < nr; j++) { dst[j] = src[j]; }
                            }
                        }
                    }
                }
            }
        }
    }
}

// The same on all threads: each computes whole tiles of C with sgemm_serial. Tiles are
// GEMM_NC columns wide, and rows are split so that there are about four tiles per thread
// (dynamic scheduling then evens out uneven tiles and a thread slowed by a busy core). The tiling
// decides who computes an element, never how, so it may depend on the number of threads.
static void sgemm(int M, int N, int K, MatrixView a, MatrixView b, float *c, size_t ldc, int accumulate,
                  Precision precision) {
    if (M <= 0 || N <= 0) { return; }
    if (precision == BF16) { bf16_native(); }  // asked once, before the threads start
    int n_tiles = (N + GEMM_NC - 1) / GEMM_NC, m_panels = (M + GEMM_MR - 1) / GEMM_MR;
    int m_tiles = (4 * omp_threads() + n_tiles - 1) / n_tiles;
    m_tiles = m_tiles < m_panels ? m_tiles : m_panels;
    int tile_rows = (m_panels + m_tiles - 1) / m_tiles * GEMM_MR;
    m_tiles = (M + tile_rows - 1) / tile_rows;
    #pragma omp parallel for schedule(dynamic, 1) if ((size_t)M * N * K >= PARALLEL_MIN_WORK)
    for (int t = 0; t < m_tiles * n_tiles; t++) {
        int m0 = t / n_tiles * tile_rows, n0 = t % n_tiles * GEMM_NC;
        int m = M - m0 < tile_rows ? M - m0 : tile_rows, n = N - n0 < GEMM_NC ? N - n0 : GEMM_NC;
        float *c_tile = c + m0 * ldc + n0;
        sgemm_serial(m, n, K, view_offset(a, m0, 0), view_offset(b, 0, n0), c_tile, ldc, accumulate, precision);
    }
}

// Products of row-major matrices on the calling thread, for code that splits the work between
// threads itself (attention: each thread owns whole heads). c (M, N) = a · b, or += when
// accumulate is set; ld* is the distance between the rows of each matrix, in floats.
//   matmul_nt: a (M, K) · b^T, b (N, K)
//   matmul_nn: a (M, K) · b,   b (K, N)
//   matmul_tn: a^T · b,        a (K, M), b (K, N)
static inline void matmul_nt(float *c, size_t ldc, const float *a, size_t lda, const float *b, size_t ldb,
                             int M, int N, int K, int accumulate) {
    MatrixView va = {a, NULL, lda, 0}, vb = {b, NULL, ldb, 1};
    sgemm_serial(M, N, K, va, vb, c, ldc, accumulate, FLOAT32);
}

static inline void matmul_nn(float *c, size_t ldc, const float *a, size_t lda, const float *b, size_t ldb,
                             int M, int N, int K, int accumulate) {
    MatrixView va = {a, NULL, lda, 0}, vb = {b, NULL, ldb, 0};
    sgemm_serial(M, N, K, va, vb, c, ldc, accumulate, FLOAT32);
}

static inline void matmul_tn(float *c, size_t ldc, const float *a, size_t lda, const float *b, size_t ldb,
                             int M, int N, int K, int accumulate) {
    MatrixView va = {a, NULL, lda, 1}, vb = {b, NULL, ldb, 0};
    sgemm_serial(M, N, K, va, vb, c, ldc, accumulate, FLOAT32);
}

void matmul_forward(float *out, const float *inp, const int *inp_rows, const float *weight,
                    int rows, int IC, int OC, Precision precision) {
    // With fewer rows than the micro-kernel's, packing the weights would cost more than the
    // products (sampling computes one row at a time): one dot product per output, weights read once.
    if (rows < GEMM_MR && precision == FLOAT32) {
        matmul_forward_reference(out, inp, inp_rows, weight, rows, IC, OC);
        return;
    }
    MatrixView a = {inp, inp_rows, IC, 0}, b = {weight, NULL, IC, 1};
    sgemm(rows, OC, IC, a, b, out, OC, 0, precision);
}

void matmul_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                     const int *inp_rows, const float *weight, int rows, int IC, int OC, Precision precision) {
    MatrixView d = {dout, NULL, OC, 0}, w = {weight, NULL, IC, 0};
    sgemm(rows, IC, OC, d, w, dinp, IC, 1, precision);
    MatrixView dt = {dout, NULL, OC, 1}, x = {inp, inp_rows, IC, 0};
    sgemm(OC, IC, rows, dt, x, dweight, IC, 1, precision);
}

static inline float exp_fast(float x) {
    float xc = x > -87.3f ? x : -87.3f;  // also maps NaN to a finite value for the integer conversion
    xc = xc < 88.0f ? xc : 88.0f;
    float n = nearbyintf(xc * 1.44269504088896341f);
    float r = fmaf(n, -0.693145751953125f, xc);  // ln 2 in two parts: n ln2 exactly, then the rest
    r = fmaf(n, -1.428606765330187e-6f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p * r, r, r) + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof(two_n));
    float y = p * two_n;
    y = x < -87.3f ? 0.0f : y;
    y = x > 88.0f ? INFINITY : y;
    return x == x ? y : x;
}

#endif  // MATMUL_H
