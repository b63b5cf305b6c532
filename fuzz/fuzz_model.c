// fuzz_model: a model checkpoint, loaded, then used as training and sampling use it: a forward
// and backward pass, an AdamW update and a controller update, and one sampled token.
#include "fuzz.h"
#define TESTING  // the model only, not the training program
#include "../train_dtopp.c"
#include "../dtopp/sampler.h"  // defines: sample_token

static void use_model(const uint8_t *data, size_t size) {
    char path[4096];
    fuzz_path(path, sizeof(path), "model.bin");
    fuzz_write_file(path, data, size);
    Model model;
    model_load(&model, path);
    const ModelConfig *c = &model.config;
    int T = c->max_seq_len < 4 ? c->max_seq_len : 4;
    int tokens[4], targets[4];
    for (int t = 0; t < T; t++) {
        tokens[t] = (t * 7) % c->vocab_size;
        targets[t] = (t * 7 + 3) % c->vocab_size;
    }
    model_forward(&model, tokens, targets, 1, T);
    model_zero_grad(&model);
    model_backward(&model);
    model_update(&model, 1e-3f, 0.1f);
    controller_update(&model);
    Decoder *decoder = decoder_create(&model);
    const float *logits = decoder_step(&model, decoder, tokens[0], 0);
    uint64_t rng = 1;
    int token = sample_token(logits, c->vocab_size, 1.0f, 0, &rng);
    if (token < 0 || token >= c->vocab_size) { abort(); }
    decoder_free(decoder);
    model_free(&model);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_run(use_model, data, size);
    return 0;
}
