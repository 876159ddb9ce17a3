#!/usr/bin/env bash
# Fetch the wheels benchmarks/run_on_gpu.sh installs on a GPU machine that has no network, into
# benchmarks/wheels/ (ignored by git: the wheels travel with the working tree, never in a commit).
#
#     bash benchmarks/fetch_wheels.sh                 # the peers: ~1 MB
#     bash benchmarks/fetch_wheels.sh --jax-cuda      # also JAX's CUDA plugin: ~140-200 MB
#
# The peers, pure-Python wheels (py3-none-any):
#   liger-kernel       LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
#   cut-cross-entropy  linear_cross_entropy
#   packaging          Liger imports packaging.version without declaring it
# Their metadata declares nothing else but torch and Triton (liger-kernel: torch>=2.1.2,
# triton>=2.3.1; cut-cross-entropy: torch, triton), which the GPU machine has, so
# `pip install --no-deps` is enough. The versions are pinned to those checked here; override with
# LIGER_VERSION / CCE_VERSION / PACKAGING_VERSION.
#
# --jax-cuda [JAX_VERSION [CUDA_MAJOR]] (defaults 0.11.2, the GPU machine's jax in run 3, and
# 12): jax-cudaNN-plugin and jax-cudaNN-pjrt for that jax, CPython $PYTHON_VERSION (default 3.12)
# on manylinux x86_64, into benchmarks/wheels/jax-cuda/. For jax 0.11.2 the plugin is 8-9 MB but
# the pjrt wheel is 188 MB (CUDA 12) or 134 MB (CUDA 13), over the 64 MiB of ignored files the
# device tool carries, so they reach a GPU machine only by some other copy; and they still need
# the CUDA libraries of the matching major version (the nvidia-* wheels of jax's [with-cuda]
# extra), which this script does not fetch.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=benchmarks/wheels
mkdir -p "$dest"
pip download --no-deps --only-binary=:all: -d "$dest" \
  "liger-kernel==${LIGER_VERSION:-0.8.5}" "cut-cross-entropy==${CCE_VERSION:-25.1.1}" \
  "packaging==${PACKAGING_VERSION:-26.4}"
if [ "${1:-}" = "--jax-cuda" ]; then
  jax_version=${2:-0.11.2}
  cuda=${3:-12}
  mkdir -p "$dest/jax-cuda"
  pip download --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --platform manylinux_2_27_x86_64 -d "$dest/jax-cuda" \
    "jax-cuda${cuda}-plugin==$jax_version" "jax-cuda${cuda}-pjrt==$jax_version"
fi
echo "fetched (the device tool carries at most 64 MiB of ignored files in all):"
find "$dest" -name '*.whl' -exec ls -l {} + | awk '{printf "  %8.1f MB  %s\n", $5 / 1e6, $9}'
du -sh "$dest" | awk '{print "  total " $1}'
