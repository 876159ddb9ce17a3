"""Keras 3's ``categorical_crossentropy`` and ``binary_crossentropy`` in JAX.

Twins: ``lstorch.compat.keras``. Keras puts ``y_true`` first, as here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import lsspec
from lsjax import _common
from lsjax._common import ArrayLike, as_array
from lsjax.binary import sigmoid_binary_cross_entropy
from lsjax.soft import soft_target_cross_entropy


def _real(fn: str, name: str, value: ArrayLike) -> jax.Array:
    """``value`` as an array, not complex (Keras's cast would drop an imaginary part)."""
    value = as_array(fn, name, value)
    lsspec.check_real(fn, name, value)
    return value


def categorical_crossentropy(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    axis: int = -1,
) -> jax.Array:
    r"""``keras.losses.categorical_crossentropy(y_true, y_pred, from_logits, label_smoothing,
    axis)`` (and ``CategoricalCrossentropy(...)`` with ``reduction=None``).

    ``t = y_true * (1 - eps) + eps / K`` (uniform), per row ``-sum_c t_c log p_c`` with
    ``log p = log_softmax(y_pred)`` when ``from_logits``, else ``log(clip(y_pred / sum(y_pred),
    1e-7, 1 - 1e-7))`` (Keras's normalise-and-clip of probabilities). That is
    ``soft_target_cross_entropy(y_pred, y_true, smoothing=eps, axis=axis)``, on the clipped
    log-probabilities with ``from_log_probs=True`` when ``from_logits=False``.

    Differences: ``K`` is the size of ``axis`` (Keras uses ``y_true.shape[-1]`` whatever
    ``axis`` is; the same for ``axis=-1``); computed in float32 for bf16/fp16 inputs (Keras
    casts ``y_true`` to ``y_pred``'s dtype and computes there).
    """
    fn = "categorical_crossentropy"
    lsspec.check_flags(fn, from_logits=from_logits)
    (y_pred,) = _common.floating(fn, y_pred=y_pred)
    lsspec.check_has_class_axis(fn, "y_pred", y_pred.shape)
    compute_dtype = _common.compute_dtype(y_pred.dtype)
    y_true = _real(fn, "y_true", y_true).astype(compute_dtype)
    if not from_logits:
        lsspec.check_axis(fn, axis, y_pred.ndim)
        probs = y_pred.astype(compute_dtype)
        probs = probs / jnp.sum(probs, axis=axis, keepdims=True)
        y_pred = jnp.log(jnp.clip(probs, lsspec.KERAS_EPSILON, 1.0 - lsspec.KERAS_EPSILON))
    return soft_target_cross_entropy(
        y_pred,
        y_true,
        smoothing=label_smoothing,
        axis=axis,
        from_log_probs=not from_logits,
        _caller=lsspec.caller(
            "categorical_crossentropy",
            logits="y_pred",
            targets="y_true",
            smoothing="label_smoothing",
        ),
    )


def binary_crossentropy(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    axis: int = -1,
) -> jax.Array:
    r"""``keras.losses.binary_crossentropy(y_true, y_pred, from_logits, label_smoothing, axis)``.

    Each label becomes ``y' = y * (1 - eps) + eps / 2``; elementwise
    ``-[y' log p + (1 - y') log(1 - p)]`` with ``p = sigmoid(y_pred)`` when ``from_logits``,
    else ``p = clip(y_pred, 1e-7, 1 - 1e-7)``; then the mean over ``axis``. That is
    ``mean(sigmoid_binary_cross_entropy(z, y_true, smoothing=eps), axis)`` with ``z = y_pred``,
    or ``z = log(p) - log(1 - p)`` (the logit of the clipped probability, whose softplus terms
    are exactly ``-log p`` and ``-log(1 - p)``). Computed in float32 for bf16/fp16 inputs.
    """
    fn = "binary_crossentropy"
    lsspec.check_flags(fn, from_logits=from_logits)
    (y_pred,) = _common.floating(fn, y_pred=y_pred)
    compute_dtype = _common.compute_dtype(y_pred.dtype)
    if y_pred.ndim == 0:  # Keras's mean over `axis` needs one (NumPy and JAX raise there)
        raise lsspec.shape_error(fn, "y_pred", y_pred.shape, "at least one dimension, for the mean")
    lsspec.check_axis(fn, axis, y_pred.ndim)
    if not from_logits:
        probs = jnp.clip(
            y_pred.astype(compute_dtype), lsspec.KERAS_EPSILON, 1.0 - lsspec.KERAS_EPSILON
        )
        y_pred = jnp.log(probs) - jnp.log1p(-probs)
    elementwise = sigmoid_binary_cross_entropy(
        y_pred,
        _real(fn, "y_true", y_true).astype(compute_dtype),
        smoothing=label_smoothing,
        _caller=lsspec.caller(
            "binary_crossentropy", logits="y_pred", labels="y_true", smoothing="label_smoothing"
        ),
    )
    return jnp.mean(elementwise, axis=axis)
