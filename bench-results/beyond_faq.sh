#!/usr/bin/env bash
# The FAQ task's variants of docs/beyond.md, one after another, each with its command and
# /proc/loadavg: the main job (which also scores the served prefix sizes and the int8 and
# binary codes), Matryoshka, mined hard negatives for MNRL, and TripletLoss over the pairs
# as groups with and without mined negatives.
# usage: cargo build --release --example faq &&
#        bash bench-results/beyond_faq.sh target/release/examples/faq >> bench-results/beyond_faq_DATE.log
set -u
bin=${1:?the faq example, built with --release}
for args in "" "--matryoshka" "--hard-negatives 1" "--hard-negatives 4" \
            "--triplet" "--triplet --hard-negatives 1" "--triplet --hard-negatives 4"; do
    echo "=== $(date -u +%FT%TZ) loadavg $(cat /proc/loadavg)"
    echo "\$ faq $args"
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    timeout 1200 "$bin" $args --out target/beyond-faq-model --logs target/beyond-faq-logs 2>/dev/null \
        | grep -E "before|after|served at|float32|int8|binary|hard negatives|cache fill|triplet|total"
    echo "wall $(echo "$(date +%s.%N) - $start" | bc) s"
done
