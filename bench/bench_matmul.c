/*
bench_matmul: GFLOP/s of the C matrix products (matmul_forward_grouped, matmul_backward_grouped) on
the shapes of one model configuration; bench/bench_blas.py measures OpenBLAS (through PyTorch) on the same
shapes, and bench/bench_cpu.sh prints the two side by side.

    bench_matmul --threads 2 --C 256 --H 256 --V 50257 --E 16 --k 4 --N 2048 [--T 256 --NH 4]
                 [--precision bf16] [--cold MB]

N = B·T positions; an expert's products get N·k/E rows (the average under top-k routing), and the
E experts of a layer are multiplied in one batch, as the model does (matmul_forward_grouped,
matmul_backward_grouped): an expert's time is the batch's over E; W1 and W3 together, as the
model multiplies them (matmul_forward_grouped_pair, matmul_backward_grouped_pair), each half the
pair's time. Each time is the median of repeated calls (at least 5, for at least 0.3 s). Prints one line per shape:
name, rows, IC, OC, calls per step, forward GFLOP/s, backward GFLOP/s (dinp and dweight
together), then dinp's and dweight's GFLOP/s each timed alone; then the products of a whole step:
their GFLOP/s, each shape weighted by its calls; then the register tile alone (micro_kernel on
packed panels, 1 thread), the ceiling of the rest;
last causal self-attention (attention_forward, attention_backward) on N / T (rounded down) sequences
of T positions with NH heads: GFLOP/s of the multiply-adds a causal mask leaves (a query sees itself and
the keys before it), counted as bench/bench_cpu.sh counts a step's (the backward pass twice the
forward's, its recomputed scores not counted), so that it compares with the products'.
With --precision bf16 the products the model runs in bf16 do so here (all but the router's,
doc/precision.md). Called repeatedly, a product finds its operands in the caches; in a training
step they were mostly written long before (a layer's inputs, by the time its backward pass reads
them). --cold MB sweeps MB megabytes of other memory before every timed call, so that the operands
come from main memory, as in a step.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../dtopp/matmul.h"     // defines: matmul_forward_grouped, matmul_backward_grouped (the products measured)
#include "../dtopp/attention.h"  // defines: attention_forward, attention_backward (measured last)

typedef struct {
    const char *name;
    int rows, IC, OC, calls;  // calls per training step (forward; the backward has as many)
    Precision precision;
    int batch;                // products multiplied in one call (the experts of a layer), each rows x IC -> OC
    int pair;                 // two layers on the same inputs, as the model runs W1 and W3 (the _pair calls)
} ProductShape;

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// --cold: memory written before each timed call, one float of every cache line, which evicts the
// operands from the caches.
static float *sweep_buffer;
static size_t sweep_floats;

static void sweep_caches(void) {
    for (size_t i = 0; i < sweep_floats; i += 16) { sweep_buffer[i] += 1.0f; }
}

// Median seconds of repeated calls of run(call) (at least 5, for at least 0.3 s), the caches swept
// before each (--cold).
static double median_call_seconds(void (*run)(const void *call), const void *call) {
    double times[1000];
    int n = 0;
    double begin = wall_seconds();
    while (n < 1000 && (n < 5 || wall_seconds() - begin < 0.3)) {
        sweep_caches();
        double t0 = wall_seconds();
        run(call);
        times[n++] = wall_seconds() - t0;
    }
    qsort(times, n, sizeof(double), compare_doubles);
    return times[n / 2];
}

// One call of a shape's products: forward (backward = 0), backward (1), or of the backward only
// dinp (2) or only dweight (3). b: the buffers, inp,
// weight, out, dinp, dweight, then the second layer's weight, out and dweight; start: the rows of
// each product of the batch.
typedef struct {
    ProductShape s;
    int backward;
    float **b;
    const int *start;
} ProductCall;

static void run_products(const void *call) {
    const ProductCall *c = (const ProductCall *)call;
    ProductShape s = c->s;
    float **b = c->b, *dinp = c->backward == 3 ? NULL : b[3];
    float *dweight_a = c->backward == 2 ? NULL : b[4], *dweight_b = c->backward == 2 ? NULL : b[7];
    if (c->backward && s.pair) {
        matmul_backward_grouped_pair(dinp, dweight_a, dweight_b, b[2], b[6], b[0], NULL, b[1], b[5], c->start, s.batch,
                                     s.IC, s.OC, s.precision);
    } else if (c->backward) {
        matmul_backward_grouped(dinp, dweight_a, b[2], b[0], NULL, b[1], c->start, s.batch, s.IC, s.OC, 1,
                                s.precision);
    } else if (s.pair) {
        matmul_forward_grouped_pair(b[2], b[6], b[0], NULL, b[1], b[5], c->start, s.batch, s.IC, s.OC, s.precision);
    } else {
        matmul_forward_grouped(b[2], b[0], NULL, b[1], c->start, s.batch, s.IC, s.OC, s.precision);
    }
}

// Median seconds of one product of the forward or backward pass (ProductCall's `backward`): one
// call, over s.batch when it multiplies a batch, and over 2 for a pair.
static double median_seconds(ProductShape s, int backward, float **b) {
    int start[s.batch + 1];
    for (int e = 0; e <= s.batch; e++) { start[e] = e * s.rows; }
    ProductCall call = {s, backward, b, start};
    return median_call_seconds(run_products, &call) / s.batch / (s.pair ? 2 : 1);
}

// The micro-kernel alone on the calling thread, as multiply_rows runs it: one packed B panel (in L1)
// against the GEMM_MC / GEMM_MR packed A panels of a block (in L2) in turn, GEMM_KC values of k.
static double tile_gflops(Precision precision) {
    enum { PANELS = GEMM_MC / GEMM_MR, A_SIZE = PANELS * GEMM_MR * GEMM_KC, B_SIZE = GEMM_NR * GEMM_KC };
    float *a = (float *)malloc_check(A_SIZE * sizeof(float)), *b = (float *)malloc_check(B_SIZE * sizeof(float));
    uint32_t *a16 = (uint32_t *)malloc_check(A_SIZE / 2 * sizeof(uint32_t));
    uint32_t *b16 = (uint32_t *)malloc_check(B_SIZE / 2 * sizeof(uint32_t));
    for (int i = 0; i < A_SIZE; i++) { a[i] = 0.001f * (i % 13); }
    for (int i = 0; i < B_SIZE; i++) { b[i] = 0.001f * (i % 7); }
    for (int i = 0; i < A_SIZE / 2; i++) { a16[i] = bf16_pair(a[2 * i], a[2 * i + 1]); }
    for (int i = 0; i < B_SIZE / 2; i++) { b16[i] = bf16_pair(b[2 * i], b[2 * i + 1]); }
    _Alignas(64) float tile[GEMM_MR * GEMM_NR];
    if (precision == BF16) { bf16_native(); }
    long calls = 0;
    double begin = wall_seconds(), seconds = 0.0;
    while (seconds < 0.5) {
        for (int panel = 0; panel < PANELS; panel++, calls++) {
            if (precision == BF16) {
                micro_kernel_bf16(GEMM_KC / 2, a16 + panel * GEMM_MR * GEMM_KC / 2, b16, tile);
            } else {
                micro_kernel(GEMM_KC, a + panel * GEMM_MR * GEMM_KC, b, tile);
            }
        }
        seconds = wall_seconds() - begin;
    }
    free(a);
    free(b);
    free(a16);
    free(b16);
    return 2.0 * GEMM_MR * GEMM_NR * GEMM_KC * calls / seconds * 1e-9;
}

// One call of causal attention_forward (backward = 0) or attention_backward (1) on B sequences of
// T positions, C channels, NH heads: qkv (B, T, 3C), out and dout (B, T, C), lse (B, NH, T), dqkv
// (B, T, 3C), which the backward pass adds to.
typedef struct {
    int backward, B, T, C, NH;
    Precision precision;
    float *qkv, *out, *lse, *dout, *dqkv;
} AttentionCall;

static void run_attention(const void *call) {
    const AttentionCall *a = (const AttentionCall *)call;
    if (a->backward) {
        attention_backward(a->dqkv, a->dout, a->qkv, a->out, a->lse, a->B, a->T, a->C, a->NH, 1, a->precision);
    } else {
        attention_forward(a->out, a->lse, a->qkv, a->B, a->T, a->C, a->NH, 1, a->precision);
    }
}

// The attention line: N / T sequences (rounded down) of T positions, in the buffers of the
// products, which hold N x 3C floats at least (qkv's output); the forward pass writes out and lse.
static void print_attention(int N, int T, int C, int NH, Precision precision, float **buffers) {
    int B = N / T;
    if (B == 0) {
        printf("attention: not measured, --N %d positions are fewer than one sequence of --T %d\n", N, T);
        return;
    }
    double attention_flops = 4.0 * B * NH * (C / NH) * ((double)T * (T + 1) / 2);
    AttentionCall attention = {0, B, T, C, NH, precision, buffers[0], buffers[2], buffers[3], buffers[4], buffers[6]};
    double forward = median_call_seconds(run_attention, &attention);
    attention.backward = 1;
    double backward = median_call_seconds(run_attention, &attention);
    printf("attention (causal, %d x %d positions, %d heads): forward %.1f GFLOP/s, backward %.1f GFLOP/s\n", B, T,
           NH, attention_flops / forward * 1e-9, 2 * attention_flops / backward * 1e-9);
}

int main(int argc, char **argv) {
    int threads = 0, C = 256, H = 256, V = 256, E = 16, k = 4, N = 4096, L = 4, T = 256, NH = 4, cold_mb = 0;
    Precision precision = FLOAT32;
    for (int a = 1; a + 1 < argc; a += 2) {
        if (strcmp(argv[a], "--precision") == 0) {
            if (strcmp(argv[a + 1], "bf16") != 0 && strcmp(argv[a + 1], "fp32") != 0) {
                fail("--precision: %s is neither fp32 nor bf16", argv[a + 1]);
            }
            precision = strcmp(argv[a + 1], "bf16") == 0 ? BF16 : FLOAT32;
            continue;
        }
        int *target = strcmp(argv[a], "--threads") == 0 ? &threads : strcmp(argv[a], "--C") == 0 ? &C
                    : strcmp(argv[a], "--H") == 0 ? &H : strcmp(argv[a], "--V") == 0 ? &V
                    : strcmp(argv[a], "--E") == 0 ? &E : strcmp(argv[a], "--k") == 0 ? &k
                    : strcmp(argv[a], "--N") == 0 ? &N : strcmp(argv[a], "--L") == 0 ? &L
                    : strcmp(argv[a], "--T") == 0 ? &T : strcmp(argv[a], "--NH") == 0 ? &NH
                    : strcmp(argv[a], "--cold") == 0 ? &cold_mb : NULL;
        if (target == NULL) { fail("unknown option %s", argv[a]); }
        *target = atoi(argv[a + 1]);
    }
    set_num_threads(threads);
    if (cold_mb < 0) { fail("--cold: %d MB is negative", cold_mb); }
    if (T <= 0) { fail("--T: %d positions is not a sequence length", T); }
    if (NH <= 0 || C % NH != 0) { fail("--NH: %d heads do not divide --C %d channels", NH, C); }
    sweep_floats = (size_t)cold_mb * (1 << 20) / sizeof(float);
    sweep_buffer = (float *)calloc(sweep_floats ? sweep_floats : 1, sizeof(float));
    if (sweep_buffer == NULL) { fail("--cold: cannot allocate %d MB", cold_mb); }
    int expert_rows = N * k / E;
    ProductShape shapes[] = {
        {"qkv", N, C, 3 * C, L, precision, 1, 0},
        {"attention_out", N, C, C, L, precision, 1, 0},
        {"expert_w1_w3", expert_rows, C, H, 2 * L * E, precision, E, 1},
        {"expert_w2", expert_rows, H, C, L * E, precision, E, 0},
        {"router", N, C, E, L, FLOAT32, 1, 0},
        {"output_head", N, C, V, 1, precision, 1, 0},
    };
    int n_shapes = sizeof(shapes) / sizeof(shapes[0]);
    size_t most = 0;
    for (int i = 0; i < n_shapes; i++) {
        ProductShape s = shapes[i];
        size_t sizes[3] = {(size_t)s.batch * s.rows * s.IC, (size_t)s.batch * s.OC * s.IC,
                           (size_t)s.batch * s.rows * s.OC};
        for (int j = 0; j < 3; j++) { most = sizes[j] > most ? sizes[j] : most; }
    }
    uint64_t rng = 1;
    float *buffers[8];
    for (int j = 0; j < 8; j++) {
        buffers[j] = (float *)malloc_check(most * sizeof(float));
        for (size_t i = 0; i < most; i++) { buffers[j][i] = 0.01f * (2.0f * random_f32(&rng) - 1.0f); }
    }
    printf("C products, %s, %d threads%s: shape rows IC OC calls/step forward-GFLOP/s backward-GFLOP/s "
           "dinp-GFLOP/s dweight-GFLOP/s\n",
           precision == BF16 ? "bf16" : "fp32", omp_threads(), cold_mb ? ", operands out of cache (--cold)" : "");
    double step_flops = 0.0, step_seconds = 0.0;
    for (int i = 0; i < n_shapes; i++) {
        ProductShape s = shapes[i];
        double flops = 2.0 * s.rows * s.IC * s.OC;
        double forward = median_seconds(s, 0, buffers), backward = median_seconds(s, 1, buffers);
        double dinp = median_seconds(s, 2, buffers), dweight = median_seconds(s, 3, buffers);
        printf("%-14s %6d %5d %6d %4d %8.1f %8.1f %8.1f %8.1f\n", s.name, s.rows, s.IC, s.OC, s.calls,
               flops / forward * 1e-9, 2 * flops / backward * 1e-9, flops / dinp * 1e-9, flops / dweight * 1e-9);
        step_flops += s.calls * 3 * flops;
        step_seconds += s.calls * (forward + backward);
    }
    printf("step products: %.1f GFLOP in %.1f ms: %.1f GFLOP/s\n", step_flops * 1e-9, step_seconds * 1e3,
           step_flops / step_seconds * 1e-9);
    printf("register tile alone, 1 thread: %.1f GFLOP/s\n", tile_gflops(precision));
    print_attention(N, T, C, NH, precision, buffers);
    for (int j = 0; j < 8; j++) { free(buffers[j]); }
    free(sweep_buffer);
    return 0;
}
