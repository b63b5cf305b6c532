/*
run.h: a training run around the loop of main: its setup (options, data, the model new, from
--init or from the newest checkpoint of --resume, the output directory and its log), the
checkpoints it writes, its progress lines and samples, and the checks that stop it (divergence,
ranks that disagree). Included by train_dtopp.c after everything it uses.
*/
#ifndef RUN_H
#define RUN_H

#include <signal.h>

// ----------------------------------------------------------------------------
// the training program: setup, then a loop of training steps with evaluation, samples and
// checkpoints

typedef struct {
    Options o;
    Model model;
    DataLoader train, val;
    int have_val;
    TextCodec codec;
    uint64_t rng;         // the sampler's stream
    int start_step;       // the first step this process runs
    int resumed_here;     // --resume names the output directory
    int last_checkpoint;  // the step of the newest checkpoint in o.out_dir (-1: none yet)
    FILE *log;            // rank 0 only (NULL on the others)
    FILE *routing_dump;   // --routing-dump, opened at the start so that a bad path fails at once
    float *p_used;        // (L) the thresholds the current step routed with
    StepTotals totals;    // the current step's losses and routing, over all its micro-batches and ranks
    double recent_dt[64];  // the seconds of the last 64 steps, for the note on a sudden slowdown
    int steps_timed, slow_in_a_row, slowdown_noted;
} Run;

static int schedule_length(const Options *o) { return o->schedule_steps > 0 ? o->schedule_steps : o->steps; }

// Stops a run whose numbers are no longer finite, saying which checkpoint survives.
static void fail_diverged(const Run *run, const char *what, double value, int step) {
    if (run->last_checkpoint >= 0) {
        fail(
            "%s is %g at step %d: training diverged (try a lower --lr); the last checkpoint, step %d in %s, "
            "is kept",
            what, value, step, run->last_checkpoint, run->o.out_dir);
    }
    fail("%s is %g at step %d: training diverged (try a lower --lr); no checkpoint was written to %s", what,
         value, step, run->o.out_dir);
}

// Writes the pair of step `step` (and model.bin), then removes the previous pair. Parameters that
// are not finite are never written: the previous checkpoint stays the last good one. Every rank
// calls it (with --expert-parallel the groups gather their experts to their rank 0); rank 0 writes.
static void write_checkpoint(Run *run, int step) {
    const Model *model = &run->model;
    const Options *o = &run->o;
    if (ep_ranks == 1 && dp_rank > 0) {  // data parallel: rank 0 holds every parameter
        run->last_checkpoint = step;
        return;
    }
    float *params = (float *)malloc_check(model->num_held * sizeof(float));
    model_get_params(model, params);
    double bad = -1.0;  // a parameter that is not finite, on some rank
    for (size_t i = 0; i < model->num_held && bad < 0.0; i++) { bad = isfinite(params[i]) ? -1.0 : (double)i; }
    double any = bad >= 0.0;
    if (ep_ranks > 1) { dp_sum_doubles(&any, 1); }  // every rank holds some of the parameters
    if (any > 0.0) { fail_diverged(run, "a parameter", bad >= 0.0 ? params[(size_t)bad] : NAN, step); }
    char model_path[4096], state_path[4096], latest[4096];
    TrainingState state = {.step = step, .rng = run->rng, .steps = o->steps, .warmup = o->warmup, .lr = o->lr,
                           .weight_decay = o->weight_decay, .schedule_steps = o->schedule_steps};
    dataloader_get_position(&run->train, state.position);
    checkpoint_path(model_path, sizeof(model_path), o->out_dir, "model", step);
    checkpoint_path(state_path, sizeof(state_path), o->out_dir, "state", step);
    checkpoint_save(model, params, model_path);
    snprintf(latest, sizeof(latest), "%s/model.bin",
             o->out_dir);  // the latest model under a fixed name, for sampling
    checkpoint_save(model, params, latest);
    free(params);  // before the state's copies of the moments: less memory at its peak
    state_save(model, state_path, state);
    if (run->last_checkpoint >= 0 && run->last_checkpoint != step && dp_rank == 0) {
        checkpoint_path(model_path, sizeof(model_path), o->out_dir, "model", run->last_checkpoint);
        checkpoint_path(state_path, sizeof(state_path), o->out_dir, "state", run->last_checkpoint);
        remove(state_path);
        remove(model_path);
    }
    run->last_checkpoint = step;
}

// Resuming on another number of ranks works (every rank reads the same global batches and holds the
// whole state), but the gradients are then summed in another order: the run goes on correctly, not
// bit for bit as it would have on the same number of ranks.
static void note_rank_change(int saved_ranks) {
    if (saved_ranks == dp_ranks || dp_rank > 0) { return; }
    fprintf(stderr, "note: the checkpoint was written by a run on %d rank(s) and continues on %d: allowed, "
            "but the gradient sums are added in another order, so the run is not bitwise the one %d "
            "rank(s) would give\n", saved_ranks, dp_ranks, saved_ranks);
}

// A resumed run must be the run that wrote the checkpoint: the data and its order are checked by
// the loader's fingerprint, the schedule and the optimizer here.
static void check_same_run(const TrainingState *s, const Options *o, const char *path) {
    if (s->steps == 0) {  // version 1 files do not record them
        printf("note: %s does not record --steps, --warmup, --lr, --weight-decay: they are not checked\n",
               path);
        return;
    }
    const char *which = s->steps != o->steps ? "--steps"
                        : s->warmup != o->warmup ? "--warmup"
                        : s->lr != o->lr ? "--lr"
                        : s->weight_decay != o->weight_decay ? "--weight-decay"
                        : s->schedule_steps != o->schedule_steps ? "--schedule-steps" : NULL;
    if (which != NULL) {
        fail("%s was written by a run with --steps %d --warmup %d --lr %g --weight-decay %g --schedule-steps %d; "
             "this command's %s differs: resume with the run's settings (leave %s out%s), train past its end "
             "with --extend N, or start a new run from it with --init",
             path, s->steps, s->warmup, s->lr, s->weight_decay, s->schedule_steps, which, which,
             o->settings_saved ? ": options.txt has them" : "");
    }
}

// --resume: the newest complete checkpoint of the directory, which must belong to this run.
static void resume_run(Run *run) {
    Options *o = &run->o;
    int step = latest_checkpoint(o->resume_dir);
    if (step < 0) {
        fail("--resume %s: no complete checkpoint (model_*.bin with state_*.bin) found", o->resume_dir);
    }
    char model_path[4096], state_path[4096];
    checkpoint_path(model_path, sizeof(model_path), o->resume_dir, "model", step);
    checkpoint_path(state_path, sizeof(state_path), o->resume_dir, "state", step);
    model_load(&run->model, model_path);
    TrainingState state = state_load(&run->model, state_path);
    if (state.step != step) { fail("%s says step %d, its name says %d", state_path, state.step, step); }
    check_same_run(&state, o, state_path);
    if (o->extend > 0) {  // the schedule keeps its length; the steps after it run at its final rate
        if (o->schedule_steps == 0) { o->schedule_steps = o->steps; }
        if (o->extend > INT_MAX - o->steps) { fail("--extend %d: more than %d steps in all", o->extend, INT_MAX); }
        o->steps += o->extend;
        printf("extending the run by %d steps to %d: the learning rate stays at %g (a tenth of --lr) after "
               "step %d\n", o->extend, o->steps, 0.1f * o->lr, o->schedule_steps);
    }
    note_rank_change(state.ranks > 0 ? state.ranks : 1);
    dataloader_set_position(&run->train, state.position, state_path);
    run->rng = state.rng;
    run->start_step = step;
    run->resumed_here = same_directory(o->resume_dir, o->out_dir);
    run->last_checkpoint = run->resumed_here ? step : -1;
    printf("resuming from %s and %s: step %d of %d\n", model_path, state_path, step, o->steps);
}

// The model of the run: the newest checkpoint of --resume, the file of --init, or a fresh model
// shaped by the options and the data's vocabulary.
static void load_or_init_model(Run *run) {
    const Options *o = &run->o;
    run->start_step = 0;
    run->resumed_here = 0;
    run->last_checkpoint = -1;
    if (o->resume_dir != NULL) {
        resume_run(run);
    } else if (o->init_path != NULL) {
        model_load(&run->model, o->init_path);
    } else {
        ModelConfig config;
        RouterConfig router;
        configure_model(o, run->train.vocab_size, run->train.vocab_kind, &config, &router);
        config.vocab_hash = run->train.vocab_hash;  // which tokenizer: recorded in the model file
        model_init(&run->model, &config, &router, (uint64_t)o->seed);
    }
    // not in the model file: a checkpoint runs in either precision
    run->model.precision = strcmp(o->precision, "bf16") == 0 ? BF16 : FLOAT32;
    if ((o->init_path != NULL || o->resume_dir != NULL) && o->model_options_given > 0) {
        fprintf(stderr,
                "note: the architecture and routing come from the checkpoint; %d model or routing option(s) "
                "ignored\n",
                o->model_options_given);
    }
}

// A loader's tokens must fit the model (its vocabulary is the training data's when it is new).
static void check_vocabulary(const DataLoader *d, const char *what, const ModelConfig *c,
                             const char *source) {
    if (d->vocab_size > c->vocab_size) {
        fail("%s (%s): its vocabulary (%d %s tokens) does not fit the model's (%d %s tokens, %s)",
             d->shard_path[0], what, d->vocab_size, vocab_kind_name(d->vocab_kind), c->vocab_size,
             vocab_kind_name(c->vocab_kind), source);
    }
    if (d->vocab_kind != VOCAB_UNKNOWN && c->vocab_kind != VOCAB_UNKNOWN && d->vocab_kind != c->vocab_kind) {
        fail("%s (%s) holds %s tokens but the model uses %s tokens (%s)", d->shard_path[0], what,
             vocab_kind_name(d->vocab_kind), vocab_kind_name(c->vocab_kind), source);
    }
    if (d->vocab_hash != 0 && c->vocab_hash != 0 && d->vocab_hash != c->vocab_hash) {
        fail("%s (%s) was made with another vocabulary of %d tokens than the model's (vocabulary hash %016llx, "
             "the model's %016llx, %s): a tokenizer trained on another text", d->shard_path[0], what,
             d->vocab_size, (unsigned long long)d->vocab_hash, (unsigned long long)c->vocab_hash, source);
    }
    if ((d->vocab_hash == 0) != (c->vocab_hash == 0) && c->vocab_kind != VOCAB_BYTES && dp_rank == 0) {
        printf("note: %s records no vocabulary hash (written before it was recorded): its tokens are taken on "
               "the vocabulary's kind and size alone\n", d->vocab_hash == 0 ? d->shard_path[0] : source);
    }
}

// The data must fit the model: vocabulary, sequence length, steps left.
static void check_data_fits_model(const Run *run) {
    const ModelConfig *c = &run->model.config;
    const Options *o = &run->o;
    const char *source = o->resume_dir  ? o->resume_dir
                         : o->init_path ? o->init_path
                                        : "made for the training data";
    check_vocabulary(&run->train, "training data", c, source);
    if (run->have_val) { check_vocabulary(&run->val, "validation data", c, source); }
    if (o->seq_len > c->max_seq_len) {
        fail("--seq-len %d exceeds the model's maximum sequence length %d", o->seq_len, c->max_seq_len);
    }
    if (run->start_step >= o->steps) {
        fail("the run in %s is finished (step %d of --steps %d): train it further with --resume %s --extend N",
             o->resume_dir ? o->resume_dir : o->out_dir, run->start_step, o->steps,
             o->resume_dir ? o->resume_dir : o->out_dir);
    }
}

// The parameters each rank holds (with --expert-parallel G: the shared ones and W1, W3, W2 of its
// E/G experts), 16 bytes each with their gradients and AdamW moments. Every rank calls it.
static void print_held(const Model *model) {
    const ModelConfig *c = &model->config;
    double *held = (double *)calloc_check(dp_ranks, sizeof(double));
    held[dp_rank] = (double)model->num_held;
    dp_sum_doubles(held, dp_ranks);
    size_t per_expert = 3 * (size_t)c->num_layers * c->expert_hidden * c->channels;
    size_t shared = model->num_parameters - per_expert * c->num_experts;
    for (int r = 0; r < dp_ranks; r++) {
        printf("memory: rank %d holds %.0f parameters = %zu shared + %d of %d experts x %zu, %.1f MB with "
               "gradients and AdamW moments\n", r, held[r], shared, model->experts, c->num_experts, per_expert,
               16.0 * held[r] / 1e6);
    }
    free(held);
}

static void print_configuration(const Run *run) {
    const ModelConfig *c = &run->model.config;
    const RouterConfig *rc = &run->model.router;
    double inactive = (double)c->num_layers * (c->num_experts - 1) * 3 * c->expert_hidden * c->channels;
    printf("model: L=%d C=%d NH=%d E=%d H=%d V=%d (%s) max T=%d, %.2fM parameters (%.2fM active at |S|=1)\n",
           c->num_layers, c->channels, c->num_heads, c->num_experts, c->expert_hidden, c->vocab_size,
           vocab_kind_name(c->vocab_kind), c->max_seq_len, run->model.num_parameters / 1e6,
           (run->model.num_parameters - inactive) / 1e6);
    if (rc->routing == ROUTING_TOPK) {
        printf("routing: topk, k=%d", rc->k);
    } else if (rc->routing == ROUTING_TOPP) {
        printf("routing: topp, p=%g", rc->p);
    } else {
        printf("routing: dtopp, %s controller, target %g of %d experts, Kp=%g Ki=%g p0=%g",
               rc->controller ? "per-layer" : "global", rc->tgt, c->num_experts, rc->Kp, rc->Ki, rc->p0);
    }
    printf(", DRN %s, %s gates, lb %g, entropy %g\n", rc->drn ? "on" : "off",
           rc->renorm ? "renormalised" : "raw", rc->lb_coef, rc->ent_coef);
    printf("data: %zu training tokens (%zu batches of %dx%d), %zu validation tokens\n", run->train.num_tokens,
           run->train.num_batches, run->o.batch, run->o.seq_len,
           run->have_val ? run->val.num_tokens : (size_t)0);
    print_held(&run->model);
    printf("threads: %d", omp_threads());
    if (getenv("OMP_WAIT_POLICY") != NULL) { printf(", OMP_WAIT_POLICY=%s", getenv("OMP_WAIT_POLICY")); }
    if (dp_ranks > 1 || run->o.grad_accum > 1) {  // the split of each step's batch
        printf(" per rank; %d rank(s) x %d micro-batch(es) of %d sequences", dp_ranks, run->o.grad_accum,
               run->o.batch / (dp_ranks * run->o.grad_accum));
    }
    printf("\n\n");
}

// The tokenizer of the run's vocabulary, for samples: --tokenizer, or the one the model records, found
// in the output directory, the folder of --resume or --init, next to the training shards (prepro's
// PREFIX_tokenizer.bin for PREFIX_train*.bin), or GPT-2's tokenizer.bin. Needed only for samples.
static void find_run_tokenizer(Run *run) {
    const Options *o = &run->o;
    const ModelConfig *c = &run->model.config;
    char places[5][4200];
    int n = 0;
    snprintf(places[n++], sizeof(places[0]), "%s/tokenizer.bin", o->out_dir);
    if (o->resume_dir != NULL) { snprintf(places[n++], sizeof(places[0]), "%s/tokenizer.bin", o->resume_dir); }
    if (o->init_path != NULL) { beside(places[n++], sizeof(places[0]), o->init_path, "tokenizer.bin"); }
    const char *shard = run->train.shard_path[0], *base = strrchr(shard, '/'), *split = NULL;
    for (const char *p = base ? base : shard; (p = strstr(p, "_train")) != NULL; p++) { split = p; }
    if (split != NULL) { snprintf(places[n++], sizeof(places[0]), "%.*s_tokenizer.bin", (int)(split - shard), shard); }
    snprintf(places[n++], sizeof(places[0]), "tokenizer.bin");
    const char *list[5];
    for (int i = 0; i < n; i++) { list[i] = places[i]; }
    const char *source = o->resume_dir ? o->resume_dir : o->init_path ? o->init_path : "the model";
    int needed = o->sample_tokens > 0;
    if (!needed && c->vocab_kind != VOCAB_BPE) {  // nothing to print, nothing to keep
        memset(&run->codec, 0, sizeof(run->codec));
        return;
    }
    if (!codec_find(&run->codec, o->tokenizer_path, list, n, c, source, needed) && c->vocab_kind == VOCAB_BPE &&
        dp_rank == 0) {
        printf("note: no tokenizer file holds the model's vocabulary; sampling the model will need --tokenizer\n");
    }
}

// A trained vocabulary's tokenizer goes into the output directory (OUT/tokenizer.bin), so that the
// model's folder holds all that sampling needs; GPT-2's tokenizer.bin is the project's.
static void keep_tokenizer(const Run *run) {
    char path[4200];
    snprintf(path, sizeof(path), "%s/tokenizer.bin", run->o.out_dir);
    struct stat a, b;
    if (!run->codec.loaded || run->codec.tokenizer.vocab_kind != VOCAB_BPE ||
        (stat(path, &a) == 0 && stat(run->codec.path, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)) {
        return;
    }
    FILE *in = fopen(run->codec.path, "rb");
    if (in == NULL) { fail("cannot read %s: %s", run->codec.path, strerror(errno)); }
    char tmp[4300], buffer[65536];
    FILE *out = open_for_atomic_write(path, tmp, sizeof(tmp));
    for (size_t n; (n = fread(buffer, 1, sizeof(buffer), in)) > 0;) { fwrite_check(buffer, 1, n, out, tmp); }
    if (ferror(in)) { fail("cannot read %s", run->codec.path); }
    fclose(in);
    finish_atomic_write(out, tmp, path);
}

// The output directory: a new run starts in one without another run's model or checkpoints; a run
// resumed there drops what the interruption left behind. Then every output file is opened, so
// that a bad path fails now and not after the run.
static void prepare_output(Run *run) {
    const Options *o = &run->o;
    char log_path[4200];
    snprintf(log_path, sizeof(log_path), "%s/log.csv", o->out_dir);
    if (run->resumed_here) {
        remove_leftovers(o->out_dir, run->start_step);
        truncate_log(log_path, run->start_step);
    } else {
        refuse_other_run(o->out_dir);
        remove_leftovers(o->out_dir, -1);
        if (access(log_path, F_OK) == 0) {
            printf("note: replacing %s of a run that left no checkpoint\n", log_path);
        }
    }
    run->routing_dump = NULL;
    if (o->routing_dump != NULL) {
        run->routing_dump = fopen_output(o->routing_dump, "w");
    }
    run->log = open_log(log_path, &run->model, run->resumed_here);
    snprintf(log_path, sizeof(log_path), "%s/options.txt", o->out_dir);
    save_options(o, log_path);  // what --resume takes back
    keep_tokenizer(run);
}

// ----------------------------------------------------------------------------
// Ctrl-C and SIGTERM: the step in progress finishes, a checkpoint is written, the program says where
// and exits with 128 + the signal's number. A second signal stops at once (its default action).

static volatile sig_atomic_t stop_signal = 0;

static void on_stop_signal(int sig) {
    stop_signal = sig;
    static const char msg[] = "\n(stopping after this step with a checkpoint; interrupt again to stop at once)\n";
    ssize_t ignored = write(STDERR_FILENO, msg, sizeof(msg) - 1);
    (void)ignored;
}

static void catch_stop_signals(void) {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = on_stop_signal;
    action.sa_flags = SA_RESETHAND;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
}

// Whether the run stops after this step: --stop-at, or a signal (on any rank: they stop together).
static int stop_after(int step, const Options *o) {
    double signalled = stop_signal;
    if (dp_ranks > 1) { dp_sum_doubles(&signalled, 1); }
    return step + 1 == o->stop_at || signalled != 0;
}

// After the checkpoint of a stop: where it is and how to go on; the program's exit status.
static int report_stop(const Run *run, int steps_done) {
    const char *dir = run->o.out_dir;
    printf("%s at step %d of %d: the checkpoint is %s/model_%08d.bin with state_%08d.bin; continue with "
           "--resume %s (make train: RESUME=1)\n", stop_signal ? "interrupted" : "stopped", steps_done,
           run->o.steps, dir, steps_done, steps_done, dir);
    return stop_signal ? 128 + (stop_signal == SIGINT ? SIGINT : SIGTERM) : EXIT_SUCCESS;
}

// --batch is split into --grad-accum micro-batches on each rank: they must divide it.
static void check_parallel_options(Options *o) {
    if (o->grad_accum < 1 || o->check_ranks < 0) { fail("--grad-accum must be >= 1 and --check-ranks >= 0"); }
    if (o->batch % (o->grad_accum * dp_ranks) != 0) {
        fail("--batch %d does not split into --grad-accum %d micro-batches on each of %d rank(s)", o->batch,
             o->grad_accum, dp_ranks);
    }
#ifdef DTOPP_CUDA
    if (o->expert_parallel > 1) {  // not written without a GPU to run it on
        fail("--expert-parallel %d: the CUDA build has no expert parallelism yet (the CPU MPI build has)",
             o->expert_parallel);
    }
#endif
    ep_init(o->expert_parallel);
    if (dp_rank > 0) {  // rank 0 alone writes the routing dump, and samples unless its experts are spread
        o->sample_tokens = ep_ranks > 1 ? o->sample_tokens : 0;  // then all ranks sample, each its experts
        o->routing_dump = NULL;
    }
}

// Everything before the first step: data, model, output directory, log, sampler. Rank 0 alone
// writes to the output directory.
static void run_setup(Run *run) {
    check_parallel_options(&run->o);
    const Options *o = &run->o;
    run->rng = (uint64_t)o->seed ^ 0x5DEECE66Dull;  // the sampler's stream
    dataloader_init(&run->train, o->train_pattern, o->batch, o->seq_len, o->shuffle,
                    (unsigned long long)o->seed);
    run->have_val = o->val_pattern != NULL && o->val_pattern[0] != '\0';
    if (run->have_val) { dataloader_init(&run->val, o->val_pattern, o->batch, o->seq_len, 0, 0); }
    if (dp_rank == 0) { ensure_directory(o->out_dir); }
    catch_stop_signals();
    load_or_init_model(run);
    if (run->model.config.num_experts % ep_ranks != 0) {
        fail("--expert-parallel %d does not divide the model's %d experts", ep_ranks, run->model.config.num_experts);
    }
    check_data_fits_model(run);
    find_run_tokenizer(run);
    run->log = run->routing_dump = NULL;
    if (dp_rank == 0) { prepare_output(run); }
    print_configuration(run);
    run->p_used = (float *)malloc_check(run->model.config.num_layers * sizeof(float));
    step_totals_alloc(&run->totals, &run->model.config);
}

static void run_free(Run *run) {
    if (run->log != NULL) { close_log(run->log); }
    if (run->routing_dump != NULL) { fclose_check(run->routing_dump, run->o.routing_dump); }
    free(run->p_used);
    step_totals_free(&run->totals);
    if (run->codec.loaded) { tokenizer_free(&run->codec.tokenizer); }
    dataloader_free(&run->train);
    if (run->have_val) { dataloader_free(&run->val); }
    model_free(&run->model);
}

static int is_due(int step, int every) { return every > 0 && step % every == 0; }

static uint64_t fnv1a(uint64_t hash, const void *data, size_t bytes) {
    const unsigned char *byte = (const unsigned char *)data;
    for (size_t j = 0; j < bytes; j++) { hash = (hash ^ byte[j]) * 0x100000001b3ull; }
    return hash;
}

// --check-ranks: a hash of the parameters and the controller state, compared across the ranks; with
// --expert-parallel, the experts' W1, W3, W2 only across the ranks that hold the same experts.
static void check_ranks_agree(const Model *model, int step) {
    float *params = (float *)malloc_check(model->num_held * sizeof(float));
    model_get_params(model, params);
    size_t L = model->config.num_layers * sizeof(float), offset = 0;
    uint64_t shared = fnv1a(fnv1a(0xcbf29ce484222325ull, model->threshold, L), model->integral, L);
    uint64_t experts = 0xcbf29ce484222325ull;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; offset += model->param_sizes[i++]) {
        size_t bytes = model->param_sizes[i] * sizeof(float);
        if (param_is_expert[i]) {
            experts = fnv1a(experts, params + offset, bytes);
        } else {
            shared = fnv1a(shared, params + offset, bytes);
        }
    }
    dp_check_same(shared, "parameters or controller state", step, 1);
    dp_check_same(experts, "expert parameters", step, ep_ranks);
    free(params);
}

// A step far slower than the run's recent median (three in a row, 4x or more) is most likely another
// program on the cores, which spinning OpenMP threads make far worse: said once, with what helps.
static void watch_speed(Run *run, double dt) {
    int n = run->steps_timed < 64 ? run->steps_timed : 64;
    if (n >= 16 && !run->slowdown_noted) {
        double sorted[64];
        memcpy(sorted, run->recent_dt, n * sizeof(double));
        for (int i = 1; i < n; i++) {  // insertion sort
            for (int j = i; j > 0 && sorted[j - 1] > sorted[j]; j--) {
                double t = sorted[j];
                sorted[j] = sorted[j - 1];
                sorted[j - 1] = t;
            }
        }
        double median = sorted[n / 2];
        run->slow_in_a_row = dt > 4.0 * median ? run->slow_in_a_row + 1 : 0;
        if (run->slow_in_a_row == 3) {
            const char *policy = getenv("OMP_WAIT_POLICY");
            int passive = policy != NULL && strcmp(policy, "passive") == 0;
            printf("note: steps take %.1fx this run's recent median (%.0f ms): another program is probably using "
                   "the cores. OMP_WAIT_POLICY is %s%s; --threads with fewer threads than free cores helps too\n",
                   dt / median, 1000 * median, policy ? policy : "unset",
                   passive ? "" : ": OMP_WAIT_POLICY=passive stops idle threads spinning");
            run->slowdown_noted = 1;
        }
    }
    run->recent_dt[run->steps_timed++ % 64] = dt;
}

// The progress line of a step, and its row of log.csv.
static void report_step(Run *run, int step, float val_loss, float lr, float grad_norm, double dt,
                        double eta) {
    const Model *model = &run->model;
    double tokens_per_s = run->o.batch * run->o.seq_len / dt;
    printf("step %5d/%d | loss %.4f | lr %.2e | p %.3f | experts %.2f", step + 1, run->o.steps,
           run->totals.losses[0], lr, run->p_used[0], run->totals.stats.activated);
    if (model->router.first_layer_k > 0) {  // the target is of the layers the threshold routes: 1 .. L-1
        int L = model->config.num_layers;
        printf(", layers 1-%d %.2f (target %.2f)", L - 1, mean_over_layers(run->totals.stats.layer_mean, 1, L),
               model->router.tgt);
    } else if (model->router.routing == ROUTING_DTOPP) {
        printf(" (target %.2f)", model->router.tgt);
    }
    printf(" | %.0f tok/s | %dm%02ds left\n", tokens_per_s, (int)(eta / 60), (int)eta % 60);
    if (step > run->start_step) { watch_speed(run, dt); }  // the first step pays for allocations
    fflush(stdout);
    if (run->log != NULL) {
        log_step(run->log, model, &run->totals.stats, run->totals.losses, run->p_used, step + 1, val_loss, lr,
                 grad_norm, tokens_per_s);
    }
}

// A sample at `step`, or after training (step -1).
static void print_sample(Run *run, int step) {
    if (step >= 0) {
        printf("--- sample at step %d:\n", step);
    } else {
        printf("--- sample after training:\n");
    }
    const Options *o = &run->o;
    generate_text(&run->model, &run->codec, o->prompt, o->sample_tokens, o->temperature, o->top_k, &run->rng);
    printf("---\n");
}

#endif  // RUN_H
