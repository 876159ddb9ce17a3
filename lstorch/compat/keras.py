"""Keras 3's ``categorical_crossentropy`` and ``binary_crossentropy`` in PyTorch.

Twins: ``lsjax.compat.keras``. Keras puts ``y_true`` first, as here.
"""

from __future__ import annotations

import torch

import lsspec
from lstorch import _common
from lstorch.binary import sigmoid_binary_cross_entropy
from lstorch.soft import soft_target_cross_entropy


def categorical_crossentropy(
    y_true: torch.Tensor,
    y_pred: torch.Tensor,
    *,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    axis: int = -1,
) -> torch.Tensor:
    r"""``keras.losses.categorical_crossentropy(y_true, y_pred, from_logits, label_smoothing,
    axis)``: ``t = y_true (1 - eps) + eps / K``, ``-sum_c t_c log p_c`` with ``p`` the softmax
    of logits or Keras's normalised-and-clipped (``[1e-7, 1 - 1e-7]``) probabilities: that is
    ``soft_target_cross_entropy(y_pred, y_true, smoothing=eps, axis=axis)``, on the clipped
    log-probabilities with ``from_log_probs=True`` when ``from_logits=False``.

    Differences: ``K`` is the size of ``axis`` (Keras uses ``y_true.shape[-1]`` whatever
    ``axis`` is; the same for ``axis=-1``); computed in float32 for bf16/fp16 inputs (Keras
    casts ``y_true`` to ``y_pred``'s dtype and computes there).
    """
    fn = "categorical_crossentropy"
    _common.tensors(fn, y_true=y_true, y_pred=y_pred)
    _common.floating(fn, y_pred=y_pred)
    _common.same_device(fn, "y_pred", y_pred.device, y_true=y_true)
    lsspec.check_real(fn, "y_true", y_true)  # Keras's cast would drop an imaginary part
    lsspec.check_flags(fn, from_logits=from_logits)
    lsspec.check_has_class_axis(fn, "y_pred", tuple(y_pred.shape))
    compute_dtype = _common.compute_dtype(y_pred.dtype)
    y_true = y_true.to(compute_dtype)
    if not from_logits:
        lsspec.check_axis(fn, axis, y_pred.ndim)
        probs = y_pred.to(compute_dtype)
        probs = probs / probs.sum(dim=axis, keepdim=True)
        y_pred = torch.log(probs.clamp(lsspec.KERAS_EPSILON, 1.0 - lsspec.KERAS_EPSILON))
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
    y_true: torch.Tensor,
    y_pred: torch.Tensor,
    *,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    axis: int = -1,
) -> torch.Tensor:
    r"""``keras.losses.binary_crossentropy(y_true, y_pred, from_logits, label_smoothing, axis)``:
    labels ``y (1 - eps) + eps / 2``, elementwise sigmoid cross-entropy (probabilities clipped
    to ``[1e-7, 1 - 1e-7]`` when not ``from_logits``), mean over ``axis``: that is
    ``mean(sigmoid_binary_cross_entropy(z, y_true, smoothing=eps), axis)`` with ``z = y_pred``,
    or ``z = log(p) - log(1 - p)`` (the logit of the clipped probability, whose softplus terms
    are exactly ``-log p`` and ``-log(1 - p)``). Computed in float32 for bf16/fp16 inputs.
    """
    fn = "binary_crossentropy"
    _common.tensors(fn, y_true=y_true, y_pred=y_pred)
    _common.floating(fn, y_pred=y_pred)
    _common.same_device(fn, "y_pred", y_pred.device, y_true=y_true)
    lsspec.check_real(fn, "y_true", y_true)  # Keras's cast would drop an imaginary part
    lsspec.check_flags(fn, from_logits=from_logits)
    compute_dtype = _common.compute_dtype(y_pred.dtype)
    if y_pred.ndim == 0:  # Keras's mean over `axis` needs one (NumPy and JAX raise there)
        allowed = "at least one dimension, for the mean"
        raise lsspec.shape_error(fn, "y_pred", tuple(y_pred.shape), allowed)
    lsspec.check_axis(fn, axis, y_pred.ndim)
    if not from_logits:
        probs = y_pred.to(compute_dtype).clamp(lsspec.KERAS_EPSILON, 1.0 - lsspec.KERAS_EPSILON)
        y_pred = torch.log(probs) - torch.log1p(-probs)
    elementwise = sigmoid_binary_cross_entropy(
        y_pred,
        y_true.to(compute_dtype),
        smoothing=label_smoothing,
        _caller=lsspec.caller(
            "binary_crossentropy", logits="y_pred", labels="y_true", smoothing="label_smoothing"
        ),
    )
    return elementwise.mean(dim=axis)
