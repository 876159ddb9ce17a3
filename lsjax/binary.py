"""Binary / multi-label cross-entropy from logits with label smoothing, in JAX.

Twin: ``lstorch.sigmoid_binary_cross_entropy``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import lsspec
from lsjax import _common
from lsjax._common import ArrayLike


def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    smoothing: float | jax.Array = 0.0,
    pos_weight: ArrayLike | None = None,
    reduction: str = "none",
    _caller: lsspec.Caller | None = None,
) -> jax.Array:
    r"""Sigmoid cross-entropy of every element, labels smoothed toward 1/2, stable from logits.

    With ``y' = y * (1 - eps) + eps / 2`` and ``softplus(z) = log(1 + exp(z))`` (computed as
    ``logaddexp(z, 0)``, never as ``log(sigmoid)``)::

        loss = pos_weight * y' * softplus(-x) + (1 - y') * softplus(x)

    i.e. ``-[pos_weight * y' log sigmoid(x) + (1 - y') log(1 - sigmoid(x))]``; its gradient is
    ``sigmoid(x) * (pos_weight * y' + 1 - y') - pos_weight * y'``.

    Reproduces ``torch.nn.functional.binary_cross_entropy_with_logits(x, y', pos_weight=pw,
    reduction=r)``, ``optax.sigmoid_binary_cross_entropy(x, y')`` (no ``pos_weight``) and,
    averaged over the last axis, Keras ``BinaryCrossentropy(from_logits=True,
    label_smoothing=eps)`` (see ``lsjax.compat.keras``).

    Args:
      logits: float array of any shape; bf16/fp16 are computed in float32.
      labels: float array of the logits' shape, targets in [0, 1] (multi-label, soft or hard).
      smoothing: ``eps`` in [0, 1]: each label becomes ``y * (1 - eps) + eps / 2``;
        differentiable, ``d loss / d eps = (1/2 - y) (pos_weight softplus(-x) - softplus(x))``.
      pos_weight: weight of the positive term, broadcast against the logits (torch's
        ``pos_weight``, e.g. shape ``(C,)``); a constant.
      reduction: ``"none"`` (elementwise), ``"sum"`` or ``"mean"`` (over all elements).
      _caller: internal, the public function that called this one for the user (its name is
        the one errors give).

    A concrete ``smoothing`` (a number or a 0-d array) outside [0, 1] raises; a traced one
    more than 4 ulps outside it gives NaN. So do ``labels`` outside [0, 1] (torch and optax
    compute a number from them, negative for a label of -1): concrete ones raise, traced
    ones give NaN elements.

    Returns:
      float32 for bf16/fp16/float32 logits, float64 for float64.
    """
    fn = lsspec.caller("sigmoid_binary_cross_entropy", _caller)
    logits, labels = _common.floating(fn, logits=logits, labels=labels)
    lsspec.check_same_shape(fn, "labels", labels.shape, logits.shape)
    pos_weight = _common.array_or_none(fn, "pos_weight", pos_weight)
    if pos_weight is not None:
        lsspec.check_broadcastable(fn, "pos_weight", pos_weight.shape, logits.shape)
    lsspec.check_choice(fn, "reduction", reduction, lsspec.REDUCTIONS)
    lsspec.check_smoothing(fn, _common.concrete_smoothing(fn, smoothing))

    if _common.reads_values(labels):
        values = np.asarray(labels, np.float64)
        outside = (values < 0) | (values > 1)
        if outside.any():
            raise lsspec.binary_labels_error(fn, values[outside].tolist())
    ulp = _common.ulp_of_one(smoothing)
    pos_weight = _common.constant(fn, "pos_weight", pos_weight)
    return _after_checks_jit(reduction, ulp, logits, labels, smoothing, pos_weight)


def _after_checks(reduction, smoothing_ulp, logits, labels, smoothing, pos_weight):
    """Everything after the checks (:data:`_after_checks_jit`): the options as arrays of the
    compute dtype, the elementwise loss and its reduction. ``smoothing_ulp``:
    ``_common.ulp_of_one`` of the smoothing as given."""
    compute_dtype = _common.compute_dtype(logits.dtype)
    eps = _common.smoothing_array(smoothing, compute_dtype, smoothing_ulp)  # d y'/d eps = 1/2 - y
    if pos_weight is not None:
        pos_weight = pos_weight.astype(compute_dtype)
    x = logits.astype(compute_dtype)
    target = labels.astype(compute_dtype) * (1.0 - eps) + eps / 2
    positive = target * jnp.logaddexp(-x, 0.0)
    if pos_weight is not None:
        positive = jax.lax.stop_gradient(pos_weight) * positive
    loss = positive + (1.0 - target) * jnp.logaddexp(x, 0.0)
    # A traced eps, or traced labels, outside [0, 1]:
    loss = jnp.where((eps >= 0) & (eps <= 1) & (labels >= 0) & (labels <= 1), loss, jnp.nan)
    return _common.reduce(loss, jnp.ones(loss.shape, compute_dtype), reduction)


# What runs after the checks, as one program per (reduction, smoothing's dtype, shapes): an eager
# call lowers and runs it once instead of each primitive on its own. Inside a user's jit it is
# inlined.
_after_checks_jit = jax.jit(_after_checks, static_argnums=(0, 1))
