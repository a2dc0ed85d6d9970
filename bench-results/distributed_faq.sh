#!/usr/bin/env bash
# The FAQ main job alone, as rank 0 of 1, and on 2 MPI ranks (one thread each), interleaved.
# usage: bash bench-results/distributed_faq.sh FAQ_BINARY >> bench-results/distributed_faq_DATE.log
set -u
bin=${1:?the faq example built with --features mpi}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for round in 1 2 3; do
    for mode in plain np1 np2; do
        case $mode in
            plain) cmd="$bin" ;;
            np1) cmd="mpirun --oversubscribe -np 1 $bin --mpi" ;;
            np2) cmd="mpirun --oversubscribe -np 2 -x RAYON_NUM_THREADS=1 $bin --mpi" ;;
        esac
        echo "=== round $round $mode loadavg $(cat /proc/loadavg)"
        echo "\$ $cmd"
        start=$(date +%s.%N)
        timeout 300 $cmd 2>/dev/null | grep -E "after|before|cache fill|total|ranks"
        echo "wall $(echo "$(date +%s.%N) - $start" | bc) s"
    done
done
