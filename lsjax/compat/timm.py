"""timm's ``LabelSmoothingCrossEntropy`` and ``SoftTargetCrossEntropy`` in JAX.

Twins: ``lstorch.compat.timm``.
"""

from __future__ import annotations

import jax

import lsspec
from lsjax import _common
from lsjax._common import ArrayLike
from lsjax.smoothed import smoothed_cross_entropy
from lsjax.soft import soft_target_cross_entropy as _soft_target


def label_smoothing_cross_entropy(
    x: ArrayLike,
    target: ArrayLike,
    *,
    smoothing: float = 0.1,
    check_labels: bool | None = None,
) -> jax.Array:
    r"""``timm.loss.LabelSmoothingCrossEntropy(smoothing)(x, target)``.

    ``mean_rows((1 - s) * (-lp[y]) + s * (-mean_c lp_c))`` with ``lp = log_softmax(x)`` (class
    axis last): the uniform convention, batch mean, i.e. ``smoothed_cross_entropy(x, target,
    smoothing=smoothing, reduction="mean")``. As timm (which asserts it), ``smoothing`` must be
    below 1 (checked when concrete; a traced value is held to [0, 1] only, NaN outside).
    Difference: ``x`` of shape ``(B, T, V)`` gives the mean over every token, which is timm's
    loss on ``(B * T, V)``; timm's own ``gather(dim=-1, index=target.unsqueeze(1))`` reads
    each token's target from position 0's log-probabilities there (timm is written for
    ``(N, C)``). ``check_labels`` is :func:`lsjax.smoothed_cross_entropy`'s: ``False`` reads
    no concrete value to check it (a target out of range gives a NaN row, as under ``jit``).
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


def soft_target_cross_entropy(x: ArrayLike, target: ArrayLike) -> jax.Array:
    r"""``timm.loss.SoftTargetCrossEntropy()(x, target)``: ``mean_rows(-sum_c t_c lp_c)``.

    ``lp = log_softmax(x)`` over the last axis; targets are taken as given (mixup/cutmix).
    That is ``lsjax.soft_target_cross_entropy(x, target, reduction="mean")``.
    """
    return _soft_target(
        x,
        target,
        reduction="mean",
        axis=-1,
        _caller=lsspec.caller("soft_target_cross_entropy", logits="x", targets="target"),
    )
