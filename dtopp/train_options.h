/*
train_options.h: the command line of train_dtopp: its option table (names, ranges, help; parsed by
options.h), the defaults, the named model sizes (--model), and the model and router configuration
the options describe.
*/
#ifndef TRAIN_OPTIONS_H
#define TRAIN_OPTIONS_H

#include "options.h"  // defines: OptionSpec, parse_option_table, print_option_table

// Named model sizes; explicit options override any field.
typedef struct {
    const char *name;
    int layers, channels, heads, experts, expert_hidden;
} Preset;
static const Preset presets[] = {
    {"tiny", 2, 64, 2, 8, 64},      // seconds a step on a laptop: for tests
    {"small", 4, 128, 4, 8, 128},   // the default: learns TinyShakespeare's form in minutes on 2 cores
    {"medium", 6, 256, 8, 16, 256},
    {"gpt2-moe", 12, 768, 12, 64, 384},  // GPT-2 small's trunk with 64 experts, for the GPU
};

typedef struct {
    // data and files
    const char *train_pattern, *val_pattern, *tokenizer_path, *out_dir, *init_path, *resume_dir;
    // model (negative: take the preset's value)
    const char *preset;
    int layers, channels, heads, experts, expert_hidden, max_seq_len;
    // routing
    const char *routing, *controller;
    int drn, renorm, k;  // drn < 0: the mode's default
    int first_layer_k;   // layer 0 on a fixed top-k (0: routed as the rest)
    float p, tgt, Kp, Ki, p0, pmin, pmax, theta_init, lb_coef, ent_coef;  // ent_coef < 0: the mode's default
    // training
    int batch, seq_len, steps, warmup, shuffle, threads;
    int schedule_steps, extend;  // the learning-rate schedule's length (0: --steps); steps past a resumed run's
    int grad_accum, check_ranks;  // micro-batches per step and rank; steps between replica checks
    int expert_parallel;          // ranks that share the experts of every layer (doc/parallel.md)
    const char *precision;        // fp32 or bf16: the operands of the large products
    float lr, weight_decay;
    long long seed;
    // evaluation, sampling, checkpoints
    int eval_every, eval_batches, sample_every, sample_tokens, top_k, checkpoint_every, stop_at, generate;
    float temperature;
    const char *prompt;
    const char *routing_dump;
    const char *explain, *html;  // --explain TEXT (dtopp/explain.h), its page
    int explain_window;
    int model_options_given;  // how many architecture or routing options the command line set
    int settings_saved;       // --resume found the run's options.txt
} Options;

#define MAX_THREADS 1024  // far more is no use, and libgomp crashes (stack overflow) on 100,000

static int option_specs(Options *o, OptionSpec *specs) {
    OptionSpec list[] = {
        {"train", 's', &o->train_pattern, 0, 0, "training shards (glob pattern)", 0},
        {"val", 's', &o->val_pattern, 0, 0, "validation shards (glob pattern; empty: none)", 0},
        {"tokenizer", 's', &o->tokenizer_path, 0, 0, "tokenizer file for prompts and samples (default: the "
         "model's, found by its vocabulary hash in OUT, next to the shards, or GPT-2's tokenizer.bin)", 0},
        {"out", 's', &o->out_dir, 0, 0, "output directory: log.csv, model.bin, checkpoints", 0},
        {"init", 's', &o->init_path, 0, 0,
         "start from this model checkpoint (architecture and routing from the file)", 0},
        {"resume", 's', &o->resume_dir, 0, 0, "continue the run in this directory with its settings (options.txt)", 0},
        {"model", 's', &o->preset, 0, 0, "size preset: tiny, small, medium, gpt2-moe", 1},
        {"layers", 'i', &o->layers, 1, MAX_SIZE, "L, transformer blocks", 1},
        {"channels", 'i', &o->channels, 2, MAX_SIZE, "C, model width", 1},
        {"heads", 'i', &o->heads, 1, MAX_SIZE, "NH, attention heads", 1},
        {"experts", 'i', &o->experts, 1, MAX_EXPERTS, "E, experts per layer", 1},
        {"expert-hidden", 'i', &o->expert_hidden, 1, MAX_SIZE, "H, hidden width of one expert", 1},
        {"max-seq-len", 'i', &o->max_seq_len, 1, MAX_SIZE,
         "longest sequence the model accepts, for sampling (default: 1024, at least seq-len)", 1},
        {"routing", 's', &o->routing, 0, 0, "topk, topp or dtopp", 1},
        {"controller", 's', &o->controller, 0, 0, "dtopp: global (one p) or layer (one p per layer)", 1},
        {"drn", 'i', &o->drn, 0, 1, "Dynamic Routing Normalization 1/0 (default: 1 for dtopp, else 0)", 1},
        {"renorm", 'i', &o->renorm, 0, 1, "renormalise the gates over the selected experts 1/0", 1},
        {"k", 'i', &o->k, 1, MAX_EXPERTS, "topk: experts per token", 1},
        {"first-layer-k", 'i', &o->first_layer_k, 0, MAX_EXPERTS,
         "topp, dtopp: layer 0 on a fixed top-k of this many experts, left out of the threshold's budget "
         "(0: routed as the other layers)", 1},
        {"p", 'f', &o->p, 0, 1, "topp: the fixed threshold", 1},
        {"tgt", 'f', &o->tgt, 1, MAX_EXPERTS, "dtopp: target average number of activated experts", 1},
        {"kp", 'f', &o->Kp, ANY_FLOAT, "dtopp: proportional gain", 1},
        {"ki", 'f', &o->Ki, ANY_FLOAT, "dtopp: integral gain", 1},
        {"p0", 'f', &o->p0, 0, 1, "dtopp: starting and central threshold", 1},
        {"pmin", 'f', &o->pmin, 0, 1, "dtopp: lowest threshold", 1},
        {"pmax", 'f', &o->pmax, 0, 1, "dtopp: highest threshold", 1},
        {"theta-init", 'f', &o->theta_init, ANY_FLOAT, "initial DRN scale", 1},
        {"lb-coef", 'f', &o->lb_coef, NOT_NEGATIVE_FLOAT, "load-balance loss coefficient", 1},
        {"ent-coef", 'f', &o->ent_coef, NOT_NEGATIVE_FLOAT,
         "router entropy loss coefficient (default: 1e-3 top-p modes, 0 topk)", 1},
        {"batch", 'i', &o->batch, 1, MAX_SIZE, "B, sequences per step", 0},
        {"seq-len", 'i', &o->seq_len, 1, MAX_SIZE, "T, tokens per sequence", 0},
        {"steps", 'i', &o->steps, 1, INT_MAX, "optimizer steps", 0},
        {"schedule-steps", 'i', &o->schedule_steps, NOT_NEGATIVE_INT, "learning-rate schedule's length: "
         "cosine decay to a tenth of --lr at this step, then constant (0: --steps)", 0},
        {"extend", 'i', &o->extend, NOT_NEGATIVE_INT, "with --resume: this many steps past the run's --steps, "
         "at its schedule's final rate, a tenth of --lr (the schedule keeps its length)", 0},
        {"lr", 'f', &o->lr, NOT_NEGATIVE_FLOAT, "peak learning rate", 0},
        {"warmup", 'i', &o->warmup, 1, INT_MAX, "learning-rate warm-up steps", 0},
        {"weight-decay", 'f', &o->weight_decay, NOT_NEGATIVE_FLOAT, "AdamW weight decay of the matrices", 0},
        {"shuffle", 'i', &o->shuffle, 0, 1, "shuffle the training windows 1/0", 0},
        {"seed", 'l', &o->seed, 0, 0, "seed of the initialisation, the shuffle and the sampler", 0},
        {"threads", 'i', &o->threads, 0, MAX_THREADS, "OpenMP threads (0: all)", 0},
        {"precision", 's', &o->precision, 0, 0, "fp32 or bf16: the operands of the large matrix products "
         "(bf16: rounded, summed in float32; the router, the master weights and AdamW stay float32)", 0},
        {"grad-accum", 'i', &o->grad_accum, 1, MAX_SIZE,
         "micro-batches per step and rank (--batch is split over all)", 0},
        {"expert-parallel", 'i', &o->expert_parallel, 1, MAX_SIZE,
         "ranks that split the experts of every layer between them (MPI build)", 0},
        {"check-ranks", 'i', &o->check_ranks, NOT_NEGATIVE_INT,
         "steps between checks that ranks hold one model (0: never)", 0},
        {"eval-every", 'i', &o->eval_every, NOT_NEGATIVE_INT,
         "steps between validations (0: only at the end)", 0},
        {"eval-batches", 'i', &o->eval_batches, NOT_NEGATIVE_INT, "validation batches", 0},
        {"sample-every", 'i', &o->sample_every, NOT_NEGATIVE_INT,
         "steps between samples (0: only at the end)", 0},
        {"sample-tokens", 'i', &o->sample_tokens, 0, MAX_SIZE, "tokens per sample (0: no samples)", 0},
        {"prompt", 's', &o->prompt, 0, 0, "text the samples start from (default: none)", 0},
        {"temperature", 'f', &o->temperature, NOT_NEGATIVE_FLOAT,
         "sampling temperature (0: most likely token)", 0},
        {"top-k", 'i', &o->top_k, NOT_NEGATIVE_INT, "sample from the top k tokens (0: all)", 0},
        {"checkpoint-every", 'i', &o->checkpoint_every, NOT_NEGATIVE_INT,
         "steps between checkpoints (0: only at the end)", 0},
        {"routing-dump", 's', &o->routing_dump, 0, 0,
         "at the last validation, write every token's |S| per layer and loss to this CSV", 0},
        {"stop-at", 'i', &o->stop_at, NOT_NEGATIVE_INT,
         "stop after this step with a checkpoint (0: run to --steps); continue with --resume", 0},
        {"generate", 'i', &o->generate, 0, MAX_SIZE,
         "with --init: print this many tokens after --prompt and exit", 0},
        {"explain", 's', &o->explain, 0, 0,
         "with --init: show how the router spends its experts on this text file, token by token, and exit", 0},
        {"html", 's', &o->html, 0, 0, "with --explain: write the page here (default: colours on the terminal)", 0},
        {"explain-window", 'i', &o->explain_window, NOT_NEGATIVE_INT,
         "with --explain: tokens per forward pass (0: the model's longest sequence)", 0},
    };
    int n = (int)(sizeof(list) / sizeof(list[0]));
    if (specs != NULL) { memcpy(specs, list, sizeof(list)); }
    return n;
}

static void default_options(Options *o) {
    memset(o, 0, sizeof(*o));
    o->train_pattern = "data/train_bytes_train.bin";  // what `make train` writes
    o->val_pattern = "data/train_bytes_val.bin";
    o->tokenizer_path = NULL;  // found by the model's vocabulary hash (sampler.h)
    o->out_dir = "out";
    o->init_path = o->resume_dir = NULL;
    o->preset = "small";
    o->layers = o->channels = o->heads = o->experts = o->expert_hidden = o->max_seq_len = -1;
    o->routing = "dtopp";
    o->controller = "global";
    o->drn = -1;
    o->renorm = 1;
    o->k = 2;
    o->p = 0.5f;
    o->tgt = 2.0f;
    o->Kp = 0.1f;  // tuned: doc/results.md (the spec's provisional values were 0.3, 0.05, 0.5)
    o->Ki = 0.3f;
    o->p0 = 0.8f;
    o->pmin = 0.01f;
    o->pmax = 1.0f;
    o->theta_init = 1.0f;
    o->lb_coef = 1e-4f;
    o->ent_coef = -1.0f;
    o->batch = 16;
    o->seq_len = 64;
    o->steps = 600;
    o->schedule_steps = o->extend = 0;
    o->lr = 3e-3f;
    o->warmup = 30;
    o->weight_decay = 0.1f;
    o->shuffle = 1;
    o->seed = 1337;
    o->threads = 0;
    o->precision = "fp32";
    o->grad_accum = 1;
    o->expert_parallel = 1;
    o->check_ranks = 0;
    o->eval_every = 100;
    o->eval_batches = 10;
    o->sample_every = 200;
    o->sample_tokens = 128;
    o->prompt = "";
    o->temperature = 1.0f;
    o->top_k = 40;
    o->checkpoint_every = 200;
    o->routing_dump = NULL;
    o->stop_at = 0;
    o->generate = 0;
    o->explain = o->html = NULL;
    o->explain_window = 0;
}

static void print_usage(void) {
    Options defaults;
    default_options(&defaults);
    OptionSpec specs[64];
    int n = option_specs(&defaults, specs);
    printf("usage: train_dtopp [--option value ...]\n\n"
           "Trains a DTop-p Mixture-of-Experts language model on token shards written by prepro,\n"
           "or, with --init and --generate, samples from a trained one.\n\n");
    print_option_table(specs, n);
}

// What the ranges of the options table cannot say.
static void check_options(const Options *o);

// ----------------------------------------------------------------------------
// the settings a run saves (OUT/options.txt), which --resume takes back: one "--name value" line per
// option that shapes the run, with backslash and newline escaped as \\ and \n. The architecture
// and routing are in the model file; where the run is and what this command does are not saved.

static int option_is_saved(const OptionSpec *spec) {
    const char *not_saved[] = {"init", "resume", "out", "generate", "extend", "stop-at"};
    for (size_t i = 0; i < sizeof(not_saved) / sizeof(not_saved[0]); i++) {
        if (strcmp(spec->name, not_saved[i]) == 0) { return 0; }
    }
    return !spec->describes_model && !(spec->type == 's' && *(const char **)spec->value == NULL);
}

static void save_options(const Options *o, const char *path) {
    Options copy = *o;
    OptionSpec specs[64];
    int n = option_specs(&copy, specs);
    char tmp[4200];
    FILE *f = open_for_atomic_write(path, tmp, sizeof(tmp));
    for (int i = 0; i < n; i++) {
        if (!option_is_saved(&specs[i])) { continue; }
        fprintf(f, "--%s ", specs[i].name);
        switch (specs[i].type) {
            case 'i': fprintf(f, "%d", *(int *)specs[i].value); break;
            case 'f': {  // %g when it reads back as the same float, else all 9 digits
                char text[32];
                snprintf(text, sizeof(text), "%g", *(float *)specs[i].value);
                if ((float)strtod(text, NULL) != *(float *)specs[i].value) {
                    snprintf(text, sizeof(text), "%.9g", *(float *)specs[i].value);
                }
                fputs(text, f);
                break;
            }
            case 'l': fprintf(f, "%lld", *(long long *)specs[i].value); break;
            default:
                for (const char *c = *(const char **)specs[i].value; *c; c++) {
                    if (*c == '\\' || *c == '\n') {
                        fputs(*c == '\\' ? "\\\\" : "\\n", f);
                    } else {
                        fputc(*c, f);
                    }
                }
        }
        fputc('\n', f);
    }
    if (ferror(f)) { fail("cannot write %s", tmp); }
    finish_atomic_write(f, tmp, path);
}

static char *saved_options_text;  // the strings of options.txt: they live as long as the program

// Applies DIR/options.txt to the options of specs; returns 0 when there is none (a run of an older version).
static int load_saved_options(OptionSpec *specs, int n, const char *dir) {
    char path[4200];
    snprintf(path, sizeof(path), "%s/options.txt", dir);
    FILE *f = fopen(path, "rb");
    if (f == NULL) { return 0; }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (size < 0 || size > (1 << 20)) { fail("%s: not a settings file (%ld bytes)", path, size); }
    free(saved_options_text);  // parsed once in a program; the fuzz target parses many times
    char *text = saved_options_text = (char *)malloc_check((size_t)size + 1);
    if (fread(text, 1, (size_t)size, f) != (size_t)size) { fail("%s: read error", path); }
    fclose(f);
    text[size] = '\0';
    int line = 1;
    for (char *p = text, *end; *p != '\0'; p = end + 1, line++) {
        end = strchr(p, '\n');
        if (end == NULL) { fail("%s, line %d: cut off (no newline at its end)", path, line); }
        *end = '\0';
        char *space = strchr(p, ' ');
        if (strncmp(p, "--", 2) != 0 || space == NULL) { fail("%s, line %d: not \"--option value\"", path, line); }
        *space = '\0';
        int known = 0;
        for (int i = 0; i < n; i++) { known |= strcmp(p + 2, specs[i].name) == 0 && option_is_saved(&specs[i]); }
        if (!known) { fail("%s, line %d: %s is not a saved option of this program", path, line, p); }
        char *w = space + 1;  // unescape in place
        for (const char *r = space + 1; *r; r++) {
            *w++ = *r == '\\' && r[1] == 'n' ? (r++, '\n') : *r == '\\' && r[1] == '\\' ? (r++, '\\') : *r;
        }
        *w = '\0';
        char *args[3] = {path, p, space + 1};
        parse_option_table(specs, n, 3, args, print_usage);
    }
    return 1;
}

// The value of --name on the command line, or NULL.
static const char *command_line_option(int argc, char **argv, const char *name) {
    for (int a = 1; a + 1 < argc; a += 2) {
        if (strncmp(argv[a], "--", 2) == 0 && strcmp(argv[a] + 2, name) == 0) { return argv[a + 1]; }
    }
    return NULL;
}

// The defaults, then with --resume DIR the settings the run saved, then the command line, checked.
static void parse_options(Options *o, int argc, char **argv) {
    default_options(o);
    OptionSpec specs[64];
    int n = option_specs(o, specs);
    const char *resume = command_line_option(argc, argv, "resume");
    o->settings_saved = resume != NULL && load_saved_options(specs, n, resume);
    if (resume != NULL && !o->settings_saved) {
        printf("note: %s has no options.txt (a run of an older version): the settings come from this command "
               "line alone\n", resume);
    }
    o->model_options_given += parse_option_table(specs, n, argc, argv, print_usage);
    if (o->resume_dir != NULL && command_line_option(argc, argv, "out") == NULL) { o->out_dir = o->resume_dir; }
    check_options(o);
}

// The model and router configuration that the options describe, for a vocabulary of V tokens.
static void configure_model(const Options *o, int V, int vocab_kind, ModelConfig *c, RouterConfig *rc) {
    const Preset *preset = NULL;
    for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++) {
        if (strcmp(o->preset, presets[i].name) == 0) { preset = &presets[i]; }
    }
    if (preset == NULL) {
        fail("option --model: unknown preset '%s' (tiny, small, medium, gpt2-moe)", o->preset);
    }
    c->vocab_size = V;
    c->vocab_kind = vocab_kind;
    c->vocab_hash = 0;  // the caller sets the data's
    c->padded_vocab_size = padded_vocab(V);
    c->num_layers = o->layers >= 0 ? o->layers : preset->layers;
    c->channels = o->channels >= 0 ? o->channels : preset->channels;
    c->num_heads = o->heads >= 0 ? o->heads : preset->heads;
    c->num_experts = o->experts >= 0 ? o->experts : preset->experts;
    c->expert_hidden = o->expert_hidden >= 0 ? o->expert_hidden : preset->expert_hidden;
    c->max_seq_len = o->max_seq_len >= 0 ? o->max_seq_len : (o->seq_len > 1024 ? o->seq_len : 1024);
    const char *controllers[] = {"global", "layer"};
    rc->routing = parse_name(o->routing, routing_names, 3, "routing");
    rc->controller = parse_name(o->controller, controllers, 2, "controller");
    rc->drn = o->drn >= 0 ? o->drn : rc->routing == ROUTING_DTOPP;
    rc->renorm = o->renorm;
    rc->k = o->k;
    rc->first_layer_k = o->first_layer_k;
    rc->p = o->p;
    rc->tgt = o->tgt;
    rc->Kp = o->Kp;
    rc->Ki = o->Ki;
    rc->p0 = o->p0;
    rc->pmin = o->pmin;
    rc->pmax = o->pmax;
    rc->theta_init = o->theta_init;
    rc->lb_coef = o->lb_coef;
    rc->ent_coef = o->ent_coef >= 0.0f ? o->ent_coef : (rc->routing == ROUTING_TOPK ? 0.0f : 1e-3f);
}

static void check_options(const Options *o) {
    if (!(o->lr > 0.0f)) { fail("--lr must be > 0"); }
    if ((long long)o->batch * o->seq_len > MAX_SIZE) {
        fail("--batch x --seq-len is %lld tokens per step, more than %d", (long long)o->batch * o->seq_len,
             MAX_SIZE);
    }
    if (o->init_path != NULL && o->resume_dir != NULL) { fail("--init and --resume exclude each other"); }
    if (o->extend > 0 && o->resume_dir == NULL) { fail("--extend needs --resume DIR: it continues a run"); }
    if (o->generate > 0 && o->init_path == NULL) { fail("--generate needs --init MODEL.bin"); }
    if (o->explain != NULL && o->init_path == NULL) { fail("--explain needs --init MODEL.bin"); }
    if (o->html != NULL && o->explain == NULL) { fail("--html needs --explain TEXT_FILE"); }
    if (strcmp(o->precision, "fp32") != 0 && strcmp(o->precision, "bf16") != 0) {
        fail("--precision %s: fp32 or bf16", o->precision);
    }
#ifdef DTOPP_CUDA
    if (strcmp(o->precision, "bf16") == 0) {
        fail("--precision bf16: the CUDA build runs float32 only (doc/precision.md has the bf16 design it will follow)");
    }
#endif
}

#endif  // TRAIN_OPTIONS_H
