#!/usr/bin/env bash
# Prepares the GPU check on this (GPU-less) machine, so that a session lent a GPU machine
# spends its minutes running, not building:
#
#   bash scripts/gpu-check.sh            # builds, bundles, prints the command to run there
#
# It builds in release with `--features cuda,nccl,transformers` every integration-test binary and the
# bench example (the GPU machine has the NVIDIA driver and the CUDA 13 runtime libraries,
# but no Rust toolchain), strips them and packs them with a runner into
# target/gpu-check/bundle.tar.xz (it must stay under the 64 MiB a run carries). On the GPU
# machine, `target/gpu-check/run.sh RESULTS` unpacks the bundle and writes into RESULTS:
#
#   suite-<test>.log     every integration test with SIMILARITY_TEST_DEVICE=cuda (the
#                        fused CPU kernels stay on the CPU; the composite forms run on
#                        the GPU and are checked against the same expectations)
#   nccl.log             the NCCL world-size-1 check (tests/nccl.rs)
#   bench-w1.log         the cached-epoch workload W1 on the GPU (one JSON line)
#   status.txt           one line per step: name, exit code, seconds
#
#   faq-ours-N.log       with the model there (below): the FAQ task with all-MiniLM-L6-v2
#   faq-st-N.log         on the GPU, ours (`bench --faq DIR --device cuda`) and
#                        sentence-transformers' (scripts/st_faq.py), interleaved, twice
#
# all-MiniLM-L6-v2 (90 MB) is more than one run carries, so the model directory travels
# in pieces: target/gpu-faq-1/ … target/gpu-faq-K/ (each under 48 MiB), carried by
# consecutive runs while the machine stays warm (a warm machine keeps what earlier runs
# carried); run.sh reassembles them when all are there.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/cuda-toolkit.sh >/dev/null
# shellcheck disable=SC1091
source target/cuda-13.0/env.sh

out=target/gpu-check
rm -rf "$out"
mkdir -p "$out/bundle/bin"

features=cuda,nccl,transformers
# Test binaries: cargo prints each one's path as a JSON message.
cargo test --release -p similarity-core --features "$features" --no-run \
    --message-format=json-render-diagnostics >"$out/build.jsonl"
python3 - "$out/build.jsonl" "$out/bundle/bin" <<'EOF'
import json, shutil, sys, os
seen = set()
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") != "compiler-artifact" or not exe or not m.get("profile", {}).get("test"):
        continue
    name = m["target"]["name"]
    kinds = m["target"]["kind"]
    if "test" not in kinds or name in seen:
        continue
    seen.add(name)
    shutil.copy(exe, os.path.join(sys.argv[2], "test-" + name))
print(f"{len(seen)} test binaries")
EOF
cargo build --release -p similarity-core --features "$features" --example bench
cp target/release/examples/bench "$out/bundle/bin/bench"
strip "$out"/bundle/bin/*

cat >"$out/bundle/run-inside.sh" <<'EOF'
#!/usr/bin/env bash
# Runs inside the unpacked bundle on the GPU machine; $1: the results folder.
set -uo pipefail
results="$1"
mkdir -p "$results"
here="$(cd "$(dirname "$0")" && pwd)"
nvidia-smi >"$results/nvidia-smi.txt" 2>&1 || true
step() {
    local name="$1"; shift
    local start=$SECONDS
    "$@" >"$results/$name.log" 2>&1
    echo "$name $? $((SECONDS - start))s" | tee -a "$results/status.txt"
}
export SIMILARITY_TEST_DEVICE=cuda
for t in "$here"/bin/test-*; do
    name="$(basename "$t")"
    case "$name" in
        test-nccl) step nccl "$t" --test-threads 1 ;;
        test-transformer)
            if [[ -n "${SIMILARITY_FAQ_MODEL:-}" ]]; then
                SIMILARITY_MINILM_DIR="$SIMILARITY_FAQ_MODEL" step suite-transformer "$t" --test-threads 1
            fi ;;
        # Child processes and subprocess kill loops: CPU-only by design.
        test-faults|test-macro_ui) ;;
        *) step "suite-${name#test-}" "$t" --test-threads 1 ;;
    esac
done
step bench-w1 "$here/bin/bench" --only w1_cached --device cuda
if [[ -n "${SIMILARITY_FAQ_MODEL:-}" ]]; then
    for round in 1 2; do
        step "faq-ours-$round" "$here/bin/bench" --only faq --faq "$SIMILARITY_FAQ_MODEL" --epochs 500 --device cuda
        step "faq-st-$round" python3 "$SIMILARITY_REPO_ROOT/scripts/st_faq.py" --model "$SIMILARITY_FAQ_MODEL" --device cuda --epochs 500
    done
fi
EOF
chmod +x "$out/bundle/run-inside.sh"
# The repository's data and parity files travel with the working tree; run.sh starts
# from the repository root and points the tests at it (SIMILARITY_REPO_ROOT).
# A dictionary larger than one binary: the test binaries share most of their bytes (the
# CUDA kernels Candle embeds), so the archive holds them about once (~24 MiB).
tar -C "$out/bundle" -cf - . | xz -T0 --lzma2=preset=6,dict=256MiB >"$out/bundle.tar.xz"
rm -rf target/gpu-faq-*
if [[ -f target/models/all-MiniLM-L6-v2/model.safetensors ]]; then
    mkdir -p target/gpu-faq-split
    tar -C target/models -cf - all-MiniLM-L6-v2 | split -b 48m -d - target/gpu-faq-split/piece-
    i=0
    for piece in target/gpu-faq-split/piece-*; do
        i=$((i + 1))
        mkdir -p "target/gpu-faq-$i"
        mv "$piece" "target/gpu-faq-$i/"
    done
    rmdir target/gpu-faq-split
    echo "$i" >target/gpu-check/faq-pieces
fi
size=$(stat -c %s "$out/bundle.tar.xz")
cat >"$out/run.sh" <<'EOF'
#!/usr/bin/env bash
# On the GPU machine, from the repository root: bash target/gpu-check/run.sh RESULTS
set -euo pipefail
results="${1:?results folder}"
# The tests read the repository's data and parity files from here.
export SIMILARITY_REPO_ROOT="$PWD"
dir="$(mktemp -d)"
tar -C "$dir" -xJf target/gpu-check/bundle.tar.xz
if [[ -f target/gpu-check/faq-pieces ]]; then
    want=$(cat target/gpu-check/faq-pieces)
    have=$(ls -d target/gpu-faq-* 2>/dev/null | wc -l)
    if [[ "$have" == "$want" ]]; then
        mkdir -p "$dir/models"
        cat target/gpu-faq-*/piece-* | tar -C "$dir/models" -xf -
        export SIMILARITY_FAQ_MODEL="$dir/models/all-MiniLM-L6-v2"
    else
        echo "FAQ model: $have of $want pieces here; the FAQ runs are skipped"
    fi
fi
bash "$dir/run-inside.sh" "$results"
EOF
echo "bundle: $out/bundle.tar.xz ($((size / 1048576)) MiB, limit 64)"
if ((size >= 64 * 1048576)); then
    echo "the bundle is over the 64 MiB a GPU run carries" >&2
    exit 1
fi
echo "On the GPU machine (device tool): run 'true' carrying target/gpu-faq-1, then each"
echo "further target/gpu-faq-N likewise (back to back, while the machine is warm), then,"
echo "carrying target/gpu-check:"
echo '  bash target/gpu-check/run.sh "$OUT/gpu-check"'
echo "(without the target/gpu-faq-* runs, everything but the FAQ task runs)"
