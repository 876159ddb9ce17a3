"""The ``LabelSmoothingLoss(classes, smoothing, dim)`` shared in PyTorch's label-smoothing
discussions (the forums and Stack Overflow's "Label Smoothing in PyTorch", before
``F.cross_entropy`` had ``label_smoothing``), and copied into many projects since.
Twin: ``lsjax.compat.pytorch_forum``; its module form is ``lstorch.LabelSmoothingLoss``.
"""

from __future__ import annotations

import torch

import lsspec
from lstorch.smoothed import smoothed_cross_entropy


def label_smoothing_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    classes: int,
    smoothing: float = 0.0,
    dim: int = -1,
    check_labels: bool | None = None,
    _caller: lsspec.Caller | None = None,
) -> torch.Tensor:
    """The forum's ``LabelSmoothingLoss(classes, smoothing, dim)(pred, target)``: logits in, mean
    over rows.

    ``mean_rows(-sum_c q_c log_softmax(pred)_c)`` with ``q`` on the ``"others"`` convention
    (``1 - smoothing`` on the target, ``smoothing / (classes - 1)`` on every other class), i.e.
    ``smoothed_cross_entropy(pred, target, smoothing=smoothing, convention="others", axis=dim,
    reduction="mean")``.

    Differences, on purpose: ``dim`` may name any class axis of any rank (the original's
    ``scatter_(1, ...)`` only worked for the last axis of 2-D input), and ``classes`` must equal
    the size of that axis (the original silently used a wrong ``eps/(classes-1)`` otherwise).

    Args:
      pred: float logits, the classes on ``dim``.
      target: int tensor, ``pred``'s shape without ``dim``.
      classes: the number of classes, an int >= 2; must equal ``pred.shape[dim]``.
      smoothing: the mass spread over the ``classes - 1`` other classes, in [0, 1].
      dim: the class axis.
      check_labels: whether the host reads the targets (and a ``smoothing`` tensor) to check
        them, as in :func:`lstorch.smoothed_cross_entropy`: ``None``, CPU tensors only;
        ``True``, on any device (a sync); ``False``, never (a target out of range gives a NaN
        row).

    Returns:
      The mean over rows, a scalar: float32 for bf16/fp16/float32 logits, float64 for float64.

    ``_caller`` is internal (who errors name: ``LabelSmoothingLoss`` when the module called).
    """
    fn = lsspec.caller("label_smoothing_loss", _caller)
    if isinstance(pred, torch.Tensor) and pred.ndim:
        axis = lsspec.check_axis(fn, dim, pred.ndim, name="dim")
        lsspec.check_declared_classes(fn, "classes", classes, pred.shape[axis])
    return smoothed_cross_entropy(
        pred,
        target,
        smoothing=smoothing,
        convention="others",
        axis=dim,
        reduction="mean",
        check_labels=check_labels,
        _caller=lsspec.caller(
            "label_smoothing_loss", _caller, logits="pred", labels="target", axis="dim"
        ),
    )
