/*
decoder.h: sampling on the CPU, one new position at a time. decoder_step runs every layer of
train_dtopp.c for one token, its query attending to the cached keys and values of the earlier
positions, so that a sample of n tokens costs n forward passes of one position rather than of the
whole prefix. Its cache, and RoPE's tables (rope_reserve, which training uses too), grow with the
positions used, so memory and work follow the sample's length, not the model's maximum. It is part
of the CPU model: train_dtopp.c includes it after the layers it uses, and train_dtopp.cu has its own.
*/
#ifndef DECODER_H
#define DECODER_H

// and values of every earlier position (the training forward pass would recompute them all)

// RoPE's tables (cos and sin, filled by rope_table_init) for the first T positions, grown as the
// sequences need them: a model whose maximum sequence length is long costs nothing for the
// positions it is not run on. Used by training (model_ensure_activations) and sampling.
static void rope_reserve(Workspace *ws, const ModelConfig *c, int T) {
    if (T <= ws->rope_len) { return; }
    int hd = c->channels / c->num_heads;
    ws->rope_cos = (float *)realloc_check(ws->rope_cos, (size_t)T * (hd / 2) * sizeof(float));
    ws->rope_sin = (float *)realloc_check(ws->rope_sin, (size_t)T * (hd / 2) * sizeof(float));
    rope_table_init(ws->rope_cos, ws->rope_sin, T, hd);
    ws->rope_len = T;
}

struct Decoder {
    Activations acts;  // B = 1, T = 1
    int capacity;      // positions the cache has room for: doubled as the sample grows, to max_seq_len
    float *kv_cache;   // (L, capacity, 3C) q, k, v of every position so far (RoPE applied)
    float *scores;     // (capacity) attention probabilities of the current query
};

// Room for `positions` positions (at least): the cache of each layer moves to its new place.
static void decoder_reserve(const Model *model, Decoder *d, int positions) {
    const ModelConfig *c = &model->config;
    if (positions <= d->capacity) { return; }
    int capacity = d->capacity > 0 ? d->capacity : 64;
    while (capacity < positions) { capacity = capacity > c->max_seq_len / 2 ? c->max_seq_len : 2 * capacity; }
    capacity = capacity < c->max_seq_len ? capacity : c->max_seq_len;
    size_t row = (size_t)3 * c->channels;
    float *cache = (float *)malloc_check((size_t)c->num_layers * capacity * row * sizeof(float));
    for (int l = 0; l < c->num_layers && d->capacity > 0; l++) {
        memcpy(cache + (size_t)l * capacity * row, d->kv_cache + (size_t)l * d->capacity * row,
               (size_t)d->capacity * row * sizeof(float));
    }
    free(d->kv_cache);
    d->kv_cache = cache;
    d->scores = (float *)realloc_check(d->scores, (size_t)capacity * sizeof(float));
    d->capacity = capacity;
    rope_reserve(model->ws, c, capacity);
}

Decoder *decoder_create(const Model *model) {
    const ModelConfig *c = &model->config;
    Decoder *d = (Decoder *)calloc_check(1, sizeof(Decoder));
    activations_alloc(&d->acts, c, 1, 1, 0);
    // with --expert-parallel every rank samples, its experts computing the group's rows
    if (ep_ranks > 1) { d->acts.owned = owned_alloc(c); }
    decoder_reserve(model, d, 1);
    return d;
}

void decoder_free(Decoder *d) {
    activations_free(&d->acts);
    free(d->kv_cache);
    free(d->scores);
    free(d);
}

// Feeds `token` at position `pos` (all earlier positions must have been fed) and returns the
// logits (V) for the next token. Each layer is model_forward's for one position, except that its
// attention is that of one query against the cache.
const float *decoder_step(Model *model, Decoder *d, int token, int pos) {
    const ModelConfig *c = &model->config;
    int C = c->channels, L = c->num_layers, NH = c->num_heads, hd = C / NH, V = c->vocab_size;
    if (pos >= c->max_seq_len) {
        fail("position %d exceeds the model's maximum sequence length %d", pos, c->max_seq_len);
    }
    decoder_reserve(model, d, pos + 1);
    ActivationTensors *t = &d->acts.acts;
    const float *rope_cos = model->ws->rope_cos + pos * (hd / 2), *rope_sin = model->ws->rope_sin + pos * (hd / 2);
    encoder_forward(t->encoded, &token, model->params.wte, 1, C);
    d->acts.row_offset[0] = 0;
    for (int l = 0; l < L; l++) {
        LayerWeights w = layer_weights(&model->params, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * C;
        float *ln1 = t->ln1 + (size_t)l * C, *atty = t->atty + (size_t)l * C, *res1 = t->res1 + (size_t)l * C;
        float *cache = d->kv_cache + (size_t)l * d->capacity * 3 * C, *qkv = cache + (size_t)pos * 3 * C;
        rmsnorm_forward(ln1, t->ln1_rstd + l, x, w.g1, 1, C);
        matmul_forward(qkv, ln1, NULL, w.wqkv, 1, C, 3 * C, FLOAT32);
        rope_forward(qkv, rope_cos, rope_sin, 1, 1, C, NH);  // the tables from position pos
        for (int h = 0; h < NH; h++) {  // scores = q · K^T over positions 0 .. pos; P · V
            const float *q = qkv + h * hd, *k = cache + C + h * hd, *v = cache + 2 * C + h * hd;
            matmul_nt(d->scores, pos + 1, q, 3 * C, k, 3 * C, 1, pos + 1, hd, 0, FLOAT32);
            softmax_row(d->scores, pos + 1, 1.0f / sqrtf((float)hd));
            matmul_nn(atty + h * hd, C, d->scores, pos + 1, v, 3 * C, 1, hd, pos + 1, 0, FLOAT32);
        }
        matmul_forward(res1, atty, NULL, w.wo, 1, C, C, FLOAT32);
        residual_forward(res1, x, res1, C);
        float *ln2 = t->ln2 + (size_t)l * C, *res2 = t->res2 + (size_t)l * C;
        rmsnorm_forward(ln2, t->ln2_rstd + l, res1, w.g2, 1, C);
        moe_forward(model, &d->acts, l, res2, ln2);
        residual_forward(res2, res1, res2, C);
    }
    rmsnorm_forward(t->lnf, t->lnf_rstd, t->res2 + (size_t)(L - 1) * C, model->params.gf, 1, C);
    matmul_forward(t->logits, t->lnf, NULL, model->params.wte, 1, C, V, FLOAT32);
    return t->logits;
}

#endif  // DECODER_H
