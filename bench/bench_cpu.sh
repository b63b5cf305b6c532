#!/usr/bin/env bash
# bench_cpu.sh: training speed of the C build against PyTorch (CPU, float32) running the reference
# model (reference/bench.py), on the same configuration, with the same number of threads, in the
# same run.
#
#   bench/bench_cpu.sh            (run from the repository root, after `make`; needs python3-torch)
#
# Configuration: the `small` preset with a byte vocabulary (L=4, C=128, NH=4, E=8, H=128, V=256),
# B=16, T=64, top-k routing with k=2, so that both do exactly the same expert work whatever the
# data (the C program trains on the project's generated text, PyTorch on random bytes). Environment:
# THREADS (default 2), STEPS (default 30).
set -euo pipefail
THREADS=${THREADS:-2}
STEPS=${STEPS:-30}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

tools/make_offline_text > "$TMP/text.txt"
./prepro --vocab bytes -o "$TMP/text" "$TMP/text.txt" > /dev/null
./train_dtopp --train "$TMP/text_train.bin" --val "" --model small --batch 16 --seq-len 64 --steps "$STEPS" \
    --routing topk --k 2 --sample-tokens 0 --checkpoint-every 0 --threads "$THREADS" --out "$TMP/run" > "$TMP/c.txt"
# mean tokens/s over the steps after the first 3 (allocation and warm-up)
c_tps=$(awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "tokens_per_s") c = i; next }
                 NR > 4 { s += $c; n++ } END { printf "%.0f", s / n }' "$TMP/run/log.csv")
torch_out=$(/usr/bin/python3 reference/bench.py --device cpu --threads "$THREADS" --L 4 --NH 4 --C 128 --E 8 --H 128 \
    --V 256 --B 16 --T 64 --steps "$STEPS" --routing topk --k 2 | tail -1)
torch_tps=$(sed -n 's/.* \([0-9]*\) tokens\/s$/\1/p' <<< "$torch_out")
echo "PyTorch: $torch_out"
echo "C:       $c_tps tokens/s (mean of steps 4..$STEPS, $THREADS threads)"
awk -v c="$c_tps" -v t="$torch_tps" 'BEGIN { printf "C / PyTorch: %.2f\n", c / t }'
