"""The label-smoothed cross-entropy family in PyTorch: one closed-form core, no one-hot ever built.

Twin of ``lsjax.smoothed_cross_entropy`` (same name, same keywords, same meaning). The core is a
``torch.autograd.Function`` that saves only the input and per-row statistics for backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

import lsspec


class _Options(NamedTuple):
    """The static options of the core."""

    convention: str
    pad_index: int | None
    kl: bool
    from_log_probs: bool


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _xlogx(value: torch.Tensor) -> torch.Tensor:
    """x * log(x) with 0 log 0 = 0, so smoothing = 1 (confidence 0) stays finite."""
    return torch.xlogy(value, value)


def _times(scale: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``scale * term``, exactly 0 when ``scale`` is 0 even where ``term`` is infinite."""
    return torch.where(scale == 0, torch.zeros_like(term), scale * term)


def _is_tensor_option(value: object) -> bool:
    return isinstance(value, torch.Tensor)


def _concrete_scalar(fn: str, name: str, value: object) -> object:
    """A scalar option as a Python float for checking (tensors are checked elementwise later)."""
    if value is None:
        return None
    if _is_tensor_option(value):
        if value.numel() != 1:
            raise lsspec.shape_error(fn, name, tuple(value.shape), "a scalar")
        return value  # Not read back to the host: a tensor option may live on a device/graph.
    return float(value)


def _check_arrays(fn, logits, labels, axis, weight, where):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise lsspec.dtype_error(fn, "logits", got, "a floating dtype (a float torch.Tensor)")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise lsspec.dtype_error(fn, "labels", got, "an integer dtype (an int torch.Tensor)")
    if logits.ndim < 1:
        raise lsspec.shape_error(fn, "logits", tuple(logits.shape), "at least one dimension")
    axis = lsspec.check_axis(fn, axis, logits.ndim)
    row_shape = tuple(logits.shape[:axis]) + tuple(logits.shape[axis + 1 :])
    if tuple(labels.shape) != row_shape:
        raise lsspec.shape_error(
            fn,
            "labels",
            tuple(labels.shape),
            f"the logits' shape without the class axis, {row_shape}",
        )
    num_classes = logits.shape[axis]
    if weight is not None and tuple(weight.shape) != (num_classes,):
        raise lsspec.shape_error(fn, "weight", tuple(weight.shape), f"shape ({num_classes},)")
    if where is not None:
        if tuple(where.shape) != row_shape:
            raise lsspec.shape_error(
                fn, "where", tuple(where.shape), f"the labels' shape {row_shape}"
            )
        if where.dtype != torch.bool:
            raise lsspec.dtype_error(fn, "where", where.dtype, "dtype bool")
    return axis


def _check_label_range(fn, labels, counted, num_classes, ignore_index):
    """Labels out of range raise (as torch does); under torch.compile the row gives NaN."""
    if torch.compiler.is_compiling():
        return
    bad = counted & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise lsspec.label_range_error(fn, labels[bad].tolist(), num_classes, ignore_index)


def smoothed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    smoothing: float | torch.Tensor = 0.0,
    convention: str = "uniform",
    ignore_index: int | None = None,
    pad_index: int | None = None,
    weight: torch.Tensor | None = None,
    where: torch.Tensor | None = None,
    axis: int = -1,
    reduction: str = "none",
    normalizer: float | torch.Tensor | None = None,
    kl: bool = False,
    from_log_probs: bool = False,
) -> torch.Tensor:
    r"""Label-smoothed cross-entropy from integer labels, in closed form (PyTorch).

    Same formula, keywords and semantics as ``lsjax.smoothed_cross_entropy`` (whose docstring
    carries the full description)::

        loss = (1 - eps) * w_y * (lse - x_y) + eps * sum_{c in S} w_c (lse - x_c) / |S|

    with ``S`` the convention's support (``"uniform"``: all K classes; ``"others"``: all but
    ``y``; ``"others_but_pad"``: all but ``y`` and ``pad_index``) and ``w = 1`` without weights.
    The gradient with respect to the logits is ``g * (A * softmax(x) - t)`` (``t`` the weighted
    smoothed target, ``A = sum_c t_c``), or ``-g * t`` with ``from_log_probs=True``.

    Reproduces ``torch.nn.functional.cross_entropy(x, y, weight=w, ignore_index=i, reduction=r,
    label_smoothing=eps)`` with ``convention="uniform"`` and the class axis given by ``axis``,
    except that when no row counts ``"mean"`` returns 0 with a zero gradient (torch: NaN).

    Memory: backward keeps the input and O(rows) statistics only (no rows x K log-softmax as
    ``F.cross_entropy`` keeps) and builds the gradient in one buffer.

    Returns float32 for bf16/fp16/float32 logits and float64 for float64 logits.
    Labels out of range raise ``ValueError``; inside ``torch.compile`` (where the check would
    break the graph) such a row's loss is NaN.
    """
    fn = "smoothed_cross_entropy"
    axis = _check_arrays(fn, logits, labels, axis, weight, where)
    num_classes = logits.shape[axis]
    smoothing_value = _concrete_scalar(fn, "smoothing", smoothing)
    lsspec.check_options(
        fn,
        num_classes=num_classes,
        smoothing=smoothing_value,
        convention=convention,
        reduction=reduction,
        pad_index=pad_index,
        ignore_index=ignore_index,
        normalizer=_concrete_scalar(fn, "normalizer", normalizer),
        kl=kl,
        has_weight=weight is not None,
        from_log_probs=from_log_probs,
    )
    counted = torch.ones_like(labels, dtype=torch.bool)
    if ignore_index is not None:
        counted = counted & (labels != ignore_index)
    if pad_index is not None:
        counted = counted & (labels != pad_index)
    if where is not None:
        counted = counted & where
    _check_label_range(fn, labels, counted, num_classes, ignore_index)

    x = logits.movedim(axis, -1)
    compute_dtype = _compute_dtype(logits.dtype)
    eps = torch.as_tensor(smoothing, dtype=compute_dtype, device=logits.device).detach()
    if weight is not None:
        weight = weight.detach().to(compute_dtype)
    options = _Options(convention, pad_index, kl, from_log_probs)
    loss, _ = _RowLoss.apply(x, labels, counted, eps, weight, options)
    safe_labels = torch.where(counted, labels, 0).clamp(0, num_classes - 1)
    w_y = 1.0 if weight is None else weight[safe_labels]
    row_weight = torch.where(counted, w_y, 0.0).to(compute_dtype)
    return _reduce(loss, row_weight, reduction, normalizer)


def _reduce(loss, row_weight, reduction, normalizer):
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if normalizer is None:
        denominator = row_weight.sum()
    else:
        denominator = torch.as_tensor(normalizer, dtype=loss.dtype, device=loss.device)
    nothing_counts = denominator == 0
    return torch.where(nothing_counts, 0.0, total / torch.where(nothing_counts, 1.0, denominator))


def _row_terms(options, x, labels, counted, eps, weight):
    """Per-row statistics of the closed form; ``x`` is (..., K), class axis last.

    Only O(rows) values come out: lse, x_y, sum over the support of ``w_c x_c`` and of ``w_c``.
    Rows that do not count may hold NaN here; callers mask them.
    """
    num_classes = x.shape[-1]
    compute_dtype = eps.dtype
    in_range = (labels >= 0) & (labels < num_classes)
    safe_labels = torch.where(counted & in_range, labels, 0)
    if options.from_log_probs:
        lse = torch.zeros(labels.shape, dtype=compute_dtype, device=x.device)
    else:
        # For bf16/fp16 this upcast is a temporary float32 copy, freed before backward.
        lse = torch.logsumexp(x.to(compute_dtype), dim=-1)
    x_y = x.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1).to(compute_dtype)
    if weight is None:
        w_y = w_pad = 1.0
        support_sum = x.sum(-1, dtype=compute_dtype)
        support_weight = float(num_classes)
    else:
        w_y = weight[safe_labels]
        w_pad = weight[options.pad_index] if options.pad_index is not None else 0.0
        support_sum = torch.matmul(x.to(compute_dtype), weight)
        support_weight = weight.sum()
    if options.convention != "uniform":
        support_sum = support_sum - w_y * x_y
        support_weight = support_weight - w_y
    if options.convention == "others_but_pad":
        support_sum = support_sum - w_pad * x[..., options.pad_index].to(compute_dtype)
        support_weight = support_weight - w_pad
    bad = counted & ~(in_range & (eps >= 0) & (eps <= 1))
    return lse, x_y, w_y, support_sum, support_weight, safe_labels, bad


def _row_loss_forward(options, x, labels, counted, eps, weight):
    lse, x_y, w_y, support_sum, support_weight, _, bad = _row_terms(
        options, x, labels, counted, eps, weight
    )
    num_classes = x.shape[-1]
    size = lsspec.support_size(options.convention, num_classes)
    confidence = 1.0 - eps
    true_term = w_y * (lse - x_y)
    smooth_term = (support_weight * lse - support_sum) / size
    loss = _times(confidence, true_term) + _times(eps, smooth_term)
    if options.kl:  # Subtract the entropy of q: add sum_c q_c log q_c, a constant per row.
        uniform = options.convention == "uniform"
        on_target = confidence + eps / num_classes if uniform else confidence
        off_target_count = num_classes - 1 if uniform else size
        loss = loss + _xlogx(on_target) + off_target_count * _xlogx(eps / size)
    loss = torch.where(bad, torch.nan, loss)
    return torch.where(counted, loss, 0.0), lse


def _row_loss_gradient(options, x, labels, counted, eps, weight, lse, grad_rows):
    """``grad_rows[..., None] * r`` with ``r = A * softmax(x) - t`` (logits) or ``-t`` (log-probs).

    ``t_c = (1 - eps) w_y [c = y] + (eps / |S|) w_c [c in S]``, ``A = sum_c t_c``. Built in one
    rows x K buffer with in-place updates, unless a graph is being recorded (double backward),
    where the same steps run out of place so autograd can differentiate them.
    """
    inplace = not torch.is_grad_enabled()
    num_classes = x.shape[-1]
    size = lsspec.support_size(options.convention, num_classes)
    in_range = (labels >= 0) & (labels < num_classes)
    safe_labels = torch.where(counted & in_range, labels, 0)
    bad = counted & ~(in_range & (eps >= 0) & (eps <= 1))
    w = torch.ones((), dtype=eps.dtype, device=x.device) if weight is None else weight
    w_full = w.expand(num_classes)
    w_y = w_full[safe_labels]
    on_true = (1.0 - eps) * w_y
    per_class = eps / size
    support_weight = w_full.sum()
    if options.convention != "uniform":
        support_weight = support_weight - w_y
    if options.convention == "others_but_pad":
        support_weight = support_weight - w_full[options.pad_index]

    def update(tensor, method, *args):
        return getattr(tensor, method + "_")(*args) if inplace else getattr(tensor, method)(*args)

    if options.from_log_probs:
        grad = torch.zeros(x.shape, dtype=eps.dtype, device=x.device)
    else:
        safe_lse = torch.where(counted, lse, 0.0).unsqueeze(-1)
        grad = update(x.to(eps.dtype) - safe_lse, "exp")  # softmax(x)
        grad = update(grad, "mul", (on_true + per_class * support_weight).unsqueeze(-1))
    # - t: the smoothing mass over the support, then the confidence on the target.
    grad = update(grad, "sub", per_class * w)
    correction = -on_true
    if options.convention != "uniform":
        correction = correction + per_class * w_y  # y is not in the support
    grad = update(grad, "scatter_add", -1, safe_labels.unsqueeze(-1), correction.unsqueeze(-1))
    if options.convention == "others_but_pad":
        pad_column = torch.full_like(safe_labels, options.pad_index).unsqueeze(-1)
        pad_mass = (per_class * w_full[options.pad_index]).expand(pad_column.shape)
        grad = update(grad, "scatter_add", -1, pad_column, pad_mass.to(grad.dtype))
    grad = update(grad, "masked_fill", bad.unsqueeze(-1), torch.nan)
    grad = update(grad, "masked_fill", ~counted.unsqueeze(-1), 0.0)
    grad = update(grad, "mul", grad_rows.unsqueeze(-1))
    return grad.to(x.dtype)


class _RowLoss(torch.autograd.Function):
    """Per-row closed-form loss; backward recomputes softmax from ``x`` and the saved lse.

    ``setup_context`` + ``generate_vmap_rule`` make it work under ``torch.func`` (grad, vmap)
    and ``torch.compile`` (fullgraph) as well as plain autograd.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, labels, counted, eps, weight, options):
        loss, lse = _row_loss_forward(options, x, labels, counted, eps, weight)
        return loss, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, labels, counted, eps, weight, options = inputs
        _, lse = output
        ctx.options = options
        ctx.has_weight = weight is not None
        ctx.save_for_backward(x, labels, counted, eps, lse, *([weight] if ctx.has_weight else []))
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        del grad_lse  # lse is an internal statistic, never differentiated.
        x, labels, counted, eps, lse, *rest = ctx.saved_tensors
        weight = rest[0] if ctx.has_weight else None
        if torch.is_grad_enabled() and not ctx.options.from_log_probs:
            # Double backward: lse must be a function of x for the Hessian to be right.
            lse = torch.logsumexp(x.to(eps.dtype), dim=-1)
        grad = _row_loss_gradient(ctx.options, x, labels, counted, eps, weight, lse, grad_loss)
        return grad, None, None, None, None, None
