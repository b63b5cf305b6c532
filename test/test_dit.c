/*
test_dit.c: checks the diffusion transformer (dit/train_dit.c) against reference values computed in
float64 by the independent PyTorch implementation (reference/dit_ref.py), and its file readers.

For each fixture pair test/fixtures/dit/NAME_model.bin (the starting checkpoint) and NAME_ref.bin
(doc/formats.md) it checks the predicted velocity and the loss terms, the routing decisions
(identical) and gates, the gradient of every parameter tensor, a trajectory of training steps
with controller updates (loss, a_t and p at every step), and that 1 and 2 threads give bitwise
identical results. Then: a checkpoint saved and loaded again is the same model; damaged IDX files
and checkpoints are refused with a message naming them; the PNG writer's output decodes to its
pixels; a generated data set (TEST_IMAGES, written by test/make_test_images) reads as 1,000
labelled 28 x 28 images, and the real Fashion-MNIST test set (FASHION_MNIST, default
data/fashion-mnist) as 10,000 when it is there; without it, that check is skipped with a line that
says so.

usage: test/test_dit [NAME_ref.bin ...]   (default: every fixture in test/fixtures/dit)
*/
#define DIT_NO_MAIN
#define EVAL_DIT_NO_MAIN
#include "../dit/eval_dit.c"  // defines: the DiT (dit/train_dit.c, with the model and idx.h), the classifier
#include "../dit/png.h"       // defines: png_write_gray
#include <glob.h>               // glob: the fixtures
#include "check.h"              // defines: check, check_refuses, relative_error

// Tolerances, as test_gpt's: relative L2 error per tensor, absolute error per step.
#define TOL_TENSOR 1e-4
#define TOL_STEP_LOSS 1e-4
#define TOL_A 1e-6
#define TOL_P 1e-5

static void check_tensor(const char *fixture, const char *what, const float *got, const float *want,
                         size_t n) {
    double error = relative_error(got, want, n);
    check(error <= TOL_TENSOR, "%-10s %-20s error %.3e (tolerance %.0e)", fixture, what, error, TOL_TENSOR);
}

// ----------------------------------------------------------------------------
// the fixture file (doc/formats.md)

#define DIT_FIXTURE_VERSION 1

typedef struct {
    int B, n_steps, warmup, sample_steps;
    float lr, weight_decay, guidance;
    float *x0, *noise, *t;  // (B, D), (B, D), (B)
    int *labels;            // (B)
    float *velocity;        // (B, D)
    float *losses;          // (2 + 2L): total, MSE, LB_l, H_l
    int *n_selected;        // (L, N)
    int *selected;          // (L, N, E)
    float *gates;           // (L, N, E)
    float *grads;           // (num_params)
    float *trajectory;      // (n_steps, 2 + L)
    float *sample;          // (B, D) the sampler's images from `noise`, with the fixture's labels
    void *memory;
} DitReference;

static void reference_load(DitReference *ref, const char *path, const Dit *d) {
    int32_t header[HEADER_WORDS];
    long size;
    static const int versions[] = {DIT_FIXTURE_VERSION};
    FILE *f = open_with_header(path, header, DIT_FIXTURE_MAGIC, versions, 1, "DiT reference fixture", &size);
    int S, P, K, L, E, num_params;
    const HeaderField fields[] = {{2, 4, &ref->B},       {3, 4, &S},
                                  {4, 4, &P},            {5, 4, &K},
                                  {6, 4, &L},            {7, 4, &E},
                                  {8, 4, &num_params},   {9, 4, &ref->n_steps},
                                  {10, 4, &ref->warmup}, {11, 4, &ref->sample_steps},
                                  {32, 4, &ref->lr},     {33, 4, &ref->weight_decay},
                                  {34, 4, &ref->guidance}};
    header_unpack(header, fields, (int)(sizeof(fields) / sizeof(fields[0])));
    const ModelConfig *c = &d->trunk.config;
    if (S != d->config.image_size || P != d->config.patch_size || K != d->config.num_classes ||
        L != c->num_layers || E != c->num_experts || (size_t)num_params != d->num_parameters) {
        fail("%s does not belong to its model (S %d, P %d, K %d, L %d, E %d, %d parameters)", path, S, P, K,
             L, E, num_params);
    }
    if (ref->B < 1 || ref->B > 1024 || ref->n_steps < 0 || ref->n_steps > 1000 || ref->warmup < 1 ||
        ref->sample_steps < 1 || ref->sample_steps > 1000 || !isfinite(ref->guidance)) {
        fail("%s: bad batch, trajectory or sampler fields (B %d, steps %d, warm-up %d, sampler steps %d)",
             path, ref->B, ref->n_steps, ref->warmup, ref->sample_steps);
    }
    size_t B = ref->B, D = (size_t)S * S, N = B * c->max_seq_len;
    size_t counts[] = {B * D,     B * D,     B, B, B * D, 2 + 2 * (size_t)L, L * N, L * N * E, L * N * E,
                       (size_t)num_params, (size_t)ref->n_steps * (2 + L), B * D};
    int n = (int)(sizeof(counts) / sizeof(counts[0]));
    size_t total = 0;
    for (int i = 0; i < n; i++) { total += counts[i]; }
    check_payload_size(path, size, total * 4);
    char *p = (char *)malloc_check(total * 4);
    ref->memory = p;
    fread_check(p, 4, total, f, path);
    fclose(f);
    void **ptrs[] = {(void **)&ref->x0,         (void **)&ref->noise,    (void **)&ref->t,
                     (void **)&ref->labels,     (void **)&ref->velocity, (void **)&ref->losses,
                     (void **)&ref->n_selected, (void **)&ref->selected, (void **)&ref->gates,
                     (void **)&ref->grads,      (void **)&ref->trajectory, (void **)&ref->sample};
    for (int i = 0; i < n; i++) {
        *ptrs[i] = p;
        p += counts[i] * 4;
    }
    for (int b = 0; b < ref->B; b++) {
        if (ref->labels[b] < 0 || ref->labels[b] > K) {
            fail("%s: label %d is not a class", path, ref->labels[b]);
        }
    }
}

// ----------------------------------------------------------------------------
// the checks against the reference

static const char *tensor_names[DIT_NUM_TENSORS] = {"wpatch", "wt1", "wt2",   "wy", "wada", "g1",
                                                    "wqkv",   "wo",  "g2",    "wr", "theta", "w1",
                                                    "w3",     "w2",  "gf",    "wfinal", "wout"};

// The batch of a fixture: x_t and the target velocity from its images, noise and times.
typedef struct {
    float *xt, *target;
} Batch;

static Batch batch_of(const DitReference *ref, const Dit *d) {
    int D = d->config.image_size * d->config.image_size;
    Batch b = {(float *)malloc_check((size_t)ref->B * D * sizeof(float)),
               (float *)malloc_check((size_t)ref->B * D * sizeof(float))};
    rectified_flow_pair(b.xt, b.target, ref->x0, ref->noise, ref->t, ref->B, D);
    return b;
}

static void test_forward_backward(const char *name, Dit *d, const DitReference *ref, Batch batch) {
    const ModelConfig *c = &d->trunk.config;
    int B = ref->B, L = c->num_layers, E = c->num_experts, N = B * c->max_seq_len;
    int D = d->config.image_size * d->config.image_size;
    dit_forward(d, batch.xt, ref->t, ref->labels, batch.target, B);
    float *velocity = (float *)malloc_check((size_t)B * D * sizeof(float));
    dit_get_velocity(d, velocity);
    check_tensor(name, "velocity", velocity, ref->velocity, (size_t)B * D);
    free(velocity);
    float losses[2 + 2 * 64];
    losses[0] = d->loss;
    losses[1] = d->mse;
    memcpy(losses + 2, d->trunk.ws->acts.acts.aux_lb, L * sizeof(float));
    memcpy(losses + 2 + L, d->trunk.ws->acts.acts.aux_ent, L * sizeof(float));
    for (int i = 0; i < 2 + 2 * L; i++) {
        char what[64];
        if (i < 2) { snprintf(what, sizeof(what), "%s", i == 0 ? "loss total" : "loss MSE"); }
        else { snprintf(what, sizeof(what), "%s layer %d", i < 2 + L ? "loss LB" : "loss H", (i - 2) % L); }
        check_tensor(name, what, &losses[i], &ref->losses[i], 1);
    }
    int *n_selected = (int *)malloc_check((size_t)L * N * sizeof(int));
    int *selected = (int *)malloc_check((size_t)L * N * E * sizeof(int));
    float *gates = (float *)malloc_check((size_t)L * N * E * sizeof(float));
    model_get_routing(&d->trunk, n_selected, selected, gates);
    size_t mismatches = 0;
    int fewest = E, most = 0;
    for (size_t i = 0; i < (size_t)L * N; i++) {
        mismatches += n_selected[i] != ref->n_selected[i];
        fewest = n_selected[i] < fewest ? n_selected[i] : fewest;
        most = n_selected[i] > most ? n_selected[i] : most;
    }
    for (size_t i = 0; i < (size_t)L * N * E; i++) { mismatches += selected[i] != ref->selected[i]; }
    check(mismatches == 0, "%-10s routing (|S| %d..%d)     %zu of %zu decisions differ", name, fewest, most,
          mismatches, (size_t)L * N * (E + 1));
    check_tensor(name, "gates", gates, ref->gates, (size_t)L * N * E);
    free(n_selected);
    free(selected);
    free(gates);
    dit_zero_grad(d);
    dit_backward(d);
    size_t offset = 0;
    for (int k = 0; k < DIT_NUM_TENSORS; k++) {
        char what[64];
        snprintf(what, sizeof(what), "grad %s", tensor_names[k]);
        check_tensor(name, what, d->grads_memory + offset, ref->grads + offset, d->sizes[k]);
        offset += d->sizes[k];
    }
}

static void train_step(Dit *d, const DitReference *ref, Batch batch, int step) {
    dit_forward(d, batch.xt, ref->t, ref->labels, batch.target, ref->B);
    dit_zero_grad(d);
    dit_backward(d);
    dit_update(d, learning_rate(step, ref->n_steps, ref->warmup, ref->lr), ref->weight_decay);
    controller_update(&d->trunk);
}

static void test_trajectory(const char *name, Dit *d, const DitReference *ref, Batch batch) {
    int L = d->trunk.config.num_layers;
    double worst_loss = 0.0, worst_a = 0.0, worst_p = 0.0;
    for (int s = 0; s < ref->n_steps; s++) {
        train_step(d, ref, batch, s);
        const float *want = ref->trajectory + (size_t)s * (2 + L);
        worst_loss = isnan(d->loss) ? INFINITY : fmax(worst_loss, fabs(d->loss - want[0]));
        worst_a = fmax(worst_a, fabs(model_activated(&d->trunk) - want[1]));
        for (int l = 0; l < L; l++) { worst_p = fmax(worst_p, fabs(d->trunk.threshold[l] - want[2 + l])); }
    }
    check(worst_loss <= TOL_STEP_LOSS, "%-10s %d steps: loss        error %.3e (tolerance %.0e)", name,
          ref->n_steps, worst_loss, TOL_STEP_LOSS);
    check(worst_a <= TOL_A, "%-10s %d steps: a_t         error %.3e (tolerance %.0e)", name, ref->n_steps,
          worst_a, TOL_A);
    check(worst_p <= TOL_P, "%-10s %d steps: p           error %.3e (tolerance %.0e)", name, ref->n_steps,
          worst_p, TOL_P);
}

// The sampler from the fixture's noise: Euler steps with classifier-free guidance.
static void test_sampler(const char *name, Dit *d, const DitReference *ref) {
    size_t n = (size_t)ref->B * d->config.image_size * d->config.image_size;
    float *x = (float *)malloc_check(n * sizeof(float));
    memcpy(x, ref->noise, n * sizeof(float));
    dit_sample(d, x, ref->labels, ref->B, ref->sample_steps, ref->guidance);
    char what[64];
    snprintf(what, sizeof(what), "sample (%d steps, w %g)", ref->sample_steps, ref->guidance);
    check_tensor(name, what, x, ref->sample, n);
    free(x);
}

// Two training steps with 1 and with 2 threads: bitwise identical parameters, gradients, output.
static void test_threads(const char *name, const char *model_path, const DitReference *ref, Batch batch) {
    float *results[2];
    size_t count = 0;
    for (int run = 0; run < 2; run++) {
        set_num_threads(run + 1);
        Dit d;
        dit_load(&d, model_path);
        size_t D = (size_t)d.config.image_size * d.config.image_size;
        count = 2 * d.num_parameters + ref->B * D;
        float *out = results[run] = (float *)malloc_check(count * sizeof(float));
        train_step(&d, ref, batch, 0);
        train_step(&d, ref, batch, 1);
        memcpy(out, d.params_memory, d.num_parameters * sizeof(float));
        memcpy(out + d.num_parameters, d.grads_memory, d.num_parameters * sizeof(float));
        dit_get_velocity(&d, out + 2 * d.num_parameters);
        dit_free(&d);
    }
    set_num_threads(0);
    check(memcmp(results[0], results[1], count * sizeof(float)) == 0,
          "%-10s 1 vs 2 threads: bitwise identical", name);
    free(results[0]);
    free(results[1]);
}

// A checkpoint written and read back is the same model: configuration, parameters, controller.
static void test_round_trip(const char *model_path, const char *dir) {
    Dit a, b;
    dit_load(&a, model_path);
    a.trunk.threshold[0] = 0.625f;  // a controller state of its own, to see it come back
    for (int l = 1; l < a.trunk.config.num_layers; l++) { a.trunk.threshold[l] = 0.625f; }
    char path[4096];
    join_path(path, sizeof(path), dir, "round_trip.bin");
    dit_save(&a, path);
    dit_load(&b, path);
    int same = a.num_parameters == b.num_parameters &&
               memcmp(a.params_memory, b.params_memory, a.num_parameters * sizeof(float)) == 0 &&
               memcmp(&a.config, &b.config, sizeof(a.config)) == 0 &&
               memcmp(&a.trunk.config, &b.trunk.config, sizeof(a.trunk.config)) == 0 &&
               memcmp(&a.trunk.router, &b.trunk.router, sizeof(a.trunk.router)) == 0 &&
               memcmp(a.trunk.threshold, b.trunk.threshold, a.trunk.config.num_layers * sizeof(float)) == 0;
    check(same, "checkpoint: saved and loaded again, the same model and controller state");
    dit_free(&a);
    dit_free(&b);
}

// ----------------------------------------------------------------------------
// bad files: each must be refused, with a message naming the file and the problem

static char tmp_dir[64];
static char bad_path[4096];

static void write_file(const char *name, const void *data, size_t n) {
    join_path(bad_path, sizeof(bad_path), tmp_dir, name);
    FILE *f = fopen_check(bad_path, "wb");
    fwrite_check(data, 1, n, f, bad_path);
    fclose(f);
}

static void read_images(const void *path) { idx_read((const char *)path, 3, "images"); }
static void read_labels(const void *path) { idx_read((const char *)path, 1, "labels"); }
static void read_dataset(const void *paths) {
    IdxData images, labels;
    const char *const *p = (const char *const *)paths;
    idx_read_dataset(&images, &labels, p[0], p[1], 10);
}
static void read_checkpoint(const void *path) {
    Dit d;
    dit_load(&d, (const char *)path);
}

// An IDX file of unsigned bytes: the magic's type and dimension count, the dimensions, `values` bytes.
static size_t idx_bytes(uint8_t *out, int type, int dims, const uint32_t *shape, size_t values,
                        uint8_t fill) {
    out[0] = 0, out[1] = 0, out[2] = (uint8_t)type, out[3] = (uint8_t)dims;
    for (int d = 0; d < dims; d++) { png_put_u32(out + 4 + 4 * d, shape[d]); }  // big-endian, as IDX
    memset(out + 4 + 4 * dims, fill, values);
    return 4 + 4 * dims + values;
}

static void test_bad_files(const char *model_path) {
    static uint8_t buf[4096];
    uint32_t shape[3] = {2, 28, 28};
    char images_path[4096], labels_path[4096];
    size_t n = idx_bytes(buf, 8, 3, shape, 2 * 28 * 28, 7);
    write_file("images.idx", buf, n);
    snprintf(images_path, sizeof(images_path), "%s", bad_path);
    IdxData good = idx_read(images_path, 3, "images");
    check(good.count == 2 && good.rows == 28 && good.cols == 28 && good.data[1567] == 7,
          "idx: a good file of 2 images reads");
    free(good.data);
    write_file("truncated.idx", buf, n - 1);
    check_refuses("idx: truncated images", read_images, bad_path, "announces");
    write_file("trailing.idx", buf, n + 1);
    check_refuses("idx: trailing bytes", read_images, bad_path, "announces");
    write_file("short.idx", buf, 10);
    check_refuses("idx: shorter than its header", read_images, bad_path, "too short");
    n = idx_bytes(buf, 0x0D, 3, shape, 16, 0);  // float data
    write_file("type.idx", buf, n);
    check_refuses("idx: not unsigned bytes", read_images, bad_path, "not an IDX images file");
    write_file("labels_as_images.idx", buf, idx_bytes(buf, 8, 1, shape, 784, 1));
    check_refuses("idx: labels where images belong", read_images, bad_path, "not an IDX images file");
    uint32_t empty[3] = {0, 28, 28};
    write_file("empty.idx", buf, idx_bytes(buf, 8, 3, empty, 0, 0));
    check_refuses("idx: zero images", read_images, bad_path, "bad IDX dimensions");
    uint32_t huge[3] = {1, 1u << 31, 28};
    write_file("huge.idx", buf, idx_bytes(buf, 8, 3, huge, 0, 0));
    check_refuses("idx: a dimension of 2^31", read_images, bad_path, "bad IDX dimensions");
    static const uint8_t gzip[] = {0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0};
    write_file("gzip.idx", gzip, sizeof(gzip));
    check_refuses("idx: gzip-compressed", read_images, bad_path, "gzip-compressed");
    uint32_t three[1] = {3};
    write_file("labels3.idx", buf, idx_bytes(buf, 8, 1, three, 3, 1));
    snprintf(labels_path, sizeof(labels_path), "%s", bad_path);
    const char *pair[2] = {images_path, labels_path};
    check_refuses("idx: 3 labels for 2 images", read_dataset, pair, "holds 3 labels");
    uint32_t two[1] = {2};
    write_file("labels_big.idx", buf, idx_bytes(buf, 8, 1, two, 2, 10));
    snprintf(labels_path, sizeof(labels_path), "%s", bad_path);
    check_refuses("idx: label 10 of 10 classes", read_dataset, pair, "is not a class");
    join_path(bad_path, sizeof(bad_path), tmp_dir, "missing.idx");
    check_refuses("idx: missing file", read_labels, bad_path, "cannot open");

    // checkpoints: damaged copies of a fixture's model
    FILE *f = fopen_check(model_path, "rb");
    long size = file_size(f, model_path);
    char *data = (char *)malloc_check(size);
    fread_check(data, 1, size, f, model_path);
    fclose(f);
    write_file("model_truncated.bin", data, size - 4);
    check_refuses("checkpoint: truncated", read_checkpoint, bad_path, "truncated");
    int32_t word = MODEL_MAGIC;
    memcpy(data, &word, 4);
    write_file("model_magic.bin", data, size);
    check_refuses("checkpoint: a language model's magic", read_checkpoint, bad_path, "magic");
    word = DIT_MAGIC;
    memcpy(data, &word, 4);
    word = 3;
    memcpy(data + 4 * 65, &word, 4);  // patch size 3 does not divide 28
    write_file("model_patch.bin", data, size);
    check_refuses("checkpoint: patch size 3", read_checkpoint, bad_path, "multiple of the patch size");
    free(data);
}

// The PNG writer: the file's chunks and zlib stream decode back to the pixels (stored blocks).
static void test_png(void) {
    int width = 300, height = 250;  // 75,250 raw bytes: two stored blocks
    uint8_t *pixels = (uint8_t *)malloc_check((size_t)width * height);
    for (int i = 0; i < width * height; i++) { pixels[i] = (uint8_t)(i * 7 + i / width); }
    char path[4096];
    join_path(path, sizeof(path), tmp_dir, "test.png");
    png_write_gray(path, pixels, width, height);
    FILE *f = fopen_check(path, "rb");
    long size = file_size(f, path);
    uint8_t *file = (uint8_t *)malloc_check(size);
    fread_check(file, 1, size, f, path);
    fclose(f);
    int ok = size > 8 && memcmp(file, "\x89PNG\r\n\x1a\n", 8) == 0;
    const uint8_t *idat = NULL;
    size_t idat_size = 0;
    for (long at = 8; ok && at + 12 <= size;) {  // every chunk: length, type, data, CRC of type and data
        uint32_t n = (uint32_t)file[at] << 24 | file[at + 1] << 16 | file[at + 2] << 8 | file[at + 3];
        if (at + 12 + (long)n > size) { ok = 0; break; }
        uint32_t crc = png_crc_update(0xFFFFFFFFu, file + at + 4, 4 + n) ^ 0xFFFFFFFFu;
        const uint8_t *c = file + at + 8 + n;
        ok = ok && crc == ((uint32_t)c[0] << 24 | c[1] << 16 | c[2] << 8 | c[3]);
        if (memcmp(file + at + 4, "IDAT", 4) == 0) { idat = file + at + 8, idat_size = n; }
        at += 12 + n;
    }
    size_t raw = 0, pos = 2, mismatches = 0;  // after the zlib header: stored blocks
    for (int last = 0; ok && idat != NULL && !last && pos + 5 <= idat_size;) {
        last = idat[pos] & 1;
        size_t n = idat[pos + 1] | idat[pos + 2] << 8;
        pos += 5;
        for (size_t i = 0; i < n && pos + i < idat_size; i++, raw++) {
            size_t y = raw / (width + 1), x = raw % (width + 1);
            mismatches += idat[pos + i] != (x == 0 ? 0 : pixels[y * width + x - 1]);
        }
        pos += n;
    }
    check(ok && idat != NULL && raw == (size_t)(width + 1) * height && mismatches == 0,
          "png: %dx%d, chunk CRCs right, its stored blocks hold the pixels (%zu bytes, %zu differ)", width,
          height, raw, mismatches);
    free(file);
    free(pixels);
}

// A data set in Fashion-MNIST's layout in dir: its test set reads as `count` labelled 28 x 28 images,
// as many of each class. The generated set of test/make_test_images (TEST_IMAGES) always, the real
// Fashion-MNIST (FASHION_MNIST, default data/fashion-mnist) when it is there.
static void test_idx_set(const char *what, const char *dir, int count) {
    char images_path[4096], labels_path[4096];
    join_path(images_path, sizeof(images_path), dir, "t10k-images-idx3-ubyte");
    join_path(labels_path, sizeof(labels_path), dir, "t10k-labels-idx1-ubyte");
    IdxData images, labels;
    idx_read_dataset(&images, &labels, images_path, labels_path, NUM_CLASSES);
    int per_class[NUM_CLASSES] = {0}, balanced = 1;
    for (int i = 0; i < labels.count; i++) { per_class[labels.data[i]]++; }
    for (int k = 0; k < NUM_CLASSES; k++) { balanced &= per_class[k] == count / NUM_CLASSES; }
    check(images.count == count && images.rows == 28 && images.cols == 28 && balanced,
          "%s: %s holds %d images of %dx%d, %d of each class", what, images_path, images.count, images.rows,
          images.cols, count / NUM_CLASSES);
    free(images.data);
    free(labels.data);
}

static void test_data_sets(void) {
    const char *generated = getenv("TEST_IMAGES");
    if (generated != NULL) { test_idx_set("generated images", generated, 1000); }
    const char *dir = getenv("FASHION_MNIST") ? getenv("FASHION_MNIST") : "data/fashion-mnist";
    char path[4096];
    join_path(path, sizeof(path), dir, "t10k-labels-idx1-ubyte");
    if (access(path, R_OK) == 0) {
        test_idx_set("fashion-mnist", dir, 10000);
    } else {
        printf("skipped: the real Fashion-MNIST's test set: not in %s (scripts/get_fashion_mnist.sh %s)\n", dir, dir);
    }
}

// ----------------------------------------------------------------------------
// eval_dit.c: the Fréchet distance and the classifier

// A random symmetric positive definite n x n matrix M Mᵀ + n·shift·I, in double.
static void random_spd(double *out, int n, double shift, uint64_t *rng) {
    double *m = (double *)malloc_check((size_t)n * n * sizeof(double));
    for (int i = 0; i < n * n; i++) { m[i] = random_normal(rng); }
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) {
            double sum = i == j ? n * shift : 0.0;
            for (int k = 0; k < n; k++) { sum += m[(size_t)i * n + k] * m[(size_t)j * n + k]; }
            out[(size_t)i * n + j] = sum;
        }
    }
    free(m);
}

static void test_frechet(void) {
    uint64_t rng = 7;
    int n = 24;
    size_t nn = (size_t)n * n;
    double *A = (double *)malloc_check(nn * sizeof(double)), *work = (double *)malloc_check(nn * sizeof(double));
    double *V = (double *)malloc_check(nn * sizeof(double)), *B = (double *)malloc_check(nn * sizeof(double));
    double mean1[24], mean2[24];
    // eigenpairs: A v = λ v for every column of V, and V orthonormal
    random_spd(A, n, 0.1, &rng);
    memcpy(work, A, nn * sizeof(double));
    symmetric_eigen(work, V, n);
    double residual = 0.0, orthogonality = 0.0, scale = 0.0;
    for (int k = 0; k < n; k++) {
        scale = fmax(scale, fabs(work[(size_t)k * n + k]));
        for (int i = 0; i < n; i++) {
            double av = 0.0;
            for (int j = 0; j < n; j++) { av += A[(size_t)i * n + j] * V[(size_t)j * n + k]; }
            residual = fmax(residual, fabs(av - work[(size_t)k * n + k] * V[(size_t)i * n + k]));
        }
        for (int l = 0; l < n; l++) {
            double dot = 0.0;
            for (int i = 0; i < n; i++) { dot += V[(size_t)i * n + k] * V[(size_t)i * n + l]; }
            orthogonality = fmax(orthogonality, fabs(dot - (k == l)));
        }
    }
    check(residual <= 1e-10 * scale && orthogonality <= 1e-12,
          "symmetric_eigen: |A v - λ v| %.1e (of λ up to %.1f), |VᵀV - I| %.1e", residual, scale, orthogonality);
    // the distance of a Gaussian to itself is 0; to a shifted copy, the squared shift
    for (int i = 0; i < n; i++) {
        mean1[i] = random_normal(&rng);
        mean2[i] = mean1[i] + (i == 3 ? 0.5 : 0.0);
    }
    double self = frechet_distance(mean1, A, mean1, A, n), shifted = frechet_distance(mean1, A, mean2, A, n);
    check(fabs(self) <= 1e-9 * scale * n && fabs(shifted - 0.25) <= 1e-9 * scale * n,
          "frechet_distance: to itself %.1e, to itself shifted by 0.5 %.12f (0.25)", self, shifted);
    // diagonal covariances: Σ (√a − √b)², also after the same rotation of both
    memset(work, 0, nn * sizeof(double));
    memset(B, 0, nn * sizeof(double));
    double expected = 0.0;
    for (int i = 0; i < n; i++) {
        double a = 0.5 + i, b = 3.0 + 0.25 * i;
        work[(size_t)i * n + i] = a;
        B[(size_t)i * n + i] = b;
        expected += (sqrt(a) - sqrt(b)) * (sqrt(a) - sqrt(b)) + (mean1[i] - mean2[i]) * (mean1[i] - mean2[i]);
    }
    double diagonal = frechet_distance(mean1, work, mean2, B, n);
    // V is orthogonal: V D Vᵀ
    double *rot1 = (double *)calloc_check(nn, sizeof(double)), *rot2 = (double *)calloc_check(nn, sizeof(double));
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) {
            for (int k = 0; k < n; k++) {
                rot1[(size_t)i * n + j] += V[(size_t)i * n + k] * work[(size_t)k * n + k] * V[(size_t)j * n + k];
                rot2[(size_t)i * n + j] += V[(size_t)i * n + k] * B[(size_t)k * n + k] * V[(size_t)j * n + k];
            }
        }
    }
    double rotated = frechet_distance(mean1, rot1, mean2, rot2, n);
    check(fabs(diagonal - expected) <= 1e-10 * expected && fabs(rotated - expected) <= 1e-9 * expected,
          "frechet_distance: diagonal covariances %.12f, rotated %.12f (expected %.12f)", diagonal, rotated,
          expected);
    // 2 x 2 covariances that do not commute: tr √(Σ1 Σ2) = √(tr Σ1Σ2 + 2 √(det Σ1 det Σ2))
    double worst = 0.0;
    for (int trial = 0; trial < 20; trial++) {
        double s1[4], s2[4], zero[2] = {0.0, 0.0};
        random_spd(s1, 2, 0.01, &rng);
        random_spd(s2, 2, 0.01, &rng);
        double tr12 = s1[0] * s2[0] + s1[1] * s2[2] + s1[2] * s2[1] + s1[3] * s2[3];
        double det = (s1[0] * s1[3] - s1[1] * s1[2]) * (s2[0] * s2[3] - s2[1] * s2[2]);
        double want = s1[0] + s1[3] + s2[0] + s2[3] - 2.0 * sqrt(tr12 + 2.0 * sqrt(det));
        double got = frechet_distance(zero, s1, zero, s2, 2);
        worst = fmax(worst, fabs(got - want) / (s1[0] + s1[3] + s2[0] + s2[3]));
    }
    check(worst <= 1e-12, "frechet_distance: 20 pairs of 2x2 covariances, the closed form to %.1e", worst);
    // the moments of accumulated features are the two-pass mean and covariance
    FeatureStats s;
    stats_init(&s, 3);
    float features[30];
    for (int i = 0; i < 30; i++) { features[i] = (float)random_normal(&rng) + (i % 3); }
    stats_add(&s, features, 4);
    stats_add(&s, features + 12, 6);
    double m[3], c[9], error = 0.0;
    stats_moments(&s, m, c);
    for (int i = 0; i < 3; i++) {
        double direct = 0.0;
        for (int b = 0; b < 10; b++) { direct += features[b * 3 + i] / 10.0; }
        error = fmax(error, fabs(m[i] - direct));
        for (int j = 0; j < 3; j++) {
            double cov = 0.0, mj = 0.0;
            for (int b = 0; b < 10; b++) { mj += features[b * 3 + j] / 10.0; }
            for (int b = 0; b < 10; b++) { cov += (features[b * 3 + i] - direct) * (features[b * 3 + j] - mj) / 9.0; }
            error = fmax(error, fabs(c[i * 3 + j] - cov));
        }
    }
    check(error <= 1e-12, "stats_moments: mean and covariance of 10 features in two calls, to %.1e", error);
    stats_free(&s);
    free(A);
    free(work);
    free(V);
    free(B);
    free(rot1);
    free(rot2);
}

// The classifier's mean cross-entropy on a batch.
static double classifier_loss(Classifier *cl, const float *images, const int *classes, int B) {
    float scores[4 * NUM_CLASSES], features[4 * 64], losses[4], lse[4];
    classifier_forward(cl, images, B, scores, features);
    crossentropy_forward(losses, lse, scores, classes, B, NUM_CLASSES);
    double sum = 0.0;
    for (int b = 0; b < B; b++) { sum += losses[b] / B; }
    return sum;
}

// The classifier's backward pass is the DiT's (checked against the reference above) from another
// output gradient: its gradient of each parameter tensor is checked against central differences of
// the loss along that gradient, d/dε L(θ + ε g/|g|) = |g|; the patch embedding's gradient has
// crossed every block. The features are the mean of the final activations over the patches.
static void test_classifier(void) {
    DitConfig dconfig = {28, 4, NUM_CLASSES};
    ModelConfig config = dit_trunk_config(&dconfig, 2, 2, 16, 1, 32);
    RouterConfig router = {.routing = ROUTING_TOPK, .k = 1, .renorm = 1, .theta_init = 1.0f};
    Classifier cl = {0};
    dit_init(&cl.net, &dconfig, &config, &router, 11);
    Dit *net = &cl.net;
    uint64_t rng = 3;
    for (size_t i = 0; i < net->num_parameters; i++) {  // away from adaLN-Zero's zeros, so every tensor matters
        if (net->params_memory[i] == 0.0f) { net->params_memory[i] = 0.5f * (float)random_normal(&rng); }
    }
    int B = 4, D = 28 * 28, classes[4] = {0, 3, 7, 9};
    float *images = (float *)malloc_check((size_t)B * D * sizeof(float));
    for (int i = 0; i < B * D; i++) { images[i] = 2.0f * random_f32(&rng) - 1.0f; }
    float scores[4 * NUM_CLASSES], dscores[4 * NUM_CLASSES], features[4 * 16], losses[4], lse[4];
    classifier_forward(&cl, images, B, scores, features);
    crossentropy_forward(losses, lse, scores, classes, B, NUM_CLASSES);
    crossentropy_backward(dscores, scores, lse, classes, B, NUM_CLASSES, 1.0f / B);
    dit_zero_grad(net);
    classifier_backward(&cl, dscores, B);
    float *grads = (float *)malloc_check(net->num_parameters * sizeof(float));
    float *saved = (float *)malloc_check(net->num_parameters * sizeof(float));
    memcpy(grads, net->grads_memory, net->num_parameters * sizeof(float));
    memcpy(saved, net->params_memory, net->num_parameters * sizeof(float));
    double worst = 0.0;
    int tested = 0;
    size_t offset = 0;
    for (int i = 0; i < DIT_NUM_TENSORS; offset += net->sizes[i], i++) {
        double norm = 0.0;
        for (size_t j = 0; j < net->sizes[i]; j++) { norm += (double)grads[offset + j] * grads[offset + j]; }
        norm = sqrt(norm);
        double eps = 1e-2, loss[2];
        // float32 resolves the loss to about 1e-7: tensors whose step changes it by less than 1e-4
        // (the one expert's router and DRN scale have no gradient at all) are left out
        if (eps * norm < 1e-4) { continue; }
        for (int side = 0; side < 2; side++) {
            for (size_t j = 0; j < net->sizes[i]; j++) {
                net->params_memory[offset + j] = saved[offset + j] + (side ? -1 : 1) * eps * grads[offset + j] / norm;
            }
            loss[side] = classifier_loss(&cl, images, classes, B);
        }
        memcpy(net->params_memory + offset, saved + offset, net->sizes[i] * sizeof(float));
        worst = fmax(worst, fabs((loss[0] - loss[1]) / (2 * eps) - norm) / norm);
        tested++;
    }
    check(tested >= 7 && worst <= 1e-3,
          "classifier: the gradient of %d tensors against central differences, worst relative error %.1e", tested,
          worst);
    classifier_forward(&cl, images, B, scores, features);
    const float *final = net->acts.lnf_mod;  // (B, T, C)
    double mean = 0.0;
    for (int n = 0; n < 49; n++) { mean += final[(size_t)(49 + n) * 16 + 5] / 49.0; }
    check(fabs(features[16 + 5] - mean) <= 1e-6, "classifier: a feature is the mean over the patches (%.7f, %.7f)",
          features[16 + 5], mean);
    free(images);
    free(grads);
    free(saved);
    classifier_free(&cl);
}

// ----------------------------------------------------------------------------

int main(int argc, char **argv) {
    glob_t found = {0};
    int count = argc - 1;
    char **paths = argv + 1;
    if (count == 0) {
        if (glob("test/fixtures/dit/*_ref.bin", 0, NULL, &found) != 0 || found.gl_pathc == 0) {
            fail("no fixtures in test/fixtures/dit (run from the repository root, or `make reference`)");
        }
        count = (int)found.gl_pathc;
        paths = found.gl_pathv;
    }
    snprintf(tmp_dir, sizeof(tmp_dir), "/tmp/test_dit_XXXXXX");
    if (mkdtemp(tmp_dir) == NULL) { fail("cannot create a temporary directory"); }
    char first_model[4096] = "";
    for (int i = 0; i < count; i++) {
        char model_path[4096], name[256];
        snprintf(model_path, sizeof(model_path), "%s", paths[i]);
        char *suffix = strstr(model_path, "_ref.bin");
        if (suffix == NULL || suffix[8] != '\0') {
            fail("%s: a fixture's name must end in _ref.bin", paths[i]);
        }
        strcpy(suffix, "_model.bin");
        const char *base = strrchr(paths[i], '/');
        snprintf(name, sizeof(name), "%s", base ? base + 1 : paths[i]);
        name[strlen(name) - strlen("_ref.bin")] = '\0';
        Dit d;
        DitReference ref;
        dit_load(&d, model_path);
        reference_load(&ref, paths[i], &d);
        const RouterConfig *rc = &d.trunk.router;
        printf("--- %s: %s, DRN %s; B=%d L=%d C=%d E=%d\n", name, routing_names[rc->routing],
               rc->drn ? "on" : "off", ref.B, d.trunk.config.num_layers, d.trunk.config.channels,
               d.trunk.config.num_experts);
        Batch batch = batch_of(&ref, &d);
        test_forward_backward(name, &d, &ref, batch);
        dit_free(&d);
        dit_load(&d, model_path);
        test_sampler(name, &d, &ref);
        dit_free(&d);
        dit_load(&d, model_path);
        test_trajectory(name, &d, &ref, batch);
        dit_free(&d);
        test_threads(name, model_path, &ref, batch);
        free(batch.xt);
        free(batch.target);
        free(ref.memory);
        if (i == 0) { snprintf(first_model, sizeof(first_model), "%s", model_path); }
    }
    globfree(&found);
    printf("--- files\n");
    test_round_trip(first_model, tmp_dir);
    test_bad_files(first_model);
    test_png();
    test_data_sets();
    printf("--- eval_dit\n");
    test_frechet();
    test_classifier();
    char cmd[4200];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmp_dir);
    if (system(cmd) != 0) { fprintf(stderr, "warning: could not remove %s\n", tmp_dir); }
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
