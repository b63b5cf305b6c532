#!/usr/bin/env bash
# dit_compare.sh OUTDIR: the diffusion transformer with DTop-p routing against Top-k at the same
# number of activated experts (a target of 2 against k = 2, of 8 experts), two seeds each, on
# Fashion-MNIST (doc/dit.md). Prints the validation loss of every run at the fixed times
# t = 0.25, 0.5, 0.75 and their mean, the activated experts over the last tenth of training, and
# the mean of each method over the seeds. Each run is `make dit`'s, about 20 minutes on 2 cores:
# the whole comparison takes about 80 minutes. STEPS=N shortens every run; DIT_FLAGS adds options.
#
# Runs go to OUTDIR/ROUTING_sSEED (log.csv, train.log, model.bin, samples.png); a run whose
# folder holds a finished run is not trained again, so an interrupted comparison continues.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR   (STEPS=N, DIT_FLAGS='...' in the environment)" >&2
    exit 1
fi
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TRAIN_DIT=${TRAIN_DIT:-$ROOT/train_dit}
DATA=${FASHION_MNIST:-$ROOT/data/fashion-mnist}
[ -x "$TRAIN_DIT" ] || { echo "dit_compare: $TRAIN_DIT not found (make train_dit)" >&2; exit 1; }
[ -f "$DATA/train-images-idx3-ubyte" ] || "$ROOT/scripts/get_fashion_mnist.sh" "$DATA"
mkdir -p "$OUT"

declare -A ROUTING_FLAGS=([dtopp]="--routing dtopp --tgt 2" [topk]="--routing topk --k 2")
for seed in 1 2; do
    for routing in dtopp topk; do
        run=$OUT/${routing}_s$seed
        if [ -f "$run/model.bin" ]; then echo "dit_compare: $run is done"; continue; fi
        rm -rf "$run"
        echo "dit_compare: training $run"
        # shellcheck disable=SC2086
        "$TRAIN_DIT" --data "$DATA" --out "$run" --seed $seed ${ROUTING_FLAGS[$routing]} \
            ${STEPS:+--steps $STEPS} ${DIT_FLAGS:-} > "$run.log" 2>&1 || { tail -3 "$run.log" >&2; exit 1; }
        mv "$run.log" "$run/train.log"
    done
done

# the last validation line of each run: "step N | validation loss MEAN (t = 0.25: A, 0.5: B, 0.75: C)"
printf '\n%-10s %8s %8s %8s %8s %9s\n' run "t=0.25" "t=0.5" "t=0.75" mean experts
for routing in dtopp topk; do
    for seed in 1 2; do
        run=$OUT/${routing}_s$seed
        # the activated experts (column 7 of log.csv) over the last tenth of the steps
        experts=$(awk -F, 'NR > 1 { a[NR] = $7 }
                           END { for (i = int(NR * 0.9) + 1; i <= NR; i++) { s += a[i]; n++ }
                                 printf "%.3f", s / n }' "$run/log.csv")
        grep 'validation loss' "$run/train.log" | tail -1 | tr -d '(),' |
            awk -v name="${routing}_s$seed" -v experts="$experts" \
                '{ printf "%-10s %8.4f %8.4f %8.4f %8.4f %9s\n", name, $10, $12, $14, $6, experts }'
    done
done | tee "$OUT/summary.txt"
awk '{ key = substr($1, 1, index($1, "_s") - 1); for (i = 2; i <= 5; i++) sum[key, i] += $i; n[key]++ }
     END { for (k in n) printf "%-10s %8.4f %8.4f %8.4f %8.4f   (mean of %d seeds)\n", k, sum[k, 2] / n[k],
                               sum[k, 3] / n[k], sum[k, 4] / n[k], sum[k, 5] / n[k], n[k] }' \
    "$OUT/summary.txt"
