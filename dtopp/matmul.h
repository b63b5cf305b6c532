/*
matmul.h: the CPU's matrix products, and the e^x its softmaxes and SiLU use.

- matmul_forward / matmul_backward: the products of a linear layer, out (rows, OC) = inp (rows, IC)
  · weight (OC, IC)^T and its backward pass (adding to the weight's gradient, and to the input's or
  writing it), with an optional gather of input rows (the tokens of one expert);
  matmul_forward_grouped / matmul_backward_grouped: those of all the experts of a layer at once;
  matmul_forward_grouped_pair / matmul_backward_grouped_pair: of two such layers on the same inputs
  (SwiGLU's W1 and W3), each expert's input rows packed once for both.
  They run the packed sgemm below, which reaches most of the FMA units' speed.
- matmul_forward_reference / matmul_backward_reference: the same products as simple loops, which
  test/test_matmul.c checks the fast ones against.
- sgemm_batch / sgemm_serial on MatrixView operands, and the products on the calling thread that
  sampling's attention (decoder.h) and the readable attention of the tests are written with:
  matmul_nt (a · b^T, the scores q · k^T), matmul_nn (a · b, P · v) and matmul_tn (a^T · b).
- the register tiles and the packing under them (micro_kernel, micro_kernel_bf16, pack_panel,
  pack_panel_bf16), which the model's attention (attention.h) calls directly on panels it packs once.
- exp_fast: e^x in plain C that the compiler vectorizes.

Determinism: every output is computed by one thread, in an order that does not depend on the
number of threads, so results are bitwise identical for any number of threads.
*/
#ifndef MATMUL_H
#define MATMUL_H

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include "utils.h"  // defines: fail, checked memory and file I/O, file headers, omp_threads, in_parallel_region
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BF16_NATIVE_BUILD 1  // the compiler can emit AVX-512 and vdpbf16ps; the CPU is asked at run time
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
// stays in the L2 cache and a GEMM_KC x GEMM_NC block of B (in L3, shared by the threads) whose
// GEMM_NR-wide panels stay in L1. Rows of A are packed again for every GEMM_NC columns, so wide
// products (qkv's 3C, the LM head's vocabulary) want GEMM_NC large: at 256 the LM head's input
// was packed 197 times for the GPT-2 vocabulary.
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
#define GEMM_NC 1024

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

// Packs a panel of `width` values of x by kc of k, packed[k * width + x] = element (x0 + x, k0 + k),
// zeros for x >= nx. Element (x, k) is v's (row x, column k), or (row k, column x) if transposed:
// A panels are A's rows (x = i), B panels are B's columns (x = j, so B is passed transposed).
static inline void pack_panel_portable(float *restrict packed, MatrixView v, int x0, int nx, int k0, int kc,
                                       int width) {
    if (!v.transposed) {
        for (int x = 0; x < width; x++) {
            const float *src = x < nx ? view_row(v, x0 + x) + k0 : NULL;
            for (int k = 0; k < kc; k++) { packed[k * width + x] = src ? src[k] : 0.0f; }
        }
    } else if (nx >= width) {  // the common case apart: a copy of a known size becomes vector moves
        for (int k = 0; k < kc; k++) { memcpy(packed + k * width, view_row(v, k0 + k) + x0, width * sizeof(float)); }
    } else {
        for (int k = 0; k < kc; k++) {
            const float *src = view_row(v, k0 + k) + x0;
            for (int x = 0; x < width; x++) { packed[k * width + x] = x < nx ? src[x] : 0.0f; }
        }
    }
}

#ifdef BF16_NATIVE_BUILD
// 16 x 16 transpose of 32-bit elements in registers: afterwards r[j] holds what was column j.
// Pairs of rows interleaved by 32 bits, then by 64 bits (a 4 x 4 block per 128-bit lane), then the
// 128-bit lanes of four registers swapped as a 4 x 4 transpose of lanes.
__attribute__((target("avx512f"))) static inline void transpose_16x16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // r[i + j], lane L: rows i .. i+3 of column 4L + j
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        __m512i low = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), high = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xee);
        __m512i low2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
        __m512i high2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xee);
        t[j] = _mm512_shuffle_i32x4(low, low2, 0x88);
        t[4 + j] = _mm512_shuffle_i32x4(low, low2, 0xdd);
        t[8 + j] = _mm512_shuffle_i32x4(high, high2, 0x88);
        t[12 + j] = _mm512_shuffle_i32x4(high, high2, 0xdd);
    }
    for (int i = 0; i < 16; i++) { r[i] = t[i]; }
}

static inline __mmask16 first_lanes(int n) { return n <= 0 ? 0 : n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1); }
#endif

#if defined(BF16_NATIVE_BUILD) && defined(__AVX512F__)
// pack_panel_portable's rows case (all of the panel's rows in the matrix) in vectors, 16 rows at a
// time: 16 values of k of each row loaded at once, transposed in registers, one store per k
// instead of one per value; it moves the same bits (test_matmul compares the two). A's panels of
// 12 rows, and B's of 32 where B is a matrix transposed (the weights in the forward pass, and
// attention's q, k, v and dO). Built where the compiler targets AVX-512, as -march=native does on such CPUs.
static void pack_rows_avx512(float *restrict packed, MatrixView v, int x0, int k0, int kc, int width) {
    for (int xg = 0; xg < width; xg += 16) {
        int lanes = width - xg < 16 ? width - xg : 16;
        const float *rows[16];
        for (int x = 0; x < lanes; x++) { rows[x] = view_row(v, x0 + xg + x) + k0; }
        for (int k = 0; k < kc; k += 16) {
            __m512i r[16];
            for (int x = 0; x < 16; x++) {
                r[x] = x < lanes ? _mm512_maskz_loadu_epi32(first_lanes(kc - k), rows[x] + k) : _mm512_setzero_si512();
            }
            transpose_16x16(r);
            for (int q = 0; q < 16 && k + q < kc; q++) {
                _mm512_mask_storeu_epi32(packed + (size_t)(k + q) * width + xg, first_lanes(lanes), r[q]);
            }
        }
    }
}
#endif

static inline void pack_panel(float *restrict packed, MatrixView v, int x0, int nx, int k0, int kc, int width) {
#if defined(BF16_NATIVE_BUILD) && defined(__AVX512F__)
    if (!v.transposed && nx >= width) {
        pack_rows_avx512(packed, v, x0, k0, kc, width);
        return;
    }
#endif
    pack_panel_portable(packed, v, x0, nx, k0, kc, width);
}

static MatrixView transposed_view(MatrixView v) {
    v.transposed = !v.transposed;
    return v;
}

// acc + x·y, rounded once (a fused multiply-add) where the compiler targets FMA units; else rounded
// twice, as ISO C's a * b + c is (-std=c11 does not contract it).
static inline float multiply_add(float x, float y, float acc) {
#ifdef __FMA__
    return fmaf(x, y, acc);
#else
    return acc + x * y;
#endif
}

// tile (GEMM_MR, GEMM_NR) = packed A panel · packed B panel over kc >= 1 values of k. Plain C: with
// -O3 -march=native the compiler keeps acc in registers and unrolls i into a broadcast and fused
// multiply-adds on vectors of j. multiply_add asks for the FMA explicitly: written acc + a * b,
// -std=c11 keeps the multiply and the add apart, two instructions per term. Not inlined: inside
// sgemm's threaded loops GCC 12 kept acc in memory instead, and ran 3x slower. acc starts from the
// first k's terms, and goes out row by row: initialized with = {0} and copied whole, it became calls
// to memset and memcpy of 1.5 KB at every call of the kernel.
__attribute__((noinline)) static void micro_kernel(int kc, const float *restrict a, const float *restrict b,
                                                   float *restrict tile) {
    float acc[GEMM_MR][GEMM_NR];
    for (int i = 0; i < GEMM_MR; i++) {
        for (int j = 0; j < GEMM_NR; j++) { acc[i][j] = multiply_add(a[i], b[j], 0.0f); }
    }
    for (int k = 1; k < kc; k++) {
        for (int i = 0; i < GEMM_MR; i++) {
            float a_ik = a[k * GEMM_MR + i];
            for (int j = 0; j < GEMM_NR; j++) { acc[i][j] = multiply_add(a_ik, b[k * GEMM_NR + j], acc[i][j]); }
        }
    }
    for (int i = 0; i < GEMM_MR; i++) { memcpy(tile + i * GEMM_NR, acc[i], sizeof(acc[i])); }
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

// The bf16 kernels read pairs of k: the same panel as pack_panel's, rounded, with pairs[p * width + x]
// holding element (x, k = 2p) in its low half and (x, 2p + 1) in its high half; an odd kc ends in
// a zero.
static inline uint32_t bf16_pair(float even, float odd) { return bf16_round_bits(even) >> 16 | bf16_round_bits(odd); }

static inline void pack_panel_bf16_portable(uint32_t *restrict pairs, MatrixView v, int x0, int nx, int k0, int kc,
                                            int width) {
    if (!v.transposed) {  // each x's values of k are contiguous: pairs straight from them
        for (int x = 0; x < width; x++) {
            const float *src = x < nx ? view_row(v, x0 + x) + k0 : NULL;
            for (int p = 0; p < kc / 2; p++) { pairs[p * width + x] = src ? bf16_pair(src[2 * p], src[2 * p + 1]) : 0; }
            if (kc % 2) { pairs[kc / 2 * width + x] = src ? bf16_pair(src[kc - 1], 0.0f) : 0; }
        }
        return;
    }
    enum { K_CHUNK = 16 };  // rows of k copied as pack_panel does, then rounded in vectors of x
    _Alignas(64) float chunk[(K_CHUNK + 1) * GEMM_NR];
    for (int k = 0; k < kc; k += K_CHUNK) {
        int n = kc - k < K_CHUNK ? kc - k : K_CHUNK;
        pack_panel(chunk, v, x0, nx, k0 + k, n, width);
        memset(chunk + n * width, 0, width * sizeof(float));  // the odd kc's zero
        for (int p = 0; p < (n + 1) / 2; p++) {
            const float *even = chunk + 2 * p * width, *odd = even + width;
            for (int x = 0; x < width; x++) { pairs[(k / 2 + p) * width + x] = bf16_pair(even[x], odd[x]); }
        }
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

// pack_panel_bf16_portable with AVX-512 BF16, the same bits: vcvtne2ps2bf16 rounds to nearest even,
// turns subnormals into signed zeros and quiets NaNs, as bf16_round_bits does (Intel SDM,
// VCVTNE2PS2BF16), which test_matmul checks on such values. Groups of 16 values of x: where each x's
// values of k are contiguous, 32 of them become 16 pairs in one register, and 16 such registers
// (one per x) are transposed; where each k's values of x are, two rows of k are rounded together
// and their halves interleaved. Not inlined: GCC 12 inlined it into multiply_rows once that had
// room, and the bf16 products ran 3 to 5% slower.
__attribute__((noinline, target("avx512f,avx512bw,avx512bf16"))) static void pack_panel_bf16_avx512(
    uint32_t *restrict pairs, MatrixView v, int x0, int nx, int k0, int kc, int width) {
    int n_pairs = (kc + 1) / 2;
    for (int xg = 0; xg < width; xg += 16) {
        int lanes = width - xg < 16 ? width - xg : 16;
        __mmask16 store = first_lanes(lanes), valid = first_lanes(nx - xg < lanes ? nx - xg : lanes);
        if (!v.transposed) {
            for (int k = 0; k < kc; k += 32) {
                __m512i r[16];
                for (int x = 0; x < 16; x++) {
                    r[x] = _mm512_setzero_si512();
                    if (!(valid >> x & 1)) { continue; }
                    const float *src = view_row(v, x0 + xg + x) + k0 + k;
                    __m512 low = _mm512_maskz_loadu_ps(first_lanes(kc - k), src);
                    __m512 high = _mm512_maskz_loadu_ps(first_lanes(kc - k - 16), src + 16);
                    r[x] = (__m512i)_mm512_cvtne2ps_pbh(high, low);  // pair q: k + 2q in its low half
                }
                transpose_16x16(r);
                for (int q = 0; q < 16 && k / 2 + q < n_pairs; q++) {
                    _mm512_mask_storeu_epi32(pairs + (size_t)(k / 2 + q) * width + xg, store, r[q]);
                }
            }
        } else {
            // word 2x from the even row's x, word 2x + 1 from the odd row's (words 16 + x)
            const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
            for (int p = 0; p < n_pairs; p++) {
                __m512 even = _mm512_maskz_loadu_ps(valid, view_row(v, k0 + 2 * p) + x0 + xg);
                __m512 odd = 2 * p + 1 < kc ? _mm512_maskz_loadu_ps(valid, view_row(v, k0 + 2 * p + 1) + x0 + xg)
                                            : _mm512_setzero_ps();
                __m512i words = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
                _mm512_mask_storeu_epi32(pairs + (size_t)p * width + xg, store, words);
            }
        }
    }
}
#endif

// Which bf16 kernel runs: AVX-512 BF16 where the CPU has it, unless DTOPP_BF16_PORTABLE=1 asks for
// the portable one. -1 until asked; the tests set it to compare. Asked on first use, which may be
// from several threads at once (attention's products run inside its own parallel region): they
// all find the same answer, and the atomic load and store keep that from being a data race.
static atomic_int bf16_native_kernel = -1;

static int bf16_native(void) {
    int native = atomic_load_explicit(&bf16_native_kernel, memory_order_relaxed);
    if (native < 0) {
        int has = 0;
#ifdef BF16_NATIVE_BUILD
        __builtin_cpu_init();
        has = __builtin_cpu_supports("avx512bf16");
#endif
        const char *portable = getenv("DTOPP_BF16_PORTABLE");
        native = has && !(portable && strcmp(portable, "1") == 0);
        atomic_store_explicit(&bf16_native_kernel, native, memory_order_relaxed);
    }
    return native;
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

static void pack_panel_bf16(uint32_t *restrict pairs, MatrixView v, int x0, int nx, int k0, int kc, int width) {
#ifdef BF16_NATIVE_BUILD
    if (bf16_native()) {
        pack_panel_bf16_avx512(pairs, v, x0, nx, k0, kc, width);
        return;
    }
#endif
    pack_panel_bf16_portable(pairs, v, x0, nx, k0, kc, width);
}

// dst (n) = or += src (n), n <= GEMM_NR: a row of the micro-kernel's tile into C. Full rows apart, so
// that they are two vector moves instead of a call to memcpy (which GCC makes of the variable copy).
static inline void store_tile_row(float *restrict dst, const float *restrict src, int n, int add) {
    if (n == GEMM_NR && add) {
        for (int j = 0; j < GEMM_NR; j++) { dst[j] += src[j]; }
    } else if (n == GEMM_NR) {
        for (int j = 0; j < GEMM_NR; j++) { dst[j] = src[j]; }
    } else {
        for (int j = 0; j < n; j++) { dst[j] = add ? dst[j] + src[j] : src[j]; }
    }
}

// Rows m_begin .. m_end-1 of A (at most GEMM_MC) over one block of k (k0, kc values) into
// packed_a, or packed_a16 with bf16 operands, for multiply_rows.
static void pack_rows(MatrixView a, int m_begin, int m_end, int k0, int kc, int bf16, float *packed_a,
                      uint32_t *packed_a16) {
    int pairs = (kc + 1) / 2;
    for (int m0 = m_begin; m0 < m_end; m0 += GEMM_MR) {
        if (bf16) {
            pack_panel_bf16(packed_a16 + (m0 - m_begin) * pairs, a, m0, m_end - m0, k0, kc, GEMM_MR);
        } else {
            pack_panel(packed_a + (m0 - m_begin) * kc, a, m0, m_end - m0, k0, kc, GEMM_MR);
        }
    }
}

// Rows m_begin .. m_end-1 of C, packed by pack_rows, against the packed panels of B for columns
// n_begin .. n_end-1: the micro-kernel on every pair of row panel and B panel, each B panel
// staying in L1 across the row panels. C is written, or added to when add is set.
static void multiply_rows(int m_begin, int m_end, int n_begin, int n_end, int kc, const float *packed_a,
                          const uint32_t *packed_a16, const float *packed_b, const uint32_t *packed_b16, float *c,
                          size_t ldc, int add, int bf16) {
    _Alignas(64) float tile[GEMM_MR * GEMM_NR];
    int pairs = (kc + 1) / 2;
    for (int n0 = n_begin; n0 < n_end; n0 += GEMM_NR) {
        int nr = n_end - n0 < GEMM_NR ? n_end - n0 : GEMM_NR, panel = n0 - n_begin;
        for (int m0 = m_begin; m0 < m_end; m0 += GEMM_MR) {
            int mr = m_end - m0 < GEMM_MR ? m_end - m0 : GEMM_MR;
            for (int i = 0; i < mr; i++) {  // C's tile, fetched while the kernel runs (its 32 floats: 2 lines)
                __builtin_prefetch(c + (size_t)(m0 + i) * ldc + n0, 1);
                __builtin_prefetch(c + (size_t)(m0 + i) * ldc + n0 + nr - 1, 1);
            }
            if (bf16) {
                micro_kernel_bf16(pairs, packed_a16 + (m0 - m_begin) * pairs, packed_b16 + panel * pairs, tile);
            } else {
                micro_kernel(kc, packed_a + (m0 - m_begin) * kc, packed_b + panel * kc, tile);
            }
            for (int i = 0; i < mr; i++) {
                store_tile_row(c + (size_t)(m0 + i) * ldc + n0, tile + i * GEMM_NR, nr, add);
            }
        }
    }
}

// One product of a batch: C (M, N) (row-major, ldc floats between rows) = A (M, K) · B (K, N), or
// += when the batch accumulates. N is the batch's; the products of a batch write disjoint C.
// a_from_previous: A is the previous product's (the same view, M and K), whose packed rows this
// product reuses; b_from_previous: likewise B (the same view, M and K), packed once for both. Each
// product still holds its own views, and gives the same bits as alone.
typedef struct {
    int M, K;
    MatrixView a, b;
    float *c;
    size_t ldc;
    int a_from_previous, b_from_previous;
} GemmProduct;

// The first product of a batch has no previous one to share with (without threads, sgemm_batch
// runs a batch's products as batches of one).
static int shares_a(const GemmProduct *products, int g) { return g > 0 && products[g].a_from_previous; }
static int shares_b(const GemmProduct *products, int g) { return g > 0 && products[g].b_from_previous; }

// The products of a batch (the experts of a layer, or one product alone; products that share an
// operand with the previous one use its packed copy, GemmProduct). With BF16 operands the
// packed panels are rounded to bfloat16 pairs (the same blocks, so the same order of sums per
// block of GEMM_KC).
//
// Threads (use_threads): for each GEMM_NC columns and up to GEMM_KB values of k (fewer per product
// in larger batches), they first pack every product's B panels together, so that B is packed once
// whatever the number of threads, then take work items: chunks of a product's rows (each thread
// packing its own rows of A, one block of GEMM_KC at a time) by groups of the packed panels.
// Chunks are whole micro-panels of rows, about four items per thread over the batch, so that
// dynamic scheduling evens out uneven items and a thread slowed by a busy core; groups of panels
// split the columns only when there are too few rows for that. A batch is one parallel loop, not
// one per product: each costs a few wake-ups of sleeping threads. Each item goes through the blocks
// of k in order, so every element of C is summed in the same order whatever the number of threads;
// the split decides only who computes it. Without threads (matmul_nt and the others below, which
// the tests' readable attention calls from its own threads) everything runs on the calling thread,
// product by product and one block of k at a time, GEMM_STACK_NC columns at a time, with the packed
// blocks on its stack (about 600 KB).
#define GEMM_KB (4 * GEMM_KC)
#define GEMM_STACK_NC 256

// The threaded path's packed B (GEMM_KB values of k by GEMM_NC columns, or a block of k of each
// product of a batch: 4 MB at C = 256), kept for the next call and never freed. Allocated and freed
// by every call, its pages went back to the system and were faulted in again (glibc trims the
// heap), which slowed some products by a third.
static float *gemm_pack_buffer;
static size_t gemm_pack_floats;

static float *gemm_pack_reserve(size_t floats) {
    if (floats > gemm_pack_floats) {
        free(gemm_pack_buffer);
        gemm_pack_buffer = (float *)malloc_check(floats * sizeof(float));
        gemm_pack_floats = floats;
    }
    return gemm_pack_buffer;
}

// How sgemm_batch splits a batch: the products, their work items, the shared packed B.
typedef struct {
    const GemmProduct *products;
    int count, N, accumulate, bf16;
    int nc;  // columns per pack: GEMM_NC, or N in whole panels when that is fewer
    int chunk_rows, m_chunks, groups_wanted, k_blocks, blocks_per_pack;
    const int *first_chunk;  // product g's chunks of rows: first_chunk[g] .. first_chunk[g+1]-1
    float *packed_b;         // product g, block t of the pack: block g * blocks_per_pack + t
    uint32_t *packed_b16;
} GemmPlan;

// The B panels of one pack: columns nb .. nb_end-1, blocks first .. first+blocks-1 of k.
typedef struct {
    int nb, nb_end, panels, groups, group_panels, first, blocks;
} GemmPack;

static size_t packed_offset(const GemmPlan *plan, int g, int t, int q, int kc, int bf16) {
    size_t block = (size_t)g * plan->blocks_per_pack + t;
    if (bf16) { return block * GEMM_KC / 2 * plan->nc + q * GEMM_NR * ((kc + 1) / 2); }
    return block * GEMM_KC * plan->nc + q * GEMM_NR * kc;
}

// Work item i of packing: panel i % panels of block i / panels % blocks of product i / (blocks·panels).
static void pack_b_item(const GemmPlan *plan, GemmPack pk, int i) {
    int g = i / (pk.blocks * pk.panels), t = i / pk.panels % pk.blocks, q = i % pk.panels;
    GemmProduct p = plan->products[g];
    int n0 = pk.nb + q * GEMM_NR, k0 = (pk.first + t) * GEMM_KC, kc = p.K - k0 < GEMM_KC ? p.K - k0 : GEMM_KC;
    if (p.M <= 0 || kc <= 0 || shares_b(plan->products, g)) { return; }
    if (plan->bf16) {
        pack_panel_bf16(plan->packed_b16 + packed_offset(plan, g, t, q, kc, 1), transposed_view(p.b), n0,
                        pk.nb_end - n0, k0, kc, GEMM_NR);
    } else {
        pack_panel(plan->packed_b + packed_offset(plan, g, t, q, kc, 0), transposed_view(p.b), n0, pk.nb_end - n0,
                   k0, kc, GEMM_NR);
    }
}

// Work item of multiplying: one chunk of a product's rows by one group of the pack's panels, and
// the same rows of the products after it that share its A (one packing of the rows for all).
static void multiply_item(const GemmPlan *plan, GemmPack pk, int item, float *packed_a, uint32_t *packed_a16) {
    int chunk = item / pk.groups, g = 0, q = item % pk.groups * pk.group_panels;
    while (plan->first_chunk[g + 1] <= chunk) { g++; }
    GemmProduct p = plan->products[g];
    int last = g;
    while (last + 1 < plan->count && shares_a(plan->products, last + 1)) { last++; }
    int m_begin = (chunk - plan->first_chunk[g]) * plan->chunk_rows;
    int m_end = m_begin + plan->chunk_rows < p.M ? m_begin + plan->chunk_rows : p.M;
    int n_begin = pk.nb + q * GEMM_NR, n_end = n_begin + pk.group_panels * GEMM_NR;
    n_end = n_end < pk.nb_end ? n_end : pk.nb_end;
    for (int t = 0; t < pk.blocks && (pk.first + t) * GEMM_KC < p.K; t++) {
        int k0 = (pk.first + t) * GEMM_KC, kc = p.K - k0 < GEMM_KC ? p.K - k0 : GEMM_KC;
        pack_rows(p.a, m_begin, m_end, k0, kc, plan->bf16, packed_a, packed_a16);
        for (int h = g; h <= last; h++) {
            int owner = shares_b(plan->products, h) ? h - 1 : h;  // whose packed B this product reads
            multiply_rows(m_begin, m_end, n_begin, n_end, kc, packed_a, packed_a16,
                          plan->packed_b + packed_offset(plan, owner, t, q, kc, 0),
                          plan->packed_b16 + packed_offset(plan, owner, t, q, kc, 1), plan->products[h].c,
                          plan->products[h].ldc, plan->accumulate || k0 > 0, plan->bf16);
        }
    }
}

// The loops over packs, run by every thread of a team (threads set: the work items are shared out
// by the enclosing parallel region) or by the calling thread alone. Without threads it opens no
// parallel region: the tests' readable attention calls it from its own threads, and an inner
// parallel region, even of one thread, costs system calls.
static void sgemm_loops(const GemmPlan *plan, int threads) {
    _Alignas(64) float packed_a[GEMM_MC * GEMM_KC];
    _Alignas(64) uint32_t packed_a16[GEMM_MC * GEMM_KC / 2];
    for (int nb = 0; nb < plan->N; nb += plan->nc) {
        GemmPack pk = {nb, nb + plan->nc < plan->N ? nb + plan->nc : plan->N, 0, 0, 0, 0, 0};
        pk.panels = (pk.nb_end - nb + GEMM_NR - 1) / GEMM_NR;
        pk.groups = plan->groups_wanted < pk.panels ? plan->groups_wanted : pk.panels;
        pk.group_panels = (pk.panels + pk.groups - 1) / pk.groups;
        pk.groups = (pk.panels + pk.group_panels - 1) / pk.group_panels;
        for (pk.first = 0; pk.first < plan->k_blocks; pk.first += plan->blocks_per_pack) {
            pk.blocks = plan->k_blocks - pk.first < plan->blocks_per_pack ? plan->k_blocks - pk.first
                                                                           : plan->blocks_per_pack;
            int packs = plan->count * pk.blocks * pk.panels, items = plan->m_chunks * pk.groups;
            if (threads) {
                #pragma omp for schedule(static)
                for (int i = 0; i < packs; i++) { pack_b_item(plan, pk, i); }
                #pragma omp for schedule(dynamic, 1)
                for (int item = 0; item < items; item++) { multiply_item(plan, pk, item, packed_a, packed_a16); }
            } else {
                for (int i = 0; i < packs; i++) { pack_b_item(plan, pk, i); }
                for (int item = 0; item < items; item++) { multiply_item(plan, pk, item, packed_a, packed_a16); }
            }
        }
    }
}

static void sgemm_batch(int count, const GemmProduct *products, int N, int accumulate, Precision precision,
                        int use_threads) {
    if (N <= 0) { return; }
    size_t work = 0;
    int k_blocks = 0, m_panels = 0;
    for (int g = 0; g < count; g++) {
        GemmProduct p = products[g];
        for (int m = 0; p.K <= 0 && !accumulate && m < p.M; m++) { memset(p.c + m * p.ldc, 0, N * sizeof(float)); }
        if (p.M <= 0 || p.K <= 0) { continue; }
        work += (size_t)p.M * N * p.K;
        k_blocks = (p.K + GEMM_KC - 1) / GEMM_KC > k_blocks ? (p.K + GEMM_KC - 1) / GEMM_KC : k_blocks;
        m_panels += shares_a(products, g) ? 0 : (p.M + GEMM_MR - 1) / GEMM_MR;  // its rows go with the previous
    }
    if (work == 0) { return; }
    // inside a parallel region the threads would share gemm_pack_buffer: the calling thread alone then
    use_threads = use_threads && omp_threads() > 1 && work >= PARALLEL_MIN_WORK && !in_parallel_region();
    if (!use_threads && count > 1) {
        for (int g = 0; g < count; g++) { sgemm_batch(1, products + g, N, accumulate, precision, 0); }
        return;
    }
    int items = use_threads ? 4 * omp_threads() : 1, chunk_panels = (m_panels + items - 1) / items;
    chunk_panels = chunk_panels < GEMM_MC / GEMM_MR ? chunk_panels : GEMM_MC / GEMM_MR;
    int chunk_rows = chunk_panels * GEMM_MR, first_chunk[count + 1];
    first_chunk[0] = 0;
    for (int g = 0; g < count; g++) {
        int has_work = products[g].M > 0 && products[g].K > 0 && !shares_a(products, g);
        first_chunk[g + 1] = first_chunk[g] + (has_work ? (products[g].M + chunk_rows - 1) / chunk_rows : 0);
    }
    int blocks_per_pack = use_threads ? GEMM_KB / GEMM_KC / count : 1;
    blocks_per_pack = blocks_per_pack < 1 ? 1 : blocks_per_pack < k_blocks ? blocks_per_pack : k_blocks;
    int nc_max = use_threads ? GEMM_NC : GEMM_STACK_NC, nc = (N + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
    nc = nc < nc_max ? nc : nc_max;
    _Alignas(64) float stack_b[GEMM_KC * GEMM_STACK_NC];  // without threads: one product, one block of k
    _Alignas(64) uint32_t stack_b16[GEMM_KC / 2 * GEMM_STACK_NC];
    float *packed_b = use_threads ? gemm_pack_reserve((size_t)count * blocks_per_pack * GEMM_KC * nc) : stack_b;
    GemmPlan plan = {products, count, N, accumulate, precision == BF16, nc, chunk_rows, first_chunk[count],
                     (items + first_chunk[count] - 1) / first_chunk[count], k_blocks, blocks_per_pack, first_chunk,
                     packed_b, use_threads ? (uint32_t *)packed_b : stack_b16};  // one of the two is used
    if (use_threads) {
        #pragma omp parallel
        sgemm_loops(&plan, 1);
    } else {
        sgemm_loops(&plan, 0);
    }
}

// C (M, N) = or += A · B on the calling thread only.
static void sgemm_serial(int M, int N, int K, MatrixView a, MatrixView b, float *c, size_t ldc, int accumulate,
                         Precision precision) {
    GemmProduct product = {M, K, a, b, c, ldc, 0, 0};
    sgemm_batch(1, &product, N, accumulate, precision, 0);
}

// Products of row-major matrices on the calling thread, for code that splits the work between
// threads itself (the tests' readable attention: each thread owns whole heads), and for sampling's
// one position at a time. c (M, N) = a · b, or += when accumulate is set, with FLOAT32 or BF16
// operands; ld* is the distance between the rows of each matrix, in floats.
//   matmul_nt: a (M, K) · b^T, b (N, K)
//   matmul_nn: a (M, K) · b,   b (K, N)
//   matmul_tn: a^T · b,        a (K, M), b (K, N)
static inline void matmul_nt(float *c, size_t ldc, const float *a, size_t lda, const float *b, size_t ldb,
                             int M, int N, int K, int accumulate, Precision precision) {
    MatrixView va = {a, NULL, lda, 0}, vb = {b, NULL, ldb, 1};
    sgemm_serial(M, N, K, va, vb, c, ldc, accumulate, precision);
}

static inline void matmul_nn(float *c, size_t ldc, const float *a, size_t lda, const float *b, size_t ldb,
                             int M, int N, int K, int accumulate, Precision precision) {
    MatrixView va = {a, NULL, lda, 0}, vb = {b, NULL, ldb, 0};
    sgemm_serial(M, N, K, va, vb, c, ldc, accumulate, precision);
}

static inline void matmul_tn(float *c, size_t ldc, const float *a, size_t lda, const float *b, size_t ldb,
                             int M, int N, int K, int accumulate, Precision precision) {
    MatrixView va = {a, NULL, lda, 1}, vb = {b, NULL, ldb, 0};
    sgemm_serial(M, N, K, va, vb, c, ldc, accumulate, precision);
}

// Expert e's rows of inp: rows start[e] .. start[e+1]-1, gathered through inp_rows when given.
static MatrixView expert_rows(const float *inp, const int *inp_rows, const int *start, int e, int IC) {
    MatrixView v = {inp_rows ? inp : inp + (size_t)start[e] * IC, inp_rows ? inp_rows + start[e] : NULL, IC, 0};
    return v;
}

// The products of `count` linear layers that read the same inputs (W1 and W3 of SwiGLU experts
// when count = 2): outs[w] = inp · weights[w]^T, in one batch in which each expert's input rows
// are packed once for all of them.
static void forward_grouped(int count, float *const *outs, const float *inp, const int *inp_rows,
                            const float *const *weights, const int *start, int E, int IC, int OC,
                            Precision precision) {
    GemmProduct products[count * E];
    memset(products, 0, sizeof(products));
    int batched = 0;
    for (int e = 0; e < E; e++) {
        int rows = start[e + 1] - start[e];
        if (rows < GEMM_MR && precision == FLOAT32) { continue; }  // below, without packing
        for (int w = 0; w < count; w++, batched++) {
            MatrixView b = {weights[w] + (size_t)e * OC * IC, NULL, IC, 1};
            products[batched] = (GemmProduct){rows, IC, expert_rows(inp, inp_rows, start, e, IC), b,
                                              outs[w] + (size_t)start[e] * OC, OC, w > 0, 0};
        }
    }
    sgemm_batch(batched, products, OC, 0, precision, 1);
    // With fewer rows than the micro-kernel's, packing the weights would cost more than the
    // products (sampling computes one row at a time): one dot product per output, weights read once.
    for (int e = 0; e < E && precision == FLOAT32; e++) {
        int rows = start[e + 1] - start[e];
        if (rows == 0 || rows >= GEMM_MR) { continue; }
        MatrixView x = expert_rows(inp, inp_rows, start, e, IC);
        for (int w = 0; w < count; w++) {
            matmul_forward_reference(outs[w] + (size_t)start[e] * OC, x.data, x.rows,
                                     weights[w] + (size_t)e * OC * IC, rows, IC, OC);
        }
    }
}

// Their backward pass: dinp = or += Σ_w douts[w] · weights[w] (w in order), and dweights[w] +=
// douts[w]^T · inp, each expert's input rows packed once for all the weight gradients. It adds
// to dinp when add_to_dinp is set; otherwise it writes dinp, so that a caller whose dinp would
// start at zero need not zero it first. dinp NULL, or dweights[0] NULL, leaves out those products
// (bench/bench_matmul times them apart).
static void backward_grouped(int count, float *dinp, float *const *dweights, const float *const *douts,
                             const float *inp, const int *inp_rows, const float *const *weights, const int *start,
                             int E, int IC, int OC, int add_to_dinp, Precision precision) {
    GemmProduct products[count * E];
    memset(products, 0, sizeof(products));
    for (int w = 0; w < count && dinp != NULL; w++) {
        for (int e = 0; e < E; e++) {  // dinp (rows, IC) = or += dout · weight
            MatrixView d = {douts[w] + (size_t)start[e] * OC, NULL, OC, 0};
            MatrixView wt = {weights[w] + (size_t)e * OC * IC, NULL, IC, 0};
            products[e] = (GemmProduct){start[e + 1] - start[e], OC, d, wt, dinp + (size_t)start[e] * IC, IC, 0, 0};
        }
        sgemm_batch(E, products, IC, add_to_dinp || w > 0, precision, 1);
    }
    if (dweights[0] == NULL) { return; }
    for (int e = 0; e < E; e++) {  // dweight (OC, IC) += dout^T · inp
        for (int w = 0; w < count; w++) {
            MatrixView dt = {douts[w] + (size_t)start[e] * OC, NULL, OC, 1};
            MatrixView x = expert_rows(inp, inp_rows, start, e, IC);
            products[e * count + w] = (GemmProduct){OC, start[e + 1] - start[e], dt, x,
                                                    dweights[w] + (size_t)e * OC * IC, IC, 0, w > 0};
        }
    }
    sgemm_batch(count * E, products, IC, 1, precision, 1);
}

// The experts of a layer at once: rows start[e] .. start[e+1]-1 of inp (gathered through inp_rows
// when given) go through weights e (OC, IC) into the same rows of out, in one parallel loop
// (sgemm_batch). matmul_forward and matmul_backward are the case E = 1.
void matmul_forward_grouped(float *out, const float *inp, const int *inp_rows, const float *weights,
                            const int *start, int E, int IC, int OC, Precision precision) {
    forward_grouped(1, &out, inp, inp_rows, &weights, start, E, IC, OC, precision);
}

void matmul_backward_grouped(float *dinp, float *dweights, const float *dout, const float *inp, const int *inp_rows,
                             const float *weights, const int *start, int E, int IC, int OC, int add_to_dinp,
                             Precision precision) {
    backward_grouped(1, dinp, &dweights, &dout, inp, inp_rows, &weights, start, E, IC, OC, add_to_dinp, precision);
}

// Two layers of the experts on the same inputs, SwiGLU's W1 and W3: the same results as
// matmul_forward_grouped for each, and as matmul_backward_grouped for a (writing dinp) then b
// (adding to it), but each expert's input rows are packed once for both.
void matmul_forward_grouped_pair(float *out_a, float *out_b, const float *inp, const int *inp_rows,
                                 const float *weights_a, const float *weights_b, const int *start, int E, int IC,
                                 int OC, Precision precision) {
    float *outs[2] = {out_a, out_b};
    const float *weights[2] = {weights_a, weights_b};
    forward_grouped(2, outs, inp, inp_rows, weights, start, E, IC, OC, precision);
}

void matmul_backward_grouped_pair(float *dinp, float *dweights_a, float *dweights_b, const float *dout_a,
                                  const float *dout_b, const float *inp, const int *inp_rows, const float *weights_a,
                                  const float *weights_b, const int *start, int E, int IC, int OC,
                                  Precision precision) {
    float *dweights[2] = {dweights_a, dweights_b};
    const float *douts[2] = {dout_a, dout_b}, *weights[2] = {weights_a, weights_b};
    backward_grouped(2, dinp, dweights, douts, inp, inp_rows, weights, start, E, IC, OC, 0, precision);
}

void matmul_forward(float *out, const float *inp, const int *inp_rows, const float *weight,
                    int rows, int IC, int OC, Precision precision) {
    int start[2] = {0, rows};
    matmul_forward_grouped(out, inp, inp_rows, weight, start, 1, IC, OC, precision);
}

void matmul_backward(float *dinp, float *dweight, const float *dout, const float *inp, const int *inp_rows,
                     const float *weight, int rows, int IC, int OC, int add_to_dinp, Precision precision) {
    int start[2] = {0, rows};
    matmul_backward_grouped(dinp, dweight, dout, inp, inp_rows, weight, start, 1, IC, OC, add_to_dinp, precision);
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
