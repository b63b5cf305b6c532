#!/usr/bin/env bash
# test_resume.sh: going on with a run as a user would, on a tiny model: --resume DIR alone takes the
# settings the run saved (options.txt) and refuses only real conflicts; --extend trains a finished run
# further at the schedule's final learning rate; Ctrl-C (SIGINT) or SIGTERM ends with a checkpoint of
# the step in progress, the same as --stop-at that step; and the tokenizer a model was trained with is
# found by the vocabulary hash that models and shards record, while another text's is refused.
#
#   test/test_resume.sh            (run from the repository root, after `make`)
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
column() {  # column FILE NAME: the values of a column of log.csv, one per line
    awk -F, -v name="$2" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == name) c = i; next } { print $c }' "$1"
}
set_zero() {  # set_zero FILE WORD: overwrites 4-byte word WORD of FILE with 0
    dd if=/dev/zero of="$1" bs=4 seek="$2" count=1 conv=notrunc status=none
}

"$MAKE_OFFLINE_TEXT" > "$TMP/text.txt"
"$PREPRO" --vocab bytes -o "$TMP/bytes" "$TMP/text.txt" > /dev/null || { echo "prepro failed"; exit 1; }
TINY=(--model tiny --batch 4 --seq-len 32 --eval-batches 2 --sample-tokens 0 --threads 2)
RUN=(--train "$TMP/bytes_train.bin" --val "$TMP/bytes_val.bin" "${TINY[@]}" --steps 12 --eval-every 0
     --checkpoint-every 6 --lr 1e-2 --warmup 3)

# --resume DIR alone: the run's own settings, and the same result as a run without a stop
"$TRAIN" "${RUN[@]}" --out "$TMP/straight" > /dev/null 2>&1
"$TRAIN" "${RUN[@]}" --out "$TMP/split" --stop-at 6 > /dev/null 2>&1
cp -r "$TMP/split" "$TMP/split_copy"
check "the run saves its settings" grep -qx -- "--lr 0.01" "$TMP/split/options.txt"
check "--resume DIR with no other option continues the run" "$TRAIN" --resume "$TMP/split"
check "... to the same parameters and controller state" cmp "$TMP/straight/model.bin" "$TMP/split/model.bin"
check "... and the same optimizer state" cmp "$TMP/straight/state_00000012.bin" "$TMP/split/state_00000012.bin"
check "... into DIR itself (--out defaults to it)" test -s "$TMP/split/model_00000012.bin"
cp -r "$TMP/split_copy" "$TMP/free"
check "options that do not change the run may differ (--eval-every, --threads)" \
    "$TRAIN" --resume "$TMP/free" --eval-every 3 --threads 1
check "... with the same result" cmp "$TMP/straight/model.bin" "$TMP/free/model.bin"
refuses "a conflicting --lr" "this command's --lr differs" "$TRAIN" --resume "$TMP/split_copy" --lr 3e-3
refuses "a conflicting --batch" "cannot restore the data position" "$TRAIN" --resume "$TMP/split_copy" --batch 8
printf -- '--lr 0.01\n--stepz 3\n' > "$TMP/bad_options.txt"
cp -r "$TMP/split_copy" "$TMP/bad_settings" && cp "$TMP/bad_options.txt" "$TMP/bad_settings/options.txt"
refuses "a damaged options.txt, named" "bad_settings/options.txt, line 2: --stepz is not a saved option" \
    "$TRAIN" --resume "$TMP/bad_settings"
cp -r "$TMP/split_copy" "$TMP/old" && rm "$TMP/old/options.txt"
"$TRAIN" "${RUN[@]}" --resume "$TMP/old" > "$TMP/old_run.log" 2>&1
check "a run without options.txt (an older version) resumes with the command line's settings" \
    cmp "$TMP/straight/model.bin" "$TMP/old/model.bin"
check "... and says so" grep -q "has no options.txt (a run of an older version)" "$TMP/old_run.log"

# a finished run: refused with the way to extend it; --extend N goes on at a tenth of --lr
refuses "resuming a finished run" "is finished (step 12 of --steps 12): train it further with --resume" \
    "$TRAIN" --resume "$TMP/straight"
cp -r "$TMP/straight" "$TMP/extended"
check "--extend 4 trains a finished run 4 steps further" "$TRAIN" --resume "$TMP/extended" --extend 4
check "... to step 16" test -s "$TMP/extended/model_00000016.bin"
check "... and its first 12 steps are the run's" cmp <(head -13 "$TMP/straight/log.csv" | cut -d, -f1-8) \
    <(head -13 "$TMP/extended/log.csv" | cut -d, -f1-8)
lrs=$(column "$TMP/extended/log.csv" lr | tail -4 | sort -u)
if [[ $(wc -l <<< "$lrs") == 1 ]] && awk -v x="$lrs" 'BEGIN { exit !(x > 0.00099999 && x < 0.00100001) }'; then
    pass "the added steps run at a tenth of --lr: $lrs"
else fail "the added steps run at a tenth of --lr: $(echo $lrs)"; fi
cp -r "$TMP/straight" "$TMP/extended2"
"$TRAIN" --resume "$TMP/extended2" --extend 4 --stop-at 14 > /dev/null 2>&1
check "an extension stopped halfway and resumed" "$TRAIN" --resume "$TMP/extended2"
check "... equals the extension in one go" cmp "$TMP/extended/model.bin" "$TMP/extended2/model.bin"
refuses "--extend without --resume" "--extend needs --resume" "$TRAIN" "${RUN[@]}" --extend 4 --out "$TMP/bad"

# make train RESUME=1 continues the run in OUT
MAKE_TRAIN=("${MAKE:-make}" --no-print-directory train DATA="$TMP/data" OUT="$TMP/make")
GET_DATA_OFFLINE=1 "${MAKE_TRAIN[@]}" TEXT="$TMP/text.txt" \
    TRAIN_FLAGS="${TINY[*]} --steps 6 --eval-every 0 --checkpoint-every 0 --stop-at 3" > "$TMP/make1.log" 2>&1
check "make train ... --stop-at 3 stops with a checkpoint" test -s "$TMP/make/state_00000003.bin"
check "make train RESUME=1 continues it" "${MAKE_TRAIN[@]}" RESUME=1
check "... to its last step" test -s "$TMP/make/state_00000006.bin"

# Ctrl-C and SIGTERM: the step in progress ends with a checkpoint, equal to --stop-at that step
for sig in INT TERM; do
    "$TRAIN" "${RUN[@]}" --steps 100000 --checkpoint-every 0 --out "$TMP/$sig" > "$TMP/$sig.log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do  # until it has taken a few steps (at most a minute)
        [[ -e $TMP/$sig/log.csv && $(wc -l < "$TMP/$sig/log.csv") -gt 4 ]] && break
        sleep 0.1
    done
    kill -s $sig $pid
    wait $pid
    status=$?
    want=$((128 + $(kill -l $sig)))
    if [[ $status == "$want" ]]; then pass "SIG$sig: exit status $status"; else fail "SIG$sig: exit status $status, not $want"; fi
    n=$(tail -1 "$TMP/$sig/log.csv" | cut -d, -f1)
    name=$(printf '%08d' "$n")
    check "SIG$sig: says where the checkpoint of step $n is" \
        grep -qF "interrupted at step $n of 100000: the checkpoint is $TMP/$sig/model_$name.bin" "$TMP/$sig.log"
    "$TRAIN" "${RUN[@]}" --steps 100000 --checkpoint-every 0 --out "$TMP/stop$sig" --stop-at "$n" > /dev/null 2>&1
    check "SIG$sig: the checkpoint is the state after step $n, as with --stop-at $n" \
        cmp "$TMP/$sig/state_$name.bin" "$TMP/stop$sig/state_$name.bin"
    check "SIG$sig: ... and so is the model" cmp "$TMP/$sig/model_$name.bin" "$TMP/stop$sig/model_$name.bin"
    check "SIG$sig: the interrupted run continues from it" "$TRAIN" --resume "$TMP/$sig" --stop-at $((n + 2))
done

# the tokenizer: a trained vocabulary's goes into the run's folder; sampling finds it there by the
# hash the model records; another text's vocabulary of the same size is refused, from the tokenizer
# and from the shards; files from before the hash still load, with a note
"$PREPRO" --vocab bpe --bpe-tokens 400 -o "$TMP/bpe" "$TMP/text.txt" > /dev/null || { echo "prepro failed"; exit 1; }
tr 'a-z' 'A-Z' < "$TMP/text.txt" > "$TMP/upper.txt"
"$PREPRO" --vocab bpe --bpe-tokens 400 -o "$TMP/upper" "$TMP/upper.txt" > /dev/null || { echo "prepro failed"; exit 1; }
BPE=(--train "$TMP/bpe_train.bin" --val "$TMP/bpe_val.bin" "${TINY[@]}" --steps 3)
check "train on a trained vocabulary with samples, no --tokenizer: it is found next to the shards" \
    "$TRAIN" "${BPE[@]}" --sample-tokens 8 --out "$TMP/bpe_run"
check "... and copied into the run's folder" cmp "$TMP/bpe_tokenizer.bin" "$TMP/bpe_run/tokenizer.bin"
check "sampling the model finds its tokenizer, no --tokenizer" "$TRAIN" --init "$TMP/bpe_run/model.bin" --generate 8 --prompt "The "
mkdir -p "$TMP/alone" && cp "$TMP/bpe_run/model.bin" "$TMP/alone/"
refuses "a model without its tokenizer: the error names where it looked" \
    "no tokenizer file holding it was found ($TMP/alone/tokenizer.bin" "$TRAIN" --init "$TMP/alone/model.bin" --generate 8
check "... and --tokenizer still overrides" "$TRAIN" --init "$TMP/alone/model.bin" --generate 8 --tokenizer "$TMP/bpe_tokenizer.bin"
refuses "another text's tokenizer of the same size" "holds another vocabulary of 400 tokens than the model's" \
    "$TRAIN" --init "$TMP/bpe_run/model.bin" --generate 8 --tokenizer "$TMP/upper_tokenizer.bin"
refuses "GPT-2's tokenizer for a trained vocabulary" "holds a gpt2 vocabulary but the model's is bpe" \
    "$TRAIN" --init "$TMP/bpe_run/model.bin" --generate 8 --tokenizer tokenizer.bin
refuses "another text's shards for the model" "was made with another vocabulary of 400 tokens than the model's" \
    "$TRAIN" --init "$TMP/bpe_run/model.bin" --train "$TMP/upper_train.bin" --val "" "${TINY[@]}" --steps 2 --out "$TMP/bad"
refuses "training and validation shards of two vocabularies" "was made with another vocabulary" \
    "$TRAIN" --train "$TMP/bpe_train.bin" --val "$TMP/upper_val.bin" "${TINY[@]}" --steps 2 --out "$TMP/bad"
cp "$TMP/bpe_run/model.bin" "$TMP/alone/old.bin"
set_zero "$TMP/alone/old.bin" 16 && set_zero "$TMP/alone/old.bin" 17
"$TRAIN" --init "$TMP/alone/old.bin" --generate 8 --tokenizer "$TMP/bpe_tokenizer.bin" > /dev/null 2> "$TMP/old.log"
check "a model from before the hash still samples, with a note" grep -q "records no vocabulary hash" "$TMP/old.log"
cp "$TMP/bpe_train.bin" "$TMP/old_train.bin"
set_zero "$TMP/old_train.bin" 5 && set_zero "$TMP/old_train.bin" 6
check "a shard from before the hash still trains the model, with a note" bash -c "'$TRAIN' --init '$TMP/bpe_run/model.bin' \
    --train '$TMP/old_train.bin' --val '' ${TINY[*]} --steps 2 --out '$TMP/old_run' | grep -q 'records no vocabulary hash'"
cp "$TMP/bpe_tokenizer.bin" "$TMP/damaged_tokenizer.bin"
printf 'Z' | dd of="$TMP/damaged_tokenizer.bin" bs=1 seek=$(($(stat -c %s "$TMP/damaged_tokenizer.bin") - 20)) conv=notrunc status=none
refuses "a tokenizer whose tokens no longer match its header's hash" "do not match the vocabulary hash of its header" \
    "$TRAIN" --init "$TMP/bpe_run/model.bin" --generate 8 --tokenizer "$TMP/damaged_tokenizer.bin"

finish
