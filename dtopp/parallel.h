/*
parallel.h: data parallelism over MPI, behind five functions that compile to a single rank when
the program is built without USE_MPI.

Built with USE_MPI (make train_dtopp_mpi), R processes ("ranks") train one model. Every rank reads
the whole batch of each step and computes on its own rows of it; the gradients and the step's
totals (losses, routing counts) are summed over the ranks; then every rank takes the same optimizer
step and the same controller step, so all of them hold the same parameters and p. Every sum runs in
rank order, so a run is bitwise reproducible for a given number of ranks. doc/parallel.md has the
details.
*/
#ifndef PARALLEL_H
#define PARALLEL_H

#include <stdint.h>
#include "utils.h"  // defines: fail, checked memory and file I/O, file headers
#ifdef USE_MPI
#include <limits.h>
#include <mpi.h>
#endif

int dp_rank = 0, dp_ranks = 1;  // this process, and how many train together

#if defined(USE_MPI) && defined(DTOPP_CUDA)
void cuda_parallel_init(int rank, int ranks);  // train_dtopp.cu: the GPU of this rank, NCCL's communicator
#endif

// Starts MPI when built with it. Only rank 0 prints: the others' stdout goes to /dev/null (their
// errors still reach stderr).
void dp_init(int *argc, char ***argv) {
#ifdef USE_MPI
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &dp_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &dp_ranks);
    if (dp_rank > 0 && freopen("/dev/null", "w", stdout) == NULL) { fail("rank %d: no /dev/null", dp_rank); }
#ifdef DTOPP_CUDA
    cuda_parallel_init(dp_rank, dp_ranks);
#endif
#else
    (void)argc;
    (void)argv;
#endif
}

void dp_finish(void) {
#ifdef USE_MPI
    MPI_Finalize();
#endif
}

// x (n) = the sum of x over the ranks, added in rank order, on every rank.
void dp_sum_doubles(double *x, int n) {
#ifdef USE_MPI
    if (dp_ranks == 1) { return; }
    double *all = (double *)malloc_check((size_t)n * dp_ranks * sizeof(double));
    MPI_Allgather(x, n, MPI_DOUBLE, all, n, MPI_DOUBLE, MPI_COMM_WORLD);
    for (int i = 0; i < n; i++) {
        x[i] = all[i];
        for (int r = 1; r < dp_ranks; r++) { x[i] += all[(size_t)r * n + i]; }
    }
    free(all);
#else
    (void)x;
    (void)n;
#endif
}

// x (n) = scale * (the sum of x over the ranks), the same bits on every rank. Rank r owns chunk r of
// the vector: an all-to-all brings it every rank's copy of its chunk, it adds them in rank order,
// and an all-gather hands the summed chunks to everyone. Each rank sends about 2 (R-1)/R of the
// vector, as a ring all-reduce does, but the order of the additions is ours, not MPI's.
void dp_sum_floats(float *x, size_t n, float scale) {
#ifdef USE_MPI
    if (dp_ranks > 1) {
        size_t chunk = (n + dp_ranks - 1) / dp_ranks;
        if (chunk > INT_MAX) { fail("data parallel: %zu values per rank do not fit one MPI message", chunk); }
        int *counts = (int *)malloc_check(2 * dp_ranks * sizeof(int)), *offsets = counts + dp_ranks;
        for (int r = 0; r < dp_ranks; r++) {
            size_t begin = r * chunk < n ? r * chunk : n, end = (r + 1) * chunk < n ? (r + 1) * chunk : n;
            offsets[r] = (int)begin;  // below n, which MPI's int counts cover here
            counts[r] = (int)(end - begin);
        }
        int mine = counts[dp_rank];
        float *copies = (float *)malloc_check((size_t)dp_ranks * chunk * sizeof(float));
        int *same = (int *)malloc_check(2 * dp_ranks * sizeof(int)), *strided = same + dp_ranks;
        for (int r = 0; r < dp_ranks; r++) { same[r] = mine, strided[r] = r * mine; }
        MPI_Alltoallv(x, counts, offsets, MPI_FLOAT, copies, same, strided, MPI_FLOAT, MPI_COMM_WORLD);
        float *own = x + offsets[dp_rank];
        #pragma omp parallel for
        for (int i = 0; i < mine; i++) {
            float sum = copies[i];
            for (int r = 1; r < dp_ranks; r++) { sum += copies[(size_t)r * mine + i]; }
            own[i] = sum * scale;
        }
        MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, x, counts, offsets, MPI_FLOAT, MPI_COMM_WORLD);
        free(copies);
        free(same);
        free(counts);
        return;
    }
#endif
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) { x[i] *= scale; }
}

// Fails unless every rank passes the same value (a hash of what must be identical everywhere).
void dp_check_same(uint64_t value, const char *what, int step) {
#ifdef USE_MPI
    uint64_t *all = (uint64_t *)malloc_check(dp_ranks * sizeof(uint64_t));
    MPI_Allgather(&value, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, MPI_COMM_WORLD);
    for (int r = 1; r < dp_ranks; r++) {
        if (all[r] != all[0]) { fail("after step %d rank %d holds other %s than rank 0", step, r, what); }
    }
    free(all);
#else
    (void)value;
    (void)what;
    (void)step;
#endif
}

#endif  // PARALLEL_H
