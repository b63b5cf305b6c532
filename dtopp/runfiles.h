/*
runfiles.h: the files of a run in its output directory, besides log.csv. A checkpoint is the pair
model_STEP.bin (the model file of train_dtopp.c) and state_STEP.bin (the training state: AdamW's
moments and step, the data loader's position, the sampler's random state, the run's settings);
latest_checkpoint finds the newest complete pair. A new run refuses a directory that holds another
run; a resumed one removes what an interruption left behind (older or incomplete pairs, ".tmp"
files) and the log rows after its checkpoint. It uses the model API, so it is included after it.
*/
#ifndef RUNFILES_H
#define RUNFILES_H

#include <errno.h>
#include <glob.h>
#include <sys/stat.h>
#include <unistd.h>

// ----------------------------------------------------------------------------
// training state files (doc/formats.md): optimizer moments, step, data position, sampler state,
// and the settings of the run. A checkpoint is the pair model_STEP.bin + state_STEP.bin; the newer
// pair is complete before the older one is removed, so a crash never leaves the run without a
// checkpoint.

// Version 2 added the run's settings (words 15-18); version 1 files are still read.
#define STATE_VERSION 2
static const int state_versions[] = {1, STATE_VERSION};

// What a state file holds besides the moments.
typedef struct {
    int step;               // optimizer steps of the run so far
    int adam_step;          // AdamW's step count (for its bias correction)
    long long position[4];  // the training data loader's position (dataloader_get_position)
    uint64_t rng;           // the sampler's random state
    int32_t param_check;    // the model's parameter count, low 31 bits: the pair must match
    // the settings that shape the rest of the run besides the data (whose fingerprint is in
    // position[3]): a resumed run must have the same, or it is another run (0 in version 1)
    int steps, warmup;
    float lr, weight_decay;
    int ranks;              // the processes that trained the run (0 in older files: one)
} TrainingState;

// The header of a state file (doc/formats.md); saving and loading both walk this table.
#define STATE_HEADER_FIELDS 10
static void state_header_fields(HeaderField *fields, TrainingState *s) {
    HeaderField list[STATE_HEADER_FIELDS] = {{2, 4, &s->step}, {3, 4, &s->adam_step}, {4, 32, s->position},
                                             {12, 8, &s->rng}, {14, 4, &s->param_check}, {15, 4, &s->steps},
                                             {16, 4, &s->warmup}, {17, 4, &s->lr}, {18, 4, &s->weight_decay},
                                             {19, 4, &s->ranks}};
    memcpy(fields, list, sizeof(list));
}

static void state_save(const Model *model, const char *path, TrainingState s) {
    s.adam_step = model->adam_step;
    s.param_check = (int32_t)(model->num_parameters & 0x7fffffff);
    s.ranks = dp_ranks;
    HeaderField fields[STATE_HEADER_FIELDS];
    state_header_fields(fields, &s);
    int32_t header[HEADER_WORDS] = {STATE_MAGIC, STATE_VERSION};
    header_pack(header, fields, STATE_HEADER_FIELDS);
    float *m = (float *)malloc_check(model->num_parameters * sizeof(float));
    float *v = (float *)malloc_check(model->num_parameters * sizeof(float));
    model_get_moments(model, m, v);
    char tmp[4096];
    FILE *f = open_for_atomic_write(path, tmp, sizeof(tmp));
    fwrite_check(header, sizeof(int32_t), HEADER_WORDS, f, tmp);
    fwrite_check(m, sizeof(float), model->num_parameters, f, tmp);
    fwrite_check(v, sizeof(float), model->num_parameters, f, tmp);
    finish_atomic_write(f, tmp, path);
    free(m);
    free(v);
}

// Restores the moments and AdamW's step into the model; returns the rest.
static TrainingState state_load(Model *model, const char *path) {
    int32_t header[HEADER_WORDS];
    long size;
    FILE *f = open_with_header(path, header, STATE_MAGIC, state_versions, 2, "training state", &size);
    TrainingState s;
    memset(&s, 0, sizeof(s));
    HeaderField fields[STATE_HEADER_FIELDS];
    state_header_fields(fields, &s);
    header_unpack(header, fields, header[1] == 1 ? 5 : STATE_HEADER_FIELDS);  // the fields of its version
    if (s.param_check != (int32_t)(model->num_parameters & 0x7fffffff)) {
        fail("%s belongs to a model of a different size", path);
    }
    // AdamW counts one step per optimizer step, so 1 <= adam_step <= step (and never overflows)
    if (s.step < 1 || s.adam_step < 1 || s.adam_step > s.step) {
        fail("%s: invalid step %d or AdamW step %d", path, s.step, s.adam_step);
    }
    check_payload_size(path, size, 2 * model->num_parameters * sizeof(float));
    model->adam_step = s.adam_step;
    float *m = (float *)malloc_check(model->num_parameters * sizeof(float));
    float *v = (float *)malloc_check(model->num_parameters * sizeof(float));
    fread_check(m, sizeof(float), model->num_parameters, f, path);
    fread_check(v, sizeof(float), model->num_parameters, f, path);
    fclose(f);
    check_finite(m, model->num_parameters, path, "first moment");
    check_finite(v, model->num_parameters, path, "second moment");
    for (size_t i = 0; i < model->num_parameters; i++) {
        if (v[i] < 0.0f) { fail("%s: second moment %zu is negative (%g)", path, i, v[i]); }
    }
    model_set_moments(model, m, v);
    free(m);
    free(v);
    return s;
}

static void checkpoint_path(char *out, size_t size, const char *dir, const char *kind, int step) {
    snprintf(out, size, "%s/%s_%08d.bin", dir, kind, step);
}

// The step of a checkpoint file's name (model_STEP.bin, state_STEP.bin), or -1.
static int checkpoint_step(const char *path, const char *kind) {
    const char *slash = strrchr(path, '/'), *name = slash ? slash + 1 : path;
    char format[64];
    int step, end = 0;
    snprintf(format, sizeof(format), "%s_%%d.bin%%n", kind);
    if (sscanf(name, format, &step, &end) != 1 || name[end] != '\0') { return -1; }
    return step >= 0 ? step : -1;
}

// The highest step with both files present, or -1.
static int latest_checkpoint(const char *dir) {
    char pattern[4096];
    snprintf(pattern, sizeof(pattern), "%s/state_*.bin", dir);
    glob_t found;
    int best = -1;
    if (glob(pattern, 0, NULL, &found) == 0) {
        for (size_t i = 0; i < found.gl_pathc; i++) {
            int step = checkpoint_step(found.gl_pathv[i], "state");
            char model_path[4096];
            checkpoint_path(model_path, sizeof(model_path), dir, "model", step);
            if (step >= 0 && access(model_path, R_OK) == 0 && step > best) { best = step; }
        }
        globfree(&found);
    }
    return best;
}

static void ensure_directory(const char *dir) {
    char cmd[4200];
    struct stat st;
    if (stat(dir, &st) != 0) {
        if (mkdir(dir, 0755) != 0) { fail("cannot create output directory %s: %s", dir, strerror(errno)); }
    } else if (!S_ISDIR(st.st_mode)) {
        fail("output directory %s is not a directory", dir);
    }
    snprintf(cmd, sizeof(cmd), "%s/.write_test", dir);
    FILE *f = fopen(cmd, "w");
    if (f == NULL) { fail("output directory %s is not writable: %s", dir, strerror(errno)); }
    fclose(f);
    remove(cmd);
}

// Whether two paths name the same directory ("out", "out/", "./out"): compared by identity.
static int same_directory(const char *a, const char *b) {
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// Calls visit(path, step, context) for every file of dir matching pattern (e.g. "model_*.bin");
// step is that of a checkpoint file's name (-1 for other files).
static void for_each_file(const char *dir, const char *pattern, const char *kind,
                          void (*visit)(const char *, int, void *), void *context) {
    char full[4200];
    snprintf(full, sizeof(full), "%s/%s", dir, pattern);
    glob_t found;
    if (glob(full, 0, NULL, &found) != 0) { return; }
    for (size_t i = 0; i < found.gl_pathc; i++) {
        visit(found.gl_pathv[i], kind ? checkpoint_step(found.gl_pathv[i], kind) : -1, context);
    }
    globfree(&found);
}

// Checkpoint files of steps other than *keep (all of them for -1) are removed: older pairs a
// crash left before removing them, newer ones it left incomplete. So are the run's unfinished
// ".tmp" files.
static void remove_leftover(const char *path, int step, void *keep) {
    if (step == *(int *)keep) { return; }
    if (remove(path) != 0) { fail("cannot remove %s: %s", path, strerror(errno)); }
    printf("removed %s, left by an interrupted run\n", path);
}

static void remove_leftovers(const char *dir, int keep_step) {
    for_each_file(dir, "model_*.bin", "model", remove_leftover, &keep_step);
    for_each_file(dir, "state_*.bin", "state", remove_leftover, &keep_step);
    int any = -2;  // .tmp files have no step: all of the run's go, and nothing else
    for_each_file(dir, "model*.bin.tmp", NULL, remove_leftover, &any);
    for_each_file(dir, "state_*.bin.tmp", NULL, remove_leftover, &any);
    for_each_file(dir, "log.csv.tmp", NULL, remove_leftover, &any);
}

static void note_run_file(const char *path, int step, void *found) {
    (void)step;
    if (((char *)found)[0] == '\0') { snprintf((char *)found, 4096, "%s", path); }
}

// A new run never overwrites another run's model or checkpoints: it starts in a directory without
// them, or continues the run they belong to (--resume).
static void refuse_other_run(const char *dir) {
    char found[4096] = "";
    for_each_file(dir, "model.bin", NULL, note_run_file, found);
    for_each_file(dir, "model_*.bin", NULL, note_run_file, found);
    for_each_file(dir, "state_*.bin", NULL, note_run_file, found);
    if (found[0] != '\0') {
        fail(
            "%s already holds a run (%s): continue it with --resume %s, or move it away, or choose another "
            "--out",
            dir, found, dir);
    }
}

// On resume, log.csv may hold rows of steps after the checkpoint (the run went on before it was
// stopped, and a row may be cut off); they are dropped, since the resumed run writes them again.
static void truncate_log(const char *path, int last_step) {
    FILE *in = fopen(path, "rb");
    if (in == NULL) { return; }  // open_log starts a new one
    char tmp[4200], *line = NULL;
    size_t capacity = 0;
    ssize_t len;
    FILE *out = open_for_atomic_write(path, tmp, sizeof(tmp));
    for (int row = 0; (len = getline(&line, &capacity, in)) > 0 && line[len - 1] == '\n'; row++) {
        if (row > 0 && atoi(line) > last_step) { break; }
        fwrite_check(line, 1, (size_t)len, out, tmp);
    }
    free(line);
    fclose(in);
    finish_atomic_write(out, tmp, path);
}

#endif  // RUNFILES_H
