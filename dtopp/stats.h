/*
stats.h: what the routing did, in numbers: per layer the mean and spread of |S| (the number of
activated experts), its histogram, and the load of every expert (section 6 of doc/spec.md); and
StepTotals, a training step's losses and routing counts summed over its micro-batches and ranks.
It reads a model through the model API of train_dtopp.c (model_routing_counts, model_get_losses),
so it is included after it.
*/
#ifndef STATS_H
#define STATS_H

typedef struct {
    double activated;         // mean |S| over tokens and layers (the controller's a_t leaves out a fixed first layer)
    double *layer_mean;       // (L) mean |S|
    double *layer_std;        // (L) population standard deviation of |S|
    int *histogram;           // (L, E + 1) tokens with |S| = 0..E
    int *load_min, *load_max; // (L) tokens per expert
    double *load_cv;          // (L) coefficient of variation of tokens per expert
} RoutingStats;

void routing_stats_alloc(RoutingStats *s, const ModelConfig *c) {
    int L = c->num_layers, E = c->num_experts;
    s->layer_mean = (double *)calloc_check(L, sizeof(double));
    s->layer_std = (double *)calloc_check(L, sizeof(double));
    s->histogram = (int *)calloc_check((size_t)L * (E + 1), sizeof(int));
    s->load_min = (int *)calloc_check(L, sizeof(int));
    s->load_max = (int *)calloc_check(L, sizeof(int));
    s->load_cv = (double *)calloc_check(L, sizeof(double));
}

void routing_stats_free(RoutingStats *s) {
    free(s->layer_mean);
    free(s->layer_std);
    free(s->histogram);
    free(s->load_min);
    free(s->load_max);
    free(s->load_cv);
}

// Routing counts, summed over any number of forward passes (and ranks) before the statistics are
// taken: per layer the histogram of |S| (E + 1 bins), then per layer the tokens of each expert (E).
// They are doubles so that one sum across ranks carries them with the losses; as integers below
// 2^53 they add exactly in any order.
static size_t routing_counts_size(const ModelConfig *c) {
    return (size_t)c->num_layers * (2 * c->num_experts + 1);
}

// counts += the routing counts of the last forward pass.
static void routing_counts_add(double *counts, const Model *model) {
    int N = model->B * model->T, L = model->config.num_layers, E = model->config.num_experts;
    int *n_selected = (int *)malloc_check((size_t)L * N * sizeof(int));
    int *expert_load = (int *)malloc_check((size_t)L * E * sizeof(int));
    model_routing_counts(model, n_selected, expert_load);
    double *histogram = counts, *load = counts + (size_t)L * (E + 1);
    for (int l = 0; l < L; l++) {
        for (int n = 0; n < N; n++) { histogram[(size_t)l * (E + 1) + n_selected[(size_t)l * N + n]] += 1.0; }
        for (int e = 0; e < E; e++) { load[(size_t)l * E + e] += expert_load[(size_t)l * E + e]; }
    }
    free(n_selected);
    free(expert_load);
}

static void routing_stats_from_counts(RoutingStats *s, const double *counts, const ModelConfig *c) {
    int L = c->num_layers, E = c->num_experts;
    for (int l = 0; l < L; l++) {
        const double *hist = counts + (size_t)l * (E + 1);
        const double *load = counts + (size_t)L * (E + 1) + (size_t)l * E;
        double n = 0.0, sum = 0.0, sumsq = 0.0;
        for (int k = 0; k <= E; k++) {
            s->histogram[(size_t)l * (E + 1) + k] = (int)hist[k];
            n += hist[k];
            sum += k * hist[k];
            sumsq += (double)k * k * hist[k];
        }
        s->layer_mean[l] = sum / n;
        double var = sumsq / n - s->layer_mean[l] * s->layer_mean[l];
        s->layer_std[l] = var > 0.0 ? sqrt(var) : 0.0;
        double lsum = 0.0, lsumsq = 0.0;
        s->load_min[l] = s->load_max[l] = (int)load[0];
        for (int e = 0; e < E; e++) {
            int tokens = (int)load[e];
            s->load_min[l] = tokens < s->load_min[l] ? tokens : s->load_min[l];
            s->load_max[l] = tokens > s->load_max[l] ? tokens : s->load_max[l];
            lsum += tokens;
            lsumsq += (double)tokens * tokens;
        }
        double lmean = lsum / E, lvar = lsumsq / E - lmean * lmean;
        s->load_cv[l] = lmean > 0.0 && lvar > 0.0 ? sqrt(lvar) / lmean : 0.0;
    }
    s->activated = mean_over_layers(s->layer_mean, 0, L);
}

// The statistics of the last forward pass.
void routing_stats_compute(RoutingStats *s, const Model *model) {
    double *counts = (double *)calloc_check(routing_counts_size(&model->config), sizeof(double));
    routing_counts_add(counts, model);
    routing_stats_from_counts(s, counts, &model->config);
    free(counts);
}

// ----------------------------------------------------------------------------
// a training step's totals: the losses and routing counts of all its micro-batches, on every rank

typedef struct {
    ModelConfig config;
    double *sums;         // the losses (num_losses), then the routing counts (routing_counts_size)
    float *losses;        // (num_losses) the step's losses: the means over its micro-batches
    float *last_losses;   // (num_losses) scratch: those of the last forward pass
    RoutingStats stats;   // over every token of the step
} StepTotals;

static size_t step_totals_size(const ModelConfig *c) { return num_losses(c) + routing_counts_size(c); }

void step_totals_alloc(StepTotals *s, const ModelConfig *c) {
    s->config = *c;
    s->sums = (double *)calloc_check(step_totals_size(c), sizeof(double));
    s->losses = (float *)calloc_check(num_losses(c), sizeof(float));
    s->last_losses = (float *)calloc_check(num_losses(c), sizeof(float));
    routing_stats_alloc(&s->stats, c);
}

void step_totals_free(StepTotals *s) {
    free(s->sums);
    free(s->losses);
    free(s->last_losses);
    routing_stats_free(&s->stats);
}

void step_totals_reset(StepTotals *s) { memset(s->sums, 0, step_totals_size(&s->config) * sizeof(double)); }

// Adds the losses and routing counts of the model's last forward pass.
void step_totals_add(StepTotals *s, const Model *model) {
    int n = num_losses(&s->config);
    model_get_losses(model, s->last_losses);
    for (int i = 0; i < n; i++) { s->sums[i] += s->last_losses[i]; }
    routing_counts_add(s->sums + n, model);
}

// The sums over every rank, then the step's losses (the mean over all its micro-batches,
// doc/spec.md section 4) and its routing statistics (over all its tokens).
void step_totals_finish(StepTotals *s, int micro_batches) {
    int n = num_losses(&s->config);
    dp_sum_doubles(s->sums, (int)step_totals_size(&s->config));
    for (int i = 0; i < n; i++) { s->losses[i] = (float)(s->sums[i] / micro_batches); }
    routing_stats_from_counts(&s->stats, s->sums + n, &s->config);
}

#endif  // STATS_H
