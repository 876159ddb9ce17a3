"""Cross-entropy against soft (probability) targets in JAX, optionally smoothed.

Twin: ``lstorch.soft_target_cross_entropy``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import lsspec
from lsjax.smoothed import ArrayLike, _concrete_scalar, _reduce


def soft_target_cross_entropy(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    smoothing: float | jax.Array = 0.0,
    weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    axis: int = -1,
    reduction: str = "none",
) -> jax.Array:
    r"""Cross-entropy against a given distribution, mixed with the uniform one.

    With ``t' = (1 - eps) * t + eps / K`` and ``lp = x - logsumexp(x)``, a row's loss is
    ``-sum_c w_c t'_c lp_c``. It is computed from per-row sums, without building ``t'``::

        loss = (1 - eps) * (lse * sum(w t) - sum(w t x)) + (eps/K) * (lse * sum(w) - sum(w x))

    The gradient with respect to the logits is ``g * (A * softmax(x) - w t')`` with
    ``A = sum_c w_c t'_c``.

    Reproduces ``torch.nn.functional.cross_entropy(x, t, weight=w, reduction=r,
    label_smoothing=eps)`` for probability targets (whose ``"mean"`` divides by the number of
    rows even with weights, as here), timm's ``SoftTargetCrossEntropy`` (``eps=0``,
    ``reduction="mean"``) and ``optax.softmax_cross_entropy(x, t)`` (``eps=0``).

    Args:
      logits: float array, class axis ``axis``; bf16/fp16 accumulate in float32.
      targets: float array of the logits' shape (rows need not sum to 1: mixup/cutmix targets
        and distillation targets are taken as given).
      smoothing: ``eps`` in [0, 1].
      weight: per-class weights of shape ``(K,)``, a constant.
      where: boolean row mask of the logits' shape without the class axis.
      axis: the class axis.
      reduction: ``"none"`` | ``"sum"`` | ``"mean"`` (over rows that ``where`` keeps; 0 if none).

    Returns:
      float32 for bf16/fp16/float32 logits, float64 for float64: per row, or a scalar.
    """
    fn = "soft_target_cross_entropy"
    logits = jnp.asarray(logits)
    targets = jnp.asarray(targets)
    for name, value in (("logits", logits), ("targets", targets)):
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise lsspec.dtype_error(fn, name, value.dtype, "a floating dtype")
    if targets.shape != logits.shape:
        raise lsspec.shape_error(fn, "targets", targets.shape, f"the logits' shape {logits.shape}")
    axis = lsspec.check_axis(fn, axis, logits.ndim)
    lsspec.check_choice(fn, "reduction", reduction, lsspec.REDUCTIONS)
    lsspec.check_smoothing(fn, _concrete_scalar(fn, "smoothing", smoothing))
    num_classes = logits.shape[axis]
    row_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
    if weight is not None and jnp.shape(weight) != (num_classes,):
        raise lsspec.shape_error(fn, "weight", jnp.shape(weight), f"shape ({num_classes},)")
    if where is not None and jnp.shape(where) != row_shape:
        raise lsspec.shape_error(fn, "where", jnp.shape(where), f"shape {row_shape}")
    counted = jnp.ones(row_shape, bool) if where is None else jnp.asarray(where, bool)

    compute_dtype = jnp.promote_types(logits.dtype, jnp.float32)
    keep = counted[..., None]
    x = jnp.where(keep, jnp.moveaxis(logits, axis, -1), 0).astype(compute_dtype)
    t = jnp.where(keep, jnp.moveaxis(targets, axis, -1), 0).astype(compute_dtype)
    w = 1.0 if weight is None else jax.lax.stop_gradient(jnp.asarray(weight, compute_dtype))
    eps = jnp.asarray(smoothing, compute_dtype)

    lse = jax.nn.logsumexp(x, axis=-1)
    given = lse * jnp.sum(w * t, axis=-1) - jnp.sum(w * t * x, axis=-1)
    total_w = num_classes if weight is None else jnp.sum(w)
    uniform = (lse * total_w - jnp.sum(w * x, axis=-1)) / num_classes
    loss = jnp.where(eps == 0, given, (1 - eps) * given + eps * uniform)
    loss = jnp.where(counted & (eps >= 0) & (eps <= 1), loss, jnp.where(counted, jnp.nan, 0.0))
    return _reduce(loss, counted.astype(compute_dtype), reduction, None)
