// fuzz_options: the command line of train_dtopp. The input is split at NUL bytes into arguments;
// options that passed the checks must describe a model configuration that validates or is refused
// with a message, never one that is used unchecked.
#include "fuzz.h"
#define TESTING  // the model, without its training program
#include "../train_dtopp.c"
#include "../dtopp/train_options.h"  // defines: Options, parse_options, configure_model

#define MAX_ARGS 32

static void parse(const uint8_t *data, size_t size) {
    char *text = (char *)malloc_check(size + 1), *argv[MAX_ARGS + 1] = {"train_dtopp"};
    memcpy(text, data, size);
    text[size] = '\0';
    int argc = 1;
    for (size_t start = 0; start < size && argc < MAX_ARGS; start += strlen(text + start) + 1) {
        // --help prints the usage and exits, as it should: not a path to fuzz
        if (strcmp(text + start, "--help") != 0 && strcmp(text + start, "-h") != 0) { argv[argc++] = text + start; }
    }
    Options o;
    parse_options(&o, argc, argv);
    ModelConfig config;
    RouterConfig router;
    configure_model(&o, 256, VOCAB_BYTES, &config, &router);
    validate_config(&config, &router, "options");
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_run(parse, data, size);
    return 0;
}
