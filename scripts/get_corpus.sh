#!/usr/bin/env bash
# get_corpus.sh OUTDIR [TEXT ...]: the corpus of `make repro` at OUTDIR/input.txt, and where it came
# from in OUTDIR/input.source.
#
#   - TEXTs given (local files): their concatenation, in the order given; prepro's validation split
#     is the end of the corpus, so put the text you want to validate on last;
#   - none: what scripts/get_data.sh gives (TinyShakespeare, downloaded and checked, or the
#     project's offline text when there is no network).
#
# input.txt is only replaced when its content changes, so that make does not prepare the shards
# again for the same corpus.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR [TEXT ...]" >&2
    exit 1
fi
OUTDIR=$1
shift
mkdir -p "$OUTDIR" || { echo "get_corpus: cannot create $OUTDIR" >&2; exit 1; }
if [ $# -eq 0 ]; then
    "$ROOT/scripts/get_data.sh" "$OUTDIR"
    exit 0
fi
TMP=$(mktemp "$OUTDIR/.corpus.XXXXXX")
trap 'rm -f "$TMP"' EXIT
for text in "$@"; do
    if [ ! -f "$text" ] || [ ! -r "$text" ]; then echo "get_corpus: $text: no such readable file" >&2; exit 1; fi
    if [ ! -s "$text" ]; then echo "get_corpus: $text is empty" >&2; exit 1; fi
    cat "$text" >> "$TMP"
done
source="a concatenation of $*"
if ! cmp -s "$TMP" "$OUTDIR/input.txt" 2> /dev/null; then mv "$TMP" "$OUTDIR/input.txt"; fi
echo "$source" > "$OUTDIR/input.source"
echo "get_corpus: $OUTDIR/input.txt: $source ($(wc -c < "$OUTDIR/input.txt") bytes)"
