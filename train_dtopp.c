/*
train_dtopp.c: training a DTop-p Mixture-of-Experts language model in plain C.

DTop-p (dynamic top-p) routing sends each token to experts in order of router probability until
their cumulative probability passes a threshold p, so confident tokens use few experts and
uncertain ones many. A PI controller moves p between steps so that the average number of
activated experts per token converges to a target budget, and Dynamic Routing Normalization
(DRN: a learnable per-layer scale on standardized router logits) lets layers differ under the one
threshold. The function computed here is specified exactly in doc/spec.md; doc/formats.md
describes every file this program reads or writes.

Reading order: utilities; configuration; parameters and activations; the layers, each as a
forward/backward pair; the MoE layer (router, dispatch, experts, combine, auxiliary losses); the
model (forward, backward, optimizer, controller); checkpoints; sampling; the training program.

Determinism: every parallel loop writes disjoint outputs and every reduction runs in a fixed
order, so results are bitwise identical for any number of threads.
*/
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

// ----------------------------------------------------------------------------
// utilities: fatal errors, checked file I/O, a seeded random number generator

static void fail(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    va_end(args);
    exit(EXIT_FAILURE);
}

static void *malloc_check(size_t size) {
    void *ptr = malloc(size > 0 ? size : 1);
    if (ptr == NULL) { fail("out of memory allocating %zu bytes", size); }
    return ptr;
}

static void *calloc_check(size_t count, size_t size) {
    void *ptr = calloc(count > 0 ? count : 1, size);
    if (ptr == NULL) { fail("out of memory allocating %zu x %zu bytes", count, size); }
    return ptr;
}

static FILE *fopen_check(const char *path, const char *mode) {
    FILE *f = fopen(path, mode);
    if (f == NULL) { fail("cannot open %s: %s", path, strerror(errno)); }
    return f;
}

static long file_size(FILE *f, const char *path) {
    if (fseek(f, 0, SEEK_END) != 0) { fail("cannot seek in %s", path); }
    long size = ftell(f);
    if (size < 0 || fseek(f, 0, SEEK_SET) != 0) { fail("cannot seek in %s", path); }
    return size;
}

static void fread_check(void *ptr, size_t size, size_t count, FILE *f, const char *path) {
    if (fread(ptr, size, count, f) != count) { fail("%s is truncated", path); }
}

static void fwrite_check(const void *ptr, size_t size, size_t count, FILE *f, const char *path) {
    if (fwrite(ptr, size, count, f) != count) { fail("cannot write %s: %s", path, strerror(errno)); }
}

// Every binary file starts with 256 words: a magic number, a version, then fields. Some fields
// are float32 values stored bit for bit in a word.
#define HEADER_WORDS 256
static float header_float(const int32_t *header, int word) {
    float value;
    memcpy(&value, &header[word], sizeof(float));
    return value;
}
static void header_set_float(int32_t *header, int word, float value) {
    memcpy(&header[word], &value, sizeof(float));
}

// Reads a header, checks magic, version and that the file holds exactly header + payload_bytes
// (payload_bytes is computed by the caller from the header, hence the callback-free two steps).
static FILE *open_with_header(const char *path, int32_t *header, int32_t magic, int32_t version,
                              const char *what, long *size) {
    FILE *f = fopen_check(path, "rb");
    *size = file_size(f, path);
    if (*size < (long)(HEADER_WORDS * sizeof(int32_t))) {
        fail("%s is too short to be a %s (%ld bytes)", path, what, *size);
    }
    fread_check(header, sizeof(int32_t), HEADER_WORDS, f, path);
    if (header[0] != magic) { fail("%s is not a %s (magic %d, expected %d)", path, what, header[0], magic); }
    if (header[1] != version) { fail("%s: unsupported %s version %d (expected %d)", path, what, header[1], version); }
    return f;
}

static void check_payload_size(const char *path, long size, size_t payload_bytes) {
    size_t expected = HEADER_WORDS * sizeof(int32_t) + payload_bytes;
    if ((size_t)size < expected) { fail("%s is truncated: %ld bytes, expected %zu", path, size, expected); }
    if ((size_t)size > expected) { fail("%s has %ld bytes, expected %zu: trailing data", path, size, expected); }
}

// Writes go to "path.tmp" first and are renamed over the target only once complete, so a crash
// or a full disk never destroys the previous file.
static FILE *open_for_atomic_write(const char *path, char *tmp_path, size_t tmp_size) {
    snprintf(tmp_path, tmp_size, "%s.tmp", path);
    FILE *f = fopen(tmp_path, "wb");
    if (f == NULL) { fail("cannot write %s: %s", tmp_path, strerror(errno)); }
    return f;
}

static void finish_atomic_write(FILE *f, const char *tmp_path, const char *path) {
    if (fflush(f) != 0 || fsync(fileno(f)) != 0 || fclose(f) != 0) {
        remove(tmp_path);
        fail("cannot write %s: %s", tmp_path, strerror(errno));
    }
    if (rename(tmp_path, path) != 0) { fail("cannot rename %s to %s: %s", tmp_path, path, strerror(errno)); }
}

// splitmix64: small, fast, and its whole state is one integer, which checkpoints save.
static uint64_t random_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float random_f32(uint64_t *state) {  // uniform in [0, 1)
    return (random_u64(state) >> 40) * (1.0f / 16777216.0f);
}
static float random_normal(uint64_t *state) {  // Box-Muller
    double u1 = ((random_u64(state) >> 11) + 1.0) / 9007199254740993.0;  // (0, 1]
    double u2 = (random_u64(state) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}

static double wall_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// ----------------------------------------------------------------------------
// configuration

enum { ROUTING_TOPK = 0, ROUTING_TOPP = 1, ROUTING_DTOPP = 2 };
enum { CONTROLLER_GLOBAL = 0, CONTROLLER_LAYER = 1 };
static const char *routing_names[] = {"topk", "topp", "dtopp"};

typedef struct {
    int max_seq_len;        // longest sequence, e.g. 1024
    int vocab_size;         // V, e.g. 50257
    int padded_vocab_size;  // Vp: V rounded up to a multiple of 128
    int num_layers;         // L
    int num_heads;          // NH
    int channels;           // C
    int num_experts;        // E
    int expert_hidden;      // H, hidden width of one SwiGLU expert
} ModelConfig;

typedef struct {
    int routing;       // ROUTING_*
    int controller;    // CONTROLLER_*: one p for all layers, or one per layer
    int drn;           // Dynamic Routing Normalization on/off
    int renorm;        // gates renormalised over the selected experts, or the raw probabilities
    int k;             // experts per token for top-k
    float p;           // the fixed threshold of top-p
    float tgt;         // PI controller: target average number of activated experts
    float Kp, Ki, p0, pmin, pmax;
    float theta_init;  // initial DRN scale
    float lb_coef;     // load-balance loss coefficient
    float ent_coef;    // router entropy loss coefficient
} RouterConfig;

// ----------------------------------------------------------------------------
// parameters: one contiguous buffer carved into named tensors, in the order of doc/formats.md

#define NUM_PARAMETER_TENSORS 11
typedef struct {
    float *wte;    // (Vp, C) token embedding, also the output head
    float *g1;     // (L, C) attention RMSNorm gain
    float *wqkv;   // (L, 3C, C)
    float *wo;     // (L, C, C)
    float *g2;     // (L, C) MoE RMSNorm gain
    float *wr;     // (L, E, C) router
    float *theta;  // (L) DRN scale
    float *w1;     // (L, E, H, C) SwiGLU gate projection
    float *w3;     // (L, E, H, C) SwiGLU value projection
    float *w2;     // (L, E, C, H) SwiGLU output projection
    float *gf;     // (C) final RMSNorm gain
} ParameterTensors;

// Which tensors get weight decay (the matrices) and how they are initialised.
static const int param_is_matrix[NUM_PARAMETER_TENSORS] = {1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0};

static void fill_param_sizes(size_t *sizes, const ModelConfig *c) {
    size_t Vp = c->padded_vocab_size, C = c->channels, L = c->num_layers;
    size_t E = c->num_experts, H = c->expert_hidden;
    sizes[0] = Vp * C;
    sizes[1] = L * C;
    sizes[2] = L * 3 * C * C;
    sizes[3] = L * C * C;
    sizes[4] = L * C;
    sizes[5] = L * E * C;
    sizes[6] = L;
    sizes[7] = L * E * H * C;
    sizes[8] = L * E * H * C;
    sizes[9] = L * E * C * H;
    sizes[10] = C;
}

static void carve_params(ParameterTensors *t, float *memory, const size_t *sizes) {
    float **ptrs[NUM_PARAMETER_TENSORS] = {&t->wte, &t->g1, &t->wqkv, &t->wo, &t->g2, &t->wr,
                                           &t->theta, &t->w1, &t->w3, &t->w2, &t->gf};
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        *ptrs[i] = memory;
        memory += sizes[i];
    }
}

// ----------------------------------------------------------------------------
// activations: what the forward pass keeps for the backward pass

typedef struct {
    float *encoded;        // (N, C) token embeddings
    float *ln1;            // (L, N, C)
    float *ln1_rstd;       // (L, N)
    float *qkv;            // (L, N, 3C) with RoPE applied to q and k
    float *att;            // (L, B, NH, T, T) attention probabilities
    float *atty;           // (L, N, C) attention output, before Wo
    float *res1;           // (L, N, C) residual stream after attention
    float *ln2;            // (L, N, C) MoE input m
    float *ln2_rstd;       // (L, N)
    float *router_logits;  // (L, N, E) z = Wr m
    float *drn_u;          // (L, N, E) standardized logits u (DRN)
    float *drn_rstd;       // (L, N) 1 / sqrt(var(z) + eps)
    float *probs;          // (L, N, E) router probabilities P
    float *gates;          // (L, N, E) gates of the selected experts, in selection order
    float *res2;           // (L, N, C) residual stream after the MoE layer
    float *lnf;            // (N, C)
    float *lnf_rstd;       // (N)
    float *logits;         // (N, V)
    float *token_loss;     // (N) cross-entropy of each position
    float *aux_lb;         // (L) load-balance term LB_l
    float *aux_ent;        // (L) entropy term H_l
} ActivationTensors;
#define NUM_ACTIVATION_TENSORS 21

// The routing decisions, as integers.
typedef struct {
    int *n_selected;    // (L, N) |S| of every token
    int *selected;      // (L, N, E) the experts of S in selection order, -1 after the last
    int *expert_start;  // (L, E + 1) the rows of expert e are expert_start[e] .. expert_start[e+1]-1
    int *token_row;     // (L, N, E) the expert row (within its layer) of choice j of token n, -1 if none
    int *row_offset;    // (L + 1) layer l owns the expert rows row_offset[l] .. row_offset[l+1]-1
} RoutingTensors;
#define NUM_ROUTING_TENSORS 5

// Dropless routing makes the number of (token, expert) pairs vary from step to step, so the
// per-pair activations live in arrays that grow when a step routes more pairs than any before.
typedef struct {
    int capacity;     // rows allocated
    int *row_token;   // (R) the token each row was gathered from
    float *h1;        // (R, H) W1 m
    float *h3;        // (R, H) W3 m
    float *hact;      // (R, H) silu(h1) * h3
    float *out;       // (R, C) Expert_e(m)
} ExpertRows;

// Gradient scratch: one layer at a time, so no (L, ...) dimension.
typedef struct {
    float *dresidual;  // (N, C) gradient along the residual stream
    float *dln;        // (N, C) gradient at a norm's output
    float *datty;      // (N, C)
    float *dqkv;       // (N, 3C)
    float *dscores;    // (B, NH, T) attention scratch, one row per (b, h)
    float *dlogits;    // (N, V)
    float *dgates;     // (N, E) gradient of each selected gate
    float *drouter;    // (N, E) gradient of the router logits z
    float *dtheta;     // (N) each token's share of dθ, summed in order afterwards
} GradActivations;
#define NUM_GRAD_ACTIVATION_TENSORS 9

typedef struct {
    int capacity;
    float *dout;   // (R, C) gradient of Expert_e(m)
    float *dh1;    // (R, H) gradient of h1 (first holds the gradient of hact)
    float *dh3;    // (R, H)
    float *din;    // (R, C) gradient of the gathered input m
} ExpertRowGrads;

typedef struct {
    int B, T;
    ActivationTensors acts;
    float *acts_memory;
    RoutingTensors routing;
    int *routing_memory;
    ExpertRows rows;
    GradActivations grads;
    float *grads_memory;  // NULL when only the forward pass is needed
    ExpertRowGrads row_grads;
} Activations;

static void carve_floats(float **ptrs[], const size_t *sizes, int n, float **memory) {
    size_t total = 0;
    for (int i = 0; i < n; i++) { total += sizes[i]; }
    float *p = *memory = (float *)calloc_check(total, sizeof(float));
    for (int i = 0; i < n; i++) {
        *ptrs[i] = p;
        p += sizes[i];
    }
}

static void activations_alloc(Activations *a, const ModelConfig *c, int B, int T, int with_grads) {
    size_t N = (size_t)B * T, C = c->channels, L = c->num_layers, NH = c->num_heads;
    size_t E = c->num_experts, V = c->vocab_size;
    memset(a, 0, sizeof(*a));
    a->B = B;
    a->T = T;
    ActivationTensors *t = &a->acts;
    float **ptrs[NUM_ACTIVATION_TENSORS] = {
        &t->encoded, &t->ln1, &t->ln1_rstd, &t->qkv, &t->att, &t->atty, &t->res1, &t->ln2,
        &t->ln2_rstd, &t->router_logits, &t->drn_u, &t->drn_rstd, &t->probs, &t->gates, &t->res2,
        &t->lnf, &t->lnf_rstd, &t->logits, &t->token_loss, &t->aux_lb, &t->aux_ent};
    size_t sizes[NUM_ACTIVATION_TENSORS] = {
        N * C, L * N * C, L * N, L * N * 3 * C, L * B * NH * T * T, L * N * C, L * N * C, L * N * C,
        L * N, L * N * E, L * N * E, L * N, L * N * E, L * N * E, L * N * C,
        N * C, N, N * V, N, L, L};
    carve_floats(ptrs, sizes, NUM_ACTIVATION_TENSORS, &a->acts_memory);

    RoutingTensors *r = &a->routing;
    int **iptrs[NUM_ROUTING_TENSORS] = {&r->n_selected, &r->selected, &r->expert_start,
                                        &r->token_row, &r->row_offset};
    size_t isizes[NUM_ROUTING_TENSORS] = {L * N, L * N * E, L * (E + 1), L * N * E, L + 1};
    size_t itotal = 0;
    for (int i = 0; i < NUM_ROUTING_TENSORS; i++) { itotal += isizes[i]; }
    int *ip = a->routing_memory = (int *)calloc_check(itotal, sizeof(int));
    for (int i = 0; i < NUM_ROUTING_TENSORS; i++) {
        *iptrs[i] = ip;
        ip += isizes[i];
    }

    if (with_grads) {
        GradActivations *g = &a->grads;
        float **gptrs[NUM_GRAD_ACTIVATION_TENSORS] = {&g->dresidual, &g->dln, &g->datty, &g->dqkv,
                                                      &g->dscores, &g->dlogits, &g->dgates,
                                                      &g->drouter, &g->dtheta};
        size_t gsizes[NUM_GRAD_ACTIVATION_TENSORS] = {N * C, N * C, N * C, N * 3 * C, B * NH * T,
                                                      N * V, N * E, N * E, N};
        carve_floats(gptrs, gsizes, NUM_GRAD_ACTIVATION_TENSORS, &a->grads_memory);
    }
}

static void *realloc_check(void *ptr, size_t size) {
    void *out = realloc(ptr, size > 0 ? size : 1);
    if (out == NULL) { fail("out of memory growing a buffer to %zu bytes", size); }
    return out;
}

// Makes room for `rows` expert rows, keeping the rows already written (realloc preserves them).
static void expert_rows_reserve(ExpertRows *r, int rows, int C, int H) {
    if (rows <= r->capacity) { return; }
    int capacity = rows + rows / 4;
    r->row_token = (int *)realloc_check(r->row_token, (size_t)capacity * sizeof(int));
    r->h1 = (float *)realloc_check(r->h1, (size_t)capacity * H * sizeof(float));
    r->h3 = (float *)realloc_check(r->h3, (size_t)capacity * H * sizeof(float));
    r->hact = (float *)realloc_check(r->hact, (size_t)capacity * H * sizeof(float));
    r->out = (float *)realloc_check(r->out, (size_t)capacity * C * sizeof(float));
    r->capacity = capacity;
}

static void expert_row_grads_reserve(ExpertRowGrads *g, int rows, int C, int H) {
    if (rows <= g->capacity) { return; }
    int capacity = rows + rows / 4;
    free(g->dout);
    free(g->dh1);
    free(g->dh3);
    free(g->din);
    g->dout = (float *)malloc_check((size_t)capacity * C * sizeof(float));
    g->dh1 = (float *)malloc_check((size_t)capacity * H * sizeof(float));
    g->dh3 = (float *)malloc_check((size_t)capacity * H * sizeof(float));
    g->din = (float *)malloc_check((size_t)capacity * C * sizeof(float));
    g->capacity = capacity;
}

static void activations_free(Activations *a) {
    free(a->acts_memory);
    free(a->routing_memory);
    free(a->grads_memory);
    free(a->rows.row_token);
    free(a->rows.h1);
    free(a->rows.h3);
    free(a->rows.hact);
    free(a->rows.out);
    free(a->row_grads.dout);
    free(a->row_grads.dh1);
    free(a->row_grads.dh3);
    free(a->row_grads.din);
    memset(a, 0, sizeof(*a));
}

// ----------------------------------------------------------------------------
// the layers, each a forward/backward pair
// N = B*T token positions. Backward functions accumulate (+=) into parameter gradients and into
// the input gradient they are given.

void encoder_forward(float *out, const int *inp, const float *wte, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        memcpy(out + (size_t)n * C, wte + (size_t)inp[n] * C, C * sizeof(float));
    }
}

void encoder_backward(float *dwte, const float *dout, const int *inp, int N, int C) {
    // several positions can hold the same token: a serial loop keeps the sum's order fixed
    for (int n = 0; n < N; n++) {
        float *dw = dwte + (size_t)inp[n] * C;
        const float *d = dout + (size_t)n * C;
        for (int i = 0; i < C; i++) { dw[i] += d[i]; }
    }
}

#define RMSNORM_EPS 1e-5f

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *g, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float ss = 0.0f;
        for (int i = 0; i < C; i++) { ss += x[i] * x[i]; }
        float r = 1.0f / sqrtf(ss / C + RMSNORM_EPS);
        float *o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) { o[i] = g[i] * x[i] * r; }
        rstd[n] = r;
    }
}

void rmsnorm_backward(float *dinp, float *dg, const float *dout, const float *inp, const float *g,
                      const float *rstd, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
        float r = rstd[n];
        float dot = 0.0f;  // <g ⊙ dout, x>
        for (int i = 0; i < C; i++) { dot += g[i] * d[i] * x[i]; }
        float *dx = dinp + (size_t)n * C;
        for (int i = 0; i < C; i++) { dx[i] += r * g[i] * d[i] - x[i] * (r * r * r / C) * dot; }
    }
    #pragma omp parallel for
    for (int i = 0; i < C; i++) {
        float sum = 0.0f;
        for (int n = 0; n < N; n++) { sum += dout[(size_t)n * C + i] * inp[(size_t)n * C + i] * rstd[n]; }
        dg[i] += sum;
    }
}

// out (rows, OC) = inp (rows, IC) · weight (OC, IC)^T. Input row r is inp_rows[r] when inp_rows
// is given (the gathered tokens of one expert), else r. Tiled so that a block of weight rows and
// a block of input rows stay in cache while every output of the tile is computed; each output is
// one dot product in a fixed order, whatever thread computes it.
#define TILE_ROWS 16
#define TILE_OUT 64

static inline float dot_product(const float *a, const float *b, int n) {
    float sum = 0.0f;
    #pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) { sum += a[i] * b[i]; }
    return sum;
}

static inline const float *input_row(const float *inp, const int *inp_rows, int r, int IC) {
    return inp + (size_t)(inp_rows ? inp_rows[r] : r) * IC;
}

void matmul_forward(float *out, const float *inp, const int *inp_rows, const float *weight,
                    int rows, int IC, int OC) {
    int row_tiles = (rows + TILE_ROWS - 1) / TILE_ROWS, out_tiles = (OC + TILE_OUT - 1) / TILE_OUT;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int rt = 0; rt < row_tiles; rt++) {
        for (int ot = 0; ot < out_tiles; ot++) {
            int r_end = rt * TILE_ROWS + TILE_ROWS < rows ? rt * TILE_ROWS + TILE_ROWS : rows;
            int o_end = ot * TILE_OUT + TILE_OUT < OC ? ot * TILE_OUT + TILE_OUT : OC;
            for (int r = rt * TILE_ROWS; r < r_end; r++) {
                const float *x = input_row(inp, inp_rows, r, IC);
                float *y = out + (size_t)r * OC;
                for (int o = ot * TILE_OUT; o < o_end; o++) { y[o] = dot_product(weight + (size_t)o * IC, x, IC); }
            }
        }
    }
}

void matmul_backward(float *dinp, float *dweight, const float *dout, const float *inp,
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

// RoPE, rotate-half pairing: element i of a head turns with element i + hd/2 by pos·f_i.
// The table holds cos and sin for every position and frequency, computed in double.
void rope_table_init(float *cos_table, float *sin_table, int max_seq_len, int hd) {
    for (int pos = 0; pos < max_seq_len; pos++) {
        for (int i = 0; i < hd / 2; i++) {
            double freq = pow(10000.0, -2.0 * i / hd);
            double angle = pos * freq;
            cos_table[pos * (hd / 2) + i] = (float)cos(angle);
            sin_table[pos * (hd / 2) + i] = (float)sin(angle);
        }
    }
}

// Rotates one head vector by the angles of `pos`; direction -1 rotates back (the backward pass).
static void rope_rotate(float *v, const float *cos_table, const float *sin_table, int pos, int hd, float direction) {
    const float *cs = cos_table + pos * (hd / 2), *sn = sin_table + pos * (hd / 2);
    for (int i = 0; i < hd / 2; i++) {
        float a = v[i], b = v[i + hd / 2], s = direction * sn[i];
        v[i] = a * cs[i] - b * s;
        v[i + hd / 2] = b * cs[i] + a * s;
    }
}

// Rotates q and k of every head of every position (in place in qkv (N, 3C)).
void rope_forward(float *qkv, const float *cos_table, const float *sin_table, int B, int T, int C, int NH) {
    int hd = C / NH;
    #pragma omp parallel for
    for (int n = 0; n < B * T; n++) {
        for (int h = 0; h < 2 * NH; h++) {  // NH heads of q, then NH of k
            rope_rotate(qkv + (size_t)n * 3 * C + h * hd, cos_table, sin_table, n % T, hd, 1.0f);
        }
    }
}

void rope_backward(float *dqkv, const float *cos_table, const float *sin_table, int B, int T, int C, int NH) {
    int hd = C / NH;
    #pragma omp parallel for
    for (int n = 0; n < B * T; n++) {
        for (int h = 0; h < 2 * NH; h++) {
            rope_rotate(dqkv + (size_t)n * 3 * C + h * hd, cos_table, sin_table, n % T, hd, -1.0f);
        }
    }
}

// One query against n_keys keys and values (rows `stride` floats apart): writes the attention
// probabilities to probs and their weighted sum of values to out. Shared by training and sampling.
static void attend(float *out, float *probs, const float *q, const float *k, const float *v,
                   size_t stride, int n_keys, int hd) {
    float scale = 1.0f / sqrtf((float)hd);
    float maxval = -INFINITY;
    for (int j = 0; j < n_keys; j++) {
        probs[j] = dot_product(q, k + j * stride, hd) * scale;
        if (probs[j] > maxval) { maxval = probs[j]; }
    }
    float sum = 0.0f;
    for (int j = 0; j < n_keys; j++) {
        probs[j] = expf(probs[j] - maxval);
        sum += probs[j];
    }
    for (int j = 0; j < n_keys; j++) { probs[j] /= sum; }
    for (int i = 0; i < hd; i++) { out[i] = 0.0f; }
    for (int j = 0; j < n_keys; j++) {
        const float *vj = v + j * stride;
        for (int i = 0; i < hd; i++) { out[i] += probs[j] * vj[i]; }
    }
}

// Causal self-attention. qkv (B, T, 3C) -> out (B, T, C), att (B, NH, T, T) probabilities.
void attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH) {
    int hd = C / NH;
    size_t stride = 3 * (size_t)C;
    #pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            for (int h = 0; h < NH; h++) {
                const float *seq = qkv + (size_t)b * T * stride;
                attend(out + ((size_t)b * T + t) * C + h * hd, att + (((size_t)b * NH + h) * T + t) * T,
                       seq + t * stride + h * hd, seq + C + h * hd, seq + 2 * C + h * hd, stride, t + 1, hd);
            }
        }
    }
}

// The keys and values of one (b, h) receive gradient from every later query, so each thread owns
// whole (b, h) pairs and walks the queries in order.
void attention_backward(float *dqkv, float *dscores, const float *dout, const float *qkv, const float *att,
                        int B, int T, int C, int NH) {
    int hd = C / NH;
    size_t stride = 3 * (size_t)C;
    float scale = 1.0f / sqrtf((float)hd);
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            const float *seq = qkv + (size_t)b * T * stride;
            float *dseq = dqkv + (size_t)b * T * stride;
            float *ds = dscores + ((size_t)b * NH + h) * T;
            for (int t = 0; t < T; t++) {
                const float *p = att + (((size_t)b * NH + h) * T + t) * T;
                const float *dy = dout + ((size_t)b * T + t) * C + h * hd;
                const float *q = seq + t * stride + h * hd;
                float *dq = dseq + t * stride + h * hd;
                // through the weighted sum of values
                float pdp = 0.0f;
                for (int j = 0; j <= t; j++) {
                    const float *v = seq + j * stride + 2 * C + h * hd;
                    float *dv = dseq + j * stride + 2 * C + h * hd;
                    ds[j] = dot_product(dy, v, hd);
                    pdp += p[j] * ds[j];
                    for (int i = 0; i < hd; i++) { dv[i] += p[j] * dy[i]; }
                }
                // through the softmax and the scaled scores q·k
                for (int j = 0; j <= t; j++) {
                    float dscore = p[j] * (ds[j] - pdp) * scale;
                    const float *k = seq + j * stride + C + h * hd;
                    float *dk = dseq + j * stride + C + h * hd;
                    for (int i = 0; i < hd; i++) {
                        dq[i] += dscore * k[i];
                        dk[i] += dscore * q[i];
                    }
                }
            }
        }
    }
}

void residual_forward(float *out, const float *inp1, const float *inp2, int n) {
    #pragma omp parallel for
    for (int i = 0; i < n; i++) { out[i] = inp1[i] + inp2[i]; }
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

void swiglu_forward(float *out, const float *h1, const float *h3, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) { out[i] = silu(h1[i]) * h3[i]; }
}

// On entry dh1 holds the gradient of out; on exit the gradients of h1 and h3.
void swiglu_backward(float *dh1, float *dh3, const float *h1, const float *h3, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float sig = 1.0f / (1.0f + expf(-h1[i]));
        float dout = dh1[i];
        dh3[i] = dout * h1[i] * sig;
        dh1[i] = dout * h3[i] * sig * (1.0f + h1[i] * (1.0f - sig));
    }
}

// Mean cross-entropy over the first V logits; per-position losses go to token_loss.
void crossentropy_forward(float *token_loss, const float *logits, const int *targets, int N, int V) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *z = logits + (size_t)n * V;
        float maxval = -INFINITY;
        for (int i = 0; i < V; i++) { maxval = z[i] > maxval ? z[i] : maxval; }
        double sum = 0.0;
        for (int i = 0; i < V; i++) { sum += expf(z[i] - maxval); }
        token_loss[n] = (float)(log(sum) + maxval - z[targets[n]]);
    }
}

void crossentropy_backward(float *dlogits, const float *logits, const int *targets, int N, int V, float scale) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *z = logits + (size_t)n * V;
        float *dz = dlogits + (size_t)n * V;
        float maxval = -INFINITY;
        for (int i = 0; i < V; i++) { maxval = z[i] > maxval ? z[i] : maxval; }
        double sum = 0.0;
        for (int i = 0; i < V; i++) { sum += expf(z[i] - maxval); }
        float inv = (float)(1.0 / sum);
        for (int i = 0; i < V; i++) { dz[i] = scale * expf(z[i] - maxval) * inv; }
        dz[targets[n]] -= scale;
    }
}

// ----------------------------------------------------------------------------
// the MoE layer: router -> dispatch (counting sort) -> experts -> combine, plus auxiliary losses

// One layer's routing state, as views into the (L, ...) tensors.
typedef struct {
    float *logits, *drn_u, *drn_rstd, *probs, *gates;
    int *n_selected, *selected, *expert_start, *token_row;
    int row_begin;  // first expert row of this layer
} RouterView;

static RouterView router_view(Activations *a, const ModelConfig *c, int l) {
    size_t N = (size_t)a->B * a->T, E = c->num_experts;
    RouterView v;
    v.logits = a->acts.router_logits + l * N * E;
    v.drn_u = a->acts.drn_u + l * N * E;
    v.drn_rstd = a->acts.drn_rstd + l * N;
    v.probs = a->acts.probs + l * N * E;
    v.gates = a->acts.gates + l * N * E;
    v.n_selected = a->routing.n_selected + l * N;
    v.selected = a->routing.selected + l * N * E;
    v.expert_start = a->routing.expert_start + l * (E + 1);
    v.token_row = a->routing.token_row + l * N * E;
    v.row_begin = a->routing.row_offset[l];
    return v;
}

// The selection rule of the spec: experts in order of P descending (ties: lower index first);
// top-k keeps the first k, top-p keeps an expert while the probability kept before it is < p.
// Writes S in that order and returns |S|.
static int select_experts(int *selected, const float *P, int E, const RouterConfig *rc, float threshold) {
    int order[E];
    for (int e = 0; e < E; e++) {  // insertion sort, stable: equal P keep the lower index first
        int j = e;
        while (j > 0 && P[order[j - 1]] < P[e]) { order[j] = order[j - 1]; j--; }
        order[j] = e;
    }
    int count = 0;
    if (rc->routing == ROUTING_TOPK) {
        count = rc->k;
    } else {
        float kept = 0.0f;
        while (count < E && kept < threshold) { kept += P[order[count]]; count++; }
    }
    for (int j = 0; j < E; j++) { selected[j] = j < count ? order[j] : -1; }
    return count;
}

// z = Wr m; DRN; P = softmax; selection; gates.
void router_forward(RouterView r, const float *m, const float *wr, float theta, float threshold,
                    const RouterConfig *rc, int N, int C, int E) {
    matmul_forward(r.logits, m, NULL, wr, N, C, E);
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *z = r.logits + (size_t)n * E;
        float *u = r.drn_u + (size_t)n * E, *P = r.probs + (size_t)n * E;
        if (rc->drn) {  // standardize over the experts, then scale by the learned θ
            float mean = 0.0f, var = 0.0f;
            for (int e = 0; e < E; e++) { mean += z[e]; }
            mean /= E;
            for (int e = 0; e < E; e++) { var += (z[e] - mean) * (z[e] - mean); }
            float rstd = 1.0f / sqrtf(var / E + RMSNORM_EPS);
            for (int e = 0; e < E; e++) {
                u[e] = (z[e] - mean) * rstd;
                P[e] = theta * u[e];
            }
            r.drn_rstd[n] = rstd;
        } else {
            for (int e = 0; e < E; e++) { P[e] = z[e]; }
        }
        float maxval = -INFINITY, sum = 0.0f;
        for (int e = 0; e < E; e++) { maxval = P[e] > maxval ? P[e] : maxval; }
        for (int e = 0; e < E; e++) {
            P[e] = expf(P[e] - maxval);
            sum += P[e];
        }
        for (int e = 0; e < E; e++) { P[e] /= sum; }

        int *sel = r.selected + (size_t)n * E;
        float *g = r.gates + (size_t)n * E;
        int count = r.n_selected[n] = select_experts(sel, P, E, rc, threshold);
        float kept = 0.0f;
        for (int j = 0; j < count; j++) { kept += P[sel[j]]; }
        for (int j = 0; j < E; j++) { g[j] = j < count ? (rc->renorm ? P[sel[j]] / kept : P[sel[j]]) : 0.0f; }
    }
}

// Dispatch by counting sort: a histogram of the selected experts, a prefix sum giving each expert
// a contiguous block of rows, and a placement pass in token order (so rows, and every sum over
// them, come in the same order on every run). Returns the number of rows.
int moe_dispatch(RouterView r, int *row_token, int N, int E) {
    int *start = r.expert_start;
    for (int e = 0; e <= E; e++) { start[e] = 0; }
    for (int n = 0; n < N; n++) {
        for (int j = 0; j < r.n_selected[n]; j++) { start[r.selected[(size_t)n * E + j] + 1]++; }
    }
    for (int e = 0; e < E; e++) { start[e + 1] += start[e]; }
    int cursor[E];
    for (int e = 0; e < E; e++) { cursor[e] = start[e]; }
    for (int n = 0; n < N; n++) {
        for (int j = 0; j < E; j++) {
            int row = -1;
            if (j < r.n_selected[n]) {
                row = cursor[r.selected[(size_t)n * E + j]]++;
                row_token[row] = n;
            }
            r.token_row[(size_t)n * E + j] = row;
        }
    }
    return start[E];
}

// Every expert computes W2 (silu(W1 m) ⊙ W3 m) on the rows gathered for it.
// w1, w3: (E, H, C); w2: (E, C, H) of this layer; rows are relative to this layer's first row.
void experts_forward(float *out, float *h1, float *h3, float *hact, const float *m, const int *row_token,
                     const int *expert_start, const float *w1, const float *w3, const float *w2,
                     int E, int C, int H) {
    for (int e = 0; e < E; e++) {
        int first = expert_start[e], count = expert_start[e + 1] - first;
        if (count == 0) { continue; }
        matmul_forward(h1 + (size_t)first * H, m, row_token + first, w1 + (size_t)e * H * C, count, C, H);
        matmul_forward(h3 + (size_t)first * H, m, row_token + first, w3 + (size_t)e * H * C, count, C, H);
    }
    swiglu_forward(hact, h1, h3, (size_t)expert_start[E] * H);
    for (int e = 0; e < E; e++) {
        int first = expert_start[e], count = expert_start[e + 1] - first;
        if (count == 0) { continue; }
        matmul_forward(out + (size_t)first * C, hact + (size_t)first * H, NULL, w2 + (size_t)e * C * H, count, H, C);
    }
}

// din (rows, C) = gradient of the gathered inputs, one row per (token, expert) pair.
void experts_backward(float *din, float *dh1, float *dh3, float *dw1, float *dw3, float *dw2,
                      const float *dout, const float *h1, const float *h3, const float *hact,
                      const float *m, const int *row_token, const int *expert_start,
                      const float *w1, const float *w3, const float *w2, int E, int C, int H) {
    size_t rows = expert_start[E];
    memset(dh1, 0, rows * H * sizeof(float));
    memset(din, 0, rows * C * sizeof(float));
    for (int e = 0; e < E; e++) {
        int first = expert_start[e], count = expert_start[e + 1] - first;
        if (count == 0) { continue; }
        matmul_backward(dh1 + (size_t)first * H, dw2 + (size_t)e * C * H, dout + (size_t)first * C,
                        hact + (size_t)first * H, NULL, w2 + (size_t)e * C * H, count, H, C);
    }
    swiglu_backward(dh1, dh3, h1, h3, rows * H);
    for (int e = 0; e < E; e++) {
        int first = expert_start[e], count = expert_start[e + 1] - first;
        if (count == 0) { continue; }
        matmul_backward(din + (size_t)first * C, dw1 + (size_t)e * H * C, dh1 + (size_t)first * H, m,
                        row_token + first, w1 + (size_t)e * H * C, count, C, H);
        matmul_backward(din + (size_t)first * C, dw3 + (size_t)e * H * C, dh3 + (size_t)first * H, m,
                        row_token + first, w3 + (size_t)e * H * C, count, C, H);
    }
}

// MoE(m) = Σ_j g_j Expert_j(m): each token gathers its own rows, in selection order.
void moe_combine_forward(float *out, const float *expert_out, RouterView r, int N, int C, int E) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) { o[i] = 0.0f; }
        for (int j = 0; j < r.n_selected[n]; j++) {
            const float *y = expert_out + (size_t)r.token_row[(size_t)n * E + j] * C;
            float g = r.gates[(size_t)n * E + j];
            for (int i = 0; i < C; i++) { o[i] += g * y[i]; }
        }
    }
}

// dexpert_out of each row = gate · dMoE; dgates_j = <dMoE, Expert_j(m)>. Every row belongs to
// exactly one (token, choice), so each token writes only its own rows.
void moe_combine_backward(float *dexpert_out, float *dgates, const float *dout, const float *expert_out,
                          RouterView r, int N, int C, int E) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *d = dout + (size_t)n * C;
        for (int j = 0; j < E; j++) {
            dgates[(size_t)n * E + j] = 0.0f;
            if (j >= r.n_selected[n]) { continue; }
            size_t row = r.token_row[(size_t)n * E + j];
            float g = r.gates[(size_t)n * E + j];
            dgates[(size_t)n * E + j] = dot_product(d, expert_out + row * C, C);
            for (int i = 0; i < C; i++) { dexpert_out[row * C + i] = g * d[i]; }
        }
    }
}

// dm[n] += Σ_j din[row of (n, j)]: the gather that brings expert-input gradients back to tokens.
void moe_gather_rows(float *dm, const float *din, RouterView r, int N, int C, int E) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float *d = dm + (size_t)n * C;
        for (int j = 0; j < r.n_selected[n]; j++) {
            const float *g = din + (size_t)r.token_row[(size_t)n * E + j] * C;
            for (int i = 0; i < C; i++) { d[i] += g[i]; }
        }
    }
}

// Fraction of the layer's (token, expert) pairs that went to expert e: the f_e of the
// load-balance loss, a constant for the gradient.
static float expert_load_fraction(RouterView r, int e, int E) {
    int total = r.expert_start[E];
    return total > 0 ? (float)(r.expert_start[e + 1] - r.expert_start[e]) / total : 0.0f;
}

// LB = E Σ_e f_e mean_n P_e and H = mean_n(−Σ_e P_e log P_e), over the N tokens of the step.
void moe_aux_forward(float *lb, float *ent, RouterView r, int N, int E) {
    double lb_sum = 0.0, ent_sum = 0.0;
    for (int e = 0; e < E; e++) {
        double mean_p = 0.0;
        for (int n = 0; n < N; n++) { mean_p += r.probs[(size_t)n * E + e]; }
        lb_sum += expert_load_fraction(r, e, E) * mean_p / N;
    }
    for (int n = 0; n < N; n++) {
        for (int e = 0; e < E; e++) {
            float p = r.probs[(size_t)n * E + e];
            if (p > 0.0f) { ent_sum -= p * logf(p); }
        }
    }
    *lb = (float)(E * lb_sum);
    *ent = (float)(ent_sum / N);
}

// From the gradient of the gates (and the auxiliary losses, weighted by lb_scale and ent_scale)
// back to the router logits, θ and Wr. The derivation is in doc/router_backward.md.
void router_backward(float *dm, float *dwr, float *dtheta, float *drouter, float *dtheta_token,
                     const float *dgates, RouterView r, const float *m, const float *wr, float theta,
                     const RouterConfig *rc, float lb_scale, float ent_scale, int N, int C, int E) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *P = r.probs + (size_t)n * E, *g = r.gates + (size_t)n * E;
        const float *dg = dgates + (size_t)n * E;
        const int *sel = r.selected + (size_t)n * E;
        float *d = drouter + (size_t)n * E;  // dP, then dẑ, then dz, in place
        int count = r.n_selected[n];
        for (int e = 0; e < E; e++) {
            float aux = lb_scale * E * expert_load_fraction(r, e, E) / N;
            if (P[e] > 0.0f) { aux -= ent_scale * (logf(P[e]) + 1.0f) / N; }
            d[e] = aux;
        }
        if (rc->renorm) {  // g_e = P_e / Z over S: dP_e = (dg_e - Σ_j g_j dg_j) / Z
            float kept = 0.0f, gdg = 0.0f;
            for (int j = 0; j < count; j++) {
                kept += P[sel[j]];
                gdg += g[j] * dg[j];
            }
            for (int j = 0; j < count; j++) { d[sel[j]] += (dg[j] - gdg) / kept; }
        } else {
            for (int j = 0; j < count; j++) { d[sel[j]] += dg[j]; }
        }
        float pdp = 0.0f;  // softmax: dẑ = P ⊙ (dP − <P, dP>)
        for (int e = 0; e < E; e++) { pdp += P[e] * d[e]; }
        for (int e = 0; e < E; e++) { d[e] = P[e] * (d[e] - pdp); }
        if (rc->drn) {  // ẑ = θ u: dθ = <dẑ, u>; standardization: dz = (du − mean(du) − u mean(du ⊙ u)) rstd
            const float *u = r.drn_u + (size_t)n * E;
            float dth = 0.0f, mean_du = 0.0f, mean_duu = 0.0f;
            for (int e = 0; e < E; e++) {
                dth += d[e] * u[e];
                d[e] *= theta;  // du
                mean_du += d[e];
                mean_duu += d[e] * u[e];
            }
            mean_du /= E;
            mean_duu /= E;
            for (int e = 0; e < E; e++) { d[e] = (d[e] - mean_du - u[e] * mean_duu) * r.drn_rstd[n]; }
            dtheta_token[n] = dth;
        }
    }
    if (rc->drn) {
        for (int n = 0; n < N; n++) { *dtheta += dtheta_token[n]; }
    }
    matmul_backward(dm, dwr, drouter, m, NULL, wr, N, C, E);
}

// ----------------------------------------------------------------------------
// the model

typedef struct {
    ModelConfig config;
    RouterConfig router;
    ParameterTensors params;
    size_t param_sizes[NUM_PARAMETER_TENSORS];
    size_t num_parameters;
    float *params_memory;
    ParameterTensors grads;
    float *grads_memory;
    float *m_memory;      // AdamW first moment
    float *v_memory;      // AdamW second moment
    int adam_step;        // optimizer steps taken
    float *threshold;     // (L) the current p of every layer (all equal under the global controller)
    float *integral;      // (L) the controller's integral term I of every layer
    float *rope_cos;      // (max_seq_len, hd/2)
    float *rope_sin;      // (max_seq_len, hd/2)
    Activations acts;     // for the last (B, T) seen by model_forward
    const int *inputs;    // the batch of the last forward pass
    const int *targets;
    float loss;           // total loss of the last forward pass with targets
    float ce_loss;        // its cross-entropy part
} Model;

static int padded_vocab(int V) { return (V + 127) / 128 * 128; }

// Checks a configuration against what the code supports; `where` names its source in messages.
static void validate_config(const ModelConfig *c, const RouterConfig *rc, const char *where) {
    if (c->vocab_size < 2 || c->padded_vocab_size < c->vocab_size) { fail("%s: bad vocabulary size %d (padded %d)", where, c->vocab_size, c->padded_vocab_size); }
    if (c->num_layers < 1 || c->channels < 2 || c->num_heads < 1 || c->num_experts < 1 || c->expert_hidden < 1 || c->max_seq_len < 1) {
        fail("%s: sizes must be positive (L=%d C=%d NH=%d E=%d H=%d maxT=%d)", where, c->num_layers,
             c->channels, c->num_heads, c->num_experts, c->expert_hidden, c->max_seq_len);
    }
    if (c->channels % c->num_heads != 0 || (c->channels / c->num_heads) % 2 != 0) {
        fail("%s: channels (%d) must be a multiple of heads (%d) with an even head size", where, c->channels, c->num_heads);
    }
    if (c->num_experts > 4096) { fail("%s: at most 4096 experts (got %d)", where, c->num_experts); }
    if (rc->routing < 0 || rc->routing > 2) { fail("%s: unknown routing mode %d", where, rc->routing); }
    if (rc->controller != CONTROLLER_GLOBAL && rc->controller != CONTROLLER_LAYER) { fail("%s: unknown controller %d", where, rc->controller); }
    if (rc->routing == ROUTING_TOPK && (rc->k < 1 || rc->k > c->num_experts)) {
        fail("%s: top-k needs 1 <= k <= E (k=%d, E=%d)", where, rc->k, c->num_experts);
    }
    if (rc->routing == ROUTING_TOPP && !(rc->p > 0.0f && rc->p <= 1.0f)) { fail("%s: p must be in (0, 1] (got %g)", where, rc->p); }
    if (rc->routing == ROUTING_DTOPP) {
        if (!(rc->tgt >= 1.0f && rc->tgt <= c->num_experts)) { fail("%s: target must be in [1, E=%d] (got %g)", where, c->num_experts, rc->tgt); }
        if (!(rc->pmin > 0.0f && rc->pmin <= rc->pmax && rc->pmax <= 1.0f)) { fail("%s: need 0 < pmin <= pmax <= 1 (got %g, %g)", where, rc->pmin, rc->pmax); }
        if (!(rc->p0 >= rc->pmin && rc->p0 <= rc->pmax)) { fail("%s: p0 must be in [pmin, pmax] (got %g)", where, rc->p0); }
        if (!isfinite(rc->Kp) || !isfinite(rc->Ki)) { fail("%s: controller gains must be finite", where); }
    }
    if (!(rc->lb_coef >= 0.0f) || !(rc->ent_coef >= 0.0f)) { fail("%s: auxiliary loss coefficients must be >= 0", where); }
}

static void model_alloc(Model *model) {
    const ModelConfig *c = &model->config;
    fill_param_sizes(model->param_sizes, c);
    model->num_parameters = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { model->num_parameters += model->param_sizes[i]; }
    model->params_memory = (float *)calloc_check(model->num_parameters, sizeof(float));
    carve_params(&model->params, model->params_memory, model->param_sizes);
    model->grads_memory = NULL;
    model->m_memory = model->v_memory = NULL;
    model->adam_step = 0;
    model->threshold = (float *)calloc_check(c->num_layers, sizeof(float));
    model->integral = (float *)calloc_check(c->num_layers, sizeof(float));
    int hd = c->channels / c->num_heads;
    model->rope_cos = (float *)malloc_check((size_t)c->max_seq_len * (hd / 2) * sizeof(float));
    model->rope_sin = (float *)malloc_check((size_t)c->max_seq_len * (hd / 2) * sizeof(float));
    rope_table_init(model->rope_cos, model->rope_sin, c->max_seq_len, hd);
    memset(&model->acts, 0, sizeof(model->acts));
    model->loss = model->ce_loss = -1.0f;
}

// The controller's starting state: p = p0 (or the fixed p of top-p), I = 0.
static void controller_reset(Model *model) {
    const RouterConfig *rc = &model->router;
    float start = rc->routing == ROUTING_DTOPP ? rc->p0 : rc->routing == ROUTING_TOPP ? rc->p : 0.0f;
    for (int l = 0; l < model->config.num_layers; l++) {
        model->threshold[l] = start;
        model->integral[l] = 0.0f;
    }
}

// A fresh model from a seed (SPEC 5): matrices normal(0, 0.02), the output projections of each
// block (Wo, W2) scaled down by sqrt(2L), gains 1, θ = theta_init, padded vocabulary rows zero.
void model_init(Model *model, const ModelConfig *config, const RouterConfig *router, uint64_t seed) {
    model->config = *config;
    model->router = *router;
    validate_config(config, router, "model configuration");
    model_alloc(model);
    uint64_t rng = seed;
    float *p = model->params_memory;
    float residual_std = 0.02f / sqrtf(2.0f * config->num_layers);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        float std = (i == 3 || i == 9) ? residual_std : 0.02f;
        for (size_t j = 0; j < model->param_sizes[i]; j++) {
            p[j] = param_is_matrix[i] ? std * random_normal(&rng) : (i == 6 ? router->theta_init : 1.0f);
        }
        p += model->param_sizes[i];
    }
    size_t C = config->channels;
    memset(model->params.wte + (size_t)config->vocab_size * C, 0,
           (size_t)(config->padded_vocab_size - config->vocab_size) * C * sizeof(float));
    controller_reset(model);
}

void model_free(Model *model) {
    free(model->params_memory);
    free(model->grads_memory);
    free(model->m_memory);
    free(model->v_memory);
    free(model->threshold);
    free(model->integral);
    free(model->rope_cos);
    free(model->rope_sin);
    activations_free(&model->acts);
}

// The tensors of layer l (of the parameters or of their gradients).
typedef struct {
    float *g1, *wqkv, *wo, *g2, *wr, *theta, *w1, *w3, *w2;
} LayerWeights;

static LayerWeights layer_weights(const ParameterTensors *p, const ModelConfig *c, int l) {
    size_t C = c->channels, E = c->num_experts, H = c->expert_hidden;
    LayerWeights w = {p->g1 + l * C, p->wqkv + l * 3 * C * C, p->wo + l * C * C, p->g2 + l * C,
                      p->wr + l * E * C, p->theta + l, p->w1 + l * E * H * C, p->w3 + l * E * H * C,
                      p->w2 + l * E * C * H};
    return w;
}

// The MoE half of layer l: router, dispatch, experts, combine and the auxiliary terms.
// Writes MoE(m) to out (N, C).
static void moe_forward(Model *model, Activations *a, int l, float *out, const float *m) {
    const ModelConfig *c = &model->config;
    int N = a->B * a->T, C = c->channels, E = c->num_experts, H = c->expert_hidden;
    LayerWeights w = layer_weights(&model->params, c, l);
    RouterView r = router_view(a, c, l);
    router_forward(r, m, w.wr, *w.theta, model->threshold[l], &model->router, N, C, E);
    int rows = 0;
    for (int n = 0; n < N; n++) { rows += r.n_selected[n]; }
    expert_rows_reserve(&a->rows, r.row_begin + rows, C, H);  // this layer's rows follow the previous layer's
    moe_dispatch(r, a->rows.row_token + r.row_begin, N, E);
    a->routing.row_offset[l + 1] = r.row_begin + rows;
    ExpertRows *x = &a->rows;
    size_t b = r.row_begin;
    experts_forward(x->out + b * C, x->h1 + b * H, x->h3 + b * H, x->hact + b * H, m, x->row_token + b,
                    r.expert_start, w.w1, w.w3, w.w2, E, C, H);
    moe_combine_forward(out, x->out + b * C, r, N, C, E);
    moe_aux_forward(&a->acts.aux_lb[l], &a->acts.aux_ent[l], r, N, E);
}

// dm (N, C) += gradient of the MoE input, given dout (N, C), the gradient of MoE(m).
static void moe_backward(Model *model, Activations *a, int l, float *dm, const float *dout, const float *m) {
    const ModelConfig *c = &model->config;
    int N = a->B * a->T, C = c->channels, E = c->num_experts, H = c->expert_hidden, L = c->num_layers;
    LayerWeights w = layer_weights(&model->params, c, l);
    LayerWeights dw = layer_weights(&model->grads, c, l);
    RouterView r = router_view(a, c, l);
    ExpertRows *x = &a->rows;
    ExpertRowGrads *xg = &a->row_grads;
    size_t b = r.row_begin;
    expert_row_grads_reserve(xg, r.expert_start[E], C, H);
    GradActivations *g = &a->grads;
    moe_combine_backward(xg->dout, g->dgates, dout, x->out + b * C, r, N, C, E);
    experts_backward(xg->din, xg->dh1, xg->dh3, dw.w1, dw.w3, dw.w2, xg->dout, x->h1 + b * H, x->h3 + b * H,
                     x->hact + b * H, m, x->row_token + b, r.expert_start, w.w1, w.w3, w.w2, E, C, H);
    moe_gather_rows(dm, xg->din, r, N, C, E);
    const RouterConfig *rc = &model->router;
    router_backward(dm, dw.wr, dw.theta, g->drouter, g->dtheta, g->dgates, r, m, w.wr, *w.theta, rc,
                    rc->lb_coef / L, rc->ent_coef / L, N, C, E);
}

static void model_ensure_activations(Model *model, int B, int T) {
    const ModelConfig *c = &model->config;
    if (T > c->max_seq_len) { fail("sequence length %d exceeds the model's maximum %d", T, c->max_seq_len); }
    if (model->acts.acts_memory != NULL && model->acts.B == B && model->acts.T == T) { return; }
    activations_free(&model->acts);
    activations_alloc(&model->acts, c, B, T, 1);
}

// inputs, targets: (B, T) token ids; targets may be NULL (no loss). Token ids are trusted here:
// the data loader and the prompt encoder check them.
void model_forward(Model *model, const int *inputs, const int *targets, int B, int T) {
    model_ensure_activations(model, B, T);
    const ModelConfig *c = &model->config;
    int N = B * T, C = c->channels, L = c->num_layers, NH = c->num_heads, V = c->vocab_size;
    Activations *a = &model->acts;
    ActivationTensors *t = &a->acts;
    model->inputs = inputs;
    model->targets = targets;
    encoder_forward(t->encoded, inputs, model->params.wte, N, C);
    a->routing.row_offset[0] = 0;
    for (int l = 0; l < L; l++) {
        LayerWeights w = layer_weights(&model->params, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * N * C;
        float *ln1 = t->ln1 + (size_t)l * N * C, *qkv = t->qkv + (size_t)l * N * 3 * C;
        float *atty = t->atty + (size_t)l * N * C, *res1 = t->res1 + (size_t)l * N * C;
        float *ln2 = t->ln2 + (size_t)l * N * C, *res2 = t->res2 + (size_t)l * N * C;
        rmsnorm_forward(ln1, t->ln1_rstd + (size_t)l * N, x, w.g1, N, C);
        matmul_forward(qkv, ln1, NULL, w.wqkv, N, C, 3 * C);
        rope_forward(qkv, model->rope_cos, model->rope_sin, B, T, C, NH);
        attention_forward(atty, t->att + (size_t)l * B * NH * T * T, qkv, B, T, C, NH);
        matmul_forward(res1, atty, NULL, w.wo, N, C, C);  // res1 = x + Wo·atty
        residual_forward(res1, x, res1, N * C);
        rmsnorm_forward(ln2, t->ln2_rstd + (size_t)l * N, res1, w.g2, N, C);
        moe_forward(model, a, l, res2, ln2);  // res2 = res1 + MoE(ln2)
        residual_forward(res2, res1, res2, N * C);
    }
    rmsnorm_forward(t->lnf, t->lnf_rstd, t->res2 + (size_t)(L - 1) * N * C, model->params.gf, N, C);
    matmul_forward(t->logits, t->lnf, NULL, model->params.wte, N, C, V);  // tied head, first V rows only
    if (targets == NULL) {
        model->loss = model->ce_loss = -1.0f;
        return;
    }
    crossentropy_forward(t->token_loss, t->logits, targets, N, V);
    double ce = 0.0, lb = 0.0, ent = 0.0;
    for (int n = 0; n < N; n++) { ce += t->token_loss[n]; }
    for (int l = 0; l < L; l++) {
        lb += t->aux_lb[l];
        ent += t->aux_ent[l];
    }
    model->ce_loss = (float)(ce / N);
    model->loss = (float)(ce / N + model->router.lb_coef * lb / L + model->router.ent_coef * ent / L);
}

void model_zero_grad(Model *model) {
    if (model->grads_memory == NULL) {
        model->grads_memory = (float *)calloc_check(model->num_parameters, sizeof(float));
        carve_params(&model->grads, model->grads_memory, model->param_sizes);
    }
    memset(model->grads_memory, 0, model->num_parameters * sizeof(float));
}

// Gradient of the total loss of the last forward pass, accumulated into model->grads.
void model_backward(Model *model) {
    if (model->targets == NULL) { fail("model_backward needs a forward pass with targets"); }
    if (model->grads_memory == NULL) { model_zero_grad(model); }
    const ModelConfig *c = &model->config;
    Activations *a = &model->acts;
    ActivationTensors *t = &a->acts;
    GradActivations *g = &a->grads;
    int B = a->B, T = a->T, N = B * T, C = c->channels, L = c->num_layers, NH = c->num_heads;
    int V = c->vocab_size;
    ParameterTensors *dp = &model->grads;

    crossentropy_backward(g->dlogits, t->logits, model->targets, N, V, 1.0f / N);
    memset(g->dln, 0, (size_t)N * C * sizeof(float));
    matmul_backward(g->dln, dp->wte, g->dlogits, t->lnf, NULL, model->params.wte, N, C, V);
    memset(g->dresidual, 0, (size_t)N * C * sizeof(float));
    rmsnorm_backward(g->dresidual, dp->gf, g->dln, t->res2 + (size_t)(L - 1) * N * C, model->params.gf, t->lnf_rstd, N, C);
    for (int l = L - 1; l >= 0; l--) {
        LayerWeights w = layer_weights(&model->params, c, l);
        LayerWeights dw = layer_weights(dp, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * N * C;
        // dresidual holds d res2; the MoE branch adds its share of d res1
        memset(g->dln, 0, (size_t)N * C * sizeof(float));
        moe_backward(model, a, l, g->dln, g->dresidual, t->ln2 + (size_t)l * N * C);
        rmsnorm_backward(g->dresidual, dw.g2, g->dln, t->res1 + (size_t)l * N * C, w.g2, t->ln2_rstd + (size_t)l * N, N, C);
        // dresidual holds d res1; the attention branch adds its share of d x
        memset(g->datty, 0, (size_t)N * C * sizeof(float));
        matmul_backward(g->datty, dw.wo, g->dresidual, t->atty + (size_t)l * N * C, NULL, w.wo, N, C, C);
        memset(g->dqkv, 0, (size_t)N * 3 * C * sizeof(float));
        attention_backward(g->dqkv, g->dscores, g->datty, t->qkv + (size_t)l * N * 3 * C,
                           t->att + (size_t)l * B * NH * T * T, B, T, C, NH);
        rope_backward(g->dqkv, model->rope_cos, model->rope_sin, B, T, C, NH);
        memset(g->dln, 0, (size_t)N * C * sizeof(float));
        matmul_backward(g->dln, dw.wqkv, g->dqkv, t->ln1 + (size_t)l * N * C, NULL, w.wqkv, N, C, 3 * C);
        rmsnorm_backward(g->dresidual, dw.g1, g->dln, x, w.g1, t->ln1_rstd + (size_t)l * N, N, C);
    }
    encoder_backward(dp->wte, g->dresidual, model->inputs, N, C);
}

// ----------------------------------------------------------------------------
// optimization: learning-rate schedule, global-norm clipping, AdamW

// Warm-up then cosine decay to a tenth of the peak, over total_steps steps (step counts from 0).
float learning_rate(int step, int total_steps, int warmup, float peak) {
    if (step < warmup) { return peak * (step + 1) / warmup; }
    if (total_steps <= warmup) { return peak; }
    float min_lr = 0.1f * peak;
    float progress = (float)(step - warmup) / (float)(total_steps - warmup);
    return min_lr + 0.5f * (1.0f + cosf((float)M_PI * progress)) * (peak - min_lr);
}

// Sum of squares in fixed blocks, so the rounding does not depend on the number of threads.
static double sum_of_squares(const float *x, size_t n) {
    enum { BLOCK = 4096 };
    size_t blocks = (n + BLOCK - 1) / BLOCK;
    double *partial = (double *)malloc_check(blocks * sizeof(double));
    #pragma omp parallel for
    for (size_t b = 0; b < blocks; b++) {
        double s = 0.0;
        size_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        for (size_t i = b * BLOCK; i < end; i++) { s += (double)x[i] * x[i]; }
        partial[b] = s;
    }
    double total = 0.0;
    for (size_t b = 0; b < blocks; b++) { total += partial[b]; }
    free(partial);
    return total;
}

// Clips the gradient to global norm 1 and takes one AdamW step. Returns the norm before clipping.
float model_update(Model *model, float lr, float weight_decay) {
    const float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
    if (model->m_memory == NULL) {
        model->m_memory = (float *)calloc_check(model->num_parameters, sizeof(float));
        model->v_memory = (float *)calloc_check(model->num_parameters, sizeof(float));
    }
    float norm = (float)sqrt(sum_of_squares(model->grads_memory, model->num_parameters));
    float clip = norm > 1.0f ? 1.0f / norm : 1.0f;
    model->adam_step++;
    float bias1 = 1.0f - powf(beta1, (float)model->adam_step);
    float bias2 = 1.0f - powf(beta2, (float)model->adam_step);
    size_t offset = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        float wd = param_is_matrix[k] ? weight_decay : 0.0f;
        size_t end = offset + model->param_sizes[k];
        #pragma omp parallel for
        for (size_t i = offset; i < end; i++) {
            float grad = model->grads_memory[i] * clip;
            float m = model->m_memory[i] = beta1 * model->m_memory[i] + (1.0f - beta1) * grad;
            float v = model->v_memory[i] = beta2 * model->v_memory[i] + (1.0f - beta2) * grad * grad;
            float w = model->params_memory[i];
            model->params_memory[i] = w - lr * ((m / bias1) / (sqrtf(v / bias2) + eps) + wd * w);
        }
        offset = end;
    }
    return norm;
}

// ----------------------------------------------------------------------------
// routing statistics and the PI controller

// Mean |S| of every layer in the last forward pass.
static void activated_per_layer(const Model *model, double *activated) {
    const Activations *a = &model->acts;
    int N = a->B * a->T;
    for (int l = 0; l < model->config.num_layers; l++) {
        long total = 0;
        for (int n = 0; n < N; n++) { total += a->routing.n_selected[(size_t)l * N + n]; }
        activated[l] = (double)total / N;
    }
}

// a_t of the last forward pass: mean |S| over its tokens and layers.
double model_activated(const Model *model) {
    int L = model->config.num_layers;
    double activated[L], mean = 0.0;
    activated_per_layer(model, activated);
    for (int l = 0; l < L; l++) { mean += activated[l] / L; }
    return mean;
}

// Once per optimizer step, after the backward pass: moves p toward the threshold that activates
// tgt experts per token on average. e = (tgt − a)/E; I' = I + e; p' = p0 + Kp e + Ki I'; while p'
// is outside [pmin, pmax] p is clamped and I is left as it was (no wind-up while saturated).
// The global controller feeds every layer the same a, so every layer keeps the same p and I.
void controller_update(Model *model) {
    const RouterConfig *rc = &model->router;
    if (rc->routing != ROUTING_DTOPP) { return; }
    int L = model->config.num_layers;
    double activated[L], global = model_activated(model);
    activated_per_layer(model, activated);
    for (int l = 0; l < L; l++) {
        double a = rc->controller == CONTROLLER_GLOBAL ? global : activated[l];
        double error = (rc->tgt - a) / model->config.num_experts;
        double integral = (double)model->integral[l] + error;
        double p = (double)rc->p0 + rc->Kp * error + rc->Ki * integral;
        if (p >= rc->pmin && p <= rc->pmax) {
            model->threshold[l] = (float)p;
            model->integral[l] = (float)integral;
        } else {
            model->threshold[l] = p < rc->pmin ? rc->pmin : rc->pmax;
        }
    }
}

// What SPEC section 6 asks every implementation to report, for the last forward pass.
typedef struct {
    double activated;         // a_t: mean |S| over tokens and layers
    double *layer_mean;       // (L) mean |S|
    double *layer_std;        // (L) population standard deviation of |S|
    int *histogram;           // (L, E + 1) tokens with |S| = 0..E
    int *load_min, *load_max; // (L) tokens per expert
    double *load_cv;          // (L) coefficient of variation of tokens per expert
} RoutingStats;

void routing_stats_alloc(RoutingStats *s, const ModelConfig *c) {
    int L = c->num_layers, E = c->num_experts;
    s->layer_mean = (double *)calloc_check(L, sizeof(double));
    s->layer_std = (double *)calloc_check(L, sizeof(double));
    s->histogram = (int *)calloc_check((size_t)L * (E + 1), sizeof(int));
    s->load_min = (int *)calloc_check(L, sizeof(int));
    s->load_max = (int *)calloc_check(L, sizeof(int));
    s->load_cv = (double *)calloc_check(L, sizeof(double));
}

void routing_stats_free(RoutingStats *s) {
    free(s->layer_mean);
    free(s->layer_std);
    free(s->histogram);
    free(s->load_min);
    free(s->load_max);
    free(s->load_cv);
}

void routing_stats_compute(RoutingStats *s, const Model *model) {
    const Activations *a = &model->acts;
    int N = a->B * a->T, L = model->config.num_layers, E = model->config.num_experts;
    s->activated = 0.0;
    for (int l = 0; l < L; l++) {
        const int *count = a->routing.n_selected + (size_t)l * N;
        int *hist = s->histogram + (size_t)l * (E + 1);
        memset(hist, 0, (E + 1) * sizeof(int));
        double sum = 0.0, sumsq = 0.0;
        for (int n = 0; n < N; n++) {
            sum += count[n];
            sumsq += (double)count[n] * count[n];
            hist[count[n]]++;
        }
        s->layer_mean[l] = sum / N;
        double var = sumsq / N - s->layer_mean[l] * s->layer_mean[l];
        s->layer_std[l] = var > 0.0 ? sqrt(var) : 0.0;
        s->activated += s->layer_mean[l] / L;
        const int *start = a->routing.expert_start + (size_t)l * (E + 1);
        double lsum = 0.0, lsumsq = 0.0;
        s->load_min[l] = N;
        s->load_max[l] = 0;
        for (int e = 0; e < E; e++) {
            int load = start[e + 1] - start[e];
            s->load_min[l] = load < s->load_min[l] ? load : s->load_min[l];
            s->load_max[l] = load > s->load_max[l] ? load : s->load_max[l];
            lsum += load;
            lsumsq += (double)load * load;
        }
        double lmean = lsum / E, lvar = lsumsq / E - lmean * lmean;
        s->load_cv[l] = lmean > 0.0 && lvar > 0.0 ? sqrt(lvar) / lmean : 0.0;
    }
}

// ----------------------------------------------------------------------------
// model checkpoints (doc/formats.md): architecture, routing configuration, parameters, controller

#define MODEL_MAGIC 20251213
#define MODEL_VERSION 1

void model_save(const Model *model, const char *path) {
    const ModelConfig *c = &model->config;
    const RouterConfig *rc = &model->router;
    int32_t header[HEADER_WORDS] = {0};
    header[0] = MODEL_MAGIC;
    header[1] = MODEL_VERSION;
    header[2] = c->max_seq_len;
    header[3] = c->vocab_size;
    header[4] = c->padded_vocab_size;
    header[5] = c->num_layers;
    header[6] = c->num_heads;
    header[7] = c->channels;
    header[8] = c->num_experts;
    header[9] = c->expert_hidden;
    header[10] = rc->routing;
    header[11] = rc->controller;
    header[12] = rc->drn;
    header[13] = rc->renorm;
    header[14] = rc->k;
    const float floats[] = {rc->tgt, rc->Kp, rc->Ki, rc->p0, rc->pmin, rc->pmax, rc->theta_init, rc->lb_coef, rc->ent_coef, rc->p};
    for (int i = 0; i < (int)(sizeof(floats) / sizeof(floats[0])); i++) { header_set_float(header, 32 + i, floats[i]); }
    char tmp[4096];
    FILE *f = open_for_atomic_write(path, tmp, sizeof(tmp));
    fwrite_check(header, sizeof(int32_t), HEADER_WORDS, f, tmp);
    fwrite_check(model->params_memory, sizeof(float), model->num_parameters, f, tmp);
    fwrite_check(model->threshold, sizeof(float), c->num_layers, f, tmp);
    fwrite_check(model->integral, sizeof(float), c->num_layers, f, tmp);
    finish_atomic_write(f, tmp, path);
}

void model_load(Model *model, const char *path) {
    int32_t header[HEADER_WORDS];
    long size;
    FILE *f = open_with_header(path, header, MODEL_MAGIC, MODEL_VERSION, "model checkpoint", &size);
    ModelConfig *c = &model->config;
    RouterConfig *rc = &model->router;
    c->max_seq_len = header[2];
    c->vocab_size = header[3];
    c->padded_vocab_size = header[4];
    c->num_layers = header[5];
    c->num_heads = header[6];
    c->channels = header[7];
    c->num_experts = header[8];
    c->expert_hidden = header[9];
    rc->routing = header[10];
    rc->controller = header[11];
    rc->drn = header[12];
    rc->renorm = header[13];
    rc->k = header[14];
    float *fields[] = {&rc->tgt, &rc->Kp, &rc->Ki, &rc->p0, &rc->pmin, &rc->pmax, &rc->theta_init, &rc->lb_coef, &rc->ent_coef, &rc->p};
    for (int i = 0; i < (int)(sizeof(fields) / sizeof(fields[0])); i++) { *fields[i] = header_float(header, 32 + i); }
    validate_config(c, rc, path);
    size_t sizes[NUM_PARAMETER_TENSORS], num_params = 0;
    fill_param_sizes(sizes, c);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { num_params += sizes[i]; }
    check_payload_size(path, size, (num_params + 2 * (size_t)c->num_layers) * sizeof(float));
    model_alloc(model);
    fread_check(model->params_memory, sizeof(float), model->num_parameters, f, path);
    fread_check(model->threshold, sizeof(float), c->num_layers, f, path);
    fread_check(model->integral, sizeof(float), c->num_layers, f, path);
    fclose(f);
    for (size_t i = 0; i < model->num_parameters; i++) {
        if (!isfinite(model->params_memory[i])) { fail("%s: parameter %zu is not finite", path, i); }
    }
}

// ----------------------------------------------------------------------------
// sampling: the same layers, one new position at a time, attending to cached keys and values

typedef struct {
    Activations acts;  // B = 1, T = 1
    float *kv_cache;   // (L, max_seq_len, 3C) q, k, v of every position so far (RoPE applied)
    float *scores;     // (max_seq_len) attention probabilities of the current query
} Decoder;

void decoder_init(Decoder *d, const Model *model) {
    const ModelConfig *c = &model->config;
    activations_alloc(&d->acts, c, 1, 1, 0);
    d->kv_cache = (float *)malloc_check((size_t)c->num_layers * c->max_seq_len * 3 * c->channels * sizeof(float));
    d->scores = (float *)malloc_check((size_t)c->max_seq_len * sizeof(float));
}

void decoder_free(Decoder *d) {
    activations_free(&d->acts);
    free(d->kv_cache);
    free(d->scores);
}

// Feeds `token` at position `pos` (all earlier positions must have been fed) and returns the
// logits (V) for the next token.
const float *decoder_step(Model *model, Decoder *d, int token, int pos) {
    const ModelConfig *c = &model->config;
    int C = c->channels, L = c->num_layers, NH = c->num_heads, hd = C / NH, V = c->vocab_size;
    if (pos >= c->max_seq_len) { fail("position %d exceeds the model's maximum sequence length %d", pos, c->max_seq_len); }
    ActivationTensors *t = &d->acts.acts;
    encoder_forward(t->encoded, &token, model->params.wte, 1, C);
    d->acts.routing.row_offset[0] = 0;
    for (int l = 0; l < L; l++) {
        LayerWeights w = layer_weights(&model->params, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * C;
        float *ln1 = t->ln1 + (size_t)l * C, *atty = t->atty + (size_t)l * C;
        float *res1 = t->res1 + (size_t)l * C, *ln2 = t->ln2 + (size_t)l * C, *res2 = t->res2 + (size_t)l * C;
        float *cache = d->kv_cache + (size_t)l * c->max_seq_len * 3 * C;
        float *qkv = cache + (size_t)pos * 3 * C;
        rmsnorm_forward(ln1, t->ln1_rstd + l, x, w.g1, 1, C);
        matmul_forward(qkv, ln1, NULL, w.wqkv, 1, C, 3 * C);
        for (int h = 0; h < 2 * NH; h++) { rope_rotate(qkv + h * hd, model->rope_cos, model->rope_sin, pos, hd, 1.0f); }
        for (int h = 0; h < NH; h++) {
            attend(atty + h * hd, d->scores, qkv + h * hd, cache + C + h * hd, cache + 2 * C + h * hd, 3 * (size_t)C, pos + 1, hd);
        }
        matmul_forward(res1, atty, NULL, w.wo, 1, C, C);
        residual_forward(res1, x, res1, C);
        rmsnorm_forward(ln2, t->ln2_rstd + l, res1, w.g2, 1, C);
        moe_forward(model, &d->acts, l, res2, ln2);
        residual_forward(res2, res1, res2, C);
    }
    rmsnorm_forward(t->lnf, t->lnf_rstd, t->res2 + (size_t)(L - 1) * C, model->params.gf, 1, C);
    matmul_forward(t->logits, t->lnf, NULL, model->params.wte, 1, C, V);
    return t->logits;
}

// Draws a token from softmax(logits / temperature) restricted to the top_k most likely tokens
// (top_k <= 0: all); temperature 0 picks the most likely token.
int sample_token(const float *logits, int V, float temperature, int top_k, uint64_t *rng) {
    int best = 0;
    for (int i = 1; i < V; i++) { best = logits[i] > logits[best] ? i : best; }
    if (temperature <= 0.0f) { return best; }
    // the k-th largest logit is the cut-off; ties at the cut-off are all kept
    float cutoff = -INFINITY;
    if (top_k > 0 && top_k < V) {
        float *sorted = (float *)malloc_check((size_t)V * sizeof(float));
        memcpy(sorted, logits, (size_t)V * sizeof(float));
        for (int k = 0; k < top_k; k++) {  // partial selection sort: k passes over V
            int m = k;
            for (int i = k + 1; i < V; i++) { m = sorted[i] > sorted[m] ? i : m; }
            float tmp = sorted[k];
            sorted[k] = sorted[m];
            sorted[m] = tmp;
        }
        cutoff = sorted[top_k - 1];
        free(sorted);
    }
    double sum = 0.0;
    for (int i = 0; i < V; i++) {
        if (logits[i] >= cutoff) { sum += exp((logits[i] - logits[best]) / temperature); }
    }
    double r = random_f32(rng) * sum, acc = 0.0;
    int last = best;
    for (int i = 0; i < V; i++) {
        if (logits[i] < cutoff) { continue; }
        acc += exp((logits[i] - logits[best]) / temperature);
        last = i;
        if (acc > r) { return i; }
    }
    return last;
}

// ----------------------------------------------------------------------------
// results of the last forward/backward pass, copied out (the CUDA twin copies them from the
// device): what tests and tools read

void model_get_logits(const Model *model, float *out) {  // (N, V)
    memcpy(out, model->acts.acts.logits, (size_t)model->acts.B * model->acts.T * model->config.vocab_size * sizeof(float));
}

void model_get_losses(const Model *model, float *out) {  // total, CE, LB_l for each l, H_l for each l
    int L = model->config.num_layers;
    out[0] = model->loss;
    out[1] = model->ce_loss;
    memcpy(out + 2, model->acts.acts.aux_lb, L * sizeof(float));
    memcpy(out + 2 + L, model->acts.acts.aux_ent, L * sizeof(float));
}

// n_selected (L, N), selected (L, N, E), gates (L, N, E), as in the reference fixtures.
void model_get_routing(const Model *model, int *n_selected, int *selected, float *gates) {
    size_t LN = (size_t)model->config.num_layers * model->acts.B * model->acts.T, E = model->config.num_experts;
    memcpy(n_selected, model->acts.routing.n_selected, LN * sizeof(int));
    memcpy(selected, model->acts.routing.selected, LN * E * sizeof(int));
    memcpy(gates, model->acts.acts.gates, LN * E * sizeof(float));
}

void model_get_grads(const Model *model, float *out) {
    memcpy(out, model->grads_memory, model->num_parameters * sizeof(float));
}

void model_get_params(const Model *model, float *out) {
    memcpy(out, model->params_memory, model->num_parameters * sizeof(float));
}

void model_get_thresholds(const Model *model, float *out) {  // (L) the current p of every layer
    memcpy(out, model->threshold, model->config.num_layers * sizeof(float));
}

void set_num_threads(int threads) {
#ifdef _OPENMP
    if (threads > 0) { omp_set_num_threads(threads); }
#else
    (void)threads;
#endif
}
