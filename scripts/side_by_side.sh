#!/usr/bin/env bash
# Runs Quaterion's benchmarks and ours back to back, interleaved workload by workload
# (Quaterion first), then the FAQ task end to end for 500 epochs on both sides, and
# writes the raw JSON lines to bench-results/ under TAG. Tables:
#   python3 bench-results/side_by_side.py TAG --interleaved
#
#   QBENCH=DIR bash scripts/side_by_side.sh TAG
#
# QBENCH: a directory holding Quaterion's bench.py and its virtual environment `venv/`
# (set up as ../shared/bench/quaterion/README.md says, plus transformers==4.30.2 for the
# FAQ script). Needs target/models/all-MiniLM-L6-v2 (scripts/fetch-minilm.sh) and an idle
# machine: about 20 minutes.
set -euo pipefail
TAG=${1:?usage: QBENCH=DIR bash scripts/side_by_side.sh TAG}
QBENCH=${QBENCH:?set QBENCH to the directory with Quaterion bench.py and venv/}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
R=$ROOT/bench-results
LOG=$R/side_by_side_$TAG.log
Q=$QBENCH/venv/bin/python
if compgen -G "$R/*_${TAG}.*" > /dev/null; then
  echo "bench-results already has files for tag $TAG; pick another tag" >&2
  exit 1
fi
cargo build --release --features transformers --example bench --manifest-path "$ROOT/Cargo.toml"
B=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 CANDLE_NUM_THREADS=1
date -u +"start %FT%TZ" > "$LOG"
for w in w1 w3 w2; do
  case $w in
    w1) qflags=(--w1 --w1-cache auto) ;;
    w3) qflags=(--w3-active) ;;
    *) qflags=(--$w) ;;
  esac
  (cd "$QBENCH" && "$Q" bench.py "${qflags[@]}" --out "$R/quaterion_$TAG.jsonl" >/dev/null 2>>"$LOG")
  date -u +"quaterion $w done %FT%TZ" >> "$LOG"
  (cd "$ROOT" && "$B" --$w --runs 3 >> "$R/ours_$TAG.jsonl" 2>>"$LOG")
  date -u +"ours $w done %FT%TZ" >> "$LOG"
done
(cd "$QBENCH" && "$Q" bench.py --w4 --out "$R/quaterion_$TAG.jsonl" >/dev/null 2>>"$LOG")
date -u +"quaterion w4 done %FT%TZ" >> "$LOG"
(cd "$ROOT" && "$B" --w4 >> "$R/ours_w4_$TAG.jsonl" 2>>"$LOG")
date -u +"ours w4 done %FT%TZ" >> "$LOG"
(cd "$ROOT" && "$Q" scripts/quaterion_faq.py --model target/models/all-MiniLM-L6-v2 --epochs 500 2>/dev/null \
  | grep '^{' > "$R/quaterion_faq_500_$TAG.jsonl")
date -u +"quaterion faq done %FT%TZ" >> "$LOG"
(cd "$ROOT" && "$B" --faq target/models/all-MiniLM-L6-v2 --epochs 500 > "$R/ours_faq_500_$TAG.jsonl" 2>>"$LOG")
date -u +"all done %FT%TZ" >> "$LOG"
