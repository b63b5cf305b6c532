#!/usr/bin/env bash
# repro.sh [OUTDIR]: the experiments of doc/results.md, then the tables and plots.
#
# One model (the `small` preset: L=4, C=128, E=8 experts of width 128), one dataset (TinyShakespeare
# as bytes, as `make train` prepares it), the same number of tokens for every method (STEPS steps
# of 16 x 64 tokens): Top-k, fixed Top-p at two thresholds, DTop-p, the two ablations (PI without
# DRN, DRN with a fixed p) and the layer-wise variant, with two seeds for the first three.
# Every run is deterministic; a run whose log is complete is not run again, so an interrupted
# repro.sh continues where it stopped. scripts/analyze.py writes doc/results_table.md and the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/repro}
TRAIN=${TRAIN:-./train_dtopp}
STEPS=${STEPS:-1000}
TGT=${TGT:-2}
P_LOW=${P_LOW:-0.25}   # about 2 experts per token at the start (a near-uniform router: 1/8 each)
P_HIGH=${P_HIGH:-0.5}   # about 4 at the start
mkdir -p "$OUT"
[ -f data/train_bytes_train.bin ] || { echo "repro: run 'make train' first (it prepares data/train_bytes_*.bin)" >&2; exit 1; }

COMMON=(--train data/train_bytes_train.bin --val data/train_bytes_val.bin --model small --batch 16 --seq-len 64
        --steps "$STEPS" --lr 3e-3 --warmup 50 --eval-every 100 --eval-batches 20 --sample-tokens 0
        --checkpoint-every 0)

run() {  # run NAME ARGS...
    local name=$1
    shift
    if [ -f "$OUT/$name/log.csv" ] && [ "$(tail -1 "$OUT/$name/log.csv" | cut -d, -f1)" = "$STEPS" ]; then return; fi
    echo "repro: $name: $*"
    "$TRAIN" "${COMMON[@]}" --out "$OUT/$name" --routing-dump "$OUT/$name/routing.csv" "$@" > "$OUT/$name.txt" 2>&1 ||
        { echo "repro: $name failed, see $OUT/$name.txt" >&2; exit 1; }
}

for seed in 1 2; do
    run "topk_s$seed" --routing topk --k "$TGT" --seed "$seed"
    run "topp_low_s$seed" --routing topp --p "$P_LOW" --seed "$seed"
    run "dtopp_s$seed" --routing dtopp --tgt "$TGT" --seed "$seed"
done
run topp_high_s1 --routing topp --p "$P_HIGH" --seed 1
run pi_only_s1 --routing dtopp --drn 0 --tgt "$TGT" --seed 1
run drn_only_s1 --routing topp --drn 1 --p "$P_LOW" --seed 1
run dtopp_layer_s1 --routing dtopp --controller layer --tgt "$TGT" --seed 1
echo "repro: all runs done, logs in $OUT"
/usr/bin/python3 scripts/analyze.py "$OUT" out/tune out/tune_long
