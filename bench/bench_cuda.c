/*
bench_cuda: training speed of the CUDA build on a fresh model and random tokens, in float32 and
with TF32 allowed, and where the time of a step goes (per phase, from CUDA events).

    bench_cuda [--L 12] [--C 768] [--NH 12] [--E 64] [--H 384] [--V 50257] [--B 8] [--T 1024]
               [--tgt 8] [--steps 8] [--profile-steps 2] [--tf32 0|1|2] [--experts 0|1|2]

--tf32 2 (the default) measures both float32 and TF32; --experts 2 (the default) measures both
ways of issuing the experts' products (0: one product per expert on several streams, 1: grouped
products). Every measurement starts from the same model.
A step is what the training program does: forward, backward, clip + AdamW, controller. The
first 3 steps of each measurement are warm-up (allocations); the figures are the mean of the
rest, like reference/bench.py. Build: see bench/bench_cuda.sh.
*/
#define TESTING
#define DTOPP_PROFILE  // the phase timings of train_dtopp.cu
#include "../train_dtopp.cu"

static void train_step(Model *model, const int *inputs, const int *targets, int B, int T, int step, int steps) {
    model_forward(model, inputs, targets, B, T);
    model_zero_grad(model);
    model_backward(model);
    model_update(model, learning_rate(step, steps, 2, 3e-4f), 0.1f);
    controller_update(model);
}

// Puts the model back to its starting point: parameters, optimizer state, controller.
static void reset_model(Model *model, const float *params) {
    copy_to_device(model->params_memory, params, model->num_parameters * sizeof(float));
    if (model->m_memory != NULL) {
        zero_async(model->m_memory, model->num_parameters * sizeof(float));
        zero_async(model->v_memory, model->num_parameters * sizeof(float));
    }
    model->adam_step = 0;
    controller_reset(model);
    cudaCheck(cudaStreamSynchronize(gpu.stream));
}

static void measure(Model *model, const int *inputs, const int *targets, int B, int T, int steps, int profile_steps,
                    const char *label) {
    double total = 0.0;
    int timed = 0;
    for (int s = 0; s < steps; s++) {
        double t0 = wall_seconds();
        train_step(model, inputs, targets, B, T, s, steps);
        cudaCheck(cudaDeviceSynchronize());
        double dt = wall_seconds() - t0;
        if (s >= 3) { total += dt; timed++; }
        printf("%s step %d: loss %.4f a_t %.3f p %.4f %.1f ms\n", label, s, model->loss, model_activated(model),
               model->threshold[0], 1000 * dt);
    }
    double ms = 1000 * total / (timed > 0 ? timed : 1);
    printf("RESULT %s L=%d C=%d E=%d H=%d B=%d T=%d params=%zu: %.1f ms/step, %.0f tokens/s\n", label,
           model->config.num_layers, model->config.channels, model->config.num_experts, model->config.expert_hidden,
           B, T, model->num_parameters, ms, B * T / ms * 1000);
    if (profile_steps > 0) {
        prof.names = 0;
        cuda_profile_enable(1);
        for (int s = 0; s < profile_steps; s++) {
            train_step(model, inputs, targets, B, T, steps + s, steps + profile_steps);
            cuda_profile_collect();
        }
        cuda_profile_enable(0);
        printf("phases of a step (%s, mean of %d steps, CUDA events on the main stream):\n", label, profile_steps);
        cuda_profile_print(stdout, profile_steps);
    }
}

int main(int argc, char **argv) {
    int L = 12, C = 768, NH = 12, E = 64, H = 384, V = 50257, B = 8, T = 1024, steps = 8, profile_steps = 2, tf32 = 2;
    int experts = 2;
    float tgt = 8.0f;
    for (int a = 1; a + 1 < argc; a += 2) {
        int *target = strcmp(argv[a], "--L") == 0 ? &L : strcmp(argv[a], "--C") == 0 ? &C : strcmp(argv[a], "--NH") == 0 ? &NH
                    : strcmp(argv[a], "--E") == 0 ? &E : strcmp(argv[a], "--H") == 0 ? &H : strcmp(argv[a], "--V") == 0 ? &V
                    : strcmp(argv[a], "--B") == 0 ? &B : strcmp(argv[a], "--T") == 0 ? &T : strcmp(argv[a], "--steps") == 0 ? &steps
                    : strcmp(argv[a], "--profile-steps") == 0 ? &profile_steps : strcmp(argv[a], "--tf32") == 0 ? &tf32
                    : strcmp(argv[a], "--experts") == 0 ? &experts : NULL;
        if (strcmp(argv[a], "--tgt") == 0) { tgt = strtof(argv[a + 1], NULL); continue; }
        if (target == NULL) { fail("unknown option %s", argv[a]); }
        *target = atoi(argv[a + 1]);
    }
    ModelConfig config = {T, V, padded_vocab(V), L, NH, C, E, H};
    RouterConfig router = {ROUTING_DTOPP, CONTROLLER_GLOBAL, 1, 1, 2, 0.5f, tgt, 0.3f, 0.05f, 0.5f, 0.01f, 1.0f, 1.0f, 1e-4f, 1e-3f};
    Model model;
    double t0 = wall_seconds();
    model_init(&model, &config, &router, 1337);
    printf("model initialised in %.1f s\n", wall_seconds() - t0);
    float *params = (float *)malloc_check(model.num_parameters * sizeof(float));
    model_get_params(&model, params);
    uint64_t rng = 1;
    int *inputs = (int *)malloc_check((size_t)B * T * sizeof(int)), *targets = (int *)malloc_check((size_t)B * T * sizeof(int));
    for (int i = 0; i < B * T; i++) {
        inputs[i] = (int)(random_u64(&rng) % V);
        targets[i] = (int)(random_u64(&rng) % V);
    }
    const char *labels[2][2] = {{"cuda-fp32-lanes", "cuda-fp32-grouped"}, {"cuda-tf32-lanes", "cuda-tf32-grouped"}};
    int first = 1;
    for (int t = 0; t < 2; t++) {
        if (tf32 != 2 && tf32 != t) { continue; }
        for (int g = 0; g < 2; g++) {
            if (experts != 2 && experts != g) { continue; }
            if (!first) { reset_model(&model, params); }
            first = 0;
            cuda_set_tf32(t);
            cuda_set_grouped_experts(g);
            measure(&model, inputs, targets, B, T, steps, profile_steps, labels[t][g]);
        }
    }
    free(params);
    free(inputs);
    free(targets);
    model_free(&model);
    return 0;
}
