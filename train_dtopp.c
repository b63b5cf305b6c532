/*
train_dtopp.c: training a DTop-p Mixture-of-Experts language model in plain C.

DTop-p (dynamic top-p) routing sends each token to experts in order of router probability until
their cumulative probability passes a threshold p, so confident tokens use few experts and
uncertain ones many. A PI controller moves p between steps so that the average number of
activated experts per token converges to a target budget, and Dynamic Routing Normalization
(DRN: a learnable per-layer scale on standardized router logits) lets layers differ under the one
threshold. The function computed here is specified exactly in doc/spec.md; doc/formats.md
describes every file this program reads or writes, and doc/tour.md is the reading guide.

Contents, in reading order:
  1. configuration: the model's sizes and the router's settings
  2. parameters and activations: one buffer per kind, carved into named tensors
  3. the model and its API (Model, model_*), which train_dtopp.cu implements on a GPU too
  4. the layers, each a forward/backward pair: encoder, RMSNorm, RoPE, attention, SwiGLU,
     cross-entropy; then the MoE layer: router, DRN, selection, auxiliary losses, dispatch,
     experts, combine
  5. the model's forward and backward passes, and sampling one position at a time
  6. the PI controller
  7. AdamW
  8. the model file: loading and saving
  9. main: the training loop
The plumbing lives in headers under dtopp/, one concern each (the include lines below say what
each brings). Sections 4, 5 and the CPU halves of 7 and 8 are `#ifndef DTOPP_CUDA`: train_dtopp.cu
defines DTOPP_CUDA, includes this file for the rest, and implements them on the GPU.

Determinism: every parallel loop writes disjoint outputs and every reduction runs in a fixed
order, so results are bitwise identical for any number of threads.
*/
#define _POSIX_C_SOURCE 200809L
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "dtopp/utils.h"     // defines: fail, checked memory and file I/O, file headers, random_*, threads
#include "dtopp/parallel.h"  // defines: dp_init/finish, dp_sum_floats/doubles, dp_rank(s), ep_rank(s), ep_exchange_*

// ----------------------------------------------------------------------------
// 1. configuration

enum { ROUTING_TOPK = 0, ROUTING_TOPP = 1, ROUTING_DTOPP = 2 };
enum { CONTROLLER_GLOBAL = 0, CONTROLLER_LAYER = 1 };
const char *routing_names[] = {"topk", "topp", "dtopp"};

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
    uint64_t vocab_hash;    // which tokenizer: its tokenizer_vocab_hash (0: bytes, or not recorded)
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
    int first_layer_k; // layer 0 on a fixed top-k of this many experts, outside the threshold (0: as the rest)
} RouterConfig;

// The epsilons of the two normalizations (doc/spec.md, sections 1 and 2).
#define RMSNORM_EPS 1e-5f
#define DRN_EPS 1e-5f

static inline int padded_vocab(int V) { return (V + 127) / 128 * 128; }

// For files written before the vocabulary kind was stored: the two vocabularies the project had.
static int vocab_kind_of_size(int V) {
    return V == 256 ? VOCAB_BYTES : V == 50257 ? VOCAB_GPT2 : VOCAB_UNKNOWN;
}

// ----------------------------------------------------------------------------
// 2. parameters: one contiguous buffer carved into named tensors, in the order of doc/formats.md

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
    int experts;   // the experts W1, W3, W2 hold: E, or with --expert-parallel G this rank's E/G
} ParameterTensors;

enum { PARAM_WTE, PARAM_G1, PARAM_WQKV, PARAM_WO, PARAM_G2, PARAM_WR, PARAM_THETA, PARAM_W1, PARAM_W3, PARAM_W2,
       PARAM_GF };
// Which tensors get weight decay (the matrices) and how they are initialised; which hold the experts.
static const int param_is_matrix[NUM_PARAMETER_TENSORS] = {1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0};
static const int param_is_expert[NUM_PARAMETER_TENSORS] = {0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0};

// The sizes of the tensors with W1, W3, W2 of `experts` experts per layer (all E: the model file's).
static void fill_param_sizes(size_t *sizes, const ModelConfig *c, int experts) {
    size_t Vp = c->padded_vocab_size, C = c->channels, L = c->num_layers, E = c->num_experts, H = c->expert_hidden;
    size_t X = experts;
    size_t list[NUM_PARAMETER_TENSORS] = {Vp * C, L * C, L * 3 * C * C, L * C * C, L * C, L * E * C, L,
                                          L * X * H * C, L * X * H * C, L * X * C * H, C};
    memcpy(sizes, list, sizeof(list));
}

// Every kind of tensor lives in one buffer (parameters, gradients, activations, routing decisions):
// tensor i of n starts where tensor i - 1 ends. Both builds carve their buffers with these.
static size_t total_size(const size_t *sizes, int n) {
    size_t total = 0;
    for (int i = 0; i < n; i++) { total += sizes[i]; }
    return total;
}

static void carve_floats(float **tensors[], const size_t *sizes, int n, float *memory) {
    for (int i = 0; i < n; i++) {
        *tensors[i] = memory;
        memory += sizes[i];
    }
}

static void carve_ints(int **tensors[], const size_t *sizes, int n, int *memory) {
    for (int i = 0; i < n; i++) {
        *tensors[i] = memory;
        memory += sizes[i];
    }
}

static void carve_params(ParameterTensors *t, float *memory, const size_t *sizes, int experts) {
    float **tensors[NUM_PARAMETER_TENSORS] = {&t->wte, &t->g1, &t->wqkv, &t->wo, &t->g2, &t->wr,
                                              &t->theta, &t->w1, &t->w3, &t->w2, &t->gf};
    carve_floats(tensors, sizes, NUM_PARAMETER_TENSORS, memory);
    t->experts = experts;
}

// The tensors of layer l (of the parameters or of their gradients); W1, W3, W2 of the experts t holds.
typedef struct {
    float *g1, *wqkv, *wo, *g2, *wr, *theta, *w1, *w3, *w2;
} LayerWeights;

static LayerWeights layer_weights(const ParameterTensors *t, const ModelConfig *c, int l) {
    size_t C = c->channels, E = c->num_experts, H = c->expert_hidden, X = t->experts;
    LayerWeights w = {t->g1 + l * C, t->wqkv + l * 3 * C * C, t->wo + l * C * C, t->g2 + l * C,
                      t->wr + l * E * C, t->theta + l, t->w1 + l * X * H * C, t->w3 + l * X * H * C,
                      t->w2 + l * X * C * H};
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
    float *att;            // what attention keeps for its backward pass (attention_saved_floats):
                           // (L, B, NH, T) each query's log-sum-exp on the CPU, (L, B, NH, T, T) P on the GPU
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

// Per layer, what attention keeps for its backward pass: the CPU's tiled attention keeps one float
// per query, the log-sum-exp of its scores (dtopp/attention.h); train_dtopp.cu's keeps the
// probabilities, T per query.
static inline size_t attention_saved_floats(size_t B, size_t NH, size_t T) {
#ifdef DTOPP_CUDA
    return B * NH * T * T;
#else
    return B * NH * T;
#endif
}

// The activation and routing tensors of a forward pass of B x T positions, in the order of the
// structs above; logits rows are `logit_width` floats (V on the CPU, Vp on the GPU).
static void activation_layout(float **tensors[], size_t *sizes, ActivationTensors *t, const ModelConfig *c,
                              int B, int T, int logit_width) {
    size_t N = (size_t)B * T, C = c->channels, L = c->num_layers, NH = c->num_heads, E = c->num_experts;
    float **list[NUM_ACTIVATION_TENSORS] = {
        &t->encoded, &t->ln1, &t->ln1_rstd, &t->qkv, &t->att, &t->atty, &t->res1, &t->ln2,
        &t->ln2_rstd, &t->router_logits, &t->drn_u, &t->drn_rstd, &t->probs, &t->gates, &t->res2,
        &t->lnf, &t->lnf_rstd, &t->logits, &t->token_loss, &t->aux_lb, &t->aux_ent};
    size_t size[NUM_ACTIVATION_TENSORS] = {
        N * C, L * N * C, L * N, L * N * 3 * C, L * attention_saved_floats(B, NH, T), L * N * C, L * N * C, L * N * C,
        L * N, L * N * E, L * N * E, L * N, L * N * E, L * N * E, L * N * C,
        N * C, N, N * logit_width, N, L, L};
    memcpy(tensors, list, sizeof(list));
    memcpy(sizes, size, sizeof(size));
}

static void routing_layout(int **tensors[], size_t *sizes, RoutingTensors *r, const ModelConfig *c, int B, int T) {
    size_t N = (size_t)B * T, L = c->num_layers, E = c->num_experts;
    int **list[NUM_ROUTING_TENSORS] = {&r->n_selected, &r->selected, &r->expert_start, &r->token_row};
    size_t size[NUM_ROUTING_TENSORS] = {L * N, L * N * E, L * (E + 1), L * N * E};
    memcpy(tensors, list, sizeof(list));
    memcpy(sizes, size, sizeof(size));
}

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
                       // (NULL on the CPU, whose attention_backward recomputes one tile at a time)
    float *dlogits;    // (N, V); on the CPU the logits' own memory, padded to Vp on the GPU
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

typedef struct OwnedRows OwnedRows;  // dtopp/expert_rows.h
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
    OwnedRows *owned;     // expert parallel: the rows of this rank's experts (NULL: all experts local)
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
// 3. the model: its state, and the functions every implementation provides (sections 4-8 of this
// file on the CPU, train_dtopp.cu on the GPU). The training loop uses nothing else.

typedef struct Workspace Workspace;  // activations and scratch: each implementation defines its own

typedef struct {
    ModelConfig config;
    RouterConfig router;
    size_t param_sizes[NUM_PARAMETER_TENSORS];  // the tensors this process holds (below)
    size_t num_parameters;  // the model's, as in its file
    // With --expert-parallel G a rank holds W1, W3, W2 (and their gradients and moments) of its own
    // experts first_expert .. first_expert + experts - 1 only; else experts = E and num_held =
    // num_parameters. Parameters, gradients and moments are laid out as the file, with those experts.
    int first_expert, experts;
    size_t num_held;
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
    Precision precision;   // the operands of the large products: FLOAT32 or BF16 (doc/precision.md)
    Workspace *ws;
} Model;

typedef struct Decoder Decoder;  // sampling: a cache of keys and values, one position's activations

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
void model_routing_counts(const Model *model, int *n_selected, int *expert_load);  // (L, N), (L, E) or NULL
void model_get_logits(const Model *model, float *out);  // (N, V) of the forward pass (on the CPU, until the backward)
void model_get_token_losses(const Model *model, float *out);  // (N) cross-entropy of every position
void model_get_losses(const Model *model, float *out);        // total, CE, LB_l for each l, H_l for each l
void model_get_routing(const Model *model, int *n_selected, int *selected,
                       float *gates);  // (L,N), (L,N,E), (L,N,E)
void model_get_grads(const Model *model, float *out);
void model_get_params(const Model *model, float *out);
void model_get_theta(const Model *model, float *out);  // (L) the DRN scales
void model_get_router(const Model *model, float *logits, float *probs);  // (L,N,E): what the softmax took, P
void model_get_moments(const Model *model, float *m, float *v);
void model_set_moments(Model *model, const float *m, const float *v);
Decoder *decoder_create(const Model *model);
const float *decoder_step(Model *model, Decoder *decoder, int token,
                          int pos);  // logits (V) of the next token
void decoder_free(Decoder *decoder);
// Each build's: takes ownership of params (host memory, filled), moves them where the build
// computes, and sets up the workspace (RoPE tables, activations on first use).
static void model_attach(Model *model, float *params);

#include "dtopp/validate.h"  // defines: validate_config, check_finite, validate_controller_state, MAX_SIZE

// The losses of a forward pass, as model_get_losses writes them: total, CE, LB_l for each l, H_l for
// each l.
static inline int num_losses(const ModelConfig *c) { return 2 + 2 * c->num_layers; }

// What both builds share on the host: the model's sizes, its starting parameters, RoPE's table.

static void model_setup(Model *model, const ModelConfig *config, const RouterConfig *router, const char *where) {
    memset(model, 0, sizeof(*model));
    model->config = *config;
    model->router = *router;
    validate_config(config, router, where);
    if (config->num_experts % ep_ranks != 0) {
        fail("--expert-parallel %d does not divide the model's %d experts", ep_ranks, config->num_experts);
    }
    model->experts = config->num_experts / ep_ranks;
    model->first_expert = ep_rank * model->experts;
    fill_param_sizes(model->param_sizes, config, config->num_experts);
    model->num_parameters = total_size(model->param_sizes, NUM_PARAMETER_TENSORS);
    fill_param_sizes(model->param_sizes, config, model->experts);
    model->num_held = total_size(model->param_sizes, NUM_PARAMETER_TENSORS);
    model->threshold = (float *)calloc_check(config->num_layers, sizeof(float));
    model->integral = (float *)calloc_check(config->num_layers, sizeof(float));
    model->loss = model->ce_loss = -1.0f;
}

// Fresh parameters from a seed (doc/spec.md, section 5): matrices normal(0, 0.02), the output
// projections of each block (Wo, W2) scaled down by sqrt(2L), gains 1, θ = theta_init, padded
// vocabulary rows zero. The whole model's stream is drawn; a rank of --expert-parallel keeps its
// experts' values.
static void init_params(float *params, const Model *model, uint64_t seed) {
    const ModelConfig *c = &model->config;
    uint64_t rng = seed;
    float *out = params;
    float residual_std = 0.02f / sqrtf(2.0f * c->num_layers);
    size_t full[NUM_PARAMETER_TENSORS], E = c->num_experts, first = model->first_expert, end = first + model->experts;
    fill_param_sizes(full, c, c->num_experts);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        float std = (i == PARAM_WO || i == PARAM_W2) ? residual_std : 0.02f;
        size_t slice = full[i] / (c->num_layers * E);  // of one expert, in the experts' tensors
        for (size_t j = 0; j < full[i]; j++) {
            float value = param_is_matrix[i] ? std * random_normal(&rng)
                                             : (i == PARAM_THETA ? model->router.theta_init : 1.0f);
            size_t e = param_is_expert[i] ? j / slice % E : first;
            if (e >= first && e < end) { *out++ = value; }
        }
    }
    memset(params + (size_t)c->vocab_size * c->channels, 0,
           (size_t)(c->padded_vocab_size - c->vocab_size) * c->channels * sizeof(float));
}

// RoPE, rotate-half pairing: element i of a head turns with element i + hd/2 by pos·f_i, with
// f_i = 10000^(-2i/hd). The table holds cos and sin for every position and frequency, computed in
// double. Both builds fill it on the host.
void rope_table_init(float *cos_table, float *sin_table, int max_seq_len, int hd) {
    for (int pos = 0; pos < max_seq_len; pos++) {
        for (int i = 0; i < hd / 2; i++) {
            double angle = pos * pow(10000.0, -2.0 * i / hd);
            cos_table[pos * (hd / 2) + i] = (float)cos(angle);
            sin_table[pos * (hd / 2) + i] = (float)sin(angle);
        }
    }
}

#ifndef DTOPP_CUDA  // sections 4 and 5 on the CPU; train_dtopp.cu has them on the GPU
#include "dtopp/matmul.h"  // defines: matmul_forward/backward (+ _grouped, _grouped_pair), matmul_nt/nn/tn, exp_fast

// ----------------------------------------------------------------------------
// 4. the layers, each a forward/backward pair
// N = B*T token positions. Backward functions accumulate (+=) into parameter gradients and,
// unless their comment says otherwise, into the input gradient they are given. Loops below
// PARALLEL_MIN_WORK (utils.h) run on the calling thread. A linear layer is matmul_forward /
// matmul_backward (matmul.h): out (rows, OC) = inp (rows, IC) · weight (OC, IC)^T; matmul_backward
// writes its input gradient instead of adding to it when told (add_to_dinp 0), where that gradient
// has no other term, which saves zeroing it first.

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

// Rotates q and k of every head of every position (in place in qkv (B, T, 3C)) by the angle of
// its position times `direction`: +1 forward; -1 rotates a gradient back (a rotation's transpose
// is its inverse).
static void rope_rotate(float *qkv, const float *cos_table, const float *sin_table, int B, int T, int C,
                        int NH, float direction) {
    int hd = C / NH;
    #pragma omp parallel for if ((size_t)B * T * C >= PARALLEL_MIN_WORK)
    for (int n = 0; n < B * T; n++) {
        const float *cs = cos_table + (n % T) * (hd / 2), *sn = sin_table + (n % T) * (hd / 2);
        for (int h = 0; h < 2 * NH; h++) {  // NH heads of q, then NH of k
            float *v = qkv + (size_t)n * 3 * C + h * hd;
            for (int i = 0; i < hd / 2; i++) {
                float a = v[i], b = v[i + hd / 2], s = direction * sn[i];
                v[i] = a * cs[i] - b * s;
                v[i + hd / 2] = b * cs[i] + a * s;
            }
        }
    }
}

void rope_forward(float *qkv, const float *cos_table, const float *sin_table, int B, int T, int C, int NH) {
    rope_rotate(qkv, cos_table, sin_table, B, T, C, NH, 1.0f);
}

void rope_backward(float *dqkv, const float *cos_table, const float *sin_table, int B, int T, int C, int NH) {
    rope_rotate(dqkv, cos_table, sin_table, B, T, C, NH, -1.0f);
}

// p (n) = softmax(scale · p), in place: the softmax of one query over the keys it sees (sampling's
// attention, dtopp/decoder.h).
static void softmax_row(float *p, int n, float scale) {
    float maxval = -INFINITY, sum = 0.0f;
    #pragma omp simd reduction(max : maxval)
    for (int j = 0; j < n; j++) {
        p[j] *= scale;
        maxval = p[j] > maxval ? p[j] : maxval;
    }
    #pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) {
        p[j] = exp_fast(p[j] - maxval);
        sum += p[j];
    }
    float inv = 1.0f / sum;
    for (int j = 0; j < n; j++) { p[j] *= inv; }
}

// Self-attention. For sequence b and head h, with q, k, v the head's (T, hd) columns of qkv:
//   S = q · k^T / sqrt(hd)                           (T, T) scores
//   the causal mask: query t sees keys 0 .. t (causal = 0: every key, as the DiT's patches do)
//   P = the softmax of each row of S over the keys it sees, 0 elsewhere
//   out = P · v                                      (T, hd), the head's columns of out (B, T, C)
// and its backward pass, with D = rowsum(dout ⊙ out) (one number per query):
//   dv = P^T · dout,  dP = dout · v^T,  dS = P ⊙ (dP − D) / sqrt(hd),  dq = dS · k,  dk = dS^T · q.
// attention_forward and attention_backward compute exactly this, but in tiles of queries and keys
// (FlashAttention-2), never holding S or P whole: the forward pass keeps each query's log-sum-exp
// of its scores, lse (B, NH, T), and the backward pass recomputes P = e^(S − lse) one tile at a time,
// so the memory a layer keeps grows with T, not T². Each thread owns whole (sequence, head, query
// tile)s forward and whole (sequence, head) pairs backward, so results do not depend on the number
// of threads. test/attention_reference.h writes P out; test/test_matmul checks one against the other.
#include "dtopp/attention.h"  // defines: attention_forward (out, lse), attention_backward (from out, lse)

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

// Mean cross-entropy over the first V logits: per-position losses to token_loss, log-sum-exps to token_lse.
void crossentropy_forward(float *token_loss, float *token_lse, const float *logits, const int *targets, int N, int V) {
    #pragma omp parallel for if ((size_t)N * V >= PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *z = logits + (size_t)n * V;
        double lse = log_sum_exp(z, V);
        token_lse[n] = (float)lse;
        token_loss[n] = (float)(lse - z[targets[n]]);
    }
}

// Writes (not accumulates) dlogits = scale · (softmax − onehot) from token_lse; in place when dlogits == logits.
void crossentropy_backward(float *dlogits, const float *logits, const float *token_lse, const int *targets, int N,
                           int V, float scale) {
    #pragma omp parallel for if ((size_t)N * V >= PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *z = logits + (size_t)n * V;
        float *dz = dlogits + (size_t)n * V, lse = token_lse[n];
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
void drn_backward(float *d, float *dtheta_token, const float *u, const float *rstd, const float *theta, int N, int E) {
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
    matmul_forward(r.logits, m, NULL, w->wr, N, C, E, FLOAT32);  // the routing decision stays float32
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
    matmul_backward(dm, dw->wr, r.drouter, m, NULL, w->wr, N, C, E, 1, FLOAT32);
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
void experts_forward(ExpertView x, RouterView r, const float *m, const LayerWeights *w, int E, int C, int H,
                     Precision precision) {
    const int *start = r.expert_start;  // expert e's rows: start[e] .. start[e+1]-1, all experts in one pass
    matmul_forward_grouped_pair(x.h1, x.h3, m, x.row_token, w->w1, w->w3, start, E, C, H, precision);
    swiglu_forward(x.hact, x.h1, x.h3, (size_t)start[E] * H);
    matmul_forward_grouped(x.out, x.hact, NULL, w->w2, start, E, H, C, precision);
}

// From x.dout (R, C) to x.din (R, C), the gradient of the gathered inputs, one row per (token,
// expert) pair (moe_gather_rows then sums each token's rows); accumulates into dw's W1, W3, W2.
void experts_backward(ExpertView x, RouterView r, const float *m, const LayerWeights *dw,
                      const LayerWeights *w, int E, int C, int H, Precision precision) {
    const int *start = r.expert_start;
    size_t rows = start[E];
    // every row belongs to one expert, so the first product into dh1 and into din writes every row
    matmul_backward_grouped(x.dh1, dw->w2, x.dout, x.hact, NULL, w->w2, start, E, H, C, 0, precision);
    swiglu_backward(x.dh1, x.dh3, x.h1, x.h3, rows * H);
    matmul_backward_grouped_pair(x.din, dw->w1, dw->w3, x.dh1, x.dh3, m, x.row_token, w->w1, w->w3, start, E, C, H,
                                 precision);
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
// 5. the model's forward and backward passes on the CPU

// The activations, in host memory.

static void activations_alloc(Activations *a, const ModelConfig *c, int B, int T, int with_grads) {
    size_t N = (size_t)B * T, C = c->channels, E = c->num_experts, V = c->vocab_size;
    memset(a, 0, sizeof(*a));
    a->B = B;
    a->T = T;
    float **tensors[NUM_ACTIVATION_TENSORS];
    size_t sizes[NUM_ACTIVATION_TENSORS];
    activation_layout(tensors, sizes, &a->acts, c, B, T, (int)V);
    a->acts_memory = (float *)calloc_check(total_size(sizes, NUM_ACTIVATION_TENSORS), sizeof(float));
    carve_floats(tensors, sizes, NUM_ACTIVATION_TENSORS, a->acts_memory);
    int **int_tensors[NUM_ROUTING_TENSORS];
    size_t int_sizes[NUM_ROUTING_TENSORS];
    routing_layout(int_tensors, int_sizes, &a->routing, c, B, T);
    a->routing_memory = (int *)calloc_check(total_size(int_sizes, NUM_ROUTING_TENSORS), sizeof(int));
    carve_ints(int_tensors, int_sizes, NUM_ROUTING_TENSORS, a->routing_memory);
    a->row_offset = (int *)calloc_check(c->num_layers + 1, sizeof(int));
    if (with_grads) {  // the CPU's attention_backward needs no dscores: NULL
        GradActivations *g = &a->grads;
        float **grad_tensors[] = {&g->dresidual, &g->dln, &g->datty, &g->dqkv, &g->dgates, &g->drouter, &g->dtheta};
        size_t grad_sizes[] = {N * C, N * C, N * C, N * 3 * C, N * E, N * E, N};
        a->grads_memory = (float *)calloc_check(total_size(grad_sizes, 7), sizeof(float));
        carve_floats(grad_tensors, grad_sizes, 7, a->grads_memory);
        g->dlogits = a->acts.logits;  // read by nothing after the loss; at V = 50,257 the largest tensor
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

#include "dtopp/expert_rows.h"  // defines: OwnedRows, owned_alloc/free, experts_forward/backward_parallel

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
    owned_free(a->owned);
    memset(a, 0, sizeof(*a));
}

struct Workspace {
    Activations acts;     // for the last (B, T) seen by model_forward
    float *rope_cos, *rope_sin;  // (rope_len, hd/2): the positions used so far, not all (rope_reserve)
    int rope_len;
    const int *inputs;    // the batch of the last forward pass
    const int *targets;
    float *token_lse;     // (N) log-sum-exp of each row of logits, reused by the backward pass
};

// How layer l routes: as configured, except layer 0 with --first-layer-k, which takes a fixed top-k
// (the first layer's router sees only the embeddings; doc/results.md, second round).
static RouterConfig layer_router(const RouterConfig *rc, int l) {
    RouterConfig layer = *rc;
    if (l == 0 && rc->first_layer_k > 0) {
        layer.routing = ROUTING_TOPK;
        layer.k = rc->first_layer_k;
    }
    return layer;
}

// The MoE half of layer l: router, auxiliary terms, dispatch, experts, combine.
// Writes MoE(m) to out (N, C).
static void moe_forward(Model *model, Activations *a, int l, float *out, const float *m) {
    const ModelConfig *c = &model->config;
    int N = a->B * a->T, C = c->channels, E = c->num_experts, H = c->expert_hidden;
    LayerWeights w = layer_weights(&model->params, c, l);
    RouterView r = router_view(a, c, l);
    RouterConfig rc = layer_router(&model->router, l);
    router_forward(r, m, &w, model->threshold[l], &rc, N, C, E);
    int rows = moe_dispatch_count(r, N, E);
    moe_aux_forward(&a->acts.aux_lb[l], &a->acts.aux_ent[l], r, N, E);
    expert_rows_reserve(&a->rows, r.row_begin + rows, C, H);
    a->row_offset[l + 1] = r.row_begin + rows;
    ExpertView x = expert_view(a, c, r);
    moe_dispatch(r, x, N, E);
    if (a->owned != NULL) {  // expert parallel: exchange, this rank's experts, exchange back
        experts_forward_parallel(a->owned, l, x, r, m, &w, E, C, H, model->precision);
    } else {
        experts_forward(x, r, m, &w, E, C, H, model->precision);
    }
    moe_combine_forward(out, x, r, N, C, E);
}

// dm (N, C) += gradient of the MoE input, given dout (N, C), the gradient of MoE(m): the forward
// pass reversed.
static void moe_backward(Model *model, Activations *a, int l, float *dm, const float *dout, const float *m) {
    const ModelConfig *c = &model->config;
    int N = a->B * a->T, C = c->channels, E = c->num_experts, H = c->expert_hidden, L = c->num_layers;
    RouterConfig rc = layer_router(&model->router, l);
    LayerWeights w = layer_weights(&model->params, c, l);
    LayerWeights dw = layer_weights(&model->grads, c, l);
    RouterView r = router_view(a, c, l);
    expert_row_grads_reserve(&a->row_grads, r.expert_start[E], C, H);
    ExpertView x = expert_view(a, c, r);
    moe_combine_backward(x, r, dout, N, C, E);
    if (a->owned != NULL) {
        experts_backward_parallel(a->owned, l, x, r, &dw, &w, E, C, H, model->precision);
    } else {
        experts_backward(x, r, m, &dw, &w, E, C, H, model->precision);
    }
    moe_gather_rows(dm, x, r, N, C, E);
    moe_aux_backward(r, rc.lb_coef / L, rc.ent_coef / L, N, E);
    router_backward(r, dm, &dw, m, &w, &rc, N, C, E);
}

static void rope_reserve(Workspace *ws, const ModelConfig *c, int T);  // dtopp/decoder.h
static void model_ensure_activations(Model *model, int B, int T) {
    const ModelConfig *c = &model->config;
    if (T > c->max_seq_len) { fail("sequence length %d exceeds the model's maximum %d", T, c->max_seq_len); }
    rope_reserve(model->ws, c, T);
    if (model->ws->acts.acts_memory != NULL && model->ws->acts.B == B && model->ws->acts.T == T) { return; }
    activations_free(&model->ws->acts);
    activations_alloc(&model->ws->acts, c, B, T, 1);
    model->ws->token_lse = (float *)realloc_check(model->ws->token_lse, (size_t)B * T * sizeof(float));
    if (ep_ranks > 1) { model->ws->acts.owned = owned_alloc(c); }  // the decoder's too (dtopp/decoder.h)
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
        matmul_forward(qkv, ln1, NULL, w.wqkv, N, C, 3 * C, model->precision);
        rope_forward(qkv, model->ws->rope_cos, model->ws->rope_sin, B, T, C, NH);
        float *lse = t->att + l * attention_saved_floats(B, NH, T);  // each query's log-sum-exp
        attention_forward(atty, lse, qkv, B, T, C, NH, 1, model->precision);
        matmul_forward(res1, atty, NULL, w.wo, N, C, C, model->precision);  // res1 = x + Wo·atty
        residual_forward(res1, x, res1, (size_t)N * C);
        rmsnorm_forward(ln2, t->ln2_rstd + (size_t)l * N, res1, w.g2, N, C);
        moe_forward(model, a, l, res2, ln2);  // res2 = res1 + MoE(ln2)
        residual_forward(res2, res1, res2, (size_t)N * C);
    }
    rmsnorm_forward(t->lnf, t->lnf_rstd, t->res2 + (size_t)(L - 1) * N * C, model->params.gf, N, C);
    // the tied head: the first V rows of wte
    matmul_forward(t->logits, t->lnf, NULL, model->params.wte, N, C, V, model->precision);
    if (targets == NULL) {
        model->loss = model->ce_loss = -1.0f;
        return;
    }
    crossentropy_forward(t->token_loss, model->ws->token_lse, t->logits, targets, N, V);
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
        model->grads_memory = (float *)calloc_check(model->num_held, sizeof(float));
        carve_params(&model->grads, model->grads_memory, model->param_sizes, model->experts);
    }
    zero_floats(model->grads_memory, model->num_held);
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

    crossentropy_backward(g->dlogits, t->logits, model->ws->token_lse, model->ws->targets, N, V, 1.0f / N);
    matmul_backward(g->dln, dp->wte, g->dlogits, t->lnf, NULL, model->params.wte, N, C, V, 0, model->precision);
    zero_floats(g->dresidual, (size_t)N * C);
    rmsnorm_backward(g->dresidual, dp->gf, g->dln, t->res2 + (size_t)(L - 1) * N * C, model->params.gf,
                     t->lnf_rstd, N, C);
    for (int l = L - 1; l >= 0; l--) {
        LayerWeights w = layer_weights(&model->params, c, l);
        LayerWeights dw = layer_weights(dp, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * N * C;
        // dresidual holds d res2; the MoE branch adds its share of d res1
        zero_floats(g->dln, (size_t)N * C);
        moe_backward(model, a, l, g->dln, g->dresidual, t->ln2 + (size_t)l * N * C);
        rmsnorm_backward(g->dresidual, dw.g2, g->dln, t->res1 + (size_t)l * N * C, w.g2,
                         t->ln2_rstd + (size_t)l * N, N, C);
        // dresidual holds d res1; the attention branch adds its share of d x
        matmul_backward(g->datty, dw.wo, g->dresidual, t->atty + (size_t)l * N * C, NULL, w.wo, N, C, C, 0,
                        model->precision);
        zero_floats(g->dqkv, (size_t)N * 3 * C);
        attention_backward(g->dqkv, g->datty, t->qkv + (size_t)l * N * 3 * C, t->atty + (size_t)l * N * C,
                           t->att + l * attention_saved_floats(B, NH, T), B, T, C, NH, 1, model->precision);
        rope_backward(g->dqkv, model->ws->rope_cos, model->ws->rope_sin, B, T, C, NH);
        matmul_backward(g->dln, dw.wqkv, g->dqkv, t->ln1 + (size_t)l * N * C, NULL, w.wqkv, N, C, 3 * C, 0,
                        model->precision);
        rmsnorm_backward(g->dresidual, dw.g1, g->dln, x, w.g1, t->ln1_rstd + (size_t)l * N, N, C);
    }
    encoder_backward(dp->wte, g->dresidual, model->ws->inputs, N, C);
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
    for (int l = 0; expert_load != NULL && l < L; l++) {
        const int *start = a->routing.expert_start + (size_t)l * (E + 1);
        for (int e = 0; e < E; e++) { expert_load[(size_t)l * E + e] = start[e + 1] - start[e]; }
    }
}

#include "dtopp/decoder.h"  // defines: Decoder, decoder_create, decoder_step, decoder_free

#include "dtopp/host_results.h"  // defines: model_get_logits/losses/routing/grads/params/moments, ...
#endif  // DTOPP_CUDA

// ----------------------------------------------------------------------------
// 6. the PI controller

// The controller's starting state: p = p0 (or the fixed p of top-p), I = 0.
static void controller_reset(Model *model) {
    const RouterConfig *rc = &model->router;
    float start = rc->routing == ROUTING_DTOPP ? rc->p0 : rc->routing == ROUTING_TOPP ? rc->p : 0.0f;
    for (int l = 0; l < model->config.num_layers; l++) {
        model->threshold[l] = start;
        model->integral[l] = 0.0f;
    }
}

// The mean of the per-layer means of |S| over layers first..L-1: over every layer, the activated
// experts per token and layer; from the first layer the threshold routes, the controller's a_t.
static double mean_over_layers(const double *activated, int first, int L) {
    double mean = 0.0;
    for (int l = first; l < L; l++) { mean += activated[l] / (L - first); }
    return mean;
}

// a_t of the last forward pass: mean |S| over its tokens and layers.
double model_activated(const Model *model) {
    int L = model->config.num_layers;
    double *activated = (double *)malloc_check(L * sizeof(double));
    model_activated_per_layer(model, activated);
    double mean = mean_over_layers(activated, 0, L);
    free(activated);
    return mean;
}

// Once per optimizer step, after the backward pass: moves p toward the threshold that activates
// tgt experts per token on average. e = (tgt − a)/E; I' = I + e; p' = p0 + Kp e + Ki I'; while p'
// is outside [pmin, pmax] p is clamped and I is left as it was (no wind-up while saturated).
// The global controller feeds every layer the same a, so every layer keeps the same p and I; a is
// over the layers the threshold routes, so a layer 0 on a fixed top-k (--first-layer-k) is left out
// of it, and the model's activated experts are then (k + (L − 1)·tgt)/L per token and layer.
// activated: (L) the mean |S| of each layer over every token of the optimizer step, which with
// gradient accumulation or several ranks is more than the last forward pass (doc/spec.md, section 3).
void controller_update_from(Model *model, const double *activated) {
    const RouterConfig *rc = &model->router;
    if (rc->routing != ROUTING_DTOPP) { return; }
    int L = model->config.num_layers;
    double global = mean_over_layers(activated, rc->first_layer_k > 0, L);
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

// ----------------------------------------------------------------------------
// 7. AdamW, with global-norm clipping and the learning-rate schedule

// The optimizer's rule, shared by both builds (doc/spec.md, section 4): the gradient is clipped
// to global norm CLIP_NORM, then AdamW updates every parameter. adamw_update runs in a CPU loop
// here and in a GPU kernel in train_dtopp.cu, so it is marked for both compilers (HOST_DEVICE).
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
static inline HOST_DEVICE void adamw_update(float *w, float *m1, float *m2, float grad, AdamWStep s, float wd) {
    grad *= s.clip;
    float first = *m1 = ADAMW_BETA1 * *m1 + (1.0f - ADAMW_BETA1) * grad;
    float second = *m2 = ADAMW_BETA2 * *m2 + (1.0f - ADAMW_BETA2) * grad * grad;
    *w = *w - s.lr * ((first / s.bias1) / (sqrtf(second / s.bias2) + ADAMW_EPS) + wd * *w);
}

// Warm-up then cosine decay to a tenth of the peak over total_steps steps (step counts from 0), which
// stays after them (a run extended with --extend).
float learning_rate(int step, int total_steps, int warmup, float peak) {
    if (step < warmup) { return peak * (step + 1) / warmup; }
    if (total_steps <= warmup) { return peak; }
    float min_lr = 0.1f * peak;
    if (step >= total_steps) { return min_lr; }
    float progress = (float)(step - warmup) / (float)(total_steps - warmup);
    return min_lr + 0.5f * (1.0f + cosf((float)M_PI * progress)) * (peak - min_lr);
}

#ifndef DTOPP_CUDA  // the update on the CPU
// Sum of squares in fixed blocks, so the rounding does not depend on the number of threads.
// Sums of squares of `count` arrays, out[a] = Σ x[a][i]², in one parallel loop for all of them
// (each loop wakes the threads, and the experts' gradient has 3·L·E slices). Each array is added
// in blocks of 4096 in double, and the blocks in order, so the sums do not depend on the threads;
// in a block, into 16 sums (element i to sum i % 16, in vectors) then added pairwise.
static void sums_of_squares(const float *const *x, const size_t *n, int count, double *out) {
    enum { BLOCK = 4096 };
    size_t *first_block = (size_t *)malloc_check((count + 1) * sizeof(size_t));
    first_block[0] = 0;
    for (int a = 0; a < count; a++) { first_block[a + 1] = first_block[a] + (n[a] + BLOCK - 1) / BLOCK; }
    size_t blocks = first_block[count];
    double *partial = (double *)malloc_check((blocks + 1) * sizeof(double));
    int *array_of = (int *)malloc_check((blocks + 1) * sizeof(int));
    for (int a = 0; a < count; a++) {
        for (size_t b = first_block[a]; b < first_block[a + 1]; b++) { array_of[b] = a; }
    }
    #pragma omp parallel for
    for (size_t b = 0; b < blocks; b++) {
        int a = array_of[b];
        size_t begin = (b - first_block[a]) * BLOCK, end = begin + BLOCK < n[a] ? begin + BLOCK : n[a];
        double sum[16] = {0.0};
        for (size_t i = begin; i < end; i += 16) {
            for (size_t j = 0; j < 16 && i + j < end; j++) { sum[j] += (double)x[a][i + j] * x[a][i + j]; }
        }
        for (int width = 8; width >= 1; width /= 2) { for (int j = 0; j < width; j++) { sum[j] += sum[j + width]; } }
        partial[b] = sum[0];
    }
    for (int a = 0; a < count; a++) {
        out[a] = 0.0;
        for (size_t b = first_block[a]; b < first_block[a + 1]; b++) { out[a] += partial[b]; }
    }
    free(first_block);
    free(partial);
    free(array_of);
}

static double sum_of_squares(const float *x, size_t n) {
    double sum;
    sums_of_squares(&x, &n, 1, &sum);
    return sum;
}

// Clips the gradient (the n floats of `sizes`, tensor by tensor) to global norm CLIP_NORM and takes
// AdamW step number `step`, with weight decay on the tensors that is_matrix marks. Returns the norm
// before clipping. The diffusion transformer (train_dit.c) updates its own buffers with it too.
static void adamw_apply(float *params, const float *grads, float *m, float *v, const size_t *sizes,
                        const int *is_matrix, int num_tensors, int step, float lr, float weight_decay, float norm);
static inline float adamw_clipped_step(float *params, const float *grads, float *m, float *v,
                                const size_t *sizes, const int *is_matrix, int num_tensors, int step,
                                float lr, float weight_decay) {
    float norm = (float)sqrt(sum_of_squares(grads, total_size(sizes, num_tensors)));
    adamw_apply(params, grads, m, v, sizes, is_matrix, num_tensors, step, lr, weight_decay, norm);
    return norm;
}

// AdamW step number `step` on the tensors of `sizes`, the gradient clipped by its global norm `norm`.
static void adamw_apply(float *params, const float *grads, float *m, float *v, const size_t *sizes,
                        const int *is_matrix, int num_tensors, int step, float lr, float weight_decay, float norm) {
    AdamWStep s = adamw_step(step, lr, norm);
    size_t offset = 0;
    for (int k = 0; k < num_tensors; k++) {
        float wd = is_matrix[k] ? weight_decay : 0.0f;
        size_t end = offset + sizes[k];
        #pragma omp parallel for
        for (size_t i = offset; i < end; i++) { adamw_update(&params[i], &m[i], &v[i], grads[i], s, wd); }
        offset = end;
    }
}

// The gradient's squared norm, added in one order whatever the layout: each tensor's sum of squares,
// the experts' tensors one (layer, expert) slice at a time, in the file's order. With --expert-parallel
// each rank sums its experts' slices, and its group adds them up (the others' are zero: exact).
static double grad_sum_of_squares(const Model *model) {
    size_t L = model->config.num_layers, E = model->config.num_experts, X = model->experts, offset = 0;
    int parts = 0, max_parts = NUM_PARAMETER_TENSORS + 3 * (int)(L * X);  // non-expert tensors, then slices
    const float **part = (const float **)malloc_check(max_parts * sizeof(float *));
    size_t *part_size = (size_t *)malloc_check(max_parts * sizeof(size_t));
    double *part_sum = (double *)malloc_check(max_parts * sizeof(double));
    for (int i = 0; i < NUM_PARAMETER_TENSORS; offset += model->param_sizes[i++]) {
        const float *g = model->grads_memory + offset;
        size_t slice = model->param_sizes[i] / (L * X);
        size_t pieces = param_is_expert[i] ? L * X : 1, piece = param_is_expert[i] ? slice : model->param_sizes[i];
        for (size_t s = 0; s < pieces; s++, parts++) {
            part[parts] = g + s * piece;
            part_size[parts] = piece;
        }
    }
    sums_of_squares(part, part_size, parts, part_sum);
    double *slices = (double *)calloc_check(3 * L * E, sizeof(double)), tensors[NUM_PARAMETER_TENSORS];
    parts = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        if (!param_is_expert[i]) { tensors[i] = part_sum[parts++]; }
        for (size_t l = 0; param_is_expert[i] && l < L; l++) {
            double *expert_slices = slices + ((i - PARAM_W1) * L + l) * E + model->first_expert;
            for (size_t j = 0; j < X; j++) { expert_slices[j] = part_sum[parts++]; }
        }
    }
    ep_sum_doubles(slices, (int)(3 * L * E));
    double total = 0.0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        if (!param_is_expert[i]) { total += tensors[i]; }
        for (size_t j = 0; param_is_expert[i] && j < L * E; j++) { total += slices[(i - PARAM_W1) * L * E + j]; }
    }
    free(part);
    free(part_size);
    free(part_sum);
    free(slices);
    return total;
}

// Clips the gradient to global norm 1 and takes one AdamW step (on the parameters this process
// holds). Returns the norm before clipping.
float model_update(Model *model, float lr, float weight_decay) {
    if (model->m_memory == NULL) {
        model->m_memory = (float *)calloc_check(model->num_held, sizeof(float));
        model->v_memory = (float *)calloc_check(model->num_held, sizeof(float));
    }
    model->adam_step++;
    float norm = (float)sqrt(grad_sum_of_squares(model));
    adamw_apply(model->params_memory, model->grads_memory, model->m_memory, model->v_memory, model->param_sizes,
                param_is_matrix, NUM_PARAMETER_TENSORS, model->adam_step, lr, weight_decay, norm);
    return norm;
}

// Gradient accumulation: micro-batch 0 starts the sum, the last adds it into model->grads (float
// addition commutes, so sum + g and g + sum are the same bits).
void model_accumulate_grads(Model *model, int micro, int count) {
    if (count == 1) { return; }
    size_t n = model->num_held;
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

// With --expert-parallel the experts' gradients are summed only over the ranks that hold the same
// experts (one per group); the rest over all ranks, as without it.
void model_allreduce_grads(Model *model, float scale) {
    if (ep_ranks == 1) {
        dp_sum_floats(model->grads_memory, model->num_held, scale);
        return;
    }
    size_t *sizes = model->param_sizes, before = total_size(sizes, PARAM_W1);
    size_t experts = sizes[PARAM_W1] + sizes[PARAM_W3] + sizes[PARAM_W2], after = model->num_held - before - experts;
    dp_sum_floats(model->grads_memory, before, scale);
    dp_sum_floats_across_groups(model->grads_memory + before, experts, scale);
    dp_sum_floats(model->grads_memory + before + experts, after, scale);
}
#endif  // DTOPP_CUDA

// ----------------------------------------------------------------------------
// 8. the model file (doc/formats.md): architecture, routing configuration, parameters, controller

// Version 2 added the vocabulary kind (word 15); version 1 files are still read, their kind
// inferred from V (256: bytes, 50257: GPT-2).
#define MODEL_VERSION 2
static const int model_versions[] = {1, MODEL_VERSION};

// The header of a model checkpoint (doc/formats.md): integers from word 2 (16-17: the vocabulary hash,
// 0 when not recorded; 18: --first-layer-k, 0 in files from before it, whose layer 0 was routed as
// the rest), float32 values from word 32. Saving and loading both walk this one table.
#define MODEL_HEADER_FIELDS 26
static void model_header_fields(HeaderField *fields, ModelConfig *c, RouterConfig *rc) {
    void *ints[] = {&c->max_seq_len, &c->vocab_size, &c->padded_vocab_size, &c->num_layers, &c->num_heads,
                    &c->channels, &c->num_experts, &c->expert_hidden, &rc->routing, &rc->controller,
                    &rc->drn, &rc->renorm, &rc->k, &c->vocab_kind};
    void *floats[] = {&rc->tgt, &rc->Kp, &rc->Ki, &rc->p0, &rc->pmin, &rc->pmax, &rc->theta_init,
                      &rc->lb_coef, &rc->ent_coef, &rc->p};
    for (int i = 0; i < 14; i++) { fields[i] = (HeaderField){2 + i, 4, ints[i]}; }
    for (int i = 0; i < 10; i++) { fields[14 + i] = (HeaderField){32 + i, 4, floats[i]}; }
    fields[24] = (HeaderField){16, 8, &c->vocab_hash};
    fields[25] = (HeaderField){18, 4, &rc->first_layer_k};
}

#include "dtopp/held_params.h"  // defines: write_held, read_held (the file's parameters, a rank's experts)

// params: the parameters this process holds, in host memory. Every rank calls it (with
// --expert-parallel the group gathers its experts); rank 0 writes.
static void checkpoint_save(const Model *model, const float *params, const char *path) {
    const ModelConfig *c = &model->config;
    ModelConfig config = model->config;
    RouterConfig router = model->router;
    HeaderField fields[MODEL_HEADER_FIELDS];
    model_header_fields(fields, &config, &router);
    int32_t header[HEADER_WORDS] = {MODEL_MAGIC, MODEL_VERSION};
    header_pack(header, fields, MODEL_HEADER_FIELDS);
    char tmp[4096] = "";
    FILE *f = dp_rank == 0 ? open_for_atomic_write(path, tmp, sizeof(tmp)) : NULL;
    if (f != NULL) { fwrite_check(header, sizeof(int32_t), HEADER_WORDS, f, tmp); }
    write_held(f, model, params, tmp);
    if (f == NULL) { return; }
    fwrite_check(model->threshold, sizeof(float), c->num_layers, f, tmp);
    fwrite_check(model->integral, sizeof(float), c->num_layers, f, tmp);
    finish_atomic_write(f, tmp, path);
}

// Sets up the model's configuration and controller state from the file; returns its parameters
// (those this process holds) in (malloc'ed) host memory.
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
    float *params = (float *)malloc_check(model->num_held * sizeof(float));
    read_held(f, (long)HEADER_BYTES, model, params, path);
    fread_check(model->threshold, sizeof(float), c->num_layers, f, path);
    fread_check(model->integral, sizeof(float), c->num_layers, f, path);
    fclose(f);
    check_finite(params, model->num_held, path, "parameter");
    validate_controller_state(model, path);
    return params;
}

// A new model from a seed, or the model of a file: the parameters in host memory, then
// model_attach of each build puts them where it computes.
void model_init(Model *model, const ModelConfig *config, const RouterConfig *router, uint64_t seed) {
    model_setup(model, config, router, "model configuration");
    float *params = (float *)malloc_check(model->num_held * sizeof(float));
    init_params(params, model, seed);
    model_attach(model, params);
    controller_reset(model);
}

void model_load(Model *model, const char *path) {
    float *params = checkpoint_load(model, path);
    model_attach(model, params);
}

#ifndef DTOPP_CUDA  // the model in host memory
// Takes ownership of params (host memory, filled).
static void model_attach(Model *model, float *params) {
    model->params_memory = params;
    carve_params(&model->params, params, model->param_sizes, model->experts);
    model->ws = (Workspace *)calloc_check(1, sizeof(Workspace));  // RoPE tables as sequences need them
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
    free(model->ws->token_lse);
    activations_free(&model->ws->acts);
    free(model->ws);
}

#endif  // DTOPP_CUDA

// ----------------------------------------------------------------------------
// 9. main: the training loop

#ifndef TESTING
#include "dataloader.h"           // defines: DataLoader, dataloader_init, dataloader_next_batch
#include "dtopp/train_options.h"  // defines: Options, presets, parse_options, configure_model
#include "dtopp/stats.h"          // defines: RoutingStats, StepTotals (a step's losses and routing counts)
#include "dtopp/sampler.h"        // defines: sample_token, TextCodec, generate_text, generate_from_checkpoint
#include "dtopp/logging.h"        // defines: open_log, log_step, evaluate (validation loss, routing table)
#include "dtopp/runfiles.h"       // defines: TrainingState files, checkpoint names, output-directory checks
#include "dtopp/run.h"            // defines: Run, run_setup (data, model, resume, output), write_checkpoint
#include "dtopp/explain.h"        // defines: explain_from_checkpoint (--explain: a text's routing, page or terminal)

int main(int argc, char **argv) {
    passive_wait_by_default(argv);  // OMP_WAIT_POLICY: idle threads sleep, unless the user chose
    Run run;
    Options *o = &run.o;
    parse_options(o, argc, argv);
    set_num_threads(o->threads);
    if (o->generate > 0) {  // --init MODEL --generate N: a sample, and no training
        return stdout_checked(generate_from_checkpoint(o->init_path, o->tokenizer_path, o->prompt, o->generate,
                                                       o->temperature, o->top_k, (uint64_t)o->seed ^ 0x5DEECE66Dull));
    }
    if (o->explain != NULL) { return explain_from_checkpoint(o); }  // --init MODEL --explain TEXT: no training
    dp_init(&argc, &argv);
    run_setup(&run);  // data, the model (new, --init or --resume), the output directory and its log
    Model *model = &run.model;
    int micro = o->grad_accum, micro_batches = micro * dp_ranks;  // per step: on this rank, on all
    int rows = o->batch / micro_batches, T = o->seq_len;

    double train_seconds = 0.0;  // of the steps after the first, which pays for allocations
    int status = EXIT_SUCCESS;
    for (int step = run.start_step; step < o->steps; step++) {
        int last = step == o->steps - 1, stop = stop_after(step, o);  // --stop-at, Ctrl-C or SIGTERM
        float val_loss = -1.0f;
        if (run.have_val && o->eval_batches > 0 && (last || is_due(step, o->eval_every))) {
            val_loss = evaluate(model, &run.val, o->eval_batches, last ? run.routing_dump : NULL, o->routing_dump);
            printf("step %5d | validation loss %.4f\n", step, val_loss);
        }
        if (o->sample_tokens > 0 && step > run.start_step && (last || is_due(step, o->sample_every))) {
            print_sample(&run, step);
        }

        double t0 = wall_seconds();
        float lr = learning_rate(step, schedule_length(o), o->warmup, o->lr);
        // The step's batch is cut into micro-batches, `micro` of them on each rank: forward and
        // backward on each, their gradients summed in order, then the mean over every rank's.
        dataloader_next_batch(&run.train);
        memcpy(run.p_used, model->threshold, model->config.num_layers * sizeof(float));
        step_totals_reset(&run.totals);
        for (int k = 0; k < micro; k++) {
            size_t first = (size_t)(dp_rank * micro + k) * rows * T;
            model_forward(model, run.train.inputs + first, run.train.targets + first, rows, T);
            model_zero_grad(model);
            model_backward(model);
            model_accumulate_grads(model, k, micro);
            step_totals_add(&run.totals, model);
        }
        if (micro_batches > 1) { model_allreduce_grads(model, 1.0f / micro_batches); }
        step_totals_finish(&run.totals, micro_batches);  // the step's losses and routing, all ranks
        if (!isfinite(run.totals.losses[0])) { fail_diverged(&run, "the loss", run.totals.losses[0], step); }
        float grad_norm = model_update(model, lr, o->weight_decay);
        if (!isfinite(grad_norm)) { fail_diverged(&run, "the gradient norm", grad_norm, step); }
        controller_update_from(model, run.totals.stats.layer_mean);  // p for the next step
        if (is_due(step + 1, o->check_ranks)) { check_ranks_agree(model, step + 1); }

        double dt = wall_seconds() - t0;
        train_seconds += step > run.start_step ? dt : 0.0;
        double mean_dt = step > run.start_step ? train_seconds / (step - run.start_step) : dt;
        report_step(&run, step, val_loss, lr, grad_norm, dt, mean_dt * (o->steps - step - 1));
        if (last || stop || is_due(step + 1, o->checkpoint_every)) { write_checkpoint(&run, step + 1); }
        if (stop) {
            status = report_stop(&run, step + 1);
            break;
        }
    }
    if (o->sample_tokens > 0 && run.last_checkpoint == o->steps) { print_sample(&run, -1); }
    parallel_report(o->steps - run.start_step);  // bytes sent, load across ranks (with several ranks)
    printf("done: %s/model.bin, %s/log.csv\n", o->out_dir, o->out_dir);
    run_free(&run);
    dp_finish();
    return status;
}
#endif  // TESTING
