"""Cross-entropy against soft (probability) targets in PyTorch, optionally smoothed.

Twin: ``lsjax.soft_target_cross_entropy``.
"""

from __future__ import annotations

import torch

import lsspec
from lstorch import _common
from lstorch._common import scaled


def soft_target_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    smoothing: float | torch.Tensor = 0.0,
    weight: torch.Tensor | None = None,
    where: torch.Tensor | None = None,
    axis: int | None = None,
    reduction: str = "none",
    from_log_probs: bool = False,
    z_loss: float | torch.Tensor = 0.0,
    return_z_loss: bool = False,
    _caller: lsspec.Caller | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Cross-entropy against a given distribution, mixed with the uniform one (PyTorch).

    With ``t' = (1 - eps) * t + eps / K`` and ``lp = x - logsumexp(x)``, a row's loss is
    ``-sum_c w_c t'_c lp_c``, computed from per-row sums without building ``t'``::

        loss = (1 - eps) * (lse * sum(w t) - sum(w t x)) + (eps/K) * (lse * sum(w) - sum(w x))

    The gradient with respect to the logits is ``g * (A * softmax(x) - w t')`` with
    ``A = sum_c w_c t'_c``. Reproduces ``torch.nn.functional.cross_entropy(x, t, weight=w,
    reduction=r, label_smoothing=eps)`` for probability targets (class axis ``axis``;
    ``"mean"`` divides by the number of rows that ``where`` keeps, even with weights, as torch
    does), timm's ``SoftTargetCrossEntropy`` (``eps=0``, ``reduction="mean"``) and
    ``optax.softmax_cross_entropy(x, t)`` (``eps=0``). Its JAX twin is
    ``lsjax.soft_target_cross_entropy``.

    Args:
      logits: float tensor, the classes on ``axis``; bf16/fp16 accumulate in float32.
      targets: float tensor of the logits' shape (rows need not sum to 1: mixup/cutmix targets
        and distillation targets are taken as given).
      smoothing: ``eps`` in [0, 1], a number or a one-element tensor (read and checked when it
        can be: a number or a CPU tensor; otherwise NaN rows outside [0, 1]). A tensor that
        requires grad is differentiated, at 0 and 1 too (the loss is linear in it).
      weight: per-class weights of shape ``(K,)`` (a tensor or a list), a constant.
      where: boolean row mask of the logits' shape without the class axis.
      axis: the class axis. ``None`` (the default) is the last axis of 1-D and 2-D logits;
        logits with 3 or more dimensions need it (1 for torch's ``(N, C, d1, ...)``, -1 for
        the classes last), as in :func:`lstorch.smoothed_cross_entropy`.
      reduction: ``"none"`` | ``"sum"`` | ``"mean"`` (over rows that ``where`` keeps; 0 if none).
      from_log_probs: ``logits`` are log-probabilities: the loss is ``-sum_c w_c t'_c x_c``.
      z_loss: ``z >= 0``, adds ``z * logsumexp(x)**2`` per counted row (needs logits); read
        and checked as ``smoothing``; a tensor that requires grad is differentiated,
        ``d loss_row / d z = lse**2``.
      return_z_loss: return ``(loss, z_part)`` (the loss includes the z-part), reduced alike.

    Returns:
      float32 for bf16/fp16/float32 logits, float64 for float64: per row, or a scalar.

    ``_caller`` is internal (who errors name).
    """
    fn = lsspec.caller("soft_target_cross_entropy", _caller)
    _common.floating(fn, logits=logits, targets=targets)
    _common.same_device(fn, "logits", logits.device, targets=targets)
    lsspec.check_has_class_axis(fn, "logits", tuple(logits.shape))
    lsspec.check_same_shape(fn, "targets", tuple(targets.shape), tuple(logits.shape))
    axis = _common.class_axis(fn, axis, logits.ndim, tuple(logits.shape))
    weight = _common.tensor_option(fn, "weight", weight, logits.device)
    where = _common.tensor_option(fn, "where", where, logits.device)
    lsspec.check_choice(fn, "reduction", reduction, lsspec.REDUCTIONS)
    lsspec.check_smoothing(fn, _common.concrete_smoothing(fn, smoothing))
    z_value = _common.concrete_scalar(fn, "z_loss", z_loss)
    lsspec.check_z_loss(fn, z_value, from_log_probs=from_log_probs, return_z_loss=return_z_loss)
    num_classes = logits.shape[axis]
    lsspec.check_some_classes(fn, num_classes)
    rows = lsspec.row_shape(logits.shape, axis)
    lsspec.check_row_options_shapes(
        fn, num_classes, rows, weight=weight, where=where, has_labels=False
    )
    _common.check_bool(fn, "where", where)
    counted = (
        torch.ones(rows, dtype=torch.bool, device=logits.device)
        if where is None
        else where.to(torch.bool)
    )

    compute_dtype = _common.compute_dtype(logits.dtype)
    keep = counted.unsqueeze(-1)
    x = torch.where(keep, logits.movedim(axis, -1), 0).to(compute_dtype)
    t = torch.where(keep, targets.movedim(axis, -1), 0).to(compute_dtype)
    w = 1.0 if weight is None else weight.detach().to(compute_dtype)
    eps = _common.smoothing_tensor(smoothing, compute_dtype, logits.device)  # differentiated

    if from_log_probs:
        lse = torch.zeros(x.shape[:-1], dtype=compute_dtype, device=x.device)
    else:
        lse = torch.logsumexp(x, dim=-1)
    given = lse * (w * t).sum(-1) - (w * t * x).sum(-1)
    total_w = num_classes if weight is None else w.sum()
    uniform = (lse * total_w - (w * x).sum(-1)) / num_classes
    # _scaled: exactly `given` at eps = 0 (an infinite uniform term does not leak), and its
    # derivative with respect to eps is `uniform - given` there too (torch.where's would be 0).
    loss = scaled(1.0 - eps, given) + scaled(eps, uniform)
    valid = counted & (eps >= 0) & (eps <= 1)
    z_part = _common.z_loss_tensor(z_loss, compute_dtype, x.device) * lse.square()
    if return_z_loss or isinstance(z_loss, torch.Tensor) or z_value != 0:
        loss = loss + z_part
    # NaN on the counted rows of a smoothing outside [0, 1], 0 on the others; a NaN of the
    # loss's dtype (torch.where of two Python numbers takes torch's default dtype, and with
    # torch.set_default_dtype(torch.float64) the float32 loss came back float64)
    invalid = torch.where(counted, torch.full_like(lse, torch.nan), 0.0)
    loss = torch.where(valid, loss, invalid)
    row_weight = counted.to(compute_dtype)
    if return_z_loss:
        z_part = torch.where(valid, z_part, invalid)
        return (
            _common.reduce(loss, row_weight, reduction, None),
            _common.reduce(z_part, row_weight, reduction, None),
        )
    return _common.reduce(loss, row_weight, reduction, None)
