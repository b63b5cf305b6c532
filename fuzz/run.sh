#!/usr/bin/env bash
# run.sh SECONDS TARGET...: runs build/fuzz/fuzz_TARGET for SECONDS each, from the committed seeds
# (fuzz/corpus/TARGET) plus what earlier runs found (build/fuzz/corpus/TARGET), and prints the
# executions of each. Exits 1 if any target crashed; the input that did is in build/fuzz/.
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=$1
shift
status=0
for target in "$@"; do
    work=build/fuzz/corpus/$target
    mkdir -p "$work"
    log=build/fuzz/$target.log
    # leaks: an accepted input must release everything (fuzz.h checks); refused inputs are released
    # by the harness; -close_fd_mask=1 silences the programs' stdout
    build/fuzz/fuzz_"$target" -max_total_time="$seconds" -max_len=16384 -rss_limit_mb=4096 -detect_leaks=0 \
        -close_fd_mask=1 -print_final_stats=1 -artifact_prefix="build/fuzz/$target-" "$work" "fuzz/corpus/$target" \
        > "$log" 2>&1
    result=$?
    runs=$(awk '/stat::number_of_executed_units/ { print $NF }' "$log")
    if [ $result -eq 0 ]; then
        echo "fuzz $target: ${runs:-?} executions in ${seconds} s, no crash"
    else
        echo "fuzz $target: FAILED after ${runs:-?} executions (log: $log)"
        grep -E "ERROR|runtime error|abort|Test unit written" "$log" | head -5 | sed 's/^/    /'
        status=1
    fi
done
exit $status
