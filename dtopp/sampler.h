/*
sampler.h: text out of a trained model. sample_token draws the next token from the logits
(temperature, top-k); TextCodec turns text into tokens and tokens into text for the model's kind of
vocabulary (bytes, GPT-2's tokens through tokenizer.bin, or a vocabulary prepro trained, through
its tokenizer file, which codec_find finds by the vocabulary hash the model records); generate_text
runs the model's decoder (decoder_step, one position at a time) after a prompt. It uses the model API of train_dtopp.c, so it is included after it.
*/
#ifndef SAMPLER_H
#define SAMPLER_H

#include "tokenizer.h"  // defines: Tokenizer, tokenizer_init, tokenizer_encode, tokenizer_decode

// Draws a token from softmax(logits / temperature) restricted to the top_k most likely tokens
// (top_k <= 0: all); temperature 0 picks the most likely token.
int sample_token(const float *logits, int V, float temperature, int top_k, uint64_t *rng) {
    int best = 0;
    for (int i = 1; i < V; i++) { best = logits[i] > logits[best] ? i : best; }
    if (temperature <= 0.0f) { return best; }
    // the k-th largest logit is the cut-off; ties at the cut-off are all kept
    float cutoff = -INFINITY;
    if (top_k > 0 && top_k < V) {
        float *sorted = (float *)malloc_check((size_t)V * sizeof(float));
        memcpy(sorted, logits, (size_t)V * sizeof(float));
        for (int k = 0; k < top_k; k++) {  // partial selection sort: k passes over V
            int largest = k;
            for (int i = k + 1; i < V; i++) { largest = sorted[i] > sorted[largest] ? i : largest; }
            float tmp = sorted[k];
            sorted[k] = sorted[largest];
            sorted[largest] = tmp;
        }
        cutoff = sorted[top_k - 1];
        free(sorted);
    }
    double sum = 0.0;
    for (int i = 0; i < V; i++) {
        if (logits[i] >= cutoff) { sum += exp((logits[i] - logits[best]) / temperature); }
    }
    double r = random_f32(rng) * sum, acc = 0.0;
    int last = best;
    for (int i = 0; i < V; i++) {
        if (logits[i] < cutoff) { continue; }
        acc += exp((logits[i] - logits[best]) / temperature);
        last = i;
        if (acc > r) { return i; }
    }
    return last;
}

// ----------------------------------------------------------------------------
// text in and out: GPT-2 tokens through tokenizer.bin, trained BPE tokens through the tokenizer
// file prepro wrote with the shards, or bytes for a byte-level vocabulary

typedef struct {
    int byte_level;  // a token is a byte
    int loaded;
    Tokenizer tokenizer;
    char path[4096];  // where the tokenizer came from
} TextCodec;

// Why the tokenizer t cannot print the model's tokens, or NULL when it can. A model records the
// hash of its vocabulary (doc/formats.md); one written before it did is matched on kind and size.
static const char *tokenizer_misfit(const Tokenizer *t, const ModelConfig *c, char *why, size_t size) {
    if (t->vocab_kind != c->vocab_kind) {
        snprintf(why, size, "holds a %s vocabulary but the model's is %s", vocab_kind_name(t->vocab_kind),
                 vocab_kind_name(c->vocab_kind));
    } else if (tokenizer_vocab_size(t) != c->vocab_size) {
        snprintf(why, size, "has %d tokens but the model's vocabulary has %d", tokenizer_vocab_size(t),
                 c->vocab_size);
    } else if (c->vocab_hash != 0 && t->vocab_hash != c->vocab_hash) {
        snprintf(why, size, "holds another vocabulary of %d tokens than the model's (vocabulary hash %016llx, the "
                 "model's %016llx): a tokenizer trained on another text", c->vocab_size,
                 (unsigned long long)t->vocab_hash, (unsigned long long)c->vocab_hash);
    } else {
        return NULL;
    }
    return why;
}

// The tokenizer of a model: `path` (--tokenizer) when given, which must fit it; else the first of
// `places` that holds the model's vocabulary. Fails naming every place when none does and `required`;
// returns whether one was found. `model` names the model in messages.
static int codec_find(TextCodec *codec, const char *path, const char *const *places, int n_places,
                      const ModelConfig *c, const char *model, int required) {
    memset(codec, 0, sizeof(*codec));
    codec->byte_level = c->vocab_kind == VOCAB_BYTES;
    if (c->vocab_kind == VOCAB_UNKNOWN) {
        fail("%s: its vocabulary (%d tokens) is of no known kind: cannot print text", model, c->vocab_size);
    }
    if (codec->byte_level) { return 1; }
    char why[512], tried[4096] = "";
    if (path != NULL) {  // given: the one place, and it must fit
        places = &path;
        n_places = 1;
    }
    for (int i = 0; i < n_places; i++) {
        const char *candidate = places[i];
        if (path == NULL && access(candidate, R_OK) != 0) {
            snprintf(tried + strlen(tried), sizeof(tried) - strlen(tried), "%s%s", tried[0] ? ", " : "", candidate);
            continue;
        }
        tokenizer_init(&codec->tokenizer, candidate);
        if (tokenizer_misfit(&codec->tokenizer, c, why, sizeof(why)) != NULL) {
            if (path != NULL) { fail("%s %s", candidate, why); }
            snprintf(tried + strlen(tried), sizeof(tried) - strlen(tried), "%s%s (%s)", tried[0] ? ", " : "",
                     candidate, why);
            tokenizer_free(&codec->tokenizer);
            continue;
        }
        if (c->vocab_hash == 0) {
            fprintf(stderr, "note: %s records no vocabulary hash (written before models did): %s is taken on "
                    "its kind and size alone\n", model, candidate);
        }
        snprintf(codec->path, sizeof(codec->path), "%s", candidate);
        return codec->loaded = 1;
    }
    if (required) {
        fail("%s was trained with a %s vocabulary of %d tokens (vocabulary hash %016llx), and no tokenizer file "
             "holding it was found (%s): pass it with --tokenizer FILE", model, vocab_kind_name(c->vocab_kind),
             c->vocab_size, (unsigned long long)c->vocab_hash, tried);
    }
    return 0;
}

// The tokenizer of a model from --tokenizer, or else GPT-2's tokenizer.bin (or bytes).
static void codec_init(TextCodec *codec, const char *tokenizer_path, const ModelConfig *c) {
    const char *places[] = {"tokenizer.bin"};
    codec_find(codec, tokenizer_path, places, 1, c, "the model", 1);
}

// DIR/NAME of the directory of path (a file) into out.
static void beside(char *out, size_t size, const char *path, const char *name) {
    const char *slash = strrchr(path, '/');
    snprintf(out, size, "%.*s%s", slash ? (int)(slash - path + 1) : 0, path, name);
}

static int *codec_encode(const TextCodec *codec, const char *text, size_t *n) {
    size_t len = strlen(text);
    if (!codec->byte_level) { return tokenizer_encode(&codec->tokenizer, text, len, n); }
    int *ids = (int *)malloc_check(len * sizeof(int));
    for (size_t i = 0; i < len; i++) { ids[i] = (unsigned char)text[i]; }
    *n = len;
    return ids;
}

static void codec_print(const TextCodec *codec, int token) {
    if (codec->byte_level) {
        putchar(token);
    } else {
        size_t len;
        const unsigned char *bytes = tokenizer_decode(&codec->tokenizer, token, &len);
        fwrite(bytes, 1, len, stdout);
    }
}

// Prints the prompt and then up to n_tokens sampled tokens: fewer when the model's maximum
// sequence length comes first. Starts from end-of-text (or a newline for bytes) when the prompt is
// empty. Returns the number of tokens sampled.
static int generate_text(Model *model, const TextCodec *codec, const char *prompt, int n_tokens,
                          float temperature, int top_k, uint64_t *rng) {
    size_t n_prompt;
    int *ids = codec_encode(codec, prompt, &n_prompt);
    if (n_prompt == 0) {
        ids = (int *)realloc_check(ids, sizeof(int));
        ids[0] = codec->byte_level ? '\n' : tokenizer_eot(&codec->tokenizer);
        n_prompt = 1;
    } else {
        fputs(prompt, stdout);
    }
    int max_len = model->config.max_seq_len;
    if ((int)n_prompt >= max_len) {
        fail("the prompt has %zu tokens; the model takes at most %d", n_prompt, max_len);
    }
    Decoder *decoder = decoder_create(model);
    const float *logits = NULL;
    for (size_t i = 0; i < n_prompt; i++) { logits = decoder_step(model, decoder, ids[i], (int)i); }
    int pos = (int)n_prompt, sampled = 0;
    for (; sampled < n_tokens && pos < max_len; sampled++, pos++) {
        int token = sample_token(logits, model->config.vocab_size, temperature, top_k, rng);
        codec_print(codec, token);
        if (pos + 1 < max_len) { logits = decoder_step(model, decoder, token, pos); }
    }
    printf("\n");
    fflush(stdout);
    decoder_free(decoder);
    free(ids);
    return sampled;
}

// --generate: prints a sample from a model file, and its speed to stderr.
int generate_from_checkpoint(const char *model_path, const char *tokenizer_path, const char *prompt,
                             int n_tokens, float temperature, int top_k, uint64_t rng) {
    Model model;
    model_load(&model, model_path);
    TextCodec codec;  // the model's folder holds the tokenizer of a trained vocabulary (run.h); GPT-2's is here
    char run_copy[4200];
    beside(run_copy, sizeof(run_copy), model_path, "tokenizer.bin");
    const char *places[] = {run_copy, "tokenizer.bin"};
    codec_find(&codec, tokenizer_path, places, 2, &model.config, model_path, 1);
    double t0 = wall_seconds();
    int sampled = generate_text(&model, &codec, prompt, n_tokens, temperature, top_k, &rng);
    fprintf(stderr, "%d tokens in %.2f s", sampled, wall_seconds() - t0);
    if (sampled < n_tokens) {
        fprintf(stderr, " (the model's maximum sequence length is %d)", model.config.max_seq_len);
    }
    fprintf(stderr, "\n");
    if (codec.loaded) { tokenizer_free(&codec.tokenizer); }
    model_free(&model);
    return EXIT_SUCCESS;
}

#endif  // SAMPLER_H
