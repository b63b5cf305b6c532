#!/usr/bin/env bash
# tiktoken_compare.sh: our GPT-2 encoder against js-tiktoken's "gpt2" encoding, token for token.
#
#   test/tiktoken_compare.sh            (run from the repository root, after building)
#
# Texts: test/tiktoken_compare.txt (ours: many scripts, digits, emoji, contractions, whitespace)
# and, when DATA_DIR is set, DATA_DIR/tinyshakespeare.txt and DATA_DIR/kjv.txt.
# js-tiktoken is installed with npm into JS_TIKTOKEN_DIR (default $TMPDIR/dtopp_js_tiktoken);
# when npm or the registry is not reachable the comparison is skipped, with a message.
# Environment: ENCODER (default test/tiktoken_compare), TOKENIZER (default tokenizer.bin).
set -uo pipefail

ENCODER=${ENCODER:-test/tiktoken_compare}
TOKENIZER=${TOKENIZER:-tokenizer.bin}
JS_DIR=${JS_TIKTOKEN_DIR:-${TMPDIR:-/tmp}/dtopp_js_tiktoken}
JS_VERSION=1.0.21
passed=0
failed=0

for f in "$ENCODER" "$TOKENIZER"; do
    if [ ! -e "$f" ]; then echo "tiktoken_compare: $f is missing (build it first)" >&2; exit 1; fi
done

if ! command -v node > /dev/null; then  # even when an earlier run installed js-tiktoken
    echo "skipped: the comparison with js-tiktoken: node is not installed (Debian: apt-get install nodejs npm)"
    echo "0 passed, 0 failed"
    exit 0
fi
if [ ! -f "$JS_DIR/node_modules/js-tiktoken/package.json" ]; then
    if ! command -v npm > /dev/null; then
        echo "skipped: the comparison with js-tiktoken: npm is not installed (Debian: apt-get install npm)"
        echo "0 passed, 0 failed"
        exit 0
    fi
    echo "installing js-tiktoken@$JS_VERSION into $JS_DIR"
    if ! timeout 180 npm install --prefix "$JS_DIR" --no-audit --no-fund --loglevel=error \
            --fetch-retries=1 --fetch-timeout=30000 "js-tiktoken@$JS_VERSION" > /dev/null 2>&1; then
        echo "skipped: the comparison with js-tiktoken: cannot install it from the npm registry (no network?)"
        echo "0 passed, 0 failed"
        exit 0
    fi
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
texts=(test/tiktoken_compare.txt)
if [ -n "${DATA_DIR:-}" ]; then
    texts+=("$DATA_DIR/tinyshakespeare.txt" "$DATA_DIR/kjv.txt")
else
    echo "note: DATA_DIR is not set, comparing on test/tiktoken_compare.txt only"
fi
for text in "${texts[@]}"; do
    if "$ENCODER" "$TOKENIZER" "$text" > "$TMP/ids" && result=$(node test/tiktoken_compare.mjs "$JS_DIR" "$text" "$TMP/ids"); then
        echo "ok   $text: $result as js-tiktoken $JS_VERSION"
        passed=$((passed + 1))
    else
        echo "FAIL $text: ${result:-error}"
        failed=$((failed + 1))
    fi
    result=
done
echo "$passed passed, $failed failed"
[ $failed = 0 ]
