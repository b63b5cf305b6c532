/*
parallel.h: data and expert parallelism over MPI, behind functions that compile to a single rank
when the program is built without USE_MPI.

Built with USE_MPI (make train_dtopp_mpi), R processes ("ranks") train one model. Every rank reads
the whole batch of each step and computes on its own rows of it; the gradients and the step's
totals (losses, routing counts) are summed over the ranks; then every rank takes the same optimizer
step and the same controller step, so all of them hold the same parameters and p. Every sum runs in
rank order, so a run is bitwise reproducible for a given number of ranks. doc/parallel.md has the
details.

Expert parallelism (--expert-parallel G): the ranks form groups of G consecutive ranks; rank k of a
group computes experts k·E/G .. (k+1)·E/G - 1 of every layer for the tokens of the whole group.
The routed rows travel to their experts' ranks and back (ep_exchange_counts, ep_exchange_rows).
Sums over ranks run in two levels, first within a group, then over the groups, each in rank order:
with G = 1 that is the one-level sum of data parallelism. A rank holds only its own experts' weights
(train_dtopp.c's Model.experts): their gradients are summed over the groups only
(dp_sum_floats_across_groups), and checkpoints gather them to rank 0 (ep_gather_floats).
*/
#ifndef PARALLEL_H
#define PARALLEL_H

#include <stdint.h>
#include <string.h>
#include "utils.h"  // defines: fail, checked memory and file I/O, file headers
#ifdef USE_MPI
#include <limits.h>
#include <mpi.h>
#endif

int dp_rank = 0, dp_ranks = 1;  // this process, and how many train together
int ep_rank = 0, ep_ranks = 1;  // this rank's place in its expert-parallel group, and the group's size
double ep_bytes_sent = 0.0, dp_bytes_sent = 0.0;  // sent to other ranks so far: expert rows, gradient sums
static double *ep_imbalance;    // (layers, 3) of the group's expert rows per rank: max/mean summed, worst, passes
static int ep_layers;
#ifdef USE_MPI
static MPI_Comm ep_comm, groups_comm;  // this rank's expert-parallel group; the ranks of its place in every group
#endif

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
    ep_comm = MPI_COMM_SELF;
    groups_comm = MPI_COMM_WORLD;
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
    if (ep_ranks > 1) {
        MPI_Comm_free(&ep_comm);
        MPI_Comm_free(&groups_comm);
    }
    MPI_Finalize();
#endif
}

// Splits the ranks into expert-parallel groups of `size` consecutive ranks.
void ep_init(int size) {
    if (size < 1 || dp_ranks % size != 0) {
        fail("--expert-parallel %d does not divide the %d rank(s) into groups (--expert-parallel 1: every rank "
             "holds all experts)", size, dp_ranks);
    }
#ifdef USE_MPI
    if (size > 1) {
        MPI_Comm_split(MPI_COMM_WORLD, dp_rank / size, dp_rank, &ep_comm);
        MPI_Comm_split(MPI_COMM_WORLD, dp_rank % size, dp_rank, &groups_comm);
    }
#endif
    ep_rank = dp_rank % size;
    ep_ranks = size;
}

#ifdef USE_MPI
static int comm_size(MPI_Comm comm) {
    int size;
    MPI_Comm_size(comm, &size);
    return size;
}

// x (n) = the sum of x over the ranks of comm, added in their order, on every one of them.
static void sum_doubles_over(MPI_Comm comm, double *x, int n) {
    int ranks = comm_size(comm);
    if (ranks == 1) { return; }
    double *all = (double *)malloc_check((size_t)n * ranks * sizeof(double));
    MPI_Allgather(x, n, MPI_DOUBLE, all, n, MPI_DOUBLE, comm);
    for (int i = 0; i < n; i++) {
        x[i] = all[i];
        for (int r = 1; r < ranks; r++) { x[i] += all[(size_t)r * n + i]; }
    }
    free(all);
}

// x (n) = scale * (the sum of x over the ranks of comm), the same bits on each. Rank r owns chunk r
// of the vector: an all-to-all brings it every rank's copy of its chunk, it adds them in rank order,
// and an all-gather hands the summed chunks to everyone. Each rank sends about 2 (R-1)/R of the
// vector, as a ring all-reduce does, but the order of the additions is ours, not MPI's.
static void sum_floats_over(MPI_Comm comm, float *x, size_t n, float scale) {
    int ranks = comm_size(comm), rank;
    MPI_Comm_rank(comm, &rank);
    size_t chunk = (n + ranks - 1) / ranks;
    if (chunk > INT_MAX) { fail("data parallel: %zu values per rank do not fit one MPI message", chunk); }
    int *counts = (int *)malloc_check(2 * ranks * sizeof(int)), *offsets = counts + ranks;
    for (int r = 0; r < ranks; r++) {
        size_t begin = r * chunk < n ? r * chunk : n, end = (r + 1) * chunk < n ? (r + 1) * chunk : n;
        offsets[r] = (int)begin;  // below n, which MPI's int counts cover here
        counts[r] = (int)(end - begin);
    }
    int mine = counts[rank];
    float *copies = (float *)malloc_check((size_t)ranks * chunk * sizeof(float));
    int *same = (int *)malloc_check(2 * ranks * sizeof(int)), *strided = same + ranks;
    for (int r = 0; r < ranks; r++) { same[r] = mine, strided[r] = r * mine; }
    MPI_Alltoallv(x, counts, offsets, MPI_FLOAT, copies, same, strided, MPI_FLOAT, comm);
    float *own = x + offsets[rank];
    #pragma omp parallel for
    for (int i = 0; i < mine; i++) {
        float sum = copies[i];
        for (int r = 1; r < ranks; r++) { sum += copies[(size_t)r * mine + i]; }
        own[i] = sum * scale;
    }
    MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, x, counts, offsets, MPI_FLOAT, comm);
    dp_bytes_sent += ((double)(n - mine) + (double)mine * (ranks - 1)) * sizeof(float);
    free(copies);
    free(same);
    free(counts);
}
#endif

// x (n) = the sum of x over the ranks, added in rank order within each expert-parallel group, then
// over the groups in order, on every rank.
void dp_sum_doubles(double *x, int n) {
#ifdef USE_MPI
    sum_doubles_over(ep_comm, x, n);
    sum_doubles_over(groups_comm, x, n);
#else
    (void)x;
    (void)n;
#endif
}

// Expert parallelism, the experts' gradients: x (n) = scale * (the sum of x over the ranks that hold
// the same experts, one per group, in group order). Within a group each rank holds other experts.
void dp_sum_floats_across_groups(float *x, size_t n, float scale) {
#ifdef USE_MPI
    if (comm_size(groups_comm) > 1) {
        sum_floats_over(groups_comm, x, n, scale);
        return;
    }
#endif
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) { x[i] *= scale; }
}

// x (n) = scale * (the sum of x over the ranks), in the order of dp_sum_doubles, the same bits on
// every rank: first within the expert-parallel group, then across the groups.
void dp_sum_floats(float *x, size_t n, float scale) {
#ifdef USE_MPI
    if (ep_ranks > 1) { sum_floats_over(ep_comm, x, n, 1.0f); }
#endif
    dp_sum_floats_across_groups(x, n, scale);
}

// x (n) = the sum of x over the ranks of this rank's expert-parallel group, in rank order.
void ep_sum_doubles(double *x, int n) {
#ifdef USE_MPI
    sum_doubles_over(ep_comm, x, n);
#else
    (void)x;
    (void)n;
#endif
}

// Expert parallelism, checkpoints: rank 0 of the group receives every rank's n floats, in rank
// order, into all (G n; only read on rank 0); with G = 1 a copy.
void ep_gather_floats(const float *mine, size_t n, float *all) {
#ifdef USE_MPI
    if (ep_ranks > 1) {
        if (n > INT_MAX) { fail("expert parallel: %zu values of a layer do not fit one MPI message", n); }
        MPI_Gather(mine, (int)n, MPI_FLOAT, all, (int)n, MPI_FLOAT, 0, ep_comm);
        return;
    }
#endif
    memcpy(all, mine, n * sizeof(float));
}

// Expert parallelism: each rank of the group sends `per_rank` counts to every rank (block r of
// `send` to rank r) and receives theirs into `recv`, in rank order.
void ep_exchange_counts(const int *send, int *recv, int per_rank) {
#ifdef USE_MPI
    MPI_Alltoall(send, per_rank, MPI_INT, recv, per_rank, MPI_INT, ep_comm);
#else
    memcpy(recv, send, (size_t)per_rank * sizeof(int));
#endif
}

// Sends send_rows[r] rows of `width` floats to rank r of the group (the blocks of `send`, one
// after another in rank order) and receives recv_rows[r] rows from each rank r into `recv`, in rank
// order: an all-to-all-v, its sizes known from ep_exchange_counts.
void ep_exchange_rows(const float *send, const int *send_rows, float *recv, const int *recv_rows, int width) {
#ifdef USE_MPI
    int G = ep_ranks, *v = (int *)malloc_check(4 * G * sizeof(int));
    int *send_counts = v, *send_offsets = v + G, *recv_counts = v + 2 * G, *recv_offsets = v + 3 * G;
    size_t sent = 0, received = 0;
    for (int r = 0; r < G; r++) {
        if ((size_t)send_rows[r] * width > INT_MAX || (sent + (size_t)send_rows[r]) * width > INT_MAX ||
            (received + (size_t)recv_rows[r]) * width > INT_MAX) {
            fail("expert parallel: a layer's rows do not fit one MPI message; use more ranks or a smaller batch");
        }
        send_counts[r] = send_rows[r] * width, send_offsets[r] = (int)(sent * width);
        recv_counts[r] = recv_rows[r] * width, recv_offsets[r] = (int)(received * width);
        sent += send_rows[r], received += recv_rows[r];
        if (r != ep_rank) { ep_bytes_sent += (double)send_counts[r] * sizeof(float); }
    }
    MPI_Alltoallv(send, send_counts, send_offsets, MPI_FLOAT, recv, recv_counts, recv_offsets, MPI_FLOAT, ep_comm);
    free(v);
#else
    memcpy(recv, send, (size_t)send_rows[0] * width * sizeof(float));
    (void)recv_rows;
#endif
}

// Fails unless every rank passes the value of rank r mod period (a hash of what must be identical:
// period 1, everywhere; period G, on the ranks of the same place in every group).
void dp_check_same(uint64_t value, const char *what, int step, int period) {
#ifdef USE_MPI
    uint64_t *all = (uint64_t *)malloc_check(dp_ranks * sizeof(uint64_t));
    MPI_Allgather(&value, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, MPI_COMM_WORLD);
    for (int r = period; r < dp_ranks; r++) {
        if (all[r] != all[r % period]) {
            fail("after step %d rank %d holds other %s than rank %d", step, r, what, r % period);
        }
    }
    free(all);
#else
    (void)value;
    (void)what;
    (void)step;
    (void)period;
#endif
}

// Load across the ranks of a group: in layer l's forward pass this rank got `rows` expert rows to
// compute. The group compares its ranks' rows (a small all-gather, for the report) and keeps, per
// layer, the sum and the worst of max/mean over the passes.
void ep_note_rows(int layer, int rows) {
    if (layer >= ep_layers) {
        ep_imbalance = (double *)realloc_check(ep_imbalance, 3 * (layer + 1) * sizeof(double));
        for (int i = 3 * ep_layers; i < 3 * (layer + 1); i++) { ep_imbalance[i] = 0.0; }
        ep_layers = layer + 1;
    }
#ifdef USE_MPI
    int *all = (int *)malloc_check(ep_ranks * sizeof(int)), max = 0;
    double sum = 0.0;
    MPI_Allgather(&rows, 1, MPI_INT, all, 1, MPI_INT, ep_comm);
    for (int r = 0; r < ep_ranks; r++) { max = all[r] > max ? all[r] : max, sum += all[r]; }
    free(all);
    double ratio = sum > 0.0 ? max / (sum / ep_ranks) : 1.0, *stats = ep_imbalance + 3 * layer;
    stats[0] += ratio, stats[1] = ratio > stats[1] ? ratio : stats[1], stats[2] += 1.0;
#else
    (void)rows;
#endif
}

// At the end of a run (rank 0 prints): the bytes rank 0 sent per step, and per layer the expert
// rows of the busiest rank of its group against the group's mean, over the run's forward passes
// (evaluation's included).
void parallel_report(int steps) {
    if (dp_ranks == 1 || steps < 1) { return; }
    printf("parallel: rank 0 sent %.0f bytes of gradient sums and %.0f bytes of expert rows per step "
           "(evaluation's rows included)\n",
           dp_bytes_sent / steps, ep_bytes_sent / steps);
    for (int l = 0; l < ep_layers; l++) {
        const double *stats = ep_imbalance + 3 * l;
        printf("parallel: layer %d: expert rows per rank of a group, max/mean %.3f on average over %.0f "
               "forward passes, %.3f at worst\n", l, stats[0] / stats[2], stats[2], stats[1]);
    }
}

#endif  // PARALLEL_H
