/*
logging.h: what a run reports. log.csv gets a row per step (its columns in doc/formats.md); the
routing dump (--routing-dump) a row per validation token with its |S| in every layer; evaluate
measures the validation loss and prints the table of activated experts per layer. It uses the
model API of train_dtopp.c and stats.h, so it is included after them.
*/
#ifndef LOGGING_H
#define LOGGING_H

#include <errno.h>
#include <unistd.h>
#include "../dataloader.h"  // defines: DataLoader, dataloader_reset, dataloader_next_batch

// The path of the open log, for the messages of failed writes: every row is checked as it is
// flushed (a full disk or a file size limit stops the run, naming the file), and so is the close.
static char log_path_open[4200];

// Appends to the log of a resumed run, if there is one; otherwise starts one with its header.
static FILE *open_log(const char *path, const Model *model, int append) {
    append = append && access(path, F_OK) == 0;
    FILE *f = fopen_output(path, append ? "a" : "w");
    snprintf(log_path_open, sizeof(log_path_open), "%s", path);
    if (!append) {
        fprintf(f, "step,loss,ce_loss,val_loss,lr,grad_norm,activated,p,tokens_per_s");
        for (int l = 0; l < model->config.num_layers; l++) {
            fprintf(f, ",p_%d,mean_%d,std_%d,theta_%d,lb_%d,ent_%d,load_min_%d,load_max_%d,load_cv_%d", l, l,
                    l, l, l, l, l, l, l);
            for (int s = 0; s <= model->config.num_experts; s++) { fprintf(f, ",hist_%d_%d", l, s); }
        }
        fprintf(f, "\n");
        flush_check(f, path);
    }
    return f;
}

static void close_log(FILE *f) { fclose_check(f, log_path_open); }

// losses: the step's (total, CE, LB_l for each l, H_l for each l), over all its micro-batches and ranks.
static void log_step(FILE *f, const Model *model, const RoutingStats *stats, const float *losses,
                     const float *p_used, int step, float val_loss, float lr, float grad_norm,
                     double tokens_per_s) {
    int L = model->config.num_layers, E = model->config.num_experts;
    float *theta = (float *)malloc_check(L * sizeof(float));
    model_get_theta(model, theta);  // after this step's update
    fprintf(f, "%d,%.6f,%.6f,", step, losses[0], losses[1]);
    if (val_loss >= 0.0f) { fprintf(f, "%.6f", val_loss); }
    fprintf(f, ",%.6e,%.6f,%.6f,%.6f,%.1f", lr, grad_norm, stats->activated, p_used[0], tokens_per_s);
    for (int l = 0; l < L; l++) {
        fprintf(f, ",%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%d,%d,%.6f", p_used[l], stats->layer_mean[l],
                stats->layer_std[l], theta[l], losses[2 + l], losses[2 + L + l], stats->load_min[l],
                stats->load_max[l], stats->load_cv[l]);
        for (int s = 0; s <= E; s++) { fprintf(f, ",%d", stats->histogram[(size_t)l * (E + 1) + s]); }
    }
    fprintf(f, "\n");
    flush_check(f, log_path_open);
    free(theta);
}

// Writes a row per validation position: the token, its position in the sequence, the loss of
// predicting the next token from it, and |S| in every layer: what the adaptivity analysis reads.
static void dump_routing(FILE *f, const Model *model, const int *inputs, int write_header) {
    int N = model->B * model->T, L = model->config.num_layers;
    if (write_header) {
        fprintf(f, "token,position,loss");
        for (int l = 0; l < L; l++) { fprintf(f, ",experts_%d", l); }
        fprintf(f, "\n");
    }
    float *loss = (float *)malloc_check((size_t)N * sizeof(float));
    int *n_selected = (int *)malloc_check((size_t)L * N * sizeof(int));
    model_get_token_losses(model, loss);
    model_routing_counts(model, n_selected, NULL);
    for (int n = 0; n < N; n++) {
        fprintf(f, "%d,%d,%.5f", inputs[n], n % model->T, loss[n]);
        for (int l = 0; l < L; l++) { fprintf(f, ",%d", n_selected[(size_t)l * N + n]); }
        fprintf(f, "\n");
    }
    free(loss);
    free(n_selected);
}


// Mean cross-entropy over `batches` validation batches, and the per-layer table of activated
// experts (mean ± σ over all validation tokens) with a histogram of |S|. With dump, also every
// token's routing (dump_routing) to it.
static float evaluate(Model *model, DataLoader *val, int batches, FILE *dump, const char *dump_path) {
    const ModelConfig *c = &model->config;
    int L = c->num_layers, E = c->num_experts;
    double *counts = (double *)calloc_check(routing_counts_size(c), sizeof(double)), loss = 0.0;
    dataloader_reset(val);
    batches = batches < (int)val->num_batches ? batches : (int)val->num_batches;
    for (int b = 0; b < batches; b++) {
        dataloader_next_batch(val);
        model_forward(model, val->inputs, val->targets, val->B, val->T);
        loss += model->ce_loss;
        routing_counts_add(counts, model);
        if (dump != NULL) { dump_routing(dump, model, val->inputs, b == 0); }
    }
    if (dump != NULL) { flush_check(dump, dump_path); }
    RoutingStats stats;
    routing_stats_alloc(&stats, c);
    routing_stats_from_counts(&stats, counts, c);
    printf("  layer  activated experts    |S| = 1 .. %d\n", E);
    for (int l = 0; l < L; l++) {
        const int *hist = stats.histogram + (size_t)l * (E + 1);
        double n = 0;
        for (int s = 0; s <= E; s++) { n += hist[s]; }
        printf("  %5d  %6.2f ± %-5.2f      ", l, n > 0 ? stats.layer_mean[l] : 0.0, n > 0 ? stats.layer_std[l] : 0.0);
        static const char *bars[] = {" ", "▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"};
        for (int s = 1; s <= E; s++) { fputs(bars[(int)ceil((n > 0 ? hist[s] / n : 0.0) * 8)], stdout); }
        printf("\n");
    }
    routing_stats_free(&stats);
    free(counts);
    return batches > 0 ? (float)(loss / batches) : -1.0f;
}

#endif  // LOGGING_H
