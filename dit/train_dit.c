/*
dit/train_dit.c: a class-conditional diffusion transformer (DiT) whose blocks route through the DTop-p
Mixture-of-Experts layer, trained with a rectified-flow objective on Fashion-MNIST.

It reuses the language model's core as it is: ../train_dtopp.c is included without its training
program (TESTING), and its layers do the work of every transformer block: RMSNorm, attention
(without the causal mask), the MoE layer with its router, DRN and auxiliary losses, the PI
controller, AdamW with clipping, the checkpoint header. What is new is what a diffusion model
needs around them:
  - patch embedding: each 28 x 28 image is cut into 4 x 4 patches (49 tokens), each patch
    projected to C channels, plus a fixed 2-D sin-cos position embedding;
  - conditioning: sinusoidal features of the time t through a 2-layer MLP, plus a class
    embedding whose extra row is the null class of classifier-free guidance;
  - adaLN-Zero: from the conditioning vector each block computes a shift, a scale and a gate for
    its attention branch and for its MoE branch (zero-initialised, so every block starts as the
    identity);
  - the final layer back to pixels, the rectified-flow loss, and an Euler sampler with guidance.
doc/dit.md explains the model, the objective, the sampler and the files; the checkpoint format is
in doc/formats.md.

The transformer trunk is a `Model` of train_dtopp.c (`Dit.trunk`): its configuration, routing
and controller state and its activations are the language model's, with patches for tokens, and
its tensors are views into this program's parameter buffer. Its `vocab_size` is the number of
values a patch has (P x P, patch_values here): that sizes the trunk's output activations (`logits`,
here the predicted velocity of each patch); the language model's embedding `wte` does not exist here.

Built with DIT_NO_MAIN, the file leaves out its training program (test/test_dit.c).
*/
#define TESTING                 // train_dtopp.c without its training program
#include "../train_dtopp.c"     // defines: Model, model_*, the layers, the MoE layer, the controller, AdamW
#include "../dtopp/stats.h"     // defines: RoutingStats, routing_stats_alloc/compute/free
#include "idx.h"                // defines: IdxData, idx_read, idx_read_dataset
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"  // the language model's state files go unused here
#include "../dtopp/runfiles.h"  // defines: checkpoint names, check_moments, lock_directory, truncate_log
#pragma GCC diagnostic pop

// ----------------------------------------------------------------------------
// configuration

typedef struct {
    int image_size;   // S: images are S x S, one channel
    int patch_size;   // P: tokens are P x P patches, (S/P)^2 of them
    int num_classes;  // K; class K is the null class (no label), for classifier-free guidance
} DitConfig;

// P², the values of one patch: the width of a patch token at the input and at the output. The
// trunk holds it as its `vocab_size` (dit_trunk_config), which sizes its output activations.
static inline int patch_values(const DitConfig *d) { return d->patch_size * d->patch_size; }

// The trunk of a DiT: the language model's configuration with patches for tokens.
static ModelConfig dit_trunk_config(const DitConfig *d, int L, int NH, int C, int E, int H) {
    int grid = d->image_size / d->patch_size;
    ModelConfig c = {0};
    c.max_seq_len = grid * grid;
    c.vocab_size = patch_values(d);
    c.vocab_kind = VOCAB_UNKNOWN;
    c.padded_vocab_size = padded_vocab(c.vocab_size);
    c.num_layers = L;
    c.num_heads = NH;
    c.channels = C;
    c.num_experts = E;
    c.expert_hidden = H;
    return c;
}

static void validate_dit_config(const DitConfig *d, const ModelConfig *c, const char *where) {
    if (!in_range(d->image_size, 1, IDX_MAX_SIDE) || !in_range(d->patch_size, 1, d->image_size) ||
        d->image_size % d->patch_size != 0) {
        fail("%s: the image size (%d) must be a multiple of the patch size (%d)", where, d->image_size,
             d->patch_size);
    }
    if (!in_range(d->num_classes, 1, 1 << 16)) {
        fail("%s: bad number of classes %d", where, d->num_classes);
    }
    if (c->channels % 4 != 0) {  // the 2-D position embedding: sin and cos of two coordinates
        fail("%s: channels (%d) must be a multiple of 4", where, c->channels);
    }
    ModelConfig expected = dit_trunk_config(d, c->num_layers, c->num_heads, c->channels, c->num_experts,
                                            c->expert_hidden);
    if (c->max_seq_len != expected.max_seq_len || c->vocab_size != expected.vocab_size) {
        fail("%s: the trunk's sizes (T %d, V %d) do not match %d x %d patches of %d x %d images", where,
             c->max_seq_len, c->vocab_size, d->patch_size, d->patch_size, d->image_size, d->image_size);
    }
}

// ----------------------------------------------------------------------------
// parameters: one buffer, in the order of doc/formats.md; the trunk's ten tensors sit in the
// middle, in the language model's order, so that the trunk's layer functions find them as views

#define DIT_NUM_TENSORS 17
typedef struct {
    float *wpatch;  // (C, P²) patch embedding
    float *wt1;     // (C, C) time MLP, first layer (its input: C sin-cos features of t)
    float *wt2;     // (C, C) time MLP, second layer
    float *wy;      // (K + 1, C) class embedding; row K is the null class
    float *wada;    // (L, 6C, C) adaLN-Zero of each block: shift, scale, gate of attention, then of the MoE
    float *wfinal;  // (2C, C) adaLN of the final layer: shift, scale
    float *wout;    // (P², C) the final layer, back to the pixels of a patch
} DitTensors;

// Weight decay and normal initialisation: the matrices (the trunk's as in the language model).
static const int dit_is_matrix[DIT_NUM_TENSORS] = {1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1};
enum { DIT_WADA = 4, DIT_TRUNK = 5, DIT_WFINAL = 15, DIT_WOUT = 16 };

static void dit_fill_sizes(size_t *sizes, const DitConfig *d, const ModelConfig *c) {
    size_t C = c->channels, L = c->num_layers, PP = patch_values(d);
    size_t trunk[NUM_PARAMETER_TENSORS];
    fill_param_sizes(trunk, c, c->num_experts);  // one process: every expert
    sizes[0] = C * PP;
    sizes[1] = C * C;
    sizes[2] = C * C;
    sizes[3] = (size_t)(d->num_classes + 1) * C;
    sizes[4] = L * 6 * C * C;
    for (int i = 1; i < NUM_PARAMETER_TENSORS; i++) { sizes[DIT_TRUNK + i - 1] = trunk[i]; }  // not wte
    sizes[DIT_WFINAL] = 2 * C * C;
    sizes[DIT_WOUT] = PP * C;
}

static void dit_carve(DitTensors *t, ParameterTensors *trunk, float *memory, const size_t *sizes) {
    float **ptrs[DIT_NUM_TENSORS] = {&t->wpatch,  &t->wt1,    &t->wt2,    &t->wy,     &t->wada,   &trunk->g1,
                                     &trunk->wqkv, &trunk->wo, &trunk->g2, &trunk->wr, &trunk->theta,
                                     &trunk->w1,  &trunk->w3, &trunk->w2, &trunk->gf, &t->wfinal, &t->wout};
    trunk->wte = NULL;
    for (int i = 0; i < DIT_NUM_TENSORS; i++) {
        *ptrs[i] = memory;
        memory += sizes[i];
    }
}

// ----------------------------------------------------------------------------
// activations beyond the trunk's (the trunk keeps its own in trunk.ws->acts: the patch tokens in
// `encoded`, the norms, attention, routing, expert rows, residual stream, and the output
// velocity of every patch in `logits`); N = B * T patch tokens of B images

typedef struct {
    float *patches;   // (N, P²) the noisy images x_t, cut into patches
    float *target;    // (N, P²) the velocity to predict, in patches
    float *tfreq;     // (B, C) sin-cos features of t
    float *th;        // (B, C) Wt1 · tfreq
    float *ts;        // (B, C) silu(th)
    float *yemb;      // (B, C) the class embedding
    float *cond;      // (B, C) Wt2 · ts + yemb: the conditioning vector
    float *cond_act;  // (B, C) silu(cond): the input of every adaLN
    float *mod;       // (L, B, 6C) each block's shift, scale, gate of attention and of the MoE
    float *mod1;      // (L, N, C) the modulated input of attention
    float *attproj;   // (L, N, C) Wo · attention, before its gate
    float *mod2;      // (L, N, C) the modulated input m of the MoE layer
    float *moe;       // (L, N, C) MoE(m), before its gate
    float *modf;      // (B, 2C) the final layer's shift, scale
    float *lnf_mod;   // (N, C) the modulated final norm
} DitActivations;
#define DIT_NUM_ACTIVATIONS 15

typedef struct {
    float *dmod;        // (B, 6C) gradient of one block's adaLN output
    float *dmodf;       // (B, 2C)
    float *dcond;       // (B, C) gradient of silu(cond), then of cond
    float *dts;         // (B, C) gradient of ts, then of th
    float *dtfreq;      // (B, C) what the products compute for the fixed time features
    float *dbranch;     // (N, C) gradient of a gated branch's output
    float *dmodulated;  // (N, C) gradient of a modulated norm
    float *dpatches;    // (N, P²) what the products compute for the fixed input patches
} DitGradActivations;
#define DIT_NUM_GRAD_ACTIVATIONS 8

typedef struct {
    DitConfig config;
    Model trunk;  // the transformer: configuration, routing, controller state, activations
    size_t sizes[DIT_NUM_TENSORS];
    size_t num_parameters;
    float *params_memory, *grads_memory, *m_memory, *v_memory;
    DitTensors params, grads;  // the DiT's own tensors; the trunk's are trunk.params and trunk.grads
    int adam_step;
    float *pos_embed;  // (T, C) the fixed 2-D sin-cos position embedding
    int B;             // images of the last forward pass (0: none yet)
    const int *labels; // (B) their classes
    DitActivations acts;
    float *acts_memory;
    DitGradActivations dacts;
    float *dacts_memory;
    float loss, mse;   // of the last forward pass with a target (total, and its mean squared error)
} Dit;

// ----------------------------------------------------------------------------
// the new layers, each forward next to its backward (the convention of train_dtopp.c: backward
// functions accumulate into parameter gradients and into the input gradient they are given)

// images (B, S, S) -> patches (B, T, P²): patch (gy, gx) is token gy·(S/P) + gx, its pixels row by row
void images_to_patches(float *patches, const float *images, int B, int S, int P) {
    int grid = S / P, T = grid * grid;
    for (int b = 0; b < B; b++) {
        for (int n = 0; n < T; n++) {
            float *out = patches + ((size_t)b * T + n) * P * P;
            const float *in = images + (size_t)b * S * S + (size_t)(n / grid) * P * S + (n % grid) * P;
            for (int py = 0; py < P; py++) { memcpy(out + py * P, in + (size_t)py * S, P * sizeof(float)); }
        }
    }
}

void patches_to_images(float *images, const float *patches, int B, int S, int P) {
    int grid = S / P, T = grid * grid;
    for (int b = 0; b < B; b++) {
        for (int n = 0; n < T; n++) {
            const float *in = patches + ((size_t)b * T + n) * P * P;
            float *out = images + (size_t)b * S * S + (size_t)(n / grid) * P * S + (n % grid) * P;
            for (int py = 0; py < P; py++) { memcpy(out + (size_t)py * S, in + py * P, P * sizeof(float)); }
        }
    }
}

// The fixed 2-D position embedding of DiT, (T, C): for the patch in column gx and row gy, channels
// [0, C/4) hold sin(gx ω_i), [C/4, C/2) cos(gx ω_i), then the same of gy, ω_i = 10000^(−i/(C/4)).
void position_embedding_init(float *table, int grid, int C) {
    int quarter = C / 4;
    for (int n = 0; n < grid * grid; n++) {
        int coordinate[2] = {n % grid, n / grid};
        for (int axis = 0; axis < 2; axis++) {
            float *out = table + (size_t)n * C + axis * 2 * quarter;
            for (int i = 0; i < quarter; i++) {
                double angle = coordinate[axis] * pow(10000.0, -(double)i / quarter);
                out[i] = (float)sin(angle);
                out[quarter + i] = (float)cos(angle);
            }
        }
    }
}

// Sin-cos features of the time t in [0, 1] (B, C): cos(1000 t f_i) then sin(1000 t f_i) for
// f_i = 10000^(−i/(C/2)), i < C/2. The factor 1000 spreads [0, 1] over the range of time steps
// that DiT's frequencies were made for.
void time_features(float *out, const float *t, int B, int C) {
    int half = C / 2;
    for (int b = 0; b < B; b++) {
        for (int i = 0; i < half; i++) {
            double angle = 1000.0 * t[b] * exp(-log(10000.0) * i / half);
            out[(size_t)b * C + i] = (float)cos(angle);
            out[(size_t)b * C + half + i] = (float)sin(angle);
        }
    }
}

void silu_forward(float *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) { out[i] = silu(inp[i]); }
}

// In place: d holds the gradient of silu(inp) on entry and that of inp on exit.
void silu_backward(float *d, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float sig = 1.0f / (1.0f + exp_fast(-inp[i]));
        d[i] *= sig * (1.0f + inp[i] * (1.0f - sig));
    }
}

// adaLN: out = inp ⊙ (1 + scale) + shift, with the shift and scale of each token's image; shift and
// scale point into rows of `stride` floats, one row per image. inp, out: (B, T, C).
void modulate_forward(float *out, const float *inp, const float *shift, const float *scale, int B, int T,
                      int C, int stride) {
    #pragma omp parallel for if ((size_t)B * T * C >= PARALLEL_MIN_WORK)
    for (int n = 0; n < B * T; n++) {
        const float *sh = shift + (size_t)(n / T) * stride, *sc = scale + (size_t)(n / T) * stride;
        const float *x = inp + (size_t)n * C;
        float *o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) { o[i] = x[i] * (1.0f + sc[i]) + sh[i]; }
    }
}

// dinp += dout ⊙ (1 + scale); dshift += Σ_t dout, dscale += Σ_t dout ⊙ inp over each image's tokens,
// in token order (each thread owns whole images).
void modulate_backward(float *dinp, float *dshift, float *dscale, const float *dout, const float *inp,
                       const float *scale, int B, int T, int C, int stride) {
    #pragma omp parallel for if ((size_t)B * T * C >= PARALLEL_MIN_WORK)
    for (int b = 0; b < B; b++) {
        const float *sc = scale + (size_t)b * stride;
        float *dsh = dshift + (size_t)b * stride, *dsc = dscale + (size_t)b * stride;
        for (int t = 0; t < T; t++) {
            size_t n = (size_t)b * T + t;
            const float *d = dout + n * C, *x = inp + n * C;
            float *dx = dinp + n * C;
            for (int i = 0; i < C; i++) {
                dx[i] += d[i] * (1.0f + sc[i]);
                dsh[i] += d[i];
                dsc[i] += d[i] * x[i];
            }
        }
    }
}

// The gated residual of adaLN-Zero: out = res + gate ⊙ branch, the gate per image (rows of `stride`).
void gate_forward(float *out, const float *res, const float *branch, const float *gate, int B, int T, int C,
                  int stride) {
    #pragma omp parallel for if ((size_t)B * T * C >= PARALLEL_MIN_WORK)
    for (int n = 0; n < B * T; n++) {
        const float *g = gate + (size_t)(n / T) * stride;
        size_t row = (size_t)n * C;
        for (int i = 0; i < C; i++) { out[row + i] = res[row + i] + g[i] * branch[row + i]; }
    }
}

// Writes (not accumulates) dbranch = dout ⊙ gate; dgate += Σ_t dout ⊙ branch in token order. The
// residual's own gradient is dout itself, which the caller keeps.
void gate_backward(float *dbranch, float *dgate, const float *dout, const float *branch, const float *gate,
                   int B, int T, int C, int stride) {
    #pragma omp parallel for if ((size_t)B * T * C >= PARALLEL_MIN_WORK)
    for (int b = 0; b < B; b++) {
        const float *g = gate + (size_t)b * stride;
        float *dg = dgate + (size_t)b * stride;
        for (int t = 0; t < T; t++) {
            size_t n = (size_t)b * T + t;
            for (int i = 0; i < C; i++) {
                dbranch[n * C + i] = dout[n * C + i] * g[i];
                dg[i] += dout[n * C + i] * branch[n * C + i];
            }
        }
    }
}

// The squared error of every patch (N) summed over its `width` values; the loss is their mean.
void squared_error_forward(float *patch_error, const float *out, const float *target, int N, int width) {
    for (int n = 0; n < N; n++) {
        float sum = 0.0f;
        for (int i = 0; i < width; i++) {
            float d = out[(size_t)n * width + i] - target[(size_t)n * width + i];
            sum += d * d;
        }
        patch_error[n] = sum;
    }
}

// Writes (not accumulates) dout = scale · 2 (out − target), n values.
void squared_error_backward(float *dout, const float *out, const float *target, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) { dout[i] = scale * 2.0f * (out[i] - target[i]); }
}

// The rectified flow between data x0 and noise ε: x_t = (1 − t) x0 + t ε, whose velocity
// dx_t/dt = ε − x0 is what the model learns to predict. Images of D pixels, B of them.
void rectified_flow_pair(float *xt, float *velocity, const float *x0, const float *noise, const float *t,
                         int B, int D) {
    for (int b = 0; b < B; b++) {
        for (int i = 0; i < D; i++) {
            size_t k = (size_t)b * D + i;
            xt[k] = (1.0f - t[b]) * x0[k] + t[b] * noise[k];
            velocity[k] = noise[k] - x0[k];
        }
    }
}

// ----------------------------------------------------------------------------
// the model

// The configuration (validated here) and the tensor sizes; nothing large is allocated yet, so that
// a checkpoint's size can be checked first (dit_allocate follows).
static void dit_setup(Dit *d, const DitConfig *config, const ModelConfig *trunk_config,
                      const RouterConfig *router, const char *where) {
    memset(d, 0, sizeof(*d));
    d->config = *config;
    validate_dit_config(config, trunk_config, where);
    model_setup(&d->trunk, trunk_config, router, where);
    d->trunk.ws = (Workspace *)calloc_check(1, sizeof(Workspace));  // activations only: no RoPE here
    dit_fill_sizes(d->sizes, config, trunk_config);
    for (int i = 0; i < DIT_NUM_TENSORS; i++) { d->num_parameters += d->sizes[i]; }
    if (d->num_parameters > MAX_PARAMETERS) {  // each size is bounded: the sum cannot wrap around
        fail("%s: the model would have more than %llu parameters", where, MAX_PARAMETERS);
    }
    d->loss = d->mse = -1.0f;
}

// The parameter buffers (zero) with their views, and the position embedding.
static void dit_allocate(Dit *d) {
    const ModelConfig *c = &d->trunk.config;
    d->params_memory = (float *)calloc_check(d->num_parameters, sizeof(float));
    d->grads_memory = (float *)calloc_check(d->num_parameters, sizeof(float));
    d->m_memory = (float *)calloc_check(d->num_parameters, sizeof(float));
    d->v_memory = (float *)calloc_check(d->num_parameters, sizeof(float));
    dit_carve(&d->params, &d->trunk.params, d->params_memory, d->sizes);
    dit_carve(&d->grads, &d->trunk.grads, d->grads_memory, d->sizes);
    d->trunk.params.experts = d->trunk.grads.experts = d->trunk.experts;  // every expert: one process
    d->pos_embed = (float *)malloc_check((size_t)c->max_seq_len * c->channels * sizeof(float));
    position_embedding_init(d->pos_embed, d->config.image_size / d->config.patch_size, c->channels);
}

// Fresh parameters (doc/dit.md): matrices normal(0, 0.02), the trunk's output projections (Wo, W2)
// scaled by 1/sqrt(2L) as in the language model, gains 1, θ = theta_init; adaLN-Zero: the
// modulations and the final layer start at zero, so every block starts as the identity and the
// model predicts zero velocity.
void dit_init(Dit *d, const DitConfig *config, const ModelConfig *trunk_config, const RouterConfig *router,
              uint64_t seed) {
    dit_setup(d, config, trunk_config, router, "model configuration");
    dit_allocate(d);
    uint64_t rng = seed;
    float *out = d->params_memory, residual_std = 0.02f / sqrtf(2.0f * trunk_config->num_layers);
    for (int i = 0; i < DIT_NUM_TENSORS; i++) {
        int trunk_index = i - DIT_TRUNK + 1;  // the tensor's index in the language model's order
        int zero = i == DIT_WADA || i == DIT_WFINAL || i == DIT_WOUT;
        float std = (trunk_index == PARAM_WO || trunk_index == PARAM_W2) ? residual_std : 0.02f;
        for (size_t j = 0; j < d->sizes[i]; j++) {
            if (zero) { out[j] = 0.0f; }
            else if (dit_is_matrix[i]) { out[j] = std * random_normal(&rng); }
            else { out[j] = trunk_index == PARAM_THETA ? router->theta_init : 1.0f; }  // gains and θ
        }
        out += d->sizes[i];
    }
    controller_reset(&d->trunk);
}

void dit_free(Dit *d) {
    model_free(&d->trunk);  // the trunk owns no parameters: its tensors are views into ours
    free(d->params_memory);
    free(d->grads_memory);
    free(d->m_memory);
    free(d->v_memory);
    free(d->pos_embed);
    free(d->acts_memory);
    free(d->dacts_memory);
}

static void dit_ensure_activations(Dit *d, int B) {
    const ModelConfig *c = &d->trunk.config;
    int T = c->max_seq_len;
    model_ensure_activations(&d->trunk, B, T);
    if (d->acts_memory != NULL && d->B == B) { return; }
    free(d->acts_memory);
    free(d->dacts_memory);
    size_t N = (size_t)B * T, C = c->channels, L = c->num_layers, PP = patch_values(&d->config);
    DitActivations *x = &d->acts;
    float **ptrs[DIT_NUM_ACTIVATIONS] = {&x->patches, &x->target, &x->tfreq, &x->th,    &x->ts,
                                         &x->yemb,    &x->cond,   &x->cond_act, &x->mod, &x->mod1,
                                         &x->attproj, &x->mod2,   &x->moe,   &x->modf,  &x->lnf_mod};
    size_t sizes[DIT_NUM_ACTIVATIONS] = {N * PP, N * PP, B * C,     B * C,     B * C, B * C,     B * C, B * C,
                                         L * B * 6 * C,  L * N * C, L * N * C, L * N * C, L * N * C,
                                         B * 2 * C,      N * C};
    d->acts_memory = (float *)calloc_check(total_size(sizes, DIT_NUM_ACTIVATIONS), sizeof(float));
    carve_floats(ptrs, sizes, DIT_NUM_ACTIVATIONS, d->acts_memory);
    DitGradActivations *g = &d->dacts;
    float **gptrs[DIT_NUM_GRAD_ACTIVATIONS] = {&g->dmod, &g->dmodf,   &g->dcond,      &g->dts,
                                               &g->dtfreq, &g->dbranch, &g->dmodulated, &g->dpatches};
    size_t gsizes[DIT_NUM_GRAD_ACTIVATIONS] = {B * 6 * C, B * 2 * C, B * C, B * C,
                                               B * C,     N * C,     N * C, N * PP};
    d->dacts_memory = (float *)calloc_check(total_size(gsizes, DIT_NUM_GRAD_ACTIVATIONS), sizeof(float));
    carve_floats(gptrs, gsizes, DIT_NUM_GRAD_ACTIVATIONS, d->dacts_memory);
    d->B = B;
}

// The velocity the model predicts for the noisy images xt (B, S, S) at times t (B) of classes
// `labels` (B; K is the null class). With a target velocity (B, S, S) it computes the loss: the
// mean squared error plus the MoE's auxiliary terms (as in the language model).
void dit_forward(Dit *d, const float *xt, const float *t, const int *labels, const float *target, int B) {
    dit_ensure_activations(d, B);
    Model *trunk = &d->trunk;
    const ModelConfig *c = &trunk->config;
    int T = c->max_seq_len, N = B * T, C = c->channels, L = c->num_layers, NH = c->num_heads;
    int PP = patch_values(&d->config), S = d->config.image_size, P = d->config.patch_size;
    Activations *a = &trunk->ws->acts;
    ActivationTensors *tr = &a->acts;
    DitActivations *x = &d->acts;
    const DitTensors *p = &d->params;
    for (int b = 0; b < B; b++) {
        if (labels[b] < 0 || labels[b] > d->config.num_classes) { fail("class %d out of range", labels[b]); }
    }
    d->labels = labels;
    trunk->B = B;
    trunk->T = T;
    // tokens: patches, embedded, plus their position
    images_to_patches(x->patches, xt, B, S, P);
    matmul_forward(tr->encoded, x->patches, NULL, p->wpatch, N, PP, C, FLOAT32);
    for (int b = 0; b < B; b++) {  // the same T positions in every image
        float *tokens = tr->encoded + (size_t)b * T * C;
        residual_forward(tokens, tokens, d->pos_embed, (size_t)T * C);
    }
    // the conditioning vector: time MLP plus class embedding
    time_features(x->tfreq, t, B, C);
    matmul_forward(x->th, x->tfreq, NULL, p->wt1, B, C, C, FLOAT32);
    silu_forward(x->ts, x->th, (size_t)B * C);
    matmul_forward(x->cond, x->ts, NULL, p->wt2, B, C, C, FLOAT32);
    encoder_forward(x->yemb, labels, p->wy, B, C);
    residual_forward(x->cond, x->cond, x->yemb, (size_t)B * C);
    silu_forward(x->cond_act, x->cond, (size_t)B * C);
    a->row_offset[0] = 0;
    for (int l = 0; l < L; l++) {
        LayerWeights w = layer_weights(&trunk->params, c, l);
        size_t LN = (size_t)l * N * C;
        const float *in = l == 0 ? tr->encoded : tr->res2 + LN - (size_t)N * C;
        float *mod = x->mod + (size_t)l * B * 6 * C;  // shift1 scale1 gate1 shift2 scale2 gate2
        float *qkv = tr->qkv + (size_t)l * N * 3 * C, *lse = tr->att + l * attention_saved_floats(B, NH, T);
        matmul_forward(mod, x->cond_act, NULL, p->wada + (size_t)l * 6 * C * C, B, C, 6 * C, FLOAT32);
        rmsnorm_forward(tr->ln1 + LN, tr->ln1_rstd + (size_t)l * N, in, w.g1, N, C);
        modulate_forward(x->mod1 + LN, tr->ln1 + LN, mod, mod + C, B, T, C, 6 * C);
        matmul_forward(qkv, x->mod1 + LN, NULL, w.wqkv, N, C, 3 * C, FLOAT32);
        attention_forward(tr->atty + LN, lse, qkv, B, T, C, NH, 0, FLOAT32);
        matmul_forward(x->attproj + LN, tr->atty + LN, NULL, w.wo, N, C, C, FLOAT32);
        gate_forward(tr->res1 + LN, in, x->attproj + LN, mod + 2 * C, B, T, C, 6 * C);
        rmsnorm_forward(tr->ln2 + LN, tr->ln2_rstd + (size_t)l * N, tr->res1 + LN, w.g2, N, C);
        modulate_forward(x->mod2 + LN, tr->ln2 + LN, mod + 3 * C, mod + 4 * C, B, T, C, 6 * C);
        moe_forward(trunk, a, l, x->moe + LN, x->mod2 + LN);
        gate_forward(tr->res2 + LN, tr->res1 + LN, x->moe + LN, mod + 5 * C, B, T, C, 6 * C);
    }
    // the final layer: adaLN, then back to the pixels of each patch
    const float *last = tr->res2 + (size_t)(L - 1) * N * C;
    matmul_forward(x->modf, x->cond_act, NULL, p->wfinal, B, C, 2 * C, FLOAT32);
    rmsnorm_forward(tr->lnf, tr->lnf_rstd, last, trunk->params.gf, N, C);
    modulate_forward(x->lnf_mod, tr->lnf, x->modf, x->modf + C, B, T, C, 2 * C);
    matmul_forward(tr->logits, x->lnf_mod, NULL, p->wout, N, C, PP, FLOAT32);
    if (target == NULL) {
        d->loss = d->mse = -1.0f;
        return;
    }
    images_to_patches(x->target, target, B, S, P);
    squared_error_forward(tr->token_loss, tr->logits, x->target, N, PP);
    double sum = 0.0, lb = 0.0, ent = 0.0;
    for (int n = 0; n < N; n++) { sum += tr->token_loss[n]; }
    for (int l = 0; l < L; l++) {
        lb += tr->aux_lb[l];
        ent += tr->aux_ent[l];
    }
    double mse = sum / ((double)N * PP);
    d->mse = (float)mse;
    d->loss = (float)(mse + trunk->router.lb_coef * lb / L + trunk->router.ent_coef * ent / L);
    trunk->loss = d->loss;
    trunk->ce_loss = d->mse;
}

// The gradient of the parameters from that of the predicted velocity (the trunk's dlogits, (N, P²),
// written by the caller), accumulated into d->grads (and so into the trunk's views of it): the
// forward pass read backwards. dit_backward starts it from the loss; the classifier of
// dit/eval_dit.c from its class scores.
void dit_backward_output(Dit *d) {
    Model *trunk = &d->trunk;
    const ModelConfig *c = &trunk->config;
    int B = d->B, T = c->max_seq_len, N = B * T, C = c->channels, L = c->num_layers, NH = c->num_heads;
    int PP = patch_values(&d->config);
    Activations *a = &trunk->ws->acts;
    ActivationTensors *tr = &a->acts;
    GradActivations *g = &a->grads;
    DitActivations *x = &d->acts;
    DitGradActivations *dx = &d->dacts;
    const DitTensors *p = &d->params;
    DitTensors *dp = &d->grads;

    memset(dx->dmodulated, 0, (size_t)N * C * sizeof(float));
    matmul_backward(dx->dmodulated, dp->wout, g->dlogits, x->lnf_mod, NULL, p->wout, N, C, PP, 1, FLOAT32);
    memset(g->dln, 0, (size_t)N * C * sizeof(float));
    memset(dx->dmodf, 0, (size_t)B * 2 * C * sizeof(float));
    modulate_backward(g->dln, dx->dmodf, dx->dmodf + C, dx->dmodulated, tr->lnf, x->modf + C, B, T, C, 2 * C);
    memset(dx->dcond, 0, (size_t)B * C * sizeof(float));
    matmul_backward(dx->dcond, dp->wfinal, dx->dmodf, x->cond_act, NULL, p->wfinal, B, C, 2 * C, 1, FLOAT32);
    memset(g->dresidual, 0, (size_t)N * C * sizeof(float));
    rmsnorm_backward(g->dresidual, trunk->grads.gf, g->dln, tr->res2 + (size_t)(L - 1) * N * C,
                     trunk->params.gf, tr->lnf_rstd, N, C);
    for (int l = L - 1; l >= 0; l--) {
        LayerWeights w = layer_weights(&trunk->params, c, l), dw = layer_weights(&trunk->grads, c, l);
        size_t LN = (size_t)l * N * C;
        const float *in = l == 0 ? tr->encoded : tr->res2 + LN - (size_t)N * C;
        const float *mod = x->mod + (size_t)l * B * 6 * C;
        float *dmod = dx->dmod;
        memset(dmod, 0, (size_t)B * 6 * C * sizeof(float));
        // dresidual holds d res2: the MoE branch through its gate
        gate_backward(dx->dbranch, dmod + 5 * C, g->dresidual, x->moe + LN, mod + 5 * C, B, T, C, 6 * C);
        memset(dx->dmodulated, 0, (size_t)N * C * sizeof(float));
        moe_backward(trunk, a, l, dx->dmodulated, dx->dbranch, x->mod2 + LN);
        memset(g->dln, 0, (size_t)N * C * sizeof(float));
        modulate_backward(g->dln, dmod + 3 * C, dmod + 4 * C, dx->dmodulated, tr->ln2 + LN, mod + 4 * C, B, T,
                          C, 6 * C);
        rmsnorm_backward(g->dresidual, dw.g2, g->dln, tr->res1 + LN, w.g2, tr->ln2_rstd + (size_t)l * N, N,
                         C);
        // dresidual holds d res1: the attention branch through its gate
        gate_backward(dx->dbranch, dmod + 2 * C, g->dresidual, x->attproj + LN, mod + 2 * C, B, T, C, 6 * C);
        memset(g->datty, 0, (size_t)N * C * sizeof(float));
        matmul_backward(g->datty, dw.wo, dx->dbranch, tr->atty + LN, NULL, w.wo, N, C, C, 1, FLOAT32);
        memset(g->dqkv, 0, (size_t)N * 3 * C * sizeof(float));
        attention_backward(g->dqkv, g->datty, tr->qkv + (size_t)l * N * 3 * C, tr->atty + LN,
                           tr->att + l * attention_saved_floats(B, NH, T), B, T, C, NH, 0, FLOAT32);
        memset(dx->dmodulated, 0, (size_t)N * C * sizeof(float));
        matmul_backward(dx->dmodulated, dw.wqkv, g->dqkv, x->mod1 + LN, NULL, w.wqkv, N, C, 3 * C, 1, FLOAT32);
        memset(g->dln, 0, (size_t)N * C * sizeof(float));
        modulate_backward(g->dln, dmod, dmod + C, dx->dmodulated, tr->ln1 + LN, mod + C, B, T, C, 6 * C);
        rmsnorm_backward(g->dresidual, dw.g1, g->dln, in, w.g1, tr->ln1_rstd + (size_t)l * N, N, C);
        // dresidual holds d of the block's input; the block's adaLN gets its share of d silu(cond)
        matmul_backward(dx->dcond, dp->wada + (size_t)l * 6 * C * C, dmod, x->cond_act, NULL,
                        p->wada + (size_t)l * 6 * C * C, B, C, 6 * C, 1, FLOAT32);
    }
    memset(dx->dpatches, 0, (size_t)N * PP * sizeof(float));
    matmul_backward(dx->dpatches, dp->wpatch, g->dresidual, x->patches, NULL, p->wpatch, N, PP, C, 1, FLOAT32);
    silu_backward(dx->dcond, x->cond, (size_t)B * C);
    encoder_backward(dp->wy, dx->dcond, d->labels, B, C);
    memset(dx->dts, 0, (size_t)B * C * sizeof(float));
    matmul_backward(dx->dts, dp->wt2, dx->dcond, x->ts, NULL, p->wt2, B, C, C, 1, FLOAT32);
    silu_backward(dx->dts, x->th, (size_t)B * C);
    memset(dx->dtfreq, 0, (size_t)B * C * sizeof(float));
    matmul_backward(dx->dtfreq, dp->wt1, dx->dts, x->tfreq, NULL, p->wt1, B, C, C, 1, FLOAT32);
}

// Gradient of the total loss of the last forward pass (the mean squared error and the MoE's
// auxiliary terms), accumulated into d->grads.
void dit_backward(Dit *d) {
    if (d->loss < 0.0f) { fail("dit_backward needs a forward pass with a target"); }
    Activations *a = &d->trunk.ws->acts;
    size_t values = (size_t)d->B * d->trunk.config.max_seq_len * patch_values(&d->config);
    squared_error_backward(a->grads.dlogits, a->acts.logits, d->acts.target, values, 1.0f / (float)values);
    dit_backward_output(d);
}

void dit_zero_grad(Dit *d) { memset(d->grads_memory, 0, d->num_parameters * sizeof(float)); }

// Clips the gradient to global norm 1 and takes one AdamW step; returns the norm before clipping.
float dit_update(Dit *d, float lr, float weight_decay) {
    d->adam_step++;
    return adamw_clipped_step(d->params_memory, d->grads_memory, d->m_memory, d->v_memory, d->sizes,
                              dit_is_matrix, DIT_NUM_TENSORS, d->adam_step, lr, weight_decay);
}

// The predicted velocity of the last forward pass, as images (B, S, S).
void dit_get_velocity(const Dit *d, float *out) {
    patches_to_images(out, d->trunk.ws->acts.acts.logits, d->B, d->config.image_size, d->config.patch_size);
}

// ----------------------------------------------------------------------------
// checkpoints (doc/formats.md): the trunk's header words of a model checkpoint, the DiT's own
// words, then the parameters and the controller state

#define DIT_VERSION 1
#define DIT_HEADER_FIELDS (MODEL_HEADER_FIELDS + 3)

static void dit_header_fields(HeaderField *fields, DitConfig *d, ModelConfig *c, RouterConfig *rc) {
    model_header_fields(fields, c, rc);
    fields[MODEL_HEADER_FIELDS] = (HeaderField){64, 4, &d->image_size};
    fields[MODEL_HEADER_FIELDS + 1] = (HeaderField){65, 4, &d->patch_size};
    fields[MODEL_HEADER_FIELDS + 2] = (HeaderField){66, 4, &d->num_classes};
}

void dit_save(const Dit *d, const char *path) {
    DitConfig config = d->config;
    ModelConfig trunk = d->trunk.config;
    RouterConfig router = d->trunk.router;
    HeaderField fields[DIT_HEADER_FIELDS];
    dit_header_fields(fields, &config, &trunk, &router);
    int32_t header[HEADER_WORDS] = {DIT_MAGIC, DIT_VERSION};
    header_pack(header, fields, DIT_HEADER_FIELDS);
    char tmp[4096];
    FILE *f = open_for_atomic_write(path, tmp, sizeof(tmp));
    fwrite_check(header, sizeof(int32_t), HEADER_WORDS, f, tmp);
    fwrite_check(d->params_memory, sizeof(float), d->num_parameters, f, tmp);
    fwrite_check(d->trunk.threshold, sizeof(float), trunk.num_layers, f, tmp);
    fwrite_check(d->trunk.integral, sizeof(float), trunk.num_layers, f, tmp);
    finish_atomic_write(f, tmp, path);
}

void dit_load(Dit *d, const char *path) {
    int32_t header[HEADER_WORDS];
    long size;
    static const int versions[] = {DIT_VERSION};
    FILE *f =
        open_with_header(path, header, DIT_MAGIC, versions, 1, "diffusion transformer checkpoint", &size);
    DitConfig config;
    ModelConfig trunk;
    memset(&trunk, 0, sizeof(trunk));  // its padding too, which no header word fills: tests compare it bytewise
    RouterConfig router;
    HeaderField fields[DIT_HEADER_FIELDS];
    dit_header_fields(fields, &config, &trunk, &router);
    header_unpack(header, fields, DIT_HEADER_FIELDS);
    dit_setup(d, &config, &trunk, &router, path);
    int L = trunk.num_layers;
    check_payload_size(path, size, (d->num_parameters + 2 * (size_t)L) * sizeof(float));
    dit_allocate(d);
    fread_check(d->params_memory, sizeof(float), d->num_parameters, f, path);
    fread_check(d->trunk.threshold, sizeof(float), L, f, path);
    fread_check(d->trunk.integral, sizeof(float), L, f, path);
    fclose(f);
    check_finite(d->params_memory, d->num_parameters, path, "parameter");
    validate_controller_state(&d->trunk, path);
}

// ----------------------------------------------------------------------------
// sampling: Euler steps along the learned flow, from noise at t = 1 to an image at t = 0

// Images (B, S, S) in [-1, 1] of the given classes, from the noise in x (overwritten), in `steps`
// Euler steps of the ODE dx/dt = v from t = 1 to 0. With guidance w the velocity of a step is the
// unconditional one (the null class) plus w times the difference the class makes,
// v_null + w (v_class − v_null), from one forward pass over the doubled batch; w = 1 is the
// conditional velocity alone, from a single pass.
void dit_sample(Dit *d, float *x, const int *labels, int B, int steps, float guidance) {
    size_t D = (size_t)d->config.image_size * d->config.image_size, BD = (size_t)B * D;
    int passes = guidance == 1.0f ? 1 : 2;
    float *batch = (float *)malloc_check(passes * BD * sizeof(float));
    float *v = (float *)malloc_check(passes * BD * sizeof(float));
    float *times = (float *)malloc_check((size_t)passes * B * sizeof(float));
    int *classes = (int *)malloc_check((size_t)passes * B * sizeof(int));
    for (int b = 0; b < passes * B; b++) { classes[b] = b < B ? labels[b] : d->config.num_classes; }
    for (int i = 0; i < steps; i++) {
        float t = 1.0f - (float)i / steps, t_next = 1.0f - (float)(i + 1) / steps;
        for (int k = 0; k < passes; k++) { memcpy(batch + k * BD, x, BD * sizeof(float)); }
        for (int b = 0; b < passes * B; b++) { times[b] = t; }
        dit_forward(d, batch, times, classes, NULL, passes * B);
        dit_get_velocity(d, v);
        for (size_t k = 0; k < BD; k++) {
            float guided = passes == 1 ? v[k] : v[BD + k] + guidance * (v[k] - v[BD + k]);
            x[k] += (t_next - t) * guided;
        }
    }
    free(batch);
    free(v);
    free(times);
    free(classes);
}

// ----------------------------------------------------------------------------
// the data: Fashion-MNIST's images, shuffled into batches of the rectified flow

// Fashion-MNIST: ten classes of clothing, 28 x 28 images.
#define NUM_CLASSES 10

static void join_path(char *out, size_t size, const char *dir, const char *name) {
    if ((size_t)snprintf(out, size, "%s/%s", dir, name) >= size) { fail("path too long: %s/%s", dir, name); }
}

const char *const fashion_classes[NUM_CLASSES] = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"};

// Pixels 0..255 to [-1, 1].
void to_unit_range(float *out, const uint8_t *pixels, size_t n) {
    for (size_t i = 0; i < n; i++) { out[i] = pixels[i] / 127.5f - 1.0f; }
}

// The training data and one batch of the rectified flow.
typedef struct {
    IdxData images, labels, val_images, val_labels;
    int *order;   // the shuffled image order of the current epoch
    int cursor;   // the next position in it
    uint64_t rng;
    float *x0, *noise, *xt, *velocity, *t;  // (B, D) images, (B) times
    int *classes;                           // (B)
} Batches;

void batches_open(Batches *s, const char *dir, int image_size, int batch, uint64_t seed) {
    char paths[4][4096];
    const char *names[4] = {"train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                            "t10k-labels-idx1-ubyte"};
    for (int i = 0; i < 4; i++) { join_path(paths[i], sizeof(paths[i]), dir, names[i]); }
    idx_read_dataset(&s->images, &s->labels, paths[0], paths[1], NUM_CLASSES);
    idx_read_dataset(&s->val_images, &s->val_labels, paths[2], paths[3], NUM_CLASSES);
    for (int i = 0; i < 3; i += 2) {
        const IdxData *set = i == 0 ? &s->images : &s->val_images;
        if (set->rows != image_size || set->cols != image_size) {
            fail("%s: the images are %d x %d, the model's %d x %d", paths[i], set->rows, set->cols,
                 image_size, image_size);
        }
    }
    size_t D = (size_t)image_size * image_size;
    s->order = (int *)malloc_check(s->images.count * sizeof(int));
    for (int i = 0; i < s->images.count; i++) { s->order[i] = i; }
    s->cursor = s->images.count;  // past the end: the first batch shuffles
    s->rng = seed;
    s->x0 = (float *)malloc_check(batch * D * sizeof(float));
    s->noise = (float *)malloc_check(batch * D * sizeof(float));
    s->xt = (float *)malloc_check(batch * D * sizeof(float));
    s->velocity = (float *)malloc_check(batch * D * sizeof(float));
    s->t = (float *)malloc_check(batch * sizeof(float));
    s->classes = (int *)malloc_check(batch * sizeof(int));
}

// Every label of the data in dir must be a class of the model that will read it (model: its
// checkpoint, for messages), so that no label indexes past what the model, or a table sized by its
// classes, holds: checked right after batches_open.
void batches_check_labels(const Batches *s, const char *dir, int num_classes, const char *model) {
    for (int i = 0; i < 2; i++) {
        const IdxData *labels = i == 0 ? &s->labels : &s->val_labels;
        for (int k = 0; k < labels->count; k++) {
            if (labels->data[k] >= num_classes) {
                fail("%s/%s: label %d of image %d is not a class of %s, which has %d (0..%d)", dir,
                     i == 0 ? "train-labels-idx1-ubyte" : "t10k-labels-idx1-ubyte", labels->data[k], k, model,
                     num_classes, num_classes - 1);
            }
        }
    }
}

void batches_close(Batches *s) {
    IdxData *sets[] = {&s->images, &s->labels, &s->val_images, &s->val_labels};
    for (int i = 0; i < 4; i++) { free(sets[i]->data); }
    free(s->order);
    free(s->x0);
    free(s->noise);
    free(s->xt);
    free(s->velocity);
    free(s->t);
    free(s->classes);
}

// The next B training images in shuffled order (a new shuffle every epoch), their labels (each
// replaced by the null class with probability label_dropout), times uniform in [0, 1), noise.
void next_batch(Batches *s, int B, float label_dropout) {
    int D = s->images.rows * s->images.cols, count = s->images.count;
    for (int b = 0; b < B; b++) {
        if (s->cursor == count) {  // Fisher-Yates
            for (int i = count - 1; i > 0; i--) {
                int j = (int)(random_u64(&s->rng) % (uint64_t)(i + 1)), tmp = s->order[i];
                s->order[i] = s->order[j];
                s->order[j] = tmp;
            }
            s->cursor = 0;
        }
        int image = s->order[s->cursor++];
        to_unit_range(s->x0 + (size_t)b * D, s->images.data + (size_t)image * D, D);
        s->classes[b] = random_f32(&s->rng) < label_dropout ? NUM_CLASSES : s->labels.data[image];
        s->t[b] = random_f32(&s->rng);
    }
    for (size_t i = 0; i < (size_t)B * D; i++) { s->noise[i] = random_normal(&s->rng); }
    rectified_flow_pair(s->xt, s->velocity, s->x0, s->noise, s->t, B, D);
}

// ----------------------------------------------------------------------------
// the training state (doc/formats.md): what a run needs besides the model file to continue bit for
// bit: AdamW's moments and step, the batches' position (this epoch's order, the cursor in it, the
// random state), the step, and the settings that shape the rest of the run. A checkpoint is the
// pair model_STEP.bin + state_STEP.bin, as for the language model (dtopp/runfiles.h).

#define DIT_STATE_VERSION 1

typedef struct {
    int step, adam_step;
    uint64_t rng;            // the batches' random state
    int cursor, images;      // the position in this epoch's order; the training images (the data check)
    int32_t param_check;     // the model's parameter count, low 31 bits: the pair must match
    int steps, warmup, batch;
    float lr, weight_decay, label_dropout;
    long long seed;
} DitState;

#define DIT_STATE_FIELDS 13
static void dit_state_fields(HeaderField *fields, DitState *s) {
    HeaderField list[DIT_STATE_FIELDS] = {{2, 4, &s->step}, {3, 4, &s->adam_step}, {4, 8, &s->rng},
                                          {6, 4, &s->cursor}, {7, 4, &s->images}, {8, 4, &s->param_check},
                                          {9, 4, &s->steps}, {10, 4, &s->warmup}, {11, 4, &s->batch},
                                          {12, 4, &s->lr}, {13, 4, &s->weight_decay},
                                          {14, 4, &s->label_dropout}, {16, 8, &s->seed}};
    memcpy(fields, list, sizeof(list));
}

// s holds the step and the run's settings; the rest comes from the model and the batches.
void dit_state_save(const Dit *d, const Batches *b, DitState s, const char *path) {
    s.adam_step = d->adam_step;
    s.rng = b->rng;
    s.cursor = b->cursor;
    s.images = b->images.count;
    s.param_check = (int32_t)(d->num_parameters & 0x7fffffff);
    HeaderField fields[DIT_STATE_FIELDS];
    dit_state_fields(fields, &s);
    int32_t header[HEADER_WORDS] = {DIT_STATE_MAGIC, DIT_STATE_VERSION};
    header_pack(header, fields, DIT_STATE_FIELDS);
    char tmp[4096];
    FILE *f = open_for_atomic_write(path, tmp, sizeof(tmp));
    fwrite_check(header, sizeof(int32_t), HEADER_WORDS, f, tmp);
    fwrite_check(d->m_memory, sizeof(float), d->num_parameters, f, tmp);
    fwrite_check(d->v_memory, sizeof(float), d->num_parameters, f, tmp);
    fwrite_check(b->order, sizeof(int), (size_t)b->images.count, f, tmp);
    finish_atomic_write(f, tmp, path);
}

// Restores the moments and AdamW's step into the model and the position into the batches (opened on
// the same data); returns the step and the settings, which the caller compares with its own.
DitState dit_state_load(Dit *d, Batches *b, const char *path) {
    int32_t header[HEADER_WORDS];
    long size;
    static const int versions[] = {DIT_STATE_VERSION};
    FILE *f = open_with_header(path, header, DIT_STATE_MAGIC, versions, 1, "DiT training state", &size);
    DitState s;
    memset(&s, 0, sizeof(s));
    HeaderField fields[DIT_STATE_FIELDS];
    dit_state_fields(fields, &s);
    header_unpack(header, fields, DIT_STATE_FIELDS);
    if (s.param_check != (int32_t)(d->num_parameters & 0x7fffffff)) {
        fail("%s belongs to a model of a different size", path);
    }
    if (s.step < 1 || s.adam_step < 1 || s.adam_step > s.step) {  // one AdamW step per optimizer step
        fail("%s: invalid step %d or AdamW step %d", path, s.step, s.adam_step);
    }
    if (s.images != b->images.count || s.cursor < 0 || s.cursor > s.images) {
        fail("%s: a position (%d of %d images) in other data than these %d training images", path, s.cursor,
             s.images, b->images.count);
    }
    check_payload_size(path, size, 2 * d->num_parameters * sizeof(float) + (size_t)s.images * sizeof(int));
    float *m = (float *)malloc_check(d->num_parameters * sizeof(float));
    float *v = (float *)malloc_check(d->num_parameters * sizeof(float));
    fread_check(m, sizeof(float), d->num_parameters, f, path);
    fread_check(v, sizeof(float), d->num_parameters, f, path);
    fread_check(b->order, sizeof(int), (size_t)s.images, f, path);
    fclose(f);
    check_moments(m, v, d->num_parameters, path);
    memcpy(d->m_memory, m, d->num_parameters * sizeof(float));
    memcpy(d->v_memory, v, d->num_parameters * sizeof(float));
    free(m);
    free(v);
    char *seen = (char *)calloc_check((size_t)s.images, 1);  // the order: each image exactly once
    for (int i = 0; i < s.images; i++) {
        int image = b->order[i];
        if (image < 0 || image >= s.images || seen[image]) {
            free(seen);
            fail("%s: the image order is not a permutation of the %d images (entry %d is %d)", path, s.images,
                 i, image);
        }
        seen[image] = 1;
    }
    free(seen);
    d->adam_step = s.adam_step;
    b->rng = s.rng;
    b->cursor = s.cursor;
    return s;
}

#ifndef DIT_NO_MAIN
// ----------------------------------------------------------------------------
// the training program
#include <sys/stat.h>           // mkdir
#include <unistd.h>             // access
#include "../dtopp/options.h"   // defines: OptionSpec, parse_option_table, print_option_table, parse_name
#include "png.h"                // defines: png_write_gray

typedef struct {
    const char *data, *out, *init, *resume, *routing, *controller;
    int steps, stop_at, batch, warmup, layers, channels, heads, experts, expert_hidden, k, drn, threads;
    int eval_every, eval_images, print_every, checkpoint_every, sample_steps, samples_per_class;
    float lr, weight_decay, tgt, p, kp, ki, p0, lb_coef, ent_coef, label_dropout, guidance;
    long long seed;
} DitOptions;

static int dit_option_specs(DitOptions *o, OptionSpec *specs) {
    OptionSpec list[] = {
        {"data", 's', &o->data, 0, 0, "folder with the Fashion-MNIST IDX files (get_fashion_mnist.sh)", 0},
        {"out", 's', &o->out, 0, 0, "output folder: log.csv, model.bin, samples.png", 0},
        {"init", 's', &o->init, 0, 0, "start from this checkpoint (with --steps 0: only sample from it)", 0},
        {"steps", 'i', &o->steps, NOT_NEGATIVE_INT, "optimizer steps (0: only sample)", 0},
        {"resume", 's', &o->resume, 0, 0,
         "continue the run in this folder from its newest checkpoint, bit for bit (it is also --out)", 0},
        {"stop-at", 'i', &o->stop_at, NOT_NEGATIVE_INT,
         "stop after this step with a checkpoint, to be continued with --resume (0: never)", 0},
        {"batch", 'i', &o->batch, 1, MAX_SIZE, "images per step", 0},
        {"lr", 'f', &o->lr, NOT_NEGATIVE_FLOAT, "peak learning rate (warm-up, cosine decay to a tenth)", 0},
        {"warmup", 'i', &o->warmup, 1, INT_MAX, "learning-rate warm-up steps", 0},
        {"weight-decay", 'f', &o->weight_decay, NOT_NEGATIVE_FLOAT, "AdamW weight decay of the matrices", 0},
        {"layers", 'i', &o->layers, 1, MAX_SIZE, "L, transformer blocks", 1},
        {"channels", 'i', &o->channels, 4, MAX_SIZE, "C, model width (a multiple of 4 and of the heads)", 1},
        {"heads", 'i', &o->heads, 1, MAX_SIZE, "NH, attention heads", 1},
        {"experts", 'i', &o->experts, 1, MAX_EXPERTS, "E, experts per MoE layer", 1},
        {"expert-hidden", 'i', &o->expert_hidden, 1, MAX_SIZE, "H, hidden width of one expert", 1},
        {"routing", 's', &o->routing, 0, 0, "topk, topp or dtopp", 1},
        {"controller", 's', &o->controller, 0, 0, "dtopp: global (one p) or layer (one p per layer)", 1},
        {"tgt", 'f', &o->tgt, 1, MAX_EXPERTS, "dtopp: target average number of activated experts", 1},
        {"k", 'i', &o->k, 1, MAX_EXPERTS, "topk: experts per token", 1},
        {"p", 'f', &o->p, 0, 1, "topp: the fixed threshold", 1},
        {"drn", 'i', &o->drn, 0, 1, "Dynamic Routing Normalization 1/0 (default: 1 for dtopp, else 0)", 1},
        {"kp", 'f', &o->kp, ANY_FLOAT, "dtopp: proportional gain", 1},
        {"ki", 'f', &o->ki, ANY_FLOAT, "dtopp: integral gain", 1},
        {"p0", 'f', &o->p0, 0, 1, "dtopp: starting and central threshold", 1},
        {"lb-coef", 'f', &o->lb_coef, NOT_NEGATIVE_FLOAT, "load-balance loss coefficient", 1},
        {"ent-coef", 'f', &o->ent_coef, NOT_NEGATIVE_FLOAT,
         "router entropy loss coefficient (default: 1e-3 top-p modes, 0 topk)", 1},
        {"label-dropout", 'f', &o->label_dropout, 0, 0.99,
         "share of training labels replaced by the null class", 0},
        {"eval-every", 'i', &o->eval_every, NOT_NEGATIVE_INT,
         "steps between validations (0: only at the end)", 0},
        {"eval-images", 'i', &o->eval_images, 1, INT_MAX, "test images of the validation loss", 0},
        {"print-every", 'i', &o->print_every, 1, INT_MAX, "steps between progress lines", 0},
        {"checkpoint-every", 'i', &o->checkpoint_every, NOT_NEGATIVE_INT,
         "steps between checkpoints: model_STEP.bin, state_STEP.bin, model.bin (0: only at the end)", 0},
        {"sample-steps", 'i', &o->sample_steps, 1, 100000, "Euler steps of the sampler", 0},
        {"guidance", 'f', &o->guidance, ANY_FLOAT, "classifier-free guidance scale (1: none)", 0},
        {"samples-per-class", 'i', &o->samples_per_class, 1, 1000,
         "columns of the sample grid (a row per class)", 0},
        {"seed", 'l', &o->seed, 0, 0, "seed of the initialisation, the batches and the samples", 0},
        {"threads", 'i', &o->threads, 0, 1024, "OpenMP threads (0: all)", 0},
    };
    int n = (int)(sizeof(list) / sizeof(list[0]));
    if (specs != NULL) { memcpy(specs, list, sizeof(list)); }
    return n;
}

static void dit_default_options(DitOptions *o) {
    *o = (DitOptions){.data = "data/fashion-mnist", .out = "out_dit", .init = NULL, .routing = "dtopp",
                      .controller = "global", .steps = 10000, .batch = 64, .warmup = 100, .layers = 4,
                      .channels = 128, .heads = 4, .experts = 8, .expert_hidden = 128, .k = 2, .drn = -1,
                      .threads = 0, .eval_every = 1000, .eval_images = 1000, .print_every = 50,
                      .checkpoint_every = 1000, .sample_steps = 50, .samples_per_class = 10, .lr = 1e-3f,
                      .weight_decay = 0.0f, .tgt = 2.0f, .p = 0.5f, .kp = 0.1f, .ki = 0.3f, .p0 = 0.8f,
                      .lb_coef = 1e-4f, .ent_coef = -1.0f, .label_dropout = 0.1f, .guidance = 3.0f,
                      .seed = 1337};
}

static void dit_usage(void) {
    DitOptions defaults;
    dit_default_options(&defaults);
    OptionSpec specs[64];
    int n = dit_option_specs(&defaults, specs);
    printf("usage: train_dit [--option value ...]\n\n"
           "Trains a class-conditional DTop-p diffusion transformer on Fashion-MNIST and writes a grid of\n"
           "samples, or, with --init and --steps 0, samples from a trained one (doc/dit.md).\n\n");
    print_option_table(specs, n);
}

static void dit_parse_options(DitOptions *o, int argc, char **argv) {
    dit_default_options(o);
    OptionSpec specs[64];
    int n = dit_option_specs(o, specs);
    const char *default_out = o->out;
    int model_options = parse_option_table(specs, n, argc, argv, dit_usage);
    if (o->init != NULL && model_options > 0) {
        fail("--init %s: the architecture and routing come from the checkpoint; drop the options that "
             "describe the model", o->init);
    }
    if (o->resume != NULL && model_options > 0) {  // the run's own command line, resumed: as train_dtopp
        fprintf(stderr, "note: the architecture and routing come from the checkpoint; %d model or routing "
                "option(s) ignored\n", model_options);
    }
    if (o->init != NULL && o->resume != NULL) { fail("--init and --resume exclude each other"); }
    if (o->resume != NULL) {  // the run goes on where it is
        if (o->out != default_out && strcmp(o->out, o->resume) != 0) {
            fail("--resume %s continues the run in its folder: --out %s is another", o->resume, o->out);
        }
        o->out = o->resume;
    }
}

static void dit_configure(const DitOptions *o, DitConfig *d, ModelConfig *c, RouterConfig *rc) {
    *d = (DitConfig){28, 4, NUM_CLASSES};
    *c = dit_trunk_config(d, o->layers, o->heads, o->channels, o->experts, o->expert_hidden);
    static const char *controllers[] = {"global", "layer"};
    *rc = (RouterConfig){0};
    rc->routing = parse_name(o->routing, routing_names, 3, "routing");
    rc->controller = parse_name(o->controller, controllers, 2, "controller");
    rc->drn = o->drn >= 0 ? o->drn : rc->routing == ROUTING_DTOPP;
    rc->renorm = 1;
    rc->k = o->k;
    rc->p = o->p;
    rc->tgt = o->tgt;
    rc->Kp = o->kp;
    rc->Ki = o->ki;
    rc->p0 = o->p0;
    rc->pmin = 0.01f;
    rc->pmax = 1.0f;
    rc->theta_init = 1.0f;
    rc->lb_coef = o->lb_coef;
    rc->ent_coef = o->ent_coef >= 0.0f ? o->ent_coef : rc->routing == ROUTING_TOPK ? 0.0f : 1e-3f;
}

// The validation loss: the mean squared error of the velocity on the first `count` test images at
// fixed times (VAL_TIMES) with fixed noise, so that runs and steps compare; guidance plays no part.
#define VAL_LEVELS 3
static const float val_times[VAL_LEVELS] = {0.25f, 0.5f, 0.75f};

static void validation_loss(Dit *d, const IdxData *images, const IdxData *labels, int count, int batch,
                            double *loss) {
    int D = images->rows * images->cols;
    float *x0 = (float *)malloc_check((size_t)batch * D * sizeof(float));
    float *noise = (float *)malloc_check((size_t)batch * D * sizeof(float));
    float *xt = (float *)malloc_check((size_t)batch * D * sizeof(float));
    float *velocity = (float *)malloc_check((size_t)batch * D * sizeof(float));
    float *t = (float *)malloc_check(batch * sizeof(float));
    int *classes = (int *)malloc_check(batch * sizeof(int));
    for (int level = 0; level < VAL_LEVELS; level++) {
        uint64_t rng = 20251217;  // the same noise at every evaluation
        double sum = 0.0;
        for (int first = 0; first < count; first += batch) {
            int B = count - first < batch ? count - first : batch;
            to_unit_range(x0, images->data + (size_t)first * D, (size_t)B * D);
            for (int b = 0; b < B; b++) {
                t[b] = val_times[level];
                classes[b] = labels->data[first + b];
            }
            for (size_t i = 0; i < (size_t)B * D; i++) { noise[i] = random_normal(&rng); }
            rectified_flow_pair(xt, velocity, x0, noise, t, B, D);
            dit_forward(d, xt, t, classes, velocity, B);
            sum += (double)d->mse * B;
        }
        loss[level] = sum / count;
    }
    free(x0);
    free(noise);
    free(xt);
    free(velocity);
    free(t);
    free(classes);
}

// One row per class, `per_class` samples each, 2 pixels apart, written as a PNG.
static void write_sample_grid(Dit *d, const char *path, int per_class, int steps, float guidance,
                              uint64_t seed) {
    int K = d->config.num_classes, S = d->config.image_size, B = K * per_class, D = S * S, pad = 2;
    float *x = (float *)malloc_check((size_t)B * D * sizeof(float));
    int *labels = (int *)malloc_check(B * sizeof(int));
    uint64_t rng = seed;
    for (size_t i = 0; i < (size_t)B * D; i++) { x[i] = random_normal(&rng); }
    for (int b = 0; b < B; b++) { labels[b] = b / per_class; }
    dit_sample(d, x, labels, B, steps, guidance);
    int width = per_class * (S + pad) + pad, height = K * (S + pad) + pad;
    uint8_t *grid = (uint8_t *)calloc_check((size_t)width * height, 1);
    for (int b = 0; b < B; b++) {
        int top = pad + (b / per_class) * (S + pad), left = pad + (b % per_class) * (S + pad);
        for (int i = 0; i < D; i++) {
            float v = (x[(size_t)b * D + i] + 1.0f) * 127.5f;
            v = v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v + 0.5f;
            grid[(size_t)(top + i / S) * width + left + i % S] = (uint8_t)v;
        }
    }
    png_write_gray(path, grid, width, height);
    free(grid);
    free(x);
    free(labels);
}

static double evaluate(Dit *d, Batches *s, int count, int batch, int step) {
    double val[VAL_LEVELS], mean = 0.0;
    validation_loss(d, &s->val_images, &s->val_labels, count, batch, val);
    for (int k = 0; k < VAL_LEVELS; k++) { mean += val[k] / VAL_LEVELS; }
    printf("step %5d | validation loss %.4f (t = 0.25: %.4f, 0.5: %.4f, 0.75: %.4f)\n", step, mean, val[0],
           val[1], val[2]);
    fflush(stdout);
    return mean;
}

// A training run: the model, its batches, where it starts, its log and its newest checkpoint.
typedef struct {
    const DitOptions *o;
    Dit *d;
    Batches s;
    int start_step;       // 0, or the step of the checkpoint it resumes from
    int last_checkpoint;  // the step of the newest checkpoint in o->out (-1: none yet)
    FILE *log;
    char log_path[4096];
} DitRun;

// The settings of a run that a resumed one must share (the data's size is checked by the state).
static DitState dit_run_settings(const DitOptions *o, int step) {
    return (DitState){.step = step, .steps = o->steps, .warmup = o->warmup, .batch = o->batch, .lr = o->lr,
                      .weight_decay = o->weight_decay, .label_dropout = o->label_dropout, .seed = o->seed};
}

static void check_same_dit_run(const DitState *saved, const DitOptions *o, const char *path) {
    DitState now = dit_run_settings(o, 0);
    const char *which = saved->steps != now.steps ? "--steps" : saved->warmup != now.warmup ? "--warmup"
                        : saved->batch != now.batch ? "--batch" : saved->lr != now.lr ? "--lr"
                        : saved->weight_decay != now.weight_decay ? "--weight-decay"
                        : saved->label_dropout != now.label_dropout ? "--label-dropout"
                        : saved->seed != now.seed ? "--seed" : NULL;
    if (which != NULL) {
        fail("%s was written by a run with --steps %d --warmup %d --batch %d --lr %g --weight-decay %g "
             "--label-dropout %g --seed %lld; this command's %s differs: resume with the run's settings, or "
             "start a new run from its model with --init", path, saved->steps, saved->warmup, saved->batch,
             saved->lr, saved->weight_decay, saved->label_dropout, saved->seed, which);
    }
}

// Stops a run whose numbers are no longer finite, saying which checkpoint survives.
static void dit_fail_diverged(const DitRun *r, const char *what, double value, int step) {
    if (r->last_checkpoint >= 0) {
        fail("%s is %g at step %d: training diverged (try a lower --lr); the last checkpoint, step %d in %s, "
             "is kept", what, value, step, r->last_checkpoint, r->o->out);
    }
    fail("%s is %g at step %d: training diverged (try a lower --lr); no checkpoint was written to %s", what,
         value, step, r->o->out);
}

// The pair of step `step` and model.bin, then the previous pair is removed. Parameters or a
// controller state that are not finite are never written: the previous checkpoint stays the last
// good one.
static void dit_write_checkpoint(DitRun *r, int step) {
    const Dit *d = r->d;
    for (size_t i = 0; i < d->num_parameters; i++) {
        if (!isfinite(d->params_memory[i])) { dit_fail_diverged(r, "a parameter", d->params_memory[i], step); }
    }
    for (int l = 0; l < d->trunk.config.num_layers; l++) {
        float p = d->trunk.threshold[l], integral = d->trunk.integral[l];
        if (!isfinite(p) || !isfinite(integral)) { dit_fail_diverged(r, "the controller state", p + integral, step); }
    }
    char model_path[4096], state_path[4096], latest[4096];
    checkpoint_path(model_path, sizeof(model_path), r->o->out, "model", step);
    checkpoint_path(state_path, sizeof(state_path), r->o->out, "state", step);
    dit_save(d, model_path);
    dit_state_save(d, &r->s, dit_run_settings(r->o, step), state_path);
    join_path(latest, sizeof(latest), r->o->out, "model.bin");  // the latest model, for sampling
    dit_save(d, latest);
    if (r->last_checkpoint >= 0 && r->last_checkpoint != step) {
        checkpoint_path(model_path, sizeof(model_path), r->o->out, "model", r->last_checkpoint);
        checkpoint_path(state_path, sizeof(state_path), r->o->out, "state", r->last_checkpoint);
        remove(state_path);
        remove(model_path);
    }
    r->last_checkpoint = step;
}

// The log: a new one with its header, or a resumed run's, without the rows after its checkpoint.
static void dit_open_log(DitRun *r) {
    int L = r->d->trunk.config.num_layers;
    join_path(r->log_path, sizeof(r->log_path), r->o->out, "log.csv");
    if (r->start_step > 0) {
        truncate_log(r->log_path, r->start_step);
        r->log = fopen_output(r->log_path, "a");
        return;
    }
    r->log = fopen_output(r->log_path, "w");
    fprintf(r->log, "step,loss,mse,val_loss,lr,grad_norm,activated,p,images_per_s");
    for (int l = 0; l < L; l++) { fprintf(r->log, ",p_%d,mean_%d,std_%d,theta_%d", l, l, l, l); }
    fprintf(r->log, "\n");
    flush_check(r->log, r->log_path);
}

// A step's row of log.csv, flushed and checked: a full disk stops the run, naming the file.
static void dit_log_step(DitRun *r, const RoutingStats *stats, int step, double val_loss, float lr, float norm,
                         float p_used, double speed) {
    const Dit *d = r->d;
    FILE *log = r->log;
    fprintf(log, "%d,%.6f,%.6f,", step + 1, d->loss, d->mse);
    if (val_loss >= 0.0) { fprintf(log, "%.6f", val_loss); }
    fprintf(log, ",%.6e,%.6f,%.6f,%.6f,%.1f", lr, norm, stats->activated, p_used, speed);
    for (int l = 0; l < d->trunk.config.num_layers; l++) {
        fprintf(log, ",%.6f,%.4f,%.4f,%.6f", d->trunk.threshold[l], stats->layer_mean[l], stats->layer_std[l],
                d->trunk.params.theta[l]);
    }
    fprintf(log, "\n");
    flush_check(log, r->log_path);
}

// --resume: the state of the checkpoint the model came from, which must belong to this run.
static void dit_resume(DitRun *r) {
    char state_path[4096];
    checkpoint_path(state_path, sizeof(state_path), r->o->out, "state", r->start_step);
    DitState saved = dit_state_load(r->d, &r->s, state_path);
    if (saved.step != r->start_step) {
        fail("%s says step %d, its name says %d", state_path, saved.step, r->start_step);
    }
    check_same_dit_run(&saved, r->o, state_path);
    printf("resuming from %s: step %d of %d\n", state_path, r->start_step, r->o->steps);
}

// Trains from start_step (0, or the checkpoint's step of --resume, whose model d is); returns 1 when
// it stopped at --stop-at, before the end.
static int train(Dit *d, const DitOptions *o, int start_step, const char *source) {
    int B = o->batch;
    DitRun r = {.o = o, .d = d, .start_step = start_step, .last_checkpoint = start_step > 0 ? start_step : -1};
    Batches *s = &r.s;
    batches_open(s, o->data, d->config.image_size, B, (uint64_t)o->seed * 0x9E3779B97F4A7C15ull + 1);
    batches_check_labels(s, o->data, d->config.num_classes, source);
    if (start_step > 0) { dit_resume(&r); }
    int eval_count = o->eval_images < s->val_images.count ? o->eval_images : s->val_images.count;
    printf("data: %d training images, validation loss on %d test images at t = 0.25, 0.5, 0.75\n",
           s->images.count, eval_count);
    dit_open_log(&r);
    RoutingStats stats;
    routing_stats_alloc(&stats, &d->trunk.config);
    double start = wall_seconds();
    int stopped = 0;
    for (int step = start_step; step < o->steps && !stopped; step++) {
        double val_loss = -1.0;
        if (o->eval_every > 0 && step % o->eval_every == 0) { val_loss = evaluate(d, s, eval_count, B, step); }
        double t0 = wall_seconds();
        float lr = learning_rate(step, o->steps, o->warmup, o->lr), p_used = d->trunk.threshold[0];
        next_batch(s, B, o->label_dropout);
        dit_forward(d, s->xt, s->t, s->classes, s->velocity, B);
        dit_zero_grad(d);
        dit_backward(d);
        float norm = dit_update(d, lr, o->weight_decay);
        routing_stats_compute(&stats, &d->trunk);
        controller_update(&d->trunk);
        if (!isfinite(d->loss)) { dit_fail_diverged(&r, "the loss", d->loss, step + 1); }
        if (!isfinite(norm)) { dit_fail_diverged(&r, "the gradient norm", norm, step + 1); }
        double now = wall_seconds(), speed = B / (now - t0);
        if ((step + 1) % o->print_every == 0 || step == start_step || step + 1 == o->steps) {
            double left = (now - start) / (step + 1 - start_step) * (o->steps - step - 1);
            printf("step %5d/%d | loss %.4f | lr %.2e | p %.3f | experts %.2f (target %.2f) | %.0f img/s | "
                   "%dm%02ds left\n", step + 1, o->steps, d->loss, lr, p_used, stats.activated,
                   d->trunk.router.tgt, speed, (int)left / 60, (int)left % 60);
            fflush(stdout);
        }
        dit_log_step(&r, &stats, step, val_loss, lr, norm, p_used, speed);
        stopped = step + 1 == o->stop_at;
        if ((o->checkpoint_every > 0 && (step + 1) % o->checkpoint_every == 0) || step + 1 == o->steps || stopped) {
            dit_write_checkpoint(&r, step + 1);
        }
    }
    if (stopped) {
        printf("stopped at step %d: continue with --resume %s\n", o->stop_at, o->out);
    } else {
        evaluate(d, s, eval_count, B, o->steps);
        printf("trained %d steps in %.0f s\n", o->steps - start_step, wall_seconds() - start);
    }
    fclose_check(r.log, r.log_path);
    routing_stats_free(&stats);
    batches_close(s);
    return stopped;
}

// mkdir -p
static void make_directories(const char *path) {
    char partial[4096];
    size_t n = strlen(path);
    if (n >= sizeof(partial)) { fail("path too long: %s", path); }
    for (size_t i = 1; i <= n; i++) {
        if (path[i] != '/' && path[i] != '\0') { continue; }
        memcpy(partial, path, i);
        partial[i] = '\0';
        if (mkdir(partial, 0755) != 0 && errno != EEXIST) {
            fail("cannot create %s: %s", partial, strerror(errno));
        }
    }
}

int main(int argc, char **argv) {
    passive_wait_by_default(argv);  // OMP_WAIT_POLICY: idle threads sleep, unless the user chose
    DitOptions o;
    dit_parse_options(&o, argc, argv);
    set_num_threads(o.threads);
    // the output folder first: one run at a time in it (a lock that ends with the process)
    make_directories(o.out);
    lock_directory(o.out);
    char path[4096], model_path[4096];
    join_path(path, sizeof(path), o.out, "log.csv");
    int start_step = 0;
    if (o.resume != NULL) {  // the newest complete checkpoint; what an interruption left goes
        start_step = latest_checkpoint(o.out);
        if (start_step < 0) { fail("--resume %s: no complete checkpoint (model_*.bin with state_*.bin) found", o.out); }
        if (start_step >= o.steps) { fail("the run in %s is already at step %d of --steps %d", o.out, start_step, o.steps); }
        remove_leftovers(o.out, start_step);
    } else if (o.steps > 0) {  // a new run never takes another's folder
        if (access(path, F_OK) == 0) {
            fail("%s holds a run already (%s): continue it with --resume %s, train into another --out, or "
                 "delete it", o.out, path, o.out);
        }
        refuse_other_run(o.out);
        remove_leftovers(o.out, -1);
    }
    Dit dit;
    const char *source = o.init != NULL ? o.init : "the new model";
    if (o.resume != NULL) {
        checkpoint_path(model_path, sizeof(model_path), o.out, "model", start_step);
        dit_load(&dit, model_path);
        source = model_path;
    } else if (o.init != NULL) {
        dit_load(&dit, o.init);
    } else {
        DitConfig dconfig;
        ModelConfig config;
        RouterConfig router;
        dit_configure(&o, &dconfig, &config, &router);
        dit_init(&dit, &dconfig, &config, &router, (uint64_t)o.seed);
    }
    // its classes are Fashion-MNIST's: the labels it trains on, the rows of the sample grid (this
    // bounds the work of sampling by the data, not by a number in a file)
    if (dit.config.num_classes != NUM_CLASSES) {
        fail("%s has %d classes: train_dit trains and samples Fashion-MNIST's %d (a row of the sample grid "
             "each)", source, dit.config.num_classes, NUM_CLASSES);
    }
    const ModelConfig *c = &dit.trunk.config;
    const RouterConfig *rc = &dit.trunk.router;
    printf("model: DiT on %dx%d images in %dx%d patches (%d tokens), L=%d C=%d NH=%d E=%d H=%d, "
           "%.2fM parameters\n", dit.config.image_size, dit.config.image_size, dit.config.patch_size,
           dit.config.patch_size, c->max_seq_len, c->num_layers, c->channels, c->num_heads, c->num_experts,
           c->expert_hidden, dit.num_parameters / 1e6);
    printf("routing: %s, %s controller, target %g (topk: k %d), DRN %s, lb %g, entropy %g\n",
           routing_names[rc->routing], rc->controller ? "layer" : "global", rc->tgt, rc->k,
           rc->drn ? "on" : "off", rc->lb_coef, rc->ent_coef);
    printf("threads: %d\n", omp_threads());
    join_path(path, sizeof(path), o.out, "samples.png");
    check_output_path(path);  // before the work, not after it
    if (o.steps > 0) {
        if (train(&dit, &o, start_step, source)) {
            dit_free(&dit);
            return 0;
        }
        printf("wrote %s/model.bin\n", o.out);
    }
    double t0 = wall_seconds();
    write_sample_grid(&dit, path, o.samples_per_class, o.sample_steps, o.guidance, (uint64_t)o.seed + 1);
    printf("wrote %s: one row per class (", path);
    for (int k = 0; k < NUM_CLASSES; k++) { printf("%s%s", k ? ", " : "", fashion_classes[k]); }
    printf("), %d Euler steps, guidance %g, in %.1f s\n", o.sample_steps, o.guidance, wall_seconds() - t0);
    dit_free(&dit);
    return 0;
}
#endif  // DIT_NO_MAIN
