/*
train_dtopp.c: training a DTop-p Mixture-of-Experts language model in plain C.

DTop-p (dynamic top-p) routing sends each token to experts in order of router probability until
their cumulative probability passes a threshold p, so confident tokens use few experts and
uncertain ones many. A PI controller moves p between steps so that the average number of
activated experts per token converges to a target budget, and Dynamic Routing Normalization
(DRN: a learnable per-layer scale on standardized router logits) lets layers differ under the one
threshold. The function computed here is specified exactly in doc/spec.md; doc/formats.md
describes every file this program reads or writes.

The file has three parts, and this is the contract between them and train_dtopp.cu:
  1. The shared part (up to `#ifndef DTOPP_CUDA`): configuration, the parameter layout, the views
     the layer functions take (LayerWeights, RouterView, ExpertView), the model API (Model and the
     model_* and decoder_* functions, declared here, defined by each build), and what both builds
     compute the same way on the host: initialisation, the learning-rate schedule, the AdamW rule,
     the PI controller, routing statistics, checkpoint files and token sampling. Errors and file
     headers come from utils.h.
  2. The CPU implementation (`#ifndef DTOPP_CUDA` to `#endif`): activations, the layers as
     forward/backward pairs, the MoE layer (DRN, router, auxiliary losses, dispatch, experts,
     combine), the model's forward and backward passes, AdamW, the sampler's KV cache; it defines
     the model API.
  3. The training program (`#ifndef TESTING` to the end): it uses the shared part and the model
     API, nothing else.
train_dtopp.cu defines DTOPP_CUDA, includes this file (parts 1 and 3) and defines the model API and
the same layer functions on a GPU; doc/tour.md is the reading guide.

Determinism: every parallel loop writes disjoint outputs and every reduction runs in a fixed
order, so results are bitwise identical for any number of threads.
*/
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <float.h>
#include <glob.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "utils.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

// ----------------------------------------------------------------------------
// utilities: errors and files come from utils.h; here, random numbers and the clock

static float random_f32(uint64_t *state) {  // uniform in [0, 1)
    return (random_u64(state) >> 40) * (1.0f / 16777216.0f);
}
static float random_normal(uint64_t *state) {  // Box-Muller
    double u1 = ((random_u64(state) >> 11) + 1.0) / 9007199254740993.0;  // (0, 1]
    double u2 = (random_u64(state) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}

static inline double wall_seconds(void) {
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
    int vocab_kind;         // VOCAB_*: what the tokens are (GPT-2 tokens, bytes, a trained BPE)
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

// The epsilons of the two normalizations (doc/spec.md, sections 1 and 2).
#define RMSNORM_EPS 1e-5f
#define DRN_EPS 1e-5f

static inline int padded_vocab(int V) { return (V + 127) / 128 * 128; }

// For files written before the vocabulary kind was stored: the two vocabularies the project had.
static int vocab_kind_of_size(int V) {
    return V == 256 ? VOCAB_BYTES : V == 50257 ? VOCAB_GPT2 : VOCAB_UNKNOWN;
}

// Bounds on the sizes of a configuration. A checkpoint's header could declare anything; with every
// size bounded and the parameter count computed in checked arithmetic, no product of sizes
// overflows (e.g. a header whose parameter count wraps around 2^64 to a small number).
#define MAX_SIZE (1 << 20)            // L, C, NH, H, V, max_seq_len
#define MAX_EXPERTS 4096
#define MAX_PARAMETERS (1ull << 36)   // 256 GiB of float32

// a * b, or fail when it exceeds MAX_PARAMETERS (a, b <= MAX_PARAMETERS, so a * b fits 64 bits)
static unsigned long long bounded_product(unsigned long long a, unsigned long long b, const char *where) {
    if (a > MAX_PARAMETERS || b > MAX_PARAMETERS || (b != 0 && a > MAX_PARAMETERS / b)) {
        fail("%s: the model would have more than %llu parameters", where, MAX_PARAMETERS);
    }
    return a * b;
}

// The parameter count of a configuration whose sizes are within bounds, checked against
// MAX_PARAMETERS: L (3C^2 + C^2 + 2C + EC + 1 + 3EHC) + Vp C + C.
static void check_parameter_count(const ModelConfig *c, const char *where) {
    unsigned long long L = c->num_layers, C = c->channels, E = c->num_experts, H = c->expert_hidden;
    unsigned long long experts = bounded_product(bounded_product(3 * E, H, where), C, where);
    unsigned long long per_layer = bounded_product(4 * C, C, where) + 2 * C + E * C + 1 + experts;
    unsigned long long embedding = bounded_product(c->padded_vocab_size, C, where);
    unsigned long long total = bounded_product(L, per_layer, where) + embedding + C;
    if (total > MAX_PARAMETERS) {
        fail("%s: the model would have more than %llu parameters", where, MAX_PARAMETERS);
    }
}

static int in_range(int value, int lo, int hi) { return value >= lo && value <= hi; }

static void validate_sizes(const ModelConfig *c, const char *where) {
    if (!in_range(c->vocab_size, 2, MAX_SIZE) || c->padded_vocab_size != padded_vocab(c->vocab_size)) {
        fail("%s: bad vocabulary size %d (padded %d; must be in [2, %d], padded to a multiple of 128)", where,
             c->vocab_size, c->padded_vocab_size, MAX_SIZE);
    }
    if (!in_range(c->num_layers, 1, MAX_SIZE) || !in_range(c->channels, 2, MAX_SIZE) ||
        !in_range(c->num_heads, 1, MAX_SIZE) || !in_range(c->num_experts, 1, MAX_EXPERTS) ||
        !in_range(c->expert_hidden, 1, MAX_SIZE) || !in_range(c->max_seq_len, 1, MAX_SIZE)) {
        fail(
            "%s: sizes must be positive, at most %d experts and %d otherwise (L=%d C=%d NH=%d E=%d H=%d "
            "maxT=%d)",
            where, MAX_EXPERTS, MAX_SIZE, c->num_layers, c->channels, c->num_heads, c->num_experts,
            c->expert_hidden, c->max_seq_len);
    }
    if (c->channels % c->num_heads != 0 || (c->channels / c->num_heads) % 2 != 0) {
        fail("%s: channels (%d) must be a multiple of heads (%d) with an even head size", where, c->channels,
             c->num_heads);
    }
    if (!in_range(c->vocab_kind, VOCAB_UNKNOWN, VOCAB_BPE)) {
        fail("%s: unknown vocabulary kind %d", where, c->vocab_kind);
    }
    check_parameter_count(c, where);
}

// Checks a configuration against what the code supports; `where` names its source in messages.
static void validate_config(const ModelConfig *c, const RouterConfig *rc, const char *where) {
    validate_sizes(c, where);
    if (!in_range(rc->routing, 0, 2)) { fail("%s: unknown routing mode %d", where, rc->routing); }
    if (!in_range(rc->controller, CONTROLLER_GLOBAL, CONTROLLER_LAYER)) {
        fail("%s: unknown controller %d", where, rc->controller);
    }
    if (!in_range(rc->drn, 0, 1) || !in_range(rc->renorm, 0, 1)) {
        fail("%s: drn and renorm must be 0 or 1 (got %d, %d)", where, rc->drn, rc->renorm);
    }
    if (rc->routing == ROUTING_TOPK && (rc->k < 1 || rc->k > c->num_experts)) {
        fail("%s: top-k needs 1 <= k <= E (k=%d, E=%d)", where, rc->k, c->num_experts);
    }
    if (rc->routing == ROUTING_TOPP && !(rc->p > 0.0f && rc->p <= 1.0f)) {
        fail("%s: p must be in (0, 1] (got %g)", where, rc->p);
    }
    if (rc->routing == ROUTING_DTOPP) {
        if (!(rc->tgt >= 1.0f && rc->tgt <= c->num_experts)) {
            fail("%s: target must be in [1, E=%d] (got %g)", where, c->num_experts, rc->tgt);
        }
        if (!(rc->pmin > 0.0f && rc->pmin <= rc->pmax && rc->pmax <= 1.0f)) {
            fail("%s: need 0 < pmin <= pmax <= 1 (got %g, %g)", where, rc->pmin, rc->pmax);
        }
        if (!(rc->p0 >= rc->pmin && rc->p0 <= rc->pmax)) {
            fail("%s: p0 must be in [pmin, pmax] (got %g)", where, rc->p0);
        }
        if (!isfinite(rc->Kp) || !isfinite(rc->Ki)) { fail("%s: controller gains must be finite", where); }
    }
    if (!isfinite(rc->theta_init)) {
        fail("%s: the initial DRN scale must be finite (got %g)", where, rc->theta_init);
    }
    if (!(rc->lb_coef >= 0.0f && isfinite(rc->lb_coef)) ||
        !(rc->ent_coef >= 0.0f && isfinite(rc->ent_coef))) {
        fail("%s: auxiliary loss coefficients must be finite and >= 0 (got %g, %g)", where, rc->lb_coef,
             rc->ent_coef);
    }
}

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

enum {
    PARAM_WTE,
    PARAM_G1,
    PARAM_WQKV,
    PARAM_WO,
    PARAM_G2,
    PARAM_WR,
    PARAM_THETA,
    PARAM_W1,
    PARAM_W3,
    PARAM_W2,
    PARAM_GF
};
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

// The tensors of layer l (of the parameters or of their gradients).
typedef struct {
    float *g1, *wqkv, *wo, *g2, *wr, *theta, *w1, *w3, *w2;
} LayerWeights;

static LayerWeights layer_weights(const ParameterTensors *t, const ModelConfig *c, int l) {
    size_t C = c->channels, E = c->num_experts, H = c->expert_hidden;
    LayerWeights w = {t->g1 + l * C, t->wqkv + l * 3 * C * C, t->wo + l * C * C, t->g2 + l * C,
                      t->wr + l * E * C, t->theta + l, t->w1 + l * E * H * C, t->w3 + l * E * H * C,
                      t->w2 + l * E * C * H};
    return w;
}

// The views the MoE layer's functions take: one layer's routing state and its expert rows, as
// pointers into the (L, ...) tensors of either implementation. A field marked "GPU" is scratch
// that only train_dtopp.cu uses (NULL on the CPU); both builds pass the same structs so that the
// functions of the two have the same arguments.
typedef struct {
    float *logits;       // (N, E) z = Wr m
    float *drn_u;        // (N, E) standardized logits u (DRN)
    float *drn_rstd;     // (N) 1 / sqrt(var(z) + DRN_EPS)
    float *probs;        // (N, E) router probabilities P
    float *gates;        // (N, E) gates of the selected experts, in selection order
    int *n_selected;     // (N) |S| of every token
    int *selected;       // (N, E) the experts of S in selection order, -1 after the last
    int *expert_start;   // (E + 1) the rows of expert e are expert_start[e] .. expert_start[e+1]-1
    int *token_row;      // (N, E) the expert row of choice j of token n, -1 if none
    int row_begin;       // first expert row of this layer, in the rows of all layers
    float *dgates;       // (N, E) gradient of each selected gate (backward only)
    float *drouter;      // (N, E) gradient of P, then of ẑ, then of z (backward only)
    float *dtheta_token; // (N) each token's share of dθ, summed in order afterwards (backward only)
    const int *expert_start_host;  // GPU: (E + 1) host copy of expert_start, the products' sizes
    int *dispatch_choice;          // GPU: (N, E) counting-sort scratch
    int *dispatch_counts;          // GPU: (chunks, E) counting-sort scratch
    double *sums;                  // GPU: (E + 1) reduction scratch of the auxiliary losses
} RouterView;

typedef struct {
    int *row_token;  // (R) the token each row was gathered from
    float *h1;       // (R, H) W1 m
    float *h3;       // (R, H) W3 m
    float *hact;     // (R, H) silu(h1) * h3
    float *out;      // (R, C) Expert_e(m)
    float *dout;     // (R, C) gradient of out (backward only)
    float *dh1;      // (R, H) gradient of h1, which first holds that of hact (backward only)
    float *dh3;      // (R, H) gradient of h3 (backward only)
    float *din;      // (R, C) gradient of each row's gathered input (backward only)
    float *xg;       // GPU: (R, C) the gathered inputs, contiguous for the products
    void **gemm_host, **gemm_dev;  // GPU: operand pointers of grouped products
} ExpertView;

// ----------------------------------------------------------------------------
// activations: what the forward pass keeps for the backward pass. Both builds keep the same
// tensors (host memory here, GPU memory in train_dtopp.cu), each allocated in one buffer per kind;
// N = B*T token positions.

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
    float *logits;         // (N, V); the GPU pads each row to Vp, so rows stay aligned
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
} RoutingTensors;
#define NUM_ROUTING_TENSORS 4

// Dropless routing makes the number of (token, expert) pairs vary from step to step, so the
// per-pair activations live in arrays that grow when a step routes more pairs than any before.
typedef struct {
    int capacity;     // rows allocated
    int *row_token;   // (R) the token each row was gathered from
    float *h1;        // (R, H) W1 m
    float *h3;        // (R, H) W3 m (on the GPU, capacity rows after h1 in one allocation)
    float *hact;      // (R, H) silu(h1) * h3
    float *out;       // (R, C) Expert_e(m)
} ExpertRows;

// Gradient scratch: one layer at a time, so no (L, ...) dimension.
typedef struct {
    float *dresidual;  // (N, C) gradient along the residual stream
    float *dln;        // (N, C) gradient at a norm's output
    float *datty;      // (N, C)
    float *dqkv;       // (N, 3C)
    float *dscores;    // GPU: (B, NH, T, T) gradient of the attention probabilities, then of the scores
                       // (NULL on the CPU, whose attention_backward needs one block of it per thread)
    float *dlogits;    // (N, V), padded to Vp on the GPU
    float *dgates;     // (N, E) gradient of each selected gate
    float *drouter;    // (N, E) gradient of the router logits z
    float *dtheta;     // (N) each token's share of dθ, summed in order afterwards
} GradActivations;
#define NUM_GRAD_ACTIVATION_TENSORS 9

typedef struct {
    int capacity;
    float *dout;   // (R, C) gradient of Expert_e(m)
    float *dh1;    // (R, H) gradient of h1 (first holds the gradient of hact)
    float *dh3;    // (R, H) (on the GPU, capacity rows after dh1 in one allocation)
    float *din;    // (R, C) gradient of the gathered input m
} ExpertRowGrads;

typedef struct DeviceScratch DeviceScratch;  // what only train_dtopp.cu needs: it defines it

typedef struct {
    int B, T;
    ActivationTensors acts;
    float *acts_memory;
    RoutingTensors routing;
    int *routing_memory;
    int *row_offset;      // (L + 1) host: layer l owns the expert rows row_offset[l] .. row_offset[l+1]-1
    ExpertRows rows;
    ExpertRowGrads row_grads;
    GradActivations grads;
    float *grads_memory;  // NULL when only the forward pass is needed
    DeviceScratch *device;  // GPU: streams' scratch, host copies, the batch on the device (NULL here)
} Activations;

// The views of layer l for the MoE functions (the fields both builds fill).
static RouterView router_view(Activations *a, const ModelConfig *c, int l) {
    size_t N = (size_t)a->B * a->T, E = c->num_experts;
    RouterView v = {0};
    v.logits = a->acts.router_logits + l * N * E;
    v.drn_u = a->acts.drn_u + l * N * E;
    v.drn_rstd = a->acts.drn_rstd + l * N;
    v.probs = a->acts.probs + l * N * E;
    v.gates = a->acts.gates + l * N * E;
    v.n_selected = a->routing.n_selected + l * N;
    v.selected = a->routing.selected + l * N * E;
    v.expert_start = a->routing.expert_start + l * (E + 1);
    v.token_row = a->routing.token_row + l * N * E;
    v.row_begin = a->row_offset[l];
    v.dgates = a->grads.dgates;
    v.drouter = a->grads.drouter;
    v.dtheta_token = a->grads.dtheta;
    return v;
}

// This layer's rows: they follow the previous layer's in a->rows; the gradient scratch holds one
// layer at a time.
static ExpertView expert_view(Activations *a, const ModelConfig *c, RouterView r) {
    size_t first_row = r.row_begin, C = c->channels, H = c->expert_hidden;
    ExpertView x = {0};
    x.row_token = a->rows.row_token + first_row;
    x.h1 = a->rows.h1 + first_row * H;
    x.h3 = a->rows.h3 + first_row * H;
    x.hact = a->rows.hact + first_row * H;
    x.out = a->rows.out + first_row * C;
    x.dout = a->row_grads.dout;
    x.dh1 = a->row_grads.dh1;
    x.dh3 = a->row_grads.dh3;
    x.din = a->row_grads.din;
    return x;
}

// ----------------------------------------------------------------------------
// the model: its state, and the functions every implementation provides (the CPU section of this
// file, and train_dtopp.cu on the GPU). The training program at the end uses nothing else.

typedef struct Workspace Workspace;  // activations and scratch: each implementation defines its own

typedef struct {
    ModelConfig config;
    RouterConfig router;
    size_t param_sizes[NUM_PARAMETER_TENSORS];
    size_t num_parameters;
    float *params_memory;  // on the computing device: host memory here, GPU memory in the CUDA twin
    ParameterTensors params;
    float *grads_memory;   // same device; allocated by the first model_zero_grad
    ParameterTensors grads;
    float *grads_sum_memory;  // same device: gradient accumulation's running sum (NULL until used)
    float *m_memory;       // AdamW first moment, same device
    float *v_memory;       // AdamW second moment
    int adam_step;         // optimizer steps taken
    float *threshold;      // (L) host: the current p of every layer (all equal under the global controller)
    float *integral;       // (L) host: the controller's integral term I of every layer
    int B, T;              // shape of the last forward pass
    float loss;            // total loss of the last forward pass with targets, -1 without targets
    float ce_loss;         // its cross-entropy part
    Workspace *ws;
} Model;

typedef struct Decoder Decoder;  // sampling: a cache of keys and values, one position's activations

// What section 6 of doc/spec.md asks every implementation to report, for the last forward pass.
typedef struct {
    double activated;         // a_t: mean |S| over tokens and layers
    double *layer_mean;       // (L) mean |S|
    double *layer_std;        // (L) population standard deviation of |S|
    int *histogram;           // (L, E + 1) tokens with |S| = 0..E
    int *load_min, *load_max; // (L) tokens per expert
    double *load_cv;          // (L) coefficient of variation of tokens per expert
} RoutingStats;

// Implemented by the CPU section below and by train_dtopp.cu.
void model_init(Model *model, const ModelConfig *config, const RouterConfig *router, uint64_t seed);
void model_load(Model *model, const char *path);
void model_save(const Model *model, const char *path);
void model_free(Model *model);
void model_forward(Model *model, const int *inputs, const int *targets, int B, int T);
void model_zero_grad(Model *model);
void model_backward(Model *model);
float model_update(Model *model, float lr, float weight_decay);  // clip + AdamW; returns the gradient norm
// Gradient accumulation, after the backward pass of micro-batch `micro` of `count` (each backward
// from zeroed gradients): the micro-batches' gradients are added in order, g0 + g1 + ..., and after
// the last one model->grads holds the sum.
void model_accumulate_grads(Model *model, int micro, int count);
// model->grads = scale * (the sum of model->grads over every rank); the same on every rank.
void model_allreduce_grads(Model *model, float scale);
void model_activated_per_layer(const Model *model, double *activated);  // (L) mean |S| of the last forward
void model_routing_counts(const Model *model, int *n_selected, int *expert_load);  // (L, N), (L, E)
void model_get_logits(const Model *model, float *out);        // (N, V)
void model_get_token_losses(const Model *model, float *out);  // (N) cross-entropy of every position
void model_get_losses(const Model *model, float *out);        // total, CE, LB_l for each l, H_l for each l
void model_get_routing(const Model *model, int *n_selected, int *selected,
                       float *gates);  // (L,N), (L,N,E), (L,N,E)
void model_get_grads(const Model *model, float *out);
void model_get_params(const Model *model, float *out);
void model_get_theta(const Model *model, float *out);  // (L) the DRN scales
void model_get_moments(const Model *model, float *m, float *v);
void model_set_moments(Model *model, const float *m, const float *v);
Decoder *decoder_create(const Model *model);
const float *decoder_step(Model *model, Decoder *decoder, int token,
                          int pos);  // logits (V) of the next token
void decoder_free(Decoder *decoder);

// What both implementations share: sizes, the starting state, the controller law, the checkpoint
// file, statistics.

static void model_setup(Model *model, const ModelConfig *config, const RouterConfig *router,
                        const char *where) {
    memset(model, 0, sizeof(*model));
    model->config = *config;
    model->router = *router;
    validate_config(config, router, where);
    fill_param_sizes(model->param_sizes, config);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { model->num_parameters += model->param_sizes[i]; }
    model->threshold = (float *)calloc_check(config->num_layers, sizeof(float));
    model->integral = (float *)calloc_check(config->num_layers, sizeof(float));
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

// Fresh parameters from a seed (doc/spec.md, section 5): matrices normal(0, 0.02), the output
// projections of each block (Wo, W2) scaled down by sqrt(2L), gains 1, θ = theta_init, padded
// vocabulary rows zero.
static void init_params(float *params, const Model *model, uint64_t seed) {
    const ModelConfig *c = &model->config;
    uint64_t rng = seed;
    float *out = params;
    float residual_std = 0.02f / sqrtf(2.0f * c->num_layers);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        float std = (i == PARAM_WO || i == PARAM_W2) ? residual_std : 0.02f;
        for (size_t j = 0; j < model->param_sizes[i]; j++) {
            out[j] = param_is_matrix[i] ? std * random_normal(&rng)
                                        : (i == PARAM_THETA ? model->router.theta_init : 1.0f);
        }
        out += model->param_sizes[i];
    }
    memset(params + (size_t)c->vocab_size * c->channels, 0,
           (size_t)(c->padded_vocab_size - c->vocab_size) * c->channels * sizeof(float));
}

// The optimizer's rule, shared by both builds (doc/spec.md, section 4): the gradient is clipped
// to global norm CLIP_NORM, then AdamW updates every parameter. adamw_update runs in a CPU loop
// here and in a GPU kernel in train_dtopp.cu, so it is marked for both compilers.
#ifdef __CUDACC__
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif
#define ADAMW_BETA1 0.9f
#define ADAMW_BETA2 0.95f
#define ADAMW_EPS 1e-8f
#define CLIP_NORM 1.0f

typedef struct {
    float lr;
    float clip;          // scales the gradient to norm at most CLIP_NORM
    float bias1, bias2;  // AdamW's bias corrections 1 - β^s at step s
} AdamWStep;

static AdamWStep adamw_step(int step, float lr, float grad_norm) {
    AdamWStep s;
    s.lr = lr;
    s.clip = grad_norm > CLIP_NORM ? CLIP_NORM / grad_norm : 1.0f;
    s.bias1 = 1.0f - powf(ADAMW_BETA1, (float)step);
    s.bias2 = 1.0f - powf(ADAMW_BETA2, (float)step);
    return s;
}

// One parameter: its moments m1, m2 and its value w move by the clipped gradient.
static inline HOST_DEVICE void adamw_update(float *w, float *m1, float *m2, float grad, AdamWStep s,
                                            float wd) {
    grad *= s.clip;
    float first = *m1 = ADAMW_BETA1 * *m1 + (1.0f - ADAMW_BETA1) * grad;
    float second = *m2 = ADAMW_BETA2 * *m2 + (1.0f - ADAMW_BETA2) * grad * grad;
    *w = *w - s.lr * ((first / s.bias1) / (sqrtf(second / s.bias2) + ADAMW_EPS) + wd * *w);
}

// Warm-up then cosine decay to a tenth of the peak, over total_steps steps (step counts from 0).
float learning_rate(int step, int total_steps, int warmup, float peak) {
    if (step < warmup) { return peak * (step + 1) / warmup; }
    if (total_steps <= warmup) { return peak; }
    float min_lr = 0.1f * peak;
    float progress = (float)(step - warmup) / (float)(total_steps - warmup);
    return min_lr + 0.5f * (1.0f + cosf((float)M_PI * progress)) * (peak - min_lr);
}

// OpenMP threads of the host code (all of it in the CPU implementation).
void set_num_threads(int threads) {
#ifdef _OPENMP
    if (threads > 0) { omp_set_num_threads(threads); }
#else
    (void)threads;
#endif
}

int omp_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// a_t from the per-layer means of |S|: their mean over the layers.
static double mean_over_layers(const double *activated, int L) {
    double mean = 0.0;
    for (int l = 0; l < L; l++) { mean += activated[l] / L; }
    return mean;
}

// a_t of the last forward pass: mean |S| over its tokens and layers.
double model_activated(const Model *model) {
    int L = model->config.num_layers;
    double *activated = (double *)malloc_check(L * sizeof(double));
    model_activated_per_layer(model, activated);
    double mean = mean_over_layers(activated, L);
    free(activated);
    return mean;
}

// Once per optimizer step, after the backward pass: moves p toward the threshold that activates
// tgt experts per token on average. e = (tgt − a)/E; I' = I + e; p' = p0 + Kp e + Ki I'; while p'
// is outside [pmin, pmax] p is clamped and I is left as it was (no wind-up while saturated).
// The global controller feeds every layer the same a, so every layer keeps the same p and I.
// activated: (L) the mean |S| of each layer over every token of the optimizer step, which with
// gradient accumulation or several ranks is more than the last forward pass (doc/spec.md, section 3).
void controller_update_from(Model *model, const double *activated) {
    const RouterConfig *rc = &model->router;
    if (rc->routing != ROUTING_DTOPP) { return; }
    int L = model->config.num_layers;
    double global = mean_over_layers(activated, L);
    for (int l = 0; l < L; l++) {
        double a = rc->controller == CONTROLLER_GLOBAL ? global : activated[l];
        double error = (rc->tgt - a) / model->config.num_experts;
        double integral = (double)model->integral[l] + error;
        double threshold = (double)rc->p0 + rc->Kp * error + rc->Ki * integral;
        if (threshold >= rc->pmin && threshold <= rc->pmax) {
            model->threshold[l] = (float)threshold;
            model->integral[l] = (float)integral;
        } else {
            model->threshold[l] = threshold < rc->pmin ? rc->pmin : rc->pmax;
        }
    }
}

// The controller after a step of one forward pass, whose counts are the whole step's.
void controller_update(Model *model) {
    double *activated = (double *)malloc_check(model->config.num_layers * sizeof(double));
    model_activated_per_layer(model, activated);
    controller_update_from(model, activated);
    free(activated);
}


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

// Routing counts, summed over any number of forward passes (and ranks) before the statistics are
// taken: per layer the histogram of |S| (E + 1 bins), then per layer the tokens of each expert (E).
// They are doubles so that one sum across ranks carries them with the losses; as integers below
// 2^53 they add exactly in any order.
static size_t routing_counts_size(const ModelConfig *c) {
    return (size_t)c->num_layers * (2 * c->num_experts + 1);
}

// counts += the routing counts of the last forward pass.
static void routing_counts_add(double *counts, const Model *model) {
    int N = model->B * model->T, L = model->config.num_layers, E = model->config.num_experts;
    int *n_selected = (int *)malloc_check((size_t)L * N * sizeof(int));
    int *expert_load = (int *)malloc_check((size_t)L * E * sizeof(int));
    model_routing_counts(model, n_selected, expert_load);
    double *histogram = counts, *load = counts + (size_t)L * (E + 1);
    for (int l = 0; l < L; l++) {
        for (int n = 0; n < N; n++) { histogram[(size_t)l * (E + 1) + n_selected[(size_t)l * N + n]] += 1.0; }
        for (int e = 0; e < E; e++) { load[(size_t)l * E + e] += expert_load[(size_t)l * E + e]; }
    }
    free(n_selected);
    free(expert_load);
}

static void routing_stats_from_counts(RoutingStats *s, const double *counts, const ModelConfig *c) {
    int L = c->num_layers, E = c->num_experts;
    for (int l = 0; l < L; l++) {
        const double *hist = counts + (size_t)l * (E + 1);
        const double *load = counts + (size_t)L * (E + 1) + (size_t)l * E;
        double n = 0.0, sum = 0.0, sumsq = 0.0;
        for (int k = 0; k <= E; k++) {
            s->histogram[(size_t)l * (E + 1) + k] = (int)hist[k];
            n += hist[k];
            sum += k * hist[k];
            sumsq += (double)k * k * hist[k];
        }
        s->layer_mean[l] = sum / n;
        double var = sumsq / n - s->layer_mean[l] * s->layer_mean[l];
        s->layer_std[l] = var > 0.0 ? sqrt(var) : 0.0;
        double lsum = 0.0, lsumsq = 0.0;
        s->load_min[l] = s->load_max[l] = (int)load[0];
        for (int e = 0; e < E; e++) {
            int tokens = (int)load[e];
            s->load_min[l] = tokens < s->load_min[l] ? tokens : s->load_min[l];
            s->load_max[l] = tokens > s->load_max[l] ? tokens : s->load_max[l];
            lsum += tokens;
            lsumsq += (double)tokens * tokens;
        }
        double lmean = lsum / E, lvar = lsumsq / E - lmean * lmean;
        s->load_cv[l] = lmean > 0.0 && lvar > 0.0 ? sqrt(lvar) / lmean : 0.0;
    }
    s->activated = mean_over_layers(s->layer_mean, L);
}

// The statistics of the last forward pass.
void routing_stats_compute(RoutingStats *s, const Model *model) {
    double *counts = (double *)calloc_check(routing_counts_size(&model->config), sizeof(double));
    routing_counts_add(counts, model);
    routing_stats_from_counts(s, counts, &model->config);
    free(counts);
}

// ----------------------------------------------------------------------------
// model checkpoints (doc/formats.md): architecture, routing configuration, parameters, controller

// Version 2 added the vocabulary kind (word 15); version 1 files are still read, their kind
// inferred from V (256: bytes, 50257: GPT-2).
#define MODEL_VERSION 2
static const int model_versions[] = {1, MODEL_VERSION};

// The header of a model checkpoint (doc/formats.md): integers from word 2, float32 values from
// word 32. Saving and loading both walk this one table.
#define MODEL_HEADER_FIELDS 24
static void model_header_fields(HeaderField *fields, ModelConfig *c, RouterConfig *rc) {
    void *ints[] = {&c->max_seq_len, &c->vocab_size, &c->padded_vocab_size, &c->num_layers, &c->num_heads,
                    &c->channels, &c->num_experts, &c->expert_hidden, &rc->routing, &rc->controller,
                    &rc->drn, &rc->renorm, &rc->k, &c->vocab_kind};
    void *floats[] = {&rc->tgt, &rc->Kp, &rc->Ki, &rc->p0, &rc->pmin, &rc->pmax, &rc->theta_init,
                      &rc->lb_coef, &rc->ent_coef, &rc->p};
    for (int i = 0; i < 14; i++) { fields[i] = (HeaderField){2 + i, 4, ints[i]}; }
    for (int i = 0; i < 10; i++) { fields[14 + i] = (HeaderField){32 + i, 4, floats[i]}; }
}

// Fails naming the first of n values that is NaN or infinite.
static void check_finite(const float *values, size_t n, const char *path, const char *what) {
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(values[i])) {
            fail("%s: %s %zu of %zu is %g, not a finite number", path, what, i, n, values[i]);
        }
    }
}

// The controller state must be one the controller could have reached: under dtopp every p_l in
// [pmin, pmax] with a finite integral, under top-p the fixed p, and under the global controller
// the same values in every layer. Anything else would route with a threshold the header does not
// describe (p <= 0 selects no expert at all).
static void validate_controller_state(const Model *model, const char *path) {
    const RouterConfig *rc = &model->router;
    for (int l = 0; l < model->config.num_layers; l++) {
        float p = model->threshold[l], integral = model->integral[l];
        if (!isfinite(p) || !isfinite(integral)) {
            fail("%s: the controller state of layer %d is not finite", path, l);
        }
        if (rc->routing == ROUTING_DTOPP && !(p >= rc->pmin && p <= rc->pmax)) {
            fail("%s: layer %d has threshold p = %g, outside [pmin, pmax] = [%g, %g]", path, l, p, rc->pmin,
                 rc->pmax);
        }
        if (rc->routing == ROUTING_TOPP && (p != rc->p || integral != 0.0f)) {
            fail("%s: layer %d has threshold p = %g and integral %g; fixed top-p needs p = %g and 0", path, l,
                 p, integral, rc->p);
        }
        if (rc->controller == CONTROLLER_GLOBAL &&
            (p != model->threshold[0] || integral != model->integral[0])) {
            fail("%s: layer %d's controller state differs from layer 0's under the global controller", path,
                 l);
        }
    }
}

// params: the parameters in host memory.
static void checkpoint_save(const Model *model, const float *params, const char *path) {
    const ModelConfig *c = &model->config;
    ModelConfig config = model->config;
    RouterConfig router = model->router;
    HeaderField fields[MODEL_HEADER_FIELDS];
    model_header_fields(fields, &config, &router);
    int32_t header[HEADER_WORDS] = {MODEL_MAGIC, MODEL_VERSION};
    header_pack(header, fields, MODEL_HEADER_FIELDS);
    char tmp[4096];
    FILE *f = open_for_atomic_write(path, tmp, sizeof(tmp));
    fwrite_check(header, sizeof(int32_t), HEADER_WORDS, f, tmp);
    fwrite_check(params, sizeof(float), model->num_parameters, f, tmp);
    fwrite_check(model->threshold, sizeof(float), c->num_layers, f, tmp);
    fwrite_check(model->integral, sizeof(float), c->num_layers, f, tmp);
    finish_atomic_write(f, tmp, path);
}

// Sets up the model's configuration and controller state from the file; returns its parameters
// in (malloc'ed) host memory.
static float *checkpoint_load(Model *model, const char *path) {
    int32_t header[HEADER_WORDS];
    long size;
    FILE *f = open_with_header(path, header, MODEL_MAGIC, model_versions, 2, "model checkpoint", &size);
    ModelConfig config, *c = &config;
    RouterConfig router, *rc = &router;
    HeaderField fields[MODEL_HEADER_FIELDS];
    model_header_fields(fields, c, rc);
    header_unpack(header, fields, MODEL_HEADER_FIELDS);
    if (header[1] == 1) { c->vocab_kind = vocab_kind_of_size(c->vocab_size); }
    model_setup(model, c, rc, path);
    check_payload_size(path, size, (model->num_parameters + 2 * (size_t)c->num_layers) * sizeof(float));
    float *params = (float *)malloc_check(model->num_parameters * sizeof(float));
    fread_check(params, sizeof(float), model->num_parameters, f, path);
    fread_check(model->threshold, sizeof(float), c->num_layers, f, path);
    fread_check(model->integral, sizeof(float), c->num_layers, f, path);
    fclose(f);
    check_finite(params, model->num_parameters, path, "parameter");
    validate_controller_state(model, path);
    return params;
}

// ----------------------------------------------------------------------------
// sampling a token

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
            int largest = k;
            for (int i = k + 1; i < V; i++) { largest = sorted[i] > sorted[largest] ? i : largest; }
            float tmp = sorted[k];
            sorted[k] = sorted[largest];
            sorted[largest] = tmp;
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
// data parallel: ranks, all-reduce
//
// Built with USE_MPI (make train_dtopp_mpi), R processes ("ranks") train one model. Every rank
// reads the whole batch of each step and computes on its own rows of it; the gradients and the
// step's totals (losses, routing counts) are summed over the ranks; then every rank takes the same
// optimizer step and the same controller step, so all of them hold the same parameters and p.
// Every sum runs in rank order, so a run is bitwise reproducible for a given number of ranks.
// Without USE_MPI there is one rank and nothing here communicates. doc/parallel.md has the details.
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

#ifndef DTOPP_CUDA  // the CPU implementation; train_dtopp.cu provides the same functions on the GPU

// ----------------------------------------------------------------------------
// activations (their structs are in the shared part)

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
    int **iptrs[NUM_ROUTING_TENSORS] = {&r->n_selected, &r->selected, &r->expert_start, &r->token_row};
    size_t isizes[NUM_ROUTING_TENSORS] = {L * N, L * N * E, L * (E + 1), L * N * E};
    size_t itotal = 0;
    for (int i = 0; i < NUM_ROUTING_TENSORS; i++) { itotal += isizes[i]; }
    int *ip = a->routing_memory = (int *)calloc_check(itotal, sizeof(int));
    for (int i = 0; i < NUM_ROUTING_TENSORS; i++) {
        *iptrs[i] = ip;
        ip += isizes[i];
    }
    a->row_offset = (int *)calloc_check(L + 1, sizeof(int));

    if (with_grads) {
        GradActivations *g = &a->grads;
        float **gptrs[] = {&g->dresidual, &g->dln, &g->datty, &g->dqkv, &g->dlogits, &g->dgates,
                           &g->drouter, &g->dtheta};
        size_t gsizes[] = {N * C, N * C, N * C, N * 3 * C, N * V, N * E, N * E, N};
        carve_floats(gptrs, gsizes, (int)(sizeof(gsizes) / sizeof(gsizes[0])), &a->grads_memory);
    }
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
    free(a->row_offset);
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
// N = B*T token positions. Backward functions accumulate (+=) into parameter gradients and,
// unless their comment says otherwise, into the input gradient they are given.
//
// Below PARALLEL_MIN_WORK elements or multiply-adds, starting the threads costs more than the work
// (sampling runs every layer on one position): such loops run on the calling thread. On a busy
// machine this also saves waiting for a thread that shares its core with another program.
#define PARALLEL_MIN_WORK 32768

void encoder_forward(float *out, const int *inp, const float *wte, int N, int C) {
    #pragma omp parallel for if ((size_t)N * C >= PARALLEL_MIN_WORK)
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

#define RMSNORM_COLUMNS 32

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *g, int N, int C) {
    #pragma omp parallel for if ((size_t)N * C >= PARALLEL_MIN_WORK)
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
    #pragma omp parallel for if ((size_t)N * C >= PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
        float r = rstd[n];
        float dot = 0.0f;  // <g ⊙ dout, x>
        for (int i = 0; i < C; i++) { dot += g[i] * d[i] * x[i]; }
        float *dx = dinp + (size_t)n * C;
        for (int i = 0; i < C; i++) { dx[i] += r * g[i] * d[i] - x[i] * (r * r * r / C) * dot; }
    }
    // dg: each thread owns a block of columns and walks the rows in order, reading each row's
    // block contiguously (one column at a time would read one float per cache line)
    #pragma omp parallel for if ((size_t)N * C >= PARALLEL_MIN_WORK)
    for (int i0 = 0; i0 < C; i0 += RMSNORM_COLUMNS) {
        int width = C - i0 < RMSNORM_COLUMNS ? C - i0 : RMSNORM_COLUMNS;
        float sum[RMSNORM_COLUMNS] = {0.0f};
        for (int n = 0; n < N; n++) {
            const float *d = dout + (size_t)n * C + i0, *x = inp + (size_t)n * C + i0;
            for (int i = 0; i < width; i++) { sum[i] += d[i] * x[i] * rstd[n]; }
        }
        for (int i = 0; i < width; i++) { dg[i0 + i] += sum[i]; }
    }
}

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
// stays in the L2 cache and a GEMM_KC x GEMM_NC block of B whose GEMM_NR-wide panels stay in L1.
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
#define GEMM_NC 256

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

// Packs A (m0 .. m0+mr-1, k0 .. k0+kc-1) as packed[k * GEMM_MR + i], zeros for i >= mr.
static void pack_a_panel(float *restrict packed, MatrixView a, int m0, int mr, int k0, int kc) {
    if (!a.transposed) {
        for (int i = 0; i < GEMM_MR; i++) {
            const float *src = i < mr ? view_row(a, m0 + i) + k0 : NULL;
            for (int k = 0; k < kc; k++) { packed[k * GEMM_MR + i] = src ? src[k] : 0.0f; }
        }
    } else {
        for (int k = 0; k < kc; k++) {
            const float *src = view_row(a, k0 + k) + m0;
            for (int i = 0; i < GEMM_MR; i++) { packed[k * GEMM_MR + i] = i < mr ? src[i] : 0.0f; }
        }
    }
}

// Packs B (k0 .. k0+kc-1, n0 .. n0+nr-1) as packed[k * GEMM_NR + j], zeros for j >= nr.
static void pack_b_panel(float *restrict packed, MatrixView b, int n0, int nr, int k0, int kc) {
    if (!b.transposed) {
        for (int k = 0; k < kc; k++) {
            const float *src = view_row(b, k0 + k) + n0;
            for (int j = 0; j < GEMM_NR; j++) { packed[k * GEMM_NR + j] = j < nr ? src[j] : 0.0f; }
        }
    } else {
        for (int j = 0; j < GEMM_NR; j++) {
            const float *src = j < nr ? view_row(b, n0 + j) + k0 : NULL;
            for (int k = 0; k < kc; k++) { packed[k * GEMM_NR + j] = src ? src[k] : 0.0f; }
        }
    }
}

// tile (GEMM_MR, GEMM_NR) = packed A panel · packed B panel over kc values of k. Plain C: with
// -O3 the compiler keeps acc in registers and unrolls i into broadcast + FMA on vectors of j.
static void micro_kernel(int kc, const float *restrict a, const float *restrict b, float *restrict tile) {
    float acc[GEMM_MR][GEMM_NR] = {{0.0f}};
    for (int k = 0; k < kc; k++) {
        for (int i = 0; i < GEMM_MR; i++) {
            for (int j = 0; j < GEMM_NR; j++) { acc[i][j] += a[k * GEMM_MR + i] * b[k * GEMM_NR + j]; }
        }
    }
    memcpy(tile, acc, sizeof(acc));
}

// The view of the block of v that starts at element (i0, j0).
static MatrixView view_offset(MatrixView v, int i0, int j0) {
    int row0 = v.transposed ? j0 : i0, col0 = v.transposed ? i0 : j0;
    if (v.rows) { v.rows += row0; } else { v.data += (size_t)row0 * v.ld; }
    v.data += col0;
    return v;
}

// C (M, N) (row-major, ldc floats between rows) = A · B, or += when accumulate is set; on the
// calling thread. The packed blocks live on its stack (about 400 KB).
static void sgemm_serial(int M, int N, int K, MatrixView a, MatrixView b, float *c, size_t ldc,
                         int accumulate) {
    if (M <= 0 || N <= 0) { return; }
    if (K <= 0) {
        for (int m = 0; !accumulate && m < M; m++) { memset(c + m * ldc, 0, N * sizeof(float)); }
        return;
    }
    _Alignas(64) float packed_a[GEMM_MC * GEMM_KC];
    _Alignas(64) float packed_b[GEMM_KC * GEMM_NC];
    _Alignas(64) float tile[GEMM_MR * GEMM_NR];
    for (int nb = 0; nb < N; nb += GEMM_NC) {
        int nb_end = nb + GEMM_NC < N ? nb + GEMM_NC : N;
        for (int k0 = 0; k0 < K; k0 += GEMM_KC) {
            int kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
            int add = accumulate || k0 > 0;
            for (int n0 = nb; n0 < nb_end; n0 += GEMM_NR) {
                pack_b_panel(packed_b + (n0 - nb) * kc, b, n0, nb_end - n0, k0, kc);
            }
            for (int mb = 0; mb < M; mb += GEMM_MC) {
                int mb_end = mb + GEMM_MC < M ? mb + GEMM_MC : M;
                for (int m0 = mb; m0 < mb_end; m0 += GEMM_MR) {
                    pack_a_panel(packed_a + (m0 - mb) * kc, a, m0, mb_end - m0, k0, kc);
                }
                for (int n0 = nb; n0 < nb_end;
                     n0 += GEMM_NR) {  // the B panel stays in L1 across the A panels
                    int nr = nb_end - n0 < GEMM_NR ? nb_end - n0 : GEMM_NR;
                    for (int m0 = mb; m0 < mb_end; m0 += GEMM_MR) {
                        int mr = mb_end - m0 < GEMM_MR ? mb_end - m0 : GEMM_MR;
                        micro_kernel(kc, packed_a + (m0 - mb) * kc, packed_b + (n0 - nb) * kc, tile);
                        for (int i = 0; i < mr; i++) {
                            float *dst = c + (size_t)(m0 + i) * ldc + n0;
                            const float *src = tile + i * GEMM_NR;
                            if (add) {
                                for (int j = 0; j < nr; j++) { dst[j] += src[j]; }
                            } else {
                                for (int j = 0; j < nr; j++) { dst[j] = src[j]; }
                            }
                        }
                    }
                }
            }
        }
    }
}

// The same on all threads: each computes whole tiles of C with sgemm_serial. Tiles are
// GEMM_NC columns wide, and rows are split so that there are about four tiles per thread
// (dynamic scheduling then evens out uneven tiles and a thread slowed by a busy core). The tiling
// decides who computes an element, never how, so it may depend on the number of threads.
static void sgemm(int M, int N, int K, MatrixView a, MatrixView b, float *c, size_t ldc, int accumulate) {
    if (M <= 0 || N <= 0) { return; }
    int n_tiles = (N + GEMM_NC - 1) / GEMM_NC, m_panels = (M + GEMM_MR - 1) / GEMM_MR;
    int m_tiles = (4 * omp_threads() + n_tiles - 1) / n_tiles;
    m_tiles = m_tiles < m_panels ? m_tiles : m_panels;
    int tile_rows = (m_panels + m_tiles - 1) / m_tiles * GEMM_MR;
    m_tiles = (M + tile_rows - 1) / tile_rows;
    #pragma omp parallel for schedule(dynamic, 1) if ((size_t)M * N * K >= PARALLEL_MIN_WORK)
    for (int t = 0; t < m_tiles * n_tiles; t++) {
        int m0 = t / n_tiles * tile_rows, n0 = t % n_tiles * GEMM_NC;
        int m = M - m0 < tile_rows ? M - m0 : tile_rows, n = N - n0 < GEMM_NC ? N - n0 : GEMM_NC;
        float *c_tile = c + m0 * ldc + n0;
        sgemm_serial(m, n, K, view_offset(a, m0, 0), view_offset(b, 0, n0), c_tile, ldc, accumulate);
    }
}

void matmul_forward(float *out, const float *inp, const int *inp_rows, const float *weight,
                    int rows, int IC, int OC) {
    // With fewer rows than the micro-kernel's, packing the weights would cost more than the
    // products (sampling computes one row at a time): one dot product per output, weights read once.
    if (rows < GEMM_MR) {
        matmul_forward_reference(out, inp, inp_rows, weight, rows, IC, OC);
        return;
    }
    MatrixView a = {inp, inp_rows, IC, 0}, b = {weight, NULL, IC, 1};
    sgemm(rows, OC, IC, a, b, out, OC, 0);
}

void matmul_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                     const int *inp_rows, const float *weight, int rows, int IC, int OC) {
    MatrixView d = {dout, NULL, OC, 0}, w = {weight, NULL, IC, 0};
    sgemm(rows, IC, OC, d, w, dinp, IC, 1);
    MatrixView dt = {dout, NULL, OC, 1}, x = {inp, inp_rows, IC, 0};
    sgemm(OC, IC, rows, dt, x, dweight, IC, 1);
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
static void rope_rotate(float *v, const float *cos_table, const float *sin_table, int pos, int hd,
                        float direction) {
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
    #pragma omp parallel for if ((size_t)B * T * C >= PARALLEL_MIN_WORK)
    for (int n = 0; n < B * T; n++) {
        for (int h = 0; h < 2 * NH; h++) {  // NH heads of q, then NH of k
            rope_rotate(qkv + (size_t)n * 3 * C + h * hd, cos_table, sin_table, n % T, hd, 1.0f);
        }
    }
}

void rope_backward(float *dqkv, const float *cos_table, const float *sin_table, int B, int T, int C, int NH) {
    int hd = C / NH;
    #pragma omp parallel for if ((size_t)B * T * C >= PARALLEL_MIN_WORK)
    for (int n = 0; n < B * T; n++) {
        for (int h = 0; h < 2 * NH; h++) {
            rope_rotate(dqkv + (size_t)n * 3 * C + h * hd, cos_table, sin_table, n % T, hd, -1.0f);
        }
    }
}

// e^x in plain C that the compiler vectorizes (the C library's expf is a call per element): the
// softmax over a 50,257-word vocabulary and the attention softmax spend their time here.
// x = n ln2 + r with |r| <= ln2/2; e^r by its degree-6 Taylor-like polynomial (the coefficients of
// the Cephes expf); 2^n written into the exponent bits. Within 1.5 units in the last place of
// e^x; 0 below -87.3 where e^x would be subnormal, inf above 88 and NaN for NaN.
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

// One query against n_keys keys and values (rows `stride` floats apart): writes the attention
// probabilities to probs and their weighted sum of values to out. Sampling attends one query at a
// time this way; training does whole blocks of queries with matrix products (attention_forward).
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

// Self-attention, causal (the language model: query t sees keys 0..t) or not (causal 0: every query
// sees every key, as the diffusion transformer's image patches do). qkv (B, T, 3C) -> out (B, T, C),
// att (B, NH, T, T) probabilities (causal: row t holds keys 0..t, and the rest of the row up to
// the end of its block of queries holds zeros).
// Each thread owns whole (b, h) pairs and takes their queries in blocks of ATTENTION_BLOCK, so
// that the scores and the weighted sums are matrix products (sgemm_serial) over keys 0 .. the
// block's last query: the causal mask costs at most one block's worth of extra products.
#define ATTENTION_BLOCK 64

// The views of one head's q, k or v (part 0, 1, 2 of qkv) in sequence b: a (T, hd) matrix.
static MatrixView head_view(const float *qkv, int part, int b, int h, int T, int C, int hd) {
    MatrixView v = {qkv + (size_t)b * T * 3 * C + (size_t)part * C + h * hd, NULL, 3 * (size_t)C, 0};
    return v;
}

static MatrixView transposed(MatrixView v) {
    v.transposed = !v.transposed;
    return v;
}

void attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH, int causal) {
    int hd = C / NH;
    float scale = 1.0f / sqrtf((float)hd);
    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            MatrixView q = head_view(qkv, 0, b, h, T, C, hd), k = head_view(qkv, 1, b, h, T, C, hd);
            MatrixView v = head_view(qkv, 2, b, h, T, C, hd);
            float *probs = att + ((size_t)b * NH + h) * T * T;
            for (int t0 = 0; t0 < T; t0 += ATTENTION_BLOCK) {
                int t1 = t0 + ATTENTION_BLOCK < T ? t0 + ATTENTION_BLOCK : T, n_queries = t1 - t0;
                int n_keys = causal ? t1 : T;
                float *block = probs + (size_t)t0 * T;  // rows t0 .. t1-1, keys 0 .. n_keys-1
                // scores q·k of the block's queries against keys 0 .. n_keys-1
                sgemm_serial(n_queries, n_keys, hd, view_offset(q, t0, 0), transposed(k), block, T, 0);
                for (int t = t0; t < t1; t++) {
                    float *p = probs + (size_t)t * T, maxval = -INFINITY, sum = 0.0f;
                    int last = causal ? t : T - 1;  // the last key query t sees
                    #pragma omp simd reduction(max : maxval)
                    for (int j = 0; j <= last; j++) {
                        p[j] *= scale;
                        maxval = p[j] > maxval ? p[j] : maxval;
                    }
                    #pragma omp simd reduction(+ : sum)
                    for (int j = 0; j <= last; j++) {
                        p[j] = exp_fast(p[j] - maxval);
                        sum += p[j];
                    }
                    float inv = 1.0f / sum;
                    for (int j = 0; j <= last; j++) { p[j] *= inv; }
                    for (int j = last + 1; j < n_keys; j++) { p[j] = 0.0f; }  // the causal mask
                }
                MatrixView p_block = {block, NULL, T, 0};
                float *out_block = out + ((size_t)b * T + t0) * C + h * hd;
                sgemm_serial(n_queries, hd, n_keys, p_block, v, out_block, C, 0);
            }
        }
    }
}

// With P the probabilities, dP = dout · v^T; through the softmax dS = P ⊙ (dP - rowsum(P ⊙ dP))
// · scale; then dq = dS · k, dk = dS^T · q, dv = P^T · dout. Each thread owns whole (b, h) pairs
// (their keys and values receive gradient from every later query) and takes the queries in
// blocks in order, so every sum runs in the same order for any number of threads. Each thread
// keeps dS of its current block of queries in a scratch of its own.
void attention_backward(float *dqkv, const float *dout, const float *qkv, const float *att, int B, int T,
                        int C, int NH, int causal) {
    int hd = C / NH;
    float scale = 1.0f / sqrtf((float)hd);
    #pragma omp parallel
    {
        float *dscores = (float *)malloc_check((size_t)ATTENTION_BLOCK * T * sizeof(float));
        #pragma omp for collapse(2) schedule(dynamic, 1)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                MatrixView q = head_view(qkv, 0, b, h, T, C, hd), k = head_view(qkv, 1, b, h, T, C, hd);
                MatrixView v = head_view(qkv, 2, b, h, T, C, hd);
                float *dq = dqkv + (size_t)b * T * 3 * C + h * hd, *dk = dq + C, *dv = dq + 2 * C;
                const float *probs = att + ((size_t)b * NH + h) * T * T;
                MatrixView d = {dout + (size_t)b * T * C + h * hd, NULL, (size_t)C, 0};
                for (int t0 = 0; t0 < T; t0 += ATTENTION_BLOCK) {
                    int t1 = t0 + ATTENTION_BLOCK < T ? t0 + ATTENTION_BLOCK : T, n_queries = t1 - t0;
                    int n_keys = causal ? t1 : T;
                    MatrixView p_block = {probs + (size_t)t0 * T, NULL, T, 0};
                    MatrixView d_block = view_offset(d, t0, 0), ds_block = {dscores, NULL, n_keys, 0};
                    // dP
                    sgemm_serial(n_queries, n_keys, hd, d_block, transposed(v), dscores, n_keys, 0);
                    for (int t = t0; t < t1; t++) {
                        const float *p = probs + (size_t)t * T;
                        float *ds = dscores + (size_t)(t - t0) * n_keys, pdp = 0.0f;
                        int last = causal ? t : T - 1;
                        #pragma omp simd reduction(+ : pdp)
                        for (int j = 0; j <= last; j++) { pdp += p[j] * ds[j]; }
                        for (int j = 0; j <= last; j++) { ds[j] = p[j] * (ds[j] - pdp) * scale; }
                        for (int j = last + 1; j < n_keys; j++) { ds[j] = 0.0f; }
                    }
                    sgemm_serial(n_queries, hd, n_keys, ds_block, k, dq + (size_t)t0 * 3 * C, 3 * (size_t)C,
                                 1);
                    sgemm_serial(n_keys, hd, n_queries, transposed(ds_block), view_offset(q, t0, 0), dk,
                                 3 * (size_t)C, 1);
                    sgemm_serial(n_keys, hd, n_queries, transposed(p_block), d_block, dv, 3 * (size_t)C, 1);
                }
            }
        }
        free(dscores);
    }
}

void residual_forward(float *out, const float *inp1, const float *inp2, size_t n) {
    #pragma omp parallel for simd if (n >= PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) { out[i] = inp1[i] + inp2[i]; }
}

static inline float silu(float x) { return x / (1.0f + exp_fast(-x)); }

void swiglu_forward(float *out, const float *h1, const float *h3, size_t n) {
    #pragma omp parallel for simd if (n >= PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) { out[i] = silu(h1[i]) * h3[i]; }
}

// On entry dh1 holds the gradient of out; on exit the gradients of h1 and h3.
void swiglu_backward(float *dh1, float *dh3, const float *h1, const float *h3, size_t n) {
    #pragma omp parallel for simd if (n >= PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) {
        float sig = 1.0f / (1.0f + exp_fast(-h1[i]));
        float dout = dh1[i];
        dh3[i] = dout * h1[i] * sig;
        dh1[i] = dout * h3[i] * sig * (1.0f + h1[i] * (1.0f - sig));
    }
}

// log Σ_i e^(z_i) of one row of logits, from its maximum (so no term overflows); the sum in double.
static double log_sum_exp(const float *z, int V) {
    float maxval = -INFINITY;
    #pragma omp simd reduction(max : maxval)
    for (int i = 0; i < V; i++) { maxval = z[i] > maxval ? z[i] : maxval; }
    double sum = 0.0;
    #pragma omp simd reduction(+ : sum)
    for (int i = 0; i < V; i++) { sum += exp_fast(z[i] - maxval); }
    return log(sum) + maxval;
}

// Mean cross-entropy over the first V logits; per-position losses go to token_loss.
void crossentropy_forward(float *token_loss, const float *logits, const int *targets, int N, int V) {
    #pragma omp parallel for if ((size_t)N * V >= PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *z = logits + (size_t)n * V;
        token_loss[n] = (float)(log_sum_exp(z, V) - z[targets[n]]);
    }
}

// Writes (not accumulates) dlogits: scale · (softmax − onehot).
void crossentropy_backward(float *dlogits, const float *logits, const int *targets, int N, int V,
                           float scale) {
    #pragma omp parallel for if ((size_t)N * V >= PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *z = logits + (size_t)n * V;
        float *dz = dlogits + (size_t)n * V, lse = (float)log_sum_exp(z, V);
        #pragma omp simd
        for (int i = 0; i < V; i++) { dz[i] = scale * exp_fast(z[i] - lse); }
        dz[targets[n]] -= scale;
    }
}

// ----------------------------------------------------------------------------
// the MoE layer, in the order of the paper: router (z = Wr m, DRN, softmax, top-p selection,
// gates), auxiliary losses, dispatch (counting sort), experts, combine. Each forward function sits
// next to its backward.

// DRN standardizes each token's router logits over the experts and scales them by the layer's
// learned θ: ẑ = θ (z − mean(z)) / sqrt(var(z) + DRN_EPS). Without it the spread of the logits,
// and so how many experts a threshold p admits, would be whatever training made it in each layer.
// scaled (N, E) = θ u, with u (N, E) the standardized logits and rstd (N) 1 / sqrt(var + eps).
void drn_forward(float *scaled, float *u, float *rstd, const float *z, const float *theta, int N, int E) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *zn = z + (size_t)n * E;
        float *un = u + (size_t)n * E, *out = scaled + (size_t)n * E;
        float mean = 0.0f, var = 0.0f, scale = *theta;
        for (int e = 0; e < E; e++) { mean += zn[e]; }
        mean /= E;
        for (int e = 0; e < E; e++) { var += (zn[e] - mean) * (zn[e] - mean); }
        float r = 1.0f / sqrtf(var / E + DRN_EPS);
        for (int e = 0; e < E; e++) {
            un[e] = (zn[e] - mean) * r;
            out[e] = scale * un[e];
        }
        rstd[n] = r;
    }
}

// In place: d (N, E) holds dẑ on entry and dz on exit; each token's share of dθ = <dẑ, u> goes to
// dtheta_token (N), for the caller to sum in order.
// du = θ dẑ; dz = (du − mean(du) − u mean(du u)) rstd.
void drn_backward(float *d, float *dtheta_token, const float *u, const float *rstd, const float *theta, int N,
                  int E) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float *dn = d + (size_t)n * E;
        const float *un = u + (size_t)n * E;
        float dth = 0.0f, mean_du = 0.0f, mean_duu = 0.0f, scale = *theta;
        for (int e = 0; e < E; e++) {
            dth += dn[e] * un[e];
            dn[e] *= scale;  // du
            mean_du += dn[e];
            mean_duu += dn[e] * un[e];
        }
        mean_du /= E;
        mean_duu /= E;
        for (int e = 0; e < E; e++) { dn[e] = (dn[e] - mean_du - un[e] * mean_duu) * rstd[n]; }
        dtheta_token[n] = dth;
    }
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

// z = Wr m; DRN (if on); P = softmax; S = selection with this layer's threshold; gates over S
// (renormalised to sum 1, or the raw probabilities).
void router_forward(RouterView r, const float *m, const LayerWeights *w, float threshold,
                    const RouterConfig *rc, int N, int C, int E) {
    matmul_forward(r.logits, m, NULL, w->wr, N, C, E);
    if (rc->drn) {
        drn_forward(r.probs, r.drn_u, r.drn_rstd, r.logits, w->theta, N, E);
    } else {
        memcpy(r.probs, r.logits, (size_t)N * E * sizeof(float));
    }
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float *P = r.probs + (size_t)n * E;  // softmax in place
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

// From the gradient of the gates (r.dgates) back to the router logits, θ and Wr; r.drouter holds
// on entry the auxiliary losses' dP (moe_aux_backward) and is reused for dẑ and dz. dm (N, C) +=.
// The derivation is in doc/router_backward.md.
void router_backward(RouterView r, float *dm, const LayerWeights *dw, const float *m, const LayerWeights *w,
                     const RouterConfig *rc, int N, int C, int E) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *P = r.probs + (size_t)n * E, *g = r.gates + (size_t)n * E;
        const float *dg = r.dgates + (size_t)n * E;
        const int *sel = r.selected + (size_t)n * E;
        float *d = r.drouter + (size_t)n * E;  // dP, then dẑ
        int count = r.n_selected[n];
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
    }
    if (rc->drn) {
        drn_backward(r.drouter, r.dtheta_token, r.drn_u, r.drn_rstd, w->theta, N, E);
        for (int n = 0; n < N; n++) { *dw->theta += r.dtheta_token[n]; }  // in token order
    }
    matmul_backward(dm, dw->wr, r.drouter, m, NULL, w->wr, N, C, E);
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
            float prob = r.probs[(size_t)n * E + e];
            if (prob > 0.0f) { ent_sum -= prob * logf(prob); }
        }
    }
    *lb = (float)(E * lb_sum);
    *ent = (float)(ent_sum / N);
}

// Writes (not accumulates) r.drouter = dP of lb_scale·LB + ent_scale·H, the start of the router's
// backward pass.
void moe_aux_backward(RouterView r, float lb_scale, float ent_scale, int N, int E) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *P = r.probs + (size_t)n * E;
        float *d = r.drouter + (size_t)n * E;
        for (int e = 0; e < E; e++) {
            float aux = lb_scale * E * expert_load_fraction(r, e, E) / N;
            if (P[e] > 0.0f) { aux -= ent_scale * (logf(P[e]) + 1.0f) / N; }
            d[e] = aux;
        }
    }
}

// Dispatch by counting sort, in two steps so that the caller can size the row buffers in
// between. First a histogram of the selected experts and its prefix sum: expert e gets rows
// expert_start[e] .. expert_start[e+1]-1. Returns the number of rows.
int moe_dispatch_count(RouterView r, int N, int E) {
    int *start = r.expert_start;
    for (int e = 0; e <= E; e++) { start[e] = 0; }
    for (int n = 0; n < N; n++) {
        for (int j = 0; j < r.n_selected[n]; j++) { start[r.selected[(size_t)n * E + j] + 1]++; }
    }
    for (int e = 0; e < E; e++) { start[e + 1] += start[e]; }
    return start[E];
}

// Then the placement, in token order (so rows, and every sum over them, come in the same order on
// every run): x.row_token of every row, and r.token_row of every (token, choice).
void moe_dispatch(RouterView r, ExpertView x, int N, int E) {
    int cursor[E];
    for (int e = 0; e < E; e++) { cursor[e] = r.expert_start[e]; }
    for (int n = 0; n < N; n++) {
        for (int j = 0; j < E; j++) {
            int row = -1;
            if (j < r.n_selected[n]) {
                row = cursor[r.selected[(size_t)n * E + j]]++;
                x.row_token[row] = n;
            }
            r.token_row[(size_t)n * E + j] = row;
        }
    }
}

// Every expert computes W2 (silu(W1 m) ⊙ W3 m) on the rows gathered for it: x.out (R, C).
void experts_forward(ExpertView x, RouterView r, const float *m, const LayerWeights *w, int E, int C, int H) {
    const int *start = r.expert_start;
    for (int e = 0; e < E; e++) {
        int first = start[e], count = start[e + 1] - first;
        if (count == 0) { continue; }
        matmul_forward(x.h1 + (size_t)first * H, m, x.row_token + first, w->w1 + (size_t)e * H * C, count, C,
                       H);
        matmul_forward(x.h3 + (size_t)first * H, m, x.row_token + first, w->w3 + (size_t)e * H * C, count, C,
                       H);
    }
    swiglu_forward(x.hact, x.h1, x.h3, (size_t)start[E] * H);
    for (int e = 0; e < E; e++) {
        int first = start[e], count = start[e + 1] - first;
        if (count == 0) { continue; }
        matmul_forward(x.out + (size_t)first * C, x.hact + (size_t)first * H, NULL, w->w2 + (size_t)e * C * H,
                       count, H, C);
    }
}

// From x.dout (R, C) to x.din (R, C), the gradient of the gathered inputs, one row per (token,
// expert) pair (moe_gather_rows then sums each token's rows); accumulates into dw's W1, W3, W2.
void experts_backward(ExpertView x, RouterView r, const float *m, const LayerWeights *dw,
                      const LayerWeights *w, int E, int C, int H) {
    const int *start = r.expert_start;
    size_t rows = start[E];
    memset(x.dh1, 0, rows * H * sizeof(float));
    memset(x.din, 0, rows * C * sizeof(float));
    for (int e = 0; e < E; e++) {
        int first = start[e], count = start[e + 1] - first;
        if (count == 0) { continue; }
        matmul_backward(x.dh1 + (size_t)first * H, dw->w2 + (size_t)e * C * H, x.dout + (size_t)first * C,
                        x.hact + (size_t)first * H, NULL, w->w2 + (size_t)e * C * H, count, H, C);
    }
    swiglu_backward(x.dh1, x.dh3, x.h1, x.h3, rows * H);
    for (int e = 0; e < E; e++) {
        int first = start[e], count = start[e + 1] - first;
        if (count == 0) { continue; }
        matmul_backward(x.din + (size_t)first * C, dw->w1 + (size_t)e * H * C, x.dh1 + (size_t)first * H, m,
                        x.row_token + first, w->w1 + (size_t)e * H * C, count, C, H);
        matmul_backward(x.din + (size_t)first * C, dw->w3 + (size_t)e * H * C, x.dh3 + (size_t)first * H, m,
                        x.row_token + first, w->w3 + (size_t)e * H * C, count, C, H);
    }
}

// MoE(m) = Σ_j g_j Expert_j(m): each token gathers its own rows, in selection order. out (N, C).
void moe_combine_forward(float *out, ExpertView x, RouterView r, int N, int C, int E) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) { o[i] = 0.0f; }
        for (int j = 0; j < r.n_selected[n]; j++) {
            const float *y = x.out + (size_t)r.token_row[(size_t)n * E + j] * C;
            float g = r.gates[(size_t)n * E + j];
            for (int i = 0; i < C; i++) { o[i] += g * y[i]; }
        }
    }
}

// From dout (N, C), the gradient of MoE(m): x.dout of each row = gate · dout; r.dgates_j =
// <dout, Expert_j(m)>. Every row belongs to exactly one (token, choice), so each token writes
// only its own rows.
void moe_combine_backward(ExpertView x, RouterView r, const float *dout, int N, int C, int E) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *d = dout + (size_t)n * C;
        for (int j = 0; j < E; j++) {
            r.dgates[(size_t)n * E + j] = 0.0f;
            if (j >= r.n_selected[n]) { continue; }
            size_t row = r.token_row[(size_t)n * E + j];
            float g = r.gates[(size_t)n * E + j];
            r.dgates[(size_t)n * E + j] = dot_product(d, x.out + row * C, C);
            for (int i = 0; i < C; i++) { x.dout[row * C + i] = g * d[i]; }
        }
    }
}

// dm[n] += Σ_j x.din[row of (n, j)]: the gather that brings expert-input gradients back to tokens.
void moe_gather_rows(float *dm, ExpertView x, RouterView r, int N, int C, int E) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float *d = dm + (size_t)n * C;
        for (int j = 0; j < r.n_selected[n]; j++) {
            const float *g = x.din + (size_t)r.token_row[(size_t)n * E + j] * C;
            for (int i = 0; i < C; i++) { d[i] += g[i]; }
        }
    }
}

// ----------------------------------------------------------------------------
// the model on the CPU

struct Workspace {
    Activations acts;     // for the last (B, T) seen by model_forward
    float *rope_cos;      // (max_seq_len, hd/2)
    float *rope_sin;      // (max_seq_len, hd/2)
    const int *inputs;    // the batch of the last forward pass
    const int *targets;
};

// Takes ownership of params (host memory, filled).
static void model_attach(Model *model, float *params) {
    const ModelConfig *c = &model->config;
    model->params_memory = params;
    carve_params(&model->params, params, model->param_sizes);
    Workspace *ws = model->ws = (Workspace *)calloc_check(1, sizeof(Workspace));
    int hd = c->channels / c->num_heads;
    ws->rope_cos = (float *)malloc_check((size_t)c->max_seq_len * (hd / 2) * sizeof(float));
    ws->rope_sin = (float *)malloc_check((size_t)c->max_seq_len * (hd / 2) * sizeof(float));
    rope_table_init(ws->rope_cos, ws->rope_sin, c->max_seq_len, hd);
}

void model_init(Model *model, const ModelConfig *config, const RouterConfig *router, uint64_t seed) {
    model_setup(model, config, router, "model configuration");
    float *params = (float *)malloc_check(model->num_parameters * sizeof(float));
    init_params(params, model, seed);
    model_attach(model, params);
    controller_reset(model);
}

void model_load(Model *model, const char *path) {
    float *params = checkpoint_load(model, path);
    model_attach(model, params);
}

void model_save(const Model *model, const char *path) { checkpoint_save(model, model->params_memory, path); }

void model_free(Model *model) {
    free(model->params_memory);
    free(model->grads_memory);
    free(model->grads_sum_memory);
    free(model->m_memory);
    free(model->v_memory);
    free(model->threshold);
    free(model->integral);
    free(model->ws->rope_cos);
    free(model->ws->rope_sin);
    activations_free(&model->ws->acts);
    free(model->ws);
}

// The MoE half of layer l: router, auxiliary terms, dispatch, experts, combine.
// Writes MoE(m) to out (N, C).
static void moe_forward(Model *model, Activations *a, int l, float *out, const float *m) {
    const ModelConfig *c = &model->config;
    int N = a->B * a->T, C = c->channels, E = c->num_experts, H = c->expert_hidden;
    LayerWeights w = layer_weights(&model->params, c, l);
    RouterView r = router_view(a, c, l);
    router_forward(r, m, &w, model->threshold[l], &model->router, N, C, E);
    int rows = moe_dispatch_count(r, N, E);
    moe_aux_forward(&a->acts.aux_lb[l], &a->acts.aux_ent[l], r, N, E);
    expert_rows_reserve(&a->rows, r.row_begin + rows, C, H);
    a->row_offset[l + 1] = r.row_begin + rows;
    ExpertView x = expert_view(a, c, r);
    moe_dispatch(r, x, N, E);
    experts_forward(x, r, m, &w, E, C, H);
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
    RouterView r = router_view(a, c, l);
    expert_row_grads_reserve(&a->row_grads, r.expert_start[E], C, H);
    ExpertView x = expert_view(a, c, r);
    moe_combine_backward(x, r, dout, N, C, E);
    experts_backward(x, r, m, &dw, &w, E, C, H);
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

// inputs, targets: (B, T) token ids; targets may be NULL (no loss). Token ids are trusted here:
// the data loader and the prompt encoder check them.
void model_forward(Model *model, const int *inputs, const int *targets, int B, int T) {
    model_ensure_activations(model, B, T);
    const ModelConfig *c = &model->config;
    int N = B * T, C = c->channels, L = c->num_layers, NH = c->num_heads, V = c->vocab_size;
    Activations *a = &model->ws->acts;
    ActivationTensors *t = &a->acts;
    model->ws->inputs = inputs;
    model->ws->targets = targets;
    model->B = B;
    model->T = T;
    encoder_forward(t->encoded, inputs, model->params.wte, N, C);
    a->row_offset[0] = 0;
    for (int l = 0; l < L; l++) {
        LayerWeights w = layer_weights(&model->params, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * N * C;
        float *ln1 = t->ln1 + (size_t)l * N * C, *qkv = t->qkv + (size_t)l * N * 3 * C;
        float *atty = t->atty + (size_t)l * N * C, *res1 = t->res1 + (size_t)l * N * C;
        float *ln2 = t->ln2 + (size_t)l * N * C, *res2 = t->res2 + (size_t)l * N * C;
        rmsnorm_forward(ln1, t->ln1_rstd + (size_t)l * N, x, w.g1, N, C);
        matmul_forward(qkv, ln1, NULL, w.wqkv, N, C, 3 * C);
        rope_forward(qkv, model->ws->rope_cos, model->ws->rope_sin, B, T, C, NH);
        attention_forward(atty, t->att + (size_t)l * B * NH * T * T, qkv, B, T, C, NH, 1);
        matmul_forward(res1, atty, NULL, w.wo, N, C, C);  // res1 = x + Wo·atty
        residual_forward(res1, x, res1, (size_t)N * C);
        rmsnorm_forward(ln2, t->ln2_rstd + (size_t)l * N, res1, w.g2, N, C);
        moe_forward(model, a, l, res2, ln2);  // res2 = res1 + MoE(ln2)
        residual_forward(res2, res1, res2, (size_t)N * C);
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
    if (model->ws->targets == NULL) { fail("model_backward needs a forward pass with targets"); }
    if (model->grads_memory == NULL) { model_zero_grad(model); }
    const ModelConfig *c = &model->config;
    Activations *a = &model->ws->acts;
    ActivationTensors *t = &a->acts;
    GradActivations *g = &a->grads;
    int B = a->B, T = a->T, N = B * T, C = c->channels, L = c->num_layers, NH = c->num_heads;
    int V = c->vocab_size;
    ParameterTensors *dp = &model->grads;

    crossentropy_backward(g->dlogits, t->logits, model->ws->targets, N, V, 1.0f / N);
    memset(g->dln, 0, (size_t)N * C * sizeof(float));
    matmul_backward(g->dln, dp->wte, g->dlogits, t->lnf, NULL, model->params.wte, N, C, V);
    memset(g->dresidual, 0, (size_t)N * C * sizeof(float));
    rmsnorm_backward(g->dresidual, dp->gf, g->dln, t->res2 + (size_t)(L - 1) * N * C, model->params.gf,
                     t->lnf_rstd, N, C);
    for (int l = L - 1; l >= 0; l--) {
        LayerWeights w = layer_weights(&model->params, c, l);
        LayerWeights dw = layer_weights(dp, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * N * C;
        // dresidual holds d res2; the MoE branch adds its share of d res1
        memset(g->dln, 0, (size_t)N * C * sizeof(float));
        moe_backward(model, a, l, g->dln, g->dresidual, t->ln2 + (size_t)l * N * C);
        rmsnorm_backward(g->dresidual, dw.g2, g->dln, t->res1 + (size_t)l * N * C, w.g2,
                         t->ln2_rstd + (size_t)l * N, N, C);
        // dresidual holds d res1; the attention branch adds its share of d x
        memset(g->datty, 0, (size_t)N * C * sizeof(float));
        matmul_backward(g->datty, dw.wo, g->dresidual, t->atty + (size_t)l * N * C, NULL, w.wo, N, C, C);
        memset(g->dqkv, 0, (size_t)N * 3 * C * sizeof(float));
        attention_backward(g->dqkv, g->datty, t->qkv + (size_t)l * N * 3 * C,
                           t->att + (size_t)l * B * NH * T * T, B, T, C, NH, 1);
        rope_backward(g->dqkv, model->ws->rope_cos, model->ws->rope_sin, B, T, C, NH);
        memset(g->dln, 0, (size_t)N * C * sizeof(float));
        matmul_backward(g->dln, dw.wqkv, g->dqkv, t->ln1 + (size_t)l * N * C, NULL, w.wqkv, N, C, 3 * C);
        rmsnorm_backward(g->dresidual, dw.g1, g->dln, x, w.g1, t->ln1_rstd + (size_t)l * N, N, C);
    }
    encoder_backward(dp->wte, g->dresidual, model->ws->inputs, N, C);
}

// ----------------------------------------------------------------------------
// optimization: global-norm clipping and AdamW

// Sum of squares in fixed blocks, so the rounding does not depend on the number of threads.
static double sum_of_squares(const float *x, size_t n) {
    enum { BLOCK = 4096 };
    size_t blocks = (n + BLOCK - 1) / BLOCK;
    double *partial = (double *)malloc_check(blocks * sizeof(double));
    #pragma omp parallel for
    for (size_t block = 0; block < blocks; block++) {
        double s = 0.0;
        size_t end = (block + 1) * BLOCK < n ? (block + 1) * BLOCK : n;
        for (size_t i = block * BLOCK; i < end; i++) { s += (double)x[i] * x[i]; }
        partial[block] = s;
    }
    double total = 0.0;
    for (size_t block = 0; block < blocks; block++) { total += partial[block]; }
    free(partial);
    return total;
}

// Clips the gradient (the n floats of `sizes`, tensor by tensor) to global norm CLIP_NORM and takes
// AdamW step number `step`, with weight decay on the tensors that is_matrix marks. Returns the norm
// before clipping. The diffusion transformer (train_dit.c) updates its own buffers with it too.
static float adamw_clipped_step(float *params, const float *grads, float *m, float *v,
                                const size_t *sizes, const int *is_matrix, int num_tensors, int step,
                                float lr, float weight_decay) {
    size_t n = 0;
    for (int k = 0; k < num_tensors; k++) { n += sizes[k]; }
    float norm = (float)sqrt(sum_of_squares(grads, n));
    AdamWStep s = adamw_step(step, lr, norm);
    size_t offset = 0;
    for (int k = 0; k < num_tensors; k++) {
        float wd = is_matrix[k] ? weight_decay : 0.0f;
        size_t end = offset + sizes[k];
        #pragma omp parallel for
        for (size_t i = offset; i < end; i++) { adamw_update(&params[i], &m[i], &v[i], grads[i], s, wd); }
        offset = end;
    }
    return norm;
}

// Clips the gradient to global norm 1 and takes one AdamW step. Returns the norm before clipping.
float model_update(Model *model, float lr, float weight_decay) {
    if (model->m_memory == NULL) {
        model->m_memory = (float *)calloc_check(model->num_parameters, sizeof(float));
        model->v_memory = (float *)calloc_check(model->num_parameters, sizeof(float));
    }
    model->adam_step++;
    return adamw_clipped_step(model->params_memory, model->grads_memory, model->m_memory, model->v_memory,
                              model->param_sizes, param_is_matrix, NUM_PARAMETER_TENSORS, model->adam_step,
                              lr, weight_decay);
}

// Gradient accumulation: micro-batch 0 starts the sum, the last adds it into model->grads (float
// addition commutes, so sum + g and g + sum are the same bits).
void model_accumulate_grads(Model *model, int micro, int count) {
    if (count == 1) { return; }
    size_t n = model->num_parameters;
    if (model->grads_sum_memory == NULL) {
        model->grads_sum_memory = (float *)malloc_check(n * sizeof(float));
    }
    float *sum = model->grads_sum_memory, *grads = model->grads_memory;
    if (micro == 0) {
        memcpy(sum, grads, n * sizeof(float));
        return;
    }
    float *into = micro == count - 1 ? grads : sum;
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) { into[i] = sum[i] + grads[i]; }
}

void model_allreduce_grads(Model *model, float scale) {
    dp_sum_floats(model->grads_memory, model->num_parameters, scale);
}

// ----------------------------------------------------------------------------
// routing counts, for the controller and the statistics

void model_activated_per_layer(const Model *model, double *activated) {
    const Activations *a = &model->ws->acts;
    int N = a->B * a->T;
    for (int l = 0; l < model->config.num_layers; l++) {
        long total = 0;
        for (int n = 0; n < N; n++) { total += a->routing.n_selected[(size_t)l * N + n]; }
        activated[l] = (double)total / N;
    }
}

void model_routing_counts(const Model *model, int *n_selected, int *expert_load) {
    const Activations *a = &model->ws->acts;
    int N = a->B * a->T, L = model->config.num_layers, E = model->config.num_experts;
    memcpy(n_selected, a->routing.n_selected, (size_t)L * N * sizeof(int));
    for (int l = 0; l < L; l++) {
        const int *start = a->routing.expert_start + (size_t)l * (E + 1);
        for (int e = 0; e < E; e++) { expert_load[(size_t)l * E + e] = start[e + 1] - start[e]; }
    }
}

// ----------------------------------------------------------------------------
// sampling: the same layers, one new position at a time, attending to cached keys and values

struct Decoder {
    Activations acts;  // B = 1, T = 1
    float *kv_cache;   // (L, max_seq_len, 3C) q, k, v of every position so far (RoPE applied)
    float *scores;     // (max_seq_len) attention probabilities of the current query
};

Decoder *decoder_create(const Model *model) {
    const ModelConfig *c = &model->config;
    Decoder *d = (Decoder *)calloc_check(1, sizeof(Decoder));
    activations_alloc(&d->acts, c, 1, 1, 0);
    d->kv_cache =
        (float *)malloc_check((size_t)c->num_layers * c->max_seq_len * 3 * c->channels * sizeof(float));
    d->scores = (float *)malloc_check((size_t)c->max_seq_len * sizeof(float));
    return d;
}

void decoder_free(Decoder *d) {
    activations_free(&d->acts);
    free(d->kv_cache);
    free(d->scores);
    free(d);
}

// Feeds `token` at position `pos` (all earlier positions must have been fed) and returns the
// logits (V) for the next token.
const float *decoder_step(Model *model, Decoder *d, int token, int pos) {
    const ModelConfig *c = &model->config;
    int C = c->channels, L = c->num_layers, NH = c->num_heads, hd = C / NH, V = c->vocab_size;
    if (pos >= c->max_seq_len) {
        fail("position %d exceeds the model's maximum sequence length %d", pos, c->max_seq_len);
    }
    ActivationTensors *t = &d->acts.acts;
    encoder_forward(t->encoded, &token, model->params.wte, 1, C);
    d->acts.row_offset[0] = 0;
    for (int l = 0; l < L; l++) {
        LayerWeights w = layer_weights(&model->params, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * C;
        float *ln1 = t->ln1 + (size_t)l * C, *atty = t->atty + (size_t)l * C;
        float *res1 = t->res1 + (size_t)l * C, *ln2 = t->ln2 + (size_t)l * C, *res2 = t->res2 + (size_t)l * C;
        float *cache = d->kv_cache + (size_t)l * c->max_seq_len * 3 * C;
        float *qkv = cache + (size_t)pos * 3 * C;
        rmsnorm_forward(ln1, t->ln1_rstd + l, x, w.g1, 1, C);
        matmul_forward(qkv, ln1, NULL, w.wqkv, 1, C, 3 * C);
        for (int h = 0; h < 2 * NH; h++) {
            rope_rotate(qkv + h * hd, model->ws->rope_cos, model->ws->rope_sin, pos, hd, 1.0f);
        }
        for (int h = 0; h < NH; h++) {
            attend(atty + h * hd, d->scores, qkv + h * hd, cache + C + h * hd, cache + 2 * C + h * hd,
                   3 * (size_t)C, pos + 1, hd);
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

// ----------------------------------------------------------------------------
// results of the last forward/backward pass, copied out (the CUDA twin copies them from the
// device): what tests and tools read

void model_get_logits(const Model *model, float *out) {  // (N, V)
    memcpy(out, model->ws->acts.acts.logits,
           (size_t)model->ws->acts.B * model->ws->acts.T * model->config.vocab_size * sizeof(float));
}

void model_get_losses(const Model *model, float *out) {  // total, CE, LB_l for each l, H_l for each l
    int L = model->config.num_layers;
    out[0] = model->loss;
    out[1] = model->ce_loss;
    memcpy(out + 2, model->ws->acts.acts.aux_lb, L * sizeof(float));
    memcpy(out + 2 + L, model->ws->acts.acts.aux_ent, L * sizeof(float));
}

// n_selected (L, N), selected (L, N, E), gates (L, N, E), as in the reference fixtures.
void model_get_routing(const Model *model, int *n_selected, int *selected, float *gates) {
    size_t LN = (size_t)model->config.num_layers * model->ws->acts.B * model->ws->acts.T,
           E = model->config.num_experts;
    memcpy(n_selected, model->ws->acts.routing.n_selected, LN * sizeof(int));
    memcpy(selected, model->ws->acts.routing.selected, LN * E * sizeof(int));
    memcpy(gates, model->ws->acts.acts.gates, LN * E * sizeof(float));
}

void model_get_grads(const Model *model, float *out) {
    memcpy(out, model->grads_memory, model->num_parameters * sizeof(float));
}

void model_get_params(const Model *model, float *out) {
    memcpy(out, model->params_memory, model->num_parameters * sizeof(float));
}

void model_get_theta(const Model *model, float *out) {
    memcpy(out, model->params.theta, model->config.num_layers * sizeof(float));
}

void model_get_token_losses(const Model *model, float *out) {
    memcpy(out, model->ws->acts.acts.token_loss, (size_t)model->B * model->T * sizeof(float));
}

void model_get_moments(const Model *model, float *m, float *v) {
    if (model->m_memory == NULL) {  // no step taken yet: the moments are zero
        memset(m, 0, model->num_parameters * sizeof(float));
        memset(v, 0, model->num_parameters * sizeof(float));
        return;
    }
    memcpy(m, model->m_memory, model->num_parameters * sizeof(float));
    memcpy(v, model->v_memory, model->num_parameters * sizeof(float));
}

void model_set_moments(Model *model, const float *m, const float *v) {
    if (model->m_memory == NULL) {
        model->m_memory = (float *)malloc_check(model->num_parameters * sizeof(float));
        model->v_memory = (float *)malloc_check(model->num_parameters * sizeof(float));
    }
    memcpy(model->m_memory, m, model->num_parameters * sizeof(float));
    memcpy(model->v_memory, v, model->num_parameters * sizeof(float));
}

#endif  // DTOPP_CUDA

// ----------------------------------------------------------------------------
// the training program
#ifndef TESTING
#include "dataloader.h"
#include "options.h"
#include "tokenizer.h"

// Named model sizes; explicit options override any field.
typedef struct {
    const char *name;
    int layers, channels, heads, experts, expert_hidden;
} Preset;
static const Preset presets[] = {
    {"tiny", 2, 64, 2, 8, 64},      // seconds a step on a laptop: for tests
    {"small", 4, 128, 4, 8, 128},   // the default: learns TinyShakespeare's form in minutes on 2 cores
    {"medium", 6, 256, 8, 16, 256},
    {"gpt2-moe", 12, 768, 12, 64, 384},  // GPT-2 small's trunk with 64 experts, for the GPU
};

typedef struct {
    // data and files
    const char *train_pattern, *val_pattern, *tokenizer_path, *out_dir, *init_path, *resume_dir;
    // model (negative: take the preset's value)
    const char *preset;
    int layers, channels, heads, experts, expert_hidden, max_seq_len;
    // routing
    const char *routing, *controller;
    int drn, renorm, k;  // drn < 0: the mode's default
    float p, tgt, Kp, Ki, p0, pmin, pmax, theta_init, lb_coef, ent_coef;  // ent_coef < 0: the mode's default
    // training
    int batch, seq_len, steps, warmup, shuffle, threads;
    int grad_accum, check_ranks;  // micro-batches per step and rank; steps between replica checks
    float lr, weight_decay;
    long long seed;
    // evaluation, sampling, checkpoints
    int eval_every, eval_batches, sample_every, sample_tokens, top_k, checkpoint_every, stop_at, generate;
    float temperature;
    const char *prompt;
    const char *routing_dump;
    int model_options_given;  // how many architecture or routing options the command line set
} Options;

#define MAX_THREADS 1024  // far more is no use, and libgomp crashes (stack overflow) on 100,000

static int option_specs(Options *o, OptionSpec *specs) {
    OptionSpec list[] = {
        {"train", 's', &o->train_pattern, 0, 0, "training shards (glob pattern)", 0},
        {"val", 's', &o->val_pattern, 0, 0, "validation shards (glob pattern; empty: none)", 0},
        {"tokenizer", 's', &o->tokenizer_path, 0, 0,
         "tokenizer file, for prompts and samples: GPT-2's, or the one prepro --vocab bpe wrote", 0},
        {"out", 's', &o->out_dir, 0, 0, "output directory: log.csv, model.bin, checkpoints", 0},
        {"init", 's', &o->init_path, 0, 0,
         "start from this model checkpoint (architecture and routing from the file)", 0},
        {"resume", 's', &o->resume_dir, 0, 0, "continue the run whose checkpoints are in this directory", 0},
        {"model", 's', &o->preset, 0, 0, "size preset: tiny, small, medium, gpt2-moe", 1},
        {"layers", 'i', &o->layers, 1, MAX_SIZE, "L, transformer blocks", 1},
        {"channels", 'i', &o->channels, 2, MAX_SIZE, "C, model width", 1},
        {"heads", 'i', &o->heads, 1, MAX_SIZE, "NH, attention heads", 1},
        {"experts", 'i', &o->experts, 1, MAX_EXPERTS, "E, experts per layer", 1},
        {"expert-hidden", 'i', &o->expert_hidden, 1, MAX_SIZE, "H, hidden width of one expert", 1},
        {"max-seq-len", 'i', &o->max_seq_len, 1, MAX_SIZE,
         "longest sequence the model accepts, for sampling (default: 1024, at least seq-len)", 1},
        {"routing", 's', &o->routing, 0, 0, "topk, topp or dtopp", 1},
        {"controller", 's', &o->controller, 0, 0, "dtopp: global (one p) or layer (one p per layer)", 1},
        {"drn", 'i', &o->drn, 0, 1, "Dynamic Routing Normalization 1/0 (default: 1 for dtopp, else 0)", 1},
        {"renorm", 'i', &o->renorm, 0, 1, "renormalise the gates over the selected experts 1/0", 1},
        {"k", 'i', &o->k, 1, MAX_EXPERTS, "topk: experts per token", 1},
        {"p", 'f', &o->p, 0, 1, "topp: the fixed threshold", 1},
        {"tgt", 'f', &o->tgt, 1, MAX_EXPERTS, "dtopp: target average number of activated experts", 1},
        {"kp", 'f', &o->Kp, ANY_FLOAT, "dtopp: proportional gain", 1},
        {"ki", 'f', &o->Ki, ANY_FLOAT, "dtopp: integral gain", 1},
        {"p0", 'f', &o->p0, 0, 1, "dtopp: starting and central threshold", 1},
        {"pmin", 'f', &o->pmin, 0, 1, "dtopp: lowest threshold", 1},
        {"pmax", 'f', &o->pmax, 0, 1, "dtopp: highest threshold", 1},
        {"theta-init", 'f', &o->theta_init, ANY_FLOAT, "initial DRN scale", 1},
        {"lb-coef", 'f', &o->lb_coef, NOT_NEGATIVE_FLOAT, "load-balance loss coefficient", 1},
        {"ent-coef", 'f', &o->ent_coef, NOT_NEGATIVE_FLOAT,
         "router entropy loss coefficient (default: 1e-3 top-p modes, 0 topk)", 1},
        {"batch", 'i', &o->batch, 1, MAX_SIZE, "B, sequences per step", 0},
        {"seq-len", 'i', &o->seq_len, 1, MAX_SIZE, "T, tokens per sequence", 0},
        {"steps", 'i', &o->steps, 1, INT_MAX, "optimizer steps", 0},
        {"lr", 'f', &o->lr, NOT_NEGATIVE_FLOAT, "peak learning rate", 0},
        {"warmup", 'i', &o->warmup, 1, INT_MAX, "learning-rate warm-up steps", 0},
        {"weight-decay", 'f', &o->weight_decay, NOT_NEGATIVE_FLOAT, "AdamW weight decay of the matrices", 0},
        {"shuffle", 'i', &o->shuffle, 0, 1, "shuffle the training windows 1/0", 0},
        {"seed", 'l', &o->seed, 0, 0, "seed of the initialisation, the shuffle and the sampler", 0},
        {"threads", 'i', &o->threads, 0, MAX_THREADS, "OpenMP threads (0: all)", 0},
        {"grad-accum", 'i', &o->grad_accum, 1, MAX_SIZE,
         "micro-batches per step and rank (--batch is split over all)", 0},
        {"check-ranks", 'i', &o->check_ranks, NOT_NEGATIVE_INT,
         "steps between checks that ranks hold one model (0: never)", 0},
        {"eval-every", 'i', &o->eval_every, NOT_NEGATIVE_INT,
         "steps between validations (0: only at the end)", 0},
        {"eval-batches", 'i', &o->eval_batches, NOT_NEGATIVE_INT, "validation batches", 0},
        {"sample-every", 'i', &o->sample_every, NOT_NEGATIVE_INT,
         "steps between samples (0: only at the end)", 0},
        {"sample-tokens", 'i', &o->sample_tokens, 0, MAX_SIZE, "tokens per sample (0: no samples)", 0},
        {"prompt", 's', &o->prompt, 0, 0, "text the samples start from (default: none)", 0},
        {"temperature", 'f', &o->temperature, NOT_NEGATIVE_FLOAT,
         "sampling temperature (0: most likely token)", 0},
        {"top-k", 'i', &o->top_k, NOT_NEGATIVE_INT, "sample from the top k tokens (0: all)", 0},
        {"checkpoint-every", 'i', &o->checkpoint_every, NOT_NEGATIVE_INT,
         "steps between checkpoints (0: only at the end)", 0},
        {"routing-dump", 's', &o->routing_dump, 0, 0,
         "at the last validation, write every token's |S| per layer and loss to this CSV", 0},
        {"stop-at", 'i', &o->stop_at, NOT_NEGATIVE_INT,
         "stop after this step with a checkpoint (0: run to --steps); continue with --resume", 0},
        {"generate", 'i', &o->generate, 0, MAX_SIZE,
         "with --init: print this many tokens after --prompt and exit", 0},
    };
    int n = (int)(sizeof(list) / sizeof(list[0]));
    if (specs != NULL) { memcpy(specs, list, sizeof(list)); }
    return n;
}

static void default_options(Options *o) {
    memset(o, 0, sizeof(*o));
    o->train_pattern = "data/train_bytes_train.bin";  // what `make train` writes
    o->val_pattern = "data/train_bytes_val.bin";
    o->tokenizer_path = "tokenizer.bin";
    o->out_dir = "out";
    o->init_path = o->resume_dir = NULL;
    o->preset = "small";
    o->layers = o->channels = o->heads = o->experts = o->expert_hidden = o->max_seq_len = -1;
    o->routing = "dtopp";
    o->controller = "global";
    o->drn = -1;
    o->renorm = 1;
    o->k = 2;
    o->p = 0.5f;
    o->tgt = 2.0f;
    o->Kp = 0.1f;  // tuned: doc/results.md (the spec's provisional values were 0.3, 0.05, 0.5)
    o->Ki = 0.3f;
    o->p0 = 0.8f;
    o->pmin = 0.01f;
    o->pmax = 1.0f;
    o->theta_init = 1.0f;
    o->lb_coef = 1e-4f;
    o->ent_coef = -1.0f;
    o->batch = 16;
    o->seq_len = 64;
    o->steps = 600;
    o->lr = 3e-3f;
    o->warmup = 30;
    o->weight_decay = 0.1f;
    o->shuffle = 1;
    o->seed = 1337;
    o->threads = 0;
    o->grad_accum = 1;
    o->check_ranks = 0;
    o->eval_every = 100;
    o->eval_batches = 10;
    o->sample_every = 200;
    o->sample_tokens = 128;
    o->prompt = "";
    o->temperature = 1.0f;
    o->top_k = 40;
    o->checkpoint_every = 200;
    o->routing_dump = NULL;
    o->stop_at = 0;
    o->generate = 0;
}

static void print_usage(void) {
    Options defaults;
    default_options(&defaults);
    OptionSpec specs[64];
    int n = option_specs(&defaults, specs);
    printf("usage: train_dtopp [--option value ...]\n\n"
           "Trains a DTop-p Mixture-of-Experts language model on token shards written by prepro,\n"
           "or, with --init and --generate, samples from a trained one.\n\n");
    print_option_table(specs, n);
}

static void parse_options(Options *o, int argc, char **argv) {
    OptionSpec specs[64];
    int n = option_specs(o, specs);
    o->model_options_given += parse_option_table(specs, n, argc, argv, print_usage);
}

// The model and router configuration that the options describe, for a vocabulary of V tokens.
static void configure_model(const Options *o, int V, int vocab_kind, ModelConfig *c, RouterConfig *rc) {
    const Preset *preset = NULL;
    for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++) {
        if (strcmp(o->preset, presets[i].name) == 0) { preset = &presets[i]; }
    }
    if (preset == NULL) {
        fail("option --model: unknown preset '%s' (tiny, small, medium, gpt2-moe)", o->preset);
    }
    c->vocab_size = V;
    c->vocab_kind = vocab_kind;
    c->padded_vocab_size = padded_vocab(V);
    c->num_layers = o->layers >= 0 ? o->layers : preset->layers;
    c->channels = o->channels >= 0 ? o->channels : preset->channels;
    c->num_heads = o->heads >= 0 ? o->heads : preset->heads;
    c->num_experts = o->experts >= 0 ? o->experts : preset->experts;
    c->expert_hidden = o->expert_hidden >= 0 ? o->expert_hidden : preset->expert_hidden;
    c->max_seq_len = o->max_seq_len >= 0 ? o->max_seq_len : (o->seq_len > 1024 ? o->seq_len : 1024);
    const char *controllers[] = {"global", "layer"};
    rc->routing = parse_name(o->routing, routing_names, 3, "routing");
    rc->controller = parse_name(o->controller, controllers, 2, "controller");
    rc->drn = o->drn >= 0 ? o->drn : rc->routing == ROUTING_DTOPP;
    rc->renorm = o->renorm;
    rc->k = o->k;
    rc->p = o->p;
    rc->tgt = o->tgt;
    rc->Kp = o->Kp;
    rc->Ki = o->Ki;
    rc->p0 = o->p0;
    rc->pmin = o->pmin;
    rc->pmax = o->pmax;
    rc->theta_init = o->theta_init;
    rc->lb_coef = o->lb_coef;
    rc->ent_coef = o->ent_coef >= 0.0f ? o->ent_coef : (rc->routing == ROUTING_TOPK ? 0.0f : 1e-3f);
}

// What the ranges of the options table cannot say.
static void check_options(const Options *o) {
    if (!(o->lr > 0.0f)) { fail("--lr must be > 0"); }
    if ((long long)o->batch * o->seq_len > MAX_SIZE) {
        fail("--batch x --seq-len is %lld tokens per step, more than %d", (long long)o->batch * o->seq_len,
             MAX_SIZE);
    }
    if (o->init_path != NULL && o->resume_dir != NULL) { fail("--init and --resume exclude each other"); }
    if (o->generate > 0 && o->init_path == NULL) { fail("--generate needs --init MODEL.bin"); }
}

// ----------------------------------------------------------------------------
// text in and out: GPT-2 tokens through tokenizer.bin, trained BPE tokens through the tokenizer
// file prepro wrote with the shards, or bytes for a byte-level vocabulary

typedef struct {
    int byte_level;  // a token is a byte
    int loaded;
    Tokenizer tokenizer;
} TextCodec;

// The model's header says what its tokens are; a vocabulary of unknown kind cannot be printed.
static void codec_init(TextCodec *codec, const char *tokenizer_path, const ModelConfig *c) {
    codec->byte_level = c->vocab_kind == VOCAB_BYTES;
    codec->loaded = 0;
    if (c->vocab_kind == VOCAB_UNKNOWN) {
        fail("the model's vocabulary (%d tokens) is of no known kind: cannot print text", c->vocab_size);
    }
    if (!codec->byte_level) {
        tokenizer_init(&codec->tokenizer, tokenizer_path);
        codec->loaded = 1;
        if (codec->tokenizer.vocab_kind != c->vocab_kind) {
            fail("%s holds a %s vocabulary but the model's is %s%s", tokenizer_path,
                 vocab_kind_name(codec->tokenizer.vocab_kind), vocab_kind_name(c->vocab_kind),
                 c->vocab_kind == VOCAB_BPE ? ": pass the PREFIX_tokenizer.bin prepro wrote with --tokenizer" : "");
        }
        if (tokenizer_vocab_size(&codec->tokenizer) != c->vocab_size) {
            fail("%s has %d tokens but the model's vocabulary has %d", tokenizer_path,
                 tokenizer_vocab_size(&codec->tokenizer), c->vocab_size);
        }
    }
}

static int *codec_encode(const TextCodec *codec, const char *text, size_t *n) {
    size_t len = strlen(text);
    if (!codec->byte_level) { return tokenizer_encode(&codec->tokenizer, text, len, n); }
    int *ids = (int *)malloc_check(len * sizeof(int));
    for (size_t i = 0; i < len; i++) { ids[i] = (unsigned char)text[i]; }
    *n = len;
    return ids;
}

static void codec_print(const TextCodec *codec, int token) {
    if (codec->byte_level) {
        putchar(token);
    } else {
        size_t len;
        const unsigned char *bytes = tokenizer_decode(&codec->tokenizer, token, &len);
        fwrite(bytes, 1, len, stdout);
    }
}

// Prints the prompt and then up to n_tokens sampled tokens: fewer when the model's maximum
// sequence length comes first. Starts from end-of-text (or a newline for bytes) when the prompt is
// empty. Returns the number of tokens sampled.
static int generate_text(Model *model, const TextCodec *codec, const char *prompt, int n_tokens,
                          float temperature, int top_k, uint64_t *rng) {
    size_t n_prompt;
    int *ids = codec_encode(codec, prompt, &n_prompt);
    if (n_prompt == 0) {
        ids = (int *)realloc_check(ids, sizeof(int));
        ids[0] = codec->byte_level ? '\n' : tokenizer_eot(&codec->tokenizer);
        n_prompt = 1;
    } else {
        fputs(prompt, stdout);
    }
    int max_len = model->config.max_seq_len;
    if ((int)n_prompt >= max_len) {
        fail("the prompt has %zu tokens; the model takes at most %d", n_prompt, max_len);
    }
    Decoder *decoder = decoder_create(model);
    const float *logits = NULL;
    for (size_t i = 0; i < n_prompt; i++) { logits = decoder_step(model, decoder, ids[i], (int)i); }
    int pos = (int)n_prompt, sampled = 0;
    for (; sampled < n_tokens && pos < max_len; sampled++, pos++) {
        int token = sample_token(logits, model->config.vocab_size, temperature, top_k, rng);
        codec_print(codec, token);
        if (pos + 1 < max_len) { logits = decoder_step(model, decoder, token, pos); }
    }
    printf("\n");
    fflush(stdout);
    decoder_free(decoder);
    free(ids);
    return sampled;
}

// ----------------------------------------------------------------------------
// training state files (doc/formats.md): optimizer moments, step, data position, sampler state,
// and the settings of the run. A checkpoint is the pair model_STEP.bin + state_STEP.bin; the newer
// pair is complete before the older one is removed, so a crash never leaves the run without a
// checkpoint.

// Version 2 added the run's settings (words 15-18); version 1 files are still read.
#define STATE_VERSION 2
static const int state_versions[] = {1, STATE_VERSION};

// What a state file holds besides the moments.
typedef struct {
    int step;               // optimizer steps of the run so far
    int adam_step;          // AdamW's step count (for its bias correction)
    long long position[4];  // the training data loader's position (dataloader_get_position)
    uint64_t rng;           // the sampler's random state
    int32_t param_check;    // the model's parameter count, low 31 bits: the pair must match
    // the settings that shape the rest of the run besides the data (whose fingerprint is in
    // position[3]): a resumed run must have the same, or it is another run (0 in version 1)
    int steps, warmup;
    float lr, weight_decay;
    int ranks;              // the processes that trained the run (0 in older files: one)
} TrainingState;

// The header of a state file (doc/formats.md); saving and loading both walk this table.
#define STATE_HEADER_FIELDS 10
static void state_header_fields(HeaderField *fields, TrainingState *s) {
    HeaderField list[STATE_HEADER_FIELDS] = {{2, 4, &s->step}, {3, 4, &s->adam_step}, {4, 32, s->position},
                                             {12, 8, &s->rng}, {14, 4, &s->param_check}, {15, 4, &s->steps},
                                             {16, 4, &s->warmup}, {17, 4, &s->lr}, {18, 4, &s->weight_decay},
                                             {19, 4, &s->ranks}};
    memcpy(fields, list, sizeof(list));
}

static void state_save(const Model *model, const char *path, TrainingState s) {
    s.adam_step = model->adam_step;
    s.param_check = (int32_t)(model->num_parameters & 0x7fffffff);
    s.ranks = dp_ranks;
    HeaderField fields[STATE_HEADER_FIELDS];
    state_header_fields(fields, &s);
    int32_t header[HEADER_WORDS] = {STATE_MAGIC, STATE_VERSION};
    header_pack(header, fields, STATE_HEADER_FIELDS);
    float *m = (float *)malloc_check(model->num_parameters * sizeof(float));
    float *v = (float *)malloc_check(model->num_parameters * sizeof(float));
    model_get_moments(model, m, v);
    char tmp[4096];
    FILE *f = open_for_atomic_write(path, tmp, sizeof(tmp));
    fwrite_check(header, sizeof(int32_t), HEADER_WORDS, f, tmp);
    fwrite_check(m, sizeof(float), model->num_parameters, f, tmp);
    fwrite_check(v, sizeof(float), model->num_parameters, f, tmp);
    finish_atomic_write(f, tmp, path);
    free(m);
    free(v);
}

// Restores the moments and AdamW's step into the model; returns the rest.
static TrainingState state_load(Model *model, const char *path) {
    int32_t header[HEADER_WORDS];
    long size;
    FILE *f = open_with_header(path, header, STATE_MAGIC, state_versions, 2, "training state", &size);
    TrainingState s;
    memset(&s, 0, sizeof(s));
    HeaderField fields[STATE_HEADER_FIELDS];
    state_header_fields(fields, &s);
    header_unpack(header, fields, header[1] == 1 ? 5 : STATE_HEADER_FIELDS);  // the fields of its version
    if (s.param_check != (int32_t)(model->num_parameters & 0x7fffffff)) {
        fail("%s belongs to a model of a different size", path);
    }
    // AdamW counts one step per optimizer step, so 1 <= adam_step <= step (and never overflows)
    if (s.step < 1 || s.adam_step < 1 || s.adam_step > s.step) {
        fail("%s: invalid step %d or AdamW step %d", path, s.step, s.adam_step);
    }
    check_payload_size(path, size, 2 * model->num_parameters * sizeof(float));
    model->adam_step = s.adam_step;
    float *m = (float *)malloc_check(model->num_parameters * sizeof(float));
    float *v = (float *)malloc_check(model->num_parameters * sizeof(float));
    fread_check(m, sizeof(float), model->num_parameters, f, path);
    fread_check(v, sizeof(float), model->num_parameters, f, path);
    fclose(f);
    check_finite(m, model->num_parameters, path, "first moment");
    check_finite(v, model->num_parameters, path, "second moment");
    for (size_t i = 0; i < model->num_parameters; i++) {
        if (v[i] < 0.0f) { fail("%s: second moment %zu is negative (%g)", path, i, v[i]); }
    }
    model_set_moments(model, m, v);
    free(m);
    free(v);
    return s;
}

static void checkpoint_path(char *out, size_t size, const char *dir, const char *kind, int step) {
    snprintf(out, size, "%s/%s_%08d.bin", dir, kind, step);
}

// The step of a checkpoint file's name (model_STEP.bin, state_STEP.bin), or -1.
static int checkpoint_step(const char *path, const char *kind) {
    const char *slash = strrchr(path, '/'), *name = slash ? slash + 1 : path;
    char format[64];
    int step, end = 0;
    snprintf(format, sizeof(format), "%s_%%d.bin%%n", kind);
    if (sscanf(name, format, &step, &end) != 1 || name[end] != '\0') { return -1; }
    return step >= 0 ? step : -1;
}

// The highest step with both files present, or -1.
static int latest_checkpoint(const char *dir) {
    char pattern[4096];
    snprintf(pattern, sizeof(pattern), "%s/state_*.bin", dir);
    glob_t found;
    int best = -1;
    if (glob(pattern, 0, NULL, &found) == 0) {
        for (size_t i = 0; i < found.gl_pathc; i++) {
            int step = checkpoint_step(found.gl_pathv[i], "state");
            char model_path[4096];
            checkpoint_path(model_path, sizeof(model_path), dir, "model", step);
            if (step >= 0 && access(model_path, R_OK) == 0 && step > best) { best = step; }
        }
        globfree(&found);
    }
    return best;
}

// ----------------------------------------------------------------------------
// logging

// Appends to the log of a resumed run, if there is one; otherwise starts one with its header.
static FILE *open_log(const char *path, const Model *model, int append) {
    append = append && access(path, F_OK) == 0;
    FILE *f = fopen(path, append ? "a" : "w");
    if (f == NULL) { fail("cannot write %s: %s", path, strerror(errno)); }
    if (!append) {
        fprintf(f, "step,loss,ce_loss,val_loss,lr,grad_norm,activated,p,tokens_per_s");
        for (int l = 0; l < model->config.num_layers; l++) {
            fprintf(f, ",p_%d,mean_%d,std_%d,theta_%d,lb_%d,ent_%d,load_min_%d,load_max_%d,load_cv_%d", l, l,
                    l, l, l, l, l, l, l);
            for (int s = 0; s <= model->config.num_experts; s++) { fprintf(f, ",hist_%d_%d", l, s); }
        }
        fprintf(f, "\n");
    }
    return f;
}

// losses: the step's (total, CE, LB_l for each l, H_l for each l), over all its micro-batches and ranks.
static void log_step(FILE *f, const Model *model, const RoutingStats *stats, const float *losses,
                     const float *p_used, int step, float val_loss, float lr, float grad_norm,
                     double tokens_per_s) {
    int L = model->config.num_layers, E = model->config.num_experts;
    float *theta = (float *)malloc_check(L * sizeof(float));
    model_get_theta(model, theta);  // after this step's update
    fprintf(f, "%d,%.6f,%.6f,", step, losses[0], losses[1]);
    if (val_loss >= 0.0f) { fprintf(f, "%.6f", val_loss); }
    fprintf(f, ",%.6e,%.6f,%.6f,%.6f,%.1f", lr, grad_norm, stats->activated, p_used[0], tokens_per_s);
    for (int l = 0; l < L; l++) {
        fprintf(f, ",%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%d,%d,%.6f", p_used[l], stats->layer_mean[l],
                stats->layer_std[l], theta[l], losses[2 + l], losses[2 + L + l], stats->load_min[l],
                stats->load_max[l], stats->load_cv[l]);
        for (int s = 0; s <= E; s++) { fprintf(f, ",%d", stats->histogram[(size_t)l * (E + 1) + s]); }
    }
    fprintf(f, "\n");
    fflush(f);
    free(theta);
}

// Writes a row per validation position: the token, its position in the sequence, the loss of
// predicting the next token from it, and |S| in every layer: what the adaptivity analysis reads.
static void dump_routing(FILE *f, const Model *model, const int *inputs, int write_header) {
    int N = model->B * model->T, L = model->config.num_layers, E = model->config.num_experts;
    if (write_header) {
        fprintf(f, "token,position,loss");
        for (int l = 0; l < L; l++) { fprintf(f, ",experts_%d", l); }
        fprintf(f, "\n");
    }
    float *loss = (float *)malloc_check((size_t)N * sizeof(float));
    int *n_selected = (int *)malloc_check((size_t)L * N * sizeof(int));
    int *load = (int *)malloc_check((size_t)L * E * sizeof(int));
    model_get_token_losses(model, loss);
    model_routing_counts(model, n_selected, load);
    for (int n = 0; n < N; n++) {
        fprintf(f, "%d,%d,%.5f", inputs[n], n % model->T, loss[n]);
        for (int l = 0; l < L; l++) { fprintf(f, ",%d", n_selected[(size_t)l * N + n]); }
        fprintf(f, "\n");
    }
    free(loss);
    free(n_selected);
    free(load);
}

// Mean cross-entropy over eval_batches validation batches, and the per-layer table of activated
// experts (mean ± σ over all validation tokens) with a histogram of |S|. With dump_path, also
// every token's routing (dump_routing) to dump.
static float evaluate(Model *model, DataLoader *val, int batches, FILE *dump, const char *dump_path) {
    int L = model->config.num_layers, E = model->config.num_experts;
    RoutingStats stats;
    routing_stats_alloc(&stats, &model->config);
    long long *hist = (long long *)calloc_check((size_t)L * (E + 1), sizeof(long long));
    double loss = 0.0;
    dataloader_reset(val);
    batches = batches < (int)val->num_batches ? batches : (int)val->num_batches;
    for (int b = 0; b < batches; b++) {
        dataloader_next_batch(val);
        model_forward(model, val->inputs, val->targets, val->B, val->T);
        loss += model->ce_loss;
        routing_stats_compute(&stats, model);
        for (size_t i = 0; i < (size_t)L * (E + 1); i++) { hist[i] += stats.histogram[i]; }
        if (dump != NULL) { dump_routing(dump, model, val->inputs, b == 0); }
    }
    if (dump != NULL && fflush(dump) != 0) { fail("cannot write %s: %s", dump_path, strerror(errno)); }
    printf("  layer  activated experts    |S| = 1 .. %d\n", E);
    for (int l = 0; l < L; l++) {
        double n = 0, sum = 0, sumsq = 0;
        for (int s = 0; s <= E; s++) {
            n += hist[(size_t)l * (E + 1) + s];
            sum += (double)s * hist[(size_t)l * (E + 1) + s];
            sumsq += (double)s * s * hist[(size_t)l * (E + 1) + s];
        }
        double mean = n > 0 ? sum / n : 0.0, var = n > 0 ? sumsq / n - mean * mean : 0.0;
        printf("  %5d  %6.2f ± %-5.2f      ", l, mean, var > 0 ? sqrt(var) : 0.0);
        static const char *bars[] = {" ", "▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"};
        for (int s = 1; s <= E; s++) {
            double share = n > 0 ? hist[(size_t)l * (E + 1) + s] / n : 0.0;
            fputs(bars[(int)ceil(share * 8)], stdout);
        }
        printf("\n");
    }
    free(hist);
    routing_stats_free(&stats);
    return batches > 0 ? (float)(loss / batches) : -1.0f;
}

static void ensure_directory(const char *dir) {
    char cmd[4200];
    struct stat st;
    if (stat(dir, &st) != 0) {
        if (mkdir(dir, 0755) != 0) { fail("cannot create output directory %s: %s", dir, strerror(errno)); }
    } else if (!S_ISDIR(st.st_mode)) {
        fail("output directory %s is not a directory", dir);
    }
    snprintf(cmd, sizeof(cmd), "%s/.write_test", dir);
    FILE *f = fopen(cmd, "w");
    if (f == NULL) { fail("output directory %s is not writable: %s", dir, strerror(errno)); }
    fclose(f);
    remove(cmd);
}

// Whether two paths name the same directory ("out", "out/", "./out"): compared by identity.
static int same_directory(const char *a, const char *b) {
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// Calls visit(path, step, context) for every file of dir matching pattern (e.g. "model_*.bin");
// step is that of a checkpoint file's name (-1 for other files).
static void for_each_file(const char *dir, const char *pattern, const char *kind,
                          void (*visit)(const char *, int, void *), void *context) {
    char full[4200];
    snprintf(full, sizeof(full), "%s/%s", dir, pattern);
    glob_t found;
    if (glob(full, 0, NULL, &found) != 0) { return; }
    for (size_t i = 0; i < found.gl_pathc; i++) {
        visit(found.gl_pathv[i], kind ? checkpoint_step(found.gl_pathv[i], kind) : -1, context);
    }
    globfree(&found);
}

// Checkpoint files of steps other than *keep (all of them for -1) are removed: older pairs a
// crash left before removing them, newer ones it left incomplete. So are the run's unfinished
// ".tmp" files.
static void remove_leftover(const char *path, int step, void *keep) {
    if (step == *(int *)keep) { return; }
    if (remove(path) != 0) { fail("cannot remove %s: %s", path, strerror(errno)); }
    printf("removed %s, left by an interrupted run\n", path);
}

static void remove_leftovers(const char *dir, int keep_step) {
    for_each_file(dir, "model_*.bin", "model", remove_leftover, &keep_step);
    for_each_file(dir, "state_*.bin", "state", remove_leftover, &keep_step);
    int any = -2;  // .tmp files have no step: all of the run's go, and nothing else
    for_each_file(dir, "model*.bin.tmp", NULL, remove_leftover, &any);
    for_each_file(dir, "state_*.bin.tmp", NULL, remove_leftover, &any);
    for_each_file(dir, "log.csv.tmp", NULL, remove_leftover, &any);
}

static void note_run_file(const char *path, int step, void *found) {
    (void)step;
    if (((char *)found)[0] == '\0') { snprintf((char *)found, 4096, "%s", path); }
}

// A new run never overwrites another run's model or checkpoints: it starts in a directory without
// them, or continues the run they belong to (--resume).
static void refuse_other_run(const char *dir) {
    char found[4096] = "";
    for_each_file(dir, "model.bin", NULL, note_run_file, found);
    for_each_file(dir, "model_*.bin", NULL, note_run_file, found);
    for_each_file(dir, "state_*.bin", NULL, note_run_file, found);
    if (found[0] != '\0') {
        fail(
            "%s already holds a run (%s): continue it with --resume %s, or move it away, or choose another "
            "--out",
            dir, found, dir);
    }
}

// On resume, log.csv may hold rows of steps after the checkpoint (the run went on before it was
// stopped, and a row may be cut off); they are dropped, since the resumed run writes them again.
static void truncate_log(const char *path, int last_step) {
    FILE *in = fopen(path, "rb");
    if (in == NULL) { return; }  // open_log starts a new one
    char tmp[4200], *line = NULL;
    size_t capacity = 0;
    ssize_t len;
    FILE *out = open_for_atomic_write(path, tmp, sizeof(tmp));
    for (int row = 0; (len = getline(&line, &capacity, in)) > 0 && line[len - 1] == '\n'; row++) {
        if (row > 0 && atoi(line) > last_step) { break; }
        fwrite_check(line, 1, (size_t)len, out, tmp);
    }
    free(line);
    fclose(in);
    finish_atomic_write(out, tmp, path);
}

// ----------------------------------------------------------------------------
// the training program: setup, then a loop of training steps with evaluation, samples and
// checkpoints

typedef struct {
    Options o;
    Model model;
    DataLoader train, val;
    int have_val;
    TextCodec codec;
    uint64_t rng;         // the sampler's stream
    int start_step;       // the first step this process runs
    int resumed_here;     // --resume names the output directory
    int last_checkpoint;  // the step of the newest checkpoint in o.out_dir (-1: none yet)
    FILE *log;            // rank 0 only (NULL on the others)
    FILE *routing_dump;   // --routing-dump, opened at the start so that a bad path fails at once
    RoutingStats stats;   // of the current step, over all its micro-batches and ranks
    float *p_used;        // (L) the thresholds the current step routed with
    double *totals;       // the step's sums: losses (2 + 2L), then the routing counts
    float *losses;        // (2 + 2L) the step's losses: total, CE, LB_l, H_l
} Run;

// Stops a run whose numbers are no longer finite, saying which checkpoint survives.
static void fail_diverged(const Run *run, const char *what, double value, int step) {
    if (run->last_checkpoint >= 0) {
        fail(
            "%s is %g at step %d: training diverged (try a lower --lr); the last checkpoint, step %d in %s, "
            "is kept",
            what, value, step, run->last_checkpoint, run->o.out_dir);
    }
    fail("%s is %g at step %d: training diverged (try a lower --lr); no checkpoint was written to %s", what,
         value, step, run->o.out_dir);
}

// Writes the pair of step `step` (and model.bin), then removes the previous pair. Parameters that
// are not finite are never written: the previous checkpoint stays the last good one.
static void write_checkpoint(Run *run, int step) {
    const Model *model = &run->model;
    const Options *o = &run->o;
    float *params = (float *)malloc_check(model->num_parameters * sizeof(float));
    model_get_params(model, params);
    for (size_t i = 0; i < model->num_parameters; i++) {
        if (!isfinite(params[i])) { fail_diverged(run, "a parameter", params[i], step); }
    }
    char model_path[4096], state_path[4096], latest[4096];
    TrainingState state = {.step = step, .rng = run->rng, .steps = o->steps, .warmup = o->warmup, .lr = o->lr,
                           .weight_decay = o->weight_decay};
    dataloader_get_position(&run->train, state.position);
    checkpoint_path(model_path, sizeof(model_path), o->out_dir, "model", step);
    checkpoint_path(state_path, sizeof(state_path), o->out_dir, "state", step);
    checkpoint_save(model, params, model_path);
    state_save(model, state_path, state);
    snprintf(latest, sizeof(latest), "%s/model.bin",
             o->out_dir);  // the latest model under a fixed name, for sampling
    checkpoint_save(model, params, latest);
    free(params);
    if (run->last_checkpoint >= 0 && run->last_checkpoint != step) {
        checkpoint_path(model_path, sizeof(model_path), o->out_dir, "model", run->last_checkpoint);
        checkpoint_path(state_path, sizeof(state_path), o->out_dir, "state", run->last_checkpoint);
        remove(state_path);
        remove(model_path);
    }
    run->last_checkpoint = step;
}

// --generate: print a sample from a checkpoint and exit.
static int generate_only(const Options *o, uint64_t rng) {
    Model model;
    model_load(&model, o->init_path);
    TextCodec codec;
    codec_init(&codec, o->tokenizer_path, &model.config);
    double t0 = wall_seconds();
    int sampled = generate_text(&model, &codec, o->prompt, o->generate, o->temperature, o->top_k, &rng);
    fprintf(stderr, "%d tokens in %.2f s", sampled, wall_seconds() - t0);
    if (sampled < o->generate) {
        fprintf(stderr, " (the model's maximum sequence length is %d)", model.config.max_seq_len);
    }
    fprintf(stderr, "\n");
    if (codec.loaded) { tokenizer_free(&codec.tokenizer); }
    model_free(&model);
    return EXIT_SUCCESS;
}

// Resuming on another number of ranks works (every rank reads the same global batches and holds the
// whole state), but the gradients are then summed in another order: the run goes on correctly, not
// bit for bit as it would have on the same number of ranks.
static void note_rank_change(int saved_ranks) {
    if (saved_ranks == dp_ranks || dp_rank > 0) { return; }
    fprintf(stderr, "note: the checkpoint was written by a run on %d rank(s) and continues on %d: allowed, "
            "but the gradient sums are added in another order, so the run is not bitwise the one %d "
            "rank(s) would give\n", saved_ranks, dp_ranks, saved_ranks);
}

// A resumed run must be the run that wrote the checkpoint: the data and its order are checked by
// the loader's fingerprint, the schedule and the optimizer here.
static void check_same_run(const TrainingState *s, const Options *o, const char *path) {
    if (s->steps == 0) {  // version 1 files do not record them
        printf("note: %s does not record --steps, --warmup, --lr, --weight-decay: they are not checked\n",
               path);
        return;
    }
    const char *which = s->steps != o->steps ? "--steps"
                        : s->warmup != o->warmup ? "--warmup"
                        : s->lr != o->lr ? "--lr"
                        : s->weight_decay != o->weight_decay ? "--weight-decay" : NULL;
    if (which != NULL) {
        fail(
            "%s was written by a run with --steps %d --warmup %d --lr %g --weight-decay %g; this command's "
            "%s "
            "differs: resume with the run's settings, or start a new run from it with --init",
            path, s->steps, s->warmup, s->lr, s->weight_decay, which);
    }
}

// --resume: the newest complete checkpoint of the directory, which must belong to this run.
static void resume_run(Run *run) {
    const Options *o = &run->o;
    int step = latest_checkpoint(o->resume_dir);
    if (step < 0) {
        fail("--resume %s: no complete checkpoint (model_*.bin with state_*.bin) found", o->resume_dir);
    }
    char model_path[4096], state_path[4096];
    checkpoint_path(model_path, sizeof(model_path), o->resume_dir, "model", step);
    checkpoint_path(state_path, sizeof(state_path), o->resume_dir, "state", step);
    model_load(&run->model, model_path);
    TrainingState state = state_load(&run->model, state_path);
    if (state.step != step) { fail("%s says step %d, its name says %d", state_path, state.step, step); }
    check_same_run(&state, o, state_path);
    note_rank_change(state.ranks > 0 ? state.ranks : 1);
    dataloader_set_position(&run->train, state.position, state_path);
    run->rng = state.rng;
    run->start_step = step;
    run->resumed_here = same_directory(o->resume_dir, o->out_dir);
    run->last_checkpoint = run->resumed_here ? step : -1;
    printf("resuming from %s and %s: step %d of %d\n", model_path, state_path, step, o->steps);
}

// The model of the run: the newest checkpoint of --resume, the file of --init, or a fresh model
// shaped by the options and the data's vocabulary.
static void load_or_init_model(Run *run) {
    const Options *o = &run->o;
    run->start_step = 0;
    run->resumed_here = 0;
    run->last_checkpoint = -1;
    if (o->resume_dir != NULL) {
        resume_run(run);
    } else if (o->init_path != NULL) {
        model_load(&run->model, o->init_path);
    } else {
        ModelConfig config;
        RouterConfig router;
        configure_model(o, run->train.vocab_size, run->train.vocab_kind, &config, &router);
        model_init(&run->model, &config, &router, (uint64_t)o->seed);
    }
    if ((o->init_path != NULL || o->resume_dir != NULL) && o->model_options_given > 0) {
        fprintf(stderr,
                "note: the architecture and routing come from the checkpoint; %d model or routing option(s) "
                "ignored\n",
                o->model_options_given);
    }
}

// A loader's tokens must fit the model (its vocabulary is the training data's when it is new).
static void check_vocabulary(const DataLoader *d, const char *what, const ModelConfig *c,
                             const char *source) {
    if (d->vocab_size > c->vocab_size) {
        fail("%s (%s): its vocabulary (%d %s tokens) does not fit the model's (%d %s tokens, %s)",
             d->shard_path[0], what, d->vocab_size, vocab_kind_name(d->vocab_kind), c->vocab_size,
             vocab_kind_name(c->vocab_kind), source);
    }
    if (d->vocab_kind != VOCAB_UNKNOWN && c->vocab_kind != VOCAB_UNKNOWN && d->vocab_kind != c->vocab_kind) {
        fail("%s (%s) holds %s tokens but the model uses %s tokens (%s)", d->shard_path[0], what,
             vocab_kind_name(d->vocab_kind), vocab_kind_name(c->vocab_kind), source);
    }
}

// The data must fit the model: vocabulary, sequence length, steps left.
static void check_data_fits_model(const Run *run) {
    const ModelConfig *c = &run->model.config;
    const Options *o = &run->o;
    const char *source = o->resume_dir  ? o->resume_dir
                         : o->init_path ? o->init_path
                                        : "made for the training data";
    check_vocabulary(&run->train, "training data", c, source);
    if (run->have_val) { check_vocabulary(&run->val, "validation data", c, source); }
    if (o->seq_len > c->max_seq_len) {
        fail("--seq-len %d exceeds the model's maximum sequence length %d", o->seq_len, c->max_seq_len);
    }
    if (run->start_step >= o->steps) {
        fail("the run is already at step %d of --steps %d", run->start_step, o->steps);
    }
}

static void print_configuration(const Run *run) {
    const ModelConfig *c = &run->model.config;
    const RouterConfig *rc = &run->model.router;
    double inactive = (double)c->num_layers * (c->num_experts - 1) * 3 * c->expert_hidden * c->channels;
    printf("model: L=%d C=%d NH=%d E=%d H=%d V=%d (%s) max T=%d, %.2fM parameters (%.2fM active at |S|=1)\n",
           c->num_layers, c->channels, c->num_heads, c->num_experts, c->expert_hidden, c->vocab_size,
           vocab_kind_name(c->vocab_kind), c->max_seq_len, run->model.num_parameters / 1e6,
           (run->model.num_parameters - inactive) / 1e6);
    if (rc->routing == ROUTING_TOPK) {
        printf("routing: topk, k=%d", rc->k);
    } else if (rc->routing == ROUTING_TOPP) {
        printf("routing: topp, p=%g", rc->p);
    } else {
        printf("routing: dtopp, %s controller, target %g of %d experts, Kp=%g Ki=%g p0=%g",
               rc->controller ? "per-layer" : "global", rc->tgt, c->num_experts, rc->Kp, rc->Ki, rc->p0);
    }
    printf(", DRN %s, %s gates, lb %g, entropy %g\n", rc->drn ? "on" : "off",
           rc->renorm ? "renormalised" : "raw", rc->lb_coef, rc->ent_coef);
    printf("data: %zu training tokens (%zu batches of %dx%d), %zu validation tokens\n", run->train.num_tokens,
           run->train.num_batches, run->o.batch, run->o.seq_len,
           run->have_val ? run->val.num_tokens : (size_t)0);
    printf("threads: %d", omp_threads());
    if (dp_ranks > 1 || run->o.grad_accum > 1) {  // the split of each step's batch
        printf(" per rank; %d rank(s) x %d micro-batch(es) of %d sequences", dp_ranks, run->o.grad_accum,
               run->o.batch / (dp_ranks * run->o.grad_accum));
    }
    printf("\n\n");
}

// The output directory: a new run starts in one without another run's model or checkpoints; a run
// resumed there drops what the interruption left behind. Then every output file is opened, so
// that a bad path fails now and not after the run.
static void prepare_output(Run *run) {
    const Options *o = &run->o;
    char log_path[4200];
    snprintf(log_path, sizeof(log_path), "%s/log.csv", o->out_dir);
    if (run->resumed_here) {
        remove_leftovers(o->out_dir, run->start_step);
        truncate_log(log_path, run->start_step);
    } else {
        refuse_other_run(o->out_dir);
        remove_leftovers(o->out_dir, -1);
        if (access(log_path, F_OK) == 0) {
            printf("note: replacing %s of a run that left no checkpoint\n", log_path);
        }
    }
    run->routing_dump = NULL;
    if (o->routing_dump != NULL) {
        run->routing_dump = fopen(o->routing_dump, "w");
        if (run->routing_dump == NULL) { fail("cannot write %s: %s", o->routing_dump, strerror(errno)); }
    }
    run->log = open_log(log_path, &run->model, run->resumed_here);
}

// --batch is split into --grad-accum micro-batches on each rank: they must divide it.
static void check_parallel_options(Options *o) {
    if (o->grad_accum < 1 || o->check_ranks < 0) { fail("--grad-accum must be >= 1 and --check-ranks >= 0"); }
    if (o->batch % (o->grad_accum * dp_ranks) != 0) {
        fail("--batch %d does not split into --grad-accum %d micro-batches on each of %d rank(s)", o->batch,
             o->grad_accum, dp_ranks);
    }
    if (dp_rank > 0) {  // rank 0 alone samples and writes the routing dump
        o->sample_tokens = 0;
        o->routing_dump = NULL;
    }
}

// Everything before the first step: data, model, output directory, log, sampler. Rank 0 alone
// writes to the output directory.
static void run_setup(Run *run) {
    check_parallel_options(&run->o);
    const Options *o = &run->o;
    run->rng = (uint64_t)o->seed ^ 0x5DEECE66Dull;  // the sampler's stream
    dataloader_init(&run->train, o->train_pattern, o->batch, o->seq_len, o->shuffle,
                    (unsigned long long)o->seed);
    run->have_val = o->val_pattern != NULL && o->val_pattern[0] != '\0';
    if (run->have_val) { dataloader_init(&run->val, o->val_pattern, o->batch, o->seq_len, 0, 0); }
    if (dp_rank == 0) { ensure_directory(o->out_dir); }
    load_or_init_model(run);
    check_data_fits_model(run);
    memset(&run->codec, 0, sizeof(run->codec));
    if (o->sample_tokens > 0) { codec_init(&run->codec, o->tokenizer_path, &run->model.config); }
    run->log = run->routing_dump = NULL;
    if (dp_rank == 0) { prepare_output(run); }
    print_configuration(run);
    routing_stats_alloc(&run->stats, &run->model.config);
    int L = run->model.config.num_layers;
    run->p_used = (float *)malloc_check(L * sizeof(float));
    size_t totals = 2 + 2 * L + routing_counts_size(&run->model.config);
    run->totals = (double *)malloc_check(totals * sizeof(double));
    run->losses = (float *)malloc_check((2 + 2 * L) * sizeof(float));
}

static void run_free(Run *run) {
    if (run->log != NULL) { fclose(run->log); }
    if (run->routing_dump != NULL && fclose(run->routing_dump) != 0) {
        fail("cannot write %s: %s", run->o.routing_dump, strerror(errno));
    }
    free(run->p_used);
    free(run->totals);
    free(run->losses);
    routing_stats_free(&run->stats);
    if (run->codec.loaded) { tokenizer_free(&run->codec.tokenizer); }
    dataloader_free(&run->train);
    if (run->have_val) { dataloader_free(&run->val); }
    model_free(&run->model);
}

static int is_due(int step, int every) { return every > 0 && step % every == 0; }

// --check-ranks: a hash of the parameters and the controller state, compared across the ranks.
static void check_ranks_agree(const Model *model, int step) {
    float *params = (float *)malloc_check(model->num_parameters * sizeof(float));
    model_get_params(model, params);
    const void *parts[] = {params, model->threshold, model->integral};
    size_t bytes[] = {model->num_parameters * sizeof(float), model->config.num_layers * sizeof(float),
                      model->config.num_layers * sizeof(float)};
    uint64_t hash = 0xcbf29ce484222325ull;  // FNV-1a
    for (int i = 0; i < 3; i++) {
        const unsigned char *byte = (const unsigned char *)parts[i];
        for (size_t j = 0; j < bytes[i]; j++) { hash = (hash ^ byte[j]) * 0x100000001b3ull; }
    }
    dp_check_same(hash, "parameters or controller state", step);
    free(params);
}

// The step's sums over the micro-batches of this rank: add the last forward pass.
static void step_totals_add(Run *run) {
    int n_losses = 2 + 2 * run->model.config.num_layers;
    model_get_losses(&run->model, run->losses);
    for (int i = 0; i < n_losses; i++) { run->totals[i] += run->losses[i]; }
    routing_counts_add(run->totals + n_losses, &run->model);
}

// The step's sums over every rank, then its losses (the mean over all micro-batches, doc/spec.md
// section 4) and its routing statistics (over all its tokens).
static void step_totals_finish(Run *run, int micro_batches) {
    int n_losses = 2 + 2 * run->model.config.num_layers;
    dp_sum_doubles(run->totals, n_losses + (int)routing_counts_size(&run->model.config));
    for (int i = 0; i < n_losses; i++) { run->losses[i] = (float)(run->totals[i] / micro_batches); }
    routing_stats_from_counts(&run->stats, run->totals + n_losses, &run->model.config);
}

// One optimizer step. The batch of --batch rows is cut into grad-accum x ranks micro-batches: rank r
// runs micro-batches r*K .. r*K+K-1, each forward and backward, and adds up their gradients; the
// sum over every rank, divided by the number of micro-batches, is the step's gradient (the mean
// over its tokens), the same on every rank. Then the clipped AdamW update, and the controller moves
// p from the routing of the whole step. Returns the gradient norm; p_used keeps the thresholds this
// step used, losses and stats what it measured.
static float train_step(Run *run, int step, float lr) {
    Model *model = &run->model;
    int L = model->config.num_layers, K = run->o.grad_accum, micro_batches = K * dp_ranks;
    int rows = run->o.batch / micro_batches, T = run->o.seq_len;
    dataloader_next_batch(&run->train);
    memcpy(run->p_used, model->threshold, L * sizeof(float));
    memset(run->totals, 0, (2 + 2 * L + routing_counts_size(&model->config)) * sizeof(double));
    for (int k = 0; k < K; k++) {
        size_t first = (size_t)(dp_rank * K + k) * rows * T;
        model_forward(model, run->train.inputs + first, run->train.targets + first, rows, T);
        model_zero_grad(model);
        model_backward(model);
        model_accumulate_grads(model, k, K);
        step_totals_add(run);
    }
    if (micro_batches > 1) { model_allreduce_grads(model, 1.0f / micro_batches); }
    step_totals_finish(run, micro_batches);
    if (!isfinite(run->losses[0])) { fail_diverged(run, "the loss", run->losses[0], step); }
    float grad_norm = model_update(model, lr, run->o.weight_decay);
    if (!isfinite(grad_norm)) { fail_diverged(run, "the gradient norm", grad_norm, step); }
    controller_update_from(model, run->stats.layer_mean);
    if (is_due(step + 1, run->o.check_ranks)) { check_ranks_agree(model, step + 1); }
    return grad_norm;
}

// The progress line of a step, and its row of log.csv.
static void report_step(Run *run, int step, float val_loss, float lr, float grad_norm, double dt,
                        double eta) {
    const Model *model = &run->model;
    double tokens_per_s = run->o.batch * run->o.seq_len / dt;
    printf("step %5d/%d | loss %.4f | lr %.2e | p %.3f | experts %.2f", step + 1, run->o.steps,
           run->losses[0], lr, run->p_used[0], run->stats.activated);
    if (model->router.routing == ROUTING_DTOPP) { printf(" (target %.2f)", model->router.tgt); }
    printf(" | %.0f tok/s | %dm%02ds left\n", tokens_per_s, (int)(eta / 60), (int)eta % 60);
    fflush(stdout);
    if (run->log != NULL) {
        log_step(run->log, model, &run->stats, run->losses, run->p_used, step + 1, val_loss, lr, grad_norm,
                 tokens_per_s);
    }
}

static void print_sample(Run *run, const char *title) {
    printf("--- sample %s:\n", title);
    const Options *o = &run->o;
    generate_text(&run->model, &run->codec, o->prompt, o->sample_tokens, o->temperature, o->top_k, &run->rng);
    printf("---\n");
}

int main(int argc, char **argv) {
    Run run;
    Options *o = &run.o;
    default_options(o);
    parse_options(o, argc, argv);
    check_options(o);
    set_num_threads(o->threads);
    if (o->generate > 0) { return generate_only(o, (uint64_t)o->seed ^ 0x5DEECE66Dull); }
    dp_init(&argc, &argv);
    run_setup(&run);

    double train_seconds = 0.0;  // of the steps after the first, which pays for allocations
    for (int step = run.start_step; step < o->steps; step++) {
        int last = step == o->steps - 1, stop = step + 1 == o->stop_at;
        float val_loss = -1.0f;
        if (run.have_val && o->eval_batches > 0 && (last || is_due(step, o->eval_every))) {
            FILE *dump = last ? run.routing_dump : NULL;
            val_loss = evaluate(&run.model, &run.val, o->eval_batches, dump, o->routing_dump);
            printf("step %5d | validation loss %.4f\n", step, val_loss);
        }
        if (o->sample_tokens > 0 && step > run.start_step && (last || is_due(step, o->sample_every))) {
            char title[64];
            snprintf(title, sizeof(title), "at step %d", step);
            print_sample(&run, title);
        }

        double t0 = wall_seconds();
        float lr = learning_rate(step, o->steps, o->warmup, o->lr);
        float grad_norm = train_step(&run, step, lr);
        double dt = wall_seconds() - t0;
        train_seconds += step > run.start_step ? dt : 0.0;
        double mean_dt = step > run.start_step ? train_seconds / (step - run.start_step) : dt;
        report_step(&run, step, val_loss, lr, grad_norm, dt, mean_dt * (o->steps - step - 1));

        if ((last || stop || is_due(step + 1, o->checkpoint_every)) && dp_rank == 0) {
            write_checkpoint(&run, step + 1);
        }
        if (stop) {
            printf("stopped at step %d: continue with --resume %s\n", step + 1, o->out_dir);
            break;
        }
    }
    if (o->sample_tokens > 0 && run.last_checkpoint == o->steps) { print_sample(&run, "after training"); }
    printf("done: %s/model.bin, %s/log.csv\n", o->out_dir, o->out_dir);
    run_free(&run);
    dp_finish();
    return EXIT_SUCCESS;
}
#endif  // TESTING
