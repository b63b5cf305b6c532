#!/usr/bin/env bash
# test_mpi.sh: data-parallel and expert-parallel training (MPI) and gradient accumulation on a tiny
# model: ranks and micro-batches give the same run as one process, every rank holds the same model,
# resume is exact, and a rank that dies ends the job without a half-written file.
#
#   test/test_mpi.sh            (run from the repository root, after `make train_dtopp_mpi`)
#
# Prints one line per check and ends with "N passed, M failed"; exits 1 if any check failed.
set -uo pipefail

TRAIN=${TRAIN:-./train_dtopp}
TRAIN_MPI=${TRAIN_MPI:-./train_dtopp_mpi}
PREPRO=${PREPRO:-./prepro}
MAKE_OFFLINE_TEXT=${MAKE_OFFLINE_TEXT:-tools/make_offline_text}
# Open MPI refuses to start as root unless told, and by default starts no more ranks than cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
MPIRUN=(mpirun --oversubscribe)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# shellcheck source=test/checks.sh
source "$(dirname "$0")/checks.sh"
# log.csv without the tokens_per_s column (timing): what must be identical between two runs
measured() {
    awk -F, -v OFS=, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "tokens_per_s") c = i }
                      { $c = ""; print }' "$1"
}
payload() { tail -c +1025 "$1"; }  # a state file without its header (which records the number of ranks)

# The launcher must be able to start processes at all: where it cannot (here seen on a machine with
# no network interface up, not even loopback), nothing below could run, so it says so and stops.
if ! probe=$("${MPIRUN[@]}" -np 2 true 2>&1); then
    reason=$(grep -m 1 -E '[[:alnum:]]' <<< "$probe" | sed 's/^ *//')
    echo "skipped: the MPI test (doc/parallel.md): mpirun cannot start 2 processes here: ${reason:-no message}"
    exit 0
fi

"$MAKE_OFFLINE_TEXT" > "$TMP/text.txt"
"$PREPRO" --vocab bytes -o "$TMP/bytes" "$TMP/text.txt" > /dev/null || { echo "prepro failed"; exit 1; }
RUN=(--train "$TMP/bytes_train.bin" --val "$TMP/bytes_val.bin" --model tiny --batch 4 --seq-len 32
     --eval-batches 2 --eval-every 10 --sample-tokens 0 --lr 1e-2)

# 2 ranks with 2 sequences each = 1 process with 4 sequences in 2 micro-batches, bit for bit: the
# same micro-batches, their gradients added in the same order (rank order = micro-batch order).
# The ranks run 1 thread each, the single process 2: thread counts change nothing either.
check "2 ranks, 20 steps, every rank checked after every step (--check-ranks 1)" \
    "${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${RUN[@]}" --steps 20 --threads 1 --check-ranks 1 --out "$TMP/ranks2"
check "1 process, --grad-accum 2, 20 steps" \
    "$TRAIN" "${RUN[@]}" --steps 20 --threads 2 --grad-accum 2 --out "$TMP/accum2"
check "2 ranks = --grad-accum 2: losses, grad norm, a_t, p, per-layer statistics at every step" \
    cmp <(measured "$TMP/ranks2/log.csv") <(measured "$TMP/accum2/log.csv")
check "2 ranks = --grad-accum 2: parameters and controller state after 20 steps" \
    cmp "$TMP/ranks2/model.bin" "$TMP/accum2/model.bin"
check "2 ranks = --grad-accum 2: optimizer moments after 20 steps" \
    cmp <(payload "$TMP/ranks2/state_00000020.bin") <(payload "$TMP/accum2/state_00000020.bin")
check "the controller moved p (the comparison covers a working controller)" \
    test "$(measured "$TMP/ranks2/log.csv" | awk -F, 'NR > 1 { print $8 }' | sort -u | wc -l)" -gt 10

# 4 ranks of 1 sequence = 4 micro-batches: the rank-order sum adds ((g0 + g1) + g2) + g3 as
# accumulation does.
"${MPIRUN[@]}" -np 4 "$TRAIN_MPI" "${RUN[@]}" --steps 6 --threads 1 --check-ranks 1 --out "$TMP/ranks4" \
    > /dev/null 2>&1
"$TRAIN" "${RUN[@]}" --steps 6 --threads 2 --grad-accum 4 --out "$TMP/accum4" > /dev/null 2>&1
check "4 ranks = --grad-accum 4: every step's log" \
    cmp <(measured "$TMP/ranks4/log.csv") <(measured "$TMP/accum4/log.csv")
check "4 ranks = --grad-accum 4: parameters and controller state" \
    cmp "$TMP/ranks4/model.bin" "$TMP/accum4/model.bin"

# micro-batches against one batch of 4: the same tokens, but the sums over them are added in
# another order, so equal up to float32 rounding. The forward pass of each token is the same
# computation, so a_t and p agree exactly while no routing decision flips (none does in these 3
# steps); the losses and the gradient norm are sums over 128 tokens and ~250k parameters, which
# float32 rounds at about 1e-7 relative per addition: 1e-5 relative leaves room for that, far
# below the step-to-step change of the loss (~1e-2).
SHORT=("${RUN[@]}" --steps 3 --threads 2 --eval-every 0)
"$TRAIN" "${SHORT[@]}" --grad-accum 2 --out "$TMP/short_accum" > /dev/null 2>&1
"$TRAIN" "${SHORT[@]}" --out "$TMP/short_batch" > /dev/null 2>&1
# columns 2, 3, 6: loss, ce_loss, grad_norm (relative difference); 7, 8: activated, p (equal)
close=$(paste -d, <(measured "$TMP/short_accum/log.csv") <(measured "$TMP/short_batch/log.csv") | awk -F, '
    NR == 1 { half = NF / 2; next }
    { split("2 3 6", cols, " ")
      for (i = 1; i <= 3; i++) { c = cols[i]; r = ($c - $(c + half)) / $(c + half); if (r < 0) r = -r
                                 if (r > worst) worst = r }
      if ($7 != $(7 + half) || $8 != $(8 + half)) same = "no" }
    END { printf "%s %.1e\n", same == "" ? "yes" : "no", worst }')
what="--grad-accum 2 vs one batch of 4, 3 steps"
if [[ ${close%% *} == yes ]] && awk -v w="${close##* }" 'BEGIN { exit !(w <= 1e-5) }'; then
    pass "$what: same a_t and p, losses and grad norm within ${close##* } relative"
else fail "$what: a_t and p equal: ${close%% *}, worst relative difference ${close##* }"; fi

# resume: 2 ranks for 12 steps = 2 ranks for 6, stop, resume on 2 ranks for 6 more
SPLIT=("${RUN[@]}" --steps 12 --eval-every 0 --checkpoint-every 6 --threads 1)
"${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${SPLIT[@]}" --out "$TMP/straight" > /dev/null 2>&1
"${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${SPLIT[@]}" --out "$TMP/split" --stop-at 6 > /dev/null 2>&1
check "2 ranks: stopped at step 6 with a checkpoint" test -s "$TMP/split/state_00000006.bin"
cp -r "$TMP/split" "$TMP/split_one"
check "2 ranks: resumed on 2 ranks to step 12" \
    "${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${SPLIT[@]}" --out "$TMP/split" --resume "$TMP/split"
check "resume on 2 ranks: identical log" \
    cmp <(measured "$TMP/straight/log.csv") <(measured "$TMP/split/log.csv")
check "resume on 2 ranks: identical parameters and controller state" \
    cmp "$TMP/straight/model.bin" "$TMP/split/model.bin"
check "resume on 2 ranks: identical training state" \
    cmp "$TMP/straight/state_00000012.bin" "$TMP/split/state_00000012.bin"
out=$("$TRAIN" "${SPLIT[@]}" --out "$TMP/split_one" --resume "$TMP/split_one" 2>&1)
if [[ $? -eq 0 ]] && grep -q "written by a run on 2 rank(s) and continues on 1" <<< "$out"; then
    pass "resume of a 2-rank run in 1 process: allowed, with a note"
else fail "resume of a 2-rank run in 1 process: allowed, with a note ($(tail -1 <<< "$out"))"; fi

refuses "a batch that does not split over the ranks" "--grad-accum 1 micro-batches on each of 2 rank(s)" \
    "${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${RUN[@]}" --batch 3 --steps 1 --out "$TMP/odd"
refuses "a batch that does not split into micro-batches" "does not split into --grad-accum 3" \
    "$TRAIN" "${RUN[@]}" --grad-accum 3 --steps 1 --out "$TMP/odd"

# Expert parallelism (--expert-parallel G): each rank of a group of G computes E/G experts for the
# tokens of the whole group. Rank r's rows reach their experts in rank order and each source's rows
# of an expert form one product, as micro-batch r's do in one process; the owner adds the sources'
# expert gradients in rank order, ((g0 + g1) + g2) + ..., as accumulation does. So 2 ranks with
# --expert-parallel 2 = 1 process with --grad-accum 2, bit for bit, and nothing needs a tolerance.
check "expert parallel: 2 ranks, --expert-parallel 2, 20 steps, every rank checked after every step" \
    "${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${RUN[@]}" --steps 20 --threads 1 --check-ranks 1 --expert-parallel 2 \
    --out "$TMP/ep2"
cp "$TMP/last.log" "$TMP/ep2.log"
check "expert parallel 2 = --grad-accum 2: losses, grad norm, a_t, p, per-layer statistics at every step" \
    cmp <(measured "$TMP/ep2/log.csv") <(measured "$TMP/accum2/log.csv")
check "expert parallel 2 = --grad-accum 2: parameters and controller state after 20 steps" \
    cmp "$TMP/ep2/model.bin" "$TMP/accum2/model.bin"
check "expert parallel 2 = --grad-accum 2: optimizer moments after 20 steps" \
    cmp <(payload "$TMP/ep2/state_00000020.bin") <(payload "$TMP/accum2/state_00000020.bin")
check "expert parallel: the run reports its bytes sent and the load of every layer across ranks" \
    grep -q "layer 1: expert rows per rank of a group, max/mean" "$TMP/ep2.log"
# Each rank holds the shared parameters and W1, W3, W2 of its own E/G experts only (with their
# gradients and AdamW moments), as every rank reports; rank 0 gathers the experts into the one file.
# holds LOG RANKS EXPERTS: every rank of LOG holds shared + EXPERTS experts' parameters, no more
holds() {
    awk -v ranks="$2" -v experts="$3" '/^memory: rank/ { n++; if ($5 != $8 + experts * $16 || $11 != experts) bad = 1 }
        END { exit !(n == ranks && !bad) }' "$1"
}
check "expert parallel 2: each rank holds the shared parameters and 4 of the 8 experts (and their moments)" \
    holds "$TMP/ep2.log" 2 4
check "expert parallel 2 = --grad-accum 2: the checkpoint of step 20, byte for byte (rank 0 gathers the experts)" \
    cmp "$TMP/ep2/model_00000020.bin" "$TMP/accum2/model_00000020.bin"
# Sampling runs on every rank of the group, each computing its experts: the same text as one process.
SAMPLE=("${RUN[@]}" --steps 10 --sample-tokens 24 --sample-every 5)
"${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${SAMPLE[@]}" --threads 1 --expert-parallel 2 --out "$TMP/ep2_sample" \
    > "$TMP/ep2_sample.log" 2>&1
"$TRAIN" "${SAMPLE[@]}" --threads 2 --grad-accum 2 --out "$TMP/one_sample" > "$TMP/one_sample.log" 2>&1
samples() { sed -n '/^--- sample/,/^---$/p' "$1"; }
check "expert parallel 2: the samples during and after training = one process's (--grad-accum 2)" \
    cmp <(samples "$TMP/ep2_sample.log") <(samples "$TMP/one_sample.log")
check "... and there are 3 of them" test "$(samples "$TMP/ep2_sample.log" | grep -c '^--- sample')" -eq 3
# 4 ranks as 2 groups of 2: sums run within a group, then over the groups, (g0 + g1) + (g2 + g3),
# which is what 2 ranks of 2 micro-batches each add.
"${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${RUN[@]}" --steps 6 --threads 1 --grad-accum 2 --out "$TMP/dp2accum2" \
    > /dev/null 2>&1
check "expert parallel: 4 ranks as 2 data-parallel x 2 expert-parallel, 6 steps, ranks checked" \
    "${MPIRUN[@]}" -np 4 "$TRAIN_MPI" "${RUN[@]}" --steps 6 --threads 1 --check-ranks 1 --expert-parallel 2 \
    --out "$TMP/ep2x2"
cp "$TMP/last.log" "$TMP/ep2x2.log"
check "expert parallel 2 x 2: each of the 4 ranks holds 4 of the 8 experts" holds "$TMP/ep2x2.log" 4 4
check "2 x 2 = 2 ranks of --grad-accum 2: every step's log" \
    cmp <(measured "$TMP/ep2x2/log.csv") <(measured "$TMP/dp2accum2/log.csv")
check "2 x 2 = 2 ranks of --grad-accum 2: parameters and controller state" \
    cmp "$TMP/ep2x2/model.bin" "$TMP/dp2accum2/model.bin"
"${MPIRUN[@]}" -np 4 "$TRAIN_MPI" "${RUN[@]}" --steps 6 --threads 1 --expert-parallel 4 --out "$TMP/ep4" \
    > "$TMP/ep4.log" 2>&1
check "4 ranks with --expert-parallel 4 = --grad-accum 4: parameters and controller state" \
    cmp "$TMP/ep4/model.bin" "$TMP/accum4/model.bin"
check "4 ranks with --expert-parallel 4 = --grad-accum 4: optimizer moments (gathered from 4 ranks)" \
    cmp <(payload "$TMP/ep4/state_00000006.bin") <(payload "$TMP/accum4/state_00000006.bin")
check "expert parallel 4: each rank holds the shared parameters and 2 of the 8 experts" holds "$TMP/ep4.log" 4 2

# resume, and checkpoints across layouts: the checkpoint is the one file rank 0 writes, every rank
# holding the whole model, so it continues in any layout; in one that adds in the same order it
# continues bit for bit.
EP=("${SPLIT[@]}" --expert-parallel 2)
"${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${EP[@]}" --out "$TMP/ep_straight" > /dev/null 2>&1
"${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${EP[@]}" --out "$TMP/ep_split" --stop-at 6 > /dev/null 2>&1
cp -r "$TMP/ep_split" "$TMP/ep_split_one"
check "expert parallel: resumed on 2 ranks from step 6 to 12" \
    "${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${EP[@]}" --out "$TMP/ep_split" --resume "$TMP/ep_split"
check "expert parallel resume: identical log, parameters, controller and training state" \
    cmp <(measured "$TMP/ep_straight/log.csv"; cat "$TMP/ep_straight/model.bin" "$TMP/ep_straight/state_00000012.bin") \
        <(measured "$TMP/ep_split/log.csv"; cat "$TMP/ep_split/model.bin" "$TMP/ep_split/state_00000012.bin")
check "an expert-parallel checkpoint continues in 1 process (--expert-parallel 1 --grad-accum 2)" \
    "$TRAIN" "${SPLIT[@]}" --expert-parallel 1 --grad-accum 2 --threads 2 --out "$TMP/ep_split_one" \
    --resume "$TMP/ep_split_one"
check "... bit for bit as the expert-parallel run: parameters and controller state" \
    cmp "$TMP/ep_straight/model.bin" "$TMP/ep_split_one/model.bin"
"$TRAIN" "${SPLIT[@]}" --grad-accum 2 --out "$TMP/one_split" --stop-at 6 > /dev/null 2>&1
check "a 1-process checkpoint continues on 2 ranks with --expert-parallel 2 (--grad-accum 1: not the saved 2)" \
    "${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${EP[@]}" --grad-accum 1 --out "$TMP/one_split" --resume "$TMP/one_split"
check "... bit for bit as the expert-parallel run: parameters and controller state" \
    cmp "$TMP/ep_straight/model.bin" "$TMP/one_split/model.bin"
# each rank of --expert-parallel 4 reads its 2 experts' parameters and moments of a 1-process file
"$TRAIN" "${SPLIT[@]}" --grad-accum 4 --out "$TMP/accum4_straight" > /dev/null 2>&1
"$TRAIN" "${SPLIT[@]}" --grad-accum 4 --out "$TMP/accum4_split" --stop-at 6 > /dev/null 2>&1
check "a 1-process checkpoint (--grad-accum 4) continues on 4 ranks with --expert-parallel 4, ranks checked" \
    "${MPIRUN[@]}" -np 4 "$TRAIN_MPI" "${SPLIT[@]}" --expert-parallel 4 --grad-accum 1 --check-ranks 1 \
    --out "$TMP/accum4_split" --resume "$TMP/accum4_split"
check "... bit for bit as the 1-process run: parameters, controller and optimizer moments" \
    cmp <(cat "$TMP/accum4_straight/model.bin"; payload "$TMP/accum4_straight/state_00000012.bin") \
        <(cat "$TMP/accum4_split/model.bin"; payload "$TMP/accum4_split/state_00000012.bin")

refuses "expert parallel: experts that do not split over the group" "does not divide the model's 8 experts" \
    "${MPIRUN[@]}" -np 3 "$TRAIN_MPI" "${RUN[@]}" --batch 6 --expert-parallel 3 --steps 1 --out "$TMP/odd"
refuses "expert parallel: ranks that do not split into groups" "--expert-parallel 4 does not divide the 2 rank(s)" \
    "${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${RUN[@]}" --expert-parallel 4 --steps 1 --out "$TMP/odd"
refuses "expert parallel in the single-process build" "--expert-parallel 2 does not divide the 1 rank(s)" \
    "$TRAIN" "${RUN[@]}" --expert-parallel 2 --steps 1 --out "$TMP/odd"

# a rank that dies: the job ends with mpirun's message naming it, and what is on disk is complete
"${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${RUN[@]}" --steps 100000 --eval-every 0 --checkpoint-every 1 --threads 1 \
    --out "$TMP/killed" > "$TMP/killed.log" 2>&1 &
launcher=$!
for _ in $(seq 100); do  # until 3 steps are logged
    [[ -e $TMP/killed/log.csv && $(wc -l < "$TMP/killed/log.csv") -gt 3 ]] && break
    sleep 0.1
done
for pid in $(pgrep -P "$launcher"); do  # the rank-1 process among mpirun's children
    if tr '\0' '\n' < "/proc/$pid/environ" 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=1"; then
        kill -9 "$pid"
    fi
done
wait "$launcher"
status=$?
check "killed rank: the job ends with a non-zero status ($status)" test "$status" -ne 0
check "killed rank: the message names the rank and the signal" grep -q "rank 1 .*signal 9" "$TMP/killed.log"
last=$(ls "$TMP/killed"/state_*.bin 2> /dev/null | tail -1)
step=$(basename "$last" .bin | sed 's/state_0*//')
size_ok=1
for f in "$TMP/killed"/model_*.bin "$TMP/killed/model.bin"; do
    [[ $(stat -c %s "$f") -eq $(stat -c %s "$TMP/ranks2/model.bin") ]] || size_ok=0
done
for f in "$TMP/killed"/state_*.bin; do
    [[ $(stat -c %s "$f") -eq $(stat -c %s "$TMP/ranks2/state_00000020.bin") ]] || size_ok=0
done
check "killed rank: every checkpoint under its real name is complete (step $step)" test "$size_ok" -eq 1
check "killed rank: every row of log.csv is complete" \
    awk -F, 'NR == 1 { n = NF } NF != n { exit 1 }' "$TMP/killed/log.csv"
check "killed rank: the run resumes from its last checkpoint on 2 ranks" \
    "${MPIRUN[@]}" -np 2 "$TRAIN_MPI" "${RUN[@]}" --steps 100000 --stop-at $((step + 2)) --eval-every 0 \
    --checkpoint-every 1 --threads 1 --out "$TMP/killed" --resume "$TMP/killed"

finish
