/*
sampler.h: text out of a trained model. sample_token draws the next token from the logits
(temperature, top-k); TextCodec turns text into tokens and tokens into text for the model's kind of
vocabulary (bytes, GPT-2's tokens through tokenizer.bin, or a vocabulary prepro trained, through
its tokenizer file); generate_text runs the model's decoder (decoder_step, one position at a time)
after a prompt. It uses the model API of train_dtopp.c, so it is included after it.
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
} TextCodec;

// The model's header says what its tokens are; a vocabulary of unknown kind cannot be printed.
static void codec_init(TextCodec *codec, const char *tokenizer_path, const ModelConfig *c) {
    codec->byte_level = c->vocab_kind == VOCAB_BYTES;
    codec->loaded = 0;
    if (c->vocab_kind == VOCAB_UNKNOWN) {
        fail("the model's vocabulary (%d tokens) is of no known kind: cannot print text", c->vocab_size);
    }
    if (!codec->byte_level) {
        tokenizer_init(&codec->tokenizer, tokenizer_path);
        codec->loaded = 1;
        if (codec->tokenizer.vocab_kind != c->vocab_kind) {
            fail("%s holds a %s vocabulary but the model's is %s%s", tokenizer_path,
                 vocab_kind_name(codec->tokenizer.vocab_kind), vocab_kind_name(c->vocab_kind),
                 c->vocab_kind == VOCAB_BPE ? ": pass the PREFIX_tokenizer.bin prepro wrote with --tokenizer" : "");
        }
        if (tokenizer_vocab_size(&codec->tokenizer) != c->vocab_size) {
            fail("%s has %d tokens but the model's vocabulary has %d", tokenizer_path,
                 tokenizer_vocab_size(&codec->tokenizer), c->vocab_size);
        }
    }
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
    TextCodec codec;
    codec_init(&codec, tokenizer_path, &model.config);
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
