#!/usr/bin/env bash
# test_dit.sh: the diffusion transformer's programs end to end on a tiny model and a data set in
# Fashion-MNIST's layout that test/make_test_images generates (10 classes of simple shapes): training
# learns and writes its files, a checkpoint samples the picture of the model that wrote it, every
# routing mode trains, eval_dit's classifier learns and its quality and routing measures run and add
# up, and bad input is refused with a clear message. When the real Fashion-MNIST is there
# (FASHION_MNIST, default data/fashion-mnist), a tiny model also learns on it; without it that check
# is skipped with a line that says so.
#
#   test/test_dit.sh      (run from the repository root, after `make dit/train_dit dit/eval_dit
#                          test/make_test_images`)
#
# Prints one line per check and ends with "N passed, M failed"; exits 1 if any check failed.
set -uo pipefail

TRAIN_DIT=${TRAIN_DIT:-./dit/train_dit}
EVAL_DIT=${EVAL_DIT:-./dit/eval_dit}
MAKE_TEST_IMAGES=${MAKE_TEST_IMAGES:-test/make_test_images}
REAL=${FASHION_MNIST:-data/fashion-mnist}
TMP=$(mktemp -d)
DATA=$TMP/images
trap 'rm -rf "$TMP"' EXIT

# shellcheck source=test/checks.sh
source "$(dirname "$0")/checks.sh"
column() {  # column FILE NAME: the values of a column of log.csv, one per line
    awk -F, -v name="$2" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == name) c = i; next } { print $c }' "$1"
}
is_png() { [[ $(head -c 8 "$1" | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a ]]; }

"$MAKE_TEST_IMAGES" "$DATA" || { echo "FAIL $MAKE_TEST_IMAGES $DATA"; echo "0 passed, 1 failed"; exit 1; }
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

# the real data, when it is there
if [[ -f $REAL/train-images-idx3-ubyte ]]; then
    check "train 60 steps on the real Fashion-MNIST" "$TRAIN_DIT" "${TINY[@]}" --data "$REAL" --steps 60 --lr 3e-3 \
        --out "$TMP/real"
    first=$(column "$TMP/real/log.csv" mse | head -5 | awk '{ s += $1 } END { print s / NR }')
    last=$(column "$TMP/real/log.csv" mse | tail -5 | awk '{ s += $1 } END { print s / NR }')
    if awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < 0.8 * a) }'; then pass "  the loss falls: $first -> $last"
    else fail "  the loss falls: $first -> $last"; fi
else
    echo "skipped: the DiT on the real Fashion-MNIST: not in $REAL (scripts/get_fashion_mnist.sh $REAL)"
fi

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

# ----------------------------------------------------------------------------
# exact resume, checkpoints, outputs, inputs, locks and class counts (issue 22)
word_of() { od -An -t d4 -j $((4 * $2)) -N 4 "$1" | tr -d ' '; }
set_word() {  # set_word FILE WORD VALUE: overwrites 4-byte word WORD of FILE with the int32 (or hex) VALUE
    local v=$(($3 & 0xffffffff))
    # shellcheck disable=SC2059
    printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((v & 255)) $((v >> 8 & 255)) $((v >> 16 & 255)) $((v >> 24 & 255)))" |
        dd of="$1" bs=4 seek="$2" conv=notrunc status=none
}
# resume: 12 steps straight equal 5 steps, stop, resume, 7 steps, bit for bit (model, state, samples,
# every log column but the speed), after a crash left a newer incomplete pair, an older pair and .tmp files
RESUME=("${TINY[@]}" --steps 12 --eval-every 4 --checkpoint-every 3 --lr 3e-3)
"$TRAIN_DIT" "${RESUME[@]}" --out "$TMP/straight" > /dev/null 2>&1
check "stop at step 5 with a checkpoint" "$TRAIN_DIT" "${RESUME[@]}" --stop-at 5 --out "$TMP/split"
check "... the pair of step 5, the previous pair removed" test -s "$TMP/split/model_00000005.bin" \
    -a -s "$TMP/split/state_00000005.bin" -a ! -e "$TMP/split/model_00000003.bin"
cp -r "$TMP/split" "$TMP/split_copy"
cp "$TMP/split/model_00000005.bin" "$TMP/split/model_00000007.bin"
cp "$TMP/split/model_00000005.bin" "$TMP/split/model_00000002.bin"
cp "$TMP/split/state_00000005.bin" "$TMP/split/state_00000002.bin"
: > "$TMP/split/state_00000007.bin.tmp"
sed -n 7,8p "$TMP/straight/log.csv" >> "$TMP/split/log.csv"
check "--resume continues the run" "$TRAIN_DIT" "${RESUME[@]}" --resume "$TMP/split"
cp "$TMP/last.log" "$TMP/resume.log"
check "... from step 5, saying so" grep -q "resuming from $TMP/split/state_00000005.bin: step 5 of 12" "$TMP/resume.log"
check "... to the same model" cmp "$TMP/straight/model.bin" "$TMP/split/model.bin"
check "... the same optimizer state and data position" cmp "$TMP/straight/state_00000012.bin" "$TMP/split/state_00000012.bin"
check "... the same samples" cmp "$TMP/straight/samples.png" "$TMP/split/samples.png"
check "... the same log (but the speed)" cmp <(cut -d, -f1-8,10- "$TMP/straight/log.csv") <(cut -d, -f1-8,10- "$TMP/split/log.csv")
check "... and removes what the crash left" test "$(cd "$TMP/split" && echo *)" = "log.csv model.bin model_00000012.bin samples.png state_00000012.bin"
refuses "resuming with other settings" "state_00000005.bin was written by a run with --steps 12" \
    "$TRAIN_DIT" "${RESUME[@]}" --lr 1e-3 --resume "$TMP/split_copy"
refuses "resuming into another --out" "continues the run in its folder" \
    "$TRAIN_DIT" "${RESUME[@]}" --resume "$TMP/split_copy" --out "$TMP/elsewhere"
cp -r "$TMP/split_copy" "$TMP/perm"
set_word "$TMP/perm/state_00000005.bin" $(($(wc -c < "$TMP/perm/state_00000005.bin") / 4 - 1)) 0
refuses "a state whose image order is not a permutation" "is not a permutation" \
    "$TRAIN_DIT" "${RESUME[@]}" --resume "$TMP/perm"

# non-finite parameters are never written: a finite loss with an update that overflows
refuses "an update to infinite parameters writes no checkpoint" "no checkpoint was written to $TMP/inf" \
    "$TRAIN_DIT" "${TINY[@]}" --steps 1 --warmup 1 --lr 3e38 --weight-decay 10 --out "$TMP/inf"
check "... no model.bin" test ! -e "$TMP/inf/model.bin"
cp -r "$TMP/split_copy" "$TMP/overflow"
set_word "$TMP/overflow/state_00000005.bin" 256 0x7f7fffff  # the first moment of parameter 0: FLT_MAX
refuses "... and the last good one is kept" "the last checkpoint, step 5 in $TMP/overflow, is kept" \
    "$TRAIN_DIT" "${RESUME[@]}" --checkpoint-every 1 --resume "$TMP/overflow"
check "... and loads" "$TRAIN_DIT" --init "$TMP/overflow/model.bin" --steps 0 --sample-steps 1 --samples-per-class 1 \
    --out "$TMP/overflow_samples"

# every log row is checked: a file size limit that stops the log stops the run, naming it
(trap '' XFSZ; ulimit -f 4; "$TRAIN_DIT" "${TINY[@]}" --steps 60 --checkpoint-every 0 --out "$TMP/log_full" \
    > "$TMP/log_full.log" 2>&1)
status=$?
if [[ $status -ne 0 ]] && grep -q "cannot write $TMP/log_full/log.csv" "$TMP/log_full.log"; then
    pass "a log.csv that cannot be written stops the run (exit $status), naming it"
else fail "a log.csv that cannot be written stops the run (exit $status: $(tail -1 "$TMP/log_full.log"))"; fi

# one run at a time in a folder; a run killed with -9 leaves no lock behind
"$TRAIN_DIT" "${TINY[@]}" --steps 100000 --checkpoint-every 2 --out "$TMP/busy" > /dev/null 2>&1 &
busy=$!
for _ in $(seq 600); do [[ -n $(find "$TMP/busy" -name 'state_*.bin' 2> /dev/null) ]] && break; sleep 0.1; done
refuses "a second run on a folder in use" "$TMP/busy is in use by another run (process $busy" \
    "$TRAIN_DIT" "${TINY[@]}" --steps 100000 --checkpoint-every 2 --resume "$TMP/busy"
kill -9 $busy
wait $busy 2> /dev/null
last_state=$(find "$TMP/busy" -name 'state_*.bin' | sed 's/.*state_0*\([0-9]*\)\.bin/\1/' | sort -n | tail -1)
check "after kill -9 the run resumes: no lock is left stuck" "$TRAIN_DIT" "${TINY[@]}" --steps 100000 \
    --checkpoint-every 2 --stop-at $((last_state + 1)) --resume "$TMP/busy"

# a checkpoint whose class count is not the data's: 9 classes (one row of the class embedding less)
# against labels 0..9, for eval_dit (before: a heap overflow in routing) and train_dit
C=32; cut_at=$((1024 + 4 * (C * 16 + 2 * C * C)))
{ head -c $cut_at "$TMP/run/model.bin"; tail -c +$((cut_at + 4 * C + 1)) "$TMP/run/model.bin"; } > "$TMP/nine.bin"
set_word "$TMP/nine.bin" 66 9
refuses "eval_dit routing with a 9-class model on 10-class data names both files" \
    "label 9 of image" "$EVAL_DIT" routing --data "$DATA" --model "$TMP/nine.bin" --eval-images 20 --batch 8 --out "$TMP/nine.csv"
check "... the message names the model" bash -c "'$EVAL_DIT' routing --data '$DATA' --model '$TMP/nine.bin' --out '$TMP/nine.csv' 2>&1 | grep -q 'not a class of $TMP/nine.bin, which has 9'"
refuses "train_dit with a 9-class model" "$TMP/nine.bin has 9 classes: train_dit trains and samples Fashion-MNIST's 10" \
    "$TRAIN_DIT" --data "$DATA" --init "$TMP/nine.bin" --steps 0 --out "$TMP/nine"

# outputs are checked before the work; stdout that carries the measures is checked; inputs and
# outputs that are not regular files are refused by name (timeout: a hang fails instead of waiting)
"$EVAL_DIT" classifier --data "$DATA" --out "$TMP/no/such/classifier.bin" --steps 200 --batch 8 --layers 1 \
    --channels 8 --expert-hidden 8 --test-images 20 > "$TMP/early.log" 2>&1
status=$?
if [[ $status -ne 0 ]] && grep -q "cannot write $TMP/no/such/classifier.bin.tmp" "$TMP/early.log" && ! grep -q '^step' "$TMP/early.log"; then
    pass "eval_dit classifier: an unwritable --out fails before the first step"
else fail "eval_dit classifier: an unwritable --out (exit $status, $(grep -c '^step' "$TMP/early.log") progress lines first)"; fi
refuses "eval_dit --out on a device" "/dev/full is not a regular file" "$EVAL_DIT" routing --data "$DATA" \
    --model "$TMP/run/model.bin" --eval-images 8 --batch 8 --out /dev/full
refuses "eval_dit quality with a full standard output" "cannot write the standard output" bash -c \
    "'$EVAL_DIT' quality --data '$DATA' --model '$TMP/run/model.bin' --classifier '$TMP/classifier.bin' \
     --samples-per-class 2 --sample-steps 1 --batch 20 --test-images 20 > /dev/full"
mkfifo "$TMP/fifo.bin"
refuses "a FIFO as --init" "$TMP/fifo.bin is not a regular file" timeout 60 "$TRAIN_DIT" --init "$TMP/fifo.bin" \
    --steps 0 --out "$TMP/fifo_out"
mkdir -p "$TMP/fifo_data" && cp "$DATA"/* "$TMP/fifo_data/" && rm "$TMP/fifo_data/train-images-idx3-ubyte"
mkfifo "$TMP/fifo_data/train-images-idx3-ubyte"
refuses "a FIFO as the training images" "train-images-idx3-ubyte is not a regular file" timeout 60 \
    "$TRAIN_DIT" "${TINY[@]}" --steps 2 --data "$TMP/fifo_data" --out "$TMP/fifo_run"
mkdir -p "$TMP/fifo_png" && mkfifo "$TMP/fifo_png/samples.png"
refuses "a FIFO where samples.png goes, before any work" "samples.png is not a regular file" timeout 60 \
    "$TRAIN_DIT" "${TINY[@]}" --steps 2 --out "$TMP/fifo_png"
finish
