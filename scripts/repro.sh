#!/usr/bin/env bash
# repro.sh [OUTDIR]: the experiment of doc/results.md, then its tables and plots.
#
# Word-piece tokens (a 4,096-token BPE vocabulary that prepro trains on the corpus; shards from
# `make repro`), an 8-layer model, the same 1,228,800 training tokens for every run (STEPS steps of
# 16 x 64), three seeds of everything:
#
#   granularity, at equal activated expert width (k x H = 256):
#       E = 8 experts of width 256, target 1;  E = 16 of width 128, target 2;  E = 32 of width 64, target 4
#       DTop-p and Top-k at each
#   at E = 16 (the main model), also:
#       fixed Top-p at the threshold DTop-p settles at (its mean p over the second half, same seed),
#       PI controller without DRN, DRN with that fixed p, and the per-layer controller
#   added after the first results (see doc/results.md): Top-1 at E = 8 with gates not renormalised,
#       since renormalised gates leave a single expert's gate at 1 and its router without gradient
#   second round (doc/results.md, "Second round", rules registered before these runs):
#       E = 64 of width 32, target 8, DTop-p and Top-k; at E = 16, DTop-p with layer 0 on a fixed
#       Top-2 (--first-layer-k 2); DTop-p and Top-k at E = 16 for three epochs (3 x STEPS steps)
#
# Every run is deterministic whatever the number of threads; a run whose log is complete is not run
# again, so an interrupted repro.sh continues where it stopped. JOBS runs go at once (default 2, one
# thread each: small models train faster as two one-thread runs than as one two-thread run).
# scripts/decide.py then applies the decision rules of doc/results.md and writes the tables and plots.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/repro}
TRAIN=${TRAIN:-./train_dtopp}
DATA=${DATA:-data/words}
STEPS=${STEPS:-1200}
SEEDS=${SEEDS:-"1 2 3"}
JOBS=${JOBS:-2}
mkdir -p "$OUT"
[ -f "${DATA}_train.bin" ] || { echo "repro: ${DATA}_train.bin is missing: run 'make repro' (it prepares it)" >&2; exit 1; }

COMMON=(--train "${DATA}_train.bin" --val "${DATA}_val.bin" --layers 8 --channels 128 --heads 4 --batch 16 --seq-len 64
        --lr 3e-3 --warmup 50 --eval-every 200 --eval-batches 40 --sample-tokens 0
        --checkpoint-every 0 --threads 1)
E8=(--experts 8 --expert-hidden 256)
E16=(--experts 16 --expert-hidden 128)
E32=(--experts 32 --expert-hidden 64)
E64=(--experts 64 --expert-hidden 32)

done_already() { [ -f "$OUT/$1/log.csv" ] && [ "$(tail -1 "$OUT/$1/log.csv" | cut -d, -f1)" = "$2" ]; }

run_for() {  # run_for STEPS NAME ARGS...: one training run, in the background once JOBS runs are going
    local steps=$1 name=$2
    shift 2
    done_already "$name" "$steps" && return
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    echo "repro: $name: $*"
    rm -rf "${OUT:?}/$name"  # an interrupted run starts again from step 0
    { "$TRAIN" "${COMMON[@]}" --steps "$steps" --out "$OUT/$name" --routing-dump "$OUT/$name/routing.csv" "$@" > "$OUT/$name.txt" 2>&1 ||
        { echo "repro: $name failed, see $OUT/$name.txt" >&2; exit 1; }; } &
}

run() { run_for "$STEPS" "$@"; }  # run NAME ARGS...: a run of STEPS steps

finish_all() {  # waits for every run, and stops if one failed
    while [ -n "$(jobs -rp)" ]; do wait -n || { wait; exit 1; }; done
    wait
}

# the threshold DTop-p settles at: its mean p over the second half of the run
settled_p() {
    awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "p_0") c = i; next }
             { p[NR] = $c } END { n = 0; s = 0; for (i = int(NR / 2) + 1; i <= NR; i++) { s += p[i]; n++ }
             printf "%.4f", s / n }' "$OUT/$1/log.csv"
}

for seed in $SEEDS; do
    run "e16_dtopp_s$seed" "${E16[@]}" --routing dtopp --tgt 2 --seed "$seed"
    run "e16_topk_s$seed" "${E16[@]}" --routing topk --k 2 --seed "$seed"
done
for seed in $SEEDS; do
    run "e8_dtopp_s$seed" "${E8[@]}" --routing dtopp --tgt 1 --seed "$seed"
    run "e8_topk_s$seed" "${E8[@]}" --routing topk --k 1 --seed "$seed"
    run "e32_dtopp_s$seed" "${E32[@]}" --routing dtopp --tgt 4 --seed "$seed"
    run "e32_topk_s$seed" "${E32[@]}" --routing topk --k 4 --seed "$seed"
    run "e16_pi_only_s$seed" "${E16[@]}" --routing dtopp --drn 0 --tgt 2 --seed "$seed"
    run "e16_dtopp_layer_s$seed" "${E16[@]}" --routing dtopp --controller layer --tgt 2 --seed "$seed"
done
finish_all
for seed in $SEEDS; do
    p=$(settled_p "e16_dtopp_s$seed")
    run "e16_topp_s$seed" "${E16[@]}" --routing topp --p "$p" --seed "$seed"
    run "e16_drn_only_s$seed" "${E16[@]}" --routing topp --drn 1 --p "$p" --seed "$seed"
    run "e8_topk_raw_s$seed" "${E8[@]}" --routing topk --k 1 --renorm 0 --seed "$seed"
done
finish_all
# the second round: the longest runs first, so that the two jobs end close together
for seed in $SEEDS; do
    run_for $((3 * STEPS)) "e16_dtopp_ep3_s$seed" "${E16[@]}" --routing dtopp --tgt 2 --seed "$seed"
    run_for $((3 * STEPS)) "e16_topk_ep3_s$seed" "${E16[@]}" --routing topk --k 2 --seed "$seed"
done
for seed in $SEEDS; do
    run "e64_dtopp_s$seed" "${E64[@]}" --routing dtopp --tgt 8 --seed "$seed"
    run "e64_topk_s$seed" "${E64[@]}" --routing topk --k 8 --seed "$seed"
    run "e16_dtopp_l0topk_s$seed" "${E16[@]}" --routing dtopp --tgt 2 --first-layer-k 2 --seed "$seed"
done
finish_all
echo "repro: all runs done, logs in $OUT"
/usr/bin/python3 scripts/decide.py "$OUT" "${DATA}_train.bin"
