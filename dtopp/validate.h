/*
validate.h: the checks that a model's configuration and state are ones the code supports, for
whatever a checkpoint's header or the command line declares: every size bounded, the parameter
count in checked arithmetic (so no product of sizes overflows), the routing settings in range, and
the parameters and controller state finite and reachable. `where` or `path` names the source in
every message. Included by train_dtopp.c after the Model struct.
*/
#ifndef VALIDATE_H
#define VALIDATE_H

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
    if (vocab_contradicts(c->vocab_kind, c->vocab_size)) {
        fail("%s: %s tokens but a vocabulary of %d: the two contradict each other", where,
             vocab_kind_name(c->vocab_kind), c->vocab_size);
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
    if (rc->first_layer_k != 0 && (rc->routing == ROUTING_TOPK || c->num_layers < 2 ||
                                   !in_range(rc->first_layer_k, 1, c->num_experts))) {
        fail("%s: a fixed top-k first layer needs topp or dtopp routing, 2 or more layers and 1 <= k <= E "
             "(got %d, L=%d, E=%d)", where, rc->first_layer_k, c->num_layers, c->num_experts);
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

#endif  // VALIDATE_H
