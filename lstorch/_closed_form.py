"""The closed form of the label-smoothed cross-entropy (SEMANTICS.md §1), per row, written once.

Every lstorch loss with integer labels ends here. Each computes a few O(rows) statistics its own
way and hands them over as a :class:`RowTerms`: the dense core (``lstorch.smoothed``) from the
logits, relative to each row's max; the fused linear loss (``lstorch.fused``) chunk by chunk
from the hidden states and the weight, and the vocabulary-parallel one
(``lstorch.distributed``) with all-reduces over the process group, both relative to 0.
:func:`row_loss` and :func:`smoothing_slope` turn them into the per-row loss and its derivative
in the smoothing. The Triton kernels (``lstorch.triton_kernels``) are the only other statement
of the formula; their scalars come from the pieces here (:func:`support_size`,
:func:`kl_terms`). The JAX twin of this module is ``lsjax._closed_form``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

import lsspec
from lstorch._common import at_labels, times, xlogx

IDENTITY = lsspec.LogitTransform()


class RowStats(NamedTuple):
    """Per-row statistics of the (transformed) logits, returned by ``return_stats=True``, taken in
    the pass that computes the loss. Each has the shape of the per-row loss; rows that do not
    count hold 0, 0 and False. They carry no gradient (detached).

    ``lse``: ``logsumexp(t)`` of the transformed logits ``t`` over the allowed classes.
    ``entropy``: ``-sum_c p_c log p_c`` of ``p = softmax(t)`` (over the allowed classes).
    ``correct``: whether the first maximal logit (``torch.argmax``'s tie rule) over the allowed
    classes is the label. The argmax is taken on the logits before the transform: ``softcap``
    and ``logit_scale > 0`` are strictly increasing, so it is the transformed logits' argmax,
    without the ties a saturated ``tanh`` can make in float32. The mean of ``correct`` over the
    rows that count is the token accuracy. The JAX twin is ``lsjax.RowStats``.
    """

    lse: torch.Tensor
    entropy: torch.Tensor
    correct: torch.Tensor


def transformed(x: torch.Tensor, transform: lsspec.LogitTransform) -> torch.Tensor:
    """``t = cap * tanh(scale * x / cap)`` (``scale * x`` without a cap): ``x`` itself for the
    identity, else a new tensor, through differentiable ops (the transient steps are freed as
    they go; the result may be changed in place: no backward saves it)."""
    if transform.scale != 1.0:
        x = x * transform.scale
    if transform.cap is not None:
        x = torch.tanh(x / transform.cap) * transform.cap
    return x


def transform_slope(x: torch.Tensor, transform: lsspec.LogitTransform) -> torch.Tensor:
    """``dt/dx = scale * (1 - tanh(scale * x / cap)**2)``, a new tensor (``scale`` without a
    cap: a 0-d tensor), through differentiable ops (one rows x K buffer besides tanh's)."""
    if transform.cap is None:
        return torch.full((), transform.scale, dtype=x.dtype, device=x.device)
    tanh = torch.tanh(x * (transform.scale / transform.cap))
    return (1.0 - tanh * tanh).mul_(transform.scale)


def support_size(convention: str, num_classes: int, pad_index=None, class_mask=None) -> Any:
    """``|S|``, the number of classes the smoothing goes to: a static int, or a 0-d tensor under
    a ``class_mask`` (masked classes leave the support)."""
    size = lsspec.support_size(convention, num_classes)
    if class_mask is None:
        return size
    size = size - (~class_mask).sum()
    if convention == "others_but_pad":
        size = size + (~class_mask[pad_index]).long()  # a masked pad is not excluded twice
    return size


def label_rows(labels, counted, eps, num_classes: int, class_mask=None):
    """``(safe_labels, bad)``: the labels, 0 where the row does not count or the label is out of
    range (safe to gather with); and the counted rows whose label is out of range or masked,
    or any counted row under a smoothing outside [0, 1] (a tensor option). Those give NaN,
    never a plausible number."""
    in_range = (labels >= 0) & (labels < num_classes)
    safe_labels = torch.where(counted & in_range, labels, 0)
    valid = in_range & (eps >= 0) & (eps <= 1)
    if class_mask is not None:
        valid = valid & at_labels(class_mask, torch.where(in_range, labels, 0))
    return safe_labels, counted & ~valid


class Lse(NamedTuple):
    """A row's logsumexp kept in two parts, ``lse = peak + log_sum``, as ``torch.log_softmax``
    keeps them: ``peak`` a per-row shift (the dense core: the max over the allowed classes, 0
    where it is not finite) and ``log_sum = log sum_c exp(x_c - peak)``. ``(x_c - peak) -
    log_sum`` is exact where ``x_c - lse`` would round the lse first (at ``x ~ 3e38`` a float32
    lse cannot hold ``log 2``, and the softmax would come out as ``[1, 1, 0]``)."""

    peak: torch.Tensor
    log_sum: torch.Tensor

    @property
    def value(self) -> torch.Tensor:
        return self.peak + self.log_sum

    def counted(self, counted: torch.Tensor) -> Lse:
        """Both parts, 0 on rows that do not count (their logits may hold anything)."""
        return Lse(*(torch.where(counted, part, 0.0) for part in self))

    def log_softmax(self, x: torch.Tensor, dtype, transform=IDENTITY) -> torch.Tensor:
        """``(t - peak) - log_sum`` in ``dtype``, ``t`` the transformed ``x``: a new rows x K
        tensor."""
        upcast = x.to(dtype)
        if transform.active:  # a new tensor already: shift it in place
            return (
                transformed(upcast, transform)
                .sub_(self.peak.unsqueeze(-1))
                .sub_(self.log_sum.unsqueeze(-1))
            )
        return (upcast - self.peak.unsqueeze(-1)).sub_(self.log_sum.unsqueeze(-1))


class RowTerms(NamedTuple):
    """The O(rows) statistics the closed form is written in (one value per row unless noted).

    Every statistic is taken relative to the per-row shift ``lse.peak``: the dense core uses the
    row's max, so that ``support_sum = sum_{c in S} w_c (x_c - peak)`` (times ``sum_scale =
    lsspec.sum_scale(K)``, a power of two) has terms <= 0 and cannot overflow float32 where the
    loss is finite (``[[3e38, 3e38, 0]]`` sums to ``inf`` unshifted), and logits offset by a
    large constant lose no precision. The fused and the vocabulary-parallel losses, whose
    support sum adds unshifted logits, use ``Lse(0, lse)`` and ``sum_scale = 1``.
    """

    lse: Lse
    x_y: torch.Tensor  # the label's logit
    w_y: torch.Tensor | float  # the label's class weight (1.0 without weights)
    support_sum: torch.Tensor  # sum over S of w_c (x_c - peak), times sum_scale
    support_weight: Any  # sum over S of w_c
    safe_labels: torch.Tensor  # labels, 0 where not counted or out of range
    bad: torch.Tensor  # counted rows with an invalid label or smoothing: NaN
    size: Any  # |S|: a static int, or a 0-d tensor under a class_mask
    sum_scale: float  # the power of two support_sum is scaled by

    def true_term(self) -> torch.Tensor:
        """``w_y (lse - x_y)``, the label's cross-entropy term."""
        return self.w_y * ((self.lse.peak - self.x_y) + self.lse.log_sum)

    def smooth_term(self) -> torch.Tensor:
        """``sum_{c in S} w_c (lse - x_c) / |S|``, the smoothing's cross-entropy term."""
        mean_offset = (self.support_sum / self.size) * (1.0 / self.sum_scale)  # exact scaling
        return self.support_weight * self.lse.log_sum / self.size - mean_offset


def counted_only(counted, bad, value):
    """Per-row ``value``: 0 on rows that do not count, NaN on counted rows that are invalid (a
    select: rows that do not count may hold anything)."""
    return torch.where(counted, torch.where(bad, torch.nan, value), 0.0)


def on_target_mass(convention: str, eps, size):
    """``q_y``, the smoothed target's mass on the label: ``1 - eps (+ eps / |S|)``."""
    confidence = 1.0 - eps
    return confidence + eps / size if convention == "uniform" else confidence


def kl_terms(convention: str, eps, size) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_c q_c log q_c`` of the smoothed target (a constant per row, added by ``kl=True``)
    as its two terms, the label's and the other classes', to be added in that order (as lsjax
    does, so both round alike)."""
    off_target_count = size - 1 if convention == "uniform" else size
    return xlogx(on_target_mass(convention, eps, size)), off_target_count * xlogx(eps / size)


def kl_slope(convention: str, eps, size) -> torch.Tensor:
    """``d/d eps`` of the KL constant: ``c (log(eps / |S|) - log q_y)`` (``c = (|S| - 1) / |S|``
    uniform, else 1), whose one-sided limits are taken at the ends: ``-inf`` at ``eps = 0``,
    ``+inf`` at ``eps = 1`` for ``"others"``/``"others_but_pad"`` (``q_y`` reaches 0), finite
    for ``"uniform"``."""
    slope = torch.log(eps / size) - torch.log(on_target_mass(convention, eps, size))
    if convention == "uniform":  # q_y moves by (|S| - 1) / |S| per unit of eps
        share = torch.as_tensor((size - 1) / size, dtype=eps.dtype, device=eps.device)
        slope = times(share, slope)
    return slope


def smoothed_target(convention: str, pad_index, classes, labels, on_true, per_class):
    """The (unweighted) smoothed target on a block of classes, out of place: ``q_c = on_true
    [c = y] + per_class [c in S]`` for the (global) class indices ``classes``, broadcast against
    ``labels[..., None]`` (a chunk of the vocabulary, or one rank's slice of it)."""
    is_target = classes == labels.unsqueeze(-1)
    in_support = torch.ones_like(is_target) if convention == "uniform" else ~is_target
    if convention == "others_but_pad":
        in_support = in_support & (classes != pad_index)
    return torch.where(is_target, on_true, 0.0) + torch.where(in_support, per_class, 0.0)


def row_loss(terms: RowTerms, counted, eps, *, convention: str, kl: bool = False, z=None):
    """The per-row loss, 0 on rows that do not count and NaN on invalid ones::

        (1 - eps) w_y (lse - x_y) + eps sum_{c in S} w_c (lse - x_c) / |S|
          [+ sum_c q_c log q_c with kl]  [+ z lse**2 with a z-loss weight z]

    With ``z`` (a tensor, not None) it returns ``(loss, z_part)``, the loss including the
    z-part. ``times`` keeps each term exactly 0 where its factor is 0, even where the term is
    infinite (smoothing 0 and a -inf logit). For use without autograd (inside a Function).
    """
    true_term = terms.true_term()
    smooth_term = terms.smooth_term()
    loss = times(1.0 - eps, true_term) + times(eps, smooth_term)
    if kl:  # Subtract the entropy of q: add sum_c q_c log q_c, a constant per row.
        on_target_term, off_target_term = kl_terms(convention, eps, terms.size)
        loss = loss + on_target_term + off_target_term
    if z is None:
        return counted_only(counted, terms.bad, loss)
    z_part = torch.where(terms.bad, torch.nan, times(z, terms.lse.value.square()))
    loss = counted_only(counted, terms.bad, loss + z_part)
    return loss, torch.where(counted, z_part, 0.0)


def smoothing_slope(terms: RowTerms, eps, *, convention: str, kl: bool = False):
    """``d loss_row / d eps``, per row (before masking): the smoothing term minus the label's,
    ``-w_y (lse - x_y) + sum_{c in S} w_c (lse - x_c) / |S|``, plus with ``kl=True``
    :func:`kl_slope`."""
    slope = terms.smooth_term() - terms.true_term()
    if kl:
        slope = slope + kl_slope(convention, eps, terms.size)
    return slope
