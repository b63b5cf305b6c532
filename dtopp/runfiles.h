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
#include <fcntl.h>
#include <glob.h>
#include <sys/file.h>
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
    int schedule_steps;     // the learning-rate schedule's length when not --steps (--extend); else 0
} TrainingState;

// The header of a state file (doc/formats.md); saving and loading both walk this table.
#define STATE_HEADER_FIELDS 11
static void state_header_fields(HeaderField *fields, TrainingState *s) {
    HeaderField list[STATE_HEADER_FIELDS] = {{2, 4, &s->step}, {3, 4, &s->adam_step}, {4, 32, s->position},
                                             {12, 8, &s->rng}, {14, 4, &s->param_check}, {15, 4, &s->steps},
                                             {16, 4, &s->warmup}, {17, 4, &s->lr}, {18, 4, &s->weight_decay},
                                             {19, 4, &s->ranks}, {20, 4, &s->schedule_steps}};
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
    float *m = (float *)malloc_check(model->num_held * sizeof(float));
    float *v = (float *)malloc_check(model->num_held * sizeof(float));
    model_get_moments(model, m, v);
    char tmp[4096] = "";
    FILE *f = dp_rank == 0 ? open_for_atomic_write(path, tmp, sizeof(tmp)) : NULL;  // every rank gathers
    if (f != NULL) { fwrite_check(header, sizeof(int32_t), HEADER_WORDS, f, tmp); }
    write_held(f, model, m, tmp);
    write_held(f, model, v, tmp);
    if (f != NULL) { finish_atomic_write(f, tmp, path); }
    free(m);
    free(v);
}

// AdamW's moments as read from a state file: finite, and the second ones >= 0. On a bad value both
// buffers are freed before fail(), so a refused file leaves nothing allocated (LeakSanitizer).
static void check_moments(float *m, float *v, size_t n, const char *path) {
    char problem[160] = "";
    for (size_t i = 0; i < n && problem[0] == '\0'; i++) {
        const char *what = !isfinite(m[i]) ? "first moment" : !isfinite(v[i]) ? "second moment" : NULL;
        if (what != NULL) {
            snprintf(problem, sizeof(problem), "%s %zu of %zu is %g, not a finite number", what, i, n,
                     what[0] == 'f' ? m[i] : v[i]);
        } else if (v[i] < 0.0f) {
            snprintf(problem, sizeof(problem), "second moment %zu is negative (%g)", i, v[i]);
        }
    }
    if (problem[0] != '\0') {
        free(m);
        free(v);
        fail("%s: %s", path, problem);
    }
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
    float *m = (float *)malloc_check(model->num_held * sizeof(float));  // this process's experts
    float *v = (float *)malloc_check(model->num_held * sizeof(float));
    read_held(f, (long)HEADER_BYTES, model, m, path);
    read_held(f, (long)(HEADER_BYTES + model->num_parameters * sizeof(float)), model, v, path);
    fclose(f);
    check_moments(m, v, model->num_held, path);
    model_set_moments(model, m, v);
    free(m);
    free(v);
    return s;
}

static void checkpoint_path(char *out, size_t size, const char *dir, const char *kind, int step) {
    snprintf(out, size, "%s/%s_%08d.bin", dir, kind, step);
}

// The step of a checkpoint file's name, or -1 for any other name: exactly the name checkpoint_path
// gives (KIND_ then 8 digits, or more for steps of 10^8 and up, without a sign; a step that fits an
// int), so that "state_+0000004.bin" or "state_99999999999.bin" are not taken for checkpoints.
static int checkpoint_step(const char *path, const char *kind) {
    const char *slash = strrchr(path, '/'), *name = slash ? slash + 1 : path;
    size_t k = strlen(kind);
    if (strncmp(name, kind, k) != 0 || name[k] != '_') { return -1; }
    const char *digits = name + k + 1;
    long long step = 0;
    int n = 0;
    for (; digits[n] >= '0' && digits[n] <= '9'; n++) {
        if (n >= 10) { return -1; }  // more digits than any int has
        step = step * 10 + (digits[n] - '0');
    }
    if (n < 8 || step > INT32_MAX || strcmp(digits + n, ".bin") != 0) { return -1; }
    char canonical[64];
    snprintf(canonical, sizeof(canonical), "%s_%08d.bin", kind, (int)step);
    return strcmp(name, canonical) == 0 ? (int)step : -1;
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

// One run at a time in an output directory: the run holds an advisory lock (flock) on DIR/.lock
// for as long as it lives. The kernel releases it when the process ends, however it ends (a crash,
// kill -9), so a lock is never left stuck; the file stays, empty of meaning but for the process id
// of the last run that held it. Another run on the directory is refused at once.
static void lock_directory(const char *dir) {
    static int lock_fd = -1;  // open for the life of the process: closing it would release the lock
    char path[4200];
    snprintf(path, sizeof(path), "%s/.lock", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) { fail("cannot open %s, the lock of the output directory: %s", path, strerror(errno)); }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        char pid[32] = "";
        ssize_t n = read(fd, pid, sizeof(pid) - 1);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        close(fd);
        fail("%s is in use by another run (process %s holds %s): wait for it to end, or choose another "
             "output directory", dir, pid[0] ? pid : "?", path);
    }
    char pid[32];
    int len = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) != 0 || write(fd, pid, (size_t)len) != len) {
        fail("cannot write %s: %s", path, strerror(errno));
    }
    if (lock_fd >= 0) { close(lock_fd); }  // a second directory in one process (the tests)
    lock_fd = fd;
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
    lock_directory(dir);
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
    if (step < 0 && *(int *)keep != -2) {  // not a checkpoint's name: not the run's, left alone
        printf("note: %s is not a checkpoint name of this program: left as it is\n", path);
        return;
    }
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
    if (access(path, F_OK) != 0) { return; }  // open_log starts a new one
    FILE *in = fopen_check(path, "rb");
    char tmp[4200], *line = NULL;
    size_t capacity = 0;
    ssize_t len;
    FILE *out = open_for_atomic_write(path, tmp, sizeof(tmp));
    for (int row = 0; (len = getline(&line, &capacity, in)) > 0 && line[len - 1] == '\n'; row++) {
        if (row > 0 && atoi(line) > last_step) { break; }
        fwrite_check(line, 1, (size_t)len, out, tmp);
    }
    free(line);
    if (ferror(in)) { fail("cannot read %s", path); }
    fclose(in);
    finish_atomic_write(out, tmp, path);
}

#endif  // RUNFILES_H
