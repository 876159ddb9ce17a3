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

    With ``y' = y * (1 - eps) + eps / 2``::

        loss = pos_weight * y' * softplus(-x) + (1 - y') * softplus(x)

    (``softplus(z) = logaddexp(z, 0)``), gradient ``sigmoid(x) (pos_weight y' + 1 - y') -
    pos_weight y'``. Same keywords and semantics as ``lsjax.sigmoid_binary_cross_entropy`` (a
    ``smoothing`` tensor that requires grad is differentiated).
    Reproduces ``torch.nn.functional.binary_cross_entropy_with_logits(x, y', pos_weight=pw,
    reduction=r)``; returns float32 for bf16/fp16/float32 logits and float64 for float64.
    A number or CPU tensor ``smoothing`` outside [0, 1] raises; one that is not read (on an
    accelerator, under ``torch.compile``/``vmap``) gives NaN. ``_caller`` is internal (who
    errors name).
    """
    fn = lsspec.caller("sigmoid_binary_cross_entropy", _caller)
    _common.floating(fn, logits=logits, labels=labels)
    lsspec.check_same_shape(fn, "labels", tuple(labels.shape), tuple(logits.shape))
    if pos_weight is not None:
        lsspec.check_broadcastable(fn, "pos_weight", tuple(pos_weight.shape), tuple(logits.shape))
    lsspec.check_choice(fn, "reduction", reduction, lsspec.REDUCTIONS)
    lsspec.check_smoothing(fn, _common.concrete_smoothing(fn, smoothing))

    compute_dtype = _common.compute_dtype(logits.dtype)
    x = logits.to(compute_dtype)
    eps = _common.smoothing_tensor(smoothing, compute_dtype, x.device)  # d y' / d eps = 1/2 - y
    zero = torch.zeros((), dtype=compute_dtype, device=x.device)
    target = labels.to(compute_dtype) * (1.0 - eps) + eps / 2
    positive = target * torch.logaddexp(-x, zero)
    if pos_weight is not None:
        positive = pos_weight.detach().to(compute_dtype) * positive
    loss = positive + (1.0 - target) * torch.logaddexp(x, zero)
    loss = torch.where((eps >= 0) & (eps <= 1), loss, torch.nan)  # a tensor eps outside [0, 1]
    return _common.reduce(loss, torch.ones_like(loss), reduction)
