"""Helpers shared by the test files (the fixtures are in ``conftest.py``).

* :func:`profile`: ``"ci"`` or ``"nightly"`` (``python -m pytest --nightly``), what the
  sampled tests read to size themselves.
* :data:`FRAMEWORKS`, :func:`finite_difference_vjp`, :func:`compiled_temp_bytes`,
  :func:`stats_across_blocks_case`.
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


def stats_across_blocks_case() -> tuple[np.ndarray, np.ndarray, dict]:
    """Logits ``(6, 50)`` whose maxima a kernel walking blocks of 16 columns meets in the last,
    partial block and tied across blocks, and their labels: ``(logits, labels, expected)`` with
    the float64 NumPy ``lse``, ``entropy`` and ``correct`` (``np.argmax``'s first maximum is the
    label), the oracle of ``return_stats``."""
    rng = np.random.default_rng(12)
    logits = rng.uniform(-1.0, 1.0, size=(6, 50)).astype(np.float32)
    maxima = [[49], [49], [5, 40], [5, 40], [35], [33, 48]]  # columns holding each row's max
    labels = np.array([49, 3, 40, 5, 35, 48])
    for row, columns in enumerate(maxima):
        logits[row, columns] = 4.0
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    p = np.exp(x - lse[:, None])
    expected = dict(lse=lse, entropy=-(p * np.log(p)).sum(-1), correct=x.argmax(-1) == labels)
    assert expected["correct"].tolist() == [True, False, False, True, True, False]
    return logits, labels, expected
