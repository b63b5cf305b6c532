/*
fma_peak.c: the machine's float32 FMA peak and its bf16 dot-product peak, measured: every thread
runs a loop of independent AVX-512 operations on registers (no memory), long enough that the loop's
overhead is negligible. These are the ceilings bench/bench_cpu.sh reports the training step against.

    bench/fma_peak [--threads N]

float32: vfmadd231ps zmm (16 multiply-adds = 32 FLOP each), ACCUMULATORS independent chains so the
FMA latency is hidden. bf16: vdpbf16ps zmm (32 bf16 products added in pairs into 16 float32 =
64 FLOP each), where the CPU has AVX512_BF16 (checked at run time).
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../dtopp/utils.h"  // defines: wall_seconds, set_num_threads, omp_threads, passive_wait_by_default

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define ACCUMULATORS 24
#define ITERATIONS 100000000L / 32

// 12 independent chains of `op` on the registers v0 .. v11, one instruction each
#define TWELVE_CHAINS(op, v, x)                                                                        \
    __asm__ volatile(op " %12, %12, %0\n\t" op " %12, %12, %1\n\t" op " %12, %12, %2\n\t"               \
                     op " %12, %12, %3\n\t" op " %12, %12, %4\n\t" op " %12, %12, %5\n\t"               \
                     op " %12, %12, %6\n\t" op " %12, %12, %7\n\t" op " %12, %12, %8\n\t"               \
                     op " %12, %12, %9\n\t" op " %12, %12, %10\n\t" op " %12, %12, %11"                  \
                     : "+v"(v##0), "+v"(v##1), "+v"(v##2), "+v"(v##3), "+v"(v##4), "+v"(v##5),          \
                       "+v"(v##6), "+v"(v##7), "+v"(v##8), "+v"(v##9), "+v"(v##10), "+v"(v##11)         \
                     : "v"(x))

#define SUM_TWELVE(v)                                                                                  \
    _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(v##0, v##1), _mm512_add_ps(v##2, v##3)),   \
                                _mm512_add_ps(_mm512_add_ps(v##4, v##5), _mm512_add_ps(v##6, v##7))),  \
                  _mm512_add_ps(_mm512_add_ps(v##8, v##9), _mm512_add_ps(v##10, v##11)))

// ACCUMULATORS independent chains of `op` on registers, written as assembly so that the compiler
// can neither keep them in memory nor fold them; returns a value that depends on every chain.
// 24 chains, as many as the model's register tile has: 12 left vdpbf16ps waiting on its own
// latency on some processors (a bf16 "peak" below what the tile reached).
#define PEAK_LOOP(name, isa, op)                                                                       \
    __attribute__((target(isa))) static float name(long n, float seed) {                             \
        __m512 a0 = _mm512_set1_ps(seed), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,        \
               a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0, x = _mm512_set1_ps(0.5f);                \
        __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0, b6 = a0, b7 = a0, b8 = a0,        \
               b9 = a0, b10 = a0, b11 = a0;                                                            \
        for (long it = 0; it < n; it++) {                                                                \
            TWELVE_CHAINS(op, a, x);                                                                     \
            TWELVE_CHAINS(op, b, x);                                                                     \
        }                                                                                                \
        return _mm512_reduce_add_ps(_mm512_add_ps(SUM_TWELVE(a), SUM_TWELVE(b)));                     \
    }
PEAK_LOOP(fma_loop, "avx512f", "vfmadd231ps")
PEAK_LOOP(dpbf16_loop, "avx512f,avx512bf16", "vdpbf16ps")

// GFLOP/s of all threads running kind's loop at once, the best of `repeats` timings
static double measure(int bf16, int repeats) {
    long n = ITERATIONS;
    double flops_per_iteration = ACCUMULATORS * (bf16 ? 64.0 : 32.0), best = 0.0;
    for (int r = 0; r < repeats; r++) {
        double start = 0.0, sink = 0.0;
        #pragma omp parallel reduction(+ : sink)
        {
            #pragma omp barrier
            #pragma omp master
            start = wall_seconds();
            #pragma omp barrier
            sink += bf16 ? dpbf16_loop(n, 1.0f) : fma_loop(n, 1.0f);
        }
        double seconds = wall_seconds() - start;
        double gflops = flops_per_iteration * n * omp_threads() / seconds / 1e9;
        if (sink == 12345.0) { printf(" "); }  // keeps the loops' results alive
        best = gflops > best ? gflops : best;
    }
    return best;
}

#endif

int main(int argc, char **argv) {
    passive_wait_by_default(argv);
    int threads = 2;
    for (int i = 1; i < argc; i += 2) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc && atoi(argv[i + 1]) > 0) {
            threads = atoi(argv[i + 1]);
        } else {
            fprintf(stderr, "usage: fma_peak [--threads N]\n");
            return 1;
        }
    }
    set_num_threads(threads);
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) {
        printf("fma_peak: this CPU has no AVX-512; the peak is not measured\n");
        return 0;
    }
    printf("float32 FMA peak (vfmadd231ps zmm, %d threads): %.0f GFLOP/s\n", threads, measure(0, 3));
    if (__builtin_cpu_supports("avx512bf16")) {
        printf("bf16 dot-product peak (vdpbf16ps zmm, %d threads): %.0f GFLOP/s\n", threads, measure(1, 3));
    } else {
        printf("bf16 dot-product peak: this CPU has no AVX512_BF16\n");
    }
#else
    printf("fma_peak: measures AVX-512 loops, not built for this architecture\n");
#endif
    return 0;
}
