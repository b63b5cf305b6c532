#!/usr/bin/env bash
# dit_compare.sh OUTDIR: the diffusion transformer with DTop-p routing against Top-k at the same
# number of activated experts (a target of 2 against k = 2, of 8 experts), three seeds each, on
# Fashion-MNIST (doc/dit.md, "Comparing routings" and "Second round"). Every run is `make dit`'s,
# with its seed.
#
# Then it measures every run with eval_dit: a classifier trained once on the training set
# (OUTDIR/classifier.bin), the Fréchet distance of 1,000 samples (100 of each class, the same noise
# for every run) to the test set in its features and the share of samples it recognises as their
# class (RUN/quality.log), and the activated experts of 1,000 test images at ten noise levels
# (RUN/routing.csv). It prints a table: the validation loss at t = 0.25, 0.5, 0.75 and their mean,
# the activated experts over the last tenth of training, the Fréchet distance and the accuracy,
# each run and each method's mean over the seeds, then the verdicts of doc/dit.md's paired rules on
# the loss and the Fréchet distance. scripts/dit_plots.py OUTDIR draws the routing and gives the
# verdicts on experts by noise level and by patch.
#
# A run takes about 21 minutes on 2 cores, the classifier about 5, the measures of a run about 1.5:
# about 140 minutes in all for three seeds; two at once on one thread each (JOBS=2 DIT_FLAGS='--threads 1'),
# about 37 minutes a pair and 2 hours in all (doc/dit.md). SEEDS (default "1337 1338 1339"), STEPS=N
# (shorter runs), DIT_FLAGS (more options for training),
# JOBS=N (runs trained at once; give each --threads in DIT_FLAGS), EVAL_FLAGS (options of eval_dit). Runs go to OUTDIR/ROUTING_sSEED
# (log.csv, train.log, model.bin, samples.png); a folder that holds a finished run is not trained
# again and a measure already written is not measured again, so an interrupted comparison goes on.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR   (SEEDS, STEPS, DIT_FLAGS, JOBS in the environment)" >&2
    exit 1
fi
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TRAIN_DIT=${TRAIN_DIT:-$ROOT/dit/train_dit}
EVAL_DIT=${EVAL_DIT:-$ROOT/dit/eval_dit}
DATA=${FASHION_MNIST:-$ROOT/data/fashion-mnist}
SEEDS=${SEEDS:-1337 1338 1339}
JOBS=${JOBS:-1}
for program in "$TRAIN_DIT" "$EVAL_DIT"; do
    [ -x "$program" ] || { echo "dit_compare: $program not found (make dit/train_dit dit/eval_dit)" >&2; exit 1; }
done
[ -f "$DATA/train-images-idx3-ubyte" ] || "$ROOT/scripts/get_fashion_mnist.sh" "$DATA"
mkdir -p "$OUT"

declare -A ROUTING_FLAGS=([dtopp]="--routing dtopp --tgt 2" [topk]="--routing topk --k 2")
train_run() {  # train_run ROUTING SEED
    local run=$OUT/${1}_s$2
    rm -rf "$run"
    echo "dit_compare: training $run"
    # shellcheck disable=SC2086
    if ! "$TRAIN_DIT" --data "$DATA" --out "$run" --seed "$2" ${ROUTING_FLAGS[$1]} ${STEPS:+--steps $STEPS} \
        ${DIT_FLAGS:-} > "$run.log" 2>&1; then
        tail -3 "$run.log" >&2
        return 1
    fi
    mv "$run.log" "$run/train.log"
}
running=0
for seed in $SEEDS; do
    for routing in dtopp topk; do
        if [ -f "$OUT/${routing}_s$seed/train.log" ]; then echo "dit_compare: $OUT/${routing}_s$seed is done"; continue; fi
        train_run "$routing" "$seed" &
        running=$((running + 1))
        if [ "$running" -ge "$JOBS" ]; then wait -n || exit 1; running=$((running - 1)); fi
    done
done
while [ "$running" -gt 0 ]; do wait -n || exit 1; running=$((running - 1)); done

if [ ! -f "$OUT/classifier.bin" ]; then
    echo "dit_compare: training the classifier $OUT/classifier.bin"
    # shellcheck disable=SC2086
    "$EVAL_DIT" classifier --data "$DATA" --out "$OUT/classifier.bin" ${EVAL_FLAGS:-} > "$OUT/classifier.log"
fi
for seed in $SEEDS; do
    for routing in dtopp topk; do
        run=$OUT/${routing}_s$seed
        if [ ! -f "$run/quality.log" ]; then
            echo "dit_compare: measuring $run"
            # shellcheck disable=SC2086
            "$EVAL_DIT" quality --data "$DATA" --model "$run/model.bin" --classifier "$OUT/classifier.bin" \
                ${EVAL_FLAGS:-} > "$run/quality.tmp"
            mv "$run/quality.tmp" "$run/quality.log"
        fi
        # shellcheck disable=SC2086
        [ -f "$run/routing.csv" ] || "$EVAL_DIT" routing --data "$DATA" --model "$run/model.bin" \
            --out "$run/routing.csv" ${EVAL_FLAGS:-} > /dev/null
    done
done

grep '^test accuracy' "$OUT/classifier.log" | sed 's/^/classifier: /'
grep '^real training images' "$OUT/dtopp_s${SEEDS%% *}/quality.log"
# the last validation line of each run: "step N | validation loss MEAN (t = 0.25: A, 0.5: B, 0.75: C)"
printf '\n%-10s %8s %8s %8s %8s %8s %8s %8s\n' run "t=0.25" "t=0.5" "t=0.75" mean experts "Fréchet" accuracy
for routing in dtopp topk; do
    for seed in $SEEDS; do
        run=$OUT/${routing}_s$seed
        # the activated experts (column 7 of log.csv) over the last tenth of the steps
        experts=$(awk -F, 'NR > 1 { a[NR] = $7 }
                           END { for (i = int(NR * 0.9) + 1; i <= NR; i++) { s += a[i]; n++ }
                                 printf "%.3f", s / n }' "$run/log.csv")
        quality=$(awk '/^samples:/ { gsub(",", ""); print $5, $8 }' "$run/quality.log")
        grep 'validation loss' "$run/train.log" | tail -1 | tr -d '(),' |
            awk -v name="${routing}_s$seed" -v experts="$experts" -v quality="$quality" \
                '{ split(quality, q, " ");
                   printf "%-10s %8.4f %8.4f %8.4f %8.4f %8s %8.3f %8.4f\n", name, $10, $12, $14, $6, experts,
                          q[1], q[2] }'
    done
done | tee "$OUT/summary.txt"
awk '{ key = substr($1, 1, index($1, "_s") - 1); for (i = 2; i <= 8; i++) sum[key, i] += $i; n[key]++ }
     END { for (k in n) printf "%-10s %8.4f %8.4f %8.4f %8.4f %8.3f %8.3f %8.4f   (mean of %d seeds)\n", k,
                               sum[k, 2] / n[k], sum[k, 3] / n[k], sum[k, 4] / n[k], sum[k, 5] / n[k],
                               sum[k, 6] / n[k], sum[k, 7] / n[k], sum[k, 8] / n[k], n[k] }' \
    "$OUT/summary.txt"

# the paired rules of doc/dit.md ("Second round"): d = Top-k − DTop-p per seed on the final validation
# loss (column 5) and on the Fréchet distance (column 7), mean ± t·sd/√n; both methods must hold
# 2 experts per patch within 5% (column 6)
awk -v order="$SEEDS" 'BEGIN { split("12.706 4.303 3.182 2.776 2.571 2.447 2.365 2.306 2.262", t95, " ")
             name[5] = "validation loss"; name[7] = "Fréchet distance"; equal = 1 }
     { split($1, run, "_s"); method = run[1]; seed = run[2]
       for (c = 5; c <= 7; c++) value[method, seed, c] = $c
       if ($6 < 1.9 || $6 > 2.1) equal = 0 }
     END {
         for (c = 5; c <= 7; c += 2) {
             n = 0; sum = 0; sumsq = 0; line = ""
             for (i = 1; i <= split(order, seeds, " "); i++) {
                 seed = seeds[i]
                 if (!(("dtopp", seed, c) in value) || !(("topk", seed, c) in value)) continue
                 d = value["topk", seed, c] - value["dtopp", seed, c]
                 n++; sum += d; sumsq += d * d; line = line sprintf(" %+.4f", d)
             }
             if (n < 2) { printf "%s: %d paired seed(s), no interval\n", name[c], n; continue }
             m = sum / n; sd = sqrt((sumsq - n * m * m) / (n - 1)); hw = (n - 1 in t95 ? t95[n - 1] : 1.96) * sd / sqrt(n)
             verdict = !equal ? "unequal compute" : m - hw > 0 ? "DTop-p better" : m + hw < 0 ? "Top-k better" : "not decided"
             printf "%s, Top-k − DTop-p per seed:%s; mean %+.4f ± %.4f, 95%% interval [%+.4f, %+.4f]: %s\n",
                    name[c], line, m, sd, m - hw, m + hw, verdict
         }
     }' "$OUT/summary.txt"
