/*
held_params.h: the model file's parameters (and the state file's moments) against what a process
holds. With --expert-parallel G a rank holds W1, W3, W2 of its own E/G experts only (Model's
first_expert, experts), laid out as the file with those experts; the files keep every expert.
Writing, the ranks of a group gather each layer's experts to the group's rank 0 in rank order, which
is the file's order of the experts, and rank 0 of the run writes (write_held); reading, every rank
reads its own parts of the file (read_held). With G = 1 both are a plain write and read. Included by
train_dtopp.c after Model and the parameter tensors; shared with train_dtopp.cu (G = 1 there).
*/
#ifndef HELD_PARAMS_H
#define HELD_PARAMS_H

// Writes n = model->num_parameters floats to f in the file's layout from `held` (num_held floats),
// gathering the experts of the group. Every rank of the run calls it; f is NULL except on rank 0.
static void write_held(FILE *f, const Model *model, const float *held, const char *path) {
    const ModelConfig *c = &model->config;
    size_t L = c->num_layers, E = c->num_experts, X = model->experts;
    float *layer = NULL;  // rank 0 of the group: one layer's W1 (or W3, W2) of every expert
    for (int i = 0; i < NUM_PARAMETER_TENSORS; held += model->param_sizes[i++]) {
        if (!param_is_expert[i]) {
            if (f != NULL) { fwrite_check(held, sizeof(float), model->param_sizes[i], f, path); }
            continue;
        }
        size_t block = model->param_sizes[i] / L;  // one layer of this rank's experts
        if (layer == NULL && ep_rank == 0) { layer = (float *)malloc_check(block / X * E * sizeof(float)); }
        for (size_t l = 0; l < L; l++) {
            ep_gather_floats(held + l * block, block, layer);
            if (f != NULL) { fwrite_check(layer, sizeof(float), block / X * E, f, path); }
        }
    }
    free(layer);
}

// Reads this process's parameters (num_held floats) from the file's layout that starts at byte
// `base` of f, each rank its own experts.
static void read_held(FILE *f, long base, const Model *model, float *held, const char *path) {
    const ModelConfig *c = &model->config;
    size_t L = c->num_layers, E = c->num_experts, X = model->experts, offset = 0;  // in the file, floats
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t size = model->param_sizes[i], slice = size / (L * X);  // slice: one expert's
        size_t parts = param_is_expert[i] ? L : 1, part = size / parts;
        for (size_t l = 0; l < parts; l++) {
            size_t at = offset + (param_is_expert[i] ? (l * E + model->first_expert) * slice : 0);
            if (fseek(f, base + (long)(at * sizeof(float)), SEEK_SET) != 0) { fail("cannot seek in %s", path); }
            fread_check(held, sizeof(float), part, f, path);
            held += part;
        }
        offset += param_is_expert[i] ? slice * L * E : size;
    }
    if (fseek(f, base + (long)(offset * sizeof(float)), SEEK_SET) != 0) { fail("cannot seek in %s", path); }
}

#endif  // HELD_PARAMS_H
