"""Fused linear + label-smoothed cross-entropy in PyTorch: the rows x V logits are never built.

Twin of ``lsjax.fused_linear_smoothed_cross_entropy`` (same name, keywords and meaning). The core
is a ``torch.autograd.Function`` that walks the vocabulary in chunks of ``chunk_size`` classes,
saves only the inputs and the per-row logsumexp for backward, and recomputes each chunk's logits
there. Under ``torch.autocast`` the inputs are rounded as ``F.linear`` would cast them, in both
passes alike (see the function's docstring).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

import lsspec
from lstorch import _closed_form, _common
from lstorch._common import times

DEFAULT_CHUNK_SIZE = 2048


def fused_linear_smoothed_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    smoothing: float | torch.Tensor = 0.0,
    convention: str = "uniform",
    ignore_index: int | None = None,
    pad_index: int | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_labels: bool | None = None,
    _caller: lsspec.Caller | None = None,
) -> torch.Tensor:
    r"""``smoothed_cross_entropy(F.linear(hidden, weight, bias), labels, ...)`` without the logits.

    For a language-model head with a large vocabulary ``V``, ``F.linear`` builds ``rows x V``
    logits (and as much again for their gradient). Here, with ``x = hidden @ weight.T + bias``
    (``K = V`` classes), each row's loss is the closed form of SEMANTICS.md §1::

        loss = (1 - eps) * (lse - x_y) + eps * (lse - mean_{c in S} x_c)

    ``lse`` is accumulated over vocabulary chunks of ``chunk_size`` classes (each chunk's
    logits computed from ``hidden`` and ``weight`` and dropped), ``x_y = hidden . weight[y] +
    bias[y]`` and ``sum_c x_c = hidden . weight.sum(0) + bias.sum()`` (a rank-1 product: no pass
    over the logits). Backward recomputes each chunk's logits and forms ``g * (softmax(x) - q)``
    one ``rows x chunk_size`` block at a time: ``d hidden += coeff @ W_chunk``, ``d W_chunk =
    coeff.T @ hidden``, ``d b_chunk = sum_rows coeff``.

    Reproduces ``lstorch.smoothed_cross_entropy(F.linear(hidden, weight, bias), labels, ...)``
    and so, for ``convention="uniform"``, ``F.cross_entropy(F.linear(hidden, weight, bias),
    labels, label_smoothing=eps, ignore_index=i, reduction=r)``, loss and gradients for
    ``hidden``, ``weight`` and ``bias``, up to float rounding (except that when no row counts
    ``"mean"`` returns 0 with a zero gradient, where torch returns NaN). Its JAX twin is
    ``lsjax.fused_linear_smoothed_cross_entropy``.

    Under ``torch.autocast`` (enabled for the hidden's device type), the inputs are what
    ``F.linear`` would make of them: ``hidden``, ``weight`` and ``bias``, whatever their dtypes
    (float64 excepted, which autocast leaves alone), are rounded to the autocast dtype
    (``torch.get_autocast_dtype(device_type)``), so a bf16 hidden from an autocast layer meets a
    float32 head weight as it would in ``F.linear``. From those rounded values on, both passes
    compute as for bf16/fp16 inputs, with autocast switched off inside: every logit, the lse, the
    sums and the softmax in float32, the forward's and the backward's chunk products alike (so the
    backward differentiates exactly the loss the forward returned). The rounding is done chunk by
    chunk: no copy of the weight in the autocast dtype is made or saved. Gradients come back in
    each input's own dtype (a float32 weight gets a float32 gradient), as autograd returns them
    through autocast's casts, but computed in float32 and not rounded to the autocast dtype first.
    The result is the loss of the rounded inputs to float32 accuracy; against
    ``F.cross_entropy(F.linear(...))`` under the same autocast it differs by that path's
    rounding of the logits to the autocast dtype. Under ``torch.compile``, Inductor skips the
    rounding of a float32 input (it does not round at a cast inside a fused kernel unless
    ``torch._inductor.config.emulate_precision_casts`` is set): the loss is then that of the
    unrounded inputs, and the backward still differentiates the loss returned.

    Args:
      hidden: float tensor ``(..., D)``: the features that feed the output layer. Outside
        ``torch.autocast``, ``hidden``, ``weight`` and ``bias`` share one dtype.
      weight: ``(V, D)``, the layout of ``nn.Linear(D, V).weight`` and of a tied embedding
        table: one row per class.
      labels: int tensor with the hidden's shape without its last axis; any integer dtype, as
        in :func:`lstorch.smoothed_cross_entropy`.
      bias: optional ``(V,)``.
      smoothing: ``eps`` in [0, 1], a number or a one-element tensor; one that can be read (a
        number, a CPU tensor) outside [0, 1] raises, one that cannot (on an accelerator, under
        ``torch.compile``/``vmap``) gives NaN rows. A tensor that requires grad is
        differentiated: ``d loss_row / d eps = x_y - mean_{c in S} x_c``, one O(rows) statistic
        kept for backward only then.
      convention: ``"uniform"`` | ``"others"`` | ``"others_but_pad"`` (needs ``pad_index``).
      ignore_index: rows whose label equals it count for nothing (left out of ``"mean"``).
      pad_index: the pad column of ``"others_but_pad"``; rows labelled with it count for nothing.
      reduction: ``"none"`` | ``"sum"`` | ``"mean"`` (over counted rows; 0 when none counts).
      chunk_size: classes per chunk. Temporaries grow as ``rows x chunk_size``; larger chunks
        mean fewer, larger matrix products.
      check_labels: whether the host reads the labels (and a ``smoothing`` tensor) to check
        them, as in :func:`lstorch.smoothed_cross_entropy`: ``None``, CPU tensors only (on an
        accelerator no read-back: a label out of range gives a NaN row); ``True``, on any
        device (a sync); ``False``, never.

    Returns:
      float32 for bf16/fp16/float32 inputs (accumulated in float32: every logit, lse and sum),
      float64 for float64; per row for ``"none"``, else a scalar. Gradients come back in the
      inputs' dtypes.

    ``_caller`` is internal: the public function or module that called this one for the user
    (who errors name: ``FusedLinearSmoothedCrossEntropyLoss`` when the module called).
    """
    fn = lsspec.caller("fused_linear_smoothed_cross_entropy", _caller)
    operand_dtype = _check_fused(fn, hidden, weight, bias, labels)
    labels = _common.index_labels(labels)  # before any comparison, and so weight[labels] indexes
    num_classes = weight.shape[0]
    options = lsspec.LabelOptions(smoothing, convention, ignore_index, pad_index, reduction)
    chunk_size = _check_options(fn, num_classes, options, chunk_size, check_labels)
    counted = _common.counted_rows(labels, ignore_index, pad_index)
    _common.check_label_range(
        fn, labels, counted, num_classes, ignore_index, check_labels=check_labels
    )
    compute_dtype = _common.compute_dtype(operand_dtype)
    eps = _common.smoothing_tensor(smoothing, compute_dtype, hidden.device)  # differentiated
    if bias is None:
        bias = torch.zeros(num_classes, dtype=hidden.dtype, device=hidden.device)
    fused_rows = _common.with_forward_mode(_FusedRows, _FusedRowsForwardMode)
    loss, _, _ = fused_rows.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        labels.reshape(-1),
        counted.reshape(-1),
        eps,
        _Options(convention, pad_index, chunk_size, operand_dtype),
    )
    return _common.reduce(loss.reshape(labels.shape), counted.to(compute_dtype), reduction)


def _check_options(
    fn, num_classes, options: lsspec.LabelOptions, chunk_size, check_labels=None
) -> int:
    """Check the plain options of :func:`fused_linear_smoothed_cross_entropy`: the function's,
    and its module's at construction (``num_classes=None``). Returns ``chunk_size`` as an int."""
    _common.check_label_options(fn, num_classes, options, check_labels)
    return lsspec.check_chunk_size(fn, chunk_size)


class _Options(NamedTuple):
    """The static options of the fused core."""

    convention: str
    pad_index: int | None
    chunk_size: int
    operand_dtype: torch.dtype  # what hidden, weight and bias are rounded to (autocast's dtype)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts ``F.linear``'s inputs to on ``device_type``; None
    outside an autocast region for that device type."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_off(device_type: str):
    """A context in which autocast leaves this device type's operations alone."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _check_fused(fn, hidden, weight, bias, labels) -> torch.dtype:
    """Checks the inputs; returns the dtype the products see (the operand dtype): the hidden's,
    or under ``torch.autocast`` the one ``F.linear`` would cast its inputs to."""
    _common.floating(fn, hidden=hidden, weight=weight, **({} if bias is None else {"bias": bias}))
    _common.integer_labels(fn, labels)
    lsspec.check_linear_shapes(
        fn,
        tuple(hidden.shape),
        tuple(weight.shape),
        None if bias is None else tuple(bias.shape),
        tuple(labels.shape),
    )

    def name(dtype):  # "float32", as JAX spells it, so both frameworks say the same words
        return str(dtype).removeprefix("torch.")

    autocast_dtype = _autocast_dtype(hidden.device.type)

    def operand(dtype):  # autocast casts every floating input but float64, as F.linear's
        if autocast_dtype is None or dtype == torch.float64:
            return dtype
        return autocast_dtype

    if operand(weight.dtype) != operand(hidden.dtype):
        raise lsspec.dtype_mismatch_error(fn, "weight", name(weight.dtype), name(hidden.dtype))
    if bias is not None and operand(bias.dtype) != operand(hidden.dtype):
        raise lsspec.dtype_mismatch_error(fn, "bias", name(bias.dtype), name(hidden.dtype))
    return operand(hidden.dtype)


def _chunks(num_classes: int, chunk_size: int):
    return [
        (start, min(start + chunk_size, num_classes)) for start in range(0, num_classes, chunk_size)
    ]


def _operand(tensor, operand_dtype, compute_dtype):
    """``tensor`` rounded to ``operand_dtype`` (what autocast's cast gives ``F.linear``; a no-op
    outside autocast), in ``compute_dtype``."""
    return tensor.to(operand_dtype).to(compute_dtype)


def _chunk_logits(hidden, weight, bias, start, stop, operand_dtype, compute_dtype):
    """Logits of classes [start, stop) in ``compute_dtype``: (N, stop - start). ``hidden`` is
    already the operand in ``compute_dtype``."""
    weight_chunk = _operand(weight[start:stop], operand_dtype, compute_dtype)
    bias_chunk = _operand(bias[start:stop], operand_dtype, compute_dtype)
    return torch.addmm(bias_chunk, hidden, weight_chunk.T)


def _weight_column_sum(weight, chunk_size, operand_dtype, compute_dtype):
    """``sum_c weight[c]`` of the operand, in ``compute_dtype``: (D,)."""
    if weight.dtype == operand_dtype:
        return weight.sum(0, dtype=compute_dtype)
    # Rounded chunk by chunk, so that no copy of the whole weight in operand_dtype is made.
    total = torch.zeros(weight.shape[1], dtype=compute_dtype, device=weight.device)
    for start, stop in _chunks(weight.shape[0], chunk_size):  # out of place: D values, and vmap
        total = total + _operand(weight[start:stop], operand_dtype, compute_dtype).sum(0)
    return total


def _counted_rows_only(hidden, counted):
    """``hidden`` with the rows that do not count replaced by zeros (a select, not a product).

    Their loss and ``coeff`` rows are 0 anyway, but ``d weight = coeff.T @ hidden`` would still
    multiply those zeros by the row's features: ``0 * inf`` and ``0 * NaN`` are NaN.
    """
    return torch.where(counted.unsqueeze(-1), hidden, 0.0)


def _terms(options, hidden, weight, bias, labels, counted, eps):
    """``(loss, lse, eps_slope)`` per row, each O(rows): the lse chunk by chunk, ``x_y`` from
    the label's row of the weight, the support sum as a rank-1 product."""
    convention, operand_dtype = options.convention, options.operand_dtype
    chunk_size = options.chunk_size
    compute_dtype = eps.dtype
    num_classes = weight.shape[0]
    hidden = _counted_rows_only(_operand(hidden, operand_dtype, compute_dtype), counted)
    lse = torch.full(labels.shape, -torch.inf, dtype=compute_dtype, device=hidden.device)
    for start, stop in _chunks(num_classes, chunk_size):
        logits = _chunk_logits(hidden, weight, bias, start, stop, operand_dtype, compute_dtype)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
    safe_labels, bad = _closed_form.label_rows(labels, counted, eps, num_classes)

    def column(classes):
        rows = _operand(weight[classes], operand_dtype, compute_dtype)
        return (hidden * rows).sum(-1) + _operand(bias[classes], operand_dtype, compute_dtype)

    x_y = column(safe_labels)
    # sum_c x_c = hidden . (sum_c weight_c) + sum_c bias_c: rank 1, no pass over the logits.
    # Unlike the dense core (relative to the row max), this needs |logits| < float max / K.
    weight_sum = _weight_column_sum(weight, chunk_size, operand_dtype, compute_dtype)
    bias_sum = _operand(bias, operand_dtype, compute_dtype).sum()
    support_sum = hidden @ weight_sum + bias_sum
    if convention != "uniform":
        support_sum = support_sum - x_y
    if convention == "others_but_pad":
        support_sum = support_sum - column(torch.full_like(labels, options.pad_index))
    size = _closed_form.support_size(convention, num_classes)
    # The closed form of statistics relative to 0: peak 0, log_sum the lse, no scaling.
    terms = _closed_form.RowTerms(
        _closed_form.Lse(0.0, lse), x_y, 1.0, support_sum, size, safe_labels, bad, size, 1.0
    )
    loss = _closed_form.row_loss(terms, counted, eps, convention=convention)
    # d loss_row / d eps (O(rows), kept for backward; masked there, after the product with g).
    eps_slope = _closed_form.smoothing_slope(terms, eps, convention=convention)
    return loss, lse, eps_slope


class _FusedRows(torch.autograd.Function):
    """Per-row loss of ``F.linear(hidden, weight, bias)``; backward recomputes chunk logits.

    ``setup_context`` + ``generate_vmap_rule`` make it work under ``torch.func`` (grad, vmap
    with batched labels); ``_FusedRowsForwardMode`` adds forward mode. A first-order
    backward builds the gradients chunk by chunk in place; one that will be differentiated
    again (``create_graph=True``, ``torch.func``, forward over reverse) recomputes the lse and
    every chunk through differentiable ops instead, so second derivatives are exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden, weight, bias, labels, counted, eps, options):
        # Autocast off in both passes: the products see the operands rounded by _operand, in
        # float32, the same in forward and backward.
        with torch.no_grad(), _autocast_off(hidden.device.type):
            return _terms(options, hidden, weight, bias, labels, counted, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, counted, eps, options = inputs
        _, lse, eps_slope = output
        ctx.options = options
        # The smoothing's per-row slope (O(rows)) is kept only when the smoothing is
        # differentiated (backward) or may carry a tangent (forward mode).
        kept = eps_slope if ctx.needs_input_grad[5] else None
        ctx.save_for_backward(hidden, weight, bias, labels, counted, eps, lse, kept)
        ctx.save_for_forward(hidden, weight, bias, labels, counted, eps, lse, eps_slope)
        ctx.mark_non_differentiable(lse, eps_slope)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_slope):
        """Per chunk: ``coeff = g * (softmax(x) - q)`` (rows x chunk), then
        ``d hidden += coeff @ W_chunk``, ``d W_chunk = coeff.T @ hidden``, ``d b_chunk = sum
        coeff``, with ``q_c = (1 - eps) [c = y] + eps / |S| [c in S]``; ``d eps = sum_rows g
        slope_row`` when the smoothing is differentiated."""
        del grad_lse, grad_slope  # internal statistics, never differentiated.
        saved = _Saved(*ctx.saved_tensors)
        if _common.differentiated_again(saved.hidden, saved.weight, saved.bias):
            with _autocast_off(saved.hidden.device.type):
                grads = _differentiable_gradients(ctx.options, saved, grad_loss)
        else:
            grads = _gradients(ctx.options, saved, grad_loss)
        d_eps = None
        if saved.eps_slope is not None:  # d eps = sum_rows g * slope (NaN from invalid rows)
            d_eps = _smoothing_rows(saved, grad_loss * saved.eps_slope)
            d_eps = d_eps.sum().reshape(saved.eps.shape)
        return (*grads, None, None, d_eps, None)


class _FusedRowsForwardMode(_FusedRows):
    """``_FusedRows`` with ``jvp`` (``torch.func.jvp``/``jacfwd``/``hessian``,
    ``torch.autograd.forward_ad``); Dynamo traces ``_FusedRows`` (see ``_with_forward_mode``)."""

    @staticmethod
    def jvp(ctx, hidden_tangent, weight_tangent, bias_tangent, *other_tangents):
        """``d loss = sum_c (softmax(x)_c - q_c) dx_c`` with ``dx = d hidden @ W.T + hidden @
        d W.T + d b``, one ``rows x chunk_size`` block at a time."""
        eps_tangent = other_tangents[2]  # labels and the counted mask are constants
        saved = _Saved(*ctx.saved_tensors)
        with _autocast_off(saved.hidden.device.type):
            tangents = (hidden_tangent, weight_tangent, bias_tangent)
            d_loss = _loss_tangent(ctx.options, saved, tangents)
        if eps_tangent is not None:
            d_loss = d_loss + _smoothing_rows(saved, times(eps_tangent, saved.eps_slope))
        return d_loss, None, None  # lse and the slope: non-differentiable


class _Saved(NamedTuple):
    """What the core's backward and forward mode read: its inputs and the forward's per-row
    lse and smoothing slope (the slope None where the smoothing is not differentiated)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    labels: torch.Tensor
    counted: torch.Tensor
    eps: torch.Tensor
    lse: torch.Tensor
    eps_slope: torch.Tensor | None


def _smoothing_rows(saved: _Saved, per_row):
    """``per_row`` (a term of the smoothing's derivative) on the rows that count, NaN on the
    invalid ones, 0 elsewhere (a select: the others may hold anything)."""
    num_classes = saved.weight.shape[0]
    _, bad = _closed_form.label_rows(saved.labels, saved.counted, saved.eps, num_classes)
    return _closed_form.counted_only(saved.counted, bad, per_row.to(saved.eps.dtype))


class _Rows(NamedTuple):
    """What every pass over the chunks shares."""

    hidden: torch.Tensor  # the operand hidden in the compute dtype, rows that do not count zeroed
    safe_labels: torch.Tensor  # (rows, 1): the target's column
    bad: torch.Tensor  # the rows that are NaN
    on_true: torch.Tensor  # 1 - eps, the target's mass
    per_class: torch.Tensor  # eps / |S|, each support class's


def _rows(options, saved: _Saved) -> _Rows:
    compute_dtype, counted, eps = saved.eps.dtype, saved.counted, saved.eps
    num_classes = saved.weight.shape[0]
    safe_labels, bad = _closed_form.label_rows(saved.labels, counted, eps, num_classes)
    hidden = _counted_rows_only(
        _operand(saved.hidden, options.operand_dtype, compute_dtype), counted
    )
    per_class = eps / _closed_form.support_size(options.convention, num_classes)
    return _Rows(hidden, safe_labels.unsqueeze(-1), bad, 1.0 - eps, per_class)


def _chunk_target(options, safe_labels, on_true, per_class, start, stop, device):
    """``q`` on the classes [start, stop): (rows, chunk), out of place."""
    classes = torch.arange(start, stop, device=device)
    labels = safe_labels.squeeze(-1)
    return _closed_form.smoothed_target(
        options.convention, options.pad_index, classes, labels, on_true, per_class
    )


def _gradients(options, saved: _Saved, grad_loss):
    """The first-order gradients, each chunk's ``coeff`` built in its logits' buffer."""
    convention, pad_index = options.convention, options.pad_index
    operand_dtype = options.operand_dtype
    hidden, weight, bias = saved.hidden, saved.weight, saved.bias
    counted, lse = saved.counted, saved.lse
    compute_dtype = saved.eps.dtype
    num_classes = weight.shape[0]
    hidden_c, safe_labels, bad, on_true, per_class = _rows(options, saved)
    scale = torch.where(bad, torch.nan, grad_loss.to(compute_dtype))
    scale = torch.where(counted, scale, 0.0).unsqueeze(-1)
    keep = counted.unsqueeze(-1)
    safe_lse = torch.where(counted, lse, 0.0).unsqueeze(-1)
    d_hidden = torch.zeros_like(hidden_c)
    d_weight = torch.empty_like(weight)
    d_bias = torch.empty_like(bias)
    with torch.no_grad(), _autocast_off(hidden.device.type):
        for start, stop in _chunks(num_classes, options.chunk_size):
            coeff = _chunk_logits(hidden_c, weight, bias, start, stop, operand_dtype, compute_dtype)
            coeff.sub_(safe_lse).exp_()  # softmax, in the logits' buffer
            classes = torch.arange(start, stop, device=hidden.device).unsqueeze(0)
            is_target = classes == safe_labels
            if convention == "uniform":
                coeff.sub_(per_class)
            else:
                coeff.sub_(torch.where(is_target, 0.0, per_class))
            if convention == "others_but_pad" and start <= pad_index < stop:
                coeff[:, pad_index - start] += per_class
            coeff.sub_(torch.where(is_target, on_true, 0.0))
            coeff.mul_(scale)
            # Select, do not multiply: 0 * NaN would leak a non-counted row's NaN features.
            coeff.masked_fill_(~keep, 0.0)
            weight_chunk = _operand(weight[start:stop], operand_dtype, compute_dtype)
            d_hidden.addmm_(coeff, weight_chunk)
            d_weight[start:stop] = (coeff.T @ hidden_c).to(weight.dtype)
            d_bias[start:stop] = coeff.sum(0).to(bias.dtype)
    return d_hidden.to(hidden.dtype), d_weight, d_bias


def _differentiable_gradients(options, saved: _Saved, grad_loss):
    """The same gradients through differentiable, out-of-place ops, with the lse recomputed
    from (hidden, weight, bias): their own derivatives (double backward, forward over reverse)
    are then exact. Chunked as the first-order pass; a recorded graph keeps what it needs."""
    operand_dtype, compute_dtype = options.operand_dtype, saved.eps.dtype
    hidden, weight, bias, counted = saved.hidden, saved.weight, saved.bias, saved.counted
    num_classes = weight.shape[0]
    hidden_c, safe_labels, bad, on_true, per_class = _rows(options, saved)
    chunks = _chunks(num_classes, options.chunk_size)
    lse = None
    for start, stop in chunks:
        logits = _chunk_logits(hidden_c, weight, bias, start, stop, operand_dtype, compute_dtype)
        chunk_lse = torch.logsumexp(logits, dim=-1)
        lse = chunk_lse if lse is None else torch.logaddexp(lse, chunk_lse)
    safe_lse = torch.where(counted, lse, 0.0).unsqueeze(-1)
    scale = torch.where(bad, torch.nan, grad_loss.to(compute_dtype))
    scale = torch.where(counted, scale, 0.0).unsqueeze(-1)
    keep = counted.unsqueeze(-1)
    d_hidden, d_weight, d_bias = 0.0, [], []
    for start, stop in chunks:
        logits = _chunk_logits(hidden_c, weight, bias, start, stop, operand_dtype, compute_dtype)
        target = _chunk_target(options, safe_labels, on_true, per_class, start, stop, hidden.device)
        coeff = torch.where(keep, (torch.exp(logits - safe_lse) - target) * scale, 0.0)
        weight_chunk = _operand(weight[start:stop], operand_dtype, compute_dtype)
        d_hidden = d_hidden + coeff @ weight_chunk
        d_weight.append(coeff.T @ hidden_c)
        d_bias.append(coeff.sum(0))
    return (
        d_hidden.to(hidden.dtype),
        torch.cat(d_weight).to(weight.dtype),
        torch.cat(d_bias).to(bias.dtype),
    )


def _loss_tangent(options, saved: _Saved, tangents):
    """``sum_c (softmax(x)_c - q_c) dx_c`` per row (NaN where the row is, 0 where it does not
    count), ``dx`` the tangent of the chunk's logits."""
    operand_dtype, compute_dtype = options.operand_dtype, saved.eps.dtype
    hidden, weight, bias = saved.hidden, saved.weight, saved.bias
    labels, counted, lse = saved.labels, saved.counted, saved.lse
    hidden_tangent, weight_tangent, bias_tangent = tangents
    num_classes = weight.shape[0]
    hidden_c, safe_labels, bad, on_true, per_class = _rows(options, saved)
    if hidden_tangent is not None:  # rounding to the operand dtype passes tangents unchanged
        hidden_tangent = _counted_rows_only(hidden_tangent.to(compute_dtype), counted)
    safe_lse = torch.where(counted, lse, 0.0).unsqueeze(-1)
    d_loss = torch.zeros(labels.shape, dtype=compute_dtype, device=hidden.device)
    for start, stop in _chunks(num_classes, options.chunk_size):
        logits = _chunk_logits(hidden_c, weight, bias, start, stop, operand_dtype, compute_dtype)
        target = _chunk_target(options, safe_labels, on_true, per_class, start, stop, hidden.device)
        coeff = torch.exp(logits - safe_lse) - target
        d_logits = 0.0
        if hidden_tangent is not None:
            weight_chunk = _operand(weight[start:stop], operand_dtype, compute_dtype)
            d_logits = d_logits + hidden_tangent @ weight_chunk.T
        if weight_tangent is not None:
            d_logits = d_logits + hidden_c @ weight_tangent[start:stop].to(compute_dtype).T
        if bias_tangent is not None:
            d_logits = d_logits + bias_tangent[start:stop].to(compute_dtype)
        d_loss = d_loss + (coeff * d_logits).sum(-1)
    d_loss = torch.where(bad, torch.nan, d_loss)
    return torch.where(counted, d_loss, 0.0)
