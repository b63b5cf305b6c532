#!/usr/bin/env bash
# test_dit.sh: the diffusion transformer's program end to end on a tiny model and the real
# Fashion-MNIST: training learns and writes its files, a checkpoint samples the picture of the
# model that wrote it, every routing mode trains, and bad input is refused with a clear message.
#
#   test/test_dit.sh      (run from the repository root, after `make train_dit` and
#                          scripts/get_fashion_mnist.sh data/fashion-mnist)
#
# Without the data the test fails: it never passes by skipping. Prints one line per check and
# ends with "N passed, M failed"; exits 1 if any check failed.
set -uo pipefail

TRAIN_DIT=${TRAIN_DIT:-./train_dit}
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
