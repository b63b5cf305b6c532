// fuzz_state: a training state file, restored into the model it belongs to (the configuration of
// the seeds in fuzz/corpus/state), then one AdamW update from the restored moments.
#include "fuzz.h"
#define TESTING  // the model, without its training program
#include "../train_dtopp.c"
#include "../dtopp/runfiles.h"  // defines: TrainingState, state_load

static void restore_state(const uint8_t *data, size_t size) {
    char path[4096];
    fuzz_path(path, sizeof(path), "state.bin");
    fuzz_write_file(path, data, size);
    ModelConfig config = {.max_seq_len = 16, .vocab_size = 256, .vocab_kind = VOCAB_BYTES, .padded_vocab_size = 256,
                          .num_layers = 1, .num_heads = 1, .channels = 2, .num_experts = 2, .expert_hidden = 2};
    RouterConfig router = {.routing = ROUTING_DTOPP, .drn = 1, .renorm = 1, .k = 2, .p = 0.5f, .tgt = 1.5f,
                           .Kp = 0.1f, .Ki = 0.3f, .p0 = 0.8f, .pmin = 0.01f, .pmax = 1.0f, .theta_init = 1.0f};
    Model model;
    model_init(&model, &config, &router, 1);
    TrainingState state = state_load(&model, path);
    if (model.adam_step < 1 || model.adam_step > state.step) { abort(); }
    model_zero_grad(&model);
    model_update(&model, 1e-3f, 0.1f);
    model_free(&model);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_run(restore_state, data, size);
    return 0;
}
