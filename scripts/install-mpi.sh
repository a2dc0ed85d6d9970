#!/usr/bin/env bash
# Open MPI for feature `mpi` (the `mpi` crate binds the system's mpi.h through bindgen,
# which needs libclang): Debian's packages, installed only when missing.
set -euo pipefail
if command -v mpirun >/dev/null && dpkg -s libopenmpi-dev libclang-dev >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev >/dev/null
mpirun --version | head -1
