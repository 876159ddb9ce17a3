"""Cross-framework verification: the twin registry, ``compare`` and the report.

* :func:`compare` runs the same NumPy-made inputs through a JAX and a PyTorch function and
  checks outputs and gradients (public: use it on your own port; ``docs/compare.md`` says what
  "pass" means in each dtype).
* :data:`registry.TWINS` lists every twin of ``lsjax`` and ``lstorch``.
* ``python -m parity_tests`` runs every twin in float64, float32 and bfloat16, and every float64
  oracle, prints a table and exits non-zero on any failure.

It runs both frameworks, so it needs JAX, optax and PyTorch: the ``[parity]`` extra. Without one of
them, importing ``parity_tests`` raises an ImportError that names that extra.
"""

import lsspec

try:  # first, so that a missing framework is named before any other error
    import jax  # noqa: F401
    import optax  # noqa: F401
    import torch  # noqa: F401
except ModuleNotFoundError as error:
    if not lsspec.is_missing(error, ("jax", "jaxlib", "optax", "torch")):
        raise
    raise ImportError(
        lsspec.install_hint("parity_tests", "JAX, optax and PyTorch", "parity", error)
    ) from error

from parity_tests.compare import (
    DEFAULT_TOLERANCES,
    CaseResult,
    Report,
    compare,
    compare_with_oracle,
    rounding_budget,
)

__all__ = [
    "DEFAULT_TOLERANCES",
    "CaseResult",
    "Report",
    "compare",
    "compare_with_oracle",
    "rounding_budget",
]
