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
passed=0
failed=0
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

pass() { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }
check() {  # check DESCRIPTION COMMAND...: passes if the command succeeds
    local what=$1
    shift
    if "$@" > "$TMP/last.log" 2>&1; then pass "$what"; else fail "$what"; sed 's/^/     /' "$TMP/last.log" | tail -5; fi
}
refuses() {  # refuses DESCRIPTION EXPECTED-TEXT COMMAND...: the command must fail, saying EXPECTED-TEXT
    local what=$1 expected=$2
    shift 2
    local out
    if out=$("$@" 2>&1); then fail "$what (exit 0)"; return; fi
    if grep -qF -- "$expected" <<< "$out"; then pass "$what: $(grep -F -- "$expected" <<< "$out" | head -1 | cut -c1-110)"
    else fail "$what (no '$expected' in: $(tail -1 <<< "$out"))"; fi
}
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
for mode in "--routing topk --k 2" "--routing topp --p 0.6" "--routing dtopp --controller layer" "--routing dtopp --drn 0 --renorm 0"; do
    # shellcheck disable=SC2086
    check "train 3 steps: $mode" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --steps 3 --out "$TMP/mode" $mode
done

# sampling from a checkpoint, with a prompt, for bytes and for GPT-2 tokens
check "generate 64 bytes after a prompt" "$TRAIN" --init "$TMP/learn/model.bin" --generate 64 --prompt "The " --seed 1
check "train GPT-2 tokens, 3 steps, with samples" "$TRAIN" --train "$TMP/gpt2_train.bin" --val "$TMP/gpt2_val.bin" \
    --model tiny --batch 2 --seq-len 32 --eval-batches 1 --steps 3 --sample-tokens 8 --sample-every 2 --out "$TMP/gpt2"
check "generate 16 GPT-2 tokens after a prompt" "$TRAIN" --init "$TMP/gpt2/model.bin" --generate 16 --prompt "Once upon a time" --temperature 0.8
check "generate 256 tokens" "$TRAIN" --init "$TMP/learn/model.bin" --generate 256 --prompt "The"
echo "     ($(tail -1 "$TMP/last.log"), tiny byte model)"
check "greedy sampling is deterministic" bash -c "cmp <('$TRAIN' --init '$TMP/learn/model.bin' --generate 32 --temperature 0 2>/dev/null) \
    <('$TRAIN' --init '$TMP/learn/model.bin' --generate 32 --temperature 0 --seed 7 2>/dev/null)"

# resume: 12 steps straight equal 6 steps + resume + 6 steps, bit for bit
RUN=("${BYTES[@]}" "${TINY[@]}" --steps 12 --eval-every 0 --checkpoint-every 6 --routing dtopp --controller layer --lr 1e-2)
"$TRAIN" "${RUN[@]}" --out "$TMP/straight" > /dev/null 2>&1
"$TRAIN" "${RUN[@]}" --out "$TMP/split" --stop-at 6 > /dev/null 2>&1
check "stopped at step 6 with a checkpoint" test -s "$TMP/split/state_00000006.bin"
"$TRAIN" "${RUN[@]}" --out "$TMP/split" --resume "$TMP/split" > /dev/null 2>&1
check "resumed run reaches step 12" test -s "$TMP/split/model_00000012.bin"
check "resume: identical losses and p at every step" cmp <(cut -d, -f1-3,7-8 "$TMP/straight/log.csv") <(cut -d, -f1-3,7-8 "$TMP/split/log.csv")
check "resume: identical parameters and controller state" cmp "$TMP/straight/model.bin" "$TMP/split/model.bin"
check "resume: identical optimizer state" cmp "$TMP/straight/state_00000012.bin" "$TMP/split/state_00000012.bin"
check "older checkpoint removed once the newer is complete" test ! -e "$TMP/straight/model_00000006.bin"

# bad input: a clear message and a non-zero exit
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
refuses "p outside (0, 1]" "p must be in (0, 1]" "$TRAIN" "${BYTES[@]}" "${TINY[@]}" --routing topp --p 1.5 --out "$TMP/bad"
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

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
