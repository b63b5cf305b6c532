/*
test_gpt.c: checks the model against reference activations and gradients computed in float64
by an independent PyTorch implementation (reference/), for every routing mode.

For each fixture pair test/fixtures/NAME_model.bin (the starting checkpoint) and NAME_ref.bin
(what the reference computed from it, doc/formats.md) it checks: the logits and loss terms, the
routing decisions (identical) and gates, the gradient of every parameter tensor, and a trajectory
of training steps with controller updates (loss, a_t and p at every step). Then it checks that the
results do not depend on the number of threads, and that damaged files are refused. The CPU build
also runs every fixture with --precision bf16 (test_bf16: tolerances derived there, routing
decisions against float32, threads).

Built against train_dtopp.c by default, or against the CUDA twin with -DTEST_CUDA.

usage: test_gpt [NAME_ref.bin ...]   (default: every fixture in test/fixtures)
*/
#define TESTING
#ifdef TEST_CUDA
#include "train_dtopp.cu"
#else
#include "train_dtopp.c"
#endif
#include <glob.h>

#include "test/check.h"
#include <sys/wait.h>

// Tolerances: relative L2 error per tensor, absolute error per step.
#define TOL_TENSOR 1e-4
#define TOL_STEP_LOSS 1e-4
#define TOL_P 1e-5


static void report(int ok, const char *fixture, const char *what, double error, double tol) {
    printf("%-4s %-12s %-22s error %.3e (tolerance %.0e)\n", ok ? "ok" : "FAIL", fixture, what, error, tol);
    if (ok) { passed++; } else { failed++; }
}

static void check_tensor(const char *fixture, const char *what, const float *got, const float *want,
                         size_t n) {
    double error = relative_error(got, want, n);
    report(error <= TOL_TENSOR, fixture, what, error, TOL_TENSOR);
}

// ----------------------------------------------------------------------------
// the reference fixture file (doc/formats.md)

#define FIXTURE_VERSION 1

typedef struct {
    int B, T, V, L, E, n_steps, warmup;
    size_t num_params;
    float lr, weight_decay;
    int *inputs, *targets;  // (N)
    float *logits;          // (N, V)
    float *losses;          // (2 + 2L)
    int *n_selected;        // (L, N)
    int *selected;          // (L, N, E)
    float *gates;           // (L, N, E)
    float *grads;           // (num_params)
    float *trajectory;      // (n_steps, 2 + L)
    void *memory;
} Reference;

static void reference_load(Reference *ref, const char *path, const Model *model) {
    int32_t header[HEADER_WORDS];
    long size;
    static const int versions[] = {FIXTURE_VERSION};
    FILE *f = open_with_header(path, header, FIXTURE_MAGIC, versions, 1, "reference fixture", &size);
    int num_params;
    const HeaderField fields[] = {{2, 4, &ref->B},       {3, 4, &ref->T},
                                  {4, 4, &ref->V},       {5, 4, &ref->L},
                                  {6, 4, &ref->E},       {7, 4, &num_params},
                                  {8, 4, &ref->n_steps}, {9, 4, &ref->warmup},
                                  {32, 4, &ref->lr},     {33, 4, &ref->weight_decay}};
    header_unpack(header, fields, (int)(sizeof(fields) / sizeof(fields[0])));
    ref->num_params = (size_t)num_params;
    const ModelConfig *c = &model->config;
    if (ref->V != c->vocab_size || ref->L != c->num_layers || ref->E != c->num_experts ||
        ref->num_params != model->num_parameters) {
        fail("%s does not belong to its model (V %d/%d, L %d/%d, E %d/%d, params %zu/%zu)", path, ref->V,
             c->vocab_size, ref->L, c->num_layers, ref->E, c->num_experts, ref->num_params,
             model->num_parameters);
    }
    if (ref->B < 1 || ref->T < 1 || ref->T > c->max_seq_len || ref->n_steps < 0 || ref->warmup < 1) {
        fail("%s: bad batch or trajectory fields (B %d, T %d, steps %d, warm-up %d)", path, ref->B, ref->T,
             ref->n_steps, ref->warmup);
    }
    size_t N = (size_t)ref->B * ref->T, L = ref->L, E = ref->E;
    size_t counts[] = {N,
                       N,
                       N * ref->V,
                       2 + 2 * L,
                       L * N,
                       L * N * E,
                       L * N * E,
                       ref->num_params,
                       (size_t)ref->n_steps * (2 + L)};
    size_t total = 0;
    for (size_t i = 0; i < sizeof(counts) / sizeof(counts[0]); i++) { total += counts[i]; }
    check_payload_size(path, size, total * 4);
    char *p = (char *)malloc_check(total * 4);
    ref->memory = p;
    fread_check(p, 4, total, f, path);
    fclose(f);
    void **ptrs[] = {(void **)&ref->inputs, (void **)&ref->targets,    (void **)&ref->logits,
                     (void **)&ref->losses, (void **)&ref->n_selected, (void **)&ref->selected,
                     (void **)&ref->gates,  (void **)&ref->grads,      (void **)&ref->trajectory};
    for (size_t i = 0; i < sizeof(counts) / sizeof(counts[0]); i++) {
        *ptrs[i] = p;
        p += counts[i] * 4;
    }
    for (size_t n = 0; n < 2 * N; n++) {
        int id = ref->inputs[n];  // inputs and targets are contiguous
        if (id < 0 || id >= ref->V) { fail("%s: token id %d at %zu is outside the vocabulary", path, id, n); }
    }
}

// ----------------------------------------------------------------------------
// the checks

static const char *param_names[NUM_PARAMETER_TENSORS] = {"wte",   "g1", "wqkv", "wo", "g2", "wr",
                                                         "theta", "w1", "w3",   "w2", "gf"};

static void test_forward_backward(const char *name, Model *model, const Reference *ref) {
    int N = ref->B * ref->T, L = ref->L, E = ref->E;
    model_forward(model, ref->inputs, ref->targets, ref->B, ref->T);

    float *logits = (float *)malloc_check((size_t)N * ref->V * sizeof(float));
    model_get_logits(model, logits);
    check_tensor(name, "logits", logits, ref->logits, (size_t)N * ref->V);
    free(logits);

    int n_losses = num_losses(&model->config);
    float *losses = (float *)malloc_check(n_losses * sizeof(float));
    model_get_losses(model, losses);
    const char *loss_names[] = {"loss total", "loss CE"};
    for (int i = 0; i < n_losses; i++) {
        char what[64];
        if (i < 2) { snprintf(what, sizeof(what), "%s", loss_names[i]); }
        else { snprintf(what, sizeof(what), "%s layer %d", i < 2 + L ? "loss LB" : "loss H", (i - 2) % L); }
        check_tensor(name, what, &losses[i], &ref->losses[i], 1);
    }
    free(losses);

    int *n_selected = (int *)malloc_check((size_t)L * N * sizeof(int));
    int *selected = (int *)malloc_check((size_t)L * N * E * sizeof(int));
    float *gates = (float *)malloc_check((size_t)L * N * E * sizeof(float));
    model_get_routing(model, n_selected, selected, gates);
    size_t mismatches = 0;
    int min_selected = E, max_selected = 0;
    for (size_t i = 0; i < (size_t)L * N; i++) {
        mismatches += n_selected[i] != ref->n_selected[i];
        min_selected = n_selected[i] < min_selected ? n_selected[i] : min_selected;
        max_selected = n_selected[i] > max_selected ? n_selected[i] : max_selected;
    }
    for (size_t i = 0; i < (size_t)L * N * E; i++) { mismatches += selected[i] != ref->selected[i]; }
    char what[64];
    snprintf(what, sizeof(what), "routing (|S| %d..%d)", min_selected, max_selected);
    printf("%-4s %-12s %-22s %zu of %zu decisions differ\n", mismatches == 0 ? "ok" : "FAIL", name, what,
           mismatches, (size_t)L * N * (E + 1));
    if (mismatches == 0) { passed++; } else { failed++; }
    check_tensor(name, "gates", gates, ref->gates, (size_t)L * N * E);
    free(n_selected);
    free(selected);
    free(gates);

    model_zero_grad(model);
    model_backward(model);
    float *grads = (float *)malloc_check(model->num_parameters * sizeof(float));
    model_get_grads(model, grads);
    size_t offset = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        snprintf(what, sizeof(what), "grad %s", param_names[k]);
        check_tensor(name, what, grads + offset, ref->grads + offset, model->param_sizes[k]);
        offset += model->param_sizes[k];
    }
    free(grads);
}

static void train_step(Model *model, const Reference *ref, int step) {
    model_forward(model, ref->inputs, ref->targets, ref->B, ref->T);
    model_zero_grad(model);
    model_backward(model);
    model_update(model, learning_rate(step, ref->n_steps, ref->warmup, ref->lr), ref->weight_decay);
    controller_update(model);
}

static void test_trajectory(const char *name, Model *model, const Reference *ref) {
    int L = ref->L;
    double worst_loss = 0.0, worst_a = 0.0, worst_p = 0.0;
    for (int s = 0; s < ref->n_steps; s++) {
        train_step(model, ref, s);
        const float *want = ref->trajectory + (size_t)s * (2 + L);
        worst_loss = fmax(worst_loss, fabs(model->loss - want[0]));
        worst_a = fmax(worst_a, fabs(model_activated(model) - want[1]));
        for (int l = 0; l < L; l++) { worst_p = fmax(worst_p, fabs(model->threshold[l] - want[2 + l])); }
        if (isnan(model->loss)) { worst_loss = INFINITY; }
    }
    char what[64];
    snprintf(what, sizeof(what), "%d steps: loss", ref->n_steps);
    report(worst_loss <= TOL_STEP_LOSS, name, what, worst_loss, TOL_STEP_LOSS);
    snprintf(what, sizeof(what), "%d steps: a_t", ref->n_steps);
    report(worst_a <= 1e-6, name, what, worst_a, 1e-6);
    snprintf(what, sizeof(what), "%d steps: p", ref->n_steps);
    report(worst_p <= TOL_P, name, what, worst_p, TOL_P);
}

// Two training steps with 1 thread and with 2 threads must give bitwise identical results.
static void test_threads(const char *name, const char *model_path, const Reference *ref, Precision precision) {
    float *results[2];
    size_t count = 0;
    for (int run = 0; run < 2; run++) {
        set_num_threads(run + 1);
        Model model;
        model_load(&model, model_path);
        model.precision = precision;
        size_t N = (size_t)ref->B * ref->T;
        count = model.num_parameters * 2 + N * ref->V;
        float *out = results[run] = (float *)malloc_check(count * sizeof(float));
        train_step(&model, ref, 0);
        train_step(&model, ref, 1);  // a second forward/backward after one update
        model_get_grads(&model, out);
        model_get_params(&model, out + model.num_parameters);
        model_get_logits(&model, out + 2 * model.num_parameters);
        model_free(&model);
    }
    set_num_threads(0);
    int same = memcmp(results[0], results[1], count * sizeof(float)) == 0;
    const char *what = precision == BF16 ? "bf16 1 vs 2 threads" : "1 vs 2 threads";
    printf("%-4s %-12s %-22s %s\n", same ? "ok" : "FAIL", name, what,
           same ? "bitwise identical" : "results differ");
    if (same) { passed++; } else { failed++; }
    free(results[0]);
    free(results[1]);
}

#ifndef TEST_CUDA
// --precision bf16 against the float64 reference. The tolerances follow from bf16's unit roundoff
// u = 2^-8 (round to nearest even, 8 significant bits): a product whose two operands are rounded
// is off by at most ε = 2u + u² of the sum of its terms' magnitudes (the float32 sums add about
// 2^-24 per term, negligible here). Along the forward path a token meets 5 such products per
// layer (qkv, attention's P · v, attention output, the experts' W1/W3 and their W2) and the LM
// head; and attention's q · k, which moves each score by at most ε·a_l, a_l the largest
// Σ_i |q_i k_i| / sqrt(hd) of layer l's queries and the keys they see, so each probability by a
// factor within e^(±2ε·a_l): ρ_l = e^(2ε·a_l) − 1 relative, ρ_l / ε levels. P = Σ_l (5 + ρ_l / ε) + 1
// in all; with normalised layers each passing a relative error on at most unchanged, the logits
// are off by at most P·ε relative. The backward runs the same P levels again with rounded
// gradients, so gradients get twice that. The bound assumes the same routing as float32: a token
// whose threshold comparison flips takes another expert, so the test first counts the identical
// routing decisions (token, layer, expert) against float32, which matches the reference exactly,
// and requires at least 99% of them. And the logits must be further from the reference than
// float32's tolerance: otherwise the products were not rounded and the test proves nothing.
#define BF16_UNIT_ROUNDOFF (1.0 / 256.0)
#define MIN_IDENTICAL_DECISIONS 0.99

static void check_bf16_tensor(const char *fixture, const char *what, const float *got, const float *want,
                              size_t n, double tol) {
    double error = relative_error(got, want, n);
    report(error <= tol, fixture, what, error, tol);
}

// a_l above: the largest Σ_i |q_i k_i| / sqrt(hd) over the heads, queries and the keys they see
// (causal) of one layer's qkv (N, 3C), RoPE applied.
static double largest_score_magnitude(const float *qkv, int B, int T, int C, int NH) {
    int hd = C / NH;
    double largest = 0.0;
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * 3 * C + h * hd;
                for (int j = 0; j <= t; j++) {
                    const float *k = qkv + ((size_t)b * T + j) * 3 * C + C + h * hd;
                    double magnitude = 0.0;
                    for (int i = 0; i < hd; i++) { magnitude += fabs((double)q[i] * k[i]); }
                    largest = magnitude > largest ? magnitude : largest;
                }
            }
        }
    }
    return largest / sqrt((double)hd);
}

static void test_bf16(const char *name, const char *model_path, const Reference *ref) {
    int N = ref->B * ref->T, L = ref->L, E = ref->E;
    double per_product = 2.0 * BF16_UNIT_ROUNDOFF + BF16_UNIT_ROUNDOFF * BF16_UNIT_ROUNDOFF;
    Model model;
    model_load(&model, model_path);
    model.precision = BF16;
    model_forward(&model, ref->inputs, ref->targets, ref->B, ref->T);
    const ModelConfig *c = &model.config;
    double levels = 1.0;
    for (int l = 0; l < L; l++) {
        const float *qkv = model.ws->acts.acts.qkv + (size_t)l * N * 3 * c->channels;
        double a = largest_score_magnitude(qkv, ref->B, ref->T, c->channels, c->num_heads);
        levels += 5.0 + expm1(2.0 * per_product * a) / per_product;
    }
    double tol_forward = levels * per_product, tol_backward = 2.0 * tol_forward;
    float *logits = (float *)malloc_check((size_t)N * ref->V * sizeof(float));
    model_get_logits(&model, logits);
    check_bf16_tensor(name, "bf16 logits", logits, ref->logits, (size_t)N * ref->V, tol_forward);
    double error = relative_error(logits, ref->logits, (size_t)N * ref->V);
    printf("%-4s %-12s %-22s error %.3e (float32's tolerance %.0e)\n", error > TOL_TENSOR ? "ok" : "FAIL", name,
           "bf16 products rounded", error, TOL_TENSOR);
    if (error > TOL_TENSOR) { passed++; } else { failed++; }
    free(logits);
    float *losses = (float *)malloc_check(num_losses(&model.config) * sizeof(float));
    model_get_losses(&model, losses);  // the total loss, then cross-entropy, then the auxiliary terms
    check_bf16_tensor(name, "bf16 loss CE", &losses[1], &ref->losses[1], 1, tol_forward);
    free(losses);

    int *n_selected = (int *)malloc_check((size_t)L * N * sizeof(int));
    int *selected = (int *)malloc_check((size_t)L * N * E * sizeof(int));
    float *gates = (float *)malloc_check((size_t)L * N * E * sizeof(float));
    model_get_routing(&model, n_selected, selected, gates);
    size_t same = 0, decisions = (size_t)L * N * E;
    for (size_t i = 0; i < decisions; i++) { same += selected[i] == ref->selected[i]; }
    double fraction = (double)same / decisions;
    int ok = fraction >= MIN_IDENTICAL_DECISIONS;
    printf("%-4s %-12s %-22s %.4f identical to float32 (%zu of %zu; at least %.2f)\n", ok ? "ok" : "FAIL",
           name, "bf16 routing", fraction, same, decisions, MIN_IDENTICAL_DECISIONS);
    if (ok) { passed++; } else { failed++; }
    free(n_selected);
    free(selected);
    free(gates);

    model_zero_grad(&model);
    model_backward(&model);
    float *grads = (float *)malloc_check(model.num_parameters * sizeof(float));
    model_get_grads(&model, grads);
    size_t offset = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        char what[64];
        snprintf(what, sizeof(what), "bf16 grad %s", param_names[k]);
        check_bf16_tensor(name, what, grads + offset, ref->grads + offset, model.param_sizes[k], tol_backward);
        offset += model.param_sizes[k];
    }
    free(grads);
    model_free(&model);
}
#endif

// ----------------------------------------------------------------------------
// damaged files: a child process loads the file; it must exit non-zero with a message that names
// the file and the problem.

static void expect_refusal(const char *what, const char *path, const char *model_path, const char *expected) {
    int pipefd[2];
    if (pipe(pipefd) != 0) { fail("pipe failed"); }
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pipefd[1], STDERR_FILENO);
        close(pipefd[0]);
        // only the files: a child forked after the parent used a GPU cannot use it
        Model model;
        if (model_path == NULL) {
            free(checkpoint_load(&model, path));
        } else {
            Reference ref;
            free(checkpoint_load(&model, model_path));
            reference_load(&ref, path, &model);
        }
        _exit(0);
    }
    close(pipefd[1]);
    char message[1024] = {0};
    size_t len = 0;
    ssize_t got;
    while (len < sizeof(message) - 1 &&
           (got = read(pipefd[0], message + len, sizeof(message) - 1 - len)) > 0) {
        len += got;
    }
    close(pipefd[0]);
    int status;
    waitpid(pid, &status, 0);
    int ok =
        WIFEXITED(status) && WEXITSTATUS(status) != 0 && strstr(message, path) && strstr(message, expected);
    message[strcspn(message, "\n")] = 0;
    printf("%-4s %-12s %-22s %s\n", ok ? "ok" : "FAIL", "bad files", what,
           message[0] ? message : "(no message)");
    if (ok) { passed++; } else { failed++; }
}

// Writes a copy of src to dst with word `word` of the header replaced (word < 0: unchanged) and
// `drop` bytes cut from the end.
static void damaged_copy(const char *src, const char *dst, int word, int32_t value, long drop) {
    FILE *f = fopen_check(src, "rb");
    long size = file_size(f, src);
    char *data = (char *)malloc_check(size);
    fread_check(data, 1, size, f, src);
    fclose(f);
    if (word >= 0) { memcpy(data + 4 * word, &value, 4); }
    FILE *g = fopen_check(dst, "wb");
    fwrite_check(data, 1, size - drop, g, dst);
    fclose(g);
    free(data);
}

static void test_bad_files(const char *model_path, const char *ref_path) {
    char dir[] = "/tmp/test_gpt_XXXXXX";
    if (mkdtemp(dir) == NULL) { fail("cannot create a temporary directory"); }
    char path[4096];
    snprintf(path, sizeof(path), "%s/missing.bin", dir);
    expect_refusal("missing model", path, NULL, "cannot open");
    snprintf(path, sizeof(path), "%s/magic.bin", dir);
    damaged_copy(model_path, path, 0, 12345, 0);
    expect_refusal("model: wrong magic", path, NULL, "magic");
    snprintf(path, sizeof(path), "%s/version.bin", dir);
    damaged_copy(model_path, path, 1, 99, 0);
    expect_refusal("model: wrong version", path, NULL, "version");
    snprintf(path, sizeof(path), "%s/truncated.bin", dir);
    damaged_copy(model_path, path, -1, 0, 4);
    expect_refusal("model: truncated", path, NULL, "truncated");
    snprintf(path, sizeof(path), "%s/experts.bin", dir);
    damaged_copy(model_path, path, 8, 0, 0);
    expect_refusal("model: zero experts", path, NULL, "positive");
    snprintf(path, sizeof(path), "%s/ref_magic.bin", dir);
    damaged_copy(ref_path, path, 0, 20240520, 0);
    expect_refusal("fixture: wrong magic", path, model_path, "magic");
    snprintf(path, sizeof(path), "%s/ref_version.bin", dir);
    damaged_copy(ref_path, path, 1, 2, 0);
    expect_refusal("fixture: wrong version", path, model_path, "version");
    snprintf(path, sizeof(path), "%s/ref_truncated.bin", dir);
    damaged_copy(ref_path, path, -1, 0, 400);
    expect_refusal("fixture: truncated", path, model_path, "truncated");
    char cmd[4200];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0) { fprintf(stderr, "warning: could not remove %s\n", dir); }
}

// ----------------------------------------------------------------------------

static void model_path_for(char *out, size_t size, const char *ref_path) {
    snprintf(out, size, "%s", ref_path);
    char *suffix = strstr(out, "_ref.bin");
    if (suffix == NULL || suffix[8] != '\0') { fail("%s: a fixture's name must end in _ref.bin", ref_path); }
    strcpy(suffix, "_model.bin");
}

static void fixture_name(char *out, size_t size, const char *ref_path) {
    const char *base = strrchr(ref_path, '/');
    snprintf(out, size, "%s", base ? base + 1 : ref_path);
    out[strlen(out) - strlen("_ref.bin")] = '\0';
}

int main(int argc, char **argv) {
    glob_t found = {0};
    int count = argc - 1;
    char **paths = argv + 1;
    if (count == 0) {
        if (glob("test/fixtures/*_ref.bin", 0, NULL, &found) != 0 || found.gl_pathc == 0) {
            fail("no fixtures found in test/fixtures (run from the repository root, or `make reference`)");
        }
        count = (int)found.gl_pathc;
        paths = found.gl_pathv;
    }
    for (int i = 0; i < count; i++) {
        char model_path[4096], name[256];
        model_path_for(model_path, sizeof(model_path), paths[i]);
        fixture_name(name, sizeof(name), paths[i]);
        Model model;
        Reference ref;
        model_load(&model, model_path);
        reference_load(&ref, paths[i], &model);
        printf("--- %s: %s, %s controller, DRN %s, %s gates; B=%d T=%d V=%d L=%d E=%d\n", name,
               routing_names[model.router.routing], model.router.controller ? "layer" : "global",
               model.router.drn ? "on" : "off", model.router.renorm ? "renormalised" : "raw", ref.B, ref.T,
               ref.V, ref.L, ref.E);
        test_forward_backward(name, &model, &ref);
        model_free(&model);
        model_load(&model, model_path);
        test_trajectory(name, &model, &ref);
        model_free(&model);
        test_threads(name, model_path, &ref, FLOAT32);
#ifndef TEST_CUDA
        test_bf16(name, model_path, &ref);
        test_threads(name, model_path, &ref, BF16);
#endif
        if (i == 0) { test_bad_files(model_path, paths[i]); }
        free(ref.memory);
    }
    globfree(&found);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
