#!/usr/bin/env bash
# How cost grows with the work (issue 18): our bench over a range of sizes, each point with
# its ratio to the matmul floor measured at the start of the same bench invocation, and
# Quaterion at the 100k point of W1.
#
#   [QVENV=venv-dir] [QBENCH=path/to/bench.py] [THREADS=N] [MAX_LOAD=L] \
#       bash scripts/sweeps.sh TAG
#   python3 bench-results/plots.py TAG          # (matplotlib) SVGs into docs/plots/
#
# Points (one run each; the epoch counts cap each point's runtime):
# * W1 cached (TripletLoss hard, batch 256): 20,000 and 100,000 items, 3 epochs;
#   1,000,000 items, 2 epochs. Cache fill, mean epoch after the first, peak RSS (which
#   includes the input matrix of items × 512 f32 the frozen encoder reads).
# * Evaluator (precision@1 and R-precision, cosine, 384 wide, 200 items per group): 10,000
#   and 100,000 items with every item a query; 1,000,000 items with a seeded sample of
#   EVAL_1M_QUERIES (default 500) queries, each ranked against all 1,000,000 (every query
#   would be 770 TFLOP of distances alone).
# * W3 (W1 cached + XBM from the first step, 20,000 items): 1,024, 4,096 and 16,384 entries,
#   3 epochs; 65,536 entries, 4 epochs (the memory is full from the fourth epoch; the floor
#   counts the entries each step really meets).
# * Quaterion 0.1.35 (QVENV, its bench.py: QBENCH, default ../shared/bench/quaterion/bench.py
#   next to the repository) W1 cached at 100,000 items, 3 epochs, THREADS threads. Skipped
#   without QVENV.
#
# Ours runs with the settings BENCHMARKS.md recommends (MALLOC_* thresholds,
# CANDLE_NUM_THREADS=1). THREADS (default: unset, the machine's cores; Quaterion 2): the
# threads of both sides (ours: RAYON_NUM_THREADS, which the matmul of the floor uses too).
# On a machine another job keeps half busy, THREADS=1 keeps the floor's matmul and the
# workload on the same single core's worth of time. MAX_LOAD: before each point, wait (up to
# 180 s, then go on and log it) until the 1-minute load average is below L.
# Raw lines: bench-results/sweep_TAG.jsonl
# (every line the bench prints, with "point" added), sweep_quaterion_TAG.jsonl, and the run
# order with /proc/loadavg in sweep_TAG.log.
set -euo pipefail
TAG=${1:?usage: bash scripts/sweeps.sh TAG}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
R=$ROOT/bench-results
OUT=$R/sweep_$TAG.jsonl
LOG=$R/sweep_$TAG.log
if [[ -e $OUT ]]; then
  echo "bench-results already has $OUT; pick another tag" >&2
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
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 CANDLE_NUM_THREADS=1
if [[ -n ${THREADS:-} ]]; then export RAYON_NUM_THREADS=$THREADS; fi
QTHREADS=${THREADS:-2}
EVAL_1M_QUERIES=${EVAL_1M_QUERIES:-500}
echo "start $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg) commit $(git -C "$ROOT" rev-parse --short HEAD) threads ${THREADS:-default} max_load ${MAX_LOAD:-none}" > "$LOG"
wait_load() {
  [[ -n ${MAX_LOAD:-} ]] || return 0
  local waited=0
  while awk -v m="$MAX_LOAD" '{exit !($1 >= m)}' /proc/loadavg && (( waited < 180 )); do
    sleep 5; waited=$((waited + 5))
  done
  (( waited == 0 )) || echo "waited ${waited}s for load below $MAX_LOAD: $(cat /proc/loadavg)" >> "$LOG"
}
# point NAME ARGS...: one bench invocation, its lines tagged with the point's name.
point() {
  local name=$1
  shift
  wait_load
  echo "$name: bench $* (start $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg))" >> "$LOG"
  "$B" --runs 1 "$@" 2>>"$LOG" | sed "s/^{/{\"point\":\"$name\",/" >> "$OUT"
  echo "$name done $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg)" >> "$LOG"
}
point w1_20k --w1-cached --items 20000 --epochs 3
point w1_100k --w1-cached --items 100000 --epochs 3
point w1_1m --w1-cached --items 1000000 --epochs 2
point eval_10k --evaluator --items 10000 --classes 50
point eval_100k --evaluator --items 100000 --classes 500
point eval_1m --evaluator --items 1000000 --classes 5000 --eval-queries "$EVAL_1M_QUERIES"
point xbm_1k --w3 --xbm-size 1024 --epochs 3
point xbm_4k --w3 --xbm-size 4096 --epochs 3
point xbm_16k --w3 --xbm-size 16384 --epochs 3
point xbm_64k --w3 --xbm-size 65536 --epochs 4
if [[ -n ${QVENV:-} ]]; then
  QBENCH=${QBENCH:-$ROOT/../shared/bench/quaterion/bench.py}
  wait_load
  echo "quaterion w1_100k: $(basename "$QBENCH") (start $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg))" >> "$LOG"
  OMP_NUM_THREADS=$QTHREADS MKL_NUM_THREADS=$QTHREADS "$QVENV/bin/python" "$QBENCH" --w1 \
    --w1-cache auto --n-train 100000 --epochs 3 --threads "$QTHREADS" 2>>"$LOG" \
    | grep '^{' | sed 's/^{/{"point":"w1_100k",/' >> "$R/sweep_quaterion_$TAG.jsonl"
  echo "quaterion done $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg)" >> "$LOG"
fi
echo "all done $(date -u +%FT%TZ)" >> "$LOG"
