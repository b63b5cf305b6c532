/*
dit/eval_dit.c: measures trained diffusion transformers (dit/train_dit.c) on Fashion-MNIST (doc/dit.md).

  eval_dit classifier --out FILE
      trains the classifier in whose features sample quality is measured, on the training set,
      and reports its accuracy on the test set
  eval_dit quality --model FILE --classifier FILE
      samples from a DiT (--samples-per-class of every class), then measures the samples: the
      Fréchet distance between the classifier's features of the samples and of the test set, and
      the share of samples the classifier recognises as the class they were asked for
  eval_dit routing --model FILE --out FILE.csv
      the activated experts of every patch token of test images at ten noise levels, summed by
      layer, time, class, patch position and region (garment or background)
  eval_dit explain --model FILE --out PAGE.html
      a page that shows it: test images at ten noise levels, their patches shaded by experts
      (dit/explain_dit.h)

Why these measures. The Fréchet distance between two sets of features, each summarised by its
mean and covariance (FID, Heusel et al. 2017), falls when samples look like the data and when they
are as varied as the data: it sees both blurred samples and a model that draws one good garment
per class. FID takes its features from an Inception network trained on ImageNet; for 28 x 28
clothing the natural extractor is a classifier of this data set, trained here by the same C core.
The class accuracy asks what the distance cannot: whether a sample is the class it was asked for.

The classifier is a small network of train_dit.c read at t = 0 with the null class, so that it
sees a clean image and no label, with one expert per layer: a dense network, whose features do not
depend on any routing. Its features are its final normalised, modulated activations averaged over
the patches (C values per image), and its class scores a linear map of those: since the DiT's
final layer is linear, that map is the final layer itself averaged over the patches, and the class
scores are the first K of the P² values it gives. So the classifier needs no new parameters; it is
saved as a DiT checkpoint, and its gradient enters the network where the DiT's does.
*/
#ifndef DIT_NO_MAIN
#define DIT_NO_MAIN
#endif
#include "train_dit.c"  // defines: Dit, dit_* (and through it train_dtopp.c, stats.h, idx.h), Batches

// ----------------------------------------------------------------------------
// the classifier

typedef struct {
    Dit net;
    int capacity;       // images that times and no_label have room for
    float *times;       // (capacity) zeros: the clean image
    int *no_label;      // (capacity) the null class; the DiT's backward pass reads it again
} Classifier;

// Class scores (B, K) and features (B, C) of clean images (B, S, S) in [-1, 1].
void classifier_forward(Classifier *cl, const float *images, int B, float *scores, float *features) {
    Dit *net = &cl->net;
    const ModelConfig *c = &net->trunk.config;
    int T = c->max_seq_len, C = c->channels, PP = patch_values(&net->config), K = net->config.num_classes;
    if (B > cl->capacity) {
        free(cl->times);
        free(cl->no_label);
        cl->times = (float *)calloc_check(B, sizeof(float));
        cl->no_label = (int *)calloc_check(B, sizeof(int));
        for (int b = 0; b < B; b++) { cl->no_label[b] = K; }
        cl->capacity = B;
    }
    dit_forward(net, images, cl->times, cl->no_label, NULL, B);
    const float *out = net->trunk.ws->acts.acts.logits;  // (B, T, P²)
    for (int b = 0; b < B; b++) {
        for (int k = 0; k < K; k++) {
            double sum = 0.0;
            for (int n = 0; n < T; n++) { sum += out[((size_t)b * T + n) * PP + k]; }
            scores[(size_t)b * K + k] = (float)(sum / T);
        }
        for (int i = 0; i < C; i++) {
            double sum = 0.0;
            for (int n = 0; n < T; n++) { sum += net->acts.lnf_mod[((size_t)b * T + n) * C + i]; }
            features[(size_t)b * C + i] = (float)(sum / T);
        }
    }
}

void classifier_free(Classifier *cl) {
    dit_free(&cl->net);
    free(cl->times);
    free(cl->no_label);
}

// The gradient of the parameters from that of the class scores (B, K), accumulated: each patch's
// first K outputs get 1/T of their image's score gradient, the others none.
void classifier_backward(Classifier *cl, const float *dscores, int B) {
    Dit *net = &cl->net;
    const ModelConfig *c = &net->trunk.config;
    int T = c->max_seq_len, PP = patch_values(&net->config), K = net->config.num_classes;
    float *dout = net->trunk.ws->acts.grads.dlogits;  // (B, T, P²)
    memset(dout, 0, (size_t)B * T * PP * sizeof(float));
    for (int b = 0; b < B; b++) {
        for (int n = 0; n < T; n++) {
            for (int k = 0; k < K; k++) { dout[((size_t)b * T + n) * PP + k] = dscores[(size_t)b * K + k] / T; }
        }
    }
    dit_backward_output(net);
}

// The most likely class of each of B images.
void predicted_classes(int *out, const float *scores, int B, int K) {
    for (int b = 0; b < B; b++) {
        out[b] = 0;
        for (int k = 1; k < K; k++) {
            if (scores[(size_t)b * K + k] > scores[(size_t)b * K + out[b]]) { out[b] = k; }
        }
    }
}

// ----------------------------------------------------------------------------
// feature statistics and the Fréchet distance

typedef struct {
    int dim;
    long count;
    double *sum;    // (dim)
    double *outer;  // (dim, dim) the sum of the products of every pair of features
} FeatureStats;

void stats_init(FeatureStats *s, int dim) {
    s->dim = dim;
    s->count = 0;
    s->sum = (double *)calloc_check(dim, sizeof(double));
    s->outer = (double *)calloc_check((size_t)dim * dim, sizeof(double));
}

void stats_free(FeatureStats *s) {
    free(s->sum);
    free(s->outer);
}

void stats_add(FeatureStats *s, const float *features, int count) {
    int n = s->dim;
    for (int b = 0; b < count; b++) {
        const float *f = features + (size_t)b * n;
        for (int i = 0; i < n; i++) {
            s->sum[i] += f[i];
            for (int j = 0; j < n; j++) { s->outer[(size_t)i * n + j] += (double)f[i] * f[j]; }
        }
    }
    s->count += count;
}

// The mean (dim) and the covariance (dim, dim), with n − 1 in the denominator.
void stats_moments(const FeatureStats *s, double *mean, double *cov) {
    int n = s->dim;
    if (s->count < 2) { fail("the covariance of features needs 2 images or more (got %ld)", s->count); }
    for (int i = 0; i < n; i++) { mean[i] = s->sum[i] / s->count; }
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) {
            cov[(size_t)i * n + j] = (s->outer[(size_t)i * n + j] - s->count * mean[i] * mean[j]) / (s->count - 1);
        }
    }
}

// The eigenvalues of the symmetric n x n matrix A, by cyclic Jacobi rotations: each rotation
// zeroes one off-diagonal pair, and sweeps repeat until what is left off the diagonal is
// negligible (below 1e-12 of the diagonal, in norm). A ends diagonal, holding the eigenvalues; V (n x n) gets the eigenvectors as columns.
void symmetric_eigen(double *A, double *V, int n) {
    for (int i = 0; i < n * n; i++) { V[i] = i % (n + 1) == 0 ? 1.0 : 0.0; }
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0.0, diagonal = 0.0;
        for (int i = 0; i < n; i++) {
            diagonal += A[(size_t)i * n + i] * A[(size_t)i * n + i];
            for (int j = i + 1; j < n; j++) { off += A[(size_t)i * n + j] * A[(size_t)i * n + j]; }
        }
        if (off <= 1e-24 * diagonal || off == 0.0) { return; }  // off-diagonal norm below 1e-12 of the diagonal's
        for (int p = 0; p < n; p++) {
            for (int q = p + 1; q < n; q++) {
                double apq = A[(size_t)p * n + q];
                if (apq == 0.0) { continue; }
                // the rotation by φ in the (p, q) plane with cot 2φ = theta makes A[p][q] zero
                double theta = (A[(size_t)q * n + q] - A[(size_t)p * n + p]) / (2.0 * apq);
                double t = (theta >= 0.0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
                double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (int k = 0; k < n; k++) {  // A J
                    double akp = A[(size_t)k * n + p], akq = A[(size_t)k * n + q];
                    A[(size_t)k * n + p] = c * akp - s * akq;
                    A[(size_t)k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; k++) {  // J^T (A J)
                    double apk = A[(size_t)p * n + k], aqk = A[(size_t)q * n + k];
                    A[(size_t)p * n + k] = c * apk - s * aqk;
                    A[(size_t)q * n + k] = s * apk + c * aqk;
                }
                for (int k = 0; k < n; k++) {  // V J
                    double vkp = V[(size_t)k * n + p], vkq = V[(size_t)k * n + q];
                    V[(size_t)k * n + p] = c * vkp - s * vkq;
                    V[(size_t)k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    fail("symmetric_eigen: no convergence in 100 sweeps");
}

// The Fréchet distance between the Gaussians N(mean1, cov1) and N(mean2, cov2) in n dimensions:
//   |mean1 − mean2|² + tr cov1 + tr cov2 − 2 tr (cov1^½ cov2 cov1^½)^½,
// the last trace as the sum of the square roots of the eigenvalues of the symmetric matrix
// cov1^½ cov2 cov1^½ (which has those of cov1 cov2). Both covariances are symmetric and positive
// semi-definite; eigenvalues that rounding makes slightly negative count as 0.
double frechet_distance(const double *mean1, const double *cov1, const double *mean2, const double *cov2,
                        int n) {
    size_t nn = (size_t)n * n;
    double *A = (double *)malloc_check(nn * sizeof(double)), *V = (double *)malloc_check(nn * sizeof(double));
    double *root = (double *)calloc_check(nn, sizeof(double)), *tmp = (double *)calloc_check(nn, sizeof(double));
    double distance = 0.0;
    for (int i = 0; i < n; i++) {
        distance += (mean1[i] - mean2[i]) * (mean1[i] - mean2[i]) + cov1[(size_t)i * n + i] + cov2[(size_t)i * n + i];
    }
    memcpy(A, cov1, nn * sizeof(double));  // cov1^½ = V diag(√λ) V^T
    symmetric_eigen(A, V, n);
    for (int k = 0; k < n; k++) {
        double r = sqrt(fmax(A[(size_t)k * n + k], 0.0));
        for (int i = 0; i < n; i++) {
            for (int j = 0; j < n; j++) { root[(size_t)i * n + j] += V[(size_t)i * n + k] * r * V[(size_t)j * n + k]; }
        }
    }
    for (int i = 0; i < n; i++) {  // tmp = cov1^½ cov2
        for (int k = 0; k < n; k++) {
            for (int j = 0; j < n; j++) { tmp[(size_t)i * n + j] += root[(size_t)i * n + k] * cov2[(size_t)k * n + j]; }
        }
    }
    memset(A, 0, nn * sizeof(double));  // A = tmp cov1^½
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < n; k++) {
            for (int j = 0; j < n; j++) { A[(size_t)i * n + j] += tmp[(size_t)i * n + k] * root[(size_t)k * n + j]; }
        }
    }
    for (int i = 0; i < n; i++) {  // symmetric in exact arithmetic: make it so in rounding too
        for (int j = i + 1; j < n; j++) {
            double mean = 0.5 * (A[(size_t)i * n + j] + A[(size_t)j * n + i]);
            A[(size_t)i * n + j] = A[(size_t)j * n + i] = mean;
        }
    }
    symmetric_eigen(A, V, n);
    for (int k = 0; k < n; k++) { distance -= 2.0 * sqrt(fmax(A[(size_t)k * n + k], 0.0)); }
    free(A);
    free(V);
    free(root);
    free(tmp);
    return distance;
}

#ifndef EVAL_DIT_NO_MAIN
// ----------------------------------------------------------------------------
// the program (built with EVAL_DIT_NO_MAIN, the file leaves it out: test/test_dit.c)
#include "../dtopp/options.h"  // defines: OptionSpec, parse_option_table, print_option_table
#include "explain_dit.h"          // defines: explain_dit (eval_dit explain: the routing page)

typedef struct {
    const char *data, *out, *model, *classifier;
    int steps, batch, warmup, layers, channels, heads, expert_hidden, samples_per_class, sample_steps;
    int eval_images, test_images, threads;
    float lr, guidance;
    long long seed;
} EvalOptions;

static int eval_option_specs(EvalOptions *o, OptionSpec *specs) {
    OptionSpec list[] = {
        {"data", 's', &o->data, 0, 0, "folder with the Fashion-MNIST IDX files (get_fashion_mnist.sh)", 0},
        {"out", 's', &o->out, 0, 0, "classifier: the checkpoint to write; routing: the CSV file", 0},
        {"model", 's', &o->model, 0, 0, "quality, routing: the DiT checkpoint (train_dit's model.bin)", 0},
        {"classifier", 's', &o->classifier, 0, 0, "quality: the classifier (eval_dit classifier)", 0},
        {"steps", 'i', &o->steps, 1, INT_MAX, "classifier: optimizer steps", 0},
        {"batch", 'i', &o->batch, 1, MAX_SIZE, "images per step, per sampled batch, per forward pass", 0},
        {"lr", 'f', &o->lr, NOT_NEGATIVE_FLOAT, "classifier: peak learning rate", 0},
        {"warmup", 'i', &o->warmup, 1, INT_MAX, "classifier: learning-rate warm-up steps", 0},
        {"layers", 'i', &o->layers, 1, MAX_SIZE, "classifier: L, transformer blocks", 0},
        {"channels", 'i', &o->channels, 4, MAX_SIZE, "classifier: C, width (a multiple of 4), the features", 0},
        {"heads", 'i', &o->heads, 1, MAX_SIZE, "classifier: NH, attention heads", 0},
        {"expert-hidden", 'i', &o->expert_hidden, 1, MAX_SIZE, "classifier: hidden width of its one expert", 0},
        {"samples-per-class", 'i', &o->samples_per_class, 2, 100000, "quality: samples of each class", 0},
        {"sample-steps", 'i', &o->sample_steps, 1, 100000, "quality: Euler steps of the sampler", 0},
        {"guidance", 'f', &o->guidance, ANY_FLOAT, "quality: classifier-free guidance scale (1: none)", 0},
        {"eval-images", 'i', &o->eval_images, 1, INT_MAX, "routing: test images at each noise level", 0},
        {"test-images", 'i', &o->test_images, 2, INT_MAX,
         "classifier, quality: test images of the accuracy and the reference features", 0},
        {"seed", 'l', &o->seed, 0, 0, "seed of the classifier's training and of the samples' noise", 0},
        {"threads", 'i', &o->threads, 0, 1024, "OpenMP threads (0: all)", 0},
    };
    int n = (int)(sizeof(list) / sizeof(list[0]));
    if (specs != NULL) { memcpy(specs, list, sizeof(list)); }
    return n;
}

static void eval_default_options(EvalOptions *o) {
    *o = (EvalOptions){.data = "data/fashion-mnist", .out = NULL, .model = NULL, .classifier = NULL,
                       .steps = 3000, .batch = 100, .warmup = 100, .layers = 2, .channels = 64, .heads = 4,
                       .expert_hidden = 256, .samples_per_class = 100, .sample_steps = 50, .eval_images = 1000,
                       .test_images = 10000,
                       .threads = 0, .lr = 1e-3f, .guidance = 3.0f, .seed = 1};
}

static void eval_usage(void) {
    EvalOptions defaults;
    eval_default_options(&defaults);
    OptionSpec specs[32];
    int n = eval_option_specs(&defaults, specs);
    printf("usage: eval_dit classifier|quality|routing|explain [--option value ...]\n\n"
           "Measures diffusion transformers of train_dit (doc/dit.md):\n"
           "  classifier  trains the classifier of the quality measures (--out FILE)\n"
           "  quality     Fréchet distance and class accuracy of samples (--model FILE --classifier FILE)\n"
           "  routing     activated experts of test images by layer, time, class, position, region\n"
           "              (--model FILE --out FILE.csv)\n"
           "  explain     a page of test images at ten noise levels, patches shaded by experts\n"
           "              (--model FILE --out PAGE.html)\n\n");
    print_option_table(specs, n);
}

static void require(const char *value, const char *option, const char *mode) {
    if (value == NULL) { fail("eval_dit %s needs --%s (see --help)", mode, option); }
}

// Classifier scores and features of count images of a data set, from image `first` on, in batches.
static void classify_images(Classifier *cl, const IdxData *images, const int *which, int count, int batch,
                            float *scores, float *features) {
    int D = images->rows * images->cols, K = cl->net.config.num_classes, C = cl->net.trunk.config.channels;
    float *x = (float *)malloc_check((size_t)batch * D * sizeof(float));
    for (int first = 0; first < count; first += batch) {
        int B = count - first < batch ? count - first : batch;
        for (int b = 0; b < B; b++) {
            int image = which != NULL ? which[first + b] : first + b;
            to_unit_range(x + (size_t)b * D, images->data + (size_t)image * D, D);
        }
        classifier_forward(cl, x, B, scores + (size_t)first * K, features + (size_t)first * C);
    }
    free(x);
}

static double accuracy_of(const float *scores, const int *classes, int count, int K) {
    int *predicted = (int *)malloc_check(count * sizeof(int)), right = 0;
    predicted_classes(predicted, scores, count, K);
    for (int i = 0; i < count; i++) { right += predicted[i] == classes[i]; }
    free(predicted);
    return (double)right / count;
}

static void train_classifier(const EvalOptions *o) {
    require(o->out, "out", "classifier");
    DitConfig dconfig = {28, 4, NUM_CLASSES};
    ModelConfig config = dit_trunk_config(&dconfig, o->layers, o->heads, o->channels, 1, o->expert_hidden);
    RouterConfig router = {.routing = ROUTING_TOPK, .k = 1, .renorm = 1, .theta_init = 1.0f};
    Classifier cl = {0};
    Dit *net = &cl.net;
    dit_init(net, &dconfig, &config, &router, (uint64_t)o->seed);
    printf("classifier: L=%d C=%d NH=%d, one expert of hidden width %d, %.2fM parameters, %d steps of %d images\n",
           o->layers, o->channels, o->heads, o->expert_hidden, net->num_parameters / 1e6, o->steps, o->batch);
    Batches s;
    batches_open(&s, o->data, dconfig.image_size, o->batch, (uint64_t)o->seed * 0x9E3779B97F4A7C15ull + 2);
    batches_check_labels(&s, o->data, dconfig.num_classes, "the new classifier");
    int B = o->batch, K = NUM_CLASSES, C = config.channels;
    float *scores = (float *)malloc_check((size_t)B * K * sizeof(float));
    float *dscores = (float *)malloc_check((size_t)B * K * sizeof(float));
    float *features = (float *)malloc_check((size_t)B * C * sizeof(float));
    float *losses = (float *)malloc_check(B * sizeof(float)), *lse = (float *)malloc_check(B * sizeof(float));
    double start = wall_seconds(), loss_sum = 0.0, right = 0.0;
    for (int step = 0; step < o->steps; step++) {
        next_batch(&s, B, 0.0f);  // clean images x0 with their true classes; t and noise go unused
        classifier_forward(&cl, s.x0, B, scores, features);
        crossentropy_forward(losses, lse, scores, s.classes, B, K);
        crossentropy_backward(dscores, scores, lse, s.classes, B, K, 1.0f / B);
        dit_zero_grad(net);
        classifier_backward(&cl, dscores, B);
        float norm = dit_update(net, learning_rate(step, o->steps, o->warmup, o->lr), 0.0f);
        for (int b = 0; b < B; b++) { loss_sum += losses[b] / B; }
        right += accuracy_of(scores, s.classes, B, K);
        if (!isfinite(losses[0]) || !isfinite(norm)) { fail("classifier step %d: the loss is not finite", step + 1); }
        if ((step + 1) % 500 == 0 || step + 1 == o->steps) {
            int span = (step + 1) % 500 == 0 ? 500 : (step + 1) % 500;
            printf("step %5d/%d | loss %.4f | accuracy %.3f (training batches) | %.0f s\n", step + 1, o->steps,
                   loss_sum / span, right / span, wall_seconds() - start);
            fflush(stdout);
            loss_sum = right = 0.0;
        }
    }
    int count = o->test_images < s.val_images.count ? o->test_images : s.val_images.count;
    float *test_scores = (float *)malloc_check((size_t)count * K * sizeof(float));
    float *test_features = (float *)malloc_check((size_t)count * C * sizeof(float));
    classify_images(&cl, &s.val_images, NULL, count, B, test_scores, test_features);
    int *classes = (int *)malloc_check(count * sizeof(int));
    for (int i = 0; i < count; i++) { classes[i] = s.val_labels.data[i]; }
    printf("test accuracy %.4f on %d images\n", accuracy_of(test_scores, classes, count, K), count);
    dit_save(net, o->out);
    printf("wrote %s\n", o->out);
    free(classes);
    free(test_scores);
    free(test_features);
    free(scores);
    free(dscores);
    free(features);
    free(losses);
    free(lse);
    batches_close(&s);
    classifier_free(&cl);
}

static void load_classifier(Classifier *cl, const char *path) {
    Dit *net = &cl->net;
    *cl = (Classifier){0};
    dit_load(net, path);
    if (net->trunk.config.num_experts != 1 || net->config.num_classes > patch_values(&net->config)) {
        fail("%s: not a classifier of eval_dit (it has %d experts per layer, a classifier 1): is it a DiT's "
             "model.bin? Train one with eval_dit classifier --out %s", path, net->trunk.config.num_experts, path);
    }
}

// The mean (dim) and covariance (dim, dim) of count feature vectors.
static void moments_of(const float *features, int count, int dim, double *mean, double *cov) {
    FeatureStats s;
    stats_init(&s, dim);
    stats_add(&s, features, count);
    stats_moments(&s, mean, cov);
    stats_free(&s);
}

// The Fréchet distance between a set of features and the reference statistics.
static double distance_to(const float *features, int count, int dim, const double *mean, const double *cov) {
    double *m = (double *)malloc_check(dim * sizeof(double));
    double *c = (double *)malloc_check((size_t)dim * dim * sizeof(double));
    moments_of(features, count, dim, m, c);
    double distance = frechet_distance(m, c, mean, cov, dim);
    free(m);
    free(c);
    return distance;
}

static void measure_quality(const EvalOptions *o) {
    require(o->model, "model", "quality");
    require(o->classifier, "classifier", "quality");
    Classifier cl;
    Dit *net = &cl.net, gen;
    load_classifier(&cl, o->classifier);
    dit_load(&gen, o->model);
    if (gen.config.image_size != net->config.image_size || gen.config.num_classes != net->config.num_classes) {
        fail("%s and %s: the model's images or classes are not the classifier's", o->model, o->classifier);
    }
    Batches s;
    batches_open(&s, o->data, net->config.image_size, o->batch, 1);
    batches_check_labels(&s, o->data, net->config.num_classes, o->classifier);  // the same as the model's
    int K = net->config.num_classes, C = net->trunk.config.channels, D = s.images.rows * s.images.cols;
    int per_class = o->samples_per_class, count = per_class * K;
    int reference = o->test_images < s.val_images.count ? o->test_images : s.val_images.count;
    size_t rows = (size_t)(count > reference ? count : reference);  // the buffers serve both sets in turn
    float *scores = (float *)malloc_check(rows * K * sizeof(float));
    float *features = (float *)malloc_check(rows * C * sizeof(float));
    int *classes = (int *)malloc_check(rows * sizeof(int));

    // the reference: the features of the test set
    classify_images(&cl, &s.val_images, NULL, reference, o->batch, scores, features);
    for (int i = 0; i < reference; i++) { classes[i] = s.val_labels.data[i]; }
    printf("classifier %s: test accuracy %.4f on %d images\n", o->classifier,
           accuracy_of(scores, classes, reference, K), reference);
    double *ref_mean = (double *)malloc_check(C * sizeof(double));
    double *ref_cov = (double *)malloc_check((size_t)C * C * sizeof(double));
    moments_of(features, reference, C, ref_mean, ref_cov);

    // what real images of the same number score: the first per_class training images of each class
    int *which = (int *)malloc_check(count * sizeof(int)), found = 0;
    for (int k = 0; k < K; k++) {
        int taken = 0;
        for (int i = 0; i < s.images.count && taken < per_class; i++) {
            if (s.labels.data[i] == k) {
                which[found++] = i;
                taken++;
            }
        }
        if (taken < per_class) { fail("the training set has fewer than %d images of class %d", per_class, k); }
    }
    classify_images(&cl, &s.images, which, count, o->batch, scores, features);
    for (int i = 0; i < count; i++) { classes[i] = s.labels.data[which[i]]; }
    printf("real training images: %d, Fréchet distance %.3f, class accuracy %.4f\n", count,
           distance_to(features, count, C, ref_mean, ref_cov), accuracy_of(scores, classes, count, K));

    // the samples: class i mod K for sample i, from noise drawn from the seed
    const ModelConfig *gc = &gen.trunk.config;
    printf("model %s: L=%d C=%d E=%d, %s routing, p %.3f; %d samples, %d Euler steps, guidance %g\n", o->model,
           gc->num_layers, gc->channels, gc->num_experts, routing_names[gen.trunk.router.routing],
           gen.trunk.threshold[0], count, o->sample_steps, o->guidance);
    fflush(stdout);
    uint64_t rng = (uint64_t)o->seed;
    float *x = (float *)malloc_check((size_t)o->batch * D * sizeof(float));
    double start = wall_seconds();
    for (int first = 0; first < count; first += o->batch) {
        int B = count - first < o->batch ? count - first : o->batch;
        for (int b = 0; b < B; b++) { classes[first + b] = (first + b) % K; }
        for (size_t i = 0; i < (size_t)B * D; i++) { x[i] = random_normal(&rng); }
        dit_sample(&gen, x, classes + first, B, o->sample_steps, o->guidance);
        for (size_t i = 0; i < (size_t)B * D; i++) { x[i] = fminf(fmaxf(x[i], -1.0f), 1.0f); }  // as in the PNG
        classifier_forward(&cl, x, B, scores + (size_t)first * K, features + (size_t)first * C);
    }
    double fid = distance_to(features, count, C, ref_mean, ref_cov);
    printf("samples: %d, Fréchet distance %.3f, class accuracy %.4f (sampled in %.0f s)\n", count, fid,
           accuracy_of(scores, classes, count, K), wall_seconds() - start);
    int *predicted = (int *)malloc_check(count * sizeof(int));
    predicted_classes(predicted, scores, count, K);
    printf("class accuracy by class:");
    for (int k = 0; k < K; k++) {
        int right = 0;
        for (int i = k; i < count; i += K) { right += predicted[i] == k; }
        printf(" %s %.2f%s", fashion_classes[k], (double)right / per_class, k + 1 < K ? "," : "\n");
    }
    free(predicted);
    free(x);
    free(which);
    free(ref_mean);
    free(ref_cov);
    free(scores);
    free(features);
    free(classes);
    batches_close(&s);
    classifier_free(&cl);
    dit_free(&gen);
}

// The noise levels of the routing analysis, and the share of white below which a patch of the
// clean image counts as background (Fashion-MNIST's garments lie on a black ground).
#define ROUTING_LEVELS 10
#define BACKGROUND_INK 0.05

static void analyse_routing(const EvalOptions *o) {
    require(o->model, "model", "routing");
    require(o->out, "out", "routing");
    Dit gen;
    dit_load(&gen, o->model);
    const ModelConfig *c = &gen.trunk.config;
    // the table's classes are those labels can be (below the model's count, checked, and the data's):
    // its size follows the data, not a class count in a file
    int L = c->num_layers, T = c->max_seq_len, PP = patch_values(&gen.config);
    int K = gen.config.num_classes < NUM_CLASSES ? gen.config.num_classes : NUM_CLASSES;
    Batches s;
    batches_open(&s, o->data, gen.config.image_size, o->batch, 1);
    batches_check_labels(&s, o->data, gen.config.num_classes, o->model);
    int D = s.images.rows * s.images.cols, count = o->eval_images < s.val_images.count ? o->eval_images
                                                                                        : s.val_images.count;
    // sums over tokens by (layer, level, class, patch, region): tokens and their activated experts
    size_t cells = (size_t)L * ROUTING_LEVELS * K * T * 2;
    long *tokens = (long *)calloc_check(cells, sizeof(long)), *experts = (long *)calloc_check(cells, sizeof(long));
    float *x0 = (float *)malloc_check((size_t)o->batch * D * sizeof(float));
    float *noise = (float *)malloc_check((size_t)o->batch * D * sizeof(float));
    float *xt = (float *)malloc_check((size_t)o->batch * D * sizeof(float));
    float *velocity = (float *)malloc_check((size_t)o->batch * D * sizeof(float));
    float *clean = (float *)malloc_check((size_t)o->batch * D * sizeof(float));
    float *t = (float *)malloc_check(o->batch * sizeof(float));
    int *classes = (int *)malloc_check(o->batch * sizeof(int));
    for (int level = 0; level < ROUTING_LEVELS; level++) {
        uint64_t rng = (uint64_t)o->seed;  // the same noise at every level
        for (int first = 0; first < count; first += o->batch) {
            int B = count - first < o->batch ? count - first : o->batch;
            to_unit_range(x0, s.val_images.data + (size_t)first * D, (size_t)B * D);
            for (int b = 0; b < B; b++) {
                t[b] = (level + 0.5f) / ROUTING_LEVELS;
                classes[b] = s.val_labels.data[first + b];
            }
            for (size_t i = 0; i < (size_t)B * D; i++) { noise[i] = random_normal(&rng); }
            rectified_flow_pair(xt, velocity, x0, noise, t, B, D);
            dit_forward(&gen, xt, t, classes, NULL, B);
            images_to_patches(clean, x0, B, gen.config.image_size, gen.config.patch_size);
            const int *n_selected = gen.trunk.ws->acts.routing.n_selected;  // (L, B·T)
            for (int b = 0; b < B; b++) {
                for (int n = 0; n < T; n++) {
                    double ink = 0.0;  // the mean brightness of the clean patch, in [0, 1]
                    for (int i = 0; i < PP; i++) { ink += (clean[((size_t)b * T + n) * PP + i] + 1.0) / 2.0; }
                    int garment = ink / PP >= BACKGROUND_INK;
                    for (int l = 0; l < L; l++) {
                        size_t cell = ((((size_t)l * ROUTING_LEVELS + level) * K + classes[b]) * T + n) * 2 + garment;
                        tokens[cell]++;
                        experts[cell] += n_selected[(size_t)l * B * T + (size_t)b * T + n];
                    }
                }
            }
        }
    }
    char tmp[4096];
    FILE *f = open_for_atomic_write(o->out, tmp, sizeof(tmp));
    fprintf(f, "layer,t,class,patch,region,tokens,experts\n");
    for (size_t cell = 0; cell < cells; cell++) {
        if (tokens[cell] == 0) { continue; }
        size_t rest = cell / 2;
        int patch = (int)(rest % T), k = (int)(rest / T % K), level = (int)(rest / T / K % ROUTING_LEVELS);
        int l = (int)(rest / T / K / ROUTING_LEVELS);
        fprintf(f, "%d,%.2f,%d,%d,%s,%ld,%ld\n", l, (level + 0.5) / ROUTING_LEVELS, k, patch,
                cell % 2 ? "garment" : "background", tokens[cell], experts[cell]);
    }
    finish_atomic_write(f, tmp, o->out);
    printf("routing of %s (%s, p %.3f) on %d test images at %d noise levels: wrote %s\n", o->model,
           routing_names[gen.trunk.router.routing], gen.trunk.threshold[0], count, ROUTING_LEVELS, o->out);
    free(tokens);
    free(experts);
    free(x0);
    free(noise);
    free(xt);
    free(velocity);
    free(clean);
    free(t);
    free(classes);
    batches_close(&s);
    dit_free(&gen);
}

int main(int argc, char **argv) {
    passive_wait_by_default(argv);  // OMP_WAIT_POLICY: idle threads sleep, unless the user chose
    static const char *const modes[] = {"classifier", "quality", "routing", "explain"};
    if (argc < 2 || strncmp(argv[1], "-", 1) == 0) {  // no mode: the usage, on request or as the error
        int asked = argc >= 2 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0);
        eval_usage();
        return asked ? EXIT_SUCCESS : EXIT_FAILURE;
    }
    int mode = parse_name(argv[1], modes, 4, "mode");
    EvalOptions o;
    eval_default_options(&o);
    OptionSpec specs[32];
    int n = eval_option_specs(&o, specs);
    parse_option_table(specs, n, argc - 1, argv + 1, eval_usage);
    set_num_threads(o.threads);
    if (o.out != NULL) { check_output_path(o.out); }  // before the work, not after it
    switch (mode) {
        case 0: train_classifier(&o); break;
        case 1: measure_quality(&o); break;
        case 2: analyse_routing(&o); break;
        default:
            require(o.model, "model", "explain");
            require(o.out, "out", "explain");
            explain_dit(o.model, o.data, o.out);
            break;
    }
    return stdout_checked(EXIT_SUCCESS);  // the measures are printed: they must have reached stdout
}
#endif  // EVAL_DIT_NO_MAIN
