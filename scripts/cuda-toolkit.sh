#!/usr/bin/env bash
# Installs what the `cuda` and `nccl` features need to BUILD (not to run) on a machine
# without a GPU or a CUDA toolkit: nvcc, the CUDA headers and the libraries the binaries
# link against, all from pinned PyPI wheels, laid out as a CUDA home:
#
#   bash scripts/cuda-toolkit.sh [DIR]     # default DIR: target/cuda-13.0
#   source DIR/env.sh                      # CUDA_HOME, PATH, CUDA_COMPUTE_CAP=90
#   cargo build --features cuda,nccl ...
#
# The toolkit is pinned to CUDA 13.0, the version of the GPU machine's driver (580): PTX
# from a newer nvcc does not load on an older driver. The driver's own library, libcuda,
# ships in no wheel: the binaries link against a stub with its soname (libcuda.so.1)
# that defines the driver API's symbols, and the real driver resolves them at run time,
# as the toolkit's own stubs/libcuda.so does. Idempotent: an existing DIR is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

dest="${1:-target/cuda-13.0}"
wheels="$dest/wheels"
home="$dest/home"

if [[ -x "$home/bin/nvcc" && -e "$home/lib64/libcuda.so" && -e "$dest/env.sh" ]]; then
    echo "CUDA 13.0 build toolkit already in $dest"
    exit 0
fi

pip=(pip)
command -v pip >/dev/null 2>&1 || pip=(python3 -m pip)
rm -rf "$wheels" "$home"
# One install: pip --target skips top-level folders that already exist.
"${pip[@]}" install --quiet --disable-pip-version-check --no-deps --target "$wheels" \
    nvidia-cuda-nvcc==13.0.88 \
    nvidia-nvvm==13.0.88 \
    nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 \
    nvidia-curand==10.4.0.35 \
    nvidia-nccl-cu13==2.30.7

cu="$(cd "$wheels/nvidia/cu13" && pwd)"
nccl="$(cd "$wheels/nvidia/nccl" && pwd)"
mkdir -p "$home/lib64"
ln -s "$cu/bin" "$home/bin"
ln -s "$cu/nvvm" "$home/nvvm"
mkdir -p "$home/include"
for f in "$cu"/include/* "$nccl"/include/*; do
    ln -sf "$f" "$home/include/$(basename "$f")"
done
# Unversioned names for the linker (-lcublas finds libcublas.so).
link() { ln -sf "$1" "$home/lib64/$2"; }
link "$cu/lib/libcublas.so.13" libcublas.so
link "$cu/lib/libcublasLt.so.13" libcublasLt.so
link "$cu/lib/libcurand.so.10" libcurand.so
link "$cu/lib/libnvrtc.so.13" libnvrtc.so
link "$cu/lib/libcudart.so.13" libcudart.so
link "$nccl/lib/libnccl.so.2" libnccl.so

# The driver stub: every driver-API function of cudarc's bindings, as an empty symbol.
cargo fetch --quiet
cudarc_version="$(awk '/^name = "cudarc"/ {getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)"
bindings="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc_version"/src/driver/sys/mod.rs | head -1)"
stub="$dest/libcuda-stub.c"
grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$bindings" | awk '{print $4}' | sort -u |
    sed 's/.*/void &(void) {}/' > "$stub"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib64/libcuda.so" "$stub"

abs_home="$(cd "$home" && pwd)"
cat > "$dest/env.sh" <<EOF
# Source this to build with --features cuda (written by scripts/cuda-toolkit.sh).
export CUDA_HOME="$abs_home"
export PATH="$abs_home/bin:\$PATH"
export CUDA_COMPUTE_CAP=90
EOF
echo "CUDA 13.0 build toolkit in $dest ($(grep -c . "$stub") driver symbols stubbed); source $dest/env.sh"
