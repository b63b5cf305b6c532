/*
decoder.h: sampling on the CPU, one new position at a time. decoder_step runs every layer of
train_dtopp.c for one token, its query attending to the cached keys and values of the earlier
positions, so that a sample of n tokens costs n forward passes of one position rather than of the
whole prefix. It is part of the CPU model: train_dtopp.c includes it after the layers it uses, and
train_dtopp.cu has its own.
*/
#ifndef DECODER_H
#define DECODER_H

// and values of every earlier position (the training forward pass would recompute them all)

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
// logits (V) for the next token. Each layer is model_forward's for one position, except that its
// attention is that of one query against the cache.
const float *decoder_step(Model *model, Decoder *d, int token, int pos) {
    const ModelConfig *c = &model->config;
    int C = c->channels, L = c->num_layers, NH = c->num_heads, hd = C / NH, V = c->vocab_size;
    if (pos >= c->max_seq_len) {
        fail("position %d exceeds the model's maximum sequence length %d", pos, c->max_seq_len);
    }
    ActivationTensors *t = &d->acts.acts;
    const float *rope_cos = model->ws->rope_cos + pos * (hd / 2), *rope_sin = model->ws->rope_sin + pos * (hd / 2);
    encoder_forward(t->encoded, &token, model->params.wte, 1, C);
    d->acts.row_offset[0] = 0;
    for (int l = 0; l < L; l++) {
        LayerWeights w = layer_weights(&model->params, c, l);
        const float *x = l == 0 ? t->encoded : t->res2 + (size_t)(l - 1) * C;
        float *ln1 = t->ln1 + (size_t)l * C, *atty = t->atty + (size_t)l * C, *res1 = t->res1 + (size_t)l * C;
        float *cache = d->kv_cache + (size_t)l * c->max_seq_len * 3 * C, *qkv = cache + (size_t)pos * 3 * C;
        rmsnorm_forward(ln1, t->ln1_rstd + l, x, w.g1, 1, C);
        matmul_forward(qkv, ln1, NULL, w.wqkv, 1, C, 3 * C);
        rope_forward(qkv, rope_cos, rope_sin, 1, 1, C, NH);  // the tables from position pos
        for (int h = 0; h < NH; h++) {  // scores = q · K^T over positions 0 .. pos; P · V
            const float *q = qkv + h * hd, *k = cache + C + h * hd, *v = cache + 2 * C + h * hd;
            matmul_nt(d->scores, pos + 1, q, 3 * C, k, 3 * C, 1, pos + 1, hd, 0);
            softmax_row(d->scores, pos + 1, 1.0f / sqrtf((float)hd));
            matmul_nn(atty + h * hd, C, d->scores, pos + 1, v, 3 * C, 1, hd, pos + 1, 0);
        }
        matmul_forward(res1, atty, NULL, w.wo, 1, C, C);
        residual_forward(res1, x, res1, C);
        float *ln2 = t->ln2 + (size_t)l * C, *res2 = t->res2 + (size_t)l * C;
        rmsnorm_forward(ln2, t->ln2_rstd + l, res1, w.g2, 1, C);
        moe_forward(model, &d->acts, l, res2, ln2);
        residual_forward(res2, res1, res2, C);
    }
    rmsnorm_forward(t->lnf, t->lnf_rstd, t->res2 + (size_t)(L - 1) * C, model->params.gf, 1, C);
    matmul_forward(t->logits, t->lnf, NULL, model->params.wte, 1, C, V);
    return t->logits;
}

#endif  // DECODER_H
