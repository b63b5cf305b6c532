#!/usr/bin/env bash
# test_explain.sh: train_dtopp --explain (dtopp/explain.h) and eval_dit explain (dit/explain_dit.h)
# end to end on tiny models: the terminal view, the page's file, refusal of bad input, and the page
# in a real browser (headless Chromium): its DOM holds the expected tokens, counts and controls, its
# numbers equal the routing dump of the same forward pass, and its screenshot is not blank.
#
#   test/test_explain.sh      (run from the repository root, after `make train_dtopp prepro dit/train_dit dit/eval_dit`)
#
# Without Chromium (Debian: apt-get install chromium; CHROMIUM=path for another) the browser checks
# are skipped with one line that says so; the DiT's page needs Fashion-MNIST in data/fashion-mnist
# (FASHION_MNIST=dir), and is skipped the same way without it. Prints one line per check and ends
# with "N passed, M failed"; exits 1 if any check failed.
set -uo pipefail

TRAIN=${TRAIN:-./train_dtopp}
PREPRO=${PREPRO:-./prepro}
TRAIN_DIT=${TRAIN_DIT:-./dit/train_dit}
EVAL_DIT=${EVAL_DIT:-./dit/eval_dit}
MAKE_OFFLINE_TEXT=${MAKE_OFFLINE_TEXT:-tools/make_offline_text}
FASHION_MNIST=${FASHION_MNIST:-data/fashion-mnist}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
PYTHON=${PYTHON:-python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# shellcheck source=test/checks.sh
source "$(dirname "$0")/checks.sh"
set_word() {  # set_word FILE WORD VALUE: overwrites 4-byte word WORD of FILE with the int32 VALUE
    local v=$(($3 & 0xffffffff))
    # shellcheck disable=SC2059
    printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((v & 255)) $((v >> 8 & 255)) $((v >> 16 & 255)) $((v >> 24 & 255)))" |
        dd of="$1" bs=4 seek="$2" conv=notrunc status=none
}

# tiny models: bytes with a context of 64 (so that a longer text goes in windows), and GPT-2 tokens
"$MAKE_OFFLINE_TEXT" > "$TMP/corpus.txt"
"$PREPRO" --vocab bytes -o "$TMP/bytes" "$TMP/corpus.txt" > /dev/null || { echo "prepro failed"; exit 1; }
"$PREPRO" --vocab gpt2 -o "$TMP/gpt2" "$TMP/corpus.txt" > /dev/null || { echo "prepro failed"; exit 1; }
TINY=(--model tiny --batch 4 --seq-len 32 --eval-batches 1 --eval-every 0 --sample-tokens 0 --threads 2)
check "train a tiny byte model (30 steps, context 64)" "$TRAIN" --train "$TMP/bytes_train.bin" --val "$TMP/bytes_val.bin" \
    "${TINY[@]}" --steps 30 --lr 1e-2 --max-seq-len 64 --out "$TMP/bytes_model"
check "train a tiny GPT-2 model (3 steps)" "$TRAIN" --train "$TMP/gpt2_train.bin" --val "$TMP/gpt2_val.bin" \
    "${TINY[@]}" --steps 3 --out "$TMP/gpt2_model"
"$PREPRO" --vocab bpe --bpe-tokens 300 -o "$TMP/bpe300" "$TMP/corpus.txt" > /dev/null || { echo "prepro failed"; exit 1; }
"$PREPRO" --vocab bpe --bpe-tokens 400 -o "$TMP/bpe400" "$TMP/corpus.txt" > /dev/null || { echo "prepro failed"; exit 1; }
check "train a tiny model of a trained 300-token vocabulary (1 step)" "$TRAIN" --train "$TMP/bpe300_train.bin" \
    --val "$TMP/bpe300_val.bin" "${TINY[@]}" --steps 1 --out "$TMP/bpe_model"
MODEL=$TMP/bytes_model/model.bin
printf 'The baker works at the bakery.\nTom is the fisherman; his net is in the harbour.\n' > "$TMP/short.txt"
head -c 300 "$TMP/corpus.txt" > "$TMP/long.txt"  # 299 routed positions: 5 windows of 64
EXPLAIN=("$TRAIN" --init "$MODEL" --threads 2 --explain)

# the terminal view
check "terminal view (ANSI colours)" "${EXPLAIN[@]}" "$TMP/short.txt"
cp "$TMP/last.log" "$TMP/ansi.txt"
sed $'s/\033\\[[0-9;]*m//g' "$TMP/ansi.txt" > "$TMP/plain.txt"
check "  it shades tokens with 256-colour backgrounds" grep -q $'\033\\[48;5;' "$TMP/ansi.txt"
check "  it has a legend and a per-layer table" grep -q "activated experts, mean over the 2 layers" "$TMP/plain.txt"
check "  it shows the text" grep -q "fisherman; his net" "$TMP/plain.txt"
check "terminal view of a long text" "${EXPLAIN[@]}" "$TMP/long.txt"
cp "$TMP/last.log" "$TMP/ansi_long.txt"
check "  it says the text went in 5 windows" grep -q "in 5 windows of at most 64" "$TMP/ansi_long.txt"

# the page, and the routing dump of the same forward pass
check "page of a short text, with --routing-dump" "${EXPLAIN[@]}" "$TMP/short.txt" --html "$TMP/short.html" \
    --routing-dump "$TMP/short.csv"
check "page of a long text (windows)" "${EXPLAIN[@]}" "$TMP/long.txt" --html "$TMP/long.html" --routing-dump "$TMP/long.csv"
check "  the page says so" grep -q "went through in <b>5 windows</b>" "$TMP/long.html"
check "page of GPT-2 tokens" "$TRAIN" --init "$TMP/gpt2_model/model.bin" --threads 2 --explain "$TMP/short.txt" \
    --html "$TMP/gpt2.html" --routing-dump "$TMP/gpt2.csv"
check "the page is self-contained: no external address, script or style sheet" \
    bash -c "! grep -Eiq 'https?://|<script[^>]+src=|<link|<img[^>]+src=|@import' '$TMP/short.html' '$TMP/long.html'"
check "the dump has a row per routed position (a byte each, but the last)" \
    test "$(($(wc -l < "$TMP/short.csv") - 1))" = "$(($(wc -c < "$TMP/short.txt") - 1))"

# bad input: each refused with a message that names the file
: > "$TMP/empty.txt"
printf 'A' > "$TMP/one.txt"
head -c 3000 "$MODEL" > "$TMP/truncated.bin"
head -c 4096 /dev/urandom > "$TMP/garbage.bin"
printf 'caf\xc3\xa9 au lait\n' > "$TMP/accent.txt"
refuses "a missing model" "$TMP/none.bin" "$TRAIN" --init "$TMP/none.bin" --explain "$TMP/short.txt"
refuses "a truncated model" "$TMP/truncated.bin" "$TRAIN" --init "$TMP/truncated.bin" --explain "$TMP/short.txt"
refuses "a file that is no model" "$TMP/garbage.bin" "$TRAIN" --init "$TMP/garbage.bin" --explain "$TMP/short.txt"
refuses "a missing text" "$TMP/none.txt" "${EXPLAIN[@]}" "$TMP/none.txt"
refuses "an empty text" "$TMP/empty.txt is empty" "${EXPLAIN[@]}" "$TMP/empty.txt"
refuses "a text of one token" "$TMP/one.txt is 1 token long" "${EXPLAIN[@]}" "$TMP/one.txt"
refuses "tokens outside the model's vocabulary (a 400-token tokenizer, a 300-token model)" \
    "$TMP/bpe400_tokenizer.bin has 400 tokens but the model's vocabulary has 300" \
    "$TRAIN" --init "$TMP/bpe_model/model.bin" --tokenizer "$TMP/bpe400_tokenizer.bin" --explain "$TMP/short.txt"
check "  the same text with its own tokenizer" "$TRAIN" --init "$TMP/bpe_model/model.bin" \
    --tokenizer "$TMP/bpe300_tokenizer.bin" --explain "$TMP/short.txt"
check "a text split inside a character (bytes: é is two tokens)" "${EXPLAIN[@]}" "$TMP/accent.txt"
refuses "a window longer than the model's context" "longer than the longest sequence of $MODEL (64 tokens)" \
    "${EXPLAIN[@]}" "$TMP/short.txt" --explain-window 65
refuses "--explain without --init" "--explain needs --init" "$TRAIN" --explain "$TMP/short.txt"
refuses "--html without --explain" "--html needs --explain" "$TRAIN" --init "$MODEL" --html "$TMP/x.html"
refuses "a page that cannot be written" "$TMP/no/such/dir/page.html" "${EXPLAIN[@]}" "$TMP/short.txt" \
    --html "$TMP/no/such/dir/page.html"

# the DiT's page
have_fashion=0
if [[ -f $FASHION_MNIST/t10k-images-idx3-ubyte ]]; then
    have_fashion=1
    check "train a tiny DiT (10 steps)" "$TRAIN_DIT" --data "$FASHION_MNIST" --layers 2 --channels 32 --heads 2 \
        --experts 4 --expert-hidden 32 --batch 16 --warmup 5 --eval-every 0 --eval-images 32 --print-every 10 \
        --sample-steps 2 --samples-per-class 1 --threads 2 --steps 10 --out "$TMP/dit"
    check "eval_dit explain" "$EVAL_DIT" explain --data "$FASHION_MNIST" --model "$TMP/dit/model.bin" --out "$TMP/dit.html" --threads 2
    refuses "eval_dit explain without --out" "needs --out" "$EVAL_DIT" explain --model "$TMP/dit/model.bin"
    refuses "eval_dit explain of a language model" "$MODEL" "$EVAL_DIT" explain --data "$FASHION_MNIST" --model "$MODEL" --out "$TMP/x.html"
else
    echo "skip the DiT's page: no Fashion-MNIST in $FASHION_MNIST (scripts/get_fashion_mnist.sh $FASHION_MNIST)"
fi

# the pages in a real browser
if [[ -z $CHROMIUM || ! -x $CHROMIUM ]]; then
    echo "skip the browser checks: chromium not found${CHROMIUM:+ at $CHROMIUM} (Debian: apt-get install chromium; or CHROMIUM=path)"
    finish
    exit
fi
browser() {  # browser ARGS...: headless Chromium as root, isolated, offline
    local profile
    profile=$(mktemp -d "$TMP/profile.XXXXXX")
    timeout 60 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --hide-scrollbars \
        --disable-background-networking --disable-component-update --disable-sync --user-data-dir="$profile" "$@" 2> /dev/null
}
page_check() {  # page_check WHAT ARGS...: check_page.py ARGS must pass; what it measured follows the line
    local what=$1 out
    shift
    if out=$("$PYTHON" "$TMP/check_page.py" "$@" 2>&1); then pass "$what"; else fail "$what"; fi
    sed 's/^/     /' <<< "$out" | tail -5
}
cat > "$TMP/check_page.py" << 'EOF'
# check_page.py KIND DOM.html ...: reads the DOM Chromium dumped after the page's script ran.
#   lm DOM TEXT DUMP.csv TOKEN LAYERS EXPERTS WINDOWS: the language model's page
#   dit DOM LAYERS EXPERTS: the DiT's page
#   png FILE: the screenshot is not blank
import csv, math, struct, sys, zlib
from html.parser import HTMLParser

class Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.elements, self.stack = [], []
    def handle_starttag(self, tag, attrs):
        if tag in ("br", "input", "meta", "img"):
            self.elements.append({"tag": tag, "attrs": dict(attrs), "text": "", "parents": list(self.stack)})
            return
        element = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": list(self.stack)}
        self.elements.append(element)
        self.stack.append(element)
    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()["tag"] == tag:
                break
    def handle_data(self, data):
        for element in self.stack:
            element["text"] += data
    def find(self, **attrs):
        return [e for e in self.elements if all(e["attrs"].get(k) == v for k, v in attrs.items())]
    def by_id(self, id_):
        found = self.find(id=id_)
        assert found, "no element #%s" % id_
        return found[0]

def inside(element, parent):
    return any(p is parent for p in element["parents"])

def fail(message):
    print("FAIL:", message)
    sys.exit(1)

def png_pixels(path):  # (width, height, rows of bytes per pixel): 8-bit RGB or RGBA, not interlaced
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, "unexpected PNG format"
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1: line[i] = (line[i] + a) & 255
            elif kind == 2: line[i] = (line[i] + b) & 255
            elif kind == 3: line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    return width, height, bpp, rows

kind = sys.argv[1]
if kind == "png":
    width, height, bpp, rows = png_pixels(sys.argv[2])
    colours, ink = set(), 0
    for line in rows[::2]:
        for x in range(0, width, 2):
            pixel = bytes(line[x * bpp:x * bpp + 3])
            colours.add(pixel)
            ink += pixel != b"\xff\xff\xff"
    share = ink / ((height + 1) // 2 * ((width + 1) // 2))
    if len(colours) < 16 or share < 0.03:
        fail("the screenshot looks blank: %d colours, %.1f%% not white" % (len(colours), 100 * share))
    print("%dx%d, %d colours, %.0f%% of the pixels not white" % (width, height, len(colours), 100 * share))
    sys.exit(0)

dom = Dom()
dom.feed(open(sys.argv[2], encoding="utf-8").read())
if kind == "dit":
    layers, experts = int(sys.argv[3]), int(sys.argv[4])
    canvases = [e for e in dom.elements if e["tag"] == "canvas"]
    if len(canvases) != 100: fail("%d image cells, expected 10 classes x 10 noise levels" % len(canvases))
    options = [e for e in dom.elements if e["tag"] == "option" and any(p["attrs"].get("id") == "shade" for p in e["parents"])]
    if len(options) != layers + 1: fail("%d shading choices, expected %d" % (len(options), layers + 1))
    legend = [e for e in dom.elements if e["tag"] == "span" and any(p["attrs"].get("id") == "legend" for p in e["parents"])]
    if len(legend) != experts: fail("%d legend entries, expected %d" % (len(legend), experts))
    for l in range(layers):
        cells = [e for e in dom.elements if e["tag"] == "td" and inside(e, dom.by_id("sum-%d" % l))]
        values = [float(c["text"]) for c in cells[1:]]
        if len(values) != 10 or not all(1 <= v <= experts for v in values):
            fail("layer %d's summary row: %s" % (l, values))
    print("100 image cells, %d shading choices, %d legend entries, a summary row per layer" % (layers + 1, experts))
    sys.exit(0)

# the language model's page against the text and the routing dump
text_path, dump_path = sys.argv[3], sys.argv[4]
token, layers, experts, windows = (int(a) for a in sys.argv[5:9])
rows = list(csv.DictReader(open(dump_path)))
tokens = [e for e in dom.elements if e["tag"] == "span" and "data-i" in e["attrs"]]
if len(tokens) != len(rows) + 1: fail("%d tokens on the page, %d routed positions in the dump" % (len(tokens), len(rows)))
shown = "".join(e["text"] for e in tokens).replace("\u21b5", "\n").replace("\u2192", "\t")
if shown != open(text_path, encoding="utf-8").read(): fail("the tokens on the page do not spell the text")
options = [e for e in dom.elements if e["tag"] == "option" and any(p["attrs"].get("id") == "shade" for p in e["parents"])]
if len(options) != layers + 2: fail("%d shading choices, expected the mean, %d layers and the loss" % (len(options), layers))
legend = [e for e in dom.elements if e["tag"] == "span" and any(p["attrs"].get("id") == "legend" for p in e["parents"])]
if len(legend) != experts: fail("%d legend entries, expected %d" % (len(legend), experts))
if not dom.find(id="bounds", type="checkbox"): fail("no token-boundaries switch")
starts = [e for e in dom.elements if e["attrs"].get("class") == "wstart"]
if len(starts) != windows - 1: fail("%d window starts marked, expected %d" % (len(starts), windows - 1))
# the token the address picked (#token=K): its |S| per layer and its loss, against the dump
details = dom.by_id("details")
if details["attrs"].get("data-token") != str(token): fail("the details show token %s, not %d" % (details["attrs"].get("data-token"), token))
row = rows[token]
blocks = [e for e in dom.elements if e["attrs"].get("class") == "layer"]
if len(blocks) != layers: fail("%d layer blocks in the details" % len(blocks))
for l, block in enumerate(blocks):
    if block["attrs"]["data-s"] != row["experts_%d" % l]:
        fail("token %d, layer %d: |S| %s on the page, %s in the dump" % (token, l, block["attrs"]["data-s"], row["experts_%d" % l]))
    chosen = [e for e in dom.elements if e["tag"] == "tr" and e["attrs"].get("class") == "in" and inside(e, block)]
    if len(chosen) != int(row["experts_%d" % l]): fail("token %d, layer %d: %d experts marked chosen" % (token, l, len(chosen)))
    # the table (rank, expert, logit, P, running sum) agrees with the rule: P = softmax(logits), the
    # sum passes p at the last chosen expert and not before
    table = [[float(t) for t in [c["text"] for c in dom.elements if c["tag"] == "td" and inside(c, r)][:5]]
             for r in dom.elements if r["tag"] == "tr" and r["attrs"].get("class") in ("in", "out") and inside(r, block)]
    if sorted(int(r[1]) for r in table) != list(range(experts)): fail("layer %d: not every expert listed once" % l)
    z = [r[2] for r in table]
    norm = sum(math.exp(v - max(z)) for v in z)
    if any(abs(math.exp(v - max(z)) / norm - r[3]) > 2e-3 for v, r in zip(z, table)): fail("layer %d: P is not softmax(logits)" % l)
    if any(a[3] < b[3] for a, b in zip(table, table[1:])): fail("layer %d: the experts are not in order of P" % l)
    p, s = float(block["attrs"]["data-p"]), len(chosen)
    before = table[s - 2][4] if s > 1 else 0.0
    if not (before < p + 1e-4 and (table[s - 1][4] >= p - 1e-4 or s == experts)):
        fail("layer %d: the running sum does not pass p = %g at expert %d: %s" % (l, p, s, [r[4] for r in table]))
loss = float(dom.by_id("d-loss")["text"])
if abs(loss - float(row["loss"])) > 6e-5: fail("token %d: loss %.4f on the page, %s in the dump" % (token, loss, row["loss"]))
surprise = float(dom.by_id("d-surprise")["text"])
if abs(surprise - float(rows[token - 1]["loss"])) > 6e-5: fail("token %d: surprise %.4f, the dump's previous loss %s" % (token, surprise, rows[token - 1]["loss"]))
# the summary: the mean |S| of every layer over the text
for l in range(layers):
    mean = sum(int(r["experts_%d" % l]) for r in rows) / len(rows)
    cell = [e for e in dom.elements if e["attrs"].get("class") == "mean" and inside(e, dom.by_id("sum-%d" % l))][0]
    if abs(float(cell["text"]) - mean) > 6e-4: fail("layer %d: mean |S| %s on the page, %.4f in the dump" % (l, cell["text"], mean))
print("%d tokens spell the text; %d shading choices, %d legend entries, %d window marks; token %d: |S| %s, loss %.4f, "
      "surprise %.4f as in the dump, its tables follow the rule (P = softmax of the logits, in order, the sum "
      "passes p at the last chosen); the summary's mean |S| per layer as in the dump"
      % (len(tokens), len(options), len(legend), len(starts), token,
         "/".join(row["experts_%d" % l] for l in range(layers)), loss, surprise))
EOF

browser --dump-dom "file://$TMP/short.html#token=12&shade=1" > "$TMP/short.dom"
page_check "the short text's page in Chromium: DOM and numbers against the dump" lm "$TMP/short.dom" "$TMP/short.txt" "$TMP/short.csv" 12 2 8 2
browser --dump-dom "file://$TMP/long.html#token=130" > "$TMP/long.dom"
page_check "the long text's page: 5 windows, a token of the third against the dump" lm "$TMP/long.dom" "$TMP/long.txt" "$TMP/long.csv" 130 2 8 5
browser --dump-dom "file://$TMP/gpt2.html#token=5&shade=0" > "$TMP/gpt2.dom"
page_check "the GPT-2 page: the tokens, and token 5 against the dump" lm "$TMP/gpt2.dom" "$TMP/short.txt" "$TMP/gpt2.csv" 5 2 8 1
browser --screenshot="$TMP/short.png" --window-size=1000,700 "file://$TMP/short.html#token=12" > /dev/null
page_check "a screenshot of the page is not blank" png "$TMP/short.png"
if [[ $have_fashion == 1 ]]; then
    browser --dump-dom "file://$TMP/dit.html" > "$TMP/dit.dom"
    page_check "the DiT's page in Chromium: cells, controls, summary" dit "$TMP/dit.dom" 2 4
    browser --screenshot="$TMP/dit.png" --window-size=1000,700 "file://$TMP/dit.html" > /dev/null
    page_check "a screenshot of the DiT's page is not blank" png "$TMP/dit.png"
fi
finish
