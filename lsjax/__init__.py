"""Label-smoothed losses in JAX: pure, jittable, optax-style functions.

Every public loss has a PyTorch twin of the same name and keywords in ``lstorch``, apart from
what one framework alone has: here ``implementation`` (XLA or the Pallas kernels) and
``cross_entropy`` (torch's own ``F.cross_entropy``, in JAX); there ``inplace_backward``; and
``axis``, whose default here is the last axis, while lstorch asks for it with 3-d or larger
logits (torch's ``(N, C, d1, ...)`` puts the classes second). The twins are listed in
``parity_tests.registry`` and proven equal by ``python -m parity_tests``.
This package never imports torch. It needs JAX, from the ``[jax]`` extra; without it, importing
``lsjax`` raises an ImportError that says so. ``lsjax.calibration`` is the framework-free
``lsspec.calibration`` (NumPy only).
"""

import lsspec

try:
    import jax  # noqa: F401  (first, so that a missing JAX is named before any other error)
except ModuleNotFoundError as error:
    if not lsspec.is_missing(error, ("jax", "jaxlib")):
        raise
    raise ImportError(lsspec.install_hint("lsjax", "JAX", "jax", error)) from error

from lsjax import compat
from lsjax._closed_form import RowStats
from lsjax.binary import sigmoid_binary_cross_entropy
from lsjax.compat.opennmt import kl_label_smoothing_loss
from lsjax.compat.pytorch import cross_entropy
from lsjax.compat.pytorch_forum import label_smoothing_loss
from lsjax.fused import fused_linear_smoothed_cross_entropy
from lsjax.smoothed import smoothed_cross_entropy
from lsjax.soft import soft_target_cross_entropy

__all__ = [
    "RowStats",
    "compat",
    "cross_entropy",
    "fused_linear_smoothed_cross_entropy",
    "kl_label_smoothing_loss",
    "label_smoothing_loss",
    "sigmoid_binary_cross_entropy",
    "smoothed_cross_entropy",
    "soft_target_cross_entropy",
]
