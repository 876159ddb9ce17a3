"""Test-wide settings. float64 tests need jax_enable_x64; every array here names its dtype, so
turning it on globally changes no float32 or bf16 result."""

import jax

jax.config.update("jax_enable_x64", True)
