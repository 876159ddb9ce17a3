"""Label-smoothed losses in PyTorch: functions and ``nn.Module`` s.

Every public loss has a JAX twin of the same name and keywords in ``lsjax``, apart from what one
framework alone has: here ``inplace_backward``; there ``implementation`` (XLA or Pallas) and
``lsjax.cross_entropy`` (torch's ``F.cross_entropy`` in JAX); and ``axis``, which lstorch asks
for with 3-d or larger logits (torch's ``(N, C, d1, ...)`` puts the classes second), where lsjax
takes the last axis. The twins are listed in ``parity_tests.registry`` and proven equal by
``python -m parity_tests``. This package
never imports jax. It needs PyTorch, from the ``[torch]`` extra (or a torch build of your own);
without it, importing ``lstorch`` raises an ImportError that says so. ``lstorch.calibration`` is
the framework-free ``lsspec.calibration`` (NumPy only).
"""

import lsspec

try:
    import torch  # noqa: F401  (first, so that a missing PyTorch is named before any other error)
except ModuleNotFoundError as error:
    if not lsspec.is_missing(error, ("torch",)):
        raise
    raise ImportError(lsspec.install_hint("lstorch", "PyTorch", "torch", error)) from error

from lstorch import compat
from lstorch._closed_form import RowStats
from lstorch.binary import sigmoid_binary_cross_entropy
from lstorch.compat.opennmt import kl_label_smoothing_loss
from lstorch.compat.pytorch_forum import label_smoothing_loss
from lstorch.fused import fused_linear_smoothed_cross_entropy
from lstorch.modules import (
    FusedLinearSmoothedCrossEntropyLoss,
    KLLabelSmoothingLoss,
    LabelSmoothingLoss,
    SmoothedCrossEntropyLoss,
)
from lstorch.smoothed import smoothed_cross_entropy
from lstorch.soft import soft_target_cross_entropy


def __getattr__(name: str):
    """``lstorch.distributed`` on first use (it imports ``torch._dynamo``, about a second and a
    half, which ``import lstorch`` does not): ``lstorch.distributed.X`` works after ``import
    lstorch`` alone, as ``import lstorch.distributed`` does."""
    if name == "distributed":
        import importlib

        return importlib.import_module("lstorch.distributed")
    raise AttributeError(f"module 'lstorch' has no attribute {name!r}")


__all__ = [
    "FusedLinearSmoothedCrossEntropyLoss",
    "KLLabelSmoothingLoss",
    "LabelSmoothingLoss",
    "RowStats",
    "SmoothedCrossEntropyLoss",
    "compat",
    "fused_linear_smoothed_cross_entropy",
    "kl_label_smoothing_loss",
    "label_smoothing_loss",
    "sigmoid_binary_cross_entropy",
    "smoothed_cross_entropy",
    "soft_target_cross_entropy",
]
