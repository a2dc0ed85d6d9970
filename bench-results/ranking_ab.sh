#!/usr/bin/env bash
# The Evaluator before and after the ranking change (one integer key per candidate, direct
# counts for R ≤ 8), interleaved: ROUNDS rounds of each configuration, the order
# alternating, one thread each. BEFORE and AFTER are bench binaries built at the two
# commits (cargo build --release --example bench, copied aside).
# usage: bash bench-results/ranking_ab.sh BEFORE AFTER [ROUNDS] >> bench-results/ranking_DATE.jsonl
set -u
before=${1:?bench binary before}; after=${2:?bench binary after}; rounds=${3:-3}
configs=("--items 10000 --classes 100" "--items 100000 --classes 50000 --eval-queries 300")
for round in $(seq 1 "$rounds"); do
    for config in "${configs[@]}"; do
        if (( round % 2 )); then order="before after"; else order="after before"; fi
        for side in $order; do
            bin=$before; [[ $side == after ]] && bin=$after
            # shellcheck disable=SC2086
            RAYON_NUM_THREADS=1 "$bin" --evaluator $config --runs 3 2>/dev/null \
                | grep '"workload":"evaluator"' | tail -1 \
                | sed "s/^{/{\"side\":\"$side\",\"round\":$round,\"config\":\"$config\",\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",/"
        done
    done
done
