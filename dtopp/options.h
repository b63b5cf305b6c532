/*
options.h: the command line of the training programs (train_dtopp, train_dit). Each program keeps
one table of long options (OptionSpec: name, type, where the value goes, its range, help), which
parsing and --help both read, so that --help lists every option with its default and a value out
of range is refused with a message naming the option.
*/
#ifndef OPTIONS_H
#define OPTIONS_H

#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "utils.h"  // defines: fail, checked memory and file I/O, file headers

typedef struct {
    const char *name;  // long option name, without "--"
    char type;         // 's' string, 'i' int, 'f' float, 'l' long long
    void *value;
    double min, max;   // the range of a number (strings: unused)
    const char *help;
    int describes_model;  // architecture or routing: comes from the checkpoint with --init or --resume
} OptionSpec;

#define ANY_INT INT_MIN, INT_MAX
#define ANY_FLOAT -FLT_MAX, FLT_MAX
#define NOT_NEGATIVE_INT 0, INT_MAX
#define NOT_NEGATIVE_FLOAT 0, FLT_MAX

// One line per option: name, help, and the default that the table's targets hold (negative
// numbers mean "chosen by the program" and are not shown).
static void print_option_table(const OptionSpec *specs, int n) {
    for (int i = 0; i < n; i++) {
        char def[64] = "";
        switch (specs[i].type) {
            case 's':
                snprintf(def, sizeof(def), "%s",
                         *(const char **)specs[i].value ? *(const char **)specs[i].value : "");
                break;
            case 'i':
                if (*(int *)specs[i].value >= 0) { snprintf(def, sizeof(def), "%d", *(int *)specs[i].value); }
                break;
            case 'f':
                if (*(float *)specs[i].value >= 0.0f) {
                    snprintf(def, sizeof(def), "%g", *(float *)specs[i].value);
                }
                break;
            case 'l': snprintf(def, sizeof(def), "%lld", *(long long *)specs[i].value); break;
        }
        printf("  --%-17s %s%s%s%s\n", specs[i].name, specs[i].help, def[0] ? " [" : "", def,
               def[0] ? "]" : "");
    }
}

// Reads a number option's value, which must be a whole number (floats: a finite number) in the
// option's range: "--steps 4294967297" or "--lr inf" is an error, not a wrapped or infinite value.
static void parse_number(const OptionSpec *spec, const char *value) {
    char *end = NULL;
    errno = 0;
    long long whole = 0;
    double real = 0.0;
    if (spec->type == 'f') { real = strtod(value, &end); } else { whole = strtoll(value, &end, 10); }
    if (errno == ERANGE || end == value || *end != '\0' || isnan(real)) {
        fail("option --%s: cannot read '%s' as a number", spec->name, value);
    }
    double number = spec->type == 'f' ? real : (double)whole;
    if (spec->type != 'l' && !(number >= spec->min && number <= spec->max)) {
        fail("option --%s: %s is outside [%.9g, %.9g]", spec->name, value, spec->min, spec->max);
    }
    switch (spec->type) {
        case 'i': *(int *)spec->value = (int)whole; break;
        case 'f': *(float *)spec->value = (float)real; break;
        case 'l': *(long long *)spec->value = whole; break;
    }
}

// Sets the table's targets from argv ("--name value" pairs); -h or --help calls usage and exits.
// Returns how many of the options given describe the model (OptionSpec.describes_model).
static int parse_option_table(const OptionSpec *specs, int n, int argc, char **argv, void (*usage)(void)) {
    int model_options = 0;
    for (int a = 1; a < argc; a++) {
        if (strcmp(argv[a], "-h") == 0 || strcmp(argv[a], "--help") == 0) {
            usage();
            exit(EXIT_SUCCESS);
        }
        const OptionSpec *spec = NULL;
        for (int i = 0; i < n; i++) {
            if (strncmp(argv[a], "--", 2) == 0 && strcmp(argv[a] + 2, specs[i].name) == 0) {
                spec = &specs[i];
            }
        }
        if (spec == NULL) { fail("unknown option %s (see --help)", argv[a]); }
        model_options += spec->describes_model;
        if (a + 1 >= argc) { fail("option %s needs a value", argv[a]); }
        const char *value = argv[++a];
        if (spec->type == 's') {
            *(const char **)spec->value = value;
        } else {
            parse_number(spec, value);
        }
    }
    return model_options;
}

// The index of value in names, or a failure naming the option.
static int parse_name(const char *value, const char *const *names, int count, const char *option) {
    for (int i = 0; i < count; i++) {
        if (strcmp(value, names[i]) == 0) { return i; }
    }
    fail("option --%s: unknown value '%s'", option, value);
    return -1;
}

#endif  // OPTIONS_H
