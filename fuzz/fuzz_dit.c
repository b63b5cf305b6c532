// fuzz_dit: a diffusion transformer checkpoint (dit/train_dit.c), loaded, then used as training and
// sampling use it: a forward and backward pass on two images (one with the null class), an AdamW
// update, a controller update, and one guided Euler step. Models with more than 64 patches per
// image are only loaded: their attention would not fit a fuzzer's memory.
#include "fuzz.h"
#define DIT_NO_MAIN  // the model only, not the training program
#include "../dit/train_dit.c"  // defines: Dit, dit_load, dit_forward, dit_backward, dit_sample

static void use_dit(const uint8_t *data, size_t size) {
    char path[4096];
    fuzz_path(path, sizeof(path), "dit.bin");
    fuzz_write_file(path, data, size);
    Dit d;
    dit_load(&d, path);
    if (d.trunk.config.max_seq_len <= 64) {
        int D = d.config.image_size * d.config.image_size;
        float *images = (float *)malloc_check((size_t)4 * D * sizeof(float));
        float *xt = images, *target = images + D * 2, t[2] = {0.25f, 0.75f};
        for (int i = 0; i < 4 * D; i++) { images[i] = (float)((i * 37) % 17) / 8.0f - 1.0f; }
        int labels[2] = {0, d.config.num_classes};
        dit_forward(&d, xt, t, labels, target, 2);
        dit_zero_grad(&d);
        dit_backward(&d);
        dit_update(&d, 1e-3f, 0.1f);
        controller_update(&d.trunk);
        dit_sample(&d, xt, labels, 1, 1, 2.0f);
        free(images);
    }
    dit_free(&d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_run(use_dit, data, size);
    return 0;
}
