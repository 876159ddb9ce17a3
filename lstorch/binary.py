"""Binary / multi-label cross-entropy from logits with label smoothing, in PyTorch.

Twin: ``lsjax.sigmoid_binary_cross_entropy``.
"""

from __future__ import annotations

import torch

import lsspec
from lstorch import _common


def sigmoid_binary_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    smoothing: float | torch.Tensor = 0.0,
    pos_weight: torch.Tensor | None = None,
    reduction: str = "none",
    _caller: lsspec.Caller | None = None,
) -> torch.Tensor:
    r"""Sigmoid cross-entropy of every element, labels smoothed toward 1/2 (PyTorch).

    With ``y' = y * (1 - eps) + eps / 2`` and ``softplus(z) = logaddexp(z, 0)`` (never
    ``log(sigmoid)``)::

        loss = pos_weight * y' * softplus(-x) + (1 - y') * softplus(x)

    with the gradient ``sigmoid(x) (pos_weight y' + 1 - y') - pos_weight y'``. Reproduces
    ``torch.nn.functional.binary_cross_entropy_with_logits(x, y', pos_weight=pw,
    reduction=r)`` and, averaged over the last axis, Keras ``BinaryCrossentropy(from_logits=True,
    label_smoothing=eps)`` (``lstorch.compat.keras``). Its JAX twin is
    ``lsjax.sigmoid_binary_cross_entropy``.

    Args:
      logits: float tensor of any shape; bf16/fp16 are computed in float32.
      labels: float tensor of the logits' shape, targets in [0, 1] (multi-label, soft or hard).
        Outside [0, 1] (torch computes a number, negative for a label of -1) a CPU tensor
        raises; a tensor that is not read gives NaN elements there.
      smoothing: ``eps`` in [0, 1]: each label becomes ``y * (1 - eps) + eps / 2``. A number or
        a CPU tensor outside [0, 1] raises; a tensor that is not read (on an accelerator, under
        ``torch.compile``/``vmap``) gives NaN. A tensor that requires grad is differentiated,
        ``d loss / d eps = (1/2 - y) (pos_weight softplus(-x) - softplus(x))``.
      pos_weight: weight of the positive term, broadcast against the logits (torch's
        ``pos_weight``, e.g. shape ``(C,)``; a number or a list too); a constant.
      reduction: ``"none"`` (elementwise), ``"sum"`` or ``"mean"`` (over all elements).

    Returns:
      float32 for bf16/fp16/float32 logits, float64 for float64.

    ``_caller`` is internal (who errors name).
    """
    fn = lsspec.caller("sigmoid_binary_cross_entropy", _caller)
    _common.floating(fn, logits=logits, labels=labels)
    _common.same_device(fn, "logits", logits.device, labels=labels)
    lsspec.check_same_shape(fn, "labels", tuple(labels.shape), tuple(logits.shape))
    pos_weight = _common.tensor_option(fn, "pos_weight", pos_weight, logits.device)
    if pos_weight is not None:
        lsspec.check_broadcastable(fn, "pos_weight", tuple(pos_weight.shape), tuple(logits.shape))
    lsspec.check_choice(fn, "reduction", reduction, lsspec.REDUCTIONS)
    lsspec.check_smoothing(fn, _common.concrete_smoothing(fn, smoothing))
    if _common.reads_values(labels):
        outside = (labels < 0) | (labels > 1)
        if outside.any():
            raise lsspec.binary_labels_error(fn, labels[outside].detach().double().tolist())

    compute_dtype = _common.compute_dtype(logits.dtype)
    x = logits.to(compute_dtype)
    eps = _common.smoothing_tensor(smoothing, compute_dtype, x.device)  # d y' / d eps = 1/2 - y
    zero = torch.zeros((), dtype=compute_dtype, device=x.device)
    target = labels.to(compute_dtype) * (1.0 - eps) + eps / 2
    positive = target * torch.logaddexp(-x, zero)
    if pos_weight is not None:
        positive = pos_weight.detach().to(compute_dtype) * positive
    loss = positive + (1.0 - target) * torch.logaddexp(x, zero)
    # A tensor eps, or labels that were not read, outside [0, 1]:
    in_range = (eps >= 0) & (eps <= 1) & (labels >= 0) & (labels <= 1)
    loss = torch.where(in_range, loss, torch.nan)
    return _common.reduce(loss, torch.ones_like(loss), reduction)
