#!/usr/bin/env bash
# tune_controller.sh [OUTDIR]: the controller-tuning runs of doc/results.md.
#
# For two model sizes and two targets, trains DTop-p with several (Kp, Ki, p0) settings on the
# byte-level TinyShakespeare shards of `make train` (data/train_bytes_*.bin) and keeps every log.
# scripts/analyze_tuning.py then measures, for each run, how fast the average number of activated experts
# a_t reaches the target (within 5%), whether it stays there, and how much it wanders.
# Every run is deterministic; a run whose log is complete is not run again. Environment: STEPS
# (default 300), GAINS_ONLY="Kp Ki p0" to run one setting (make repro checks the defaults over 1,000 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/tune}
TRAIN=${TRAIN:-./train_dtopp}
STEPS=${STEPS:-300}
mkdir -p "$OUT"
[ -f data/train_bytes_train.bin ] || { echo "tune_controller: run 'make train' (or scripts/repro.sh) first to make data/train_bytes_*.bin" >&2; exit 1; }

COMMON=(--train data/train_bytes_train.bin --val data/train_bytes_val.bin --batch 16 --seq-len 64
        --steps "$STEPS" --lr 3e-3 --warmup 30 --eval-every 0 --eval-batches 2 --sample-tokens 0
        --checkpoint-every 0 --routing dtopp --seed 1)

run() {  # run NAME ARGS...
    local name=$1
    shift
    if [ -f "$OUT/$name/log.csv" ] && [ "$(tail -1 "$OUT/$name/log.csv" | cut -d, -f1)" = "$STEPS" ]; then return; fi
    echo "tune: $name: $*"
    "$TRAIN" "${COMMON[@]}" --out "$OUT/$name" "$@" > "$OUT/$name.txt" 2>&1 || { echo "tune: $name failed, see $OUT/$name.txt" >&2; exit 1; }
}

# gains: the provisional defaults; stronger integral action; then, after the first grid showed
# oscillation at target 4, moderate gains with a starting p near where the runs settled
GAINS=("0.3 0.05 0.5" "0.3 0.5 0.5" "0.5 1.0 0.5" "1.0 2.0 0.5" "0.5 1.0 0.8"
       "0.1 0.1 0.8" "0.2 0.2 0.8" "0.1 0.2 0.8" "0.2 0.1 0.8" "0.2 0.3 0.6" "0.1 0.3 0.8")
# GAINS="Kp Ki p0" in the environment runs that one setting only (for longer checks)
if [ -n "${GAINS_ONLY:-}" ]; then GAINS=("$GAINS_ONLY"); fi
for size in tiny small; do
    for tgt in 2 4; do
        for g in "${GAINS[@]}"; do
            read -r kp ki p0 <<< "$g"
            run "${size}_t${tgt}_kp${kp}_ki${ki}_p0${p0}" --model "$size" --tgt "$tgt" --kp "$kp" --ki "$ki" --p0 "$p0"
        done
    done
done
echo "tune: done, logs in $OUT"
