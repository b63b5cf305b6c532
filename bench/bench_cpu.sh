#!/usr/bin/env bash
# bench_cpu.sh: training speed of the C build against PyTorch (CPU, float32) running the reference
# model (reference/bench.py) on the same configurations with the same number of threads, in one
# run; then the GFLOP/s of the C matrix products (bench/bench_matmul) against PyTorch's BLAS
# (bench/bench_blas.py, OpenBLAS in Debian's python3-torch) on the shapes of each configuration.
#
#   bench/bench_cpu.sh            (run from the repository root, after `make train_dtopp prepro
#                                  tools/make_offline_text bench/bench_matmul`; needs python3-torch)
#
# Every configuration has L=4 layers and top-k routing, so that both do exactly the same expert work
# whatever the data (the C program trains on the project's generated text, PyTorch on random
# tokens). C and PyTorch runs alternate, RUNS times each; a run's speed is its mean tokens/s over
# the steps after the first 3 (allocation and warm-up), and the table gives the median of the runs.
# Both run with OMP_WAIT_POLICY=passive unless it is set (the README's advice: with the default,
# threads that wait spin, and on a machine doing anything else the products slow down many times).
# Environment: THREADS (default 2), STEPS (default 10), RUNS (default 3), CONFIGS (names to run,
# default all).
set -euo pipefail
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
THREADS=${THREADS:-2}
STEPS=${STEPS:-10}
RUNS=${RUNS:-3}
PYTHON=${PYTHON:-/usr/bin/python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# name | NH C E H V B T k
CONFIG_TABLE="small|4 128 8 128 256 16 64 2
c256-bytes|4 256 16 256 256 16 256 4
c256-gpt2|4 256 16 256 50257 8 256 4
c512-bytes|8 512 16 512 256 8 256 4"
CONFIGS=${CONFIGS:-$(cut -d'|' -f1 <<< "$CONFIG_TABLE" | tr '\n' ' ')}

tools/make_offline_text > "$TMP/text.txt"
./prepro --vocab bytes -o "$TMP/bytes" "$TMP/text.txt" > /dev/null
./prepro --vocab gpt2 -o "$TMP/gpt2" "$TMP/text.txt" > /dev/null

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

c_run() {  # c_run NH C E H V B T k: mean tokens/s of the steps after the first 3
    local data=bytes
    if [ "$5" -ne 256 ]; then data=gpt2; fi
    rm -rf "$TMP/run"
    ./train_dtopp --train "$TMP/${data}_train.bin" --val "" --layers 4 --heads "$1" --channels "$2" --experts "$3" \
        --expert-hidden "$4" --batch "$6" --seq-len "$7" --routing topk --k "$8" --steps "$STEPS" \
        --sample-tokens 0 --checkpoint-every 0 --threads "$THREADS" --out "$TMP/run" > /dev/null
    awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "tokens_per_s") c = i; next }
             NR > 4 { s += $c; n++ } END { printf "%.1f\n", s / n }' "$TMP/run/log.csv"
}

torch_run() {  # torch_run NH C E H V B T k: mean tokens/s of the steps after the first 3
    OPENBLAS_NUM_THREADS=$THREADS "$PYTHON" reference/bench.py --device cpu --threads "$THREADS" --L 4 --NH "$1" \
        --C "$2" --E "$3" --H "$4" --V "$5" --B "$6" --T "$7" --k "$8" --routing topk --steps "$STEPS" \
        | sed -n 's/.* \([0-9.]*\) tokens\/s$/\1/p'
}

echo "training speed, $THREADS threads, OMP_WAIT_POLICY=$OMP_WAIT_POLICY, median of $RUNS runs of $STEPS steps"
printf '%-11s %-44s %9s %9s %7s\n' config "NH C E H V B T k" "C tok/s" "PyTorch" ratio
results=""
for name in $CONFIGS; do
    read -r -a cfg <<< "$(grep "^$name|" <<< "$CONFIG_TABLE" | cut -d'|' -f2)"
    c_all="" t_all=""
    for _ in $(seq "$RUNS"); do
        c_all+="$(c_run "${cfg[@]}") "
        t_all+="$(torch_run "${cfg[@]}") "
    done
    c_tps=$(tr ' ' '\n' <<< "$c_all" | grep . | median)
    t_tps=$(tr ' ' '\n' <<< "$t_all" | grep . | median)
    ratio=$(awk -v c="$c_tps" -v t="$t_tps" 'BEGIN { printf "%.2f", c / t }')
    printf '%-11s %-44s %9.0f %9.0f %7s   (C runs: %s; PyTorch runs: %s)\n' "$name" \
        "NH=${cfg[0]} C=${cfg[1]} E=${cfg[2]} H=${cfg[3]} V=${cfg[4]} B=${cfg[5]} T=${cfg[6]} k=${cfg[7]}" \
        "$c_tps" "$t_tps" "$ratio" "$c_all" "$t_all"
    results+="$name $c_tps $t_tps $ratio"$'\n'
done

echo
echo "matrix products of a training step, GFLOP/s (C: bench/bench_matmul; BLAS: torch.mm, bench/bench_blas.py)"
for name in $CONFIGS; do
    read -r -a cfg <<< "$(grep "^$name|" <<< "$CONFIG_TABLE" | cut -d'|' -f2)"
    args=(--threads "$THREADS" --C "${cfg[1]}" --E "${cfg[2]}" --H "${cfg[3]}" --V "${cfg[4]}" --k "${cfg[7]}"
          --N $((cfg[5] * cfg[6])))
    echo "== $name"
    bench/bench_matmul "${args[@]}" > "$TMP/c_products.txt"
    OPENBLAS_NUM_THREADS=$THREADS "$PYTHON" bench/bench_blas.py "${args[@]}" > "$TMP/blas_products.txt"
    paste "$TMP/c_products.txt" "$TMP/blas_products.txt" | awk '
        NR == 1 { printf "  %-14s %6s %5s %6s %5s | %8s %8s | %8s %8s | %5s %5s\n", "shape", "rows", "IC", "OC",
                  "calls", "C fwd", "C bwd", "BLAS fwd", "BLAS bwd", "fwd", "bwd"; next }
        /^step products/ { c = $(NF / 2 - 1); b = $(NF - 1)
                           printf "  step products: C %.1f GFLOP/s, BLAS %.1f GFLOP/s: C / BLAS %.2f\n", c, b, c / b; next }
        { printf "  %-14s %6s %5s %6s %5s | %8s %8s | %8s %8s | %5.2f %5.2f\n", $1, $2, $3, $4, $5, $6, $7,
                 $13, $14, $6 / $13, $7 / $14 }'
done
