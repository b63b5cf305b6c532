#!/usr/bin/env bash
# bench_cpu.sh: training speed of the C build, in float32 and --precision bf16, against PyTorch
# running the reference model (reference/bench.py) in float32 and under bf16 autocast, on the same
# configurations with the same number of threads, in one run; each also as GFLOP/s against the
# peaks bench/fma_peak measures (g32 and g16: the C runs' GFLOP/s, each step's FLOP counted from the
# experts it activated, so under DTop-p from the controller's actual count, not the budget; e32 and
# e16: those experts per token and layer, the mean of the steps timed), and the peaks again after
# the training runs, with a warning when the start measured them low. Each C run also gets the peak
# of its precision measured just before it (p32 and p16: the run's GFLOP/s as a percentage of that
# peak), since the peak itself moves with the machine's clock and load from minute to minute.
# PyTorch runs both with the environment as it is and without OPENBLAS_CORETYPE and
# OPENBLAS_L2_SIZE (which, where they are set, pin OpenBLAS to a slower kernel); the C build always
# runs in the environment as it is. Then the GFLOP/s of the C matrix products (bench/bench_matmul)
# against PyTorch's BLAS (bench/bench_blas.py) on each configuration's shapes, and the GFLOP/s of
# the C build's attention (no peer: it is there to show how far the step's least efficient part is
# from the products).
#
#   bench/bench_cpu.sh            (run from the repository root, after `make train_dtopp prepro
#                                  tools/make_offline_text bench/bench_matmul bench/fma_peak`; needs python3-torch)
#
# Every configuration has L=4 layers; all but c256-dtopp use top-k routing, so that both do exactly
# the same expert work whatever the data (the C program trains on the project's generated text,
# PyTorch on random tokens); under DTop-p both hold a budget of k experts on average, which the
# controller reaches over the first steps (the C build's GFLOP/s count what each step activated).
# C and PyTorch runs alternate, C_RUNS times each precision of the C build and RUNS times each
# PyTorch mode; a run's speed is its mean tokens/s over the steps after the first 3 (allocation and
# warm-up), and the table gives the median of the runs.
# Both run with OMP_WAIT_POLICY=passive unless it is set (the README's advice: with the default,
# threads that wait spin, and on a machine doing anything else the products slow down many times).
# Environment: THREADS (default 2), STEPS (default 10), RUNS (default 3), C_RUNS (default RUNS; the
# C runs are short, so more of them narrow the medians for little time), CONFIGS (names to run,
# default all), TRAINING (0: the matrix products only, no training runs).
set -euo pipefail
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
THREADS=${THREADS:-2}
STEPS=${STEPS:-10}
RUNS=${RUNS:-3}
C_RUNS=${C_RUNS:-$RUNS}
PYTHON=${PYTHON:-/usr/bin/python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# name | NH C E H V B T k routing
CONFIG_TABLE="small|4 128 8 128 256 16 64 2 topk
c256-bytes|4 256 16 256 256 16 256 4 topk
c256-dtopp|4 256 16 256 256 16 256 4 dtopp
c256-gpt2|4 256 16 256 50257 8 256 4 topk
c256-t1024|4 256 16 256 256 4 1024 4 topk
c512-bytes|8 512 16 512 256 8 256 4 topk"
CONFIGS=${CONFIGS:-$(cut -d'|' -f1 <<< "$CONFIG_TABLE" | tr '\n' ' ')}
training_configs=$CONFIGS
if [ "${TRAINING:-1}" = 0 ]; then training_configs=""; fi

tools/make_offline_text > "$TMP/text.txt"
./prepro --vocab bytes -o "$TMP/bytes" "$TMP/text.txt" > /dev/null
./prepro --vocab gpt2 -o "$TMP/gpt2" "$TMP/text.txt" > /dev/null

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

routing_args() {  # routing_args ROUTING k: Top-k with k experts, or DTop-p with a budget of k
    if [ "$1" = topk ]; then echo "--routing topk --k $2"; else echo "--routing dtopp --tgt $2"; fi
}

# c_run PRECISION NH C E H V B T k ROUTING: "tokens/s GFLOP/s experts", means over the steps after the first 3
c_run() {
    local precision=$1 data=bytes
    shift
    if [ "$5" -ne 256 ]; then data=gpt2; fi
    rm -rf "$TMP/run"
    # shellcheck disable=SC2046
    ./train_dtopp --train "$TMP/${data}_train.bin" --val "" --layers 4 --heads "$1" --channels "$2" --experts "$3" \
        --expert-hidden "$4" --batch "$6" --seq-len "$7" $(routing_args "$9" "$8") --steps "$STEPS" \
        --sample-tokens 0 --checkpoint-every 0 --threads "$THREADS" --precision "$precision" --out "$TMP/run" > /dev/null
    # A step's FLOP from the experts it activated (log.csv's `activated`, per token and layer): exactly k
    # under Top-k; under DTop-p what the controller's p admitted that step, near but not at the budget.
    awk -F, -v base="$(flop_per_token "$1" "$2" "$3" "$4" "$5" "$6" "$7" 0)" \
        -v per_expert="$(flop_per_expert "$2" "$4")" '
        NR == 1 { for (i = 1; i <= NF; i++) { if ($i == "tokens_per_s") c = i; if ($i == "activated") a = i }; next }
        NR > 4 { s += $c; g += $c * (base + per_expert * $a) / 1e9; e += $a; n++ }
        END { printf "%.1f %.1f %.2f\n", s / n, g / n, e / n }' "$TMP/run/log.csv"
}

# torch_run ENV AUTOCAST NH C E H V B T k ROUTING: mean tokens/s of the steps after the first 3.
# ENV "unset": without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (OpenBLAS then picks its kernel for
# this CPU); "as-set": the environment as it is.
torch_run() {
    local env_mode=$1 autocast=$2
    shift 2
    local -a env_cmd=(env)
    if [ "$env_mode" = unset ]; then env_cmd=(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE); fi
    # shellcheck disable=SC2046
    "${env_cmd[@]}" OPENBLAS_NUM_THREADS="$THREADS" "$PYTHON" reference/bench.py --device cpu --threads "$THREADS" \
        --L 4 --NH "$1" --C "$2" --E "$3" --H "$4" --V "$5" --B "$6" --T "$7" --k "$8" $(routing_args "$9" "$8") \
        --steps "$STEPS" $autocast | sed -n 's/.* \([0-9.]*\) tokens\/s$/\1/p'
}

# Training FLOP per token: 6 per weight a token meets (forward 2, backward 4: qkv, attention
# output, router, k experts' W1 W3 W2, the LM head) plus causal attention's 6 L T C (scores and
# weighted sum over T/2 keys on average, forward and backward).
flop_per_token() {  # NH C E H V B T k
    awk -v C="$2" -v E="$3" -v H="$4" -v V="$5" -v T="$7" -v k="$8" -v L=4 \
        'BEGIN { printf "%.0f", 6 * (L * (4 * C * C + C * E + 3 * k * C * H) + C * V) + 6 * L * T * C }'
}
flop_per_expert() {  # C H: the FLOP per token of one more expert in every layer (W1, W3, W2)
    awk -v C="$1" -v H="$2" -v L=4 'BEGIN { printf "%.0f", 6 * L * 3 * C * H }'
}

# the ceilings: the float32 FMA and bf16 dot-product loops of bench/fma_peak
peaks=$(bench/fma_peak --threads "$THREADS")
echo "$peaks"
peak_of() { sed -n "s/^$1 .*: \([0-9.]*\) GFLOP\/s\$/\1/p" <<< "$2"; }  # float32|bf16 OUTPUT: GFLOP/s
fp32_peak=$(peak_of float32 "$peaks")
bf16_peak=$(peak_of bf16 "$peaks")
echo "PyTorch: $("$PYTHON" -c 'import torch; print(torch.__version__, "oneDNN (bf16 autocast products):",
    torch.backends.mkldnn.is_available())')"
for env_mode in as-set unset; do
    prefix=()
    if [ "$env_mode" = unset ]; then prefix=(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE); fi
    echo "OpenBLAS with the environment $env_mode: kernel $("${prefix[@]}" "$PYTHON" -c '
import ctypes, torch
torch.zeros(2, 2) @ torch.zeros(2, 2)
lib = next(l.split()[-1] for l in open("/proc/self/maps") if "openblas" in l)
get = ctypes.CDLL(lib).openblas_get_corename
get.restype = ctypes.c_char_p
print(get().decode(), "(" + lib + ")")')"
done

if [ -n "$training_configs" ]; then
    echo
    echo "training speed, $THREADS threads, OMP_WAIT_POLICY=$OMP_WAIT_POLICY, $STEPS steps a run," \
        "median of $C_RUNS C runs and $RUNS PyTorch runs"
    echo "PyTorch: float32, then bf16 autocast; 'unset' runs without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE"
    printf '%-11s %9s %9s %6s | %9s %9s %9s %9s | %6s %6s\n' config "C fp32" "C bf16" bf16/32 "PT fp32" \
        "PT fp32u" "PT bf16" "PT bf16u" "C32/PT" "C16/PT"
fi
for name in $training_configs; do
    read -r -a cfg <<< "$(grep "^$name|" <<< "$CONFIG_TABLE" | cut -d'|' -f2)"
    declare -A all=()
    for round in $(seq $((C_RUNS > RUNS ? C_RUNS : RUNS))); do
        for precision in fp32 bf16; do  # keys c32 g32 e32 p32, c16 g16 e16 p16
            if [ "$round" -gt "$C_RUNS" ]; then break; fi
            peak=$(peak_of "${precision/fp32/float32}" "$(bench/fma_peak --threads "$THREADS")")
            read -r tokens gflops experts <<< "$(c_run "$precision" "${cfg[@]}")"
            all[c${precision: -2}]+="$tokens "
            all[g${precision: -2}]+="$gflops "
            all[e${precision: -2}]+="$experts "
            all[p${precision: -2}]+="$(awk -v g="$gflops" -v p="${peak:-0}" \
                'BEGIN { printf "%.1f", (p > 0 ? 100 * g / p : 0) }') "
        done
        if [ "$round" -gt "$RUNS" ]; then continue; fi
        all[t32]+="$(torch_run as-set "" "${cfg[@]}") "
        all[t32u]+="$(torch_run unset "" "${cfg[@]}") "
        all[t16]+="$(torch_run as-set --autocast "${cfg[@]}") "
        all[t16u]+="$(torch_run unset --autocast "${cfg[@]}") "
    done
    declare -A med=()
    for key in c32 c16 g32 g16 p32 p16 t32 t32u t16 t16u; do
        med[$key]=$(tr ' ' '\n' <<< "${all[$key]}" | grep . | median)
    done
    best_torch=$(printf '%s\n' "${med[t32]}" "${med[t32u]}" "${med[t16]}" "${med[t16u]}" | sort -g | tail -1)
    flop=$(flop_per_token "${cfg[@]}")
    awk -v n="$name" -v c32="${med[c32]}" -v c16="${med[c16]}" -v t32="${med[t32]}" -v t32u="${med[t32u]}" \
        -v t16="${med[t16]}" -v t16u="${med[t16u]}" -v best="$best_torch" -v f="$flop" -v g32="${med[g32]}" \
        -v g16="${med[g16]}" -v p32="$fp32_peak" -v p16="$bf16_peak" -v cfg="${cfg[*]}" -v r32="${med[p32]}" \
        -v r16="${med[p16]}" 'BEGIN {
        printf "%-11s %9.0f %9.0f %6.2f | %9.0f %9.0f %9.0f %9.0f | %6.2f %6.2f\n", n, c32, c16, c16 / c32, t32, t32u,
               t16, t16u, c32 / best, c16 / best
        printf "%-11s   NH C E H V B T k routing = %s; %.2f MFLOP/token at k experts:", "", cfg, f / 1e6
        printf " C fp32 %.0f GFLOP/s (%.0f%% of %s),", g32, 100 * g32 / p32, p32
        if (p16 > 0) printf " C bf16 %.0f GFLOP/s (%.0f%% of %s)\n", g16, 100 * g16 / p16, p16; else printf "\n"
        printf "%-11s   of the peak measured just before each run: C fp32 %.1f%%", "", r32
        if (r16 > 0) printf ", C bf16 %.1f%%\n", r16; else printf "\n" }'
    for key in c32 c16 g32 g16 e32 e16 p32 p16 t32 t32u t16 t16u; do
        printf '%-11s   %s runs: %s\n' "" "$key" "${all[$key]}"
    done
    unset all med
done

# The peaks again: the percentages above are of the peaks measured at the start, and a start on a
# busy machine measures them low (every percentage of the run would then read high).
if [ -n "$training_configs" ]; then
    peaks_after=$(bench/fma_peak --threads "$THREADS")
    echo
    echo "the peaks again, after the training runs:"
    echo "$peaks_after"
    awk -v before="$fp32_peak" -v after="$(peak_of float32 "$peaks_after")" 'BEGIN { if (after > 1.1 * before) {
        printf "warning: the float32 peak measured %s at the end, against %s at the start:", after, before
        print " the machine was busier at the start, and the percentages above are too high" } }'
fi

echo
echo "matrix products of a training step, GFLOP/s (C: bench/bench_matmul; BLAS: torch.mm, bench/bench_blas.py, with the"
echo "environment as set and without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE; C / BLAS against the faster of the two;"
echo "dinp and dW: the backward's two products, each timed alone)"
for name in $CONFIGS; do
    read -r -a cfg <<< "$(grep "^$name|" <<< "$CONFIG_TABLE" | cut -d'|' -f2)"
    args=(--threads "$THREADS" --C "${cfg[1]}" --E "${cfg[2]}" --H "${cfg[3]}" --V "${cfg[4]}" --k "${cfg[7]}"
          --N $((cfg[5] * cfg[6])))
    attention=(--T "${cfg[6]}" --NH "${cfg[0]}")  # bench_matmul's attention line (bench_blas.py has none)
    echo "== $name"
    bench/bench_matmul "${args[@]}" "${attention[@]}" > "$TMP/c_products.txt"
    OPENBLAS_NUM_THREADS=$THREADS "$PYTHON" bench/bench_blas.py "${args[@]}" > "$TMP/blas_as_set.txt"
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS="$THREADS" "$PYTHON" bench/bench_blas.py \
        "${args[@]}" > "$TMP/blas_unset.txt"
    # a line of each file side by side, tab-separated; a shape's fields 6 to 9 are its forward, backward,
    # dinp and dW GFLOP/s
    paste "$TMP/c_products.txt" "$TMP/blas_as_set.txt" "$TMP/blas_unset.txt" | awk -F'\t' '
        { nc = split($1, c, " "); nb = split($2, b, " "); nu = split($3, u, " ") }
        function best(i) { return b[i] + 0 > u[i] + 0 ? b[i] : u[i] }
        NR == 1 { printf "  %-14s %6s %5s %6s %5s | %8s %8s | %8s %8s | %8s %8s | %5s %5s %5s %5s\n", "shape", "rows",
                  "IC", "OC", "calls", "C fwd", "C bwd", "BLAS fwd", "BLAS bwd", "unset f", "unset b", "fwd", "bwd",
                  "dinp", "dW"; next }
        /^step products/ { printf "  step products: C %.1f GFLOP/s, BLAS %.1f (unset %.1f) GFLOP/s: C / BLAS %.2f\n",
                                  c[nc - 1], b[nb - 1], u[nu - 1], c[nc - 1] / best(nb - 1); next }
        /^register tile|^attention \(/ { print "  C " $1; next }
        { printf "  %-14s %6s %5s %6s %5s | %8s %8s | %8s %8s | %8s %8s | %5.2f %5.2f %5.2f %5.2f\n", c[1], c[2], c[3],
                 c[4], c[5], c[6], c[7], b[6], b[7], u[6], u[7], c[6] / best(6), c[7] / best(7), c[8] / best(8),
                 c[9] / best(9) }'
    bench/bench_matmul "${args[@]}" "${attention[@]}" --precision bf16 | awk '/^step products/ {
        printf "  step products with --precision bf16: C %.1f GFLOP/s\n", $(NF - 1) }
        /^register tile|^attention \(/ { print "  C bf16 " $0 }'
done
