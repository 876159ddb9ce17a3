"""Deprecated: ``lsjax.compat.pytorch.cross_entropy`` (also ``lsjax.cross_entropy``). Importing
this module warns; it will be removed.
"""

import warnings

from lsjax.compat.pytorch import cross_entropy

__all__ = ["cross_entropy"]

warnings.warn(
    "lsjax.torch_mirror is deprecated: import cross_entropy from lsjax (or lsjax.compat.pytorch).",
    DeprecationWarning,
    stacklevel=2,
)
