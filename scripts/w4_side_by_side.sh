#!/usr/bin/env bash
# W4 (every loss, forward + backward on 1024 × 384) side by side with the PyTorch
# implementations, interleaved: ROUNDS rounds, each running our bench --w4 and
# scripts/w4_torch.py back to back, the order alternating (ours first in odd rounds).
# Raw lines go to bench-results/w4_ours_TAG.jsonl and w4_torch_TAG.jsonl (each line
# carries its round and /proc/loadavg), the run order to w4_TAG.log. Table:
#   python3 bench-results/w4_table.py TAG
#
#   QVENV=/path/to/venv [THREADS=2] bash scripts/w4_side_by_side.sh TAG [ROUNDS]
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
cargo build --release --example bench --manifest-path "$ROOT/Cargo.toml"
B=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench
THREADS=${THREADS:-2}
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 CANDLE_NUM_THREADS=1
ours() {
  RAYON_NUM_THREADS=$THREADS "$B" --w4 2>>"$LOG" | grep '"w4_loss"' | sed "s/^{/{\"round\":$1,/" >> "$R/w4_ours_$TAG.jsonl"
  echo "ours round $1 done $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg)" >> "$LOG"
}
torch() {
  OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS \
    "$QVENV/bin/python" "$ROOT/scripts/w4_torch.py" --threads "$THREADS" 2>>"$LOG" \
    | sed "s/^{/{\"round\":$1,/" >> "$R/w4_torch_$TAG.jsonl"
  echo "torch round $1 done $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg)" >> "$LOG"
}
echo "start $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg) commit $(git -C "$ROOT" rev-parse --short HEAD) threads $THREADS" > "$LOG"
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then ours "$r"; torch "$r"; else torch "$r"; ours "$r"; fi
done
echo "all done $(date -u +%FT%TZ)" >> "$LOG"
