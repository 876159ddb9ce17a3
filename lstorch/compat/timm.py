"""timm's ``LabelSmoothingCrossEntropy`` and ``SoftTargetCrossEntropy`` in PyTorch.

Twins: ``lsjax.compat.timm``.
"""

from __future__ import annotations

import torch

import lsspec
from lstorch import _common
from lstorch.smoothed import smoothed_cross_entropy
from lstorch.soft import soft_target_cross_entropy as _soft_target


def label_smoothing_cross_entropy(
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    smoothing: float = 0.1,
    check_labels: bool | None = None,
) -> torch.Tensor:
    r"""``timm.loss.LabelSmoothingCrossEntropy(smoothing)(x, target)``.

    ``mean_rows((1 - s) * (-lp[y]) + s * (-mean_c lp_c))``: ``smoothed_cross_entropy(x, target,
    smoothing=smoothing, reduction="mean")``; ``smoothing`` must be below 1, as timm asserts
    (checked for a number or CPU tensor; a value that is not read is held to [0, 1] only, NaN
    outside). Difference: ``x`` of shape ``(B, T, V)`` gives the mean over every token, which is
    timm's loss on ``(B * T, V)``; timm's own ``gather(dim=-1, index=target.unsqueeze(1))``
    reads each token's target from position 0's log-probabilities there (timm is written for
    ``(N, C)``). ``check_labels`` is :func:`lstorch.smoothed_cross_entropy`'s: ``None`` reads
    and checks CPU tensors only (on an accelerator, no host read-back: a target out of range
    gives a NaN row), ``True`` on any device, ``False`` never.
    """
    fn = "label_smoothing_cross_entropy"
    _common.check_smoothing_below_one(fn, "smoothing", smoothing, check_labels)
    return smoothed_cross_entropy(
        x,
        target,
        smoothing=smoothing,
        reduction="mean",
        axis=-1,
        check_labels=check_labels,
        _caller=lsspec.caller(fn, logits="x", labels="target"),
    )


def soft_target_cross_entropy(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""``timm.loss.SoftTargetCrossEntropy()(x, target)``: ``mean_rows(-sum_c t_c lp_c)``,
    i.e. ``lstorch.soft_target_cross_entropy(x, target, reduction="mean")``."""
    return _soft_target(
        x,
        target,
        reduction="mean",
        axis=-1,
        _caller=lsspec.caller("soft_target_cross_entropy", logits="x", targets="target"),
    )
