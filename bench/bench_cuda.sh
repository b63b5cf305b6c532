#!/bin/sh
# Training speed of the CUDA build against PyTorch eager running the reference model
# (reference/bench.py), on the same configuration, in float32 and with TF32 allowed.
#
#     bench/bench_cuda.sh [OUTDIR]        (run from anywhere; needs nvcc, a GPU and PyTorch)
#
# Configuration (override through the environment): L C NH E H V B T TGT STEPS; BENCH_BIN.
# Prints per-step losses, tokens/s of each variant, the ratio CUDA / PyTorch, and where the time
# of a CUDA step goes (per phase). Full logs go to OUTDIR (default: a temporary directory).
set -eu
cd "$(dirname "$0")/.."
L=${L:-12} C=${C:-768} NH=${NH:-12} E=${E:-64} H=${H:-384} V=${V:-50257}
B=${B:-8} T=${T:-1024} TGT=${TGT:-8} STEPS=${STEPS:-8}
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
ARCH=${ARCH:-sm_90}

BIN=${BENCH_BIN:-}  # an already built bench_cuda, or build it here
if [ -z "$BIN" ]; then
    nvcc -O3 -std=c++17 -arch=$ARCH -Xcompiler -fopenmp -x cu bench/bench_cuda.c -lcublas -o "$OUT/bench_cuda"
    BIN="$OUT/bench_cuda"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

"$BIN" --L $L --C $C --NH $NH --E $E --H $H --V $V --B $B --T $T --tgt $TGT --steps $STEPS \
    --profile-steps 2 --tf32 2 --experts 2 2>&1 | tee "$OUT/cuda.txt"
for tf32 in 0 1; do
    python3 bench/bench_torch.py --tf32 $tf32 --device cuda --L $L --C $C --NH $NH --E $E --H $H --V $V \
        --B $B --T $T --tgt $TGT --steps $STEPS 2>&1 | tee "$OUT/torch_tf32_$tf32.txt"
done

tps() { grep "$1" "$2" | tail -1 | sed 's/.* \([0-9]*\) tokens\/s.*/\1/'; }
ratio() { awk "BEGIN{a = $1; b = $2; printf \"%.2f\", (a > b ? a : b) / $3}"; }
f32l=$(tps "RESULT cuda-fp32-lanes" "$OUT/cuda.txt"); f32g=$(tps "RESULT cuda-fp32-grouped" "$OUT/cuda.txt")
tfl=$(tps "RESULT cuda-tf32-lanes" "$OUT/cuda.txt"); tfg=$(tps "RESULT cuda-tf32-grouped" "$OUT/cuda.txt")
torch32=$(tps "tokens/s" "$OUT/torch_tf32_0.txt")
torchtf=$(tps "tokens/s" "$OUT/torch_tf32_1.txt")
echo
echo "L=$L C=$C NH=$NH E=$E H=$H V=$V B=$B T=$T tgt=$TGT, $STEPS steps (3 warm-up), tokens/s:"
printf "%-8s %14s %14s %12s %10s\n" "" "CUDA streams" "CUDA grouped" "PyTorch" "best/torch"
printf "%-8s %14s %14s %12s %10s\n" "float32" "$f32l" "$f32g" "$torch32" "$(ratio $f32l $f32g $torch32)"
printf "%-8s %14s %14s %12s %10s\n" "TF32" "$tfl" "$tfg" "$torchtf" "$(ratio $tfl $tfg $torchtf)"
