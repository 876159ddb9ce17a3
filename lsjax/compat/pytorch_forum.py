"""The ``LabelSmoothingLoss(classes, smoothing, dim)`` shared in PyTorch's label-smoothing
discussions (the forums and Stack Overflow's "Label Smoothing in PyTorch"), in JAX.
Twin: ``lstorch.compat.pytorch_forum``.
"""

from __future__ import annotations

import jax

import lsspec
from lsjax._common import ArrayLike, as_array
from lsjax.smoothed import smoothed_cross_entropy


def label_smoothing_loss(
    pred: ArrayLike,
    target: ArrayLike,
    *,
    classes: int,
    smoothing: float = 0.0,
    dim: int = -1,
    check_labels: bool | None = None,
    _caller: lsspec.Caller | None = None,
) -> jax.Array:
    """The forum's ``LabelSmoothingLoss(classes, smoothing, dim)(pred, target)``: logits in, mean
    over rows.

    ``mean_rows( -sum_c q_c * log_softmax(pred)_c )`` with ``q`` on the ``"others"`` convention
    (``1 - smoothing`` on the target, ``smoothing / (classes - 1)`` on every other class), i.e.
    ``smoothed_cross_entropy(pred, target, smoothing=smoothing, convention="others", axis=dim,
    reduction="mean")``. Unlike the original, ``dim`` may name any class axis of any rank (its
    ``scatter_(1, ...)`` only worked for the last axis of 2-D input), and ``classes`` must equal
    the size of that axis (the original silently used a wrong ``eps/(classes-1)`` otherwise).
    ``_caller`` is internal (who errors name). ``check_labels`` is
    :func:`lsjax.smoothed_cross_entropy`'s: ``False`` reads no concrete value to check it (a
    target out of range gives a NaN row, as under ``jit``).
    """
    fn = lsspec.caller("label_smoothing_loss", _caller)
    pred = as_array(fn, "pred", pred)
    axis = lsspec.check_axis(fn, dim, max(pred.ndim, 1), name="dim")
    if pred.ndim:
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
