#!/usr/bin/env bash
# Everything BENCHMARKS.md's first section reports, in one sequence on one machine: W1 to
# W3 against Quaterion, W4 against Quaterion and pytorch-metric-learning, the size sweeps,
# and the FAQ task (all-MiniLM-L6-v2, 500 epochs) against Quaterion, with quality over
# several seeds at the same loss sharpness. Meant for an idle machine: every raw line
# records the load it saw, and nothing else should run meanwhile (about 80 minutes).
#
#   QVENV=venv-dir [QBENCH=path/to/bench.py] [THREADS=2] bash scripts/full_side_by_side.sh TAG
#
# QVENV: the Quaterion 0.1.35 environment of ../shared/bench/quaterion/README.md plus
# `pip install --ignore-requires-python "scipy<1.16" "scikit-learn<1.8"
# pytorch-metric-learning==2.9.0 transformers==4.30.2`. QBENCH: Quaterion's bench.py
# (default ../shared/bench/quaterion/bench.py next to the repository). THREADS: threads
# of both sides throughout (ours RAYON_NUM_THREADS, PyTorch torch.set_num_threads).
# Needs target/models/all-MiniLM-L6-v2 (scripts/fetch-minilm.sh).
#
# Steps and raw files (bench-results/, all named by TAG):
# 1. W1 cached, W3 (XBM from the first step), W2: Quaterion's bench.py, then ours (3 runs),
#    workload by workload: quaterion_TAG.jsonl, ours_TAG.jsonl.
# 2. W4, each loss back to back on both sides, 2 rounds (scripts/w4_side_by_side.sh with
#    INTERLEAVE=loss): w4_{ours,torch}_TAG-w4.jsonl, w4_TAG-w4.log.
# 3. The size sweeps (scripts/sweeps.sh, Quaterion at 100,000 items):
#    sweep_TAG-sweep.jsonl, sweep_quaterion_TAG-sweep.jsonl, sweep_TAG-sweep.log.
# 4. The FAQ task: ours with one thread (the floor's own setting, see BENCHMARKS.md), then
#    alternating with Quaterion at THREADS: ours at scale 20 (our examples' recipe), then
#    Quaterion without and with the tutorial's attached metrics (seeds 42 and 43), ours at
#    scale 10 (Quaterion's sharpness) with seeds 0, 1 and 2: faq_ours_TAG.jsonl (each line
#    tagged with its threads), faq_quaterion_TAG.jsonl.
# The order of everything, with /proc/loadavg at each step: full_TAG.log.
# Tables: python3 bench-results/full_table.py TAG
set -euo pipefail
TAG=${1:?usage: QVENV=DIR bash scripts/full_side_by_side.sh TAG}
QVENV=${QVENV:?set QVENV to the virtual environment with quaterion and pytorch-metric-learning}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
QBENCH=${QBENCH:-$ROOT/../shared/bench/quaterion/bench.py}
THREADS=${THREADS:-2}
R=$ROOT/bench-results
LOG=$R/full_$TAG.log
# Relative to the repository root, where every FAQ command runs: the raw lines record it.
MODEL=target/models/all-MiniLM-L6-v2
if compgen -G "$R/*_${TAG}*" > /dev/null; then
  echo "bench-results already has files for tag $TAG; pick another tag" >&2
  exit 1
fi
[[ -s $ROOT/$MODEL/model.safetensors ]] || { echo "no model in $ROOT/$MODEL: bash scripts/fetch-minilm.sh" >&2; exit 1; }
[[ -f $QBENCH ]] || { echo "no Quaterion bench.py at $QBENCH: set QBENCH" >&2; exit 1; }
cargo build --release --features transformers --example bench --manifest-path "$ROOT/Cargo.toml"
B=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench
export BENCH_BIN=$B QVENV THREADS QBENCH
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 CANDLE_NUM_THREADS=1
Q=$QVENV/bin/python
step() { echo "$1 $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg)" >> "$LOG"; }
echo "start $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg) commit $(git -C "$ROOT" rev-parse --short HEAD) threads $THREADS" > "$LOG"

# 1. W1 to W3.
for w in w1 w3 w2; do
  case $w in
    w1) qflags=(--w1 --w1-cache auto); oflags=(--w1-cached) ;;
    w3) qflags=(--w3-active); oflags=(--w3) ;;
    *) qflags=(--w2); oflags=(--w2) ;;
  esac
  (cd "$(dirname "$QBENCH")" && OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS \
    "$Q" "$QBENCH" "${qflags[@]}" --threads "$THREADS" --out "$R/quaterion_$TAG.jsonl" \
    >/dev/null 2>>"$LOG")
  step "quaterion $w done"
  (cd "$ROOT" && RAYON_NUM_THREADS=$THREADS "$B" "${oflags[@]}" --runs 3 >> "$R/ours_$TAG.jsonl" 2>>"$LOG")
  step "ours $w done"
done

# 2. W4, every loss on both sides back to back.
INTERLEAVE=loss bash "$ROOT/scripts/w4_side_by_side.sh" "$TAG-w4" 2
step "w4 done"

# 3. The size sweeps.
EVAL_1M_QUERIES=1000 bash "$ROOT/scripts/sweeps.sh" "$TAG-sweep"
step "sweeps done"

# 4. The FAQ task.
ours_faq() { # THREADS_OF_THIS_RUN SCALE SEED
  (cd "$ROOT" && RAYON_NUM_THREADS=$1 "$B" --faq "$MODEL" --epochs 500 --scale "$2" --seed "$3" \
    2>>"$LOG" | sed "s/^{/{\"threads_env\":$1,/" >> "$R/faq_ours_$TAG.jsonl")
  step "ours faq threads $1 scale $2 seed $3 done"
}
quaterion_faq() { # SEED [--tutorial-metrics]
  (cd "$ROOT" && OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS "$Q" scripts/quaterion_faq.py \
    --model "$MODEL" --epochs 500 --threads "$THREADS" --seed "$@" \
    2> >(sed "s|$QVENV/|venv-dir/|g" >> "$LOG.quaterion-stderr") \
    | grep '^{' >> "$R/faq_quaterion_$TAG.jsonl")
  step "quaterion faq seed $* done"
}
ours_faq 1 20 0
ours_faq "$THREADS" 20 0
quaterion_faq 42
ours_faq "$THREADS" 10 0
quaterion_faq 43 --tutorial-metrics
ours_faq "$THREADS" 10 1
ours_faq "$THREADS" 10 2
echo "all done $(date -u +%FT%TZ)" >> "$LOG"
