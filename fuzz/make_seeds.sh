#!/usr/bin/env bash
# make_seeds.sh: writes the seed corpus of every fuzz target to fuzz/corpus/TARGET/ with the
# project's own programs (and python3 for the small tokenizer). Run from the repository root after
# `make` and scripts/get_fashion_mnist.sh data/fashion-mnist; the corpus is committed, so this is
# only needed when a format changes.
set -euo pipefail
C=fuzz/corpus
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
rm -rf "$C"
mkdir -p "$C"/{shard,model,state,tokenizer,encoder,prepro,options,idx,dit,dit_state}

# shards: bytes and GPT-2 tokens of a short text
tools/make_offline_text > "$T/all.txt"
head -c 600 "$T/all.txt" > "$T/text.txt"
./prepro --vocab bytes --val 0.5 -o "$T/bytes" "$T/text.txt" > /dev/null
./prepro --vocab gpt2 --val 0.5 -o "$T/gpt2" "$T/text.txt" > /dev/null
cp "$T/bytes_train.bin" "$C/shard/bytes.bin"
cp "$T/gpt2_train.bin" "$C/shard/gpt2.bin"

# models of the smallest size, one per routing mode; the state file of the configuration that
# fuzz_state.c builds (L=1 C=2 NH=1 E=2 H=2, bytes)
SMALLEST=(--train "$T/bytes_train.bin" --val "" --layers 1 --channels 2 --heads 1 --experts 2 --expert-hidden 2
          --max-seq-len 8 --batch 1 --seq-len 8 --steps 1 --sample-tokens 0 --threads 1)
modes=("--routing topk --k 1" "--routing topp --p 0.5" "--routing dtopp --tgt 1.5" "--routing dtopp --tgt 1.5 --controller layer")
for i in "${!modes[@]}"; do
    # shellcheck disable=SC2086
    ./train_dtopp "${SMALLEST[@]}" ${modes[$i]} --out "$T/m$i" > /dev/null
    cp "$T/m$i/model.bin" "$C/model/mode$i.bin"
done
cp "$T/m2/state_00000001.bin" "$C/state/dtopp.bin"

# a tokenizer of GPT-2's first 40 merges and its end-of-text token, cut from tokenizer.bin
python3 - "$C/tokenizer/small.bin" <<'PY'
import struct, sys
data = open("tokenizer.bin", "rb").read()
V, eot, M, total = struct.unpack_from("<4i", data, 8)
pairs = data[1024:1024 + 8 * M]
lens = data[1024 + 8 * M:1024 + 8 * M + V]
blob = data[1024 + 8 * M + V:]
m = 40
keep = list(range(256 + m)) + [eot]
offsets = [0]
for n in lens: offsets.append(offsets[-1] + n)
out_bytes = b"".join(blob[offsets[i]:offsets[i + 1]] for i in keep)
header = struct.pack("<6i", 20251216, 1, len(keep), len(keep) - 1, m, len(out_bytes)).ljust(1024, b"\0")
open(sys.argv[1], "wb").write(header + pairs[:8 * m] + bytes(lens[i] for i in keep) + out_bytes)
PY

# texts for the encoder and prepro (whose first byte picks its options)
split -l 4 test/tiktoken_compare.txt "$C/encoder/text_"
printf 'Hello world\n' > "$C/encoder/hello"
for flags in 0 1 2 4 8; do { printf "\\x0$flags"; head -c 300 "$T/text.txt"; } > "$C/prepro/flags$flags"; done
printf '\x04first\n---\nsecond\n' > "$C/prepro/split"

# command lines, arguments separated by NUL bytes
printf '%s\0' --steps 100 --lr 1e-3 > "$C/options/training"
printf '%s\0' --model tiny --routing topk --k 2 > "$C/options/topk"
printf '%s\0' --routing dtopp --tgt 3 --controller layer --p0 0.5 > "$C/options/dtopp"
printf '%s\0' --layers 3 --channels 96 --heads 4 --experts 4 > "$C/options/sizes"
# IDX files: 2 gray images of 28 x 28 and 2 labels
{ printf '\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x1c\x00\x00\x00\x1c'
  head -c $((2 * 784)) /dev/zero | tr '\0' '\200'; } > "$C/idx/images.idx"
printf '\x00\x00\x08\x01\x00\x00\x00\x02\x03\x07' > "$C/idx/labels.idx"

# diffusion transformer checkpoints of the smallest size, Top-k and DTop-p, after one step
for routing in topk dtopp; do
    dit/train_dit --data "${FASHION_MNIST:-data/fashion-mnist}" --layers 1 --channels 4 --heads 1 --experts 2 \
        --expert-hidden 2 --batch 2 --steps 1 --eval-images 2 --sample-steps 1 --samples-per-class 1 \
        --threads 1 --routing $routing --k 1 --tgt 1.5 --out "$T/dit_$routing" > /dev/null
    cp "$T/dit_$routing/model.bin" "$C/dit/$routing.bin"
done
# the training state of such a DiT on a data set of 2 images (the one fuzz_dit_state.c builds)
mkdir -p "$T/two"
for set in train t10k; do
    cp "$C/idx/images.idx" "$T/two/$set-images-idx3-ubyte"
    cp "$C/idx/labels.idx" "$T/two/$set-labels-idx1-ubyte"
done
dit/train_dit --data "$T/two" --layers 1 --channels 4 --heads 1 --experts 2 --expert-hidden 2 --batch 2 --steps 1 \
    --eval-images 2 --sample-steps 1 --samples-per-class 1 --threads 1 --tgt 1.5 --out "$T/dit_state" > /dev/null
cp "$T/dit_state/state_00000001.bin" "$C/dit_state/dtopp.bin"
printf '\x10' | cat - "$C/prepro/flags0" > "$C/prepro/stale"  # a stale shard
echo "seeds: $(find "$C" -type f | wc -l) files in $C"
