#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, as one script for a lent GPU machine (its own
# Python with torch, Triton and JAX; nothing installed). Writes its outputs under ${OUT:-.}.
set -uo pipefail
out=${OUT:-.}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
python3 -c "import sys, torch, triton, jax; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'jax', jax.__version__, jax.devices())"
# The kernels on the GPU against the float64 oracle (the same script CI runs in the interpreter).
timeout 240 python3 -W ignore tests/triton_checks.py 2>&1 | tail -30 | tee "$out/triton_checks.txt"
# The issue's shape and dtype, with the kernels' configuration sweep.
timeout 300 python3 benchmarks/bench_gpu.py --sweep --json "$out/bench_gpu_bf16.json" 2>&1 | tee "$out/bench_gpu_bf16.txt"
# float32 at the same shape, for the record.
timeout 200 python3 benchmarks/bench_gpu.py --dtype float32 --reps 10 --json "$out/bench_gpu_f32.json" 2>&1 | tee "$out/bench_gpu_f32.txt"
