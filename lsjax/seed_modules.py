"""JAX twins of the two PyTorch modules the project started from (the seed note).

Twins: ``lstorch.LabelSmoothingLoss`` / ``lstorch.label_smoothing_loss`` and
``lstorch.KLLabelSmoothingLoss`` / ``lstorch.kl_label_smoothing_loss``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import lsspec
from lsjax import _common
from lsjax._common import ArrayLike
from lsjax.smoothed import smoothed_cross_entropy


def label_smoothing_loss(
    pred: ArrayLike,
    target: ArrayLike,
    *,
    classes: int,
    smoothing: float = 0.0,
    dim: int = -1,
    _caller: lsspec.Caller | None = None,
) -> jax.Array:
    """The seed's ``LabelSmoothingLoss(classes, smoothing, dim)``: logits in, mean over rows.

    ``mean_rows( -sum_c q_c * log_softmax(pred)_c )`` with ``q`` on the ``"others"`` convention
    (``1 - smoothing`` on the target, ``smoothing / (classes - 1)`` on every other class), i.e.
    ``smoothed_cross_entropy(pred, target, smoothing=smoothing, convention="others", axis=dim,
    reduction="mean")``. Unlike the seed, ``dim`` may name any class axis of any rank (the seed's
    ``scatter_(1, ...)`` only worked for the last axis of 2-D input), and ``classes`` must equal
    the size of that axis (the seed silently used a wrong ``eps/(classes-1)`` otherwise).
    ``_caller`` is internal (who errors name).
    """
    fn = lsspec.caller("label_smoothing_loss", _caller)
    pred = jnp.asarray(pred)
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
        _caller=lsspec.caller(
            "label_smoothing_loss", _caller, logits="pred", labels="target", axis="dim"
        ),
    )


def kl_label_smoothing_loss(
    output: ArrayLike,
    target: ArrayLike,
    *,
    label_smoothing: float,
    tgt_vocab_size: int,
    ignore_index: int = -100,
    _caller: lsspec.Caller | None = None,
) -> jax.Array:
    """The seed's OpenNMT-style KL ``LabelSmoothingLoss(label_smoothing, tgt_vocab_size, ...)``.

    Log-probabilities in (class axis last), ``F.kl_div(output, q, reduction='sum')``: the KL form
    summed over all rows, where ``q`` puts ``1 - eps`` on the target, no mass on the pad column
    ``ignore_index`` and ``eps/(K-2)`` on every other class, and rows whose target is the pad are
    zeroed. That is ``smoothed_cross_entropy(output, target, smoothing=eps,
    convention="others_but_pad", pad_index=ignore_index, kl=True, from_log_probs=True,
    reduction="sum")``.

    Deviation, on purpose: the seed writes ``one_hot[ignore_index] = 0``, which with the default
    ``-100`` zeroes column ``K - 100`` (or raises IndexError when K < 100) while still dividing
    ``eps`` by ``K - 2``. Here a negative ``ignore_index`` excludes no column: ``eps`` is spread
    over the ``K - 1`` other classes (``convention="others"``) and rows whose target equals
    ``ignore_index`` are zeroed. For ``0 <= ignore_index < K`` the seed is reproduced exactly.
    Like the seed, ``label_smoothing`` must lie in (0, 1] (checked when concrete; traced, only
    [0, 1] is enforced, by NaN). ``_caller`` is internal (who errors name).
    """
    fn = lsspec.caller("kl_label_smoothing_loss", _caller)
    output = jnp.asarray(output)
    value = _common.concrete_scalar(fn, "label_smoothing", label_smoothing)
    options = lsspec.seed_kl_options(fn, value, ignore_index, tgt_vocab_size)
    if output.ndim:
        lsspec.check_declared_classes(fn, "tgt_vocab_size", tgt_vocab_size, output.shape[-1])
    inner = lsspec.caller(
        "kl_label_smoothing_loss",
        _caller,
        logits="output",
        labels="target",
        smoothing="label_smoothing",
        pad_index="ignore_index",
    )
    return smoothed_cross_entropy(
        output,
        target,
        smoothing=label_smoothing,
        kl=True,
        from_log_probs=True,
        reduction="sum",
        axis=-1,
        _caller=inner,
        **options,
    )
