#!/usr/bin/env bash
# W4 (every loss, forward + backward on 1024 × 384) side by side with the PyTorch
# implementations, interleaved: ROUNDS rounds, each running our bench --w4 and
# scripts/w4_torch.py back to back, the order alternating (ours first in odd rounds).
# Raw lines go to bench-results/w4_ours_TAG.jsonl and w4_torch_TAG.jsonl (each line
# carries its round and /proc/loadavg), the run order to w4_TAG.log. Table:
#   python3 bench-results/w4_table.py TAG
#
#   QVENV=/path/to/venv [THREADS=2] [INTERLEAVE=round|loss] [MAX_LOAD=L] \
#       bash scripts/w4_side_by_side.sh TAG [ROUNDS]
#
# INTERLEAVE (default round): `round` runs every loss of one side, then every loss of the
# other; `loss` runs each loss on both sides back to back (one process per loss and side,
# the order alternating by round and by loss), so that the two timings of a loss are
# seconds apart and see the same load on a shared machine.
# MAX_LOAD (default unset): before each timing, wait (up to 180 s, then go on and log it)
# until the 1-minute load average is below L.
#
# THREADS (default 2): threads of both sides (ours: RAYON_NUM_THREADS; PyTorch:
# torch.set_num_threads, OMP_NUM_THREADS and MKL_NUM_THREADS). On a loaded machine 1 is
# the fairer setting: under a load average of 4 to 9 the 2-thread PyTorch figures came
# out 4 to 47 times their idle values (BENCHMARKS.md, W4 of 2026-12-01).
#
# QVENV: a virtual environment with Quaterion 0.1.35, torch 2.0.1 and
# pytorch-metric-learning 2.9.0 (../shared/bench/quaterion/README.md, plus
# `pip install --ignore-requires-python "scipy<1.16" "scikit-learn<1.8"
# pytorch-metric-learning==2.9.0`).
set -euo pipefail
TAG=${1:?usage: QVENV=DIR bash scripts/w4_side_by_side.sh TAG [ROUNDS]}
ROUNDS=${2:-3}
QVENV=${QVENV:?set QVENV to the virtual environment with quaterion and pytorch-metric-learning}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
R=$ROOT/bench-results
LOG=$R/w4_$TAG.log
if compgen -G "$R/w4_*_${TAG}.jsonl" > /dev/null; then
  echo "bench-results already has W4 files for tag $TAG; pick another tag" >&2
  exit 1
fi
# BENCH_BIN: a bench binary built already (scripts/full_side_by_side.sh passes the one it
# built with the `transformers` feature); otherwise built here.
if [[ -n ${BENCH_BIN:-} ]]; then
  B=$BENCH_BIN
else
  cargo build --release --example bench --manifest-path "$ROOT/Cargo.toml"
  B=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench
fi
THREADS=${THREADS:-2}
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 CANDLE_NUM_THREADS=1
INTERLEAVE=${INTERLEAVE:-round}
# The losses of W4 (bench --w4-only NAME; scripts/w4_torch.py --only NAME, which has no
# TripletLoss_semi_hard at 1024).
LOSSES="TripletLoss_hard TripletLoss_semi_hard TripletLoss_semi_hard_b128 TripletLoss_all_b256
ContrastiveLoss MultipleNegativesRankingLoss OnlineContrastiveLoss_hard OnlineContrastiveLoss_all
ArcFaceLoss CosFaceLoss SoftmaxLoss CenterLoss CircleLoss CircleLoss_per_anchor FastAPLoss
MultiSimilarityLoss SupConLoss CombinedLoss_TripletHard_Center"
wait_load() {
  [[ -n ${MAX_LOAD:-} ]] || return 0
  local waited=0
  while awk -v m="$MAX_LOAD" '{exit !($1 >= m)}' /proc/loadavg && (( waited < 180 )); do
    sleep 5; waited=$((waited + 5))
  done
  (( waited == 0 )) || echo "waited ${waited}s for load below $MAX_LOAD: $(cat /proc/loadavg)" >> "$LOG"
}
# ours ROUND [NAME]: every loss, or NAME only.
ours() {
  wait_load
  local only=()
  [[ -n ${2:-} ]] && only=(--w4-only "$2")
  RAYON_NUM_THREADS=$THREADS "$B" --w4 "${only[@]}" 2>>"$LOG" | grep '"w4_loss"' | sed "s/^{/{\"round\":$1,/" >> "$R/w4_ours_$TAG.jsonl"
  echo "ours round $1 ${2:-all} done $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg)" >> "$LOG"
}
torch() {
  [[ ${2:-} == TripletLoss_semi_hard ]] && return 0
  wait_load
  local only=()
  [[ -n ${2:-} ]] && only=(--only "$2")
  OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS \
    "$QVENV/bin/python" "$ROOT/scripts/w4_torch.py" --threads "$THREADS" "${only[@]}" 2>>"$LOG" \
    | sed "s/^{/{\"round\":$1,/" >> "$R/w4_torch_$TAG.jsonl"
  echo "torch round $1 ${2:-all} done $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg)" >> "$LOG"
}
echo "start $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg) commit $(git -C "$ROOT" rev-parse --short HEAD) threads $THREADS interleave $INTERLEAVE max_load ${MAX_LOAD:-none}" > "$LOG"
for r in $(seq 1 "$ROUNDS"); do
  if [[ $INTERLEAVE == loss ]]; then
    i=0
    for l in $LOSSES; do
      if (( (r + i) % 2 )); then ours "$r" "$l"; torch "$r" "$l"; else torch "$r" "$l"; ours "$r" "$l"; fi
      i=$((i + 1))
    done
  elif (( r % 2 )); then ours "$r"; torch "$r"; else torch "$r"; ours "$r"; fi
done
echo "all done $(date -u +%FT%TZ)" >> "$LOG"
