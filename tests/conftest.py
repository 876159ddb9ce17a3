"""Test-wide settings.

* float64 tests need jax_enable_x64; every array here names its dtype, so turning it on globally
  changes no float32 or bf16 result.
* Hypothesis profiles: ``ci`` (the default, sized to CI's time, derandomized so a CI run is
  reproducible) and ``nightly`` (five times the examples, random). Pick one with
  ``HYPOTHESIS_PROFILE=nightly python -m pytest tests/test_properties.py``.
"""

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=1000, derandomize=True, **_COMMON)
settings.register_profile("nightly", max_examples=5000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
