#!/usr/bin/env bash
# Every GPU measurement of benchmarks/RESULTS.md in ONE command, on a lent GPU machine with its
# own Python (torch, Triton, JAX) and no network:
#
#     bash benchmarks/run_on_gpu.sh          # outputs under ${OUT:-out}/
#     DRY_RUN=1 bash benchmarks/run_on_gpu.sh   # the same steps at tiny shapes, on a CPU too
#
# With the device tool: carry benchmarks/wheels (ignored by git, so it travels only if named).
#
# Nothing is fetched from a registry here. Peers travel in the working tree as wheels
# (benchmarks/fetch_wheels.sh puts them in benchmarks/wheels/, which git ignores; the device
# tool carries ignored paths up to 64 MiB in all): liger-kernel, cut-cross-entropy and packaging
# (which Liger imports without declaring it), about 1 MB. Each is installed with
# `pip install --no-index --no-deps` into a folder of its own, only if this Python cannot import
# it already; --no-deps is enough: both declare only torch and Triton, which the machine has.
# JAX's CUDA plugin (benchmarks/wheels/jax-cuda/, `fetch_wheels.sh --jax-cuda`) is installed the
# same way if JAX sees no GPU, but its pjrt wheel alone is 134-188 MB: it cannot travel with the
# device tool, so on a machine whose JAX has no CUDA the JAX rows say "not available".
#
# Every row is checked against a float64 reference before it is timed; a wrong row is not timed
# and says so, a missing peer says "not available: <reason>", and the other rows run either way.
#
# Budget: about 8.5 minutes of GPU time in all (each step's `timeout` is its ceiling; expected
# times are lower). The steps run in order of importance, so an overrun costs the later ones;
# within a step, a row whose check (its compilation included) takes over 60 s fails alone
# (bench_gpu.py --row-limit), so a slow torch.compile cannot take its part's numbers with it.
#   setup: versions, wheels                                                       ~15 s
#   torch-bf16   8192 x 131072: lstorch (Triton, in place / not, torch.compile), kernels
#                alone, F.cross_entropy, Liger CE, copy floor, K = 256 per-call cost,
#                sync-free and CUDA-graph checks                                  110 s
#   jax-bf16     lsjax XLA and Pallas (donated / not), optax route, XLA x + 1     60 s
#   fused-torch  8192 x 4096 x 128256 bf16: lstorch fused (+ TF32), dense, Liger
#                FLCE, cut-cross-entropy: time and peak memory                     50 s
#   fused-jax    lsjax fused, dense (XLA, Pallas): time and XLA temporaries       45 s
#   large-torch  17408 x 131072 bf16 (> 2^31 elements): rows past 2^31 checked    30 s
#   large-jax    the same for lsjax XLA and Pallas                                 30 s
#   torch-f32    the torch part in float32, 10 repetitions                         70 s
#   jax-f32      the jax part in float32, 10 repetitions                           40 s
#   triton-checks  the kernels against the float64 oracle, every option (90 cases;
#                run 3 had them all right; it may not finish in this ceiling)     50 s
#   summary      the targets, met or missed                                        10 s
#   in all                                                                       ~510 s
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-out}
mkdir -p "$out"
python=${PYTHON:-python3}
site=${TMPDIR:-/tmp}/lsbench-site
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

install_missing() {  # install_missing FOLDER: its wheels this Python cannot import yet
  local wanted=() wheel module
  for wheel in "$1"/*.whl; do
    [ -e "$wheel" ] || continue
    module=$(basename "$wheel" | cut -d- -f1)
    if "$python" -c "import $module" 2>/dev/null; then
      echo "wheels: $module is already on this machine; $(basename "$wheel") not installed"
    else
      wanted+=("$wheel")
    fi
  done
  [ ${#wanted[@]} -eq 0 ] && return 0
  echo "wheels: installing ${wanted[*]} into $site (no index, no dependencies)"
  if "$python" -m pip --version >/dev/null 2>&1; then
    "$python" -m pip install --quiet --no-index --no-deps --target "$site" "${wanted[@]}"
  else  # no pip: a wheel is a zip file laid out as site-packages
    for wheel in "${wanted[@]}"; do "$python" -m zipfile -e "$wheel" "$site"; done
  fi
}

step() {  # step SECONDS NAME COMMAND...: run with a ceiling; output to the screen and a file
  local seconds=$1 name=$2 start=$SECONDS rc
  shift 2
  echo "=== $name (at most ${seconds} s)"
  timeout -k 10 "$seconds" "$@" 2>&1 | tee "$out/$name.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "=== $name: TIMED OUT after ${seconds} s (its numbers are lost)" | tee -a "$out/$name.txt"
  else
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
  fi
}

echo "=== setup"
mkdir -p "$site"
install_missing benchmarks/wheels
if ! timeout 60 "$python" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" \
    2>/dev/null; then
  echo "JAX sees no GPU here"
  install_missing benchmarks/wheels/jax-cuda
fi
timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
  --format=csv
timeout 60 "$python" - <<'EOF' 2>&1 | tee "$out/versions.txt"
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "jax", "jaxlib", "optax", "liger_kernel", "cut_cross_entropy"):
    try:
        module = importlib.import_module(name)
        version = getattr(module, "__version__", None)
        if version is None:
            from importlib.metadata import version as dist_version
            version = dist_version(name.replace("_", "-"))
        print(name, version)
    except Exception as error:
        print(name, f"not available: {type(error).__name__}: {error}")
import jax
print("jax devices", jax.devices())
EOF

bench=("$python" benchmarks/bench_gpu.py)
if [ -n "${DRY_RUN:-}" ]; then
  bench+=(--dry-run)
fi
step 110 torch-bf16 "${bench[@]}" --part torch --json "$out/torch-bf16.json"
step 60 jax-bf16 "${bench[@]}" --part jax --json "$out/jax-bf16.json"
step 50 fused-torch "${bench[@]}" --part fused-torch --json "$out/fused-torch.json"
step 45 fused-jax "${bench[@]}" --part fused-jax --json "$out/fused-jax.json"
step 30 large-torch "${bench[@]}" --part large-torch --json "$out/large-torch.json"
step 30 large-jax "${bench[@]}" --part large-jax --json "$out/large-jax.json"
step 70 torch-f32 "${bench[@]}" --part torch --dtype float32 --reps 10 --json "$out/torch-f32.json"
step 40 jax-f32 "${bench[@]}" --part jax --dtype float32 --reps 10 --json "$out/jax-f32.json"
if [ -z "${DRY_RUN:-}" ]; then  # in Triton's interpreter it takes minutes (CI runs it)
  step 50 triton-checks "$python" -W ignore tests/triton_checks.py
fi
shopt -s nullglob
results=("$out"/*.json)
if [ ${#results[@]} -gt 0 ]; then
  step 10 summary "${bench[@]}" --summary "${results[@]}"
else
  echo "=== summary: no part wrote its numbers"
fi
