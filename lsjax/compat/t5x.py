"""T5X's (and the Flax WMT example's) cross-entropy in JAX (twins: ``lstorch.compat.t5x``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import lsspec
from lsjax import _common
from lsjax._common import ArrayLike, as_array
from lsjax.smoothed import smoothed_cross_entropy
from lsjax.soft import soft_target_cross_entropy


def cross_entropy_with_logits(
    logits: ArrayLike, targets: ArrayLike, z_loss: float
) -> tuple[jax.Array, jax.Array]:
    r"""``t5x.losses.cross_entropy_with_logits(logits, targets, z_loss)``, with T5X's gradient.

    Per row (vocabulary axis last), ``lse = logsumexp(logits)``::

        loss   = -sum_c targets_c * (logits_c - lse) + z_loss * lse**2
        z_part = z_loss * lse**2

    returned as ``(loss, z_part)`` (the loss includes the z-part). The value is
    ``lsjax.soft_target_cross_entropy(logits, targets, z_loss=z_loss, return_z_loss=True)``.

    The gradient is T5X's custom one, exactly: ``g * ((1 + 2 z_loss lse) * softmax(logits) -
    targets)`` for the logits and ``-g * log_softmax(logits)`` for the targets, where ``g`` is
    the cotangent of ``loss``. The cotangent of ``z_part`` is ignored (T5X: "only used for
    logging"), and the ``1`` assumes that each row of ``targets`` sums to 1 (for other targets
    this is not the derivative of the loss; T5X does the same). ``z_loss`` gets a zero
    derivative, as in T5X's rule, even when traced (``jax.grad`` with respect to it gives 0;
    :func:`compute_weighted_cross_entropy`, which T5X differentiates by autodiff, gives
    ``sum lse**2``).
    """
    fn = "cross_entropy_with_logits"
    (logits,) = _common.floating(fn, logits=logits)
    targets = as_array(fn, "targets", targets)
    # Checked here, where the value is still concrete (inside the custom_vjp it is traced).
    z_value = _common.concrete_scalar(fn, "z_loss", z_loss)
    lsspec.check_z_loss(fn, z_value, from_log_probs=False, return_z_loss=True)
    compute_dtype = _common.compute_dtype(logits.dtype)
    return _cross_entropy_with_logits_jit(logits, targets, jnp.asarray(z_loss, compute_dtype))


_CROSS_ENTROPY_WITH_LOGITS = lsspec.caller("cross_entropy_with_logits")


@jax.custom_vjp
def _cross_entropy_with_logits(logits, targets, z_loss):
    return soft_target_cross_entropy(
        logits,
        targets,
        z_loss=z_loss,
        return_z_loss=True,
        axis=-1,
        _caller=_CROSS_ENTROPY_WITH_LOGITS,
    )


def _cross_entropy_with_logits_fwd(logits, targets, z_loss):
    return _cross_entropy_with_logits(logits, targets, z_loss), (logits, targets, z_loss)


def _cross_entropy_with_logits_bwd(residuals, cotangents):
    logits, targets, z_loss = residuals
    g = cotangents[0][..., None]  # T5X drops the z-part's cotangent.
    x = logits.astype(z_loss.dtype)
    log_softmax = jax.nn.log_softmax(x, axis=-1)
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    deriv = (1.0 + 2.0 * z_loss * lse) * jnp.exp(log_softmax) - targets.astype(z_loss.dtype)
    return (
        (g * deriv).astype(logits.dtype),
        (-g * log_softmax).astype(targets.dtype),
        jnp.zeros_like(z_loss),
    )


_cross_entropy_with_logits.defvjp(_cross_entropy_with_logits_fwd, _cross_entropy_with_logits_bwd)
# One program per shape for an eager call (its forward and T5X's backward each run as one
# executable, not primitive by primitive); inlined inside a user's jit.
_cross_entropy_with_logits_jit = jax.jit(_cross_entropy_with_logits)


def compute_weighted_cross_entropy(
    logits: ArrayLike,
    targets: ArrayLike,
    weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    loss_normalizing_factor: float | None = None,
    *,
    check_labels: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""``t5x.losses.compute_weighted_cross_entropy``; without ``z_loss``, the Flax WMT/lm1b
    examples' ``compute_weighted_cross_entropy``.

    SEMANTICS.md §6: soft targets ``1 - eps`` on ``targets`` and ``eps / (V - 1)`` elsewhere
    (the ``"others"`` convention), per token::

        -sum_c soft_c (x_c - lse) + z_loss * lse**2 - normalizing_constant

    with ``normalizing_constant`` the targets' entropy (the KL form). Both the loss and the
    z-loss are multiplied by ``weights``, divided by ``loss_normalizing_factor`` and summed.
    Per token that is ``smoothed_cross_entropy(logits, targets, smoothing=label_smoothing,
    convention="others", kl=True, z_loss=z_loss, return_z_loss=True)``.

    Returns ``(sum loss, sum z_loss, weight_sum)``, ``weight_sum = sum(weights)`` or the number
    of targets (here a float array). Gradient: T5X's, ``g w ((1 + 2 z lse) softmax - soft)``
    for the loss; the z-loss output carries none (T5X ignores its cotangent).

    Differences: the normalizing constant is the exact entropy (``xlogy``), where T5X writes
    ``low * log(low + 1e-20)`` (a shift below 1e-19 per token) and ``c * log(c)``, which is NaN
    at ``label_smoothing = 1``; here that case is finite. ``weights`` must have the targets'
    shape, and a concrete ``loss_normalizing_factor`` must be a finite number > 0 (T5X
    broadcasts weights of another shape, e.g. ``(B, 1)`` against ``(B,)`` to ``(B, B)``, and
    divides by any factor). Outputs are float32 for bf16 logits. ``check_labels`` is
    :func:`lsjax.smoothed_cross_entropy`'s: ``False`` reads no concrete value to check it (a
    target out of range gives a NaN row, as under ``jit``).
    """
    fn = "compute_weighted_cross_entropy"
    (logits,) = _common.floating(fn, logits=logits)
    targets = as_array(fn, "targets", targets)
    weights = _common.array_or_none(fn, "weights", weights)
    factor = _common.concrete_scalar(
        fn, "loss_normalizing_factor", loss_normalizing_factor, optional=True,
        check_labels=check_labels,
    )  # fmt: skip
    lsspec.check_t5x_inputs(
        fn, logits.shape, targets.shape, None if weights is None else weights.shape, factor
    )
    loss, z_part = smoothed_cross_entropy(
        logits,
        targets,
        smoothing=label_smoothing,
        convention="others",
        kl=True,
        z_loss=z_loss,
        return_z_loss=True,
        axis=-1,
        check_labels=check_labels,
        _caller=lsspec.caller(fn, labels="targets", smoothing="label_smoothing"),
    )
    z_part = jax.lax.stop_gradient(z_part)  # T5X's custom gradient ignores the z-loss output.
    weight_sum = jnp.asarray(targets.size, loss.dtype)
    if weights is not None:
        weights = weights.astype(loss.dtype)
        loss, z_part = loss * weights, z_part * weights
        weight_sum = jnp.sum(weights)
    if loss_normalizing_factor is not None:
        loss, z_part = loss / loss_normalizing_factor, z_part / loss_normalizing_factor
    return jnp.sum(loss), jnp.sum(z_part), weight_sum
