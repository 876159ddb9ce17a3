"""Cross-entropy against soft (probability) targets in JAX, optionally smoothed.

Twin: ``lstorch.soft_target_cross_entropy``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

import lsspec
from lsjax import _common
from lsjax._common import ArrayLike, times


def soft_target_cross_entropy(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    smoothing: float | jax.Array = 0.0,
    weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    axis: int = -1,
    reduction: str = "none",
    from_log_probs: bool = False,
    z_loss: float | jax.Array = 0.0,
    return_z_loss: bool = False,
    _caller: lsspec.Caller | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Cross-entropy against a given distribution, mixed with the uniform one.

    With ``t' = (1 - eps) * t + eps / K`` and ``lp = x - logsumexp(x)``, a row's loss is
    ``-sum_c w_c t'_c lp_c``. It is computed from per-row sums, without building ``t'``::

        loss = (1 - eps) * (lse * sum(w t) - sum(w t x)) + (eps/K) * (lse * sum(w) - sum(w x))

    The gradient with respect to the logits is ``g * (A * softmax(x) - w t')`` with
    ``A = sum_c w_c t'_c``. ``from_log_probs=True`` takes ``x`` as log-probabilities
    (``lse = 0``, gradient ``-w t'``); ``z_loss = z`` adds ``z * lse**2`` per counted row and
    ``return_z_loss=True`` returns ``(loss, z_part)``, the loss including the z-part.

    Reproduces ``torch.nn.functional.cross_entropy(x, t, weight=w, reduction=r,
    label_smoothing=eps)`` for probability targets (whose ``"mean"`` divides by the number of
    rows even with weights, as here), timm's ``SoftTargetCrossEntropy`` (``eps=0``,
    ``reduction="mean"``) and ``optax.softmax_cross_entropy(x, t)`` (``eps=0``).

    Args:
      logits: float array, class axis ``axis``; bf16/fp16 accumulate in float32.
      targets: float array of the logits' shape (rows need not sum to 1: mixup/cutmix targets
        and distillation targets are taken as given).
      smoothing: ``eps`` in [0, 1]; differentiable (at 0 and 1 too: the loss is linear in it).
      weight: per-class weights of shape ``(K,)``, a constant.
      where: boolean row mask of the logits' shape without the class axis.
      axis: the class axis.
      reduction: ``"none"`` | ``"sum"`` | ``"mean"`` (over rows that ``where`` keeps; 0 if none).
      from_log_probs: ``logits`` are log-probabilities: the loss is ``-sum_c w_c t'_c x_c``.
      z_loss: ``z >= 0``, adds ``z * logsumexp(x)**2`` per counted row (needs logits);
        differentiable, ``d loss_row / d z = lse**2``.
      return_z_loss: return ``(loss, z_part)`` (the loss includes the z-part), reduced alike.
      _caller: internal, the public function that called this one for the user (its name is
        the one errors give).

    Concrete options are checked as in :func:`lsjax.smoothed_cross_entropy`; traced ones give
    NaN rows when out of range (``smoothing`` more than 4 ulps outside [0, 1], ``z_loss``
    negative or not finite).

    Returns:
      float32 for bf16/fp16/float32 logits, float64 for float64: per row, or a scalar.
    """
    fn = lsspec.caller("soft_target_cross_entropy", _caller)
    weight = _common.array_or_none(fn, "weight", weight)
    where = _common.array_or_none(fn, "where", where)
    logits, targets = _common.floating(fn, logits=logits, targets=targets)
    lsspec.check_has_class_axis(fn, "logits", logits.shape)
    lsspec.check_same_shape(fn, "targets", targets.shape, logits.shape)
    axis = lsspec.check_axis(fn, axis, logits.ndim)
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
    # z-loss is compiled in only when it can matter: a concrete 0 leaves the program unchanged.
    with_z = return_z_loss or not (lsspec.is_number(z_value) and z_value == 0)
    layout = _Layout(axis, reduction, from_log_probs, return_z_loss, _common.ulp_of_one(smoothing))
    z_loss = z_loss if with_z else None
    weight = _common.constant(fn, "weight", weight)
    return _after_checks_jit(layout, logits, targets, where, smoothing, weight, z_loss)


class _Layout(NamedTuple):
    """The static options of :func:`_after_checks`."""

    axis: int
    reduction: str
    from_log_probs: bool
    return_z_loss: bool
    smoothing_ulp: float  # _common.ulp_of_one of the smoothing as given


def _after_checks(layout, logits, targets, where, smoothing, weight, z_loss):
    """Everything after the checks (:data:`_after_checks_jit`): the options as arrays of the
    compute dtype, the per-row sums of the closed form, the z-part (``z_loss`` None: none) and
    the reduction."""
    num_classes = logits.shape[layout.axis]
    compute_dtype = _common.compute_dtype(logits.dtype)
    rows = lsspec.row_shape(logits.shape, layout.axis)
    counted = jnp.ones(rows, bool) if where is None else where.astype(bool)
    eps = _common.smoothing_array(smoothing, compute_dtype, layout.smoothing_ulp)
    weight = None if weight is None else weight.astype(compute_dtype)
    z = None if z_loss is None else _common.z_loss_array(z_loss, compute_dtype)
    keep = counted[..., None]
    x = jnp.where(keep, jnp.moveaxis(logits, layout.axis, -1), 0).astype(compute_dtype)
    t = jnp.where(keep, jnp.moveaxis(targets, layout.axis, -1), 0).astype(compute_dtype)
    w = 1.0 if weight is None else jax.lax.stop_gradient(weight)
    if layout.from_log_probs:
        lse = jnp.zeros(x.shape[:-1], compute_dtype)
    else:
        lse = jax.nn.logsumexp(x, axis=-1)
    given = lse * jnp.sum(w * t, axis=-1) - jnp.sum(w * t * x, axis=-1)
    total_w = num_classes if weight is None else jnp.sum(w)
    uniform = (lse * total_w - jnp.sum(w * x, axis=-1)) / num_classes
    # _times: exactly `given` at eps = 0 (an infinite uniform term does not leak), and its
    # derivative with respect to eps is `uniform - given` there too.
    loss = times(1.0 - eps, given) + times(eps, uniform)
    valid = counted & (eps >= 0) & (eps <= 1)
    z_part = None if z is None else z * jnp.square(lse)
    if z_part is not None:
        loss = loss + z_part
    loss = jnp.where(valid, loss, jnp.where(counted, jnp.nan, 0.0))
    row_weight = counted.astype(compute_dtype)
    if layout.return_z_loss:
        z_part = jnp.where(valid, z_part, jnp.where(counted, jnp.nan, 0.0))
        return (
            _common.reduce(loss, row_weight, layout.reduction, None),
            _common.reduce(z_part, row_weight, layout.reduction, None),
        )
    return _common.reduce(loss, row_weight, layout.reduction, None)


# What runs after the checks, as one program per (layout, shapes): an eager call (and eager grad
# or vmap) lowers and runs it once, instead of the dozens of primitives it holds each dispatched
# (and, for a new shape, lowered) on its own. Inside a user's jit it is inlined.
_after_checks_jit = jax.jit(_after_checks, static_argnums=(0,))
