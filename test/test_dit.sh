#!/usr/bin/env bash
# test_dit.sh: the diffusion transformer's programs end to end on a tiny model and the real
# Fashion-MNIST: training learns and writes its files, a checkpoint samples the picture of the
# model that wrote it, every routing mode trains, eval_dit's classifier learns and its quality
# and routing measures run and add up, and bad input is refused with a clear message.
#
#   test/test_dit.sh      (run from the repository root, after `make dit/train_dit dit/eval_dit` and
#                          scripts/get_fashion_mnist.sh data/fashion-mnist)
#
# Without the data the test fails: it never passes by skipping. Prints one line per check and
# ends with "N passed, M failed"; exits 1 if any check failed.
set -uo pipefail

TRAIN_DIT=${TRAIN_DIT:-./dit/train_dit}
EVAL_DIT=${EVAL_DIT:-./dit/eval_dit}
DATA=${FASHION_MNIST:-data/fashion-mnist}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# shellcheck source=test/checks.sh
source "$(dirname "$0")/checks.sh"
column() {  # column FILE NAME: the values of a column of log.csv, one per line
    awk -F, -v name="$2" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == name) c = i; next } { print $c }' "$1"
}
is_png() { [[ $(head -c 8 "$1" | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a ]]; }

if [[ ! -f $DATA/train-images-idx3-ubyte ]]; then
    echo "FAIL no Fashion-MNIST in $DATA (scripts/get_fashion_mnist.sh $DATA; Debian: dataset-fashion-mnist)"
    echo "0 passed, 1 failed"
    exit 1
fi
TINY=(--data "$DATA" --layers 2 --channels 32 --heads 2 --experts 4 --expert-hidden 32 --batch 16 --warmup 5
      --eval-every 0 --eval-images 32 --print-every 10 --sample-steps 4 --samples-per-class 2 --threads 2)

# training learns and writes its files
check "train 60 steps (dtopp)" "$TRAIN_DIT" "${TINY[@]}" --steps 60 --lr 3e-3 --out "$TMP/run"
first=$(column "$TMP/run/log.csv" mse | head -5 | awk '{ s += $1 } END { print s / NR }')
last=$(column "$TMP/run/log.csv" mse | tail -5 | awk '{ s += $1 } END { print s / NR }')
if awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < 0.8 * a) }'; then pass "the loss falls: $first -> $last"
else fail "the loss falls: $first -> $last"; fi
rows=$(($(wc -l < "$TMP/run/log.csv") - 1))
if [[ $rows == 60 ]]; then pass "log.csv: one row per step"; else fail "log.csv: $rows rows for 60 steps"; fi
if is_png "$TMP/run/samples.png"; then pass "samples.png is a PNG"; else fail "samples.png is a PNG"; fi
a_t=$(column "$TMP/run/log.csv" activated | tail -20 | awk '{ s += $1 } END { printf "%.2f", s / NR }')
if awk -v a="$a_t" 'BEGIN { exit !(a > 1.5 && a < 2.5) }'; then pass "the controller holds the budget of 2: $a_t"
else fail "the controller holds the budget of 2: $a_t over the last 20 steps"; fi

# the checkpoint samples exactly the picture of the model that wrote it (same seed)
check "sample from the checkpoint" "$TRAIN_DIT" --init "$TMP/run/model.bin" --steps 0 --sample-steps 4 \
    --samples-per-class 2 --threads 1 --out "$TMP/sampled"
check "  the same picture, with 1 thread instead of 2" cmp "$TMP/run/samples.png" "$TMP/sampled/samples.png"

# every routing mode trains
for routing in topk topp; do
    check "train 5 steps ($routing)" "$TRAIN_DIT" "${TINY[@]}" --steps 5 --routing $routing --out "$TMP/$routing"
done
check "train 5 steps (dtopp, per-layer controller)" "$TRAIN_DIT" "${TINY[@]}" --steps 5 --controller layer \
    --out "$TMP/layer"

# eval_dit: the classifier learns, the quality measures run, the routing table adds up
check "eval_dit classifier: 200 steps" "$EVAL_DIT" classifier --data "$DATA" --out "$TMP/classifier.bin" \
    --steps 200 --batch 32 --lr 3e-3 --warmup 20 --layers 1 --channels 32 --expert-hidden 64 --test-images 500 \
    --threads 2
accuracy=$(awk '/^test accuracy/ { print $3 }' "$TMP/last.log")
if awk -v a="${accuracy:-0}" 'BEGIN { exit !(a > 0.3) }'; then pass "the classifier learns: test accuracy $accuracy"
else fail "the classifier learns: test accuracy ${accuracy:-none} (chance 0.1)"; fi
check "eval_dit quality" "$EVAL_DIT" quality --data "$DATA" --model "$TMP/run/model.bin" \
    --classifier "$TMP/classifier.bin" --samples-per-class 5 --sample-steps 4 --batch 25 --test-images 500 --threads 2
cp "$TMP/last.log" "$TMP/quality.log"
real=$(awk '/^real training images/ { print $7 }' "$TMP/quality.log" | tr -d ,)
sampled=$(awk '/^samples:/ { print $5 }' "$TMP/quality.log" | tr -d ,)
if awk -v r="${real:-x}" -v s="${sampled:-x}" 'BEGIN { exit !(r + 0 > 0 && s + 0 > r + 0) }'; then
    pass "Fréchet distances: real images $real, samples of a 60-step model $sampled (farther)"
else fail "Fréchet distances: real images ${real:-none}, samples ${sampled:-none}"; fi
for routing in run topk; do
    check "eval_dit routing ($routing)" "$EVAL_DIT" routing --data "$DATA" --model "$TMP/$routing/model.bin" \
        --eval-images 20 --batch 8 --out "$TMP/$routing.csv"
done
# every token counted once per layer and level: 2 layers x 10 levels x 20 images x 49 patches
tokens=$(awk -F, 'NR > 1 { s += $6 } END { print s }' "$TMP/run.csv")
if [[ $tokens == 19600 ]]; then pass "routing.csv counts every token: $tokens"
else fail "routing.csv counts $tokens tokens, not 2 x 10 x 20 x 49 = 19600"; fi
per_token=$(awk -F, 'NR > 1 { t += $6; e += $7 } END { printf "%.4f", e / t }' "$TMP/topk.csv")
if [[ $per_token == 2.0000 ]]; then pass "top-2 routing: 2 experts per token in routing.csv"
else fail "top-2 routing: $per_token experts per token in routing.csv"; fi
if awk -F, 'NR > 1 && ($7 < $6 || $7 > 4 * $6) { bad = 1 } END { exit bad }' "$TMP/run.csv"; then
    pass "dtopp routing: between 1 and E = 4 experts per token in every cell"
else fail "dtopp routing: a cell outside 1..4 experts per token"; fi
refuses "a DiT as the classifier" "not a classifier of eval_dit" "$EVAL_DIT" quality --data "$DATA" \
    --model "$TMP/run/model.bin" --classifier "$TMP/run/model.bin"
refuses "quality without --model" "needs --model" "$EVAL_DIT" quality --classifier "$TMP/classifier.bin"
refuses "an unknown mode" "unknown value 'qualty'" "$EVAL_DIT" qualty --model "$TMP/run/model.bin"

# bad input
refuses "a second run into the same folder" "holds a run already" "$TRAIN_DIT" "${TINY[@]}" --steps 5 --out "$TMP/run"
refuses "a missing data folder" "cannot open $TMP/none/train-images-idx3-ubyte" \
    "$TRAIN_DIT" "${TINY[@]}" --steps 5 --data "$TMP/none" --out "$TMP/bad1"
mkdir -p "$TMP/gz"
cp "$DATA"/*labels* "$DATA/t10k-images-idx3-ubyte" "$TMP/gz/"
head -c 1000 "$DATA/train-images-idx3-ubyte" | gzip > "$TMP/gz/train-images-idx3-ubyte"
refuses "compressed training images" "gzip-compressed" \
    "$TRAIN_DIT" "${TINY[@]}" --steps 5 --data "$TMP/gz" --out "$TMP/bad2"
head -c 1000 "$DATA/train-images-idx3-ubyte" > "$TMP/gz/train-images-idx3-ubyte"
refuses "truncated training images" "announces" "$TRAIN_DIT" "${TINY[@]}" --steps 5 --data "$TMP/gz" --out "$TMP/bad3"
refuses "an unknown option" "unknown option --colour" "$TRAIN_DIT" --colour 1
refuses "an unknown routing" "unknown value 'topq'" "$TRAIN_DIT" "${TINY[@]}" --routing topq --out "$TMP/bad4"
refuses "36 channels, 5 heads" "multiple of heads" "$TRAIN_DIT" "${TINY[@]}" --channels 36 --heads 5 --out "$TMP/bad5"
refuses "channels not a multiple of 4" "multiple of 4" "$TRAIN_DIT" "${TINY[@]}" --channels 34 --out "$TMP/bad6"
refuses "--init with a model option" "drop the options that describe the model" \
    "$TRAIN_DIT" --init "$TMP/run/model.bin" --layers 3 --steps 0 --out "$TMP/bad8"
refuses "a label dropout of 1" "option --label-dropout: 1 is outside" \
    "$TRAIN_DIT" "${TINY[@]}" --label-dropout 1 --out "$TMP/bad9"
refuses "a language model as checkpoint" "not a diffusion transformer checkpoint" \
    "$TRAIN_DIT" --init test/fixtures/dtopp_model.bin --steps 0 --out "$TMP/bad7"
finish
