"""Helpers shared by the test files (the fixtures are in ``conftest.py``).

* :func:`profile`: ``"ci"`` or ``"nightly"`` (``python -m pytest --nightly``), what the
  sampled tests read to size themselves.
* :data:`FRAMEWORKS`, :func:`finite_difference_vjp`, :func:`compiled_temp_bytes`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

import lsjax
import lstorch
from tests.profiles import PROFILE_VARIABLE


def profile() -> str:
    """The test profile of this run: ``"ci"`` (the default) or ``"nightly"``."""
    return os.environ.get(PROFILE_VARIABLE, "ci")


FRAMEWORKS = {
    "jax": (lsjax, lambda a: jnp.asarray(a)),
    "torch": (lstorch, lambda a: torch.as_tensor(a)),
}


def finite_difference_vjp(
    fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, cotangent=1.0, step: float = 1e-6
) -> np.ndarray:
    """``cotangent . d fn / d x`` by central differences in float64, one entry of ``x`` at a
    time (2 evaluations per entry: keep ``x`` small). ``cotangent=1.0`` with a scalar ``fn``
    gives its gradient."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += step
        down[index] -= step
        grad[index] = np.sum(cotangent * (fn(up) - fn(down))) / (2 * step)
    return grad


def compiled_temp_bytes(loss: Callable, *shapes: jax.ShapeDtypeStruct, argnums=0) -> int:
    """Bytes of temporaries XLA plans for ``jit(value_and_grad(loss, argnums))`` at ``shapes``
    (``memory_analysis()`` of the compiled program; lowered from shapes, nothing allocated)."""
    step = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    return step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes
