/*
test_matmul: checks the fast matrix products of train_dtopp.c (matmul_forward, matmul_backward)
against the simple reference loops (matmul_forward_reference, matmul_backward_reference), on
shapes that are not multiples of the kernel's tiles, with 0 and 1 rows, gathered input rows and
more than one block of k; then checks that the results are bitwise identical for 1, 2 and 3 threads.
Last, the attention built on the same products, against a float64 computation, at sequence
lengths that end inside a block of queries, and bitwise for 1 and 2 threads.

    test_matmul

Prints one line per check and ends with "N passed, M failed"; exits 1 if any check failed.

Tolerance: both versions add the same products, in different orders. A float32 sum of n terms,
in any order, is within n·u·Σ|term| of the exact sum (u = 2^-24, the unit roundoff; Higham,
"Accuracy and Stability of Numerical Algorithms", 2002, §3.1), so two such sums differ by at most
2·n·u·Σ|term|. Each output is checked against that bound, with Σ|term| computed in double (an
accumulated output counts its starting value as one more term).
*/
#define TESTING
#include "../train_dtopp.c"

#include "check.h"

#define UNIT_ROUNDOFF 0x1p-24

static float *random_floats(size_t n, uint64_t *rng) {
    float *x = (float *)malloc_check((n > 0 ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) { x[i] = 2.0f * random_f32(rng) - 1.0f; }
    return x;
}

static float *copy_floats(const float *x, size_t n) {
    float *y = (float *)malloc_check((n > 0 ? n : 1) * sizeof(float));
    memcpy(y, x, n * sizeof(float));
    return y;
}

// Worst output of a product, as a multiple of its bound: 2·terms·u·magnitude[i] (<= 1 passes).
static double worst_error(const float *got, const float *want, const double *magnitude, size_t n, int terms) {
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double bound = 2.0 * terms * UNIT_ROUNDOFF * magnitude[i] + 1e-30;
        double ratio = fabs((double)got[i] - want[i]) / bound;
        if (!(ratio <= worst)) { worst = ratio; }  // also catches NaN
    }
    return worst;
}

typedef struct {
    int rows, IC, OC;
    int gathered;  // input rows through an index (with repeats), from a larger array
} Shape;

// The three products of one shape: fast against reference, within the rounding bound.
static void check_shape(Shape s, uint64_t *rng) {
    int rows = s.rows, IC = s.IC, OC = s.OC, source_rows = rows + 7;
    int *inp_rows = NULL;
    if (s.gathered) {
        inp_rows = (int *)malloc_check((rows > 0 ? rows : 1) * sizeof(int));
        for (int r = 0; r < rows; r++) { inp_rows[r] = (int)(random_u64(rng) % source_rows); }
    }
    float *inp = random_floats((size_t)source_rows * IC, rng), *weight = random_floats((size_t)OC * IC, rng);
    float *dout = random_floats((size_t)rows * OC, rng);
    float *out = random_floats((size_t)rows * OC, rng), *out_ref = copy_floats(out, (size_t)rows * OC);
    // the backward products accumulate: start from nonzero values
    float *dinp = random_floats((size_t)rows * IC, rng), *dweight = random_floats((size_t)OC * IC, rng);
    float *dinp_ref = copy_floats(dinp, (size_t)rows * IC);
    float *dweight_ref = copy_floats(dweight, (size_t)OC * IC);
    double *mag_out = (double *)calloc_check((size_t)rows * OC + 1, sizeof(double));
    double *mag_dinp = (double *)calloc_check((size_t)rows * IC + 1, sizeof(double));
    double *mag_dweight = (double *)calloc_check((size_t)OC * IC + 1, sizeof(double));
    for (int r = 0; r < rows; r++) {
        const float *x = inp + (size_t)(inp_rows ? inp_rows[r] : r) * IC;
        for (int o = 0; o < OC; o++) {
            const float *w = weight + (size_t)o * IC;
            double d = fabs(dout[(size_t)r * OC + o]);
            for (int i = 0; i < IC; i++) {
                mag_out[(size_t)r * OC + o] += fabs((double)x[i] * w[i]);
                mag_dinp[(size_t)r * IC + i] += d * fabs(w[i]);
                mag_dweight[(size_t)o * IC + i] += d * fabs(x[i]);
            }
        }
    }
    for (size_t i = 0; i < (size_t)rows * IC; i++) { mag_dinp[i] += fabs(dinp[i]); }
    for (size_t i = 0; i < (size_t)OC * IC; i++) { mag_dweight[i] += fabs(dweight[i]); }

    matmul_forward(out, inp, inp_rows, weight, rows, IC, OC);
    matmul_forward_reference(out_ref, inp, inp_rows, weight, rows, IC, OC);
    matmul_backward(dinp, dweight, dout, inp, inp_rows, weight, rows, IC, OC);
    matmul_backward_reference(dinp_ref, dweight_ref, dout, inp, inp_rows, weight, rows, IC, OC);

    char name[96];
    snprintf(name, sizeof name, "rows %4d IC %4d OC %4d%s", rows, IC, OC, s.gathered ? " gathered" : "");
    double e = worst_error(out, out_ref, mag_out, (size_t)rows * OC, IC);
    check(e <= 1.0, "%-34s forward: error %.3f of the rounding bound", name, e);
    e = worst_error(dinp, dinp_ref, mag_dinp, (size_t)rows * IC, OC + 1);
    check(e <= 1.0, "%-34s dinp:    error %.3f of the rounding bound", name, e);
    e = worst_error(dweight, dweight_ref, mag_dweight, (size_t)OC * IC, rows + 1);
    check(e <= 1.0, "%-34s dweight: error %.3f of the rounding bound", name, e);

    free(inp_rows);
    free(inp);
    free(weight);
    free(dout);
    free(out);
    free(out_ref);
    free(dinp);
    free(dweight);
    free(dinp_ref);
    free(dweight_ref);
    free(mag_out);
    free(mag_dinp);
    free(mag_dweight);
}

// Forward and backward of one shape with the given number of threads, into out/dinp/dweight.
static void products_with_threads(int threads, Shape s, const float *inp, const int *inp_rows,
                                  const float *weight, const float *dout, float *out, float *dinp,
                                  float *dweight) {
    set_num_threads(threads);
    memset(dinp, 0, (size_t)s.rows * s.IC * sizeof(float));
    memset(dweight, 0, (size_t)s.OC * s.IC * sizeof(float));
    matmul_forward(out, inp, inp_rows, weight, s.rows, s.IC, s.OC);
    matmul_backward(dinp, dweight, dout, inp, inp_rows, weight, s.rows, s.IC, s.OC);
}

static void check_threads(Shape s, uint64_t *rng) {
    int rows = s.rows, IC = s.IC, OC = s.OC;
    int *inp_rows = (int *)malloc_check(rows * sizeof(int));
    for (int r = 0; r < rows; r++) { inp_rows[r] = (int)(random_u64(rng) % rows); }
    float *inp = random_floats((size_t)rows * IC, rng), *weight = random_floats((size_t)OC * IC, rng);
    float *dout = random_floats((size_t)rows * OC, rng);
    float *out[3], *dinp[3], *dweight[3];
    for (int t = 0; t < 3; t++) {
        out[t] = (float *)malloc_check((size_t)rows * OC * sizeof(float));
        dinp[t] = (float *)malloc_check((size_t)rows * IC * sizeof(float));
        dweight[t] = (float *)malloc_check((size_t)OC * IC * sizeof(float));
        products_with_threads(t + 1, s, inp, inp_rows, weight, dout, out[t], dinp[t], dweight[t]);
    }
    for (int t = 1; t < 3; t++) {
        int same = memcmp(out[0], out[t], (size_t)rows * OC * sizeof(float)) == 0
                && memcmp(dinp[0], dinp[t], (size_t)rows * IC * sizeof(float)) == 0
                && memcmp(dweight[0], dweight[t], (size_t)OC * IC * sizeof(float)) == 0;
        check(same, "rows %4d IC %4d OC %4d: 1 and %d threads bitwise identical", rows, IC, OC, t + 1);
    }
    for (int t = 0; t < 3; t++) {
        free(out[t]);
        free(dinp[t]);
        free(dweight[t]);
    }
    free(inp_rows);
    free(inp);
    free(weight);
    free(dout);
}

// Attention in float64, one query at a time: out, probabilities (B, NH, T, T) and, for the given
// dout, the gradient of qkv.
static void attention_float64(double *out, double *att, double *dqkv, const float *qkv, const float *dout,
                              int B, int T, int C, int NH) {
    int hd = C / NH;
    double scale = 1.0 / sqrt((double)hd);
    memset(dqkv, 0, (size_t)B * T * 3 * C * sizeof(double));
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * 3 * C + h * hd;
                const float *dy = dout + ((size_t)b * T + t) * C + h * hd;
                double *p = att + (((size_t)b * NH + h) * T + t) * T;
                double *o = out + ((size_t)b * T + t) * C + h * hd;
                double maxval = -INFINITY, sum = 0.0, pdp = 0.0;
                for (int j = 0; j <= t; j++) {
                    const float *k = qkv + ((size_t)b * T + j) * 3 * C + C + h * hd;
                    p[j] = 0.0;
                    for (int i = 0; i < hd; i++) { p[j] += (double)q[i] * k[i] * scale; }
                    maxval = p[j] > maxval ? p[j] : maxval;
                }
                for (int j = 0; j <= t; j++) { sum += p[j] = exp(p[j] - maxval); }
                for (int i = 0; i < hd; i++) { o[i] = 0.0; }
                double dp[T];
                for (int j = 0; j <= t; j++) {
                    const float *v = qkv + ((size_t)b * T + j) * 3 * C + 2 * C + h * hd;
                    p[j] /= sum;
                    dp[j] = 0.0;
                    for (int i = 0; i < hd; i++) {
                        o[i] += p[j] * v[i];
                        dp[j] += (double)dy[i] * v[i];
                    }
                    pdp += p[j] * dp[j];
                }
                double *dq = dqkv + ((size_t)b * T + t) * 3 * C + h * hd;
                for (int j = 0; j <= t; j++) {
                    const float *k = qkv + ((size_t)b * T + j) * 3 * C + C + h * hd;
                    double *dk = dqkv + ((size_t)b * T + j) * 3 * C + C + h * hd, *dv = dk + C;
                    double ds = p[j] * (dp[j] - pdp) * scale;
                    for (int i = 0; i < hd; i++) {
                        dq[i] += ds * k[i];
                        dk[i] += ds * q[i];
                        dv[i] += p[j] * dy[i];
                    }
                }
            }
        }
    }
}

// ||got - want|| / ||want|| over n values, or over the causal part of (rows, T, T) probabilities.
static double relative_error64(const float *got, const double *want, size_t n, int causal_T) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (causal_T > 0 && (int)(i % causal_T) > (int)(i / causal_T % causal_T)) { continue; }
        diff += (got[i] - want[i]) * (got[i] - want[i]);
        norm += want[i] * want[i];
    }
    return isnan(diff) ? INFINITY : sqrt(diff / norm);
}

// Float32 sums of at most T products differ from the exact ones by at most T·u of the sum of
// their magnitudes (T·u = 8e-6 at T = 130); in relative L2 norm the error is far smaller.
#define TOL_ATTENTION 1e-5

static void check_attention(int B, int T, int C, int NH, uint64_t *rng) {
    size_t N = (size_t)B * T;
    float *qkv = random_floats(N * 3 * C, rng), *dout = random_floats(N * C, rng);
    double *out64 = (double *)malloc_check(N * C * sizeof(double));
    double *att64 = (double *)malloc_check((size_t)B * NH * T * T * sizeof(double));
    double *dqkv64 = (double *)malloc_check(N * 3 * C * sizeof(double));
    attention_float64(out64, att64, dqkv64, qkv, dout, B, T, C, NH);
    float *out[2], *att[2], *dqkv[2];
    for (int threads = 1; threads <= 2; threads++) {
        float *o = out[threads - 1] = (float *)malloc_check(N * C * sizeof(float));
        float *a = att[threads - 1] = (float *)calloc_check((size_t)B * NH * T * T, sizeof(float));
        float *d = dqkv[threads - 1] = (float *)calloc_check(N * 3 * C, sizeof(float));
        set_num_threads(threads);
        attention_forward(o, a, qkv, B, T, C, NH, 1);
        attention_backward(d, dout, qkv, a, B, T, C, NH, 1);
    }
    double e_out = relative_error64(out[0], out64, N * C, 0);
    double e_att = relative_error64(att[0], att64, (size_t)B * NH * T * T, T);
    double e_dqkv = relative_error64(dqkv[0], dqkv64, N * 3 * C, 0);
    check(e_out <= TOL_ATTENTION && e_att <= TOL_ATTENTION && e_dqkv <= TOL_ATTENTION,
          "attention B %d T %3d C %d NH %d vs float64: out %.1e, probabilities %.1e, dqkv %.1e (tol. %.0e)",
          B, T, C, NH, e_out, e_att, e_dqkv, TOL_ATTENTION);
    int same = memcmp(out[0], out[1], N * C * sizeof(float)) == 0
            && memcmp(att[0], att[1], (size_t)B * NH * T * T * sizeof(float)) == 0
            && memcmp(dqkv[0], dqkv[1], N * 3 * C * sizeof(float)) == 0;
    check(same, "attention B %d T %3d C %d NH %d: 1 and 2 threads bitwise identical", B, T, C, NH);
    for (int t = 0; t < 2; t++) {
        free(out[t]);
        free(att[t]);
        free(dqkv[t]);
    }
    free(qkv);
    free(dout);
    free(out64);
    free(att64);
    free(dqkv64);
}

int main(void) {
    uint64_t rng = 42;
    // GEMM_MR = 12, GEMM_NR = 32, GEMM_KC = 256, GEMM_MC = 144, GEMM_NC = 256: every tile edge
    Shape shapes[] = {
        {0, 64, 48, 0},     // an empty expert
        {0, 64, 48, 1},
        {1, 7, 5, 0},       // one row (sampling)
        {1, 300, 70, 1},
        {11, 13, 37, 1},    // fewer rows than the micro-kernel's
        {12, 256, 32, 0},   // exactly one micro-tile, one block of k
        {13, 257, 33, 0},   // one more of each
        {100, 300, 50, 1},
        {145, 513, 291, 1}, // more than a block of rows, of k, and of columns
        {300, 64, 1003, 0}, // a vocabulary-like output, not a multiple of anything
        {37, 600, 40, 0},   // dinp: k = OC over three blocks
        {600, 40, 24, 1},   // dweight: k = rows over three blocks, gathered
    };
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) { check_shape(shapes[i], &rng); }
    Shape thread_shapes[] = {{145, 513, 291, 1}, {600, 40, 1003, 1}, {50, 256, 16, 1}};
    for (size_t i = 0; i < sizeof(thread_shapes) / sizeof(thread_shapes[0]); i++) {
        check_threads(thread_shapes[i], &rng);
    }
    // ATTENTION_BLOCK = 64: one partial block, exactly two, and a partial third
    check_attention(2, 1, 32, 2, &rng);
    check_attention(2, 37, 32, 2, &rng);
    check_attention(1, 128, 64, 2, &rng);
    check_attention(3, 130, 96, 3, &rng);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
