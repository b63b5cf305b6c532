#!/bin/sh
# The CPU and CUDA builds of train_dtopp, trained from the same checkpoint on the same shard, must
# follow the same trajectory: at every step the loss and p within 1e-3 (different summation
# orders make the last bits differ, so no bitwise equality is asked for).
#
#     test/compare_cpu_gpu.sh            (from anywhere; needs a GPU)
#
# Environment: CPU_BIN (default ./train_dtopp), GPU_BIN (default ./train_dtopp_cuda),
# PREPRO (default ./prepro), STEPS (default 50), TOL (default 1e-3), TEXT (a text file; default the
# documentation), MODEL (preset, default tiny), BATCH (default 4), SEQ_LEN (default 64). Build them first, e.g.
# make train_dtopp prepro train_dtopp_cuda.
set -eu
cd "$(dirname "$0")/.."
CPU_BIN=${CPU_BIN:-./train_dtopp}
GPU_BIN=${GPU_BIN:-./train_dtopp_cuda}
PREPRO=${PREPRO:-./prepro}
STEPS=${STEPS:-50}
TOL=${TOL:-1e-3}
for bin in "$CPU_BIN" "$GPU_BIN" "$PREPRO"; do
    if [ ! -x "$bin" ]; then echo "missing $bin: build it first"; exit 2; fi
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# a byte-level shard of TEXT, by default the repository's own documentation: small and always there
if [ -n "${TEXT:-}" ]; then cp "$TEXT" "$work/text.txt"; else cat doc/*.md reference/README.md > "$work/text.txt"; fi
"$PREPRO" --vocab bytes -o "$work/text" "$work/text.txt" > "$work/prepro.txt"
common="--train $work/text_train.bin --val $work/text_val.bin --batch ${BATCH:-4} --seq-len ${SEQ_LEN:-64} --eval-every 0 --sample-tokens 0 --checkpoint-every 0"

# the common starting checkpoint: a dtopp model (MODEL preset, default tiny) after one CPU step
"$CPU_BIN" --model "${MODEL:-tiny}" $common --steps 1 --out "$work/init" > "$work/init.txt"
"$CPU_BIN" --init "$work/init/model.bin" $common --steps "$STEPS" --out "$work/cpu" > "$work/cpu.txt"
"$GPU_BIN" --init "$work/init/model.bin" $common --steps "$STEPS" --out "$work/gpu" > "$work/gpu.txt"

# compare log.csv column by column name
awk -F, -v tol="$TOL" -v steps="$STEPS" '
    FNR == 1 { for (i = 1; i <= NF; i++) col[FILENAME, $i] = i; next }
    FILENAME == ARGV[1] { cpu_loss[$col[FILENAME, "step"]] = $col[FILENAME, "loss"]; cpu_p[$col[FILENAME, "step"]] = $col[FILENAME, "p"];
                          cpu_a[$col[FILENAME, "step"]] = $col[FILENAME, "activated"]; next }
    {
        s = $col[FILENAME, "step"]; n++
        if (!(s in cpu_loss)) { printf "step %s missing from the CPU log\n", s; bad = 1; next }
        dl = $col[FILENAME, "loss"] - cpu_loss[s]; if (dl < 0) dl = -dl
        dp = $col[FILENAME, "p"] - cpu_p[s]; if (dp < 0) dp = -dp
        da = $col[FILENAME, "activated"] - cpu_a[s]; if (da < 0) da = -da
        if (dl > worst_loss) worst_loss = dl
        if (dp > worst_p) worst_p = dp
        if (da > worst_a) worst_a = da
        if (dl > tol || dp > tol) { printf "step %s: loss %s vs %s, p %s vs %s\n", s, $col[FILENAME, "loss"], cpu_loss[s], $col[FILENAME, "p"], cpu_p[s]; bad = 1 }
    }
    END {
        if (n != steps) { printf "the CUDA log has %d steps, expected %d\n", n, steps; bad = 1 }
        printf "%s: %d steps, largest |loss difference| %.2e, |p difference| %.2e (tolerance %g), |activated difference| %.2e\n",
               bad ? "FAIL" : "ok", n, worst_loss, worst_p, tol, worst_a
        exit bad
    }' "$work/cpu/log.csv" "$work/gpu/log.csv"
