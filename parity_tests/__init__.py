"""Cross-framework verification: the twin registry, ``compare`` and the report.

* :func:`compare` runs the same NumPy-made inputs through a JAX and a PyTorch function and
  checks outputs and gradients (public: use it on your own port; ``docs/compare.md`` says what
  "pass" means in each dtype).
* :data:`registry.TWINS` lists every twin of ``lsjax`` and ``lstorch``.
* ``python -m parity_tests`` runs every twin in float64, float32 and bfloat16, and every float64
  oracle, prints a table and exits non-zero on any failure.
"""

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
