#!/usr/bin/env bash
# bench_prepro.sh: speed of our GPT-2 encoder against js-tiktoken, on the same text in the same run.
#
#   bench/bench_prepro.sh            (run from the repository root, after building)
#
# Text: DATA_DIR/kjv.txt when DATA_DIR is set, else the project's generated text.
# Both sides encode the whole text 3 times and keep the best time; then prepro itself is timed
# end to end (reading, encoding, writing the shards).
# Environment: ENCODER (default test/tiktoken_compare), PREPRO (default ./prepro),
# TOKENIZER (default tokenizer.bin), JS_TIKTOKEN_DIR (as in test/tiktoken_compare.sh).
set -euo pipefail

ENCODER=${ENCODER:-test/tiktoken_compare}
PREPRO=${PREPRO:-./prepro}
TOKENIZER=${TOKENIZER:-tokenizer.bin}
JS_DIR=${JS_TIKTOKEN_DIR:-${TMPDIR:-/tmp}/dtopp_js_tiktoken}
JS_VERSION=1.0.21

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [ -n "${DATA_DIR:-}" ]; then
    TEXT=$DATA_DIR/kjv.txt
else
    GET_DATA_OFFLINE=1 scripts/get_data.sh "$TMP" > /dev/null
    TEXT=$TMP/input.txt
fi
echo "text: $TEXT ($(wc -c < "$TEXT") bytes)"

read -r _ ntok _ c_s _ c_rate <<< "$("$ENCODER" "$TOKENIZER" "$TEXT" --bench)"
echo "ours (C, tokenizer.h):  $ntok tokens in $c_s s: $c_rate tokens/s"

if [ ! -f "$JS_DIR/node_modules/js-tiktoken/package.json" ]; then
    timeout 180 npm install --prefix "$JS_DIR" --no-audit --no-fund --loglevel=error --fetch-retries=1 \
        --fetch-timeout=30000 "js-tiktoken@$JS_VERSION" > /dev/null 2>&1 || true
fi
if [ -f "$JS_DIR/node_modules/js-tiktoken/package.json" ]; then
    read -r _ jtok _ js_s _ js_rate <<< "$(node test/tiktoken_compare.mjs "$JS_DIR" "$TEXT" --bench)"
    echo "js-tiktoken $JS_VERSION (node $(node --version)): $jtok tokens in $js_s s: $js_rate tokens/s"
    awk -v a="$c_rate" -v b="$js_rate" 'BEGIN { printf "ratio: ours is %.1fx the speed of js-tiktoken\n", a / b }'
else
    echo "skip: js-tiktoken could not be installed (no network?), no comparison"
fi

start=$(date +%s.%N)
"$PREPRO" --tokenizer "$TOKENIZER" -o "$TMP/bench" "$TEXT" > /dev/null
end=$(date +%s.%N)
awk -v s="$start" -v e="$end" -v n="$ntok" 'BEGIN { printf "prepro end to end: %.3f s, %.0f tokens/s\n", e - s, n / (e - s) }'
