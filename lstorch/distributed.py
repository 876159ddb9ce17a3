"""Vocabulary-parallel label-smoothed cross-entropy over ``torch.distributed``.

Each rank of ``group`` holds the logits of one contiguous slice of the vocabulary (rank ``r`` of
``n`` holds classes ``[r * V_local, (r + 1) * V_local)``, ``K = n * V_local``), as in Megatron's
tensor-parallel output layer, and the same labels. The loss is the closed form of SEMANTICS.md
§1 with GLOBAL statistics, so every rank gets the single-device loss and the slice of the
single-device gradient that belongs to its logits (Megatron's label smoothing uses the local
vocabulary size and the local mean instead: loss and gradients differ between ranks,
Megatron-LM#737).

Communication per call: two all-reduces of O(rows) values (the max; then the sum-exp, the
target's logit, the sum of the logits and the pad's logit packed in one tensor). Backward needs
none: ``g * (softmax - q)`` on the local slice uses the global lse saved by the forward. A
backward that will be differentiated again (``create_graph=True``, forward over reverse)
recomputes the global lse through a differentiable all-reduce (one more of O(rows) values, and
one in its own backward), so that Hessian-vector products are exact; forward mode (``jvp``,
``torch.autograd.forward_ad``) all-reduces the rows' O(rows) tangents once.

The JAX counterparts are ``lsjax.smoothed_cross_entropy`` on logits placed by a
``NamedSharding`` and ``lsjax.sharded.sharded_fused_linear_smoothed_cross_entropy``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

import lsspec
from lstorch import _closed_form, _common
from lstorch._common import times


def vocab_parallel_smoothed_cross_entropy(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    smoothing: float | torch.Tensor = 0.0,
    convention: str = "uniform",
    ignore_index: int | None = None,
    pad_index: int | None = None,
    reduction: str = "none",
    where: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``smoothed_cross_entropy`` of logits split over the vocabulary across ``group``'s ranks.

    With ``x`` the (global) logits of a row, ``K = world_size * V_local``::

        lse = m + log(all_reduce_sum(sum_local exp(x - m))),  m = all_reduce_max(max_local x)
        loss = (1 - eps) * (lse - x_y) + eps * (lse - mean_{c in S} x_c)

    where ``x_y``, ``sum_c x_c`` and ``x_pad`` are all-reduced sums of each rank's share (only
    the rank holding the class contributes). Every rank returns the same loss, bit for bit, equal
    to ``lstorch.smoothed_cross_entropy(full_logits, labels, ...)``; the gradient with respect to
    ``local_logits`` is that rank's slice of the full gradient.

    Args:
      local_logits: ``(..., V_local)``, this rank's slice of the class axis (the last axis).
      labels: global class indices, the same on every rank, shape ``local_logits.shape[:-1]``.
      group: the process group the vocabulary is split over (default: the world).
      smoothing: as ``smoothed_cross_entropy``. A ``smoothing`` tensor that requires grad is
        differentiated: every rank gets ``d loss / d smoothing`` of the whole loss (the same on
        every rank, from the global statistics), no further all-reduce.
      convention: as ``smoothed_cross_entropy``.
      ignore_index: as ``smoothed_cross_entropy``.
      pad_index: as ``smoothed_cross_entropy``; a global class index.
      reduction: as ``smoothed_cross_entropy``.
      where: as ``smoothed_cross_entropy``: a boolean row mask with the labels' shape, the same
        on every rank; False rows count for nothing.
      normalizer: as ``smoothed_cross_entropy``: with ``reduction="mean"``, divide the sum by
        this instead (the token count of a whole accumulated batch).

    Not taken yet (``smoothed_cross_entropy`` has them): class ``weight``, ``kl``,
    ``from_log_probs``, ``class_mask``, ``z_loss``, ``return_z_loss``.
    """
    fn = "vocab_parallel_smoothed_cross_entropy"
    _common.floating(fn, local_logits=local_logits)
    labels = _common.integer_labels(fn, labels)  # widened before any comparison
    lsspec.check_labels_shape(fn, tuple(labels.shape), tuple(local_logits.shape[:-1]))
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local_classes = local_logits.shape[-1]
    num_classes = world * local_classes
    where = _common.tensor_option(fn, "where", where, local_logits.device)
    lsspec.check_row_options_shapes(
        fn,
        num_classes,
        tuple(labels.shape),
        where=None if where is None else tuple(where.shape),
    )
    _common.check_bool(fn, "where", where)
    _common.check_label_options(
        fn,
        num_classes,
        lsspec.LabelOptions(smoothing, convention, ignore_index, pad_index, reduction),
        normalizer=_common.concrete_scalar(fn, "normalizer", normalizer, optional=True),
    )
    counted = _common.counted_rows(labels, ignore_index, pad_index, where)
    _common.check_label_range(fn, labels, counted, num_classes, ignore_index)
    compute_dtype = _common.compute_dtype(local_logits.dtype)
    eps = _common.smoothing_tensor(smoothing, compute_dtype, local_logits.device)  # differentiated
    layout = _Layout(convention, pad_index, rank * local_classes, num_classes, group)
    rows = _common.with_forward_mode(_VocabParallelRows, _VocabParallelRowsForwardMode)
    loss, _, _ = rows.apply(local_logits, labels, counted, eps, layout)
    return _common.reduce(loss, counted.to(compute_dtype), reduction, normalizer)


def _local_column(x, classes, start):
    """``x[..., classes - start]`` where this rank holds the class, else 0 (compute dtype)."""
    local = classes - start
    here = (local >= 0) & (local < x.shape[-1])
    value = x.gather(-1, torch.where(here, local, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(here, value, 0.0)


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` over ``group`` as a differentiable op: its backward and its ``jvp``
    are the same all-reduce (of the cotangent, of the tangent), and its backward is itself
    differentiable, so a gradient built from it can be differentiated again. Every rank must
    run it, as every collective; the loss's forward and backward already do so on every rank."""

    @staticmethod
    def forward(tensor, group):
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return _AllReduceSum.apply(tangent, ctx.group)

    @staticmethod
    def vmap(info, in_dims, tensor, group):
        """Elementwise across ranks: the batch axis is reduced with the rest (every rank has the
        same batch, as every rank runs the same transform)."""
        del info
        return _AllReduceSum.apply(tensor, group), in_dims[0]


class _Layout(NamedTuple):
    """Where this rank's classes lie in the vocabulary, and the options that need the layout."""

    convention: str
    pad_index: int | None
    start: int  # the first (global) class this rank holds
    num_classes: int  # K, the global number of classes
    group: Any  # the process group the vocabulary is split over


class _Saved(NamedTuple):
    """What backward and forward mode read: the inputs and the forward's global statistics (the
    smoothing's slope None where the smoothing is not differentiated)."""

    x: torch.Tensor
    labels: torch.Tensor
    counted: torch.Tensor
    eps: torch.Tensor
    lse: torch.Tensor
    eps_slope: torch.Tensor | None


def _bad_rows(saved: _Saved, layout: _Layout):
    """Counted rows with a label out of range or under a smoothing outside [0, 1]: NaN."""
    return _closed_form.label_rows(saved.labels, saved.counted, saved.eps, layout.num_classes)[1]


def _local_target(x, labels, counted, eps, layout):
    """``q`` on this rank's classes: ``(1 - eps) [c = y] + eps / |S| [c in S]``."""
    per_class = eps / _closed_form.support_size(layout.convention, layout.num_classes)
    classes = torch.arange(layout.start, layout.start + x.shape[-1], device=x.device)
    labels = torch.where(counted, labels, 0)
    return _closed_form.smoothed_target(
        layout.convention, layout.pad_index, classes, labels, 1.0 - eps, per_class
    )


class _VocabParallelRows(torch.autograd.Function):
    """Per-row loss from global statistics; backward is local (softmax from the global lse).

    ``_VocabParallelRowsForwardMode`` adds forward mode (``jvp``)."""

    @staticmethod
    def forward(x, labels, counted, eps, layout):
        convention, num_classes, start = layout.convention, layout.num_classes, layout.start
        compute_dtype = eps.dtype
        with torch.no_grad():
            peak = x.amax(dim=-1).to(compute_dtype)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=layout.group)
            peak = torch.where(torch.isfinite(peak), peak, 0.0)
            safe_labels, bad = _closed_form.label_rows(labels, counted, eps, num_classes)
            sums = torch.stack(
                [
                    torch.exp(x.to(compute_dtype) - peak.unsqueeze(-1)).sum(-1),
                    _local_column(x, safe_labels, start).to(compute_dtype),
                    x.sum(-1, dtype=compute_dtype),
                    _local_column(x, torch.full_like(labels, layout.pad_index or 0), start).to(
                        compute_dtype
                    ),
                ]
            )
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=layout.group)
            sum_exp, x_y, total, x_pad = sums
            lse = torch.log(sum_exp) + peak
            support_sum = total
            if convention != "uniform":
                support_sum = support_sum - x_y
            if convention == "others_but_pad":
                support_sum = support_sum - x_pad
            size = _closed_form.support_size(convention, num_classes)
            # The closed form of statistics relative to 0: peak 0, log_sum the lse, no scaling.
            # A (tensor) smoothing outside [0, 1] gives NaN rows, never a plausible number.
            lse_parts = _closed_form.Lse(0.0, lse)
            terms = _closed_form.RowTerms(
                lse_parts, x_y, 1.0, support_sum, size, safe_labels, bad, size, 1.0
            )
            loss = _closed_form.row_loss(terms, counted, eps, convention=convention)
            # d loss_row / d eps from the global statistics (the same on every rank).
            eps_slope = _closed_form.smoothing_slope(terms, eps, convention=convention)
        return loss, lse, eps_slope

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, labels, counted, eps, layout = inputs
        _, lse, eps_slope = output
        ctx.layout = layout
        # The smoothing's slope (O(rows)) is kept for backward only when it is differentiated.
        kept = eps_slope if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(x, labels, counted, eps, lse, kept)
        ctx.save_for_forward(x, labels, counted, eps, lse, eps_slope)
        ctx.mark_non_differentiable(lse, eps_slope)

    @staticmethod
    def vmap(info, in_dims, x, labels, counted, eps, layout):
        """Rows are independent: a ``torch.func.vmap`` batch axis (``jacrev``, ``jacfwd``,
        ``hessian``, per-sample gradients) becomes one more leading row axis, so each rank runs
        the same collectives once for the whole batch."""
        x_dim, labels_dim, counted_dim, eps_dim, _ = in_dims
        if eps_dim is not None:
            raise ValueError(
                "vocab_parallel_smoothed_cross_entropy: `smoothing` cannot be batched by "
                "torch.func.vmap (it is one value for every row); got a vmapped smoothing tensor."
            )

        def leading(tensor, dim):
            if dim is None:
                return tensor.expand(info.batch_size, *tensor.shape)
            return tensor.movedim(dim, 0)

        rows = _common.with_forward_mode(_VocabParallelRows, _VocabParallelRowsForwardMode)
        outputs = rows.apply(
            leading(x, x_dim),
            leading(labels, labels_dim),
            leading(counted, counted_dim),
            eps,
            layout,
        )
        return outputs, (0, 0, 0)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_slope):
        """``g * (softmax(x) - q)`` on this rank's classes; no communication, except when the
        gradient will be differentiated again: then the global lse is recomputed from ``x``
        through ``_AllReduceSum`` (shifted by the saved lse, the same on every rank), so that
        its dependence on every rank's logits is in the graph."""
        del grad_lse, grad_slope  # internal statistics, never differentiated.
        saved = _Saved(*ctx.saved_tensors)
        x, labels, counted, eps = saved.x, saved.labels, saved.counted, saved.eps
        safe_lse = torch.where(counted, saved.lse, 0.0)
        x_c = x.to(eps.dtype)
        if _common.differentiated_again(x):
            shift = torch.where(torch.isfinite(saved.lse), saved.lse, 0.0).unsqueeze(-1)
            local = torch.exp(x_c - shift).sum(-1)
            total = _AllReduceSum.apply(local, ctx.layout.group)
            safe_lse = torch.where(counted, torch.log(total) + shift.squeeze(-1), 0.0)
        target = _local_target(x, labels, counted, eps, ctx.layout)
        grad = torch.exp(x_c - safe_lse.unsqueeze(-1)) - target
        grad = grad * grad_loss.to(eps.dtype).unsqueeze(-1)
        bad = _bad_rows(saved, ctx.layout)
        grad = _closed_form.counted_only(counted.unsqueeze(-1), bad.unsqueeze(-1), grad)
        d_eps = None
        if saved.eps_slope is not None:  # d eps = sum_rows g * slope, the whole loss's, every rank
            d_eps = _closed_form.counted_only(counted, bad, grad_loss * saved.eps_slope).sum()
            d_eps = d_eps.reshape(eps.shape)
        return grad.to(x.dtype), None, None, d_eps, None


class _VocabParallelRowsForwardMode(_VocabParallelRows):
    """``_VocabParallelRows`` with ``jvp`` (see ``lstorch._common.with_forward_mode``)."""

    @staticmethod
    def jvp(ctx, x_tangent, *other_tangents):
        """``d loss = sum_c (softmax(x)_c - q_c) dx_c`` over all K classes: each rank's share,
        all-reduced (one all-reduce of O(rows) values, run on every rank)."""
        eps_tangent = other_tangents[2]  # labels and the counted mask are constants
        saved = _Saved(*ctx.saved_tensors)
        x, labels, counted, eps = saved.x, saved.labels, saved.counted, saved.eps
        d_loss = torch.zeros_like(saved.lse)
        if x_tangent is not None:
            safe_lse = torch.where(counted, saved.lse, 0.0).unsqueeze(-1)
            target = _local_target(x, labels, counted, eps, ctx.layout)
            coeff = torch.exp(x.to(eps.dtype) - safe_lse) - target
            local = torch.matmul(coeff.unsqueeze(-2), x_tangent.to(eps.dtype).unsqueeze(-1))
            d_loss = _AllReduceSum.apply(local.squeeze(-1).squeeze(-1), ctx.layout.group)
        if eps_tangent is not None:  # the same on every rank: no communication
            d_loss = d_loss + times(eps_tangent, saved.eps_slope)  # 0 tangent: exactly 0
        d_loss = _closed_form.counted_only(counted, _bad_rows(saved, ctx.layout), d_loss)
        return d_loss, None, None  # lse and the slope: non-differentiable
