/*
test_matmul: checks the fast matrix products of train_dtopp.c (matmul_forward, matmul_backward)
against the simple reference loops (matmul_forward_reference, matmul_backward_reference), on
shapes that are not multiples of the kernel's tiles, with 0 and 1 rows, gathered input rows and
more than one block of k; then checks that the results are bitwise identical for 1, 2 and 3 threads,
and that the experts of a layer multiplied in one batch (matmul_forward_grouped,
matmul_backward_grouped) give bitwise what one expert at a time gives, and two layers on the same
inputs (the _pair versions) what each layer alone gives. In bf16: the products
against float64 within the bound derived below, the AVX-512 BF16 kernel and packing bitwise against
the portable ones (the packing also on panels of ties, subnormals, infinities and NaNs), and the
rounding's special cases one by one.
Last, attention, built on the same products: the readable one that writes the probabilities out
(test/attention_reference.h) against float64, and the model's tiled one (dtopp/attention.h)
against float64 and against the readable one, causal and not, at sequence lengths of 1 and that
end inside a tile; each bitwise the same on 1 and 2 threads (tolerance at TOL_ATTENTION). And the
tiled one with bf16 products against float64 within the bound derived at attention_bf16_bounds,
bitwise the same on 1 and 2 threads and with the portable bf16 kernel.

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
// defines: attention_forward_reference, attention_backward_reference (P written out)
#include "attention_reference.h"

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

    matmul_forward(out, inp, inp_rows, weight, rows, IC, OC, FLOAT32);
    matmul_forward_reference(out_ref, inp, inp_rows, weight, rows, IC, OC);
    matmul_backward(dinp, dweight, dout, inp, inp_rows, weight, rows, IC, OC, 1, FLOAT32);
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
    matmul_forward(out, inp, inp_rows, weight, s.rows, s.IC, s.OC, FLOAT32);
    matmul_backward(dinp, dweight, dout, inp, inp_rows, weight, s.rows, s.IC, s.OC, 1, FLOAT32);
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

// Products called from the threads of a parallel region (each thread its own): each must run on its
// calling thread alone, since the threaded path's packed B is one buffer, and give what it gives
// when called outside.
static void check_inside_parallel_region(uint64_t *rng) {
#ifdef _OPENMP
    enum { THREADS = 2, ROWS = 200, IC = 300, OC = 600 };
    float *inp = random_floats((size_t)THREADS * ROWS * IC, rng);
    float *weight = random_floats((size_t)THREADS * OC * IC, rng);  // each thread its own weights and B
    float *inside = (float *)malloc_check((size_t)THREADS * ROWS * OC * sizeof(float));
    float *outside = (float *)malloc_check((size_t)THREADS * ROWS * OC * sizeof(float));
    set_num_threads(THREADS);
    for (int t = 0; t < THREADS; t++) {
        matmul_forward(outside + (size_t)t * ROWS * OC, inp + (size_t)t * ROWS * IC, NULL,
                       weight + (size_t)t * OC * IC, ROWS, IC, OC, FLOAT32);
    }
    int same = 1;
    for (int round = 0; round < 20; round++) {
        #pragma omp parallel num_threads(THREADS)
        {
            int t = omp_get_thread_num();
            matmul_forward(inside + (size_t)t * ROWS * OC, inp + (size_t)t * ROWS * IC, NULL,
                           weight + (size_t)t * OC * IC, ROWS, IC, OC, FLOAT32);
        }
        same = same && memcmp(inside, outside, (size_t)THREADS * ROWS * OC * sizeof(float)) == 0;
    }
    check(same, "products called from %d threads of a parallel region: bitwise as called outside (20 rounds)",
          THREADS);
    free(inp);
    free(weight);
    free(inside);
    free(outside);
#else
    (void)rng;  // no threads, so no region to call from
#endif
}

// The experts of a layer in one batch (matmul_forward_grouped, matmul_backward_grouped): each
// expert's rows must come out bitwise as matmul_forward / matmul_backward give them one expert at
// a time (checked above against the reference), in float32 and bf16, on 1, 2 and 3 threads. Row
// counts: none, fewer than the kernel's 12 (float32 multiplies those without packing), and more
// than a chunk of 144 rows and a block of 256 values of k (the dweight products' k is the rows).
enum { GROUPED_EXPERTS = 6 };

// The experts' rows of check_grouped and check_grouped_pair: expert e's are start[e] .. start[e+1]-1,
// gathered through the returned inp_rows from source_rows rows of input.
static int *grouped_rows(int start[GROUPED_EXPERTS + 1], int *source_rows, uint64_t *rng) {
    enum { E = GROUPED_EXPERTS };
    int counts[E] = {0, 5, 13, 150, 300, 1};
    start[0] = 0;
    for (int e = 0; e < E; e++) { start[e + 1] = start[e] + counts[e]; }
    *source_rows = start[E] + 9;
    int *inp_rows = (int *)malloc_check(start[E] * sizeof(int));
    for (int r = 0; r < start[E]; r++) { inp_rows[r] = (int)(random_u64(rng) % *source_rows); }
    return inp_rows;
}

static void check_grouped(Precision precision, int IC, int OC, uint64_t *rng) {
    enum { E = GROUPED_EXPERTS };
    int start[E + 1], source_rows, *inp_rows = grouped_rows(start, &source_rows, rng), rows = start[E];
    float *inp = random_floats((size_t)source_rows * IC, rng), *weights = random_floats((size_t)E * OC * IC, rng);
    float *dout = random_floats((size_t)rows * OC, rng), *dinp_start = random_floats((size_t)rows * IC, rng);
    size_t n_out = (size_t)rows * OC, n_dinp = (size_t)rows * IC, n_dw = (size_t)E * OC * IC;
    float *out[4], *dinp[4], *dweights[4];  // [0]: one expert at a time; [1..3]: grouped on 1..3 threads
    for (int v = 0; v < 4; v++) {
        out[v] = (float *)malloc_check(n_out * sizeof(float));
        dinp[v] = copy_floats(dinp_start, n_dinp);
        dweights[v] = copy_floats(weights, n_dw);  // accumulate onto nonzero values
        set_num_threads(v == 0 ? 2 : v);
        if (v == 0) {
            for (int e = 0; e < E; e++) {
                float *w = weights + (size_t)e * OC * IC, *dw = dweights[0] + (size_t)e * OC * IC;
                int count = start[e + 1] - start[e];
                matmul_forward(out[0] + (size_t)start[e] * OC, inp, inp_rows + start[e], w, count, IC, OC, precision);
                matmul_backward(dinp[0] + (size_t)start[e] * IC, dw, dout + (size_t)start[e] * OC, inp,
                                inp_rows + start[e], w, count, IC, OC, 1, precision);
            }
        } else {
            matmul_forward_grouped(out[v], inp, inp_rows, weights, start, E, IC, OC, precision);
            matmul_backward_grouped(dinp[v], dweights[v], dout, inp, inp_rows, weights, start, E, IC, OC, 1,
                                    precision);
        }
    }
    // add_to_dinp = 0 writes every row of dinp (here over NaNs): the same as adding onto zeros
    float *dinp_zeros = (float *)calloc_check(n_dinp, sizeof(float));
    float *dinp_nans = (float *)malloc_check(n_dinp * sizeof(float));
    float *dw_add = copy_floats(weights, n_dw), *dw_write = copy_floats(weights, n_dw);
    for (size_t i = 0; i < n_dinp; i++) { dinp_nans[i] = NAN; }
    matmul_backward_grouped(dinp_zeros, dw_add, dout, inp, inp_rows, weights, start, E, IC, OC, 1, precision);
    matmul_backward_grouped(dinp_nans, dw_write, dout, inp, inp_rows, weights, start, E, IC, OC, 0, precision);
    int equal = memcmp(dw_add, dw_write, n_dw * sizeof(float)) == 0;
    for (size_t i = 0; i < n_dinp; i++) { equal = equal && dinp_nans[i] == dinp_zeros[i]; }
    check(equal, "grouped %s, IC %d OC %d: dinp written (over NaNs) equals dinp added onto zeros",
          precision == BF16 ? "bf16" : "fp32", IC, OC);
    // either product alone (NULL for the other's output) gives what the two together give
    float *dinp_alone = (float *)calloc_check(n_dinp, sizeof(float)), *dw_alone = copy_floats(weights, n_dw);
    matmul_backward_grouped(dinp_alone, NULL, dout, inp, inp_rows, weights, start, E, IC, OC, 1, precision);
    matmul_backward_grouped(NULL, dw_alone, dout, inp, inp_rows, weights, start, E, IC, OC, 1, precision);
    int alone_same = memcmp(dinp_alone, dinp_zeros, n_dinp * sizeof(float)) == 0
                  && memcmp(dw_alone, dw_add, n_dw * sizeof(float)) == 0;
    check(alone_same, "grouped %s, IC %d OC %d: dinp alone and dweights alone as computed together",
          precision == BF16 ? "bf16" : "fp32", IC, OC);
    free(dinp_alone);
    free(dw_alone);
    free(dinp_zeros);
    free(dinp_nans);
    free(dw_add);
    free(dw_write);
    for (int v = 1; v < 4; v++) {
        int same = memcmp(out[0], out[v], n_out * sizeof(float)) == 0
                && memcmp(dinp[0], dinp[v], n_dinp * sizeof(float)) == 0
                && memcmp(dweights[0], dweights[v], n_dw * sizeof(float)) == 0;
        check(same, "grouped %s, %d experts, IC %d OC %d, %d thread%s: bitwise as one expert at a time",
              precision == BF16 ? "bf16" : "fp32", E, IC, OC, v, v > 1 ? "s" : "");
    }
    for (int v = 0; v < 4; v++) {
        free(out[v]);
        free(dinp[v]);
        free(dweights[v]);
    }
    free(inp_rows);
    free(inp);
    free(weights);
    free(dout);
    free(dinp_start);
}

// Two layers on the same inputs (matmul_forward_grouped_pair, matmul_backward_grouped_pair: W1 and
// W3 of the experts, each expert's rows packed once for both): bitwise what matmul_forward_grouped
// gives for each, and matmul_backward_grouped for a (writing dinp) then b (adding to it), on 1, 2
// and 3 threads; the same row counts as check_grouped.
static void check_grouped_pair(Precision precision, int IC, int OC, uint64_t *rng) {
    enum { E = GROUPED_EXPERTS };
    int start[E + 1], source_rows, *inp_rows = grouped_rows(start, &source_rows, rng), rows = start[E];
    size_t n_out = (size_t)rows * OC, n_dinp = (size_t)rows * IC, n_dw = (size_t)E * OC * IC;
    float *inp = random_floats((size_t)source_rows * IC, rng);
    float *weights_a = random_floats(n_dw, rng), *weights_b = random_floats(n_dw, rng);
    float *dout_a = random_floats(n_out, rng), *dout_b = random_floats(n_out, rng);
    float *out[4][2], *dinp[4], *dweights[4][2];  // [0]: a, then b; [1..3]: the pair on 1..3 threads
    for (int v = 0; v < 4; v++) {
        dinp[v] = (float *)malloc_check(n_dinp * sizeof(float));
        for (int i = 0; i < 2; i++) {
            out[v][i] = (float *)malloc_check(n_out * sizeof(float));
            dweights[v][i] = copy_floats(i ? weights_b : weights_a, n_dw);  // accumulate onto nonzero values
        }
        set_num_threads(v == 0 ? 2 : v);
        if (v == 0) {
            matmul_forward_grouped(out[0][0], inp, inp_rows, weights_a, start, E, IC, OC, precision);
            matmul_forward_grouped(out[0][1], inp, inp_rows, weights_b, start, E, IC, OC, precision);
            matmul_backward_grouped(dinp[0], dweights[0][0], dout_a, inp, inp_rows, weights_a, start, E, IC, OC, 0,
                                    precision);
            matmul_backward_grouped(dinp[0], dweights[0][1], dout_b, inp, inp_rows, weights_b, start, E, IC, OC, 1,
                                    precision);
        } else {
            matmul_forward_grouped_pair(out[v][0], out[v][1], inp, inp_rows, weights_a, weights_b, start, E, IC, OC,
                                        precision);
            matmul_backward_grouped_pair(dinp[v], dweights[v][0], dweights[v][1], dout_a, dout_b, inp, inp_rows,
                                         weights_a, weights_b, start, E, IC, OC, precision);
        }
    }
    for (int v = 1; v < 4; v++) {
        int same = memcmp(dinp[0], dinp[v], n_dinp * sizeof(float)) == 0;
        for (int i = 0; i < 2; i++) {
            same = same && memcmp(out[0][i], out[v][i], n_out * sizeof(float)) == 0
                && memcmp(dweights[0][i], dweights[v][i], n_dw * sizeof(float)) == 0;
        }
        check(same, "grouped pair %s, %d experts, IC %d OC %d, %d thread%s: bitwise as each layer alone",
              precision == BF16 ? "bf16" : "fp32", E, IC, OC, v, v > 1 ? "s" : "");
    }
    for (int v = 0; v < 4; v++) {
        free(dinp[v]);
        for (int i = 0; i < 2; i++) {
            free(out[v][i]);
            free(dweights[v][i]);
        }
    }
    free(inp_rows);
    free(inp);
    free(weights_a);
    free(weights_b);
    free(dout_a);
    free(dout_b);
}

// Attention in float64, one query at a time: out, probabilities (B, NH, T, T), each query's
// log-sum-exp of its scaled scores lse (B, NH, T) and, for the given dout, the gradient of qkv.
static void attention_float64(double *out, double *att, double *lse, double *dqkv, const float *qkv,
                              const float *dout, int B, int T, int C, int NH, int causal) {
    int hd = C / NH;
    double scale = 1.0 / sqrt((double)hd);
    memset(dqkv, 0, (size_t)B * T * 3 * C * sizeof(double));
    memset(att, 0, (size_t)B * NH * T * T * sizeof(double));
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * 3 * C + h * hd;
                const float *dy = dout + ((size_t)b * T + t) * C + h * hd;
                double *p = att + (((size_t)b * NH + h) * T + t) * T;
                double *o = out + ((size_t)b * T + t) * C + h * hd;
                double maxval = -INFINITY, sum = 0.0, pdp = 0.0;
                int seen = causal ? t + 1 : T;
                for (int j = 0; j < seen; j++) {
                    const float *k = qkv + ((size_t)b * T + j) * 3 * C + C + h * hd;
                    p[j] = 0.0;
                    for (int i = 0; i < hd; i++) { p[j] += (double)q[i] * k[i] * scale; }
                    maxval = p[j] > maxval ? p[j] : maxval;
                }
                for (int j = 0; j < seen; j++) { sum += p[j] = exp(p[j] - maxval); }
                lse[((size_t)b * NH + h) * T + t] = maxval + log(sum);
                for (int i = 0; i < hd; i++) { o[i] = 0.0; }
                double dp[T];
                for (int j = 0; j < seen; j++) {
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
                for (int j = 0; j < seen; j++) {
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

static double relative_error32(const float *got, const float *want, size_t n) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < n; i++) {
        diff += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
        norm += (double)want[i] * want[i];
    }
    return isnan(diff) ? INFINITY : sqrt(diff / norm);
}

// Tolerance of the attention checks, in relative L2 norm. Every output is a float32 sum of at most
// T products (T ≤ 300 here) and an e^x within 1.5 units in the last place, in a different order in
// each version: a worst case of about T·u = 1.8e-5 of the sum of the magnitudes (u = 2^-24), and,
// the rounding errors of random data having random signs, a typical error near sqrt(T)·u = 1e-6.
// 1e-5 sits between; a wrong tile edge, mask or rescaling gives errors of order 1e-2 or more.
#define TOL_ATTENTION 1e-5

typedef struct {
    float *out, *att, *lse, *dqkv;
} AttentionResult;

// One shape's random inputs and their attention in float64 (attention_float64).
typedef struct {
    int B, T, C, NH, causal;
    size_t N, n_att, n_lse;  // B·T positions; B·NH·T·T probabilities; B·NH·T log-sum-exps
    float *qkv, *dout;
    double *out, *att, *lse, *dqkv;
    char name[64];
} AttentionCase;

static AttentionCase attention_case(int B, int T, int C, int NH, int causal, uint64_t *rng) {
    AttentionCase x = {0};
    x.B = B, x.T = T, x.C = C, x.NH = NH, x.causal = causal;
    x.N = (size_t)B * T, x.n_att = (size_t)B * NH * T * T, x.n_lse = (size_t)B * NH * T;
    x.qkv = random_floats(x.N * 3 * C, rng);
    x.dout = random_floats(x.N * C, rng);
    x.out = (double *)malloc_check(x.N * C * sizeof(double));
    x.att = (double *)malloc_check(x.n_att * sizeof(double));
    x.lse = (double *)malloc_check(x.n_lse * sizeof(double));
    x.dqkv = (double *)malloc_check(x.N * 3 * C * sizeof(double));
    attention_float64(x.out, x.att, x.lse, x.dqkv, x.qkv, x.dout, B, T, C, NH, causal);
    snprintf(x.name, sizeof x.name, "attention B %d T %3d C %d NH %d %s", B, T, C, NH, causal ? "causal" : "full  ");
    return x;
}

static void attention_case_free(AttentionCase *x) {
    free(x->qkv);
    free(x->dout);
    free(x->out);
    free(x->att);
    free(x->lse);
    free(x->dqkv);
}

// The readable attention (test/attention_reference.h, P written out) or the tiled one
// (dtopp/attention.h, lse kept, its products in the given precision), forward and backward, with
// the given number of threads.
static AttentionResult run_attention(int tiled, int threads, Precision precision, const AttentionCase *x) {
    int B = x->B, T = x->T, C = x->C, NH = x->NH, causal = x->causal;
    AttentionResult r = {0};
    r.out = (float *)malloc_check(x->N * C * sizeof(float));
    r.dqkv = (float *)calloc_check(x->N * 3 * C, sizeof(float));
    set_num_threads(threads);
    if (tiled) {
        r.lse = (float *)malloc_check(x->n_lse * sizeof(float));
        attention_forward(r.out, r.lse, x->qkv, B, T, C, NH, causal, precision);
        attention_backward(r.dqkv, x->dout, x->qkv, r.out, r.lse, B, T, C, NH, causal, precision);
    } else {
        r.att = (float *)calloc_check(x->n_att, sizeof(float));
        attention_forward_reference(r.out, r.att, x->qkv, B, T, C, NH, causal);
        attention_backward_reference(r.dqkv, x->dout, x->qkv, r.att, B, T, C, NH, causal);
    }
    return r;
}

static int same_floats(const float *a, const float *b, size_t n) {
    return (a == NULL && b == NULL) || memcmp(a, b, n * sizeof(float)) == 0;
}

static void free_attention(AttentionResult r) {
    free(r.out);
    free(r.att);
    free(r.lse);
    free(r.dqkv);
}

// Both attentions on one shape: the readable one against float64, the tiled one against the
// readable one and against float64 (its lse too), and each bitwise the same on 1 and 2 threads.
static void check_attention(int B, int T, int C, int NH, int causal, uint64_t *rng) {
    AttentionCase x = attention_case(B, T, C, NH, causal, rng);
    size_t n_out = x.N * C, n_dqkv = x.N * 3 * C;
    for (int tiled = 0; tiled <= 1; tiled++) {
        AttentionResult one = run_attention(tiled, 1, FLOAT32, &x);
        AttentionResult two = run_attention(tiled, 2, FLOAT32, &x);
        double e_out = relative_error64(one.out, x.out, n_out, 0);
        double e_dqkv = relative_error64(one.dqkv, x.dqkv, n_dqkv, 0);
        double e_p = tiled ? relative_error64(one.lse, x.lse, x.n_lse, 0)
                           : relative_error64(one.att, x.att, x.n_att, causal ? T : 0);
        check(e_out <= TOL_ATTENTION && e_p <= TOL_ATTENTION && e_dqkv <= TOL_ATTENTION,
              "%s %s vs float64: out %.1e, %s %.1e, dqkv %.1e (tol. %.0e)", x.name, tiled ? "tiled   " : "readable",
              e_out, tiled ? "lse" : "P", e_p, e_dqkv, TOL_ATTENTION);
        if (tiled) {
            AttentionResult ref = run_attention(0, 1, FLOAT32, &x);
            e_out = relative_error32(one.out, ref.out, n_out);
            e_dqkv = relative_error32(one.dqkv, ref.dqkv, n_dqkv);
            check(e_out <= TOL_ATTENTION && e_dqkv <= TOL_ATTENTION,
                  "%s tiled    vs readable: out %.1e, dqkv %.1e (tol. %.0e)", x.name, e_out, e_dqkv, TOL_ATTENTION);
            free_attention(ref);
        }
        int same = same_floats(one.out, two.out, n_out) && same_floats(one.dqkv, two.dqkv, n_dqkv)
                && (tiled ? same_floats(one.lse, two.lse, x.n_lse) : same_floats(one.att, two.att, x.n_att));
        check(same, "%s %s: 1 and 2 threads bitwise identical", x.name, tiled ? "tiled   " : "readable");
        free_attention(one);
        free_attention(two);
    }
    attention_case_free(&x);
}

// bf16 operands (Precision BF16). Rounding each operand to bfloat16 (8 significant bits, unit
// roundoff u = 2^-8) changes a product x·w by at most (2u + u²)|x·w|; the products are then summed
// in float32 by one rounded operation each, n of them plus one per block of GEMM_KC and one for an
// accumulated start: at most γ = m·2^-24 / (1 - m·2^-24) of the sum of the magnitudes, m the number
// of roundings. Each output is checked against the exact float64 product of the float32 operands
// within (2u + u² + γ(1 + 2u + u²)) Σ|terms|, and a flushed subnormal (below 2^-126) adds at most
// 2^-126 per operation. Then the portable and the AVX-512 BF16 kernels must agree bit for bit.
static double bf16_bound(double magnitude, int terms) {
    double u = 0x1p-8, m = terms + terms / GEMM_KC + 2, gamma = m * UNIT_ROUNDOFF / (1.0 - m * UNIT_ROUNDOFF);
    return (2 * u + u * u + gamma * (1 + 2 * u + u * u)) * magnitude + 2 * m * 0x1p-126;
}

static double worst_bf16_error(const float *got, const double *want, const double *magnitude, size_t n,
                               int terms) {
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double ratio = fabs((double)got[i] - want[i]) / (bf16_bound(magnitude[i], terms) + 1e-300);
        if (!(ratio <= worst)) { worst = ratio; }
    }
    return worst;
}

// out, dinp, dweight of one shape in bf16 with the chosen kernel (dinp, dweight start from start_*)
static void bf16_products(int native, Shape s, const float *inp, const int *inp_rows, const float *weight,
                          const float *dout, const float *start_dinp, const float *start_dweight, float *out,
                          float *dinp, float *dweight) {
    bf16_native_kernel = native;
    memcpy(dinp, start_dinp, (size_t)s.rows * s.IC * sizeof(float));
    memcpy(dweight, start_dweight, (size_t)s.OC * s.IC * sizeof(float));
    matmul_forward(out, inp, inp_rows, weight, s.rows, s.IC, s.OC, BF16);
    matmul_backward(dinp, dweight, dout, inp, inp_rows, weight, s.rows, s.IC, s.OC, 1, BF16);
}

// tiny: operands near 2^-64, so that products fall below float32's normal range and are flushed
static void check_bf16(Shape s, int tiny, uint64_t *rng) {
    int rows = s.rows, IC = s.IC, OC = s.OC;
    size_t n_out = (size_t)rows * OC, n_dinp = (size_t)rows * IC, n_dw = (size_t)OC * IC;
    int *inp_rows = (int *)malloc_check((rows > 0 ? rows : 1) * sizeof(int));
    for (int r = 0; r < rows; r++) { inp_rows[r] = s.gathered ? (int)(random_u64(rng) % rows) : r; }
    float *inp = random_floats(n_dinp, rng), *weight = random_floats(n_dw, rng), *dout = random_floats(n_out, rng);
    float *start_dinp = random_floats(n_dinp, rng), *start_dw = random_floats(n_dw, rng);
    if (tiny) {
        for (size_t i = 0; i < n_dinp; i++) { inp[i] *= 0x1p-64f; start_dinp[i] = 0.0f; }
        for (size_t i = 0; i < n_dw; i++) { weight[i] *= 0x1p-64f; start_dw[i] = 0.0f; }
    }
    double *want[3], *magnitude[3];
    size_t sizes[3] = {n_out, n_dinp, n_dw};
    for (int t = 0; t < 3; t++) {
        want[t] = (double *)calloc_check(sizes[t] + 1, sizeof(double));
        magnitude[t] = (double *)calloc_check(sizes[t] + 1, sizeof(double));
    }
    for (size_t i = 0; i < n_dinp; i++) { magnitude[1][i] = fabs(want[1][i] = start_dinp[i]); }
    for (size_t i = 0; i < n_dw; i++) { magnitude[2][i] = fabs(want[2][i] = start_dw[i]); }
    for (int r = 0; r < rows; r++) {
        const float *x = inp + (size_t)inp_rows[r] * IC;
        for (int o = 0; o < OC; o++) {
            const float *w = weight + (size_t)o * IC;
            double d = dout[(size_t)r * OC + o];
            for (int i = 0; i < IC; i++) {
                want[0][(size_t)r * OC + o] += (double)x[i] * w[i];
                magnitude[0][(size_t)r * OC + o] += fabs((double)x[i] * w[i]);
                want[1][(size_t)r * IC + i] += d * w[i];
                magnitude[1][(size_t)r * IC + i] += fabs(d * w[i]);
                want[2][(size_t)o * IC + i] += d * x[i];
                magnitude[2][(size_t)o * IC + i] += fabs(d * x[i]);
            }
        }
    }
    float *got[2][3];
    for (int k = 0; k < 2; k++) {
        for (int t = 0; t < 3; t++) { got[k][t] = (float *)malloc_check((sizes[t] + 1) * sizeof(float)); }
    }
    bf16_products(0, s, inp, inp_rows, weight, dout, start_dinp, start_dw, got[0][0], got[0][1], got[0][2]);
    char name[96];
    snprintf(name, sizeof name, "bf16 rows %4d IC %4d OC %4d%s%s", rows, IC, OC, s.gathered ? " gathered" : "",
             tiny ? " tiny" : "");
    int terms[3] = {IC, OC + 1, rows + 1};
    const char *what[3] = {"forward", "dinp   ", "dweight"};
    for (int t = 0; t < 3; t++) {
        double e = worst_bf16_error(got[0][t], want[t], magnitude[t], sizes[t], terms[t]);
        check(e <= 1.0, "%-42s %s: error %.3f of the bf16 bound", name, what[t], e);
    }
    bf16_native_kernel = -1;
    if (bf16_native()) {
        bf16_products(1, s, inp, inp_rows, weight, dout, start_dinp, start_dw, got[1][0], got[1][1], got[1][2]);
        int same = 1;
        for (int t = 0; t < 3; t++) { same = same && memcmp(got[0][t], got[1][t], sizes[t] * sizeof(float)) == 0; }
        check(same, "%-42s AVX-512 BF16 and portable kernels bitwise identical", name);
    }
    bf16_native_kernel = -1;
    for (int t = 0; t < 3; t++) {
        free(want[t]);
        free(magnitude[t]);
        free(got[0][t]);
        free(got[1][t]);
    }
    free(inp_rows);
    free(inp);
    free(weight);
    free(dout);
    free(start_dinp);
    free(start_dw);
}

static float float_of_bits(uint32_t bits) {
    float x;
    memcpy(&x, &bits, sizeof(x));
    return x;
}

// Round to nearest even at the bfloat16 boundaries, and the special values
static void check_bf16_rounding(void) {
    struct { uint32_t in; uint16_t out; const char *what; } cases[] = {
        {0x3f800000u, 0x3f80, "1 exactly"},
        {0x3f808000u, 0x3f80, "1 + 2^-8, a tie: to even (down)"},
        {0x3f818000u, 0x3f82, "1 + 3·2^-8, a tie: to even (up)"},
        {0x3f808001u, 0x3f81, "just above a tie: up"},
        {0x3f807fffu, 0x3f80, "just below a tie: down"},
        {0xbf818000u, 0xbf82, "negative tie: to even"},
        {0x7f7fffffu, 0x7f80, "largest float: rounds to infinity"},
        {0x7f800000u, 0x7f80, "infinity"},
        {0x00400000u, 0x0000, "subnormal: zero"},
        {0x80000001u, 0x8000, "negative subnormal: -0"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint16_t got = bf16_round(float_of_bits(cases[i].in));
        check(got == cases[i].out, "bf16_round(0x%08x) = 0x%04x (want 0x%04x): %s", cases[i].in, got, cases[i].out,
              cases[i].what);
    }
    check(isnan(bf16_to_float(bf16_round(NAN))), "bf16_round(NaN) is NaN");
}

// The vector packings against the portable ones they replace, bitwise, on panels of both widths with
// every edge, plain and gathered, rows and transposed, and values that round specially in bf16
// (ties, subnormals, infinities, NaNs): float32 where the compiler targets AVX-512, bf16 where the
// CPU has AVX-512 BF16.
static void check_packing(int bf16, uint64_t *rng) {
#ifdef BF16_NATIVE_BUILD
#ifndef __AVX512F__
    if (!bf16) { return; }
#endif
    if (bf16 && !bf16_native()) { return; }
    enum { ROWS = 80, COLS = 80 };
    float *data = random_floats(ROWS * COLS, rng);
    const uint32_t special[] = {0x3f808000u, 0x3f818000u, 0xbf818000u, 0x00400000u, 0x80000001u,
                                0x7f800000u, 0xff800000u, 0x7fc00001u, 0xffa00000u, 0x7f7fffffu, 0x80000000u};
    for (int i = 0; i < ROWS * COLS; i += 7) { data[i] = float_of_bits(special[i / 7 % 11]); }
    int gather[ROWS];
    for (int r = 0; r < ROWS; r++) { gather[r] = (r * 37 + 11) % ROWS; }
    const int widths[] = {GEMM_MR, GEMM_NR}, x_counts[] = {1, 11, 12, 17, 32}, k_counts[] = {1, 2, 31, 33, 64};
    uint32_t portable[64 * GEMM_NR], vector[64 * GEMM_NR];
    int differ = 0, panels = 0;
    for (int t = 0; t < 2; t++) {
        for (int g = 0; g < 2; g++) {
            MatrixView v = {data, g ? gather : NULL, COLS, t};
            for (int w = 0; w < 2; w++) {
                for (int xi = 0; xi < 5; xi++) {
                    int nx = x_counts[xi] < widths[w] ? x_counts[xi] : widths[w];
                    for (int ki = 0; ki < 5; ki++) {
                        int kc = k_counts[ki];
                        // both buffers start as the same filler and are compared whole, so that a
                        // store past the panel's rows of k (or of bf16 pairs) shows as a difference
                        memset(portable, 0xab, sizeof(portable));
                        memset(vector, 0xab, sizeof(vector));
                        if (bf16) {
                            pack_panel_bf16_portable(portable, v, 3, nx, 5, kc, widths[w]);
                            pack_panel_bf16_avx512(vector, v, 3, nx, 5, kc, widths[w]);
                        } else {
                            pack_panel_portable((float *)portable, v, 3, nx, 5, kc, widths[w]);
                            pack_panel((float *)vector, v, 3, nx, 5, kc, widths[w]);
                        }
                        differ += memcmp(portable, vector, sizeof(portable)) != 0;
                        panels++;
                    }
                }
            }
        }
    }
    check(differ == 0, "%s packing: AVX-512 and portable bitwise identical on %d panels with special values "
                       "(%d differ)", bf16 ? "bf16" : "float32", panels, differ);
    free(data);
#else
    (void)bf16;
    (void)rng;
#endif
}

// Attention with BF16 products (dtopp/attention.h): q·k, P·v and the backward's products round
// their operands; the softmax and everything else stay float32. Each output is checked against the
// float64 attention within a bound derived from the same float64 quantities. ε is the error of one
// product of rounded operands summed in float32, bf16_bound(1, T) (the float32 rescaling and e^x
// of the online softmax add a few roundings per output, within its γ). A query's scores are off by
// at most δ = ε·a, a = max over the keys it sees of Σ|q_i k_i| / sqrt(hd), so each of its
// probabilities by a factor within e^(±2δ): ρ = e^(2δ) − 1 relative. The terms of its output's sum
// are then off by at most (1 + ρ)(1 + ε) − 1 each:
//   out_i:  ((1 + ρ)(1 + ε) − 1) Σ_j P_j |v_ji|.
// The backward: dP_j = dO · v_j is off by δdP_j ≤ ε Σ_i |dO_i v_ji|, D = dO · out by δD ≤
// Σ_i |dO_i| bound(out_i), and dS_j = P_j (dP_j − D) / sqrt(hd) by
//   δdS_j ≤ P_j (ρ |dP_j − D| + (1 + ρ)(δdP_j + δD)) / sqrt(hd),
// so, each rounded product adding ε of its magnitude,
//   dq_i:   Σ_j ((1 + ε) δdS_j + ε |dS_j|) |k_ji|,   dk_ji: the same terms times |q_i|, over queries,
//   dv_ji:  ((1 + ρ)(1 + ε) − 1) P_j |dO_i|, over queries.
static void attention_bf16_bounds(double *bound_out, double *bound_dqkv, const double *att64, const float *qkv,
                                  const float *dout, int B, int T, int C, int NH, int causal) {
    int hd = C / NH;
    double scale = 1.0 / sqrt((double)hd), eps = bf16_bound(1.0, T);
    memset(bound_out, 0, (size_t)B * T * C * sizeof(double));
    memset(bound_dqkv, 0, (size_t)B * T * 3 * C * sizeof(double));
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                size_t row = (size_t)b * T + t;
                const float *q = qkv + row * 3 * C + h * hd, *dy = dout + row * C + h * hd;
                const double *p = att64 + (((size_t)b * NH + h) * T + t) * T;
                double *bo = bound_out + row * C + h * hd, *bdq = bound_dqkv + row * 3 * C + h * hd;
                int seen = causal ? t + 1 : T;
                double a = 0.0, D = 0.0, dD = 0.0, dp[T];
                for (int j = 0; j < seen; j++) {
                    const float *k = qkv + ((size_t)b * T + j) * 3 * C + C + h * hd;
                    double magnitude = 0.0;
                    for (int i = 0; i < hd; i++) { magnitude += fabs((double)q[i] * k[i]); }
                    a = magnitude * scale > a ? magnitude * scale : a;
                }
                double rho = expm1(2.0 * eps * a), term = (1.0 + rho) * (1.0 + eps) - 1.0;
                for (int j = 0; j < seen; j++) {
                    const float *v = qkv + ((size_t)b * T + j) * 3 * C + 2 * C + h * hd;
                    dp[j] = 0.0;
                    for (int i = 0; i < hd; i++) {
                        bo[i] += term * p[j] * fabs(v[i]);
                        dp[j] += (double)dy[i] * v[i];
                    }
                    D += p[j] * dp[j];
                }
                for (int i = 0; i < hd; i++) { dD += fabs(dy[i]) * bo[i]; }
                for (int j = 0; j < seen; j++) {
                    const float *k = qkv + ((size_t)b * T + j) * 3 * C + C + h * hd, *v = k + C;
                    double *bdk = bound_dqkv + ((size_t)b * T + j) * 3 * C + C + h * hd, *bdv = bdk + C, ddp = 0.0;
                    for (int i = 0; i < hd; i++) { ddp += eps * fabs((double)dy[i] * v[i]); }
                    double ds = p[j] * (dp[j] - D) * scale;
                    double dds = p[j] * (rho * fabs(dp[j] - D) + (1.0 + rho) * (ddp + dD)) * scale;
                    double w = (1.0 + eps) * dds + eps * fabs(ds);
                    for (int i = 0; i < hd; i++) {
                        bdq[i] += w * fabs(k[i]);
                        bdk[i] += w * fabs(q[i]);
                        bdv[i] += term * p[j] * fabs(dy[i]);
                    }
                }
            }
        }
    }
}

// The largest |got − want| / bound over n outputs.
static double worst_ratio(const float *got, const double *want, const double *bound, size_t n) {
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double ratio = fabs((double)got[i] - want[i]) / (bound[i] + 1e-300);
        if (!(ratio <= worst)) { worst = ratio; }
    }
    return worst;
}

// The tiled attention with BF16 products on one shape: within the bounds above, further from
// float64 than float32's tolerance (so its products were rounded), the same bits on 1 and 2
// threads and with the portable bf16 kernel.
static void check_attention_bf16(int B, int T, int C, int NH, int causal, uint64_t *rng) {
    AttentionCase x = attention_case(B, T, C, NH, causal, rng);
    size_t n_out = x.N * C, n_dqkv = x.N * 3 * C;
    double *bound_out = (double *)malloc_check(n_out * sizeof(double));
    double *bound_dqkv = (double *)malloc_check(n_dqkv * sizeof(double));
    attention_bf16_bounds(bound_out, bound_dqkv, x.att, x.qkv, x.dout, B, T, C, NH, causal);
    AttentionResult one = run_attention(1, 1, BF16, &x), two = run_attention(1, 2, BF16, &x);
    bf16_native_kernel = 0;
    AttentionResult portable = run_attention(1, 1, BF16, &x);
    bf16_native_kernel = -1;
    double w_out = worst_ratio(one.out, x.out, bound_out, n_out);
    double w_dqkv = worst_ratio(one.dqkv, x.dqkv, bound_dqkv, n_dqkv);
    check(w_out <= 1.0 && w_dqkv <= 1.0, "%s bf16     vs float64: error / bound at most %.2f (out), %.2f (dqkv)",
          x.name, w_out, w_dqkv);
    double e_out = relative_error64(one.out, x.out, n_out, 0), e_dqkv = relative_error64(one.dqkv, x.dqkv, n_dqkv, 0);
    check(e_out > TOL_ATTENTION && e_dqkv > TOL_ATTENTION,
          "%s bf16     rounded: out %.1e, dqkv %.1e from float64 (float32's tolerance %.0e)", x.name, e_out, e_dqkv,
          TOL_ATTENTION);
    int same = same_floats(one.out, two.out, n_out) && same_floats(one.dqkv, two.dqkv, n_dqkv)
            && same_floats(one.lse, two.lse, x.n_lse);
    check(same, "%s bf16    : 1 and 2 threads bitwise identical", x.name);
    same = same_floats(one.out, portable.out, n_out) && same_floats(one.dqkv, portable.dqkv, n_dqkv);
    check(same, "%s bf16    : portable kernel bitwise identical", x.name);
    free_attention(one);
    free_attention(two);
    free_attention(portable);
    free(bound_out);
    free(bound_dqkv);
    attention_case_free(&x);
}

int main(void) {
    uint64_t rng = 42;
    // GEMM_MR = 12, GEMM_NR = 32, GEMM_KC = 256, GEMM_MC = 144, GEMM_NC = 1024: every tile edge
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
        {300, 64, 2051, 0}, // a vocabulary-like output over three blocks of columns, not a multiple of anything
        {37, 600, 40, 0},   // dinp: k = OC over three blocks
        {600, 40, 24, 1},   // dweight: k = rows over three blocks, gathered
        {1100, 1030, 20, 1}, // dweight: more blocks of k than a pack holds with a full block of columns
        {40, 1100, 1030, 0}, // forward and dinp: the same, and C written, not added to
    };
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) { check_shape(shapes[i], &rng); }
    Shape thread_shapes[] = {{145, 513, 291, 1}, {600, 40, 2051, 1}, {50, 256, 16, 1}, {1100, 1030, 20, 1}};
    for (size_t i = 0; i < sizeof(thread_shapes) / sizeof(thread_shapes[0]); i++) {
        check_threads(thread_shapes[i], &rng);
    }
    check_grouped(FLOAT32, 100, 70, &rng);
    check_grouped(FLOAT32, 40, 300, &rng);
    check_grouped(BF16, 100, 70, &rng);
    check_grouped(BF16, 40, 300, &rng);
    check_grouped(FLOAT32, 400, 40, &rng);  // dinp, dweight: more columns than GEMM_STACK_NC
    check_grouped(BF16, 400, 40, &rng);
    check_grouped_pair(FLOAT32, 100, 70, &rng);
    check_grouped_pair(BF16, 100, 70, &rng);
    check_grouped_pair(FLOAT32, 40, 300, &rng);  // with threads, the dweight products' columns in groups
    check_grouped_pair(BF16, 40, 300, &rng);
    check_grouped_pair(FLOAT32, 400, 40, &rng);
    check_inside_parallel_region(&rng);
    check_bf16_rounding();
    check_packing(0, &rng);
    check_packing(1, &rng);
    Shape bf16_shapes[] = {{1, 7, 5, 0}, {13, 257, 33, 1}, {145, 513, 291, 1}, {37, 600, 40, 0}, {600, 40, 24, 1}};
    for (size_t i = 0; i < sizeof(bf16_shapes) / sizeof(bf16_shapes[0]); i++) { check_bf16(bf16_shapes[i], 0, &rng); }
    check_bf16((Shape){50, 100, 40, 0}, 1, &rng);
    if (!bf16_native()) { printf("note: this CPU has no AVX512_BF16: only the portable bf16 kernel was tested\n"); }
    // the readable attention's blocks of 64 queries; the tiled one's blocks of 32 queries, chunks of 256,
    // key tiles of 120 (forward) and 128 (backward), slices of up to 264 queries: T = 1, blocks and
    // tiles that end inside one, exactly one backward key tile, a partial third one, two and three
    // forward chunks and backward slices; head sizes under one panel (16, 20), one (32) and more (48,
    // 64, in panels of 12 rows and 32 columns); causal and not
    check_attention(2, 1, 32, 2, 1, &rng);
    check_attention(2, 1, 32, 2, 0, &rng);
    check_attention(2, 37, 32, 2, 1, &rng);
    check_attention(1, 128, 64, 2, 1, &rng);
    check_attention(3, 130, 96, 3, 1, &rng);
    check_attention(2, 130, 96, 3, 0, &rng);
    check_attention(1, 300, 64, 2, 1, &rng);
    check_attention(1, 300, 40, 2, 0, &rng);
    check_attention(2, 77, 96, 2, 0, &rng);
    check_attention(1, 531, 128, 2, 1, &rng);
    check_attention_bf16(2, 37, 32, 2, 1, &rng);
    check_attention_bf16(3, 130, 96, 3, 1, &rng);
    check_attention_bf16(2, 130, 96, 3, 0, &rng);
    check_attention_bf16(1, 300, 64, 2, 1, &rng);
    check_attention_bf16(1, 531, 128, 2, 1, &rng);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
