/*
cuda_common.h: the CUDA plumbing of train_dtopp.cu, none of it about the model (llm.c keeps the
same in its cuda_common.h).

- cuda_check / cublas_check and the macros cudaCheck, cublasCheck, launchCheck (after every kernel
  launch, so a bad launch configuration is reported where it happened).
- cuda_malloc / cuda_calloc / cuda_free: device memory, failing with a message when it runs out;
  blocks_for: the number of blocks that cover n threads.
- gpu: the GPU context, set up by gpu_init: the main stream and its cuBLAS handle, the math mode
  (cuda_set_tf32, DTOPP_TF32=1), how the experts' products are issued (cuda_set_grouped_experts,
  DTOPP_EXPERTS=grouped|lanes), and EXPERT_LANES side streams ("lanes") with handles of their own,
  which lanes_fork starts after the main stream and lanes_join waits for.
- copy_to_host / copy_to_device (waited for), copy_on_device, zero_async: on the main stream.
- PROFILE_MARK, cuda_profile_*: optional timing of the phases of a step (-DDTOPP_PROFILE, for
  bench/bench_cuda.c); without DTOPP_PROFILE PROFILE_MARK is nothing at all.
- warp_sum, warp_max, block_sum, block_max: reductions in a fixed order, so the same inputs give
  the same bits on every run.
*/
#ifndef CUDA_COMMON_H
#define CUDA_COMMON_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cuda_runtime.h>
#include <cublas_v2.h>
#include "utils.h"  // defines: fail, checked memory and file I/O

// ----------------------------------------------------------------------------
// checked calls, device memory

static void cuda_check(cudaError_t err, const char *what, const char *file, int line) {
    if (err != cudaSuccess) {
        fail("CUDA error at %s:%d (%s): %s", file, line, what, cudaGetErrorString(err));
    }
}
static void cublas_check(cublasStatus_t status, const char *what, const char *file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) {
        fail("cuBLAS error %d at %s:%d (%s)", (int)status, file, line, what);
    }
}
#define cudaCheck(call) cuda_check((call), #call, __FILE__, __LINE__)
#define cublasCheck(call) cublas_check((call), #call, __FILE__, __LINE__)
// after every kernel launch: a bad launch configuration is reported where it happened
#define launchCheck() cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

static void *cuda_malloc(size_t bytes) {
    void *ptr = NULL;
    cudaError_t err = cudaMalloc(&ptr, bytes > 0 ? bytes : 1);
    if (err != cudaSuccess) {
        fail("out of GPU memory allocating %zu bytes: %s", bytes, cudaGetErrorString(err));
    }
    return ptr;
}
static void *cuda_calloc(size_t bytes) {
    void *ptr = cuda_malloc(bytes);
    cudaCheck(cudaMemset(ptr, 0, bytes > 0 ? bytes : 1));
    cudaCheck(cudaDeviceSynchronize());  // the memset ran on the legacy stream, which ours do not wait for
    return ptr;
}
static void cuda_free(void *ptr) {
    if (ptr != NULL) { cudaCheck(cudaFree(ptr)); }
}
static unsigned blocks_for(size_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

// ----------------------------------------------------------------------------
// the GPU context: streams and cuBLAS handles

// The experts of one layer are many small products of different sizes: one stream cannot fill
// the GPU with them, so expert e runs on lane e % EXPERT_LANES. Each lane has its own cuBLAS
// handle and workspace (shared workspaces would make cuBLAS results depend on timing).
#define EXPERT_LANES 4
#define CUBLAS_WORKSPACE_BYTES (32u << 20)
typedef struct {
    cudaStream_t stream;
    cublasHandle_t blas;
    void *workspace;
    cudaEvent_t done;
} Lane;

static struct {
    int ready;
    int tf32;
    int grouped;          // experts through grouped products (one cuBLAS call per product and layer)
    cudaStream_t stream;  // everything but the experts runs here, in order
    cublasHandle_t blas;  // bound to stream
    void *workspace;
    cudaEvent_t fork;     // recorded on stream before the experts start
    Lane lanes[EXPERT_LANES];
} gpu;

static void set_math_mode(cublasHandle_t h) {
    cublasCheck(cublasSetMathMode(h, gpu.tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
}

// How the experts' products are issued: 1 grouped, 0 one product per expert on EXPERT_LANES
// streams. The environment variable DTOPP_EXPERTS=grouped|lanes sets it too.
void cuda_set_grouped_experts(int on) { gpu.grouped = on; }

// Allow (1) or forbid (0, the default) TF32 tensor cores in the matrix products.
void cuda_set_tf32(int on) {
    gpu.tf32 = on;
    if (!gpu.ready) { return; }
    set_math_mode(gpu.blas);
    for (int i = 0; i < EXPERT_LANES; i++) { set_math_mode(gpu.lanes[i].blas); }
}

static void gpu_init(void) {
    if (gpu.ready) { return; }
    int devices = 0;
    cudaCheck(cudaGetDeviceCount(&devices));
    if (devices < 1) { fail("no CUDA device found"); }
    const char *env = getenv("DTOPP_TF32");
    if (env != NULL && env[0] == '1') { gpu.tf32 = 1; }
    env = getenv("DTOPP_EXPERTS");
    if (env != NULL) { gpu.grouped = strcmp(env, "grouped") == 0; }
    cudaCheck(cudaStreamCreateWithFlags(&gpu.stream, cudaStreamNonBlocking));
    cublasCheck(cublasCreate(&gpu.blas));
    cublasCheck(cublasSetStream(gpu.blas, gpu.stream));
    gpu.workspace = cuda_malloc(CUBLAS_WORKSPACE_BYTES);
    cublasCheck(cublasSetWorkspace(gpu.blas, gpu.workspace, CUBLAS_WORKSPACE_BYTES));
    cudaCheck(cudaEventCreateWithFlags(&gpu.fork, cudaEventDisableTiming));
    for (int i = 0; i < EXPERT_LANES; i++) {
        Lane *lane = &gpu.lanes[i];
        cudaCheck(cudaStreamCreateWithFlags(&lane->stream, cudaStreamNonBlocking));
        cublasCheck(cublasCreate(&lane->blas));
        cublasCheck(cublasSetStream(lane->blas, lane->stream));
        lane->workspace = cuda_malloc(CUBLAS_WORKSPACE_BYTES);
        cublasCheck(cublasSetWorkspace(lane->blas, lane->workspace, CUBLAS_WORKSPACE_BYTES));
        cudaCheck(cudaEventCreateWithFlags(&lane->done, cudaEventDisableTiming));
    }
    gpu.ready = 1;
    cuda_set_tf32(gpu.tf32);
}

// The lanes start after everything queued on the main stream, and the main stream continues
// only after every lane has finished.
static void lanes_fork(void) {
    cudaCheck(cudaEventRecord(gpu.fork, gpu.stream));
    for (int i = 0; i < EXPERT_LANES; i++) {
        cudaCheck(cudaStreamWaitEvent(gpu.lanes[i].stream, gpu.fork, 0));
    }
}
static void lanes_join(void) {
    for (int i = 0; i < EXPERT_LANES; i++) {
        cudaCheck(cudaEventRecord(gpu.lanes[i].done, gpu.lanes[i].stream));
        cudaCheck(cudaStreamWaitEvent(gpu.stream, gpu.lanes[i].done, 0));
    }
}

// Host <-> device copies on the main stream, waited for (the host needs the data now).
static void copy_to_host(void *dst, const void *src, size_t bytes) {
    cudaCheck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, gpu.stream));
    cudaCheck(cudaStreamSynchronize(gpu.stream));
}
static void copy_to_device(void *dst, const void *src, size_t bytes) {
    cudaCheck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, gpu.stream));
    cudaCheck(cudaStreamSynchronize(gpu.stream));  // src may be freed by the caller right after
}
static void copy_on_device(void *dst, const void *src, size_t bytes) {
    cudaCheck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, gpu.stream));
}
static void zero_async(void *ptr, size_t bytes) { cudaCheck(cudaMemsetAsync(ptr, 0, bytes, gpu.stream)); }

// ----------------------------------------------------------------------------
// profiling

// Optional timing of the phases of a step, for bench/bench_cuda.c: built with -DDTOPP_PROFILE,
// PROFILE_MARK(name) records a cudaEvent on the main stream at the start of each named phase, and
// the time up to the next mark is charged to it. Without it PROFILE_MARK is nothing at all.
#ifndef DTOPP_PROFILE
#define PROFILE_MARK(name) ((void)0)
#else
#define PROFILE_MARK(name) profile_mark(name)
#define PROFILE_MAX_MARKS 8192
#define PROFILE_MAX_NAMES 64
static struct {
    int on, marks;
    cudaEvent_t events[PROFILE_MAX_MARKS];
    const char *mark_names[PROFILE_MAX_MARKS];
    int names;
    const char *name[PROFILE_MAX_NAMES];
    double ms[PROFILE_MAX_NAMES];
} prof;

static void profile_mark(const char *name) {
    if (!prof.on || prof.marks >= PROFILE_MAX_MARKS) { return; }
    if (prof.events[prof.marks] == NULL) { cudaCheck(cudaEventCreate(&prof.events[prof.marks])); }
    cudaCheck(cudaEventRecord(prof.events[prof.marks], gpu.stream));
    prof.mark_names[prof.marks++] = name;
}

void cuda_profile_enable(int on) { prof.on = on; prof.marks = 0; }

// Adds the time between the marks recorded so far to the per-phase totals.
void cuda_profile_collect(void) {
    if (!prof.on) { return; }
    profile_mark("(end)");
    cudaCheck(cudaEventSynchronize(prof.events[prof.marks - 1]));
    for (int i = 0; i + 1 < prof.marks; i++) {
        float ms = 0.0f;
        cudaCheck(cudaEventElapsedTime(&ms, prof.events[i], prof.events[i + 1]));
        int k = 0;
        while (k < prof.names && strcmp(prof.name[k], prof.mark_names[i]) != 0) { k++; }
        if (k == prof.names) {
            if (prof.names == PROFILE_MAX_NAMES) { continue; }
            prof.name[prof.names++] = prof.mark_names[i];
            prof.ms[k] = 0.0;
        }
        prof.ms[k] += ms;
    }
    prof.marks = 0;
}

void cuda_profile_print(FILE *f, int steps) {
    double total = 0.0;
    for (int k = 0; k < prof.names; k++) { total += prof.ms[k]; }
    fprintf(f, "%-28s %10s %7s\n", "phase", "ms/step", "share");
    for (int k = 0; k < prof.names; k++) {
        fprintf(f, "%-28s %10.3f %6.1f%%\n", prof.name[k], prof.ms[k] / steps, 100.0 * prof.ms[k] / total);
    }
    fprintf(f, "%-28s %10.3f\n", "total", total / steps);
}
#endif  // DTOPP_PROFILE

// ----------------------------------------------------------------------------
// reductions

// Reductions in a fixed order: the same inputs give the same bits on every run.
template <typename T> __device__ T warp_sum(T x) {
    for (int offset = 16; offset > 0; offset >>= 1) { x += __shfl_xor_sync(0xffffffffu, x, offset); }
    return x;
}
__device__ float warp_max(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) { x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset)); }
    return x;
}
// Sum over a block whose size is a multiple of 32; every thread gets the result.
template <typename T> __device__ T block_sum(T x) {
    __shared__ T partial[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    x = warp_sum(x);
    __syncthreads();  // partial may still be read by a previous call
    if (lane == 0) { partial[warp] = x; }
    __syncthreads();
    x = lane < warps ? partial[lane] : (T)0;
    return warp_sum(x);
}
__device__ float block_max(float x) {
    __shared__ float partial[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) { partial[warp] = x; }
    __syncthreads();
    x = lane < warps ? partial[lane] : -INFINITY;
    return warp_max(x);
}

#endif  // CUDA_COMMON_H
