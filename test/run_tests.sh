#!/usr/bin/env bash
# run_tests.sh SUITE...: what `make test` runs. Each SUITE is a make target (test-model, test-train,
# ...); every one runs, even after one that failed, with its output shown as it comes. A suite
# reports through its "N passed, M failed" lines (a target that runs several programs has several:
# they add up); a suite that fails without reporting a failed check counts as one failure. A line
# "skipped: WHAT: why and how to get it" (or "skip ...") names something a suite could not cover on
# this machine. The run ends with a table of the suites, the skipped checks, and one line that sums
# every suite: "N passed, M failed", naming what was skipped. Exits 1 if anything failed.
set -uo pipefail

MAKE=${MAKE:-make}
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT

passed=0
failed=0
rows=()
skipped=()
for suite in "$@"; do
    echo "=== $suite"
    "$MAKE" --no-print-directory "$suite" 2>&1 | tee "$LOGS/$suite.log"
    status=${PIPESTATUS[0]}
    read -r p f < <(awk '/^[0-9]+ passed, [0-9]+ failed$/ { p += $1; f += $3 } END { print p + 0, f + 0 }' \
                        "$LOGS/$suite.log")
    if [[ $status -ne 0 && $f -eq 0 ]]; then
        echo "FAIL $suite: exit status $status before any failed check was reported"
        f=1
    fi
    passed=$((passed + p))
    failed=$((failed + f))
    rows+=("$(printf '  %-16s %5d passed %3d failed' "$suite" "$p" "$f")")
    while IFS= read -r line; do
        skipped+=("$suite: $line")
    done < <(grep -E '^skip(ped)?[: ]' "$LOGS/$suite.log" | sed -E 's/^skip(ped)?:? *//')
done

echo
echo "=== every suite"
printf '%s\n' "${rows[@]}"
names=""
for s in "${skipped[@]+"${skipped[@]}"}"; do
    echo "  skipped, $s"
    name=${s#*: }                     # drop the suite
    names="$names${names:+, }${name%%:*}"  # what was skipped, up to its reason
done
echo "$passed passed, $failed failed${names:+ (skipped: $names)}"
[[ $failed -eq 0 ]]
