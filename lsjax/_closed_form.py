"""The closed form of the label-smoothed cross-entropy (SEMANTICS.md §1), per row, written once.

Every lsjax loss with integer labels ends here. Each computes a few O(rows) statistics its own
way and hands them over as a :class:`RowTerms`: the dense core (``lsjax.smoothed``) from the
logits, relative to each row's max; the fused linear loss (``lsjax.fused``) chunk by chunk from
the hidden states and the weight, and its vocabulary-sharded form (``lsjax.sharded``) with
all-reduces over the mesh, both relative to 0. :func:`row_loss` and :func:`smoothing_slope`
turn them into the per-row loss and its derivative in the smoothing. The Pallas kernels
(``lsjax.pallas_kernels``) are the only other statement of the formula; they share the pieces
here that run outside the kernel (:func:`support_size`, :func:`label_rows`, the KL constant).
The PyTorch twin of this module is ``lstorch._closed_form``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

import lsspec
from lsjax._common import Array, times, xlogx


class RowStats(NamedTuple):
    """Per-row statistics of the (transformed) logits, returned by ``return_stats=True``, taken in
    the pass that computes the loss. Each has the shape of the per-row loss; rows that do not
    count hold 0, 0 and False. They carry no gradient (constants to autodiff).

    ``lse``: ``logsumexp(t)`` of the transformed logits ``t`` over the allowed classes.
    ``entropy``: ``-sum_c p_c log p_c`` of ``p = softmax(t)`` (over the allowed classes).
    ``correct``: whether the first maximal logit (``torch.argmax``'s tie rule) over the allowed
    classes is the label. The argmax is taken on the logits before the transform: ``softcap``
    and ``logit_scale > 0`` are strictly increasing, so it is the transformed logits' argmax,
    without the ties a saturated ``tanh`` can make in float32. The mean of ``correct`` over the
    rows that count is the token accuracy.
    """

    lse: Array
    entropy: Array
    correct: Array


def transformed(x: Array, transform: lsspec.LogitTransform, scale=None, cap=None) -> Array:
    """``t = cap * tanh(scale * x / cap)`` (``scale * x`` without a cap), elementwise on ``x``
    in its compute dtype: applied where each reduction reads ``x``, so XLA fuses it there.
    ``scale``/``cap``: the transform's values as 0-d arrays to use instead of its floats (the
    dense core passes them through a barrier, see ``lsjax.smoothed._transformed_alone``)."""
    scale = transform.scale if scale is None else scale
    cap = transform.cap if cap is None else cap
    if transform.scale != 1.0:
        x = x * scale
    if transform.cap is not None:
        x = cap * jnp.tanh(x / cap)
    return x


def transform_slope(x: Array, transform: lsspec.LogitTransform, scale=None, cap=None) -> Array:
    """``dt/dx = scale * (1 - tanh(scale * x / cap)**2)`` (``scale`` without a cap: a 0-d
    array); ``scale``/``cap`` as in :func:`transformed`."""
    scale = jnp.asarray(transform.scale, x.dtype) if scale is None else scale
    if transform.cap is None:
        return scale
    cap = transform.cap if cap is None else cap
    return scale * (1.0 - jnp.square(jnp.tanh((x * scale) / cap)))


def support_size(
    convention: str, num_classes: int, pad_index=None, class_mask=None, dtype=None
) -> Any:
    """``|S|``, the number of classes the smoothing goes to: a static int, or a scalar array
    under a ``class_mask`` (masked classes leave the support), of ``dtype`` when given (the
    loss's compute dtype: an integer count would promote a float32 loss to float64 under
    ``jax_enable_x64``)."""
    size = lsspec.support_size(convention, num_classes)
    if class_mask is None:
        return size
    size = size - jnp.sum(~class_mask)
    if convention == "others_but_pad":
        # a masked pad is not excluded twice
        size = size + (~class_mask[pad_index]).astype(size.dtype)
    return size if dtype is None else size.astype(dtype)


def label_rows(labels, counted, eps, num_classes: int, class_mask=None) -> tuple[Array, Array]:
    """``(safe_labels, bad)``: the labels, 0 where the row does not count or the label is out of
    range (safe to gather with); and the counted rows whose label is out of range or masked,
    or any counted row under a (traced) smoothing outside [0, 1]. Those give NaN, never a
    plausible number."""
    in_range = (labels >= 0) & (labels < num_classes)
    safe_labels = jnp.where(counted & in_range, labels, 0)
    valid = in_range & (eps >= 0) & (eps <= 1)
    if class_mask is not None:
        valid = valid & class_mask[safe_labels]
    return safe_labels, counted & ~valid


class RowTerms(NamedTuple):
    """The O(rows) statistics the closed form is written in (one value per row unless noted).

    Every statistic is taken relative to a per-row shift, ``peak``: the dense core uses the
    row's max, so that ``support_sum = sum_{c in S} w_c (x_c - peak)`` (times
    ``sum_scale = lsspec.sum_scale(K)``, a power of two) has terms <= 0 and cannot overflow
    float32 where the loss is finite (``[[3e38, 3e38, 0]]`` sums to ``inf`` unshifted), and the
    softmax is ``exp((x_c - peak) - log_sum)``. The fused losses, whose support sum is a rank-1
    product ``hidden . sum_c W_c`` of unshifted logits, use ``peak = 0``, ``log_sum = lse`` and
    ``sum_scale = 1``.
    """

    lse: Array  # logsumexp over the allowed classes, peak + log_sum (0 with from_log_probs)
    peak: Any  # the shift: the row's max over the allowed classes (0 where not finite), or 0
    log_sum: Array  # log sum_c exp(x_c - peak) over the allowed classes (0 for log-probs)
    x_y: Array  # the label's logit
    w_y: Any  # the label's class weight (1.0 without weights)
    support_sum: Array  # sum over S of w_c (x_c - peak), times sum_scale
    support_weight: Any  # sum over S of w_c
    safe_labels: Array  # labels, 0 where not counted or out of range
    bad: Array  # counted rows with an invalid label or smoothing: NaN
    size: Any  # |S|: a static int, or a scalar array under a class_mask
    sum_scale: float  # the power of two support_sum is scaled by

    def true_term(self) -> Array:
        """``w_y (lse - x_y)``, the label's cross-entropy term."""
        return self.w_y * ((self.peak - self.x_y) + self.log_sum)

    def smooth_term(self) -> Array:
        """``sum_{c in S} w_c (lse - x_c) / |S|``, the smoothing's cross-entropy term."""
        mean_offset = (self.support_sum / self.size) * (1.0 / self.sum_scale)  # exact scaling
        return self.support_weight * self.log_sum / self.size - mean_offset


def counted_only(counted, bad, value):
    """Per-row ``value``: 0 on rows that do not count, NaN on counted rows that are invalid."""
    return jnp.where(counted, jnp.where(bad, jnp.nan, value), 0.0)


def on_target_mass(convention: str, eps, size):
    """``q_y``, the smoothed target's mass on the label: ``1 - eps (+ eps / |S|)``."""
    confidence = 1.0 - eps
    return confidence + eps / size if convention == "uniform" else confidence


def kl_terms(convention: str, eps, size) -> tuple[Array, Array]:
    """``sum_c q_c log q_c`` of the smoothed target (a constant per row, added by ``kl=True``)
    as its two terms, the label's and the other classes', to be added in that order."""
    off_target_count = size - 1 if convention == "uniform" else size
    return xlogx(on_target_mass(convention, eps, size)), off_target_count * xlogx(eps / size)


def kl_slope(convention: str, eps, size):
    """``d/d eps`` of the KL constant: ``c (log(eps / |S|) - log q_y)`` (``c = (|S| - 1) / |S|``
    uniform, else 1). It is infinite at the ends (``x log x`` at 0); this gives the one-sided
    limits inside [0, 1]: ``-inf`` at ``eps = 0``, ``+inf`` at ``eps = 1`` for
    ``"others"``/``"others_but_pad"`` (where ``q_y = 1 - eps`` reaches 0)."""
    slope = jnp.log(eps / size) - jnp.log(on_target_mass(convention, eps, size))
    if convention == "uniform":  # q_y moves by (|S| - 1) / |S| per unit of eps
        slope = times((size - 1) / size, slope)
    return slope


def row_loss(terms: RowTerms, counted, eps, *, convention: str, kl: bool = False, z=None):
    """The per-row loss, 0 on rows that do not count and NaN on invalid ones::

        (1 - eps) w_y (lse - x_y) + eps sum_{c in S} w_c (lse - x_c) / |S|
          [+ sum_c q_c log q_c with kl]  [+ z lse**2 with a z-loss weight z]

    With ``z`` (an array, not None) it returns ``(loss, z_part)``, the loss including the
    z-part. ``times`` keeps each term exactly 0 where its factor is 0, even where the term is
    infinite (smoothing 0 and a -inf logit).
    """
    true_term = terms.true_term()
    smooth_term = terms.smooth_term()
    loss = times(1.0 - eps, true_term) + times(eps, smooth_term)
    if kl:  # Subtract the entropy of q: add sum_c q_c log q_c, a constant per row.
        on_target_term, off_target_term = kl_terms(convention, eps, terms.size)
        loss = loss + on_target_term
        loss = loss + off_target_term
    if z is None:
        return counted_only(counted, terms.bad, loss)
    z_part = jnp.where(terms.bad, jnp.nan, times(z, jnp.square(terms.lse)))
    loss = jnp.where(terms.bad, jnp.nan, loss + z_part)
    return jnp.where(counted, loss, 0.0), jnp.where(counted, z_part, 0.0)


def smoothing_slope(terms: RowTerms, eps, *, convention: str, kl: bool = False):
    """``d loss_row / d eps``, per row (before masking): the smoothing term minus the label's,
    ``-w_y (lse - x_y) + sum_{c in S} w_c (lse - x_c) / |S|``, plus with ``kl=True``
    :func:`kl_slope` (whose one-sided limits are taken at the ends)."""
    slope = terms.smooth_term() - terms.true_term()
    if kl:
        slope = slope + kl_slope(convention, eps, terms.size)
    return slope
