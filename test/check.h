/*
check.h: the helpers the C unit tests share: check() prints one line per check and counts it;
check_refuses() runs a function that should refuse its input in a child process, and checks that
the child exits with status 1 after printing a message that contains the expected text;
relative_error() is how the fixture tests compare a tensor with the reference's.
A test ends with: printf("%d passed, %d failed\n", passed, failed).
*/
#ifndef CHECK_H
#define CHECK_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int passed, failed;

static inline void check(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s ", ok ? "ok  " : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (ok) passed++; else failed++;
}

// ||got - want|| / ||want||; an all-zero reference must be matched by an all-zero result.
static inline double relative_error(const float *got, const float *want, size_t n) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - want[i];
        diff += d * d;
        norm += (double)want[i] * want[i];
    }
    if (isnan(diff)) { return INFINITY; }
    return norm > 0.0 ? sqrt(diff / norm) : sqrt(diff);
}

// runs fn(arg) in a child process; checks that it exits with status 1 and an error message
// containing `expect`
static inline void check_refuses(const char *what, void (*fn)(const void *), const void *arg, const char *expect) {
    int fds[2];
    fflush(stdout);
    if (pipe(fds) != 0) { perror("pipe"); exit(1); }
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], 2);
        fn(arg);
        _exit(0);  // fn returned: nothing was refused
    }
    close(fds[1]);
    char msg[2048] = {0};
    size_t n = 0;
    ssize_t r;
    while (n < sizeof msg - 1 && (r = read(fds[0], msg + n, sizeof msg - 1 - n)) > 0) n += (size_t)r;
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    if (n > 0 && msg[n - 1] == '\n') msg[n - 1] = 0;
    int ok = WIFEXITED(status) && WEXITSTATUS(status) == 1 && strstr(msg, expect) != NULL;
    check(ok, "refuses %s: \"%s\"", what, msg);
}

#endif  // CHECK_H
