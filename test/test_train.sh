#!/usr/bin/env bash
# test_train.sh: the training program end to end on a tiny model: training, sampling, exact
# resume, and refusal of bad input.
#
#   test/test_train.sh            (run from the repository root, after `make`)
#
# Prints one line per check and ends with "N passed, M failed"; exits 1 if any check failed.
set -uo pipefail

TRAIN=${TRAIN:-./train_dtopp}
PREPRO=${PREPRO:-./prepro}
MAKE_OFFLINE_TEXT=${MAKE_OFFLINE_TEXT:-tools/make_offline_text}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# shellcheck source=test/checks.sh
source "$(dirname "$0")/checks.sh"
set_word() {  # set_word FILE WORD VALUE: overwrites 4-byte word WORD of FILE with the int32 (or hex bit pattern) VALUE
    local v=$(($3 & 0xffffffff))
    # shellcheck disable=SC2059
    printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((v & 255)) $((v >> 8 & 255)) $((v >> 16 & 255)) $((v >> 24 & 255)))" |
        dd of="$1" bs=4 seek="$2" conv=notrunc status=none
}
words() { echo $(($(stat -c %s "$1") / 4)); }  # words FILE: its length in 4-byte words
column() {  # column FILE NAME: the values of a column of log.csv, one per line
    awk -F, -v name="$2" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == name) c = i; next } { print $c }' "$1"
}

# data: the project's own text, as bytes and as GPT-2 tokens
"$MAKE_OFFLINE_TEXT" > "$TMP/text.txt"
"$PREPRO" --vocab bytes -o "$TMP/bytes" "$TMP/text.txt" > /dev/null || { echo "prepro failed"; exit 1; }
"$PREPRO" --vocab gpt2 -o "$TMP/gpt2" "$TMP/text.txt" > /dev/null || { echo "prepro failed"; exit 1; }
TINY=(--model tiny --batch 4 --seq-len 32 --eval-batches 2 --sample-tokens 0 --threads 2)
BYTES=(--train "$TMP/bytes_train.bin" --val "$TMP/bytes_val.bin")

# training learns: the loss falls
check "train 40 steps (dtopp, bytes)" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --steps 40 --lr 1e-2 --eval-every 20 --out "$TMP/learn"
first=$(column "$TMP/learn/log.csv" loss | head -3 | awk '{ s += $1 } END { print s / NR }')
last=$(column "$TMP/learn/log.csv" loss | tail -3 | awk '{ s += $1 } END { print s / NR }')
if awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 0.5) }'; then pass "loss falls: $first -> $last"; else fail "loss falls: $first -> $last"; fi
check "log.csv has a row per step" test "$(column "$TMP/learn/log.csv" step | tail -1)" = 40
check "checkpoint written" test -s "$TMP/learn/model.bin" -a -s "$TMP/learn/model_00000040.bin" -a -s "$TMP/learn/state_00000040.bin"

# every routing mode trains
n=0
for mode in "--routing topk --k 2" "--routing topp --p 0.6" "--routing dtopp --controller layer" "--routing dtopp --drn 0 --renorm 0"; do
    n=$((n + 1))
    # shellcheck disable=SC2086
    check "train 3 steps: $mode" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --steps 3 --out "$TMP/mode$n" $mode
done

# a fixed top-k first layer (--first-layer-k): layer 0 takes exactly k experts, the controller holds
# the target over layers 1.. only, the checkpoint keeps it (header word 18), and bad uses are refused
layer_means() {  # layer_means LOG.csv: per step, "activated" and each layer's mean |S| from its histogram
    awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) h[$i] = i; next }
             { line = $h["activated"]
               for (l = 0; ("hist_" l "_0") in h; l++) {
                   a = 0; n = 0
                   for (k = 0; ("hist_" l "_" k) in h; k++) { a += k * $h["hist_" l "_" k]; n += $h["hist_" l "_" k] }
                   line = line " " a / n
               }
               print line }' "$1"
}
FIRST=("${BYTES[@]}" "${TINY[@]}" --layers 3 --lr 1e-2 --tgt 3 --first-layer-k 1)
check "train 40 steps with layer 0 on a fixed top-1 (dtopp, target 3)" "$TRAIN" "${FIRST[@]}" --steps 40 --out "$TMP/first"
cp "$TMP/last.log" "$TMP/first.out"  # the run's output (check keeps the last command's)
check "... its progress line shows layers 1-2, the controller's a_t, as log.csv has them, against target 3" \
    awk -v want="$(layer_means "$TMP/first/log.csv" | tail -1 | awk '{ print ($3 + $4) / 2 }')" \
        '/^step/ { last = $0 } END { if (!match(last, /layers 1-2 [0-9.]+ \(target 3\.00\)/)) exit 1
                                    split(substr(last, RSTART, RLENGTH), w, " "); d = w[3] - want
                                    exit !(d < 0.006 && d > -0.006) }' "$TMP/first.out"
check "... layer 0 takes exactly 1 expert at every step" test "$(layer_means "$TMP/first/log.csv" | awk '$2 != 1' | wc -l)" = 0
# a controller over every layer would hold (1 + 2a) / 3 at 3, so layers 1 and 2 at a = 4
check "... layers 1 and 2 hold the target 3 over the last 10 steps (not 4: layer 0 is left out)" \
    awk '{ s += ($3 + $4) / 2 } END { exit !(s / NR > 2.5 && s / NR < 3.5) }' <(layer_means "$TMP/first/log.csv" | tail -10)
check "... the logged activated experts are every layer's mean, (1 + 3 + 3) / 3" \
    awk '{ exit !($1 > 2.2 && $1 < 2.45) }' <(layer_means "$TMP/first/log.csv" | tail -1)
check "... the checkpoint records k = 1 in header word 18" test "$(od -An -t d4 -j 72 -N 4 "$TMP/first/model.bin" | tr -d ' ')" = 1
check "... and a run from it keeps layer 0 on top-1" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --init "$TMP/first/model.bin" --steps 2 --out "$TMP/first_init"
check "... (its log)" test "$(layer_means "$TMP/first_init/log.csv" | awk '$2 != 1' | wc -l)" = 0
refuses "--first-layer-k with top-k routing is refused" "fixed top-k first layer needs" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --routing topk --first-layer-k 1 --steps 1 --out "$TMP/first_topk"
refuses "--first-layer-k above E is refused" "fixed top-k first layer needs" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --first-layer-k 9 --steps 1 --out "$TMP/first_big"
refuses "--first-layer-k with one layer is refused" "fixed top-k first layer needs" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --layers 1 --first-layer-k 1 --steps 1 --out "$TMP/first_one"
cp "$TMP/first/model.bin" "$TMP/first_bad.bin"
set_word "$TMP/first_bad.bin" 18 99
refuses "a checkpoint whose first layer takes 99 of 8 experts is refused" "fixed top-k first layer needs" "$TRAIN" --init "$TMP/first_bad.bin" --generate 4

# sampling from a checkpoint, with a prompt, for bytes and for GPT-2 tokens
check "generate 64 bytes after a prompt" "$TRAIN" --init "$TMP/learn/model.bin" --generate 64 --prompt "The " --seed 1
check "train GPT-2 tokens, 3 steps, with samples" "$TRAIN" --train "$TMP/gpt2_train.bin" --val "$TMP/gpt2_val.bin" \
    --model tiny --batch 2 --seq-len 32 --eval-batches 1 --steps 3 --sample-tokens 8 --sample-every 2 --out "$TMP/gpt2"
check "generate 16 GPT-2 tokens after a prompt" "$TRAIN" --init "$TMP/gpt2/model.bin" --generate 16 --prompt "Once upon a time" --temperature 0.8
check "generate 256 tokens" "$TRAIN" --init "$TMP/learn/model.bin" --generate 256 --prompt "The"
echo "     ($(tail -1 "$TMP/last.log"), tiny byte model)"
check "greedy sampling is deterministic" bash -c "cmp <('$TRAIN' --init '$TMP/learn/model.bin' --generate 32 --temperature 0 2>/dev/null) \
    <('$TRAIN' --init '$TMP/learn/model.bin' --generate 32 --temperature 0 --seed 7 2>/dev/null)"

# resume: 12 steps straight equal 6 steps + resume + 6 steps, bit for bit, even after a crash left
# log rows of later steps (one cut off), an incomplete newer checkpoint, an older pair and .tmp files
RUN=("${BYTES[@]}" "${TINY[@]}" --steps 12 --eval-every 0 --checkpoint-every 6 --routing dtopp --controller layer --lr 1e-2)
"$TRAIN" "${RUN[@]}" --out "$TMP/straight" > /dev/null 2>&1
"$TRAIN" "${RUN[@]}" --out "$TMP/split" --stop-at 6 > /dev/null 2>&1
check "stopped at step 6 with a checkpoint" test -s "$TMP/split/state_00000006.bin"
cp -r "$TMP/split" "$TMP/split_copy"  # for the tests of bad state files below
sed -n 8,10p "$TMP/straight/log.csv" >> "$TMP/split/log.csv"
sed -n 11p "$TMP/straight/log.csv" | head -c 40 >> "$TMP/split/log.csv"
cp "$TMP/split/model_00000006.bin" "$TMP/split/model_00000009.bin"
cp "$TMP/split/model_00000006.bin" "$TMP/split/model_00000003.bin"
cp "$TMP/split/state_00000006.bin" "$TMP/split/state_00000003.bin"
: > "$TMP/split/state_00000009.bin.tmp"
: > "$TMP/split/model.bin.tmp"
"$TRAIN" "${RUN[@]}" --out "$TMP/split" --resume "$TMP/split/" > "$TMP/resume.log" 2>&1
check "resume says what it resumes" grep -qF "resuming from $TMP/split//model_00000006.bin and $TMP/split//state_00000006.bin: step 6 of 12" "$TMP/resume.log"
check "resumed run reaches step 12" test -s "$TMP/split/model_00000012.bin"
check "resume removes what a crash left behind" test "$(cd "$TMP/split" && echo *)" = "log.csv model.bin model_00000012.bin options.txt state_00000012.bin"
check "resume: identical losses and p at every step" cmp <(cut -d, -f1-3,7-8 "$TMP/straight/log.csv") <(cut -d, -f1-3,7-8 "$TMP/split/log.csv")
check "resume: identical parameters and controller state" cmp "$TMP/straight/model.bin" "$TMP/split/model.bin"
check "resume: identical optimizer state" cmp "$TMP/straight/state_00000012.bin" "$TMP/split/state_00000012.bin"
check "older checkpoint removed once the newer is complete" test ! -e "$TMP/straight/model_00000006.bin"

# bad input: a clear message and a non-zero exit
# a vocabulary prepro trained: samples need its tokenizer file, and GPT-2's is refused
"$PREPRO" --vocab bpe --bpe-tokens 400 -o "$TMP/bpe" "$TMP/text.txt" > /dev/null || { echo "prepro failed"; exit 1; }
check "train 3 steps on a trained BPE vocabulary and sample with its tokenizer file" "$TRAIN" \
    --train "$TMP/bpe_train.bin" --val "$TMP/bpe_val.bin" "${TINY[@]}" --steps 3 --sample-tokens 8 \
    --tokenizer "$TMP/bpe_tokenizer.bin" --out "$TMP/bpe_run"
refuses "sampling a BPE model with GPT-2's tokenizer" "holds a gpt2 vocabulary but the model's is bpe" "$TRAIN" \
    --init "$TMP/bpe_run/model.bin" --generate 4 --tokenizer tokenizer.bin
refuses "missing shard" "no file matches" "$TRAIN" --train "$TMP/nothing_*.bin" --out "$TMP/bad"
printf 'not a shard at all, just some text that is long enough to hold a header of 1024 bytes %01000d' 0 > "$TMP/foreign.bin"
refuses "foreign shard" "magic" "$TRAIN" --train "$TMP/foreign.bin" --out "$TMP/bad"
head -c 2000 "$TMP/bytes_train.bin" > "$TMP/truncated_train.bin"
refuses "truncated shard" "$TMP/truncated_train.bin" "$TRAIN" --train "$TMP/truncated_train.bin" --out "$TMP/bad"
head -c 5000 "$TMP/learn/model.bin" > "$TMP/truncated_model.bin"
refuses "truncated model" "truncated" "$TRAIN" --init "$TMP/truncated_model.bin" --generate 8
refuses "shard as a model" "not a model checkpoint" "$TRAIN" --init "$TMP/bytes_train.bin" --generate 8
: > "$TMP/empty.bin"
refuses "empty model file" "too short" "$TRAIN" --init "$TMP/empty.bin" --generate 8
refuses "missing tokenizer" "cannot open" "$TRAIN" --init "$TMP/gpt2/model.bin" --generate 8 --tokenizer "$TMP/none.bin"
refuses "GPT-2 tokens into a byte model" "does not fit" "$TRAIN" --init "$TMP/learn/model.bin" --train "$TMP/gpt2_train.bin" --val "" --out "$TMP/bad"
refuses "k > E" "1 <= k <= E" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --routing topk --k 9 --out "$TMP/bad"
refuses "target > E" "target must be in" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --tgt 9 --out "$TMP/bad"
refuses "p outside (0, 1]" "1.5 is outside [0, 1]" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --routing topp --p 1.5 --out "$TMP/bad"
refuses "p = 0 for topp" "p must be in (0, 1]" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --routing topp --p 0 --out "$TMP/bad"
refuses "p0 outside [pmin, pmax]" "p0 must be in" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --p0 0.001 --out "$TMP/bad"
refuses "T > max sequence length" "exceeds the model's maximum" "$TRAIN" "${BYTES[@]}" --init "$TMP/learn/model.bin" --seq-len 2048 --out "$TMP/bad"
refuses "unknown option" "unknown option" "$TRAIN" --stepz 3
refuses "not a number" "cannot read" "$TRAIN" --steps many
refuses "unknown routing" "unknown value" "$TRAIN" "${BYTES[@]}" --routing top-q --out "$TMP/bad"
touch "$TMP/a_file"
refuses "unwritable output directory" "$TMP/a_file/out" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --out "$TMP/a_file/out"
# divergence: a huge learning rate makes the loss infinite; the last checkpoint must survive
"$TRAIN" "${BYTES[@]}" "${TINY[@]}" --steps 30 --checkpoint-every 1 --lr 1e6 --warmup 1 --eval-every 0 --out "$TMP/diverge" > "$TMP/diverge.log" 2>&1
status=$?
if [ $status -ne 0 ] && grep -q "diverged" "$TMP/diverge.log"; then pass "NaN/infinite loss stops training: $(grep diverged "$TMP/diverge.log" | cut -c1-100)"
else fail "NaN/infinite loss stops training (exit $status)"; fi
check "the last checkpoint before divergence still loads" "$TRAIN" --init "$TMP/diverge/model.bin" --generate 4

# a checkpoint's sizes are bounded: the first header declares 2^64 + 1 parameters (in 64-bit
# arithmetic: 1, and the file holds 1), the second 3.3e14 within the bounds of every size
head -c 1036 /dev/zero > "$TMP/wrapped.bin"
for w in "0 20251213" "1 2" "2 16" "3 1035200" "4 1035264" "5 1" "6 524288" "7 1048576" "8 4095" "9 1432004950" \
         "13 1" "14 1" "15 2"; do
    set_word "$TMP/wrapped.bin" $w
done
refuses "a header whose parameter count wraps around" "at most 4096 experts and 1048576 otherwise" "$TRAIN" --init "$TMP/wrapped.bin" --generate 4
cp "$TMP/wrapped.bin" "$TMP/huge.bin"
for w in "3 256" "4 256" "6 1" "7 65536" "8 4096" "9 65536"; do set_word "$TMP/huge.bin" $w; done
refuses "a header declaring too many parameters" "more than 68719476736 parameters" "$TRAIN" --init "$TMP/huge.bin" --generate 4

# the controller state and routing flags of a checkpoint are validated (tiny model: L = 2, so
# the last 4 words are p_0, p_1, I_0, I_1)
"$TRAIN" "${BYTES[@]}" "${TINY[@]}" --steps 1 --routing topp --p 0.5 --out "$TMP/topp" > /dev/null 2>&1
cp "$TMP/topp/model.bin" "$TMP/p_zero.bin"
set_word "$TMP/p_zero.bin" $(($(words "$TMP/p_zero.bin") - 4)) 0
set_word "$TMP/p_zero.bin" $(($(words "$TMP/p_zero.bin") - 3)) 0
refuses "top-p checkpoint with p = 0 in its controller state" "threshold p = 0" "$TRAIN" --init "$TMP/p_zero.bin" --generate 4
cp "$TMP/learn/model.bin" "$TMP/integral_inf.bin"
set_word "$TMP/integral_inf.bin" $(($(words "$TMP/integral_inf.bin") - 2)) 0x7f800000
set_word "$TMP/integral_inf.bin" $(($(words "$TMP/integral_inf.bin") - 1)) 0x7f800000
refuses "dtopp checkpoint with an infinite integral" "controller state of layer 0 is not finite" "$TRAIN" --init "$TMP/integral_inf.bin" --generate 4
cp "$TMP/learn/model.bin" "$TMP/drn5.bin" && set_word "$TMP/drn5.bin" 12 5
refuses "checkpoint with drn = 5" "drn and renorm must be 0 or 1" "$TRAIN" --init "$TMP/drn5.bin" --generate 4
cp "$TMP/learn/model.bin" "$TMP/renorm.bin" && set_word "$TMP/renorm.bin" 13 -3
refuses "checkpoint with renorm = -3" "drn and renorm must be 0 or 1" "$TRAIN" --init "$TMP/renorm.bin" --generate 4

# options: every number in its range, read whole
refuses "--threads 100000" "outside [0, 1024]" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --threads 100000 --out "$TMP/bad"
refuses "--lr inf" "outside" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --lr inf --out "$TMP/bad"
refuses "--steps 4294967297" "outside" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --steps 4294967297 --out "$TMP/bad"
refuses "--layers -5" "outside" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --layers -5 --out "$TMP/bad"
refuses "--experts -1" "outside" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --experts -1 --out "$TMP/bad"
refuses "--temperature nan" "cannot read" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --temperature nan --out "$TMP/bad"
refuses "--generate -5 --init M" "outside" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --generate -5 --init "$TMP/learn/model.bin" --out "$TMP/bad"
refuses "a validation shard of another vocabulary" "(validation data): its vocabulary (50257 gpt2 tokens)" \
    "$TRAIN" --train "$TMP/bytes_train.bin" --val "$TMP/gpt2_val.bin" "${TINY[@]}" --out "$TMP/bad"

# every output path is checked before the run: a bad --routing-dump fails at once
refuses "unwritable --routing-dump" "cannot write $TMP/a_file/dump.csv" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --steps 3 \
    --routing-dump "$TMP/a_file/dump.csv" --out "$TMP/dump"
check "... before training" test ! -e "$TMP/dump/log.csv"

# token ids beyond the vocabulary are found at the start, wherever they are (here the last token)
cp "$TMP/bytes_train.bin" "$TMP/bad_token.bin"
printf '\x2c\x01' | dd of="$TMP/bad_token.bin" bs=1 seek=$(($(stat -c %s "$TMP/bad_token.bin") - 2)) conv=notrunc status=none
refuses "a token beyond the vocabulary, at the start" "token 300 at offset" "$TRAIN" --train "$TMP/bad_token.bin" --val "" \
    "${TINY[@]}" --steps 1 --out "$TMP/bad_token"

# a run never takes over another run's checkpoints
refuses "a new run into a directory holding another run" "already holds a run" "$TRAIN" "${RUN[@]}" --out "$TMP/straight"
refuses "resuming with other settings" "state_00000006.bin was written by a run with --steps 12" \
    "$TRAIN" "${RUN[@]}" --steps 20 --resume "$TMP/split_copy" --out "$TMP/other_settings"
refuses "resuming over other data: the message names the checkpoint" "state_00000006.bin: cannot restore the data position" \
    "$TRAIN" "${RUN[@]}" --batch 2 --resume "$TMP/split_copy" --out "$TMP/other_data"

# bad training state: a negative AdamW step, or moments that make the update overflow; the last
# good checkpoint must survive and load
cp -r "$TMP/split_copy" "$TMP/adam"
set_word "$TMP/adam/state_00000006.bin" 3 -1
refuses "a state file with AdamW step -1" "invalid step 6 or AdamW step -1" "$TRAIN" "${RUN[@]}" --resume "$TMP/adam" --out "$TMP/adam"
check "... its checkpoint is still there" test -s "$TMP/adam/model_00000006.bin"
cp -r "$TMP/split_copy" "$TMP/overflow"
set_word "$TMP/overflow/state_00000006.bin" 256 0x7f7fffff  # the first moment of parameter 0: FLT_MAX
refuses "an update to non-finite parameters is not saved" "the last checkpoint, step 6 in $TMP/overflow, is kept" \
    "$TRAIN" "${RUN[@]}" --checkpoint-every 1 --resume "$TMP/overflow" --out "$TMP/overflow"
check "... and that checkpoint loads" "$TRAIN" --init "$TMP/overflow/model.bin" --generate 4
refuses "divergence before any checkpoint says so" "no checkpoint was written" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" \
    --steps 30 --checkpoint-every 0 --lr 1e6 --warmup 1 --eval-every 0 --out "$TMP/diverge_early"

# a full disk (here: a file size limit) while writing a checkpoint: no .tmp file is left, the previous
# checkpoint is kept, and the run resumes from it to the same result
cp -r "$TMP/split_copy" "$TMP/full"
(trap '' XFSZ; ulimit -f 1500; "$TRAIN" "${RUN[@]}" --resume "$TMP/full" --out "$TMP/full" > "$TMP/full.log" 2>&1)
check "a full disk stops the run with a message" grep -q "cannot write $TMP/full/state_00000012.bin.tmp" "$TMP/full.log"
check "... leaves no .tmp file" test -z "$(find "$TMP/full" -name '*.tmp')"
"$TRAIN" "${RUN[@]}" --resume "$TMP/full" --out "$TMP/full" > /dev/null 2>&1
check "... and resumes from the checkpoint before to the same result" cmp "$TMP/straight/model.bin" "$TMP/full/model.bin"

# sampling says how many tokens it printed when the model's maximum sequence length stops it
"$TRAIN" "${BYTES[@]}" "${TINY[@]}" --seq-len 16 --max-seq-len 16 --steps 1 --out "$TMP/short" > /dev/null 2>&1
"$TRAIN" --init "$TMP/short/model.bin" --generate 100 > /dev/null 2> "$TMP/short.log"
check "sampling stopped by the maximum sequence length says so" grep -q "^15 tokens in .*maximum sequence length is 16" "$TMP/short.log"

# make train: a text given with TEXT= once is not silently reused by a later make train without
# it; a second make train into the same output refuses instead of overwriting it
tr 'a-z' 'A-Z' < "$TMP/text.txt" > "$TMP/other.txt"
MAKE_TRAIN=("${MAKE:-make}" --no-print-directory train DATA="$TMP/data" TRAIN_FLAGS="${TINY[*]} --steps 2 --eval-every 0")
GET_DATA_OFFLINE=1 "${MAKE_TRAIN[@]}" OUT="$TMP/make1" TEXT="$TMP/other.txt" > "$TMP/make1.log" 2>&1
check "make train TEXT=other.txt trains on it" cmp "$TMP/data/input.txt" "$TMP/other.txt"
GET_DATA_OFFLINE=1 "${MAKE_TRAIN[@]}" OUT="$TMP/make2" > "$TMP/make2.log" 2>&1
check "a later make train without TEXT does not use it" bash -c "! cmp -s '$TMP/data/input.txt' '$TMP/other.txt'"
refuses "a second make train into the same output" "already holds a run" env GET_DATA_OFFLINE=1 "${MAKE_TRAIN[@]}" OUT="$TMP/make2"

# ----------------------------------------------------------------------------
# outputs, inputs, locks and names (issue 22)

# every write of log.csv is checked: a file size limit that stops the log stops the run, naming it
(trap '' XFSZ; ulimit -f 4; "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --steps 30 --eval-every 0 --checkpoint-every 0 \
    --out "$TMP/log_full" > "$TMP/log_full.log" 2>&1)
status=$?
if [[ $status -ne 0 ]] && grep -q "cannot write $TMP/log_full/log.csv" "$TMP/log_full.log"; then
    pass "a log.csv that cannot be written stops the run (exit $status), naming it"
else fail "a log.csv that cannot be written stops the run (exit $status: $(tail -1 "$TMP/log_full.log"))"; fi
refuses "a sample whose standard output is full is an error" "cannot write the standard output" \
    bash -c "'$TRAIN' --init '$TMP/learn/model.bin' --generate 32 > /dev/full"

# one run at a time in an output directory; a run killed with -9 leaves no lock behind
"$TRAIN" "${BYTES[@]}" "${TINY[@]}" --steps 100000 --eval-every 0 --checkpoint-every 2 --out "$TMP/busy" \
    > "$TMP/busy.log" 2>&1 &
busy=$!
for _ in $(seq 600); do [[ -e $TMP/busy/state_00000002.bin ]] && break; sleep 0.1; done
refuses "a second run on an output directory in use" "$TMP/busy is in use by another run (process $busy" \
    "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --steps 10 --out "$TMP/busy"
refuses "... and a resume of it" "is in use by another run" \
    "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --steps 100000 --eval-every 0 --checkpoint-every 2 --resume "$TMP/busy" --out "$TMP/busy"
kill -9 $busy
wait $busy 2> /dev/null
check "after kill -9 the run resumes: no lock is left stuck" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --steps 100000 \
    --eval-every 0 --checkpoint-every 2 --stop-at "$(($(ls "$TMP/busy" | sed -n 's/^state_0*\([0-9]*\)\.bin$/\1/p' | sort -n | tail -1) + 1))" \
    --resume "$TMP/busy" --out "$TMP/busy"

# checkpoint names are parsed strictly: a stray name is neither resumed from nor removed
cp -r "$TMP/split_copy" "$TMP/names"
cp "$TMP/names/model_00000006.bin" "$TMP/names/model_00000009.bin"  # an incomplete newer pair
cp "$TMP/names/state_00000006.bin" "$TMP/names/state_+0000009.bin"  # not a checkpoint's name
cp "$TMP/names/state_00000006.bin" "$TMP/names/state_99999999999.bin"
check "a stray state_+0000009.bin does not block --resume" "$TRAIN" "${RUN[@]}" --resume "$TMP/names" --out "$TMP/names"
check "... the run resumed from step 6 to the same result" cmp "$TMP/straight/model.bin" "$TMP/names/model.bin"
check "... and files that are not checkpoint names are left alone" \
    test -e "$TMP/names/state_+0000009.bin" -a -e "$TMP/names/state_99999999999.bin"

# inputs that are not regular files are refused by name; outputs that exist and are not regular
# files are never written through or replaced (timeout: a hang on a FIFO fails instead of waiting)
mkfifo "$TMP/fifo.bin"
refuses "a FIFO as --init" "$TMP/fifo.bin is not a regular file" timeout 60 "$TRAIN" --init "$TMP/fifo.bin" --generate 4
refuses "a FIFO as a shard" "$TMP/fifo.bin is not a regular file" timeout 60 "$TRAIN" --train "$TMP/fifo.bin" --out "$TMP/bad"
refuses "a directory as --init" "$TMP/learn is not a regular file (a directory)" "$TRAIN" --init "$TMP/learn" --generate 4
mkdir -p "$TMP/fifo_out" && mkfifo "$TMP/fifo_out/log.csv"
refuses "a FIFO where log.csv goes" "$TMP/fifo_out/log.csv is not a regular file" timeout 60 "$TRAIN" "${BYTES[@]}" \
    "${TINY[@]}" --steps 2 --out "$TMP/fifo_out"
refuses "a FIFO as --routing-dump" "$TMP/fifo.bin is not a regular file" timeout 60 "$TRAIN" "${BYTES[@]}" "${TINY[@]}" \
    --steps 2 --routing-dump "$TMP/fifo.bin" --out "$TMP/fifo_dump"

# contradictory or out-of-range header fields: a shard of "bytes" with a vocabulary of 65536, a state
# whose data position is in epoch 2^62; a refused state leaves nothing allocated (status 1, no
# LeakSanitizer report under make test SANITIZE=1)
cp "$TMP/bytes_train.bin" "$TMP/bytes_65536.bin" && set_word "$TMP/bytes_65536.bin" 3 65536
refuses "a shard of bytes with a vocabulary of 65536" "header says bytes tokens but a vocabulary of 65536" \
    "$TRAIN" --train "$TMP/bytes_65536.bin" --val "" "${TINY[@]}" --out "$TMP/bad"
cp -r "$TMP/split_copy" "$TMP/epoch"
set_word "$TMP/epoch/state_00000006.bin" 5 0x40000000  # the high word of the epoch
refuses "a state whose data position is in epoch 2^62" "invalid data position (epoch 4611686" \
    "$TRAIN" "${RUN[@]}" --resume "$TMP/epoch" --out "$TMP/epoch"
cp -r "$TMP/split_copy" "$TMP/negative"
set_word "$TMP/negative/state_00000006.bin" $(($(words "$TMP/negative/state_00000006.bin") - 1)) 0xbf800000
"$TRAIN" "${RUN[@]}" --resume "$TMP/negative" --out "$TMP/negative" > "$TMP/negative.log" 2>&1
status=$?
if [[ $status -eq 1 ]] && grep -q "is negative" "$TMP/negative.log" && ! grep -q Sanitizer "$TMP/negative.log"; then
    pass "a state with a negative second moment is refused with status 1, nothing leaked"
else fail "a state with a negative second moment: exit $status, $(grep -m1 -E 'error|Sanitizer' "$TMP/negative.log")"; fi

# memory follows what is used: a model whose maximum sequence length is 2^20 trains on 32 positions
# and samples 8 tokens without tables for the other positions (before: 512 MB of RoPE tables)
max_rss() { /usr/bin/time -f %M "$@" 2>&1 > /dev/null | tail -1; }
rss=$(max_rss "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --channels 128 --heads 1 --max-seq-len 1048576 --steps 1 --out "$TMP/long")
if [[ $rss =~ ^[0-9]+$ && $rss -lt 250000 ]]; then pass "training a model of maximum length 2^20: ${rss} kB"
else fail "training a model of maximum length 2^20: ${rss} kB (over 250 MB)"; fi
rss=$(max_rss "$TRAIN" --init "$TMP/long/model.bin" --generate 8)
if [[ $rss =~ ^[0-9]+$ && $rss -lt 250000 ]]; then pass "sampling 8 tokens from it: ${rss} kB"
else fail "sampling 8 tokens from it: ${rss} kB (over 250 MB)"; fi

finish
