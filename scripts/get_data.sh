#!/usr/bin/env bash
# get_data.sh OUTDIR [TEXT]: puts a training text at OUTDIR/input.txt and says where it came from,
# on the terminal and in OUTDIR/input.source (so that `make train` knows what input.txt is).
#
#   - TEXT given (a local file): a copy of it;
#   - else TinyShakespeare, downloaded from its canonical address if the network allows
#     (short timeouts) and checked against its known sha256;
#   - else the project's own generated text (tools/make_offline_text), with a message saying so.
#
# GET_DATA_OFFLINE=1 skips the download. MAKE_OFFLINE_TEXT names the generator binary
# (default tools/make_offline_text; built here with $CC if it is missing).
set -euo pipefail

URL=https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
SHA256=86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 OUTDIR [TEXT]" >&2
    exit 1
fi
OUTDIR=$1
OUT=$OUTDIR/input.txt
mkdir -p "$OUTDIR" || { echo "get_data: cannot create $OUTDIR" >&2; exit 1; }
rm -f "$OUTDIR/input.source"

if [ $# -eq 2 ]; then
    TEXT=$2
    if [ ! -f "$TEXT" ] || [ ! -r "$TEXT" ]; then echo "get_data: $TEXT: no such readable file" >&2; exit 1; fi
    if [ ! -s "$TEXT" ]; then echo "get_data: $TEXT is empty" >&2; exit 1; fi
    cp "$TEXT" "$OUT"
    echo "a copy of $TEXT" > "$OUTDIR/input.source"
    echo "get_data: $OUT: a copy of $TEXT ($(wc -c < "$OUT") bytes)"
    exit 0
fi

# the download goes to a temporary file, so a failed or wrong download leaves no input.txt behind
TMP=$(mktemp "$OUTDIR/.download.XXXXXX")
trap 'rm -f "$TMP"' EXIT
downloaded=0
if [ "${GET_DATA_OFFLINE:-0}" != 1 ]; then
    if command -v curl > /dev/null; then
        curl -fsSL --connect-timeout 5 --max-time 60 -o "$TMP" "$URL" 2> /dev/null && downloaded=1
    elif command -v wget > /dev/null; then
        wget -q -T 10 -t 1 -O "$TMP" "$URL" 2> /dev/null && downloaded=1
    fi
    if [ $downloaded = 1 ]; then
        if [ "$(sha256sum "$TMP" | cut -d' ' -f1)" = "$SHA256" ]; then
            mv "$TMP" "$OUT"
            echo "TinyShakespeare" > "$OUTDIR/input.source"
            echo "get_data: $OUT: TinyShakespeare, downloaded from $URL (sha256 checked)"
            exit 0
        fi
        echo "get_data: the download from $URL has the wrong sha256, not using it" >&2
    fi
fi

GEN=${MAKE_OFFLINE_TEXT:-$ROOT/tools/make_offline_text}
if [ ! -x "$GEN" ]; then
    GEN=$(mktemp)
    trap 'rm -f "$TMP" "$GEN"' EXIT
    "${CC:-cc}" -O2 -std=c11 -o "$GEN" "$ROOT/tools/make_offline_text.c"
fi
"$GEN" > "$OUT"
echo "the project's own generated text" > "$OUTDIR/input.source"
if [ "${GET_DATA_OFFLINE:-0}" = 1 ]; then why="GET_DATA_OFFLINE=1"; else why="TinyShakespeare could not be downloaded"; fi
echo "get_data: $why: $OUT is the project's own generated text instead (tools/make_offline_text, $(wc -c < "$OUT") bytes), not TinyShakespeare"
