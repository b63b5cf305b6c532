/*
train_dtopp.c: training a DTop-p Mixture-of-Experts language model in plain C.

DTop-p (dynamic top-p) routing sends each token to experts in order of router probability until
their cumulative probability passes a threshold p, so confident tokens use few experts and
uncertain ones many. A PI controller moves p between steps so that the average number of
activated experts per token converges to a target budget, and Dynamic Routing Normalization
(DRN: a learnable per-layer scale on standardized router logits) lets layers differ under the one
threshold. The function computed here is specified exactly in doc/spec.md; doc/formats.md
describes every file this program reads or writes.

Reading order: utilities; configuration; the parameters in one buffer; the model's state and the
functions every implementation provides, with what they share (initialisation, the learning-rate
schedule, the PI controller, statistics, checkpoints, sampling a token); then the CPU
implementation: activations, the layers as forward/backward pairs, the MoE layer (router,
dispatch, experts, combine, auxiliary losses), the model's forward and backward passes, AdamW,
the sampler's KV cache; last, the training program. train_dtopp.cu provides the same functions on
a GPU and shares everything else with this file (doc/tour.md).

Determinism: every parallel loop writes disjoint outputs and every reduction runs in a fixed
order, so results are bitwise identical for any number of threads.
*/
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <glob.h>
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

static void *realloc_check(void *ptr, size_t size) {
    void *out = realloc(ptr, size > 0 ? size : 1);
    if (out == NULL) { fail("out of memory growing a buffer to %zu bytes", size); }
    return out;
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

// Opens a file and checks its header's magic and version. The payload's size depends on fields of
// the header, so the caller checks it afterwards with check_payload_size.
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
    if (strlen(path) + 5 > tmp_size) { fail("path too long: %s", path); }
    memcpy(tmp_path, path, strlen(path));
    memcpy(tmp_path + strlen(path), ".tmp", 5);
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

static inline int padded_vocab(int V) { return (V + 127) / 128 * 128; }

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

enum { PARAM_WTE, PARAM_G1, PARAM_WQKV, PARAM_WO, PARAM_G2, PARAM_WR, PARAM_THETA, PARAM_W1, PARAM_W3, PARAM_W2, PARAM_GF };
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

static LayerWeights layer_weights(const ParameterTensors *p, const ModelConfig *c, int l) {
    size_t C = c->channels, E = c->num_experts, H = c->expert_hidden;
    LayerWeights w = {p->g1 + l * C, p->wqkv + l * 3 * C * C, p->wo + l * C * C, p->g2 + l * C,
                      p->wr + l * E * C, p->theta + l, p->w1 + l * E * H * C, p->w3 + l * E * H * C,
                      p->w2 + l * E * C * H};
    return w;
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
void model_activated_per_layer(const Model *model, double *activated);  // (L) mean |S| of the last forward
void model_routing_counts(const Model *model, int *n_selected, int *expert_load);  // (L, N), (L, E)
void model_get_logits(const Model *model, float *out);        // (N, V)
void model_get_token_losses(const Model *model, float *out);  // (N) cross-entropy of every position
void model_get_losses(const Model *model, float *out);        // total, CE, LB_l for each l, H_l for each l
void model_get_routing(const Model *model, int *n_selected, int *selected, float *gates);  // (L,N), (L,N,E), (L,N,E)
void model_get_grads(const Model *model, float *out);
void model_get_params(const Model *model, float *out);
void model_get_theta(const Model *model, float *out);  // (L) the DRN scales
void model_get_moments(const Model *model, float *m, float *v);
void model_set_moments(Model *model, const float *m, const float *v);
Decoder *decoder_create(const Model *model);
const float *decoder_step(Model *model, Decoder *decoder, int token, int pos);  // logits (V) of the next token
void decoder_free(Decoder *decoder);

// What both implementations share: sizes, the starting state, the controller law, the checkpoint
// file, statistics.

static void model_setup(Model *model, const ModelConfig *config, const RouterConfig *router, const char *where) {
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

// Fresh parameters from a seed (doc/spec.md, section 5): matrices normal(0, 0.02), the output projections of each
// block (Wo, W2) scaled down by sqrt(2L), gains 1, θ = theta_init, padded vocabulary rows zero.
static void init_params(float *params, const Model *model, uint64_t seed) {
    const ModelConfig *c = &model->config;
    uint64_t rng = seed;
    float *p = params;
    float residual_std = 0.02f / sqrtf(2.0f * c->num_layers);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        float std = (i == PARAM_WO || i == PARAM_W2) ? residual_std : 0.02f;
        for (size_t j = 0; j < model->param_sizes[i]; j++) {
            p[j] = param_is_matrix[i] ? std * random_normal(&rng) : (i == PARAM_THETA ? model->router.theta_init : 1.0f);
        }
        p += model->param_sizes[i];
    }
    memset(params + (size_t)c->vocab_size * c->channels, 0,
           (size_t)(c->padded_vocab_size - c->vocab_size) * c->channels * sizeof(float));
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

// a_t of the last forward pass: mean |S| over its tokens and layers.
double model_activated(const Model *model) {
    int L = model->config.num_layers;
    double *activated = (double *)malloc_check(L * sizeof(double)), mean = 0.0;
    model_activated_per_layer(model, activated);
    for (int l = 0; l < L; l++) { mean += activated[l] / L; }
    free(activated);
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
    double *activated = (double *)malloc_check(L * sizeof(double)), global = model_activated(model);
    model_activated_per_layer(model, activated);
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

void routing_stats_compute(RoutingStats *s, const Model *model) {
    int N = model->B * model->T, L = model->config.num_layers, E = model->config.num_experts;
    int *n_selected = (int *)malloc_check((size_t)L * N * sizeof(int));
    int *expert_load = (int *)malloc_check((size_t)L * E * sizeof(int));
    model_routing_counts(model, n_selected, expert_load);
    s->activated = 0.0;
    for (int l = 0; l < L; l++) {
        const int *count = n_selected + (size_t)l * N;
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
        double lsum = 0.0, lsumsq = 0.0;
        s->load_min[l] = N;
        s->load_max[l] = 0;
        for (int e = 0; e < E; e++) {
            int load = expert_load[(size_t)l * E + e];
            s->load_min[l] = load < s->load_min[l] ? load : s->load_min[l];
            s->load_max[l] = load > s->load_max[l] ? load : s->load_max[l];
            lsum += load;
            lsumsq += (double)load * load;
        }
        double lmean = lsum / E, lvar = lsumsq / E - lmean * lmean;
        s->load_cv[l] = lmean > 0.0 && lvar > 0.0 ? sqrt(lvar) / lmean : 0.0;
    }
    free(n_selected);
    free(expert_load);
}

// ----------------------------------------------------------------------------
// model checkpoints (doc/formats.md): architecture, routing configuration, parameters, controller

#define MODEL_MAGIC 20251213
#define MODEL_VERSION 1

// The header words of a model checkpoint (doc/formats.md): integers from word 2, float32 values
// from word 32, in this order. Saving and loading both walk this one list.
#define HEADER_INT_FIELDS 13
#define HEADER_FLOAT_FIELDS 10
static void header_fields(ModelConfig *c, RouterConfig *rc, int *ints[HEADER_INT_FIELDS], float *floats[HEADER_FLOAT_FIELDS]) {
    int *i[HEADER_INT_FIELDS] = {&c->max_seq_len, &c->vocab_size, &c->padded_vocab_size, &c->num_layers, &c->num_heads,
                                 &c->channels, &c->num_experts, &c->expert_hidden, &rc->routing, &rc->controller,
                                 &rc->drn, &rc->renorm, &rc->k};
    float *f[HEADER_FLOAT_FIELDS] = {&rc->tgt, &rc->Kp, &rc->Ki, &rc->p0, &rc->pmin, &rc->pmax, &rc->theta_init,
                                     &rc->lb_coef, &rc->ent_coef, &rc->p};
    memcpy(ints, i, sizeof(i));
    memcpy(floats, f, sizeof(f));
}

// params: the parameters in host memory.
static void checkpoint_save(const Model *model, const float *params, const char *path) {
    const ModelConfig *c = &model->config;
    ModelConfig config = model->config;
    RouterConfig router = model->router;
    int *ints[HEADER_INT_FIELDS];
    float *floats[HEADER_FLOAT_FIELDS];
    header_fields(&config, &router, ints, floats);
    int32_t header[HEADER_WORDS] = {0};
    header[0] = MODEL_MAGIC;
    header[1] = MODEL_VERSION;
    for (int i = 0; i < HEADER_INT_FIELDS; i++) { header[2 + i] = *ints[i]; }
    for (int i = 0; i < HEADER_FLOAT_FIELDS; i++) { header_set_float(header, 32 + i, *floats[i]); }
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
    FILE *f = open_with_header(path, header, MODEL_MAGIC, MODEL_VERSION, "model checkpoint", &size);
    ModelConfig config, *c = &config;
    RouterConfig router, *rc = &router;
    int *ints[HEADER_INT_FIELDS];
    float *floats[HEADER_FLOAT_FIELDS];
    header_fields(c, rc, ints, floats);
    for (int i = 0; i < HEADER_INT_FIELDS; i++) { *ints[i] = header[2 + i]; }
    for (int i = 0; i < HEADER_FLOAT_FIELDS; i++) { *floats[i] = header_float(header, 32 + i); }
    model_setup(model, c, rc, path);
    check_payload_size(path, size, (model->num_parameters + 2 * (size_t)c->num_layers) * sizeof(float));
    float *params = (float *)malloc_check(model->num_parameters * sizeof(float));
    fread_check(params, sizeof(float), model->num_parameters, f, path);
    fread_check(model->threshold, sizeof(float), c->num_layers, f, path);
    fread_check(model->integral, sizeof(float), c->num_layers, f, path);
    fclose(f);
    for (size_t i = 0; i < model->num_parameters; i++) {
        if (!isfinite(params[i])) { fail("%s: parameter %zu is not finite", path, i); }
    }
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

#ifndef DTOPP_CUDA  // the CPU implementation; train_dtopp.cu provides the same functions on the GPU

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

#define RMSNORM_EPS 1e-5f
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
    size_t work = (size_t)rows * IC * OC;
    #pragma omp parallel for collapse(2) schedule(static) if (work >= PARALLEL_MIN_WORK)
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
                for (int n0 = nb; n0 < nb_end; n0 += GEMM_NR) {  // the B panel stays in L1 across the A panels
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

// Causal self-attention. qkv (B, T, 3C) -> out (B, T, C), att (B, NH, T, T) probabilities (row t
// holds keys 0..t; the rest of the row up to the end of its block of queries holds zeros).
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

void attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH) {
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
                float *block = probs + (size_t)t0 * T;  // rows t0 .. t1-1, keys 0 .. t1-1
                // scores q·k of the block's queries against keys 0 .. t1-1
                sgemm_serial(n_queries, t1, hd, view_offset(q, t0, 0), transposed(k), block, T, 0);
                for (int t = t0; t < t1; t++) {
                    float *p = probs + (size_t)t * T, maxval = -INFINITY, sum = 0.0f;
                    #pragma omp simd reduction(max : maxval)
                    for (int j = 0; j <= t; j++) {
                        p[j] *= scale;
                        maxval = p[j] > maxval ? p[j] : maxval;
                    }
                    #pragma omp simd reduction(+ : sum)
                    for (int j = 0; j <= t; j++) {
                        p[j] = exp_fast(p[j] - maxval);
                        sum += p[j];
                    }
                    float inv = 1.0f / sum;
                    for (int j = 0; j <= t; j++) { p[j] *= inv; }
                    for (int j = t + 1; j < t1; j++) { p[j] = 0.0f; }  // the causal mask
                }
                MatrixView p_block = {block, NULL, T, 0};
                sgemm_serial(n_queries, hd, t1, p_block, v, out + ((size_t)b * T + t0) * C + h * hd, C, 0);
            }
        }
    }
}

// With P the probabilities, dP = dout · v^T; through the softmax dS = P ⊙ (dP - rowsum(P ⊙ dP))
// · scale; then dq = dS · k, dk = dS^T · q, dv = P^T · dout. Each thread owns whole (b, h) pairs
// (their keys and values receive gradient from every later query) and takes the queries in
// blocks in order, so every sum runs in the same order for any number of threads. rowsums (B, NH,
// T) receives rowsum(P ⊙ dP) of every query.
void attention_backward(float *dqkv, float *rowsums, const float *dout, const float *qkv, const float *att,
                        int B, int T, int C, int NH) {
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
                float *rowsum = rowsums + ((size_t)b * NH + h) * T;
                for (int t0 = 0; t0 < T; t0 += ATTENTION_BLOCK) {
                    int t1 = t0 + ATTENTION_BLOCK < T ? t0 + ATTENTION_BLOCK : T, n_queries = t1 - t0;
                    MatrixView p_block = {probs + (size_t)t0 * T, NULL, T, 0};
                    MatrixView d_block = view_offset(d, t0, 0), ds_block = {dscores, NULL, t1, 0};
                    sgemm_serial(n_queries, t1, hd, d_block, transposed(v), dscores, t1, 0);  // dP
                    for (int t = t0; t < t1; t++) {
                        const float *p = probs + (size_t)t * T;
                        float *ds = dscores + (size_t)(t - t0) * t1, pdp = 0.0f;
                        #pragma omp simd reduction(+ : pdp)
                        for (int j = 0; j <= t; j++) { pdp += p[j] * ds[j]; }
                        for (int j = 0; j <= t; j++) { ds[j] = p[j] * (ds[j] - pdp) * scale; }
                        for (int j = t + 1; j < t1; j++) { ds[j] = 0.0f; }
                        rowsum[t] = pdp;
                    }
                    sgemm_serial(n_queries, hd, t1, ds_block, k, dq + (size_t)t0 * 3 * C, 3 * (size_t)C, 1);
                    sgemm_serial(t1, hd, n_queries, transposed(ds_block), view_offset(q, t0, 0), dk,
                                 3 * (size_t)C, 1);
                    sgemm_serial(t1, hd, n_queries, transposed(p_block), d_block, dv, 3 * (size_t)C, 1);
                }
            }
        }
        free(dscores);
    }
}

void residual_forward(float *out, const float *inp1, const float *inp2, int n) {
    #pragma omp parallel for simd if (n >= PARALLEL_MIN_WORK)
    for (int i = 0; i < n; i++) { out[i] = inp1[i] + inp2[i]; }
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
// them, come in the same order on every run).
void moe_dispatch(RouterView r, int *row_token, int N, int E) {
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

// Writes din (rows, C), the gradient of the gathered inputs, one row per (token, expert) pair
// (moe_gather_rows then sums each token's rows); accumulates into dw1, dw3, dw2.
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
    free(model->m_memory);
    free(model->v_memory);
    free(model->threshold);
    free(model->integral);
    free(model->ws->rope_cos);
    free(model->ws->rope_sin);
    activations_free(&model->ws->acts);
    free(model->ws);
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
    a->routing.row_offset[0] = 0;
    for (int l = 0; l < L; l++) {
        LayerWeights w = layer_weights(&model->params, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * N * C;
        float *ln1 = t->ln1 + (size_t)l * N * C, *qkv = t->qkv + (size_t)l * N * 3 * C;
        float *atty = t->atty + (size_t)l * N * C, *res1 = t->res1 + (size_t)l * N * C;
        float *ln2 = t->ln2 + (size_t)l * N * C, *res2 = t->res2 + (size_t)l * N * C;
        rmsnorm_forward(ln1, t->ln1_rstd + (size_t)l * N, x, w.g1, N, C);
        matmul_forward(qkv, ln1, NULL, w.wqkv, N, C, 3 * C);
        rope_forward(qkv, model->ws->rope_cos, model->ws->rope_sin, B, T, C, NH);
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
    d->kv_cache = (float *)malloc_check((size_t)c->num_layers * c->max_seq_len * 3 * c->channels * sizeof(float));
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
        for (int h = 0; h < 2 * NH; h++) { rope_rotate(qkv + h * hd, model->ws->rope_cos, model->ws->rope_sin, pos, hd, 1.0f); }
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

// ----------------------------------------------------------------------------
// results of the last forward/backward pass, copied out (the CUDA twin copies them from the
// device): what tests and tools read

void model_get_logits(const Model *model, float *out) {  // (N, V)
    memcpy(out, model->ws->acts.acts.logits, (size_t)model->ws->acts.B * model->ws->acts.T * model->config.vocab_size * sizeof(float));
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
    size_t LN = (size_t)model->config.num_layers * model->ws->acts.B * model->ws->acts.T, E = model->config.num_experts;
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
    float lr, weight_decay;
    long long seed;
    // evaluation, sampling, checkpoints
    int eval_every, eval_batches, sample_every, sample_tokens, top_k, checkpoint_every, stop_at, generate;
    float temperature;
    const char *prompt;
    const char *routing_dump;
    int model_options_given;  // how many architecture or routing options the command line set
} Options;

typedef struct {
    const char *name;  // long option name, without "--"
    char type;         // 's' string, 'i' int, 'f' float, 'l' long long
    void *value;
    const char *help;
    int describes_model;  // architecture or routing: comes from the checkpoint with --init or --resume
} OptionSpec;

static int option_specs(Options *o, OptionSpec *specs) {
    OptionSpec list[] = {
        {"train", 's', &o->train_pattern, "training shards (glob pattern)", 0},
        {"val", 's', &o->val_pattern, "validation shards (glob pattern; empty: none)", 0},
        {"tokenizer", 's', &o->tokenizer_path, "tokenizer file, for prompts and samples of GPT-2 tokens", 0},
        {"out", 's', &o->out_dir, "output directory: log.csv, model.bin, checkpoints", 0},
        {"init", 's', &o->init_path, "start from this model checkpoint (architecture and routing from the file)", 0},
        {"resume", 's', &o->resume_dir, "continue the run whose checkpoints are in this directory", 0},
        {"model", 's', &o->preset, "size preset: tiny, small, medium, gpt2-moe", 1},
        {"layers", 'i', &o->layers, "L, transformer blocks", 1},
        {"channels", 'i', &o->channels, "C, model width", 1},
        {"heads", 'i', &o->heads, "NH, attention heads", 1},
        {"experts", 'i', &o->experts, "E, experts per layer", 1},
        {"expert-hidden", 'i', &o->expert_hidden, "H, hidden width of one expert", 1},
        {"max-seq-len", 'i', &o->max_seq_len, "longest sequence the model accepts, for sampling (default: 1024, at least seq-len)", 1},
        {"routing", 's', &o->routing, "topk, topp or dtopp", 1},
        {"controller", 's', &o->controller, "dtopp: global (one p) or layer (one p per layer)", 1},
        {"drn", 'i', &o->drn, "Dynamic Routing Normalization 1/0 (default: 1 for dtopp, else 0)", 1},
        {"renorm", 'i', &o->renorm, "renormalise the gates over the selected experts 1/0", 1},
        {"k", 'i', &o->k, "topk: experts per token", 1},
        {"p", 'f', &o->p, "topp: the fixed threshold", 1},
        {"tgt", 'f', &o->tgt, "dtopp: target average number of activated experts", 1},
        {"kp", 'f', &o->Kp, "dtopp: proportional gain", 1},
        {"ki", 'f', &o->Ki, "dtopp: integral gain", 1},
        {"p0", 'f', &o->p0, "dtopp: starting and central threshold", 1},
        {"pmin", 'f', &o->pmin, "dtopp: lowest threshold", 1},
        {"pmax", 'f', &o->pmax, "dtopp: highest threshold", 1},
        {"theta-init", 'f', &o->theta_init, "initial DRN scale", 1},
        {"lb-coef", 'f', &o->lb_coef, "load-balance loss coefficient", 1},
        {"ent-coef", 'f', &o->ent_coef, "router entropy loss coefficient (default: 1e-3 top-p modes, 0 topk)", 1},
        {"batch", 'i', &o->batch, "B, sequences per step", 0},
        {"seq-len", 'i', &o->seq_len, "T, tokens per sequence", 0},
        {"steps", 'i', &o->steps, "optimizer steps", 0},
        {"lr", 'f', &o->lr, "peak learning rate", 0},
        {"warmup", 'i', &o->warmup, "learning-rate warm-up steps", 0},
        {"weight-decay", 'f', &o->weight_decay, "AdamW weight decay of the matrices", 0},
        {"shuffle", 'i', &o->shuffle, "shuffle the training windows 1/0", 0},
        {"seed", 'l', &o->seed, "seed of the initialisation, the shuffle and the sampler", 0},
        {"threads", 'i', &o->threads, "OpenMP threads (0: all)", 0},
        {"eval-every", 'i', &o->eval_every, "steps between validations (0: only at the end)", 0},
        {"eval-batches", 'i', &o->eval_batches, "validation batches", 0},
        {"sample-every", 'i', &o->sample_every, "steps between samples (0: only at the end)", 0},
        {"sample-tokens", 'i', &o->sample_tokens, "tokens per sample (0: no samples)", 0},
        {"prompt", 's', &o->prompt, "text the samples start from (default: none)", 0},
        {"temperature", 'f', &o->temperature, "sampling temperature (0: most likely token)", 0},
        {"top-k", 'i', &o->top_k, "sample from the top k tokens (0: all)", 0},
        {"checkpoint-every", 'i', &o->checkpoint_every, "steps between checkpoints (0: only at the end)", 0},
        {"routing-dump", 's', &o->routing_dump, "at the last validation, write every token's |S| per layer and loss to this CSV", 0},
        {"stop-at", 'i', &o->stop_at, "stop after this step with a checkpoint (0: run to --steps); continue with --resume", 0},
        {"generate", 'i', &o->generate, "with --init: print this many tokens after --prompt and exit", 0},
    };
    int n = (int)(sizeof(list) / sizeof(list[0]));
    if (specs != NULL) { memcpy(specs, list, sizeof(list)); }
    return n;
}

static void default_options(Options *o) {
    memset(o, 0, sizeof(*o));
    o->train_pattern = "data/tinyshakespeare_train.bin";
    o->val_pattern = "data/tinyshakespeare_val.bin";
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
    for (int i = 0; i < n; i++) {
        char def[64] = "";
        switch (specs[i].type) {
            case 's': snprintf(def, sizeof(def), "%s", *(const char **)specs[i].value ? *(const char **)specs[i].value : ""); break;
            case 'i': if (*(int *)specs[i].value >= 0) { snprintf(def, sizeof(def), "%d", *(int *)specs[i].value); } break;
            case 'f': if (*(float *)specs[i].value >= 0.0f) { snprintf(def, sizeof(def), "%g", *(float *)specs[i].value); } break;
            case 'l': snprintf(def, sizeof(def), "%lld", *(long long *)specs[i].value); break;
        }
        printf("  --%-17s %s%s%s%s\n", specs[i].name, specs[i].help, def[0] ? " [" : "", def, def[0] ? "]" : "");
    }
}

static void parse_options(Options *o, int argc, char **argv) {
    OptionSpec specs[64];
    int n = option_specs(o, specs);
    for (int a = 1; a < argc; a++) {
        if (strcmp(argv[a], "-h") == 0 || strcmp(argv[a], "--help") == 0) {
            print_usage();
            exit(EXIT_SUCCESS);
        }
        const OptionSpec *spec = NULL;
        for (int i = 0; i < n; i++) {
            if (strncmp(argv[a], "--", 2) == 0 && strcmp(argv[a] + 2, specs[i].name) == 0) { spec = &specs[i]; }
        }
        if (spec == NULL) { fail("unknown option %s (see --help)", argv[a]); }
        o->model_options_given += spec->describes_model;
        if (a + 1 >= argc) { fail("option %s needs a value", argv[a]); }
        const char *value = argv[++a];
        char *end = NULL;
        errno = 0;
        switch (spec->type) {
            case 's': *(const char **)spec->value = value; break;
            case 'i': *(int *)spec->value = (int)strtol(value, &end, 10); break;
            case 'f': *(float *)spec->value = strtof(value, &end); break;
            case 'l': *(long long *)spec->value = strtoll(value, &end, 10); break;
        }
        if (spec->type != 's' && (errno != 0 || end == value || *end != '\0')) { fail("option --%s: cannot read '%s' as a number", spec->name, value); }
    }
}

static int parse_name(const char *value, const char *const *names, int count, const char *option) {
    for (int i = 0; i < count; i++) {
        if (strcmp(value, names[i]) == 0) { return i; }
    }
    fail("option --%s: unknown value '%s'", option, value);
    return -1;
}

// The model and router configuration that the options describe, for a vocabulary of V tokens.
static void configure_model(const Options *o, int V, ModelConfig *c, RouterConfig *rc) {
    const Preset *preset = NULL;
    for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++) {
        if (strcmp(o->preset, presets[i].name) == 0) { preset = &presets[i]; }
    }
    if (preset == NULL) { fail("option --model: unknown preset '%s' (tiny, small, medium, gpt2-moe)", o->preset); }
    c->vocab_size = V;
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

static void check_options(const Options *o) {
    if (o->batch < 1 || o->seq_len < 1) { fail("--batch and --seq-len must be >= 1 (got %d, %d)", o->batch, o->seq_len); }
    if (o->steps < 1 && o->generate <= 0) { fail("--steps must be >= 1 (got %d)", o->steps); }
    if (o->warmup < 1) { fail("--warmup must be >= 1 (got %d)", o->warmup); }
    if (!(o->lr > 0.0f) || !(o->weight_decay >= 0.0f)) { fail("--lr must be > 0 and --weight-decay >= 0"); }
    if (o->drn < -1 || o->drn > 1 || o->renorm < 0 || o->renorm > 1 || o->shuffle < 0 || o->shuffle > 1) { fail("--drn, --renorm and --shuffle take 0 or 1"); }
    if (o->eval_every < 0 || o->sample_every < 0 || o->checkpoint_every < 0 || o->eval_batches < 0 || o->sample_tokens < 0) {
        fail("intervals and counts must be >= 0");
    }
    if (o->temperature < 0.0f) { fail("--temperature must be >= 0"); }
    if (o->stop_at < 0) { fail("--stop-at must be >= 0"); }
    if (o->ent_coef < 0.0f && o->ent_coef != -1.0f) { fail("--ent-coef must be >= 0 (or -1 for the mode's default)"); }
    if (o->init_path != NULL && o->resume_dir != NULL) { fail("--init and --resume exclude each other"); }
}

// ----------------------------------------------------------------------------
// text in and out: GPT-2 tokens through tokenizer.bin, or bytes for a byte-level vocabulary

typedef struct {
    int byte_level;  // vocabulary of 256: a token is a byte
    int loaded;
    Tokenizer tokenizer;
} TextCodec;

static void codec_init(TextCodec *codec, const char *tokenizer_path, int V) {
    codec->byte_level = V == 256;
    codec->loaded = 0;
    if (!codec->byte_level) {
        tokenizer_init(&codec->tokenizer, tokenizer_path);
        codec->loaded = 1;
        if (tokenizer_vocab_size(&codec->tokenizer) != V) {
            fail("%s has %d tokens but the model's vocabulary has %d", tokenizer_path, tokenizer_vocab_size(&codec->tokenizer), V);
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

// Prints the prompt and then n_tokens sampled tokens. Starts from end-of-text (or a newline for
// bytes) when the prompt is empty.
static void generate_text(Model *model, const TextCodec *codec, const char *prompt, int n_tokens,
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
    if ((int)n_prompt >= max_len) { fail("the prompt has %zu tokens; the model takes at most %d", n_prompt, max_len); }
    Decoder *decoder = decoder_create(model);
    const float *logits = NULL;
    for (size_t i = 0; i < n_prompt; i++) { logits = decoder_step(model, decoder, ids[i], (int)i); }
    int pos = (int)n_prompt;
    for (int i = 0; i < n_tokens && pos < max_len; i++, pos++) {
        int token = sample_token(logits, model->config.vocab_size, temperature, top_k, rng);
        codec_print(codec, token);
        if (pos + 1 < max_len) { logits = decoder_step(model, decoder, token, pos); }
    }
    printf("\n");
    fflush(stdout);
    decoder_free(decoder);
    free(ids);
}

// ----------------------------------------------------------------------------
// training state files (doc/formats.md): optimizer moments, step, data position, sampler state.
// A checkpoint is the pair model_STEP.bin + state_STEP.bin; the newer pair is complete before the
// older one is removed, so a crash never leaves the run without a checkpoint.

#define STATE_MAGIC 20251214
#define STATE_VERSION 1

static void state_save(const Model *model, const char *path, int step, const long long position[4], uint64_t rng) {
    int32_t header[HEADER_WORDS] = {0};
    header[0] = STATE_MAGIC;
    header[1] = STATE_VERSION;
    header[2] = step;
    header[3] = model->adam_step;
    memcpy(&header[4], position, 4 * sizeof(long long));  // words 4..11
    memcpy(&header[12], &rng, sizeof(uint64_t));         // words 12..13
    header[14] = (int32_t)(model->num_parameters & 0x7fffffff);
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

static int state_load(Model *model, const char *path, long long position[4], uint64_t *rng) {
    int32_t header[HEADER_WORDS];
    long size;
    FILE *f = open_with_header(path, header, STATE_MAGIC, STATE_VERSION, "training state", &size);
    if (header[14] != (int32_t)(model->num_parameters & 0x7fffffff)) { fail("%s belongs to a model of a different size", path); }
    check_payload_size(path, size, 2 * model->num_parameters * sizeof(float));
    int step = header[2];
    model->adam_step = header[3];
    memcpy(position, &header[4], 4 * sizeof(long long));
    memcpy(rng, &header[12], sizeof(uint64_t));
    float *m = (float *)malloc_check(model->num_parameters * sizeof(float));
    float *v = (float *)malloc_check(model->num_parameters * sizeof(float));
    fread_check(m, sizeof(float), model->num_parameters, f, path);
    fread_check(v, sizeof(float), model->num_parameters, f, path);
    fclose(f);
    model_set_moments(model, m, v);
    free(m);
    free(v);
    return step;
}

static void checkpoint_path(char *out, size_t size, const char *dir, const char *kind, int step) {
    snprintf(out, size, "%s/%s_%08d.bin", dir, kind, step);
}

// The highest step with both files present, or -1.
static int latest_checkpoint(const char *dir) {
    char pattern[4096];
    snprintf(pattern, sizeof(pattern), "%s/state_*.bin", dir);
    glob_t found;
    int best = -1;
    if (glob(pattern, 0, NULL, &found) == 0) {
        for (size_t i = 0; i < found.gl_pathc; i++) {
            const char *name = strrchr(found.gl_pathv[i], '/') + 1;
            int step;
            char model_path[4096];
            if (sscanf(name, "state_%d.bin", &step) != 1) { continue; }
            checkpoint_path(model_path, sizeof(model_path), dir, "model", step);
            if (access(model_path, R_OK) == 0 && step > best) { best = step; }
        }
        globfree(&found);
    }
    return best;
}

static void write_checkpoint(const Model *model, const char *dir, int step, int previous_step,
                             const DataLoader *loader, uint64_t rng) {
    char model_path[4096], state_path[4096], latest[4096];
    long long position[4];
    dataloader_get_position(loader, position);
    checkpoint_path(model_path, sizeof(model_path), dir, "model", step);
    checkpoint_path(state_path, sizeof(state_path), dir, "state", step);
    model_save(model, model_path);
    state_save(model, state_path, step, position, rng);
    snprintf(latest, sizeof(latest), "%s/model.bin", dir);  // the latest model under a fixed name, for sampling
    model_save(model, latest);
    if (previous_step >= 0 && previous_step != step) {
        checkpoint_path(model_path, sizeof(model_path), dir, "model", previous_step);
        checkpoint_path(state_path, sizeof(state_path), dir, "state", previous_step);
        remove(state_path);
        remove(model_path);
    }
}

// ----------------------------------------------------------------------------
// logging

static FILE *open_log(const char *dir, const Model *model, int append) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/log.csv", dir);
    FILE *f = fopen(path, append ? "a" : "w");
    if (f == NULL) { fail("cannot write %s: %s", path, strerror(errno)); }
    if (!append) {
        fprintf(f, "step,loss,ce_loss,val_loss,lr,grad_norm,activated,p,tokens_per_s");
        for (int l = 0; l < model->config.num_layers; l++) {
            fprintf(f, ",p_%d,mean_%d,std_%d,theta_%d,lb_%d,ent_%d,load_min_%d,load_max_%d,load_cv_%d", l, l, l, l, l, l, l, l, l);
            for (int s = 0; s <= model->config.num_experts; s++) { fprintf(f, ",hist_%d_%d", l, s); }
        }
        fprintf(f, "\n");
    }
    return f;
}

static void log_step(FILE *f, const Model *model, const RoutingStats *stats, const float *p_used, int step,
                     float val_loss, float lr, float grad_norm, double tokens_per_s) {
    int L = model->config.num_layers, E = model->config.num_experts;
    float *losses = (float *)malloc_check((2 + 2 * L) * sizeof(float));
    float *theta = (float *)malloc_check(L * sizeof(float));
    model_get_losses(model, losses);
    model_get_theta(model, theta);  // after this step's update
    fprintf(f, "%d,%.6f,%.6f,", step, losses[0], losses[1]);
    if (val_loss >= 0.0f) { fprintf(f, "%.6f", val_loss); }
    fprintf(f, ",%.6e,%.6f,%.6f,%.6f,%.1f", lr, grad_norm, stats->activated, p_used[0], tokens_per_s);
    for (int l = 0; l < L; l++) {
        fprintf(f, ",%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%d,%d,%.6f", p_used[l], stats->layer_mean[l], stats->layer_std[l],
                theta[l], losses[2 + l], losses[2 + L + l], stats->load_min[l], stats->load_max[l], stats->load_cv[l]);
        for (int s = 0; s <= E; s++) { fprintf(f, ",%d", stats->histogram[(size_t)l * (E + 1) + s]); }
    }
    fprintf(f, "\n");
    fflush(f);
    free(losses);
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
// every token's routing (dump_routing).
static float evaluate(Model *model, DataLoader *val, int batches, const char *dump_path) {
    int L = model->config.num_layers, E = model->config.num_experts;
    FILE *dump = NULL;
    if (dump_path != NULL) {
        dump = fopen(dump_path, "w");
        if (dump == NULL) { fail("cannot write %s: %s", dump_path, strerror(errno)); }
    }
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
    if (dump != NULL && fclose(dump) != 0) { fail("cannot write %s: %s", dump_path, strerror(errno)); }
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

int main(int argc, char **argv) {
    Options o;
    default_options(&o);
    parse_options(&o, argc, argv);
    check_options(&o);
    set_num_threads(o.threads);
    uint64_t rng = (uint64_t)o.seed ^ 0x5DEECE66Dull;  // the sampler's stream

    Model model;
    if (o.generate > 0) {  // sampling only
        if (o.init_path == NULL) { fail("--generate needs --init MODEL.bin"); }
        model_load(&model, o.init_path);
        TextCodec codec;
        codec_init(&codec, o.tokenizer_path, model.config.vocab_size);
        double t0 = wall_seconds();
        generate_text(&model, &codec, o.prompt, o.generate, o.temperature, o.top_k, &rng);
        fprintf(stderr, "%d tokens in %.2f s\n", o.generate, wall_seconds() - t0);
        if (codec.loaded) { tokenizer_free(&codec.tokenizer); }
        model_free(&model);
        return EXIT_SUCCESS;
    }

    DataLoader train, val;
    dataloader_init(&train, o.train_pattern, o.batch, o.seq_len, o.shuffle, (unsigned long long)o.seed);
    int have_val = o.val_pattern != NULL && o.val_pattern[0] != '\0';
    if (have_val) { dataloader_init(&val, o.val_pattern, o.batch, o.seq_len, 0, 0); }
    ensure_directory(o.out_dir);

    int start_step = 0, last_checkpoint = -1;
    if (o.resume_dir != NULL) {
        int step = latest_checkpoint(o.resume_dir);
        if (step < 0) { fail("--resume %s: no complete checkpoint (model_*.bin with state_*.bin) found", o.resume_dir); }
        char model_path[4096], state_path[4096];
        checkpoint_path(model_path, sizeof(model_path), o.resume_dir, "model", step);
        checkpoint_path(state_path, sizeof(state_path), o.resume_dir, "state", step);
        model_load(&model, model_path);
        long long position[4];
        start_step = state_load(&model, state_path, position, &rng);
        if (start_step != step) { fail("%s says step %d, its name says %d", state_path, start_step, step); }
        dataloader_set_position(&train, position);
        last_checkpoint = strcmp(o.resume_dir, o.out_dir) == 0 ? step : -1;
        printf("resuming %s at step %d\n", o.resume_dir, start_step);
    } else if (o.init_path != NULL) {
        model_load(&model, o.init_path);
    } else {
        ModelConfig config;
        RouterConfig router;
        configure_model(&o, train.vocab_size, &config, &router);
        model_init(&model, &config, &router, (uint64_t)o.seed);
    }
    if ((o.init_path != NULL || o.resume_dir != NULL) && o.model_options_given > 0) {
        fprintf(stderr, "note: the architecture and routing come from the checkpoint; %d model or routing option(s) ignored\n", o.model_options_given);
    }
    const ModelConfig *c = &model.config;
    const RouterConfig *rc = &model.router;
    if (train.vocab_size > c->vocab_size || (have_val && val.vocab_size > c->vocab_size)) {
        fail("the data's vocabulary (%d tokens) does not fit the model's (%d)", train.vocab_size, c->vocab_size);
    }
    if (o.seq_len > c->max_seq_len) { fail("--seq-len %d exceeds the model's maximum sequence length %d", o.seq_len, c->max_seq_len); }
    if (start_step >= o.steps) { fail("the run is already at step %d of --steps %d", start_step, o.steps); }
    TextCodec codec = {0};
    if (o.sample_tokens > 0) { codec_init(&codec, o.tokenizer_path, c->vocab_size); }

    printf("model: L=%d C=%d NH=%d E=%d H=%d V=%d max T=%d, %.2fM parameters (%.2fM active at |S|=1)\n",
           c->num_layers, c->channels, c->num_heads, c->num_experts, c->expert_hidden, c->vocab_size, c->max_seq_len,
           model.num_parameters / 1e6,
           (model.num_parameters - (double)c->num_layers * (c->num_experts - 1) * 3 * c->expert_hidden * c->channels) / 1e6);
    if (rc->routing == ROUTING_TOPK) { printf("routing: topk, k=%d", rc->k); }
    else if (rc->routing == ROUTING_TOPP) { printf("routing: topp, p=%g", rc->p); }
    else { printf("routing: dtopp, %s controller, target %g of %d experts, Kp=%g Ki=%g p0=%g", rc->controller ? "per-layer" : "global", rc->tgt, c->num_experts, rc->Kp, rc->Ki, rc->p0); }
    printf(", DRN %s, %s gates, lb %g, entropy %g\n", rc->drn ? "on" : "off", rc->renorm ? "renormalised" : "raw", rc->lb_coef, rc->ent_coef);
    printf("data: %zu training tokens (%zu batches of %dx%d), %zu validation tokens\n", train.num_tokens,
           train.num_batches, o.batch, o.seq_len, have_val ? val.num_tokens : (size_t)0);
    printf("threads: %d\n\n", omp_threads());

    FILE *log = open_log(o.out_dir, &model, o.resume_dir != NULL && strcmp(o.resume_dir, o.out_dir) == 0);
    RoutingStats stats;
    routing_stats_alloc(&stats, c);
    float *p_used = (float *)malloc_check(c->num_layers * sizeof(float));
    double train_seconds = 0.0;
    int timed_steps = 0;
    for (int step = start_step; step < o.steps; step++) {
        int last = step == o.steps - 1;
        float val_loss = -1.0f;
        if (have_val && o.eval_batches > 0 && (last || (o.eval_every > 0 && step % o.eval_every == 0))) {
            val_loss = evaluate(&model, &val, o.eval_batches, last ? o.routing_dump : NULL);
            printf("step %5d | validation loss %.4f\n", step, val_loss);
        }
        if (o.sample_tokens > 0 && step > start_step && (last || (o.sample_every > 0 && step % o.sample_every == 0))) {
            printf("--- sample at step %d:\n", step);
            generate_text(&model, &codec, o.prompt, o.sample_tokens, o.temperature, o.top_k, &rng);
            printf("---\n");
        }

        double t0 = wall_seconds();
        dataloader_next_batch(&train);
        memcpy(p_used, model.threshold, c->num_layers * sizeof(float));
        model_forward(&model, train.inputs, train.targets, o.batch, o.seq_len);
        if (!isfinite(model.loss)) { fail("the loss is %g at step %d: training diverged (try a lower --lr); the last checkpoint is kept", model.loss, step); }
        model_zero_grad(&model);
        model_backward(&model);
        float lr = learning_rate(step, o.steps, o.warmup, o.lr);
        float grad_norm = model_update(&model, lr, o.weight_decay);
        if (!isfinite(grad_norm)) { fail("the gradient norm is %g at step %d: training diverged; the last checkpoint is kept", grad_norm, step); }
        controller_update(&model);
        double dt = wall_seconds() - t0;
        if (step > start_step) {  // the first step pays for allocations
            train_seconds += dt;
            timed_steps++;
        }

        routing_stats_compute(&stats, &model);
        double mean_dt = timed_steps > 0 ? train_seconds / timed_steps : dt;
        double tokens_per_s = o.batch * o.seq_len / dt;
        double eta = mean_dt * (o.steps - step - 1);
        printf("step %5d/%d | loss %.4f | lr %.2e | p %.3f | experts %.2f", step + 1, o.steps, model.loss, lr, p_used[0], stats.activated);
        if (rc->routing == ROUTING_DTOPP) { printf(" (target %.2f)", rc->tgt); }
        printf(" | %.0f tok/s | %dm%02ds left\n", tokens_per_s, (int)(eta / 60), (int)eta % 60);
        fflush(stdout);
        log_step(log, &model, &stats, p_used, step + 1, val_loss, lr, grad_norm, tokens_per_s);

        int stop = step + 1 == o.stop_at;
        if (last || stop || (o.checkpoint_every > 0 && (step + 1) % o.checkpoint_every == 0)) {
            write_checkpoint(&model, o.out_dir, step + 1, last_checkpoint, &train, rng);
            last_checkpoint = step + 1;
        }
        if (stop) {
            printf("stopped at step %d: continue with --resume %s\n", step + 1, o.out_dir);
            break;
        }
    }
    if (o.sample_tokens > 0 && last_checkpoint == o.steps) {
        printf("--- sample after training:\n");
        generate_text(&model, &codec, o.prompt, o.sample_tokens, o.temperature, o.top_k, &rng);
        printf("---\n");
    }
    printf("done: %s/model.bin, %s/log.csv\n", o.out_dir, o.out_dir);

    fclose(log);
    free(p_used);
    routing_stats_free(&stats);
    if (codec.loaded) { tokenizer_free(&codec.tokenizer); }
    dataloader_free(&train);
    if (have_val) { dataloader_free(&val); }
    model_free(&model);
    return EXIT_SUCCESS;
}
#endif  // TESTING
