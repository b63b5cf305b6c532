#!/usr/bin/env bash
# test_prepro.sh: prepro and scripts/get_data.sh end to end, on text made on the spot.
#
#   test/test_prepro.sh            (run from the repository root, after building)
#
# Environment: PREPRO (default ./prepro), TOKENIZER (default tokenizer.bin),
# MAKE_OFFLINE_TEXT (default tools/make_offline_text).
# Prints one line per check and ends with "N passed, M failed"; exits 1 if any check failed.
set -uo pipefail

PREPRO=${PREPRO:-./prepro}
TOKENIZER=${TOKENIZER:-tokenizer.bin}
export MAKE_OFFLINE_TEXT=${MAKE_OFFLINE_TEXT:-tools/make_offline_text}
passed=0
failed=0
check() {  # check DESCRIPTION COMMAND...: passes if the command succeeds
    local what=$1
    shift
    if "$@" > /dev/null 2>&1; then echo "ok   $what"; passed=$((passed + 1)); else echo "FAIL $what"; failed=$((failed + 1)); fi
}
# header word i of a file, as a signed 32-bit integer
word() { od -An -t d4 -j $((4 * $2)) -N 4 "$1" | tr -d ' '; }
# is the file a valid shard with n tokens of vocabulary v?
shard_ok() {  # shard_ok FILE TOKENS VOCAB KIND (1: GPT-2, 2: bytes)
    local f=$1 n=$2 v=$3 k=$4
    [ "$(word "$f" 0)" = 20240520 ] && [ "$(word "$f" 1)" = 2 ] && [ "$(word "$f" 2)" = "$n" ] &&
        [ "$(word "$f" 3)" = "$v" ] && [ "$(word "$f" 4)" = "$k" ] && [ "$(wc -c < "$f")" = $((1024 + 2 * n)) ]
}
# does the command fail with a message containing the text?
refuses() {
    local expect=$1
    shift
    local msg
    msg=$("$@" 2>&1 > /dev/null) && return 1
    echo "$msg" | grep -qF -- "$expect"
}
tokens_of() { od -An -t u2 -v -j 1024 "$1" | tr -s ' ' '\n' | grep -v '^$'; }

for f in "$PREPRO" "$TOKENIZER" "$MAKE_OFFLINE_TEXT"; do
    if [ ! -e "$f" ]; then echo "test_prepro: $f is missing (build it first)" >&2; exit 1; fi
done
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

# get_data.sh
check "get_data.sh without network makes the generated text" env GET_DATA_OFFLINE=1 scripts/get_data.sh "$T/a"
check "get_data.sh says it used the generated text" \
    sh -c "GET_DATA_OFFLINE=1 scripts/get_data.sh '$T/b' | grep -q 'generated text'"
size=$(wc -c < "$T/a/input.txt")
check "the generated text is 0.5 to 1 MB ($size bytes)" test "$size" -ge 500000 -a "$size" -le 1000000
check "the generated text is the same every time" cmp "$T/a/input.txt" "$T/b/input.txt"
printf 'hello\n' > "$T/local.txt"
check "get_data.sh OUTDIR TEXT copies TEXT" sh -c "scripts/get_data.sh '$T/c' '$T/local.txt' && cmp '$T/c/input.txt' '$T/local.txt'"
check "get_data.sh refuses a missing TEXT" refuses "no such readable file" scripts/get_data.sh "$T/d" "$T/missing.txt"

# prepro, GPT-2 vocabulary
IN=$T/a/input.txt
"$PREPRO" --tokenizer "$TOKENIZER" "$IN" > "$T/log" 2>&1
check "prepro writes input_train.bin and input_val.bin next to input.txt" test -f "$T/a/input_train.bin" -a -f "$T/a/input_val.bin"
ntrain=$(word "$T/a/input_train.bin" 2)
nval=$(word "$T/a/input_val.bin" 2)
total=$((ntrain + nval))
check "train shard header and size are valid ($ntrain tokens)" shard_ok "$T/a/input_train.bin" "$ntrain" 50257 1
check "val shard header and size are valid ($nval tokens)" shard_ok "$T/a/input_val.bin" "$nval" 50257 1
diff=$((nval * 10 - total))
check "val is the last 10% of the tokens" test "${diff#-}" -le 10
check "prepro prints the token count and throughput" sh -c "grep -q '$total tokens' '$T/log' && grep -q 'tokens/s' '$T/log'"
if [ -x "${ENCODER:-test/tiktoken_compare}" ]; then
    "${ENCODER:-test/tiktoken_compare}" "$TOKENIZER" "$IN" > "$T/ids"
    check "train + val tokens are the text's encoding, in order" \
        sh -c "{ od -An -t u2 -v -j 1024 '$T/a/input_train.bin'; od -An -t u2 -v -j 1024 '$T/a/input_val.bin'; } | tr -s ' ' '\n' | grep -v '^\$' | cmp - '$T/ids'"
fi

# bytes vocabulary, output prefix, no validation
"$PREPRO" --vocab bytes --val 0 -o "$T/bytes" "$IN" > /dev/null 2>&1
check "--vocab bytes: one token per byte, vocabulary 256 and kind bytes in header words 3, 4" \
    shard_ok "$T/bytes_train.bin" "$size" 256 2
check "--val 0 writes no validation shard" test ! -e "$T/bytes_val.bin"
check "--vocab bytes: the tokens are the bytes" cmp <(od -An -t u1 -v "$IN" | tr -s ' ' '\n' | grep -v '^$') <(tokens_of "$T/bytes_train.bin")

# documents
printf 'first document\n' > "$T/d1.txt"
printf 'second document\n' > "$T/d2.txt"
"$PREPRO" --tokenizer "$TOKENIZER" --eot --val 0 -o "$T/docs" "$T/d1.txt" "$T/d2.txt" > /dev/null 2>&1
got=$(tokens_of "$T/docs_train.bin" | tr '\n' ' ')
check "--eot puts end-of-text before each file" test "$got" = "50256 11085 3188 198 50256 12227 3188 198 "
printf 'one\n---\ntwo\n---\r\n---\nthree' > "$T/split.txt"
"$PREPRO" --tokenizer "$TOKENIZER" --eot --split --- --val 0 -o "$T/split" "$T/split.txt" > "$T/log" 2>&1
got=$(tokens_of "$T/split_train.bin" | tr '\n' ' ')
check "--split cuts at separator lines (3 documents)" grep -q '3 documents' "$T/log"
check "--split drops the separator lines and empty documents" test "$got" = "50256 505 198 50256 11545 198 50256 15542 "

# a vocabulary trained on the text
"$PREPRO" --vocab bpe --bpe-tokens 500 -o "$T/bpe" "$IN" > "$T/log" 2>&1
trained=$(sed -n 's/.* \([0-9]*\) tokens after training.*/\1/p' "$T/log")
ntrain_bpe=$(word "$T/bpe_train.bin" 2 2> /dev/null)
nval_bpe=$(word "$T/bpe_val.bin" 2 2> /dev/null)
nbpe=$((${ntrain_bpe:-0} + ${nval_bpe:-0}))
check "--vocab bpe writes PREFIX_tokenizer.bin: version 2, 500 tokens, end-of-text 499, kind bpe (3)" \
    sh -c "test $(word "$T/bpe_tokenizer.bin" 0) = 20251216 -a $(word "$T/bpe_tokenizer.bin" 1) = 2 -a \
           $(word "$T/bpe_tokenizer.bin" 2) = 500 -a $(word "$T/bpe_tokenizer.bin" 3) = 499 -a $(word "$T/bpe_tokenizer.bin" 6) = 3"
check "--vocab bpe: shards of vocabulary 500 and kind bpe" shard_ok "$T/bpe_val.bin" "$(word "$T/bpe_val.bin" 2)" 500 3
check "--vocab bpe: the shards hold as many tokens as training ended with ($nbpe)" test "$nbpe" = "${trained:-none}"
check "--vocab bpe: fewer tokens than GPT-2's 50,257-token vocabulary would need twice over" test "$nbpe" -lt $((2 * total))
"$PREPRO" --vocab bpe --bpe-tokens 500 -o "$T/bpe2" "$IN" > /dev/null 2>&1
check "--vocab bpe: the same text gives the same vocabulary and tokens" \
    sh -c "cmp '$T/bpe_tokenizer.bin' '$T/bpe2_tokenizer.bin' && cmp '$T/bpe_train.bin' '$T/bpe2_train.bin'"
check "refuses a GPT-2 tokenizer file for --vocab bpe's kind" refuses "is a bpe vocabulary, but --vocab is gpt2" \
    "$PREPRO" --tokenizer "$T/bpe_tokenizer.bin" -o "$T/mixed" "$IN"
check "refuses --bpe-tokens out of range" refuses "--bpe-tokens must be in [257, 65536]" "$PREPRO" --vocab bpe --bpe-tokens 100 "$IN"

# several shards
"$PREPRO" --tokenizer "$TOKENIZER" --shard-tokens 50000 -o "$T/many" "$IN" > /dev/null 2>&1
n=0
for f in "$T"/many_train_*.bin; do n=$((n + $(word "$f" 2))); done
check "--shard-tokens: the training split in numbered shards of at most 50000 tokens" \
    sh -c "test -f '$T/many_train_000.bin' && test ! -e '$T/many_train.bin' && test $n = $ntrain && test $(word "$T/many_train_000.bin" 2) = 50000"
check "--shard-tokens: a small validation split stays one shard" test -f "$T/many_val.bin"

# errors
: > "$T/empty.txt"
check "refuses a missing input, naming it" refuses "$T/nothing.txt" "$PREPRO" --tokenizer "$TOKENIZER" "$T/nothing.txt"
check "refuses an empty input, naming it" refuses "$T/empty.txt is empty" "$PREPRO" --tokenizer "$TOKENIZER" "$T/empty.txt"
check "refuses an unwritable output, naming it" refuses "$T/no/such/dir_train.bin" "$PREPRO" --tokenizer "$TOKENIZER" -o "$T/no/such/dir" "$IN"
check "refuses a missing tokenizer, naming it" refuses "$T/none.bin" "$PREPRO" --tokenizer "$T/none.bin" "$IN"
check "refuses --eot with the byte vocabulary" refuses "--eot needs --vocab gpt2" "$PREPRO" --vocab bytes --eot "$IN"
check "refuses a bad --val" refuses "--val must be" "$PREPRO" --val 1.5 "$IN"
check "refuses an unknown --vocab" refuses "--vocab must be gpt2, bytes or bpe" "$PREPRO" --vocab words "$IN"

# one run, one set: the shards of an earlier run with the same prefix are never mixed in, and a
# run that fails leaves the earlier set as it was
"$PREPRO" --vocab bytes --shard-tokens 100000 -o "$T/set" "$IN" > /dev/null 2>&1
"$PREPRO" --vocab bytes -o "$T/set" "$IN" > /dev/null 2>&1
check "a second run with the same prefix leaves only its own shards (no numbered shards of the first)" \
    test "$(cd "$T" && echo set_*)" = "set_train.bin set_val.bin"
touch "$T/set_train_extra.bin"
check "refuses a file that the prefix's pattern would take but prepro does not write" \
    refuses "set_train_extra.bin matches $T/set_train*.bin" "$PREPRO" --vocab bytes -o "$T/set" "$IN"
rm "$T/set_train_extra.bin"
"$PREPRO" --vocab bpe --bpe-tokens 300 -o "$T/keep" "$IN" > /dev/null 2>&1
md5sum "$T"/keep_* > "$T/keep.md5"
(trap '' XFSZ; ulimit -f 300; "$PREPRO" --vocab bpe --bpe-tokens 400 -o "$T/keep" "$IN" > "$T/full.log" 2>&1)
check "a run stopped by a full disk says so" grep -q "cannot write $T/keep_train.bin.tmp" "$T/full.log"
check "... and leaves the earlier set whole: its tokenizer and shards, not a new tokenizer beside old shards" \
    md5sum -c --quiet "$T/keep.md5"
check "... and no temporary file" test -z "$(find "$T" -name 'keep_*.tmp')"
printf 'abc' > "$T/three.txt"
check "refuses a split without tokens (--val 0.9 of 3 tokens)" \
    refuses "a split needs 2 tokens or more" "$PREPRO" --vocab bytes --val 0.9 -o "$T/three" "$T/three.txt"
check "... and writes nothing" test -z "$(find "$T" -name 'three_*')"
{ head -c 3000 "$IN"; printf '%0300d\n' 0 | tr 0 -; printf '%0300d\n' 0 | tr 0 -; printf '%0600d\n' 0 | tr 0 =; } > "$T/rules.txt"
check "--vocab bpe on lines of 300 and 600 punctuation marks: merges over 255 bytes are not made" \
    "$PREPRO" --vocab bpe --bpe-tokens 2000 -o "$T/rules" "$T/rules.txt"
# a FIFO would make prepro wait forever for a writer (timeout: a hang fails the check instead)
mkfifo "$T/fifo.txt"
check "refuses a FIFO as input, naming it" refuses "$T/fifo.txt is not a regular file" timeout 60 "$PREPRO" --vocab bytes -o "$T/fifo" "$T/fifo.txt"
check "refuses a FIFO as tokenizer, naming it" refuses "$T/fifo.txt is not a regular file" timeout 60 "$PREPRO" --tokenizer "$T/fifo.txt" -o "$T/fifo" "$IN"
mkfifo "$T/out_train.bin"
check "refuses a FIFO where an output goes, naming it" refuses "$T/out_train.bin is not a regular file" timeout 60 "$PREPRO" --vocab bytes -o "$T/out" "$IN"

echo "$passed passed, $failed failed"
[ $failed = 0 ]
