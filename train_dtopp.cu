/*
train_dtopp.cu: the CUDA twin of train_dtopp.c.

The contract (stated also at the top of train_dtopp.c): this file defines DTOPP_CUDA and includes
train_dtopp.c, which brings in its shared part (sections 1-3: configuration, the parameter and
activation layouts and the buffer carving, the views LayerWeights, RouterView and ExpertView, the
model API's declarations, the RoPE tables; 6: the controller law; the AdamW rule of 7; the model
file of 8 with model_init and model_load) and its training program (9). It then defines, on one
GPU, what train_dtopp.c's CPU sections define, under the same section titles and names and in the
same order: a CPU loop becomes a kernel plus a launcher of the same name; a CPU matmul becomes a
cuBLAS call. The model API and the MoE layer's functions take exactly the CPU's arguments; what a
GPU needs beyond them (streams, cuBLAS handles, scratch) lives in the global `gpu` state
(dtopp/cuda_common.h) or in the GPU fields of the views. Still different, because the GPU keeps
other buffers: the products take no gathered-row list (the experts gather into ExpertView.xg
first), attention and cross-entropy take their scratch and the padded vocabulary, rmsnorm_backward
a column-sum scratch, encoder_backward the batch's distinct tokens.

Contents, in the order of train_dtopp.c:
  1-3. configuration, parameters and activations, the model and its API: train_dtopp.c's, plus
       what only the GPU keeps besides the shared activations (DeviceScratch)
  4. the layers, each a forward/backward pair, as kernels and their launchers
  5. the model's forward and backward passes on the GPU, routing counts, sampling, the getters
  6. the PI controller: train_dtopp.c's
  7. AdamW on the GPU, gradient accumulation, the sum over ranks (NCCL)
  8. the model file: train_dtopp.c's, with this file's model_attach, model_save, model_free
  9. main: train_dtopp.c's

Device memory: model->params_memory, grads_memory, m_memory and v_memory are GPU pointers here;
threshold and integral (the controller state) stay on the host. The getters (model_get_*) copy
from the device.

Precision: float32 everywhere; --precision bf16 is refused in this build (doc/precision.md
describes the bf16 design of the CPU build, which the CUDA kernels will follow). cuBLAS runs in
its default math mode, which for float32 products is true float32 (no TF32). Setting the
environment variable DTOPP_TF32=1 (or calling cuda_set_tf32(1)) lets cuBLAS use TF32 tensor cores
for the matrix products: faster, about 1e-3 relative error per product, above the tolerance of
the reference tests, which run without it.

The experts' products: by default one cuBLAS product per expert, spread over EXPERT_LANES
streams; DTOPP_EXPERTS=grouped (or cuda_set_grouped_experts(1)) issues them as grouped products,
one cuBLAS call per product and layer instead (faster forward, slower backward on an H100: see
doc/cuda.md).

Determinism: two runs give bitwise identical results. No reduction uses atomics: the dispatch
places rows in token order by a counting sort, combine and its backward gather per token, column
sums (RMSNorm gains, dθ) reduce fixed chunks in a fixed order, the gradient norm sums fixed blocks.
cuBLAS is deterministic for a given problem on a given GPU; the experts' products run on several
streams, each with its own cuBLAS handle and workspace, which keeps them deterministic too.

Build:  nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fopenmp train_dtopp.cu -lcublas -o train_dtopp_cuda
*/
#include <cuda_runtime.h>
#include <cublas_v2.h>
#define DTOPP_CUDA
#include "train_dtopp.c"
#include "dtopp/cuda_common.h"  // defines: cudaCheck, cublasCheck, launchCheck, cuda_malloc/calloc/free,
                                // blocks_for, gpu (streams, cuBLAS handles, lanes), copy_*, zero_async,
                                // PROFILE_MARK, warp_sum/max, block_sum/max

// ----------------------------------------------------------------------------
// 1. configuration
// train_dtopp.c's: ModelConfig, RouterConfig.

// ----------------------------------------------------------------------------
// 2. parameters: one contiguous buffer carved into named tensors, in the order of doc/formats.md
// The layouts and the carving are train_dtopp.c's (activation_layout with rows of Vp logits,
// routing_layout, total_size, carve_*), on GPU memory here; below, what only the GPU keeps besides.

#define DISPATCH_CHUNK 256  // tokens per chunk of the counting sort
// Grouped products: each of the GROUPED_SITES products of a layer (2 forward, 5 backward) has its
// own slot of A, B and C pointers for up to 2 problems per expert, so that no slot is rewritten
// while a copy of it may still be in flight.
#define GROUPED_SITES 7
#define GROUPED_SLOT(E) (3 * 2 * (size_t)(E))

#define COLSUM_ROWS 256

struct DeviceScratch {
    float *float_memory;     // one allocation for the five tensors below
    float *token_lse;        // (N) log-sum-exp of each row of logits, reused by the backward pass
    float *attn_q;           // (B, NH, T, hd) q, k, v and the attention output, head-major, for the
    float *attn_k;           // batched products of attention
    float *attn_v;
    float *attn_y;
    float *grad_memory;      // one allocation for the five gradient tensors below (backward only)
    float *dq;               // (B, NH, T, hd)
    float *dk;
    float *dv;
    float *dy;               // (B, NH, T, hd) gradient of the attention output, head-major
    float *colsum;           // (ceil(N / COLSUM_ROWS), C) partial column sums (RMSNorm gains)
    int *int_memory;         // one allocation for the dispatch scratch
    int *dispatch_choice;    // (N, E): which choice j of token n is expert e, -1 if none
    int *dispatch_counts;    // (chunks, E): tokens of each chunk that chose e, then its first row
    int *expert_start_host;  // (L, E + 1) host copy of routing.expert_start: the products' sizes
    float *aux_lb_host;      // (L) host copies of acts.aux_lb and aux_ent
    float *aux_ent_host;
    // the tokens of the batch on the device, and for the embedding's backward pass the positions
    // of every distinct token: token_ids[u] occurs at positions
    // token_pos[token_first[u] .. token_first[u+1]-1]
    int *inputs, *targets;
    int *token_ids, *token_first, *token_pos;
    int n_distinct;
    void **gemm_host, **gemm_dev;  // pointer arrays of the grouped products: GROUPED_SITES slots per layer
    double *sums;                  // (L + E + 1) reduction scratch (loss, activated counts, LB per expert)
    int xg_capacity;
    float *xg;                     // (R, C) the gathered inputs of one layer's rows
};

// One allocation of GPU memory (zeroed) carved into the tensors of a layout, as on the CPU.
static float *device_floats(float **tensors[], const size_t *sizes, int n) {
    float *memory = (float *)cuda_calloc(total_size(sizes, n) * sizeof(float));
    carve_floats(tensors, sizes, n, memory);
    return memory;
}

static int *device_ints(int **tensors[], const size_t *sizes, int n) {
    int *memory = (int *)cuda_calloc(total_size(sizes, n) * sizeof(int));
    carve_ints(tensors, sizes, n, memory);
    return memory;
}

// ----------------------------------------------------------------------------
// 3. the model: its state, and the functions every implementation provides (declared in
// train_dtopp.c, with rope_table_init; sections 4-8 below implement them on the GPU)

// ----------------------------------------------------------------------------
// 4. the layers, each a forward/backward pair
// N = B*T token positions. Backward functions accumulate (+=) into parameter gradients and into
// the input gradient they are given, as on the CPU. A linear layer is matmul_forward /
// matmul_backward, here cuBLAS products (matmul.h on the CPU).

// out (rows, OC) = inp (rows, IC) · weight (OC, IC)^T, all row-major; in cuBLAS's column-major
// terms that is out^T = weight · inp^T. beta = 1 accumulates into out.
static void matmul_forward_on(cublasHandle_t blas, float *out, const float *inp, const float *weight,
                              int rows, int IC, int OC, float beta) {
    if (rows == 0) { return; }
    const float one = 1.0f;
    cublasCheck(
        cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, OC, rows, IC, &one, weight, IC, inp, IC, &beta, out, OC));
}

void matmul_forward(float *out, const float *inp, const float *weight, int rows, int IC, int OC) {
    matmul_forward_on(gpu.blas, out, inp, weight, rows, IC, OC, 0.0f);
}

// dinp (rows, IC) += dout · weight; dweight (OC, IC) += dout^T · inp (summed over rows by cuBLAS,
// in an order that depends only on the sizes).
static void matmul_backward_on(cublasHandle_t blas, float *dinp, float *dweight, const float *dout,
                               const float *inp, const float *weight, int rows, int IC, int OC,
                               float dinp_beta) {
    if (rows == 0) { return; }
    const float one = 1.0f;
    if (dinp != NULL) {
        cublasCheck(cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, IC, rows, OC, &one, weight, IC, dout, OC,
                                &dinp_beta, dinp, IC));
    }
    cublasCheck(cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, rows, &one, inp, IC, dout, OC, &one,
                            dweight, IC));
}

void matmul_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                     int rows, int IC, int OC) {
    matmul_backward_on(gpu.blas, dinp, dweight, dout, inp, weight, rows, IC, OC, 1.0f);
}

__global__ void encoder_forward_kernel(float *out, const int *inp, const float *wte, int N, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * C) { return; }
    size_t n = i / C, c = i % C;
    out[i] = wte[(size_t)inp[n] * C + c];
}

void encoder_forward(float *out, const int *inp, const float *wte, int N, int C) {
    encoder_forward_kernel<<<blocks_for((size_t)N * C, 256), 256, 0, gpu.stream>>>(out, inp, wte, N, C);
    launchCheck();
}

// One block per distinct token: it adds the gradients of that token's positions in position
// order, the order of the CPU's serial loop, and no two blocks write the same row.
__global__ void encoder_backward_kernel(float *dwte, const float *dout, const int *token_ids,
                                        const int *token_first, const int *token_pos, int C) {
    int u = blockIdx.x;
    float *dw = dwte + (size_t)token_ids[u] * C;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float sum = dw[i];
        for (int k = token_first[u]; k < token_first[u + 1]; k++) {
            sum += dout[(size_t)token_pos[k] * C + i];
        }
        dw[i] = sum;
    }
}

void encoder_backward(float *dwte, const float *dout, const Activations *a, int C) {
    const DeviceScratch *s = a->device;
    if (s->n_distinct == 0) { return; }
    encoder_backward_kernel<<<s->n_distinct, 256, 0, gpu.stream>>>(dwte, dout, s->token_ids, s->token_first,
                                                                   s->token_pos, C);
    launchCheck();
}

// The positions of every distinct token of the batch, grouped by token (host side, once per
// forward pass: the token ids live on the host anyway).
static void encoder_prepare(Activations *a, const int *inputs, int N, int V) {
    int *count = (int *)calloc_check((size_t)V + 1, sizeof(int));
    int *ids = (int *)malloc_check((size_t)N * sizeof(int));
    int *first = (int *)malloc_check(((size_t)N + 1) * sizeof(int));
    int *pos = (int *)malloc_check((size_t)N * sizeof(int));
    for (int n = 0; n < N; n++) {
        if (inputs[n] < 0 || inputs[n] >= V) {
            fail("token id %d at position %d is outside the vocabulary (%d)", inputs[n], n, V);
        }
        count[inputs[n]]++;
    }
    int distinct = 0, offset = 0;
    for (int v = 0; v < V; v++) {
        if (count[v] == 0) { continue; }
        ids[distinct] = v;
        first[distinct++] = offset;
        int c = count[v];
        count[v] = offset;  // from here on: the next free slot of token v
        offset += c;
    }
    first[distinct] = offset;
    for (int n = 0; n < N; n++) { pos[count[inputs[n]]++] = n; }  // in position order
    DeviceScratch *s = a->device;
    copy_to_device(s->token_ids, ids, (size_t)distinct * sizeof(int));
    copy_to_device(s->token_first, first, ((size_t)distinct + 1) * sizeof(int));
    copy_to_device(s->token_pos, pos, (size_t)N * sizeof(int));
    s->n_distinct = distinct;
    free(count);
    free(ids);
    free(first);
    free(pos);
}

// one warp per row
__global__ void rmsnorm_forward_kernel(float *out, float *rstd, const float *inp, const float *g, int N,
                                       int C) {
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) { return; }
    const float *x = inp + (size_t)n * C;
    float ss = 0.0f;
    for (int i = lane; i < C; i += 32) { ss += x[i] * x[i]; }
    ss = warp_sum(ss);
    float r = 1.0f / sqrtf(ss / C + RMSNORM_EPS);
    float *o = out + (size_t)n * C;
    for (int i = lane; i < C; i += 32) { o[i] = g[i] * x[i] * r; }
    if (lane == 0) { rstd[n] = r; }
}

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *g, int N, int C) {
    rmsnorm_forward_kernel<<<blocks_for(N, 8), 256, 0, gpu.stream>>>(out, rstd, inp, g, N, C);
    launchCheck();
}

__global__ void rmsnorm_backward_kernel(float *dinp, const float *dout, const float *inp, const float *g,
                                        const float *rstd, int N, int C) {
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) { return; }
    const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
    float r = rstd[n];
    float dot = 0.0f;  // <g ⊙ dout, x>
    for (int i = lane; i < C; i += 32) { dot += g[i] * d[i] * x[i]; }
    dot = warp_sum(dot);
    float *dx = dinp + (size_t)n * C;
    for (int i = lane; i < C; i += 32) { dx[i] += r * g[i] * d[i] - x[i] * (r * r * r / C) * dot; }
}

// Column sums in two fixed stages: chunks of COLSUM_ROWS rows, then the chunks in order.
__global__ void rmsnorm_dg_partial_kernel(float *partial, const float *dout, const float *inp,
                                          const float *rstd, int N, int C) {
    int i = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (i >= C) { return; }
    int end = min(N, (chunk + 1) * COLSUM_ROWS);
    float sum = 0.0f;
    for (int n = chunk * COLSUM_ROWS; n < end; n++) {
        sum += dout[(size_t)n * C + i] * inp[(size_t)n * C + i] * rstd[n];
    }
    partial[(size_t)chunk * C + i] = sum;
}

__global__ void colsum_finish_kernel(float *out, const float *partial, int chunks, int C) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= C) { return; }
    float sum = 0.0f;
    for (int k = 0; k < chunks; k++) { sum += partial[(size_t)k * C + i]; }
    out[i] += sum;
}

void rmsnorm_backward(float *dinp, float *dg, const float *dout, const float *inp, const float *g,
                      const float *rstd, float *scratch, int N, int C) {
    rmsnorm_backward_kernel<<<blocks_for(N, 8), 256, 0, gpu.stream>>>(dinp, dout, inp, g, rstd, N, C);
    launchCheck();
    int chunks = (N + COLSUM_ROWS - 1) / COLSUM_ROWS;
    dim3 grid(blocks_for(C, 128), chunks);
    rmsnorm_dg_partial_kernel<<<grid, 128, 0, gpu.stream>>>(scratch, dout, inp, rstd, N, C);
    launchCheck();
    colsum_finish_kernel<<<blocks_for(C, 128), 128, 0, gpu.stream>>>(dg, scratch, chunks, C);
    launchCheck();
}

// RoPE with the tables of train_dtopp.c's rope_table_init, copied to the device. One thread per
// (position, head of q or k, pair i); position n sits at n % T (the decoder passes the tables from
// its position on). direction -1 rotates back.
__global__ void rope_kernel(float *qkv, const float *cos_table, const float *sin_table, int N, int T, int C,
                            int NH, float direction) {
    int hd = C / NH, half = hd / 2;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * 2 * NH * half) { return; }
    int i = idx % half;
    int h = (idx / half) % (2 * NH);  // NH heads of q, then NH of k
    size_t n = idx / ((size_t)half * 2 * NH);
    int pos = (int)(n % T);
    float *v = qkv + n * 3 * C + (size_t)h * hd;
    float cs = cos_table[pos * half + i], s = direction * sin_table[pos * half + i];
    float a = v[i], b = v[i + half];
    v[i] = a * cs - b * s;
    v[i + half] = b * cs + a * s;
}

static void rope_rotate(float *qkv, const float *cos_table, const float *sin_table, int B, int T, int C,
                        int NH, float direction) {
    size_t n = (size_t)B * T * C;  // N * 2NH * hd/2 = N * C
    rope_kernel<<<blocks_for(n, 256), 256, 0, gpu.stream>>>(qkv, cos_table, sin_table, B * T, T, C, NH,
                                                            direction);
    launchCheck();
}

void rope_forward(float *qkv, const float *cos_table, const float *sin_table, int B, int T, int C, int NH) {
    rope_rotate(qkv, cos_table, sin_table, B, T, C, NH, 1.0f);
}

void rope_backward(float *dqkv, const float *cos_table, const float *sin_table, int B, int T, int C, int NH) {
    rope_rotate(dqkv, cos_table, sin_table, B, T, C, NH, -1.0f);
}

// Attention as batched matrix products over the B*NH (sequence, head) pairs, which need q, k and
// v head-major: (B, T, 3, NH, hd) -> three (B, NH, T, hd).
__global__ void attention_permute_kernel(float *q, float *k, float *v, const float *qkv, int B, int T, int NH,
                                         int hd) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * NH * T * hd) { return; }
    int d = idx % hd, t = (idx / hd) % T, h = (idx / ((size_t)hd * T)) % NH;
    size_t b = idx / ((size_t)hd * T * NH), C = (size_t)NH * hd;
    const float *src = qkv + (b * T + t) * 3 * C + (size_t)h * hd + d;
    q[idx] = src[0];
    k[idx] = src[C];
    v[idx] = src[2 * C];
}

// The way back, for the gradient: (B, NH, T, hd) x3 -> (B, T, 3C).
__global__ void attention_unpermute_qkv_kernel(float *dqkv, const float *dq, const float *dk, const float *dv,
                                               int B, int T, int NH, int hd) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * NH * T * hd) { return; }
    int d = idx % hd, t = (idx / hd) % T, h = (idx / ((size_t)hd * T)) % NH;
    size_t b = idx / ((size_t)hd * T * NH), C = (size_t)NH * hd;
    float *dst = dqkv + (b * T + t) * 3 * C + (size_t)h * hd + d;
    dst[0] = dq[idx];
    dst[C] = dk[idx];
    dst[2 * C] = dv[idx];
}

// (B, NH, T, hd) <-> (B, T, C); to_heads 1 goes from (B, T, C) to head-major.
__global__ void attention_heads_kernel(float *dst, const float *src, int B, int T, int NH, int hd,
                                       int to_heads) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * NH * T * hd) { return; }
    int d = idx % hd, t = (idx / hd) % T, h = (idx / ((size_t)hd * T)) % NH;
    size_t b = idx / ((size_t)hd * T * NH);
    size_t flat = (b * T + t) * NH * hd + (size_t)h * hd + d;
    if (to_heads) { dst[idx] = src[flat]; } else { dst[flat] = src[idx]; }
}

// Causal softmax over each row of scores (one warp per row), in place: entries above the
// diagonal become 0, so the product with v that follows ignores them. With causal 0, a plain
// softmax over every key.
__global__ void softmax_causal_kernel(float *att, int rows, int T, int causal) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) { return; }
    int t = causal ? row % T : T - 1;  // the last key this row sees
    float *x = att + (size_t)row * T;
    float maxval = -INFINITY;
    for (int j = lane; j <= t; j += 32) { maxval = fmaxf(maxval, x[j]); }
    maxval = warp_max(maxval);
    float sum = 0.0f;
    for (int j = lane; j <= t; j += 32) {
        float e = expf(x[j] - maxval);
        x[j] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    for (int j = lane; j < T; j += 32) { x[j] = j <= t ? x[j] / sum : 0.0f; }
}

// datt -> dscores in place: dscore_j = p_j (datt_j − <p, datt>) · scale, 0 above the diagonal.
__global__ void softmax_causal_backward_kernel(float *datt, const float *att, int rows, int T, float scale,
                                               int causal) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) { return; }
    int t = causal ? row % T : T - 1;
    const float *p = att + (size_t)row * T;
    float *d = datt + (size_t)row * T;
    float pdp = 0.0f;
    for (int j = lane; j <= t; j += 32) { pdp += p[j] * d[j]; }
    pdp = warp_sum(pdp);
    for (int j = lane; j < T; j += 32) { d[j] = j <= t ? p[j] * (d[j] - pdp) * scale : 0.0f; }
}

// Scratch of the attention layer (head-major copies), borrowed from the activations.
typedef struct {
    float *q, *k, *v, *y;       // forward and backward
    float *dq, *dk, *dv, *dy;   // backward
    float *datt;                // backward: (B, NH, T, T)
} AttentionScratch;

// Self-attention, causal or not (causal 0). qkv (B, T, 3C) -> out (B, T, C), att (B, NH, T, T)
// probabilities.
// The full T x T score matrix is computed (the upper half is wasted work but keeps the products
// large and regular).
void attention_forward(float *out, float *att, const float *qkv, AttentionScratch s, int B, int T, int C,
                       int NH, int causal) {
    int hd = C / NH;
    size_t n = (size_t)B * T * C;
    attention_permute_kernel<<<blocks_for(n, 256), 256, 0, gpu.stream>>>(s.q, s.k, s.v, qkv, B, T, NH, hd);
    launchCheck();
    const float scale = 1.0f / sqrtf((float)hd), zero = 0.0f, one = 1.0f;
    long long sT = (long long)T * hd, sTT = (long long)T * T;
    // scores (T, T) = scale · q k^T per (b, h)
    cublasCheck(cublasSgemmStridedBatched(gpu.blas, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hd, &scale, s.k, hd, sT,
                                          s.q, hd, sT, &zero, att, T, sTT, B * NH));
    softmax_causal_kernel<<<blocks_for((size_t)B * NH * T, 8), 256, 0, gpu.stream>>>(att, B * NH * T, T,
                                                                                     causal);
    launchCheck();
    // y (T, hd) = att v
    cublasCheck(cublasSgemmStridedBatched(gpu.blas, CUBLAS_OP_N, CUBLAS_OP_N, hd, T, T, &one, s.v, hd, sT,
                                          att, T, sTT, &zero, s.y, hd, sT, B * NH));
    attention_heads_kernel<<<blocks_for(n, 256), 256, 0, gpu.stream>>>(out, s.y, B, T, NH, hd, 0);
    launchCheck();
}

// dqkv (B, T, 3C) = gradient of qkv (overwritten: each element has one writer) from dout (B, T, C).
void attention_backward(float *dqkv, const float *dout, const float *qkv, const float *att,
                        AttentionScratch s, int B, int T, int C, int NH, int causal) {
    int hd = C / NH;
    size_t n = (size_t)B * T * C;
    attention_permute_kernel<<<blocks_for(n, 256), 256, 0, gpu.stream>>>(s.q, s.k, s.v, qkv, B, T, NH, hd);
    launchCheck();
    attention_heads_kernel<<<blocks_for(n, 256), 256, 0, gpu.stream>>>(s.dy, dout, B, T, NH, hd, 1);
    launchCheck();
    const float scale = 1.0f / sqrtf((float)hd), zero = 0.0f, one = 1.0f;
    long long sT = (long long)T * hd, sTT = (long long)T * T;
    // datt (T, T) = dy v^T; dv (T, hd) = att^T dy
    cublasCheck(cublasSgemmStridedBatched(gpu.blas, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hd, &one, s.v, hd, sT,
                                          s.dy, hd, sT, &zero, s.datt, T, sTT, B * NH));
    cublasCheck(cublasSgemmStridedBatched(gpu.blas, CUBLAS_OP_N, CUBLAS_OP_T, hd, T, T, &one, s.dy, hd, sT,
                                          att, T, sTT, &zero, s.dv, hd, sT, B * NH));
    softmax_causal_backward_kernel<<<blocks_for((size_t)B * NH * T, 8), 256, 0, gpu.stream>>>(
        s.datt, att, B * NH * T, T, scale, causal);
    launchCheck();
    // dq (T, hd) = dscores k; dk (T, hd) = dscores^T q
    cublasCheck(cublasSgemmStridedBatched(gpu.blas, CUBLAS_OP_N, CUBLAS_OP_N, hd, T, T, &one, s.k, hd, sT,
                                          s.datt, T, sTT, &zero, s.dq, hd, sT, B * NH));
    cublasCheck(cublasSgemmStridedBatched(gpu.blas, CUBLAS_OP_N, CUBLAS_OP_T, hd, T, T, &one, s.q, hd, sT,
                                          s.datt, T, sTT, &zero, s.dk, hd, sT, B * NH));
    attention_unpermute_qkv_kernel<<<blocks_for(n, 256), 256, 0, gpu.stream>>>(dqkv, s.dq, s.dk, s.dv, B, T,
                                                                               NH, hd);
    launchCheck();
}

__global__ void residual_forward_kernel(float *out, const float *inp1, const float *inp2, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = inp1[i] + inp2[i]; }
}

void residual_forward(float *out, const float *inp1, const float *inp2, size_t n) {
    residual_forward_kernel<<<blocks_for(n, 256), 256, 0, gpu.stream>>>(out, inp1, inp2, n);
    launchCheck();
}

__device__ inline float silu(float x) { return x / (1.0f + expf(-x)); }

__global__ void swiglu_forward_kernel(float *out, const float *h1, const float *h3, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = silu(h1[i]) * h3[i]; }
}

// On entry dh1 holds the gradient of out; on exit the gradients of h1 and h3.
__global__ void swiglu_backward_kernel(float *dh1, float *dh3, const float *h1, const float *h3, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    float sig = 1.0f / (1.0f + expf(-h1[i]));
    float dout = dh1[i];
    dh3[i] = dout * h1[i] * sig;
    dh1[i] = dout * h3[i] * sig * (1.0f + h1[i] * (1.0f - sig));
}

// The experts run on several streams, so the launchers take one; swiglu_forward/backward are
// those of the main stream.
static void swiglu_forward_on(cudaStream_t stream, float *out, const float *h1, const float *h3, size_t n) {
    if (n == 0) { return; }
    swiglu_forward_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(out, h1, h3, n);
    launchCheck();
}

static void swiglu_backward_on(cudaStream_t stream, float *dh1, float *dh3, const float *h1, const float *h3,
                               size_t n) {
    if (n == 0) { return; }
    swiglu_backward_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(dh1, dh3, h1, h3, n);
    launchCheck();
}

void swiglu_forward(float *out, const float *h1, const float *h3, size_t n) {
    swiglu_forward_on(gpu.stream, out, h1, h3, n);
}

void swiglu_backward(float *dh1, float *dh3, const float *h1, const float *h3, size_t n) {
    swiglu_backward_on(gpu.stream, dh1, dh3, h1, h3, n);
}

// Cross-entropy over the first V of the Vp logits of a row, one block per row. One pass keeps a
// running maximum and the sum of exponentials relative to it (online softmax); the (max, sum)
// pairs of the threads are then merged in a fixed tree.
__device__ void lse_merge(float &m, float &s, float m2, float s2) {
    if (m2 == -INFINITY) { return; }
    if (m == -INFINITY) { m = m2; s = s2; return; }
    float M = fmaxf(m, m2);
    s = s * expf(m - M) + s2 * expf(m2 - M);
    m = M;
}

__global__ void crossentropy_forward_kernel(float *token_loss, float *token_lse, const float *logits,
                                            const int *targets, int V, int Vp) {
    int n = blockIdx.x;
    const float *z = logits + (size_t)n * Vp;
    float m = -INFINITY, s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float x = z[i];
        if (x > m) { s = s * expf(m - x) + 1.0f; m = x; } else { s += expf(x - m); }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, offset), s2 = __shfl_xor_sync(0xffffffffu, s, offset);
        lse_merge(m, s, m2, s2);
    }
    __shared__ float ms[32], ss[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) { ms[warp] = m; ss[warp] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)blockDim.x / 32; w++) { lse_merge(m, s, ms[w], ss[w]); }
        float lse = m + logf(s);
        token_lse[n] = lse;
        if (token_loss != NULL) { token_loss[n] = lse - z[targets[n]]; }
    }
}

void crossentropy_forward(float *token_loss, float *token_lse, const float *logits, const int *targets, int N,
                          int V, int Vp) {
    crossentropy_forward_kernel<<<N, 512, 0, gpu.stream>>>(token_loss, token_lse, logits, targets, V, Vp);
    launchCheck();
}

// dlogits = scale · (softmax − onehot(target)); the padded columns get 0.
__global__ void crossentropy_backward_kernel(float *dlogits, const float *logits, const float *token_lse,
                                             const int *targets, int V, int Vp, float scale) {
    int n = blockIdx.x, target = targets[n];
    const float *z = logits + (size_t)n * Vp;
    float *dz = dlogits + (size_t)n * Vp;
    float lse = token_lse[n];
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float d = 0.0f;
        if (i < V) {
            d = scale * expf(z[i] - lse);
            if (i == target) { d -= scale; }
        }
        dz[i] = d;
    }
}

void crossentropy_backward(float *dlogits, const float *logits, const float *token_lse, const int *targets,
                           int N, int V, int Vp, float scale) {
    crossentropy_backward_kernel<<<N, 512, 0, gpu.stream>>>(dlogits, logits, token_lse, targets, V, Vp,
                                                            scale);
    launchCheck();
}

// ----------------------------------------------------------------------------
// the MoE layer, in the order of the paper: router (z = Wr m, DRN, softmax, top-p selection,
// gates), auxiliary losses, dispatch (counting sort), experts, combine. The functions take the
// shared RouterView and ExpertView (device pointers, except expert_start_host and gemm_host).

// DRN, one warp per token: scaled = θ u with u the standardized logits (see train_dtopp.c).
__global__ void drn_forward_kernel(float *scaled, float *u, float *rstd, const float *z,
                                   const float *theta_ptr, int E) {
    int n = blockIdx.x, lane = threadIdx.x;
    const float *zn = z + (size_t)n * E;
    float *un = u + (size_t)n * E, *out = scaled + (size_t)n * E;
    float theta = *theta_ptr, mean = 0.0f;
    for (int e = lane; e < E; e += 32) { mean += zn[e]; }
    mean = warp_sum(mean) / E;
    float var = 0.0f;
    for (int e = lane; e < E; e += 32) { var += (zn[e] - mean) * (zn[e] - mean); }
    var = warp_sum(var);
    float r = 1.0f / sqrtf(var / E + DRN_EPS);
    for (int e = lane; e < E; e += 32) {
        un[e] = (zn[e] - mean) * r;
        out[e] = theta * un[e];
    }
    if (lane == 0) { rstd[n] = r; }
}

// theta: θ of this layer, on the device (a pointer into the parameters).
void drn_forward(float *scaled, float *u, float *rstd, const float *z, const float *theta, int N, int E) {
    drn_forward_kernel<<<N, 32, 0, gpu.stream>>>(scaled, u, rstd, z, theta, E);
    launchCheck();
}

// In place: d (N, E) holds dẑ on entry and dz on exit; dθ shares to dtheta_token, one warp per token.
__global__ void drn_backward_kernel(float *d, float *dtheta_token, const float *u, const float *rstd,
                                    const float *theta_ptr, int E) {
    int n = blockIdx.x, lane = threadIdx.x;
    float *dn = d + (size_t)n * E;
    const float *un = u + (size_t)n * E;
    float theta = *theta_ptr, dth = 0.0f, mean_du = 0.0f, mean_duu = 0.0f;
    for (int e = lane; e < E; e += 32) {
        dth += dn[e] * un[e];
        dn[e] *= theta;  // du
        mean_du += dn[e];
        mean_duu += dn[e] * un[e];
    }
    dth = warp_sum(dth);
    mean_du = warp_sum(mean_du) / E;
    mean_duu = warp_sum(mean_duu) / E;
    float r = rstd[n];
    for (int e = lane; e < E; e += 32) { dn[e] = (dn[e] - mean_du - un[e] * mean_duu) * r; }
    if (lane == 0) { dtheta_token[n] = dth; }
}

void drn_backward(float *d, float *dtheta_token, const float *u, const float *rstd, const float *theta, int N,
                  int E) {
    drn_backward_kernel<<<N, 32, 0, gpu.stream>>>(d, dtheta_token, u, rstd, theta, E);
    launchCheck();
}

// Softmax and the router's decisions for one token per block of 32 threads (one warp): the
// selection rule of the spec and the gates. Shared memory holds P and the order of the experts.
// The order is computed as a rank: expert e comes after every expert with a larger P, and after
// every expert with the same P and a lower index (the spec's tie rule), so no sort is needed.
// The running sum of the top-p rule is accumulated one expert at a time in that order, by one
// thread, as the spec asks. r.probs holds ẑ on entry and P on exit.
__global__ void router_select_kernel(RouterView r, float threshold, int routing, int k, int renorm, int E) {
    extern __shared__ float shared[];
    float *P = shared;
    int *order = (int *)(shared + E);
    int n = blockIdx.x, lane = threadIdx.x;
    for (int e = lane; e < E; e += 32) { P[e] = r.probs[(size_t)n * E + e]; }
    __syncwarp();
    float maxval = -INFINITY;
    for (int e = lane; e < E; e += 32) { maxval = fmaxf(maxval, P[e]); }
    maxval = warp_max(maxval);
    float sum = 0.0f;
    for (int e = lane; e < E; e += 32) {
        P[e] = expf(P[e] - maxval);
        sum += P[e];
    }
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += 32) {
        P[e] = P[e] / sum;
        r.probs[(size_t)n * E + e] = P[e];
    }
    __syncwarp();
    for (int e = lane; e < E; e += 32) {
        float pe = P[e];
        int rank = 0;
        for (int j = 0; j < E; j++) { rank += P[j] > pe || (P[j] == pe && j < e); }
        order[rank] = e;
    }
    __syncwarp();
    int count = 0;
    float kept = 0.0f;
    if (lane == 0) {
        if (routing == ROUTING_TOPK) {
            count = k;
        } else {
            float running = 0.0f;
            while (count < E && running < threshold) { running += P[order[count]]; count++; }
        }
        for (int j = 0; j < count; j++) { kept += P[order[j]]; }
        r.n_selected[n] = count;
    }
    count = __shfl_sync(0xffffffffu, count, 0);
    kept = __shfl_sync(0xffffffffu, kept, 0);
    int *sel = r.selected + (size_t)n * E;
    float *g = r.gates + (size_t)n * E;
    for (int j = lane; j < E; j += 32) {
        sel[j] = j < count ? order[j] : -1;
        g[j] = j < count ? (renorm ? P[order[j]] / kept : P[order[j]]) : 0.0f;
    }
}

// z = Wr m; DRN (if on); P = softmax; S = selection with this layer's threshold; gates over S.
void router_forward(RouterView r, const float *m, const LayerWeights *w, float threshold,
                    const RouterConfig *rc, int N, int C, int E) {
    matmul_forward(r.logits, m, w->wr, N, C, E);
    if (rc->drn) {
        drn_forward(r.probs, r.drn_u, r.drn_rstd, r.logits, w->theta, N, E);
    } else {
        cudaCheck(cudaMemcpyAsync(r.probs, r.logits, (size_t)N * E * sizeof(float), cudaMemcpyDeviceToDevice,
                                  gpu.stream));
    }
    size_t shared = (size_t)E * (sizeof(float) + sizeof(int));
    router_select_kernel<<<N, 32, shared, gpu.stream>>>(r, threshold, rc->routing, rc->k, rc->renorm, E);
    launchCheck();
}

// From the gradient of the gates back to ẑ, one warp per token: r.drouter holds the auxiliary
// losses' dP on entry (moe_aux_backward) and dẑ on exit.
__global__ void router_backward_kernel(RouterView r, int renorm, int E) {
    extern __shared__ float d[];  // (E) dP, then dẑ, in place
    int n = blockIdx.x, lane = threadIdx.x;
    const float *P = r.probs + (size_t)n * E, *g = r.gates + (size_t)n * E;
    const float *dg = r.dgates + (size_t)n * E;
    const int *sel = r.selected + (size_t)n * E;
    int count = r.n_selected[n];
    for (int e = lane; e < E; e += 32) { d[e] = r.drouter[(size_t)n * E + e]; }
    __syncwarp();
    if (renorm) {  // g_e = P_e / Z over S: dP_e = (dg_e - Σ_j g_j dg_j) / Z
        float kept = 0.0f, gdg = 0.0f;
        for (int j = lane; j < count; j += 32) {
            kept += P[sel[j]];
            gdg += g[j] * dg[j];
        }
        kept = warp_sum(kept);
        gdg = warp_sum(gdg);
        for (int j = lane; j < count; j += 32) {
            d[sel[j]] += (dg[j] - gdg) / kept;
        }  // distinct experts: no race
    } else {
        for (int j = lane; j < count; j += 32) { d[sel[j]] += dg[j]; }
    }
    __syncwarp();
    float pdp = 0.0f;  // softmax: dẑ = P ⊙ (dP − <P, dP>)
    for (int e = lane; e < E; e += 32) { pdp += P[e] * d[e]; }
    pdp = warp_sum(pdp);
    for (int e = lane; e < E; e += 32) { r.drouter[(size_t)n * E + e] = P[e] * (d[e] - pdp); }
}

// *dtheta += Σ_n dtheta_token[n], one block, fixed order.
__global__ void sum_into_kernel(float *out, const float *x, int n) {
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { sum += x[i]; }
    sum = block_sum(sum);
    if (threadIdx.x == 0) { *out += sum; }
}

// From the gradient of the gates back to the router logits, θ and Wr (see train_dtopp.c).
void router_backward(RouterView r, float *dm, const LayerWeights *dw, const float *m, const LayerWeights *w,
                     const RouterConfig *rc, int N, int C, int E) {
    router_backward_kernel<<<N, 32, E * sizeof(float), gpu.stream>>>(r, rc->renorm, E);
    launchCheck();
    if (rc->drn) {
        drn_backward(r.drouter, r.dtheta_token, r.drn_u, r.drn_rstd, w->theta, N, E);
        sum_into_kernel<<<1, 1024, 0, gpu.stream>>>(dw->theta, r.dtheta_token, N);
        launchCheck();
    }
    matmul_backward(dm, dw->wr, r.drouter, m, w->wr, N, C, E);
}

// Fraction of the layer's (token, expert) pairs that went to expert e: the f_e of the
// load-balance loss, a constant for the gradient.
__device__ inline float expert_load_fraction(const int *expert_start, int e, int E) {
    int total = expert_start[E];
    return total > 0 ? (float)(expert_start[e + 1] - expert_start[e]) / total : 0.0f;
}

// LB = E Σ_e f_e mean_n P_e and H = mean_n(−Σ_e P_e log P_e), over the N tokens of the step.
// One block per expert sums its column of P (double, fixed tree); then one block adds the
// experts in order and the tokens' entropies.
__global__ void moe_aux_lb_kernel(double *lb_part, const float *probs, const int *expert_start, int N,
                                  int E) {
    int e = blockIdx.x;
    double sum = 0.0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) { sum += probs[(size_t)n * E + e]; }
    sum = block_sum(sum);
    if (threadIdx.x == 0) { lb_part[e] = expert_load_fraction(expert_start, e, E) * sum / N; }
}

__global__ void moe_aux_finish_kernel(float *lb, float *ent, const double *lb_part, const float *probs, int N,
                                      int E) {
    double ent_sum = 0.0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        for (int e = 0; e < E; e++) {
            float p = probs[(size_t)n * E + e];
            if (p > 0.0f) { ent_sum -= p * logf(p); }
        }
    }
    ent_sum = block_sum(ent_sum);
    if (threadIdx.x == 0) {
        double lb_sum = 0.0;
        for (int e = 0; e < E; e++) { lb_sum += lb_part[e]; }
        *lb = (float)(E * lb_sum);
        *ent = (float)(ent_sum / N);
    }
}

void moe_aux_forward(float *lb, float *ent, RouterView r, int N, int E) {
    moe_aux_lb_kernel<<<E, 256, 0, gpu.stream>>>(r.sums, r.probs, r.expert_start, N, E);
    launchCheck();
    moe_aux_finish_kernel<<<1, 1024, 0, gpu.stream>>>(lb, ent, r.sums, r.probs, N, E);
    launchCheck();
}

// r.drouter = dP of lb_scale·LB + ent_scale·H, one warp per token.
__global__ void moe_aux_backward_kernel(RouterView r, float lb_scale, float ent_scale, int N, int E) {
    int n = blockIdx.x, lane = threadIdx.x;
    const float *P = r.probs + (size_t)n * E;
    for (int e = lane; e < E; e += 32) {
        float aux = lb_scale * E * expert_load_fraction(r.expert_start, e, E) / N;
        if (P[e] > 0.0f) { aux -= ent_scale * (logf(P[e]) + 1.0f) / N; }
        r.drouter[(size_t)n * E + e] = aux;
    }
}

void moe_aux_backward(RouterView r, float lb_scale, float ent_scale, int N, int E) {
    moe_aux_backward_kernel<<<N, 32, 0, gpu.stream>>>(r, lb_scale, ent_scale, N, E);
    launchCheck();
}

// Dispatch by counting sort, on the device and in token order, without atomics:
//  1. choice (N, E): for every token, which of its choices is expert e (-1: not selected);
//  2. chunk_count (chunks, E): per chunk of DISPATCH_CHUNK tokens, how many chose e;
//  3. one block turns the counts into expert_start (E + 1) and each chunk's first row for e;
//  4. each (chunk, expert) thread walks its tokens in order and places them.
// Rows of expert e are thus its tokens in increasing token order, as on the CPU.
__global__ void dispatch_choice_kernel(int *choice, const int *n_selected, const int *selected, int N,
                                       int E) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * E) { return; }
    size_t n = idx / E;
    int j = idx % E;
    if (j < n_selected[n]) { choice[n * E + selected[idx]] = j; }
}

__global__ void dispatch_count_kernel(int *chunk_count, const int *choice, int N, int E) {
    int e = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (e >= E) { return; }
    int end = min(N, (chunk + 1) * DISPATCH_CHUNK), count = 0;
    for (int n = chunk * DISPATCH_CHUNK; n < end; n++) { count += choice[(size_t)n * E + e] >= 0; }
    chunk_count[(size_t)chunk * E + e] = count;
}

__global__ void dispatch_scan_kernel(int *expert_start, int *chunk_count, int chunks, int E) {
    extern __shared__ int totals[];  // (E)
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int total = 0;
        for (int c = 0; c < chunks; c++) { total += chunk_count[(size_t)c * E + e]; }
        totals[e] = total;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int start = 0;
        for (int e = 0; e < E; e++) {
            expert_start[e] = start;
            start += totals[e];
        }
        expert_start[E] = start;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {  // chunk_count becomes each chunk's first row
        int row = expert_start[e];
        for (int c = 0; c < chunks; c++) {
            int count = chunk_count[(size_t)c * E + e];
            chunk_count[(size_t)c * E + e] = row;
            row += count;
        }
    }
}

__global__ void dispatch_place_kernel(int *row_token, int *token_row, const int *chunk_first,
                                      const int *choice, int N, int E) {
    int e = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (e >= E) { return; }
    int end = min(N, (chunk + 1) * DISPATCH_CHUNK), row = chunk_first[(size_t)chunk * E + e];
    for (int n = chunk * DISPATCH_CHUNK; n < end; n++) {
        int j = choice[(size_t)n * E + e];
        if (j >= 0) {
            row_token[row] = n;
            token_row[(size_t)n * E + j] = row;
            row++;
        }
    }
}

// Steps 1-3. Returns the number of rows; expert_start is also copied to the host (the sizes of
// the expert products), which is this layer's one wait for the GPU.
int moe_dispatch_count(RouterView r, int N, int E) {
    cudaCheck(cudaMemsetAsync(r.dispatch_choice, 0xff, (size_t)N * E * sizeof(int), gpu.stream));  // all -1
    dispatch_choice_kernel<<<blocks_for((size_t)N * E, 256), 256, 0, gpu.stream>>>(
        r.dispatch_choice, r.n_selected, r.selected, N, E);
    launchCheck();
    int chunks = (N + DISPATCH_CHUNK - 1) / DISPATCH_CHUNK;
    dim3 grid(blocks_for(E, 64), chunks);
    dispatch_count_kernel<<<grid, 64, 0, gpu.stream>>>(r.dispatch_counts, r.dispatch_choice, N, E);
    launchCheck();
    dispatch_scan_kernel<<<1, 256, E * sizeof(int), gpu.stream>>>(r.expert_start, r.dispatch_counts, chunks,
                                                                  E);
    launchCheck();
    copy_to_host((void *)r.expert_start_host, r.expert_start, (E + 1) * sizeof(int));
    return r.expert_start_host[E];
}

// Step 4, once the row buffers are large enough: x.row_token and r.token_row.
void moe_dispatch(RouterView r, ExpertView x, int N, int E) {
    cudaCheck(cudaMemsetAsync(r.token_row, 0xff, (size_t)N * E * sizeof(int), gpu.stream));
    int chunks = (N + DISPATCH_CHUNK - 1) / DISPATCH_CHUNK;
    dim3 grid(blocks_for(E, 64), chunks);
    dispatch_place_kernel<<<grid, 64, 0, gpu.stream>>>(x.row_token, r.token_row, r.dispatch_counts,
                                                       r.dispatch_choice, N, E);
    launchCheck();
}

// xg[r] = m[row_token[r]]: the inputs of every row, gathered so the experts' products read
// contiguous rows.
__global__ void gather_rows_kernel(float *xg, const float *m, const int *row_token, int rows, int C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)rows * C) { return; }
    size_t r = idx / C, c = idx % C;
    xg[idx] = m[(size_t)row_token[r] * C + c];
}

static void gather_inputs(float *xg, const float *m, const int *row_token, int rows, int C) {
    if (rows == 0) { return; }
    gather_rows_kernel<<<blocks_for((size_t)rows * C, 256), 256, 0, gpu.stream>>>(xg, m, row_token, rows, C);
    launchCheck();
}

// Grouped products: one cuBLAS call computes the products of every expert of a layer (one group
// per expert, of 1 or 2 problems of the same shape). The problem sizes live on the host; the
// operand pointers are written to a pinned slot and copied to the device before the call.
static struct {
    int groups, problems, capacity;
    cublasOperation_t ta[4096], tb[4096];
    int m[4096], n[4096], k[4096], lda[4096], ldb[4096], ldc[4096], size[4096];
    float alpha[4096], beta[4096];
    void **host, **dev;  // this product's slot: A pointers, then B, then C (capacity each)
} grouped;

static void grouped_begin(void **host, void **dev, int capacity) {
    grouped.groups = grouped.problems = 0;
    grouped.capacity = capacity;
    grouped.host = host;
    grouped.dev = dev;
}

// One group of `batch` problems C_i = op(A_i) op(B_i) (+ beta C_i), the operands of problem i
// stride_* floats after those of problem 0 (column-major sizes, as cublasSgemm).
static void grouped_add(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float *A,
                        int lda, size_t stride_a, const float *B, int ldb, size_t stride_b, float beta,
                        float *C, int ldc, size_t stride_c, int batch) {
    int g = grouped.groups++;
    grouped.ta[g] = ta;
    grouped.tb[g] = tb;
    grouped.m[g] = m;
    grouped.n[g] = n;
    grouped.k[g] = k;
    grouped.lda[g] = lda;
    grouped.ldb[g] = ldb;
    grouped.ldc[g] = ldc;
    grouped.size[g] = batch;
    grouped.alpha[g] = 1.0f;
    grouped.beta[g] = beta;
    for (int i = 0; i < batch; i++) {
        int p = grouped.problems++;
        grouped.host[p] = (void *)(A + i * stride_a);
        grouped.host[grouped.capacity + p] = (void *)(B + i * stride_b);
        grouped.host[2 * grouped.capacity + p] = (void *)(C + i * stride_c);
    }
}

static void grouped_run(void) {
    if (grouped.groups == 0) { return; }
    cudaCheck(cudaMemcpyAsync(grouped.dev, grouped.host, 3 * grouped.capacity * sizeof(void *),
                              cudaMemcpyHostToDevice, gpu.stream));
    cublasCheck(cublasGemmGroupedBatchedEx(
        gpu.blas, grouped.ta, grouped.tb, grouped.m, grouped.n, grouped.k, grouped.alpha,
        (const void *const *)grouped.dev, CUDA_R_32F, grouped.lda,
        (const void *const *)(grouped.dev + grouped.capacity), CUDA_R_32F, grouped.ldb, grouped.beta,
        grouped.dev + 2 * grouped.capacity, CUDA_R_32F, grouped.ldc, grouped.groups, grouped.size,
        gpu.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F));
}

// The experts' products as grouped products: the same arithmetic per expert, in 2 calls per layer.
// x.gemm_host, x.gemm_dev: this layer's GROUPED_SITES pointer slots.
static void experts_forward_grouped(ExpertView x, const int *expert_start, const LayerWeights *w, int E,
                                    int C, int H) {
    size_t w_stride = (size_t)(w->w3 - w->w1), h3_offset = (size_t)(x.h3 - x.h1);
    size_t slot = GROUPED_SLOT(E), cap = 2 * (size_t)E;
    grouped_begin(x.gemm_host, x.gemm_dev, cap);
    for (int e = 0; e < E; e++) {  // [h1; h3] = x · [W1_e; W3_e]^T
        int first = expert_start[e], count = expert_start[e + 1] - first;
        if (count == 0) { continue; }
        grouped_add(CUBLAS_OP_T, CUBLAS_OP_N, H, count, C, w->w1 + (size_t)e * H * C, C, w_stride,
                    x.xg + (size_t)first * C, C, 0, 0.0f, x.h1 + (size_t)first * H, H, h3_offset, 2);
    }
    grouped_run();
    swiglu_forward_on(gpu.stream, x.hact, x.h1, x.h3, (size_t)expert_start[E] * H);
    grouped_begin(x.gemm_host + slot, x.gemm_dev + slot, cap);
    for (int e = 0; e < E; e++) {  // out = hact · W2_e^T
        int first = expert_start[e], count = expert_start[e + 1] - first;
        if (count == 0) { continue; }
        grouped_add(CUBLAS_OP_T, CUBLAS_OP_N, C, count, H, w->w2 + (size_t)e * C * H, H, 0,
                    x.hact + (size_t)first * H, H, 0, 0.0f, x.out + (size_t)first * C, C, 0, 1);
    }
    grouped_run();
}

// The backward products as grouped products (5 calls per layer), the arithmetic of experts_backward.
static void experts_backward_grouped(ExpertView x, const int *expert_start, const LayerWeights *dw,
                                     const LayerWeights *w, int E, int C, int H) {
    size_t dw_stride = (size_t)(dw->w3 - dw->w1), dh3_offset = (size_t)(x.dh3 - x.dh1);
    size_t slot = GROUPED_SLOT(E), cap = 2 * (size_t)E;
    for (int site = 0; site < 5; site++) {
        grouped_begin(x.gemm_host + (2 + site) * slot, x.gemm_dev + (2 + site) * slot, cap);
        for (int e = 0; e < E; e++) {
            int first = expert_start[e], count = expert_start[e + 1] - first;
            if (count == 0) { continue; }
            const float *d = x.dout + (size_t)first * C, *xg = x.xg + (size_t)first * C;
            float *dh1 = x.dh1 + (size_t)first * H;
            switch (site) {
                case 0:  // dhact = dout · W2_e (into dh1)
                    grouped_add(CUBLAS_OP_N, CUBLAS_OP_N, H, count, C, w->w2 + (size_t)e * C * H, H, 0, d, C,
                                0, 0.0f, dh1, H, 0, 1);
                    break;
                case 1:  // dW2_e += dout^T · hact
                    grouped_add(CUBLAS_OP_N, CUBLAS_OP_T, H, C, count, x.hact + (size_t)first * H, H, 0, d, C,
                                0, 1.0f, dw->w2 + (size_t)e * C * H, H, 0, 1);
                    break;
                case 2:  // [dW1_e; dW3_e] += [dh1; dh3]^T · x
                    grouped_add(CUBLAS_OP_N, CUBLAS_OP_T, C, H, count, xg, C, 0, dh1, H, dh3_offset, 1.0f,
                                dw->w1 + (size_t)e * H * C, C, dw_stride, 2);
                    break;
                case 3:  // din = dh1 · W1_e
                    grouped_add(CUBLAS_OP_N, CUBLAS_OP_N, C, count, H, w->w1 + (size_t)e * H * C, C, 0, dh1,
                                H, 0, 0.0f, x.din + (size_t)first * C, C, 0, 1);
                    break;
                case 4:  // din += dh3 · W3_e
                    grouped_add(CUBLAS_OP_N, CUBLAS_OP_N, C, count, H, w->w3 + (size_t)e * H * C, C, 0,
                                dh1 + dh3_offset, H, 0, 1.0f, x.din + (size_t)first * C, C, 0, 1);
                    break;
            }
        }
        grouped_run();
        if (site == 1) {
            swiglu_backward_on(gpu.stream, x.dh1, x.dh3, x.h1, x.h3, (size_t)expert_start[E] * H);
        }
    }
}

// Every expert computes W2 (silu(W1 m) ⊙ W3 m) on the rows gathered for it (into x.xg first),
// expert e on lane e % EXPERT_LANES, or all of them as grouped products (DTOPP_EXPERTS=grouped).
// x.h3 is x.h1 plus a fixed offset, so one strided-batched product computes both.
// precision: FLOAT32 only in this build (check_options refuses bf16); kept to mirror the C file.
void experts_forward(ExpertView x, RouterView r, const float *m, const LayerWeights *w, int E, int C, int H,
                     Precision precision) {
    (void)precision;
    const int *expert_start = r.expert_start_host;
    gather_inputs(x.xg, m, x.row_token, expert_start[E], C);
    if (gpu.grouped) {
        experts_forward_grouped(x, expert_start, w, E, C, H);
        return;
    }
    const float one = 1.0f, zero = 0.0f;
    long long w_stride = (long long)(w->w3 - w->w1), h3_offset = (long long)(x.h3 - x.h1);
    lanes_fork();
    for (int e = 0; e < E; e++) {
        int first = expert_start[e], count = expert_start[e + 1] - first;
        if (count == 0) { continue; }
        Lane *lane = &gpu.lanes[e % EXPERT_LANES];
        const float *xg = x.xg + (size_t)first * C;
        float *h1 = x.h1 + (size_t)first * H;
        // [h1; h3] = x · [W1_e; W3_e]^T, one strided-batched product of two
        cublasCheck(cublasSgemmStridedBatched(lane->blas, CUBLAS_OP_T, CUBLAS_OP_N, H, count, C, &one,
                                              w->w1 + (size_t)e * H * C, C, w_stride, xg, C, 0, &zero,
                                              h1, H, h3_offset, 2));
        swiglu_forward_on(lane->stream, x.hact + (size_t)first * H, h1, h1 + h3_offset, (size_t)count * H);
        matmul_forward_on(lane->blas, x.out + (size_t)first * C, x.hact + (size_t)first * H,
                          w->w2 + (size_t)e * C * H, count, H, C, 0.0f);
    }
    lanes_join();
}

// From x.dout to x.din (rows, C), the gradient of the gathered inputs, one row per (token,
// expert) pair; accumulates into dw's W1, W3, W2. x.dh3 is x.dh1 plus a fixed offset.
void experts_backward(ExpertView x, RouterView r, const float *m, const LayerWeights *dw,
                      const LayerWeights *w, int E, int C, int H, Precision precision) {
    (void)precision;
    const int *expert_start = r.expert_start_host;
    gather_inputs(x.xg, m, x.row_token, expert_start[E], C);
    if (gpu.grouped) {
        experts_backward_grouped(x, expert_start, dw, w, E, C, H);
        return;
    }
    const float one = 1.0f, zero = 0.0f;
    long long dw_stride = (long long)(dw->w3 - dw->w1), dh3_offset = (long long)(x.dh3 - x.dh1);
    size_t h3_offset = (size_t)(x.h3 - x.h1);
    lanes_fork();
    for (int e = 0; e < E; e++) {
        int first = expert_start[e], count = expert_start[e + 1] - first;
        if (count == 0) { continue; }
        Lane *lane = &gpu.lanes[e % EXPERT_LANES];
        const float *d = x.dout + (size_t)first * C, *xg = x.xg + (size_t)first * C;
        float *dh1 = x.dh1 + (size_t)first * H;
        const float *h1 = x.h1 + (size_t)first * H;
        // through W2: dhact = dout · W2_e (into dh1), dW2_e += dout^T · hact
        matmul_backward_on(lane->blas, dh1, dw->w2 + (size_t)e * C * H, d, x.hact + (size_t)first * H,
                           w->w2 + (size_t)e * C * H, count, H, C, 0.0f);
        swiglu_backward_on(lane->stream, dh1, dh1 + dh3_offset, h1, h1 + h3_offset, (size_t)count * H);
        // [dW1_e; dW3_e] += [dh1; dh3]^T · x, one strided-batched product of two
        cublasCheck(cublasSgemmStridedBatched(lane->blas, CUBLAS_OP_N, CUBLAS_OP_T, C, H, count, &one, xg, C,
                                              0, dh1, H, dh3_offset, &one, dw->w1 + (size_t)e * H * C, C,
                                              dw_stride, 2));
        // din = dh1 · W1_e + dh3 · W3_e
        cublasCheck(cublasSgemm(lane->blas, CUBLAS_OP_N, CUBLAS_OP_N, C, count, H, &one,
                                w->w1 + (size_t)e * H * C, C, dh1, H, &zero, x.din + (size_t)first * C, C));
        cublasCheck(cublasSgemm(lane->blas, CUBLAS_OP_N, CUBLAS_OP_N, C, count, H, &one,
                                w->w3 + (size_t)e * H * C, C, dh1 + dh3_offset, H, &one,
                                x.din + (size_t)first * C, C));
    }
    lanes_join();
}

// MoE(m) = Σ_j g_j Expert_j(m): each token (one block) gathers its own rows, in selection order.
__global__ void moe_combine_forward_kernel(float *out, const float *expert_out, RouterView r, int C, int E) {
    int n = blockIdx.x, count = r.n_selected[n];
    const int *rows = r.token_row + (size_t)n * E;
    const float *g = r.gates + (size_t)n * E;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float o = 0.0f;
        for (int j = 0; j < count; j++) { o += g[j] * expert_out[(size_t)rows[j] * C + i]; }
        out[(size_t)n * C + i] = o;
    }
}

void moe_combine_forward(float *out, ExpertView x, RouterView r, int N, int C, int E) {
    moe_combine_forward_kernel<<<N, 256, 0, gpu.stream>>>(out, x.out, r, C, E);
    launchCheck();
}

// dexpert_out of each row = gate · dMoE; dgates_j = <dMoE, Expert_j(m)>. Every row belongs to
// exactly one (token, choice), so each token (one block) writes only its own rows.
__global__ void moe_combine_backward_kernel(float *dexpert_out, float *dgates, const float *dout,
                                            const float *expert_out, RouterView r, int C, int E) {
    int n = blockIdx.x, count = r.n_selected[n];
    const float *d = dout + (size_t)n * C;
    for (int j = 0; j < E; j++) {
        if (j >= count) {
            if (threadIdx.x == 0) { dgates[(size_t)n * E + j] = 0.0f; }
            continue;
        }
        size_t row = r.token_row[(size_t)n * E + j];
        float g = r.gates[(size_t)n * E + j], dot = 0.0f;
        for (int i = threadIdx.x; i < C; i += blockDim.x) {
            dot += d[i] * expert_out[row * C + i];
            dexpert_out[row * C + i] = g * d[i];
        }
        dot = block_sum(dot);
        if (threadIdx.x == 0) { dgates[(size_t)n * E + j] = dot; }
    }
}

void moe_combine_backward(ExpertView x, RouterView r, const float *dout, int N, int C, int E) {
    moe_combine_backward_kernel<<<N, 256, 0, gpu.stream>>>(x.dout, r.dgates, dout, x.out, r, C, E);
    launchCheck();
}

// dm[n] += Σ_j din[row of (n, j)]: the gather that brings expert-input gradients back to tokens.
__global__ void moe_gather_rows_kernel(float *dm, const float *din, RouterView r, int C, int E) {
    int n = blockIdx.x, count = r.n_selected[n];
    const int *rows = r.token_row + (size_t)n * E;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float d = dm[(size_t)n * C + i];
        for (int j = 0; j < count; j++) { d += din[(size_t)rows[j] * C + i]; }
        dm[(size_t)n * C + i] = d;
    }
}

void moe_gather_rows(float *dm, ExpertView x, RouterView r, int N, int C, int E) {
    moe_gather_rows_kernel<<<N, 256, 0, gpu.stream>>>(dm, x.din, r, C, E);
    launchCheck();
}

// ----------------------------------------------------------------------------
// 5. the model's forward and backward passes on the GPU

// The activations, in GPU memory: the shared tensors, then DeviceScratch.

static void activations_alloc(Activations *a, const ModelConfig *c, int B, int T, int with_grads) {
    size_t N = (size_t)B * T, C = c->channels, L = c->num_layers, NH = c->num_heads;
    size_t E = c->num_experts, Vp = c->padded_vocab_size;
    memset(a, 0, sizeof(*a));
    a->B = B;
    a->T = T;
    float **tensors[NUM_ACTIVATION_TENSORS];
    size_t sizes[NUM_ACTIVATION_TENSORS];
    activation_layout(tensors, sizes, &a->acts, c, B, T, (int)Vp);  // rows of Vp logits
    a->acts_memory = device_floats(tensors, sizes, NUM_ACTIVATION_TENSORS);
    int **int_tensors[NUM_ROUTING_TENSORS];
    size_t int_sizes[NUM_ROUTING_TENSORS];
    routing_layout(int_tensors, int_sizes, &a->routing, c, B, T);
    a->routing_memory = device_ints(int_tensors, int_sizes, NUM_ROUTING_TENSORS);
    a->row_offset = (int *)calloc_check(L + 1, sizeof(int));

    DeviceScratch *s = a->device = (DeviceScratch *)calloc_check(1, sizeof(DeviceScratch));
    float **scratch[] = {&s->token_lse, &s->attn_q, &s->attn_k, &s->attn_v, &s->attn_y};
    size_t scratch_sizes[] = {N, N * C, N * C, N * C, N * C};
    s->float_memory = device_floats(scratch, scratch_sizes, 5);
    size_t chunks = (N + DISPATCH_CHUNK - 1) / DISPATCH_CHUNK;
    int **dispatch[] = {&s->dispatch_choice, &s->dispatch_counts};
    size_t dispatch_sizes[] = {N * E, chunks * E};
    s->int_memory = device_ints(dispatch, dispatch_sizes, 2);
    s->expert_start_host = (int *)calloc_check(L * (E + 1), sizeof(int));
    s->aux_lb_host = (float *)calloc_check(L, sizeof(float));
    s->aux_ent_host = (float *)calloc_check(L, sizeof(float));
    s->inputs = (int *)cuda_calloc(N * sizeof(int));
    s->targets = (int *)cuda_calloc(N * sizeof(int));
    s->token_ids = (int *)cuda_calloc(N * sizeof(int));
    s->token_first = (int *)cuda_calloc((N + 1) * sizeof(int));
    s->token_pos = (int *)cuda_calloc(N * sizeof(int));
    s->sums = (double *)cuda_calloc((L + E + 1) * sizeof(double));
    size_t gemm_pointers = L * GROUPED_SITES * GROUPED_SLOT(E);
    cudaCheck(cudaMallocHost((void **)&s->gemm_host, gemm_pointers * sizeof(void *)));
    s->gemm_dev = (void **)cuda_calloc(gemm_pointers * sizeof(void *));

    if (with_grads) {  // as on the CPU, plus dscores, and dlogits padded to Vp
        GradActivations *g = &a->grads;
        float **grad_tensors[NUM_GRAD_ACTIVATION_TENSORS] = {&g->dresidual, &g->dln, &g->datty, &g->dqkv,
                                                             &g->dscores, &g->dlogits, &g->dgates,
                                                             &g->drouter, &g->dtheta};
        size_t grad_sizes[NUM_GRAD_ACTIVATION_TENSORS] = {N * C, N * C, N * C, N * 3 * C, B * NH * T * T,
                                                          N * Vp, N * E, N * E, N};
        a->grads_memory = device_floats(grad_tensors, grad_sizes, NUM_GRAD_ACTIVATION_TENSORS);
        float **grad_scratch[] = {&s->dq, &s->dk, &s->dv, &s->dy, &s->colsum};
        size_t grad_scratch_sizes[] = {N * C, N * C, N * C, N * C, ((N + COLSUM_ROWS - 1) / COLSUM_ROWS) * C};
        s->grad_memory = device_floats(grad_scratch, grad_scratch_sizes, 5);
    }
}

// Makes room for `rows` expert rows, keeping the first `keep` rows (those of earlier layers). h1
// and h3 share one allocation (h3 `capacity` rows after h1), so that one strided-batched product
// computes both.
static void expert_rows_reserve(ExpertRows *r, int rows, int keep, int C, int H) {
    if (rows <= r->capacity) { return; }
    int capacity = rows + rows / 4;
    int *row_token = (int *)cuda_malloc((size_t)capacity * sizeof(int));
    float *h13 = (float *)cuda_malloc((size_t)2 * capacity * H * sizeof(float));
    float *hact = (float *)cuda_malloc((size_t)capacity * H * sizeof(float));
    float *out = (float *)cuda_malloc((size_t)capacity * C * sizeof(float));
    if (keep > 0) {
        size_t k = keep;
        copy_on_device(row_token, r->row_token, k * sizeof(int));
        copy_on_device(h13, r->h1, k * H * sizeof(float));
        copy_on_device(h13 + (size_t)capacity * H, r->h3, k * H * sizeof(float));
        copy_on_device(hact, r->hact, k * H * sizeof(float));
        copy_on_device(out, r->out, k * C * sizeof(float));
        cudaCheck(cudaStreamSynchronize(gpu.stream));  // before the old buffers go
    }
    cuda_free(r->row_token);
    cuda_free(r->h1);  // h3 is part of the same allocation
    cuda_free(r->hact);
    cuda_free(r->out);
    r->row_token = row_token;
    r->h1 = h13;
    r->h3 = h13 + (size_t)capacity * H;
    r->hact = hact;
    r->out = out;
    r->capacity = capacity;
}

// The gathered inputs of one layer's rows (forward and backward), DeviceScratch's xg.
static void gathered_inputs_reserve(DeviceScratch *s, int rows, int C) {
    if (rows <= s->xg_capacity) { return; }
    cudaCheck(cudaStreamSynchronize(gpu.stream));  // the old buffer may still be in use
    s->xg_capacity = rows + rows / 4;
    cuda_free(s->xg);
    s->xg = (float *)cuda_malloc((size_t)s->xg_capacity * C * sizeof(float));
}

// The rows' gradients, one layer at a time; dh1 and dh3 in one allocation, like h1 and h3.
static void expert_row_grads_reserve(ExpertRowGrads *g, int rows, int C, int H) {
    if (rows <= g->capacity) { return; }
    cudaCheck(cudaStreamSynchronize(gpu.stream));
    int capacity = g->capacity = rows + rows / 4;
    cuda_free(g->dout);
    cuda_free(g->dh1);
    cuda_free(g->din);
    g->dout = (float *)cuda_malloc((size_t)capacity * C * sizeof(float));
    g->dh1 = (float *)cuda_malloc((size_t)2 * capacity * H * sizeof(float));
    g->dh3 = g->dh1 + (size_t)capacity * H;
    g->din = (float *)cuda_malloc((size_t)capacity * C * sizeof(float));
}

static void activations_free(Activations *a) {
    if (gpu.ready) { cudaCheck(cudaStreamSynchronize(gpu.stream)); }
    cuda_free(a->acts_memory);
    cuda_free(a->routing_memory);
    cuda_free(a->grads_memory);
    free(a->row_offset);
    cuda_free(a->rows.row_token);
    cuda_free(a->rows.h1);
    cuda_free(a->rows.hact);
    cuda_free(a->rows.out);
    cuda_free(a->row_grads.dout);
    cuda_free(a->row_grads.dh1);
    cuda_free(a->row_grads.din);
    DeviceScratch *s = a->device;
    if (s != NULL) {
        cuda_free(s->float_memory);
        cuda_free(s->grad_memory);
        cuda_free(s->int_memory);
        free(s->expert_start_host);
        free(s->aux_lb_host);
        free(s->aux_ent_host);
        cuda_free(s->inputs);
        cuda_free(s->targets);
        cuda_free(s->token_ids);
        cuda_free(s->token_first);
        cuda_free(s->token_pos);
        cuda_free(s->sums);
        if (s->gemm_host != NULL) { cudaCheck(cudaFreeHost(s->gemm_host)); }
        cuda_free(s->gemm_dev);
        cuda_free(s->xg);
        free(s);
    }
    memset(a, 0, sizeof(*a));
}

struct Workspace {
    Activations acts;     // for the last (B, T) seen by model_forward
    float *rope_cos;      // (max_seq_len, hd/2), device
    float *rope_sin;
    int has_targets;      // the last forward pass had targets
    double *norm_partial; // partial sums of squares of the gradient norm
};

static AttentionScratch attention_scratch(Activations *a) {
    AttentionScratch s = {a->device->attn_q, a->device->attn_k, a->device->attn_v, a->device->attn_y,
                          a->device->dq, a->device->dk, a->device->dv, a->device->dy, a->grads.dscores};
    return s;
}

// The shared views (router_view, expert_view) plus the GPU's scratch.
static RouterView device_router_view(Activations *a, const ModelConfig *c, int l) {
    RouterView v = router_view(a, c, l);
    DeviceScratch *s = a->device;
    v.expert_start_host = s->expert_start_host + l * (c->num_experts + 1);
    v.dispatch_choice = s->dispatch_choice;
    v.dispatch_counts = s->dispatch_counts;
    v.sums = s->sums;
    return v;
}

static ExpertView device_expert_view(Activations *a, const ModelConfig *c, RouterView r, int l) {
    ExpertView x = expert_view(a, c, r);
    DeviceScratch *s = a->device;
    x.xg = s->xg;
    size_t slots = (size_t)l * GROUPED_SITES * GROUPED_SLOT(c->num_experts);
    x.gemm_host = s->gemm_host + slots;
    x.gemm_dev = s->gemm_dev + slots;
    return x;
}

// The MoE half of layer l: router, auxiliary terms, dispatch, experts, combine.
// Writes MoE(m) to out (N, C).
// Not shared with the CPU's: the views carry the layer's GPU scratch, the row buffers cannot realloc.
static void moe_forward(Model *model, Activations *a, int l, float *out, const float *m) {
    const ModelConfig *c = &model->config;
    int N = a->B * a->T, C = c->channels, E = c->num_experts, H = c->expert_hidden;
    LayerWeights w = layer_weights(&model->params, c, l);
    RouterView r = device_router_view(a, c, l);
    PROFILE_MARK("moe: router");
    router_forward(r, m, &w, model->threshold[l], &model->router, N, C, E);
    PROFILE_MARK("moe: dispatch");
    int rows = moe_dispatch_count(r, N, E);
    moe_aux_forward(&a->acts.aux_lb[l], &a->acts.aux_ent[l], r, N, E);
    expert_rows_reserve(&a->rows, r.row_begin + rows, r.row_begin, C, H);  // after the previous layers' rows
    gathered_inputs_reserve(a->device, rows, C);
    a->row_offset[l + 1] = r.row_begin + rows;
    ExpertView x = device_expert_view(a, c, r, l);
    moe_dispatch(r, x, N, E);
    PROFILE_MARK("moe: experts");
    experts_forward(x, r, m, &w, E, C, H, model->precision);
    PROFILE_MARK("moe: combine");
    moe_combine_forward(out, x, r, N, C, E);
}

// dm (N, C) += gradient of the MoE input, given dout (N, C), the gradient of MoE(m): the forward
// pass reversed.
static void moe_backward(Model *model, Activations *a, int l, float *dm, const float *dout, const float *m) {
    const ModelConfig *c = &model->config;
    int N = a->B * a->T, C = c->channels, E = c->num_experts, H = c->expert_hidden, L = c->num_layers;
    const RouterConfig *rc = &model->router;
    LayerWeights w = layer_weights(&model->params, c, l);
    LayerWeights dw = layer_weights(&model->grads, c, l);
    RouterView r = device_router_view(a, c, l);
    gathered_inputs_reserve(a->device, r.expert_start_host[E], C);
    expert_row_grads_reserve(&a->row_grads, r.expert_start_host[E], C, H);
    ExpertView x = device_expert_view(a, c, r, l);
    PROFILE_MARK("moe back: combine");
    moe_combine_backward(x, r, dout, N, C, E);
    PROFILE_MARK("moe back: experts");
    experts_backward(x, r, m, &dw, &w, E, C, H, model->precision);
    PROFILE_MARK("moe back: gather+router");
    moe_gather_rows(dm, x, r, N, C, E);
    moe_aux_backward(r, rc->lb_coef / L, rc->ent_coef / L, N, E);
    router_backward(r, dm, &dw, m, &w, rc, N, C, E);
}

static void model_ensure_activations(Model *model, int B, int T) {
    const ModelConfig *c = &model->config;
    if (T > c->max_seq_len) { fail("sequence length %d exceeds the model's maximum %d", T, c->max_seq_len); }
    if (model->ws->acts.acts_memory != NULL && model->ws->acts.B == B && model->ws->acts.T == T) { return; }
    activations_free(&model->ws->acts);
    activations_alloc(&model->ws->acts, c, B, T, 1);
}

// Sum of the N token losses (double, one block, fixed order) next to the L auxiliary values.
__global__ void loss_sum_kernel(double *out, const float *token_loss, int N) {
    double sum = 0.0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) { sum += token_loss[n]; }
    sum = block_sum(sum);
    if (threadIdx.x == 0) { *out = sum; }
}

// inputs, targets: (B, T) token ids in host memory; targets may be NULL (no loss).
void model_forward(Model *model, const int *inputs, const int *targets, int B, int T) {
    model_ensure_activations(model, B, T);
    const ModelConfig *c = &model->config;
    int N = B * T, C = c->channels, L = c->num_layers, NH = c->num_heads, V = c->vocab_size,
        Vp = c->padded_vocab_size;
    Activations *a = &model->ws->acts;
    ActivationTensors *t = &a->acts;
    model->B = B;
    model->T = T;
    PROFILE_MARK("embedding");
    encoder_prepare(a, inputs, N, V);
    copy_to_device(a->device->inputs, inputs, (size_t)N * sizeof(int));
    model->ws->has_targets = targets != NULL;
    if (targets != NULL) { copy_to_device(a->device->targets, targets, (size_t)N * sizeof(int)); }
    encoder_forward(t->encoded, a->device->inputs, model->params.wte, N, C);
    a->row_offset[0] = 0;
    AttentionScratch s = attention_scratch(a);
    for (int l = 0; l < L; l++) {
        LayerWeights w = layer_weights(&model->params, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * N * C;
        float *ln1 = t->ln1 + (size_t)l * N * C, *qkv = t->qkv + (size_t)l * N * 3 * C;
        float *atty = t->atty + (size_t)l * N * C, *res1 = t->res1 + (size_t)l * N * C;
        float *ln2 = t->ln2 + (size_t)l * N * C, *res2 = t->res2 + (size_t)l * N * C;
        PROFILE_MARK("attn: norm+qkv+rope");
        rmsnorm_forward(ln1, t->ln1_rstd + (size_t)l * N, x, w.g1, N, C);
        matmul_forward(qkv, ln1, w.wqkv, N, C, 3 * C);
        rope_forward(qkv, model->ws->rope_cos, model->ws->rope_sin, B, T, C, NH);
        PROFILE_MARK("attn: core");
        attention_forward(atty, t->att + (size_t)l * B * NH * T * T, qkv, s, B, T, C, NH, 1);
        PROFILE_MARK("attn: proj+residual+norm");
        matmul_forward(res1, atty, w.wo, N, C, C);  // res1 = x + Wo·atty
        residual_forward(res1, x, res1, (size_t)N * C);
        rmsnorm_forward(ln2, t->ln2_rstd + (size_t)l * N, res1, w.g2, N, C);
        moe_forward(model, a, l, res2, ln2);  // res2 = res1 + MoE(ln2)
        residual_forward(res2, res1, res2, (size_t)N * C);
    }
    PROFILE_MARK("lm head");
    rmsnorm_forward(t->lnf, t->lnf_rstd, t->res2 + (size_t)(L - 1) * N * C, model->params.gf, N, C);
    matmul_forward(t->logits, t->lnf, model->params.wte, N, C,
                   Vp);  // tied head; the padded rows of wte are 0
    PROFILE_MARK("crossentropy");
    // the auxiliary terms come back to the host in every pass (model_get_losses reads them)
    if (targets != NULL) {
        crossentropy_forward(t->token_loss, a->device->token_lse, t->logits, a->device->targets, N, V, Vp);
        loss_sum_kernel<<<1, 1024, 0, gpu.stream>>>(a->device->sums, t->token_loss, N);
        launchCheck();
    }
    double ce = 0.0;
    cudaCheck(cudaMemcpyAsync(a->device->aux_lb_host, t->aux_lb, L * sizeof(float), cudaMemcpyDeviceToHost,
                              gpu.stream));
    cudaCheck(cudaMemcpyAsync(a->device->aux_ent_host, t->aux_ent, L * sizeof(float), cudaMemcpyDeviceToHost,
                              gpu.stream));
    if (targets != NULL) {
        cudaCheck(cudaMemcpyAsync(&ce, a->device->sums, sizeof(double), cudaMemcpyDeviceToHost, gpu.stream));
    }
    cudaCheck(cudaStreamSynchronize(gpu.stream));
    if (targets == NULL) {
        model->loss = model->ce_loss = -1.0f;
        return;
    }
    double lb = 0.0, ent = 0.0;
    for (int l = 0; l < L; l++) {
        lb += a->device->aux_lb_host[l];
        ent += a->device->aux_ent_host[l];
    }
    model->ce_loss = (float)(ce / N);
    model->loss = (float)(ce / N + model->router.lb_coef * lb / L + model->router.ent_coef * ent / L);
}

void model_zero_grad(Model *model) {
    if (model->grads_memory == NULL) {
        model->grads_memory = (float *)cuda_malloc(model->num_parameters * sizeof(float));
        carve_params(&model->grads, model->grads_memory, model->param_sizes, model->experts);
    }
    zero_async(model->grads_memory, model->num_parameters * sizeof(float));
}

// Gradient of the total loss of the last forward pass, accumulated into model->grads.
void model_backward(Model *model) {
    if (!model->ws->has_targets) { fail("model_backward needs a forward pass with targets"); }
    if (model->grads_memory == NULL) { model_zero_grad(model); }
    const ModelConfig *c = &model->config;
    Activations *a = &model->ws->acts;
    ActivationTensors *t = &a->acts;
    GradActivations *g = &a->grads;
    int B = a->B, T = a->T, N = B * T, C = c->channels, L = c->num_layers, NH = c->num_heads;
    int V = c->vocab_size, Vp = c->padded_vocab_size;
    ParameterTensors *dp = &model->grads;
    AttentionScratch s = attention_scratch(a);

    PROFILE_MARK("back: crossentropy");
    crossentropy_backward(g->dlogits, t->logits, a->device->token_lse, a->device->targets, N, V, Vp,
                          1.0f / N);
    PROFILE_MARK("back: lm head");
    matmul_backward_on(gpu.blas, g->dln, dp->wte, g->dlogits, t->lnf, model->params.wte, N, C, Vp,
                       0.0f);  // dln = (overwrite)
    zero_async(g->dresidual, (size_t)N * C * sizeof(float));
    rmsnorm_backward(g->dresidual, dp->gf, g->dln, t->res2 + (size_t)(L - 1) * N * C, model->params.gf,
                     t->lnf_rstd, a->device->colsum, N, C);
    for (int l = L - 1; l >= 0; l--) {
        LayerWeights w = layer_weights(&model->params, c, l);
        LayerWeights dw = layer_weights(dp, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * N * C;
        // dresidual holds d res2; the MoE branch adds its share of d res1
        zero_async(g->dln, (size_t)N * C * sizeof(float));
        moe_backward(model, a, l, g->dln, g->dresidual, t->ln2 + (size_t)l * N * C);
        PROFILE_MARK("attn back: norm+proj");
        rmsnorm_backward(g->dresidual, dw.g2, g->dln, t->res1 + (size_t)l * N * C, w.g2,
                         t->ln2_rstd + (size_t)l * N, a->device->colsum, N, C);
        // dresidual holds d res1; the attention branch adds its share of d x
        matmul_backward_on(gpu.blas, g->datty, dw.wo, g->dresidual, t->atty + (size_t)l * N * C, w.wo, N, C,
                           C, 0.0f);
        PROFILE_MARK("attn back: core");
        attention_backward(g->dqkv, g->datty, t->qkv + (size_t)l * N * 3 * C,
                           t->att + (size_t)l * B * NH * T * T, s, B, T, C, NH, 1);
        PROFILE_MARK("attn back: rope+qkv+norm");
        rope_backward(g->dqkv, model->ws->rope_cos, model->ws->rope_sin, B, T, C, NH);
        matmul_backward_on(gpu.blas, g->dln, dw.wqkv, g->dqkv, t->ln1 + (size_t)l * N * C, w.wqkv, N, C,
                           3 * C, 0.0f);
        rmsnorm_backward(g->dresidual, dw.g1, g->dln, x, w.g1, t->ln1_rstd + (size_t)l * N, a->device->colsum,
                         N, C);
    }
    PROFILE_MARK("back: embedding");
    encoder_backward(dp->wte, g->dresidual, a, C);
}

// ----------------------------------------------------------------------------
// routing counts, for the controller and the statistics

// One block per layer adds its N counts (integers: exact in any order; the order is fixed anyway).
__global__ void count_selected_kernel(double *out, const int *n_selected, int N) {
    const int *count = n_selected + (size_t)blockIdx.x * N;
    long long sum = 0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) { sum += count[n]; }
    sum = block_sum(sum);
    if (threadIdx.x == 0) { out[blockIdx.x] = (double)sum; }
}

void model_activated_per_layer(const Model *model, double *activated) {
    const Activations *a = &model->ws->acts;
    int N = a->B * a->T, L = model->config.num_layers;
    count_selected_kernel<<<L, 1024, 0, gpu.stream>>>(a->device->sums, a->routing.n_selected, N);
    launchCheck();
    copy_to_host(activated, a->device->sums, L * sizeof(double));
    for (int l = 0; l < L; l++) { activated[l] /= N; }
}

void model_routing_counts(const Model *model, int *n_selected, int *expert_load) {
    const Activations *a = &model->ws->acts;
    int N = a->B * a->T, L = model->config.num_layers, E = model->config.num_experts;
    copy_to_host(n_selected, a->routing.n_selected, (size_t)L * N * sizeof(int));
    for (int l = 0; expert_load != NULL && l < L; l++) {
        const int *start = a->device->expert_start_host + (size_t)l * (E + 1);
        for (int e = 0; e < E; e++) { expert_load[(size_t)l * E + e] = start[e + 1] - start[e]; }
    }
}

// ----------------------------------------------------------------------------
// sampling: the same layers, one new position at a time, attending to cached keys and values

struct Decoder {
    Activations acts;  // B = 1, T = 1
    float *kv_cache;   // (L, max_seq_len, 3C) q, k, v of every position so far (RoPE applied), device
    float *logits;     // (Vp) host copy of the logits of the last step
};

Decoder *decoder_create(const Model *model) {
    const ModelConfig *c = &model->config;
    Decoder *d = (Decoder *)calloc_check(1, sizeof(Decoder));
    activations_alloc(&d->acts, c, 1, 1, 0);
    d->kv_cache =
        (float *)cuda_calloc((size_t)c->num_layers * c->max_seq_len * 3 * c->channels * sizeof(float));
    d->logits = (float *)malloc_check((size_t)c->padded_vocab_size * sizeof(float));
    return d;
}

void decoder_free(Decoder *d) {
    activations_free(&d->acts);
    cuda_free(d->kv_cache);
    free(d->logits);
    free(d);
}

// One query against n_keys cached keys and values (rows `stride` floats apart), one block per
// head: scores, softmax and the weighted sum of values, as attend() in train_dtopp.c.
__global__ void attend_kernel(float *out, const float *q, const float *k, const float *v, size_t stride,
                              int n_keys, int hd) {
    extern __shared__ float probs[];  // (n_keys)
    int h = blockIdx.x;
    const float *qh = q + (size_t)h * hd;
    float scale = 1.0f / sqrtf((float)hd);
    float maxval = -INFINITY;
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x) {
        const float *kj = k + j * stride + (size_t)h * hd;
        float dot = 0.0f;
        for (int i = 0; i < hd; i++) { dot += qh[i] * kj[i]; }
        probs[j] = dot * scale;
        maxval = fmaxf(maxval, probs[j]);
    }
    maxval = block_max(maxval);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x) {
        probs[j] = expf(probs[j] - maxval);
        sum += probs[j];
    }
    sum = block_sum(sum);
    __syncthreads();
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float o = 0.0f;
        for (int j = 0; j < n_keys; j++) { o += probs[j] / sum * v[j * stride + (size_t)h * hd + i]; }
        out[(size_t)h * hd + i] = o;
    }
}

// Feeds `token` at position `pos` (all earlier positions must have been fed) and returns the
// logits (V) for the next token, in host memory owned by the decoder.
const float *decoder_step(Model *model, Decoder *d, int token, int pos) {
    const ModelConfig *c = &model->config;
    int C = c->channels, L = c->num_layers, NH = c->num_heads, hd = C / NH, V = c->vocab_size,
        Vp = c->padded_vocab_size;
    if (pos >= c->max_seq_len) {
        fail("position %d exceeds the model's maximum sequence length %d", pos, c->max_seq_len);
    }
    if (token < 0 || token >= V) { fail("token id %d is outside the vocabulary (%d)", token, V); }
    ActivationTensors *t = &d->acts.acts;
    const float *rope_cos = model->ws->rope_cos + pos * (hd / 2), *rope_sin = model->ws->rope_sin + pos * (hd / 2);
    copy_to_device(d->acts.device->inputs, &token, sizeof(int));
    encoder_forward(t->encoded, d->acts.device->inputs, model->params.wte, 1, C);
    d->acts.row_offset[0] = 0;
    for (int l = 0; l < L; l++) {
        LayerWeights w = layer_weights(&model->params, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * C;
        float *ln1 = t->ln1 + (size_t)l * C, *atty = t->atty + (size_t)l * C;
        float *res1 = t->res1 + (size_t)l * C, *ln2 = t->ln2 + (size_t)l * C, *res2 = t->res2 + (size_t)l * C;
        float *cache = d->kv_cache + (size_t)l * c->max_seq_len * 3 * C;
        float *qkv = cache + (size_t)pos * 3 * C;
        rmsnorm_forward(ln1, t->ln1_rstd + l, x, w.g1, 1, C);
        matmul_forward(qkv, ln1, w.wqkv, 1, C, 3 * C);
        rope_forward(qkv, rope_cos, rope_sin, 1, 1, C, NH);  // the tables from position pos
        attend_kernel<<<NH, 128, (size_t)(pos + 1) * sizeof(float), gpu.stream>>>(
            atty, qkv, cache + C, cache + 2 * C, 3 * (size_t)C, pos + 1, hd);
        launchCheck();
        matmul_forward(res1, atty, w.wo, 1, C, C);
        residual_forward(res1, x, res1, C);
        rmsnorm_forward(ln2, t->ln2_rstd + l, res1, w.g2, 1, C);
        moe_forward(model, &d->acts, l, res2, ln2);
        residual_forward(res2, res1, res2, C);
    }
    rmsnorm_forward(t->lnf, t->lnf_rstd, t->res2 + (size_t)(L - 1) * C, model->params.gf, 1, C);
    matmul_forward(t->logits, t->lnf, model->params.wte, 1, C, Vp);
    copy_to_host(d->logits, t->logits, (size_t)V * sizeof(float));
    return d->logits;
}

// ----------------------------------------------------------------------------
// results of the last forward/backward pass, copied out from the device: what tests and tools read

void model_get_logits(const Model *model, float *out) {  // (N, V) from the (N, Vp) rows
    const ModelConfig *c = &model->config;
    size_t N = (size_t)model->ws->acts.B * model->ws->acts.T;
    cudaCheck(cudaMemcpy2DAsync(out, c->vocab_size * sizeof(float), model->ws->acts.acts.logits,
                                c->padded_vocab_size * sizeof(float), c->vocab_size * sizeof(float), N,
                                cudaMemcpyDeviceToHost, gpu.stream));
    cudaCheck(cudaStreamSynchronize(gpu.stream));
}

void model_get_losses(const Model *model, float *out) {  // total, CE, LB_l for each l, H_l for each l
    int L = model->config.num_layers;
    out[0] = model->loss;
    out[1] = model->ce_loss;
    memcpy(out + 2, model->ws->acts.device->aux_lb_host, L * sizeof(float));
    memcpy(out + 2 + L, model->ws->acts.device->aux_ent_host, L * sizeof(float));
}

// n_selected (L, N), selected (L, N, E), gates (L, N, E), as in the reference fixtures.
void model_get_routing(const Model *model, int *n_selected, int *selected, float *gates) {
    const Activations *a = &model->ws->acts;
    size_t LN = (size_t)model->config.num_layers * a->B * a->T, E = model->config.num_experts;
    copy_to_host(n_selected, a->routing.n_selected, LN * sizeof(int));
    copy_to_host(selected, a->routing.selected, LN * E * sizeof(int));
    copy_to_host(gates, a->acts.gates, LN * E * sizeof(float));
}

void model_get_grads(const Model *model, float *out) {
    copy_to_host(out, model->grads_memory, model->num_parameters * sizeof(float));
}

void model_get_params(const Model *model, float *out) {
    copy_to_host(out, model->params_memory, model->num_parameters * sizeof(float));
}

void model_get_theta(const Model *model, float *out) {  // (L) the DRN scales: L floats, not the whole model
    copy_to_host(out, model->params.theta, model->config.num_layers * sizeof(float));
}

void model_get_token_losses(const Model *model, float *out) {
    copy_to_host(out, model->ws->acts.acts.token_loss, (size_t)model->B * model->T * sizeof(float));
}

// (L, N, E) each: the logits the router's softmax took (the DRN-scaled θ·u, or z without DRN), and P.
void model_get_router(const Model *model, float *logits, float *probs) {
    const ActivationTensors *t = &model->ws->acts.acts;
    size_t NE = (size_t)model->B * model->T * model->config.num_experts, L = model->config.num_layers;
    copy_to_host(probs, t->probs, L * NE * sizeof(float));
    copy_to_host(logits, model->router.drn ? t->drn_u : t->router_logits, L * NE * sizeof(float));
    if (!model->router.drn) { return; }
    float *theta = (float *)malloc_check(L * sizeof(float));
    model_get_theta(model, theta);
    for (size_t i = 0; i < L * NE; i++) { logits[i] *= theta[i / NE]; }
    free(theta);
}

void model_get_moments(const Model *model, float *m, float *v) {
    if (model->m_memory == NULL) {  // no step taken yet: the moments are zero
        memset(m, 0, model->num_parameters * sizeof(float));
        memset(v, 0, model->num_parameters * sizeof(float));
        return;
    }
    copy_to_host(m, model->m_memory, model->num_parameters * sizeof(float));
    copy_to_host(v, model->v_memory, model->num_parameters * sizeof(float));
}

void model_set_moments(Model *model, const float *m, const float *v) {
    if (model->m_memory == NULL) {
        model->m_memory = (float *)cuda_malloc(model->num_parameters * sizeof(float));
        model->v_memory = (float *)cuda_malloc(model->num_parameters * sizeof(float));
    }
    copy_to_device(model->m_memory, m, model->num_parameters * sizeof(float));
    copy_to_device(model->v_memory, v, model->num_parameters * sizeof(float));
}

// ----------------------------------------------------------------------------
// 6. the PI controller
// train_dtopp.c's, on the host: it reads model_activated_per_layer.

// ----------------------------------------------------------------------------
// 7. AdamW, with global-norm clipping and the learning-rate schedule
// The rule (adamw_step, adamw_update) and the schedule are train_dtopp.c's; here the update kernels.

// Sum of squares in fixed blocks of NORM_BLOCK elements (each block: a fixed tree over its
// threads), then the blocks in order: the rounding depends only on the number of parameters.
#define NORM_BLOCK 65536
__global__ void sum_of_squares_kernel(double *partial, const float *x, size_t n) {
    size_t begin = (size_t)blockIdx.x * NORM_BLOCK, end = begin + NORM_BLOCK < n ? begin + NORM_BLOCK : n;
    double s = 0.0;
    for (size_t i = begin + threadIdx.x; i < end; i += blockDim.x) { s += (double)x[i] * x[i]; }
    s = block_sum(s);
    if (threadIdx.x == 0) { partial[blockIdx.x] = s; }
}

__global__ void sum_partials_kernel(double *out, const double *partial, int n) {
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { s += partial[i]; }
    s = block_sum(s);
    if (threadIdx.x == 0) { *out = s; }
}

static double sum_of_squares(Model *model, const float *x, size_t n) {
    int blocks = (int)((n + NORM_BLOCK - 1) / NORM_BLOCK);
    if (model->ws->norm_partial == NULL) {
        model->ws->norm_partial = (double *)cuda_malloc((blocks + 1) * sizeof(double));
    }
    double *partial = model->ws->norm_partial;
    sum_of_squares_kernel<<<blocks, 256, 0, gpu.stream>>>(partial, x, n);
    launchCheck();
    sum_partials_kernel<<<1, 1024, 0, gpu.stream>>>(partial + blocks, partial, blocks);
    launchCheck();
    double total;
    copy_to_host(&total, partial + blocks, sizeof(double));
    return total;
}

// One thread per parameter: the AdamW rule of the shared part (adamw_update).
__global__ void adamw_kernel(float *params, float *m_memory, float *v_memory, const float *grads, size_t n,
                             AdamWStep s, float wd) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { adamw_update(&params[i], &m_memory[i], &v_memory[i], grads[i], s, wd); }
}

// Clips the gradient to global norm 1 and takes one AdamW step. Returns the norm before clipping.
float model_update(Model *model, float lr, float weight_decay) {
    if (model->grads_memory == NULL) { model_zero_grad(model); }
    if (model->m_memory == NULL) {
        model->m_memory = (float *)cuda_calloc(model->num_parameters * sizeof(float));
        model->v_memory = (float *)cuda_calloc(model->num_parameters * sizeof(float));
    }
    PROFILE_MARK("optimizer");
    float norm = (float)sqrt(sum_of_squares(model, model->grads_memory, model->num_parameters));
    model->adam_step++;
    AdamWStep s = adamw_step(model->adam_step, lr, norm);
    size_t offset = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        float wd = param_is_matrix[k] ? weight_decay : 0.0f;
        size_t n = model->param_sizes[k];
        adamw_kernel<<<blocks_for(n, 256), 256, 0, gpu.stream>>>(
            model->params_memory + offset, model->m_memory + offset, model->v_memory + offset,
            model->grads_memory + offset, n, s, wd);
        launchCheck();
        offset += n;
    }
    return norm;
}

// Gradient accumulation and the sum over ranks with NCCL.
//
// Built with USE_MPI (make cuda-mpi), each rank drives one GPU: the rank's index among the ranks
// of its machine picks the GPU, MPI carries NCCL's id from rank 0 to the others, and the gradient
// sum is one NCCL all-reduce on the device. The step's small totals (losses, routing counts) go
// through MPI on the host, as in the CPU build (dp_sum_doubles), so the controller sees the whole
// step. NCCL's sum is not the CPU build's rank-order sum: its order depends on NCCL's algorithm for
// the number of ranks and the topology, and is the same from run to run on the same machines. For
// two ranks any order gives the same bits (a + b = b + a).

__global__ void add_kernel(float *out, const float *a, const float *b, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = a[i] + b[i]; }
}

__global__ void scale_kernel(float *x, float scale, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { x[i] *= scale; }
}

// As on the CPU: micro-batch 0 starts the sum, the last adds it into model->grads.
void model_accumulate_grads(Model *model, int micro, int count) {
    if (count == 1) { return; }
    size_t n = model->num_parameters;
    if (model->grads_sum_memory == NULL) {
        model->grads_sum_memory = (float *)cuda_malloc(n * sizeof(float));
    }
    float *sum = model->grads_sum_memory, *grads = model->grads_memory;
    if (micro == 0) {
        copy_on_device(sum, grads, n * sizeof(float));
        return;
    }
    add_kernel<<<blocks_for(n, 256), 256, 0, gpu.stream>>>(micro == count - 1 ? grads : sum, sum, grads, n);
    launchCheck();
}

#ifdef USE_MPI
#include <nccl.h>
static ncclComm_t nccl_comm;

static void nccl_check(ncclResult_t result, const char *what) {
    if (result != ncclSuccess) { fail("NCCL error in %s: %s", what, ncclGetErrorString(result)); }
}

// Called by dp_init before anything touches the GPU.
void cuda_parallel_init(int rank, int ranks) {
    MPI_Comm machine;  // the ranks that share this machine, and so its GPUs
    int local_rank, devices = 0;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &machine);
    MPI_Comm_rank(machine, &local_rank);
    MPI_Comm_free(&machine);
    cudaCheck(cudaGetDeviceCount(&devices));
    if (devices < 1) { fail("rank %d: no CUDA device found", rank); }
    cudaCheck(cudaSetDevice(local_rank % devices));
    ncclUniqueId id;
    if (rank == 0) { nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId"); }
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
    nccl_check(ncclCommInitRank(&nccl_comm, ranks, id, rank), "ncclCommInitRank");
}
#endif

void model_allreduce_grads(Model *model, float scale) {
    size_t n = model->num_parameters;
#ifdef USE_MPI
    if (dp_ranks > 1) {
        float *grads = model->grads_memory;
        ncclResult_t result = ncclAllReduce(grads, grads, n, ncclFloat, ncclSum, nccl_comm, gpu.stream);
        nccl_check(result, "ncclAllReduce");
    }
#endif
    scale_kernel<<<blocks_for(n, 256), 256, 0, gpu.stream>>>(model->grads_memory, scale, n);
    launchCheck();
}

// ----------------------------------------------------------------------------
// 8. the model file (doc/formats.md): architecture, routing configuration, parameters, controller
// checkpoint_save, checkpoint_load, model_init and model_load are train_dtopp.c's, calling these.

// Takes ownership of params (host memory, filled): copies them to the GPU and frees them.
static void model_attach(Model *model, float *params) {
    if (model->router.first_layer_k > 0) {  // the GPU's moe_forward/moe_backward route every layer alike
        fail("a fixed top-k first layer (--first-layer-k) is only in the CPU build, train_dtopp");
    }
    gpu_init();
    const ModelConfig *c = &model->config;
    model->params_memory = (float *)cuda_malloc(model->num_parameters * sizeof(float));
    copy_to_device(model->params_memory, params, model->num_parameters * sizeof(float));
    free(params);
    carve_params(&model->params, model->params_memory, model->param_sizes, model->experts);
    Workspace *ws = model->ws = (Workspace *)calloc_check(1, sizeof(Workspace));
    int hd = c->channels / c->num_heads;
    size_t table = (size_t)c->max_seq_len * (hd / 2);
    float *cos_host = (float *)malloc_check(table * sizeof(float)),
          *sin_host = (float *)malloc_check(table * sizeof(float));
    rope_table_init(cos_host, sin_host, c->max_seq_len, hd);
    ws->rope_cos = (float *)cuda_malloc(table * sizeof(float));
    ws->rope_sin = (float *)cuda_malloc(table * sizeof(float));
    copy_to_device(ws->rope_cos, cos_host, table * sizeof(float));
    copy_to_device(ws->rope_sin, sin_host, table * sizeof(float));
    free(cos_host);
    free(sin_host);
}

void model_save(const Model *model, const char *path) {
    float *params = (float *)malloc_check(model->num_parameters * sizeof(float));
    model_get_params(model, params);
    checkpoint_save(model, params, path);
    free(params);
}

void model_free(Model *model) {
    cudaCheck(cudaStreamSynchronize(gpu.stream));
    cuda_free(model->params_memory);
    cuda_free(model->grads_memory);
    cuda_free(model->grads_sum_memory);
    cuda_free(model->m_memory);
    cuda_free(model->v_memory);
    free(model->threshold);
    free(model->integral);
    cuda_free(model->ws->rope_cos);
    cuda_free(model->ws->rope_sin);
    cuda_free(model->ws->norm_partial);
    activations_free(&model->ws->acts);
    free(model->ws);
}

// ----------------------------------------------------------------------------
// 9. main: the training loop
// train_dtopp.c's, included at the top.
