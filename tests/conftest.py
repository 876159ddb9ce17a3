"""Test-wide settings.

* float64 tests need jax_enable_x64; every array here names its dtype, so turning it on globally
  changes no float32 or bf16 result.
* Hypothesis profiles: ``ci`` (the default: 2000 examples per property, derandomized so a CI
  run is reproducible) and ``nightly`` (five times the examples, 10000 per property, random).
  Pick one with ``HYPOTHESIS_PROFILE=nightly python -m pytest tests/test_properties.py``.
"""

import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    # lstorch's Triton kernels (the Triton execution paths, tests/test_paths.py) run in Triton's
    # interpreter on a CPU; it must be switched on before anything imports Triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

# A persistent compilation cache for this session only (a fresh temporary folder, removed at
# exit). The suite compiles more distinct small programs (one per twin case, dtype and shape)
# than JAX's in-memory caches keep (2048 lowered programs), so a program evicted and needed
# again, as the twin property draws grid cases at random, was compiled again from scratch; now
# it is read back, about three times cheaper. Same HLO and options, same executable.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="lsp-jax-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=2000, derandomize=True, **_COMMON)
settings.register_profile("nightly", max_examples=10000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
