// fuzz_dit_state: a diffusion transformer's training state (dit/train_dit.c, what --resume reads),
// restored into a fresh model of the seed's configuration (L=1 C=4 NH=1 E=2 H=2, dtopp; the seed is a
// state train_dit wrote on a data set of 2 images) and batches over 2 images, then one training step
// as train_dit takes it: a batch from the restored position, forward, backward, AdamW update from
// the restored moments, controller update.
#include "fuzz.h"
#define DIT_NO_MAIN  // the model only, not the training program
#include "../dit/train_dit.c"  // defines: Dit, dit_init, dit_state_load, Batches, next_batch

#define IMAGES 2

static void use_state(const uint8_t *data, size_t size) {
    char path[4096];
    fuzz_path(path, sizeof(path), "dit_state.bin");
    fuzz_write_file(path, data, size);
    DitConfig dc = {28, 4, NUM_CLASSES};
    ModelConfig c = dit_trunk_config(&dc, 1, 1, 4, 2, 2);
    RouterConfig rc = {.routing = ROUTING_DTOPP, .drn = 1, .renorm = 1, .k = 1, .p = 0.5f, .tgt = 1.5f,
                       .Kp = 0.1f, .Ki = 0.3f, .p0 = 0.8f, .pmin = 0.01f, .pmax = 1.0f, .theta_init = 1.0f,
                       .lb_coef = 1e-4f, .ent_coef = 1e-3f};
    Dit d;
    dit_init(&d, &dc, &c, &rc, 1);
    int D = 28 * 28, B = 2;
    Batches b;
    memset(&b, 0, sizeof(b));
    b.images = (IdxData){IMAGES, 28, 28, (uint8_t *)calloc_check((size_t)IMAGES * D, 1)};
    b.labels = (IdxData){IMAGES, 1, 1, (uint8_t *)calloc_check(IMAGES, 1)};
    b.labels.data[1] = 7;
    b.order = (int *)malloc_check(IMAGES * sizeof(int));
    b.x0 = (float *)malloc_check((size_t)B * D * sizeof(float));
    b.noise = (float *)malloc_check((size_t)B * D * sizeof(float));
    b.xt = (float *)malloc_check((size_t)B * D * sizeof(float));
    b.velocity = (float *)malloc_check((size_t)B * D * sizeof(float));
    b.t = (float *)malloc_check(B * sizeof(float));
    b.classes = (int *)malloc_check(B * sizeof(int));
    dit_state_load(&d, &b, path);
    next_batch(&b, B, 0.1f);
    dit_forward(&d, b.xt, b.t, b.classes, b.velocity, B);
    dit_zero_grad(&d);
    dit_backward(&d);
    dit_update(&d, 1e-3f, 0.1f);
    controller_update(&d.trunk);
    batches_close(&b);  // frees val_* too: empty here
    dit_free(&d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_run(use_state, data, size);
    return 0;
}
