"""Fused linear + label-smoothed cross-entropy in PyTorch: the rows x V logits are never built.

Twin of ``lsjax.fused_linear_smoothed_cross_entropy`` (same name, keywords and meaning). The core
is a ``torch.autograd.Function`` that walks the vocabulary in chunks of ``chunk_size`` classes,
saves only the inputs and the per-row logsumexp (as its row max and log-sum) for backward, and
recomputes each chunk's logits there. Under ``torch.autocast`` the inputs are rounded as
``F.linear`` would cast them, in both passes alike (see the function's docstring).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

import lsspec
from lstorch import _closed_form, _common, smoothed
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
    class_weight: torch.Tensor | None = None,
    where: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    kl: bool = False,
    class_mask: torch.Tensor | None = None,
    z_loss: float | torch.Tensor = 0.0,
    return_z_loss: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_labels: bool | None = None,
    _caller: lsspec.Caller | None = None,
) -> torch.Tensor | tuple:
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

    Every option of :func:`lstorch.smoothed_cross_entropy` that applies to logits is taken, with
    the same meaning and errors: the class weights (named ``class_weight``, ``weight`` being the
    head's), ``where``, ``normalizer``, ``kl``, ``class_mask``, ``z_loss`` and
    ``return_z_loss``. Weights and mask enter the rank-1 support sum as ``hidden . sum_c w_c m_c
    W_c``, a masked class's logit is left out of each chunk's logsumexp, and the logits'
    gradient is ``g ((A + 2 z lse) softmax(x) - t) + g_z 2 z lse softmax(x)`` (``t`` the
    weighted smoothed target, ``A = sum_c t_c``, ``g_z`` the z-part's cotangent), still one
    ``rows x chunk_size`` block at a time.

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
      class_weight: per-class weights ``(V,)``: the dense loss's ``weight`` (torch's class
        ``weight``), named apart from the head's ``weight``. A row is ``(1 - eps) w_y (lse - x_y)
        + eps sum_{c in S} w_c (lse - x_c) / |S|`` and ``"mean"`` divides by the sum of ``w_y``
        over counted rows. A constant: differentiating through it raises a TypeError.
      where: boolean row mask with the labels' shape; False rows count for nothing.
      normalizer: with ``reduction="mean"``, divide the sum by this instead (for gradient
        accumulation: the token count of the whole accumulated batch). A finite number > 0.
      kl: return the KL form, the loss minus the target's entropy (SEMANTICS.md §2): same
        gradient, minimum 0. Not defined with ``class_weight``.
      class_mask: boolean ``(V,)``; False classes leave the softmax and the smoothing support
        (SEMANTICS.md §7). A counted row whose label is a masked class raises (or is NaN where
        the labels cannot be read).
      z_loss: ``z >= 0`` and finite; adds ``z * lse**2`` to every counted row (the PaLM/T5X
        z-loss, with the head's logits). Differentiable: ``d loss_row / d z = lse**2``.
      return_z_loss: also return the z-loss part alone, reduced like the loss: ``(loss,
        z_part)`` where ``loss`` already includes ``z_part``.
      softcap: ``None`` or a finite number ``cap > 0``: the loss is taken on ``t = cap *
        tanh(logit_scale * x / cap)``, as in :func:`lstorch.smoothed_cross_entropy`. Applied to
        each chunk's logits where the chunk loop reads them (the smoothing's sum over the
        classes then is one more sum in the forward loop instead of the rank-1 product); the
        gradient is the chain rule, ``dt/dx`` times the gradient for ``t``, in the backward
        loop. The z-loss and the statistics are those of ``t``. A Python number, compiled in.
      logit_scale: a finite number ``> 0`` (default 1.0) the logits are multiplied by first.
      return_stats: also return ``lstorch.RowStats(lse, entropy, correct)`` per row (the
        labels' shape), taken in the forward chunk loop (an online entropy sum and an online
        argmax with ``torch.argmax``'s first-max rule, on the logits before the transform):
        ``(loss, stats)`` or ``(loss, z_part, stats)``, as the dense loss returns them.
      chunk_size: classes per chunk. Temporaries grow as ``rows x chunk_size``; larger chunks
        mean fewer, larger matrix products.
      check_labels: whether the host reads the labels (and a ``smoothing`` tensor) to check
        them, as in :func:`lstorch.smoothed_cross_entropy`: ``None``, CPU tensors only (on an
        accelerator no read-back: a label out of range gives a NaN row); ``True``, on any
        device (a sync); ``False``, never.

    Returns:
      float32 for bf16/fp16/float32 inputs (accumulated in float32: every logit, lse and sum),
      float64 for float64; per row for ``"none"``, else a scalar; ``(loss, z_part)`` with
      ``return_z_loss=True``. Gradients come back in the inputs' dtypes: ``d hidden`` is
      accumulated over every chunk, and each class's ``d weight`` row over every row, in float32
      (float64 for float64 inputs), and rounded to the inputs' dtype once.

    ``_caller`` is internal: the public function or module that called this one for the user
    (who errors name: ``FusedLinearSmoothedCrossEntropyLoss`` when the module called).
    """
    fn = lsspec.caller("fused_linear_smoothed_cross_entropy", _caller)
    operand_dtype = _check_fused(fn, hidden, weight, bias, labels)
    device = hidden.device
    class_weight = _common.tensor_option(fn, "class_weight", class_weight, device, "hidden")
    where = _common.tensor_option(fn, "where", where, device, "hidden")
    class_mask = _common.tensor_option(fn, "class_mask", class_mask, device, "hidden")
    labels = _common.index_labels(labels)  # before any comparison, and so weight[labels] indexes
    num_classes = weight.shape[0]
    _check_row_options(fn, num_classes, tuple(labels.shape), class_weight, where, class_mask)
    options = lsspec.LabelOptions(smoothing, convention, ignore_index, pad_index, reduction)
    z_value, transform, chunk_size = _check_options(
        fn,
        num_classes,
        options,
        chunk_size,
        class_weight=class_weight,
        normalizer=normalizer,
        kl=kl,
        z_loss=z_loss,
        return_z_loss=return_z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        return_stats=return_stats,
        check_labels=check_labels,
    )
    _common.check_class_mask_support(fn, class_mask, convention, pad_index, check_labels)
    counted = _common.counted_rows(labels, ignore_index, pad_index, where)
    _common.check_label_range(
        fn, labels, counted, num_classes, ignore_index, class_mask, check_labels
    )
    compute_dtype = _common.compute_dtype(operand_dtype)
    eps = _common.smoothing_tensor(smoothing, compute_dtype, hidden.device)  # differentiated
    if bias is None:
        bias = torch.zeros(num_classes, dtype=hidden.dtype, device=hidden.device)
    if class_weight is not None:  # constants, as in the dense loss
        class_weight = class_weight.detach().to(compute_dtype)
    if class_mask is not None:
        class_mask = class_mask.detach()
    # z-loss is computed only when it can matter (as in the dense loss).
    with_z = return_z_loss or isinstance(z_loss, torch.Tensor) or z_value != 0
    z = _common.z_loss_tensor(z_loss if with_z else 0.0, compute_dtype, hidden.device)
    fused_rows = _common.with_forward_mode(_FusedRows, _FusedRowsForwardMode)
    loss, z_part, peak, log_sum, _, entropy, correct = fused_rows.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        labels.reshape(-1),
        counted.reshape(-1),
        eps,
        class_weight,
        class_mask,
        z,
        _Options(
            convention, pad_index, chunk_size, operand_dtype, kl, with_z, transform, return_stats
        ),
    )
    safe_labels = torch.where(counted, labels, 0).clamp(0, num_classes - 1)
    w_y = 1.0 if class_weight is None else _common.at_labels(class_weight, safe_labels)
    row_weight = torch.where(counted, w_y, 0.0).to(compute_dtype)
    loss = _common.reduce(loss.reshape(labels.shape), row_weight, reduction, normalizer)
    outputs = (loss,)
    if return_z_loss:
        z_part = _common.reduce(z_part.reshape(labels.shape), row_weight, reduction, normalizer)
        outputs = (loss, z_part)
    if return_stats:
        flat_counted = counted.reshape(-1)
        lse = torch.where(flat_counted, peak + log_sum, 0.0)
        stats = (lse, entropy, correct > 0)
        stats = _closed_form.RowStats(*(value.reshape(labels.shape) for value in stats))
        return (*outputs, stats)
    return outputs if return_z_loss else outputs[0]


def _check_row_options(fn, num_classes, rows, class_weight, where, class_mask) -> None:
    """The shapes and dtypes of the options the fused loss shares with the dense one."""
    if class_weight is not None and tuple(class_weight.shape) != (num_classes,):
        shape = tuple(class_weight.shape)
        raise lsspec.shape_error(fn, "class_weight", shape, f"shape ({num_classes},)")
    lsspec.check_row_options_shapes(fn, num_classes, rows, where=where, class_mask=class_mask)
    _common.check_bool(fn, "where", where)
    _common.check_bool(fn, "class_mask", class_mask)


def _check_options(
    fn,
    num_classes,
    options: lsspec.LabelOptions,
    chunk_size,
    *,
    class_weight=None,
    normalizer=None,
    kl=False,
    z_loss=0.0,
    return_z_loss=False,
    softcap=None,
    logit_scale=1.0,
    return_stats=False,
    check_labels=None,
    **_inputs,
):
    """Check the plain options of :func:`fused_linear_smoothed_cross_entropy`: the function's,
    and its module's at construction (``num_classes=None``; the other inputs, ``where``,
    ``class_mask``, ..., are passed over). The class weights are called ``class_weight`` in
    the messages (``weight`` is the head's). Returns ``(z_loss as read, the logit transform,
    chunk_size)``."""
    z_value, transform = _common.check_loss_options(
        _class_weight_caller(fn), num_classes, options, check_labels, normalizer=normalizer,
        kl=kl, has_weight=class_weight is not None, z_loss=z_loss, return_z_loss=return_z_loss,
        softcap=softcap, logit_scale=logit_scale, return_stats=return_stats,
    )  # fmt: skip
    return z_value, transform, lsspec.check_chunk_size(fn, chunk_size)


def _class_weight_caller(fn: lsspec.Caller) -> lsspec.Caller:
    """``fn`` naming the dense loss's ``weight`` (class weights) ``class_weight``."""
    return lsspec.Caller(fn.fn, (*fn.renamed, ("weight", fn.arg("class_weight"))))


class _Options(NamedTuple):
    """The static options of the fused core."""

    convention: str
    pad_index: int | None
    chunk_size: int
    operand_dtype: torch.dtype  # what hidden, weight and bias are rounded to (autocast's dtype)
    kl: bool = False
    with_z: bool = False  # the z-loss is part of the loss (else z_part is 0)
    transform: lsspec.LogitTransform = lsspec.LogitTransform()  # softcap(logit_scale * x)
    with_stats: bool = False  # the forward also takes the entropy and the argmax


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts ``F.linear``'s inputs to on ``device_type``; None
    outside an autocast region for that device type."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _check_fused(fn, hidden, weight, bias, labels) -> torch.dtype:
    """Checks the inputs; returns the dtype the products see (the operand dtype): the hidden's,
    or under ``torch.autocast`` the one ``F.linear`` would cast its inputs to."""
    _common.floating(fn, hidden=hidden, weight=weight, **({} if bias is None else {"bias": bias}))
    _common.integer_labels(fn, labels)
    others = {"weight": weight, "labels": labels, **({} if bias is None else {"bias": bias})}
    _common.same_device(fn, "hidden", hidden.device, **others)
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


class _Classes(NamedTuple):
    """The per-class side of a call, O(V): the weighted smoothed target's factors
    (``lstorch.smoothed._target``) and the mask."""

    target: Any  # smoothed._Target: safe labels, bad rows, u = w m, on_true, per_class, ...
    support: torch.Tensor | None  # u_c = w_c m_c, None when every u_c is 1
    class_mask: torch.Tensor | None
    size: Any  # |S|


def _classes(options, labels, counted, eps, class_weight, class_mask, num_classes) -> _Classes:
    target = smoothed._target(options, num_classes, labels, counted, eps, class_weight, class_mask)
    support = None if class_weight is None and class_mask is None else target.w
    size = _closed_form.support_size(options.convention, num_classes, options.pad_index, class_mask)
    return _Classes(target, support, class_mask, size)


class _Pass(NamedTuple):
    """What the forward chunk loop gathers per row (None where not asked for)."""

    lse: _closed_form.Lse
    support_sum: Any  # sum_c u_c t_c (with a transform: t is not linear, no rank-1 product)
    entropy: Any  # -sum_c p_c log p_c (with_stats)
    argmax: Any  # the first maximal class of the untransformed allowed logits (with_stats)


def _lse_parts(
    options, hidden, weight, bias, class_mask, compute_dtype, support=None, forward=False
):
    """``lse = peak + log_sum`` over the allowed classes (a masked logit is -inf): ``peak`` the
    row's max logit (0 where it is not finite), ``log_sum`` the log of ``sum_c exp(x_c -
    peak)``, accumulated one chunk at a time as an online softmax does (a running max, not
    differentiated, and the sum relative to it). Kept apart, as the dense core keeps them: with
    confident predictions ``1 - softmax(x)_y`` is ``1 - exp((x_y - peak) - log_sum)``, exact to
    float32's resolution at 1, where ``exp(x_y - lse)`` would carry the rounding of ``lse`` (an
    ulp of ``|x|``: at logits ~20 that is 20x the gradient error of the dense float32 route).
    Differentiable in ``hidden``, ``weight`` and ``bias`` where they require grad.

    The logits are the transformed ones, ``t = softcap(logit_scale * x)``. With ``forward``
    it returns a :class:`_Pass`: with a transform the same loop also sums ``u_c t_c`` (``u =
    support``, None: all 1), and with ``options.with_stats`` it keeps, online, ``sum_c exp(t_c
    - peak) (t_c - peak)`` (rescaled as the running max moves) for the entropy and the running
    first argmax of the untransformed allowed logits (a later chunk replaces it only with a
    strictly larger max: ``torch.argmax``'s first-max rule). Else the :class:`Lse` alone."""
    operand_dtype, transform = options.operand_dtype, options.transform
    stats = forward and options.with_stats
    rows = hidden.shape[0]
    peak = torch.full((rows,), -torch.inf, dtype=compute_dtype, device=hidden.device)
    total = torch.zeros(rows, dtype=compute_dtype, device=hidden.device)
    support_sum = moment = torch.zeros_like(total)
    best = torch.full_like(peak, -torch.inf)
    best_index = torch.zeros(rows, dtype=torch.long, device=hidden.device)
    for start, stop in _chunks(weight.shape[0], options.chunk_size):
        raw = _chunk_logits(hidden, weight, bias, start, stop, operand_dtype, compute_dtype)
        logits = _closed_form.transformed(raw, transform)
        if forward and transform.active:
            if support is None:
                support_sum = support_sum + logits.sum(-1)
            else:
                u = support[start:stop]
                support_sum = support_sum + torch.where(u != 0, logits * u, 0.0).sum(-1)
        if class_mask is not None:
            logits = logits.masked_fill(~class_mask[start:stop], -torch.inf)
        new_peak = torch.maximum(peak, logits.detach().amax(-1))
        shift = torch.where(torch.isfinite(new_peak), new_peak, 0.0)
        rescale = torch.exp(peak - shift)
        relative = logits - shift.unsqueeze(-1)
        exps = torch.exp(relative)
        if stats:
            moved = torch.where(torch.isfinite(peak), peak - shift, 0.0)
            chunk_moment = torch.where(exps > 0, exps * relative, 0.0).sum(-1)
            moment = rescale * (moment + moved * total) + chunk_moment
            values = (
                raw if class_mask is None else raw.masked_fill(~class_mask[start:stop], -torch.inf)
            )
            chunk_best, chunk_index = values.max(-1)  # the first maximal index
            take = chunk_best > best
            best = torch.where(take, chunk_best, best)
            best_index = torch.where(take, chunk_index + start, best_index)
        total = total * rescale + exps.sum(-1)
        peak = new_peak
    lse = _closed_form.Lse(torch.where(torch.isfinite(peak), peak, 0.0), torch.log(total))
    if not forward:
        return lse
    entropy = argmax = None
    if stats:  # H = log_sum - sum_c p_c (t_c - peak)
        entropy = torch.log(total) - moment / total
        argmax = best_index
    return _Pass(lse, support_sum if transform.active else None, entropy, argmax)


def _support_column_sum(support, weight, chunk_size, operand_dtype, compute_dtype):
    """``sum_c u_c weight[c]`` of the operand, in ``compute_dtype``: (D,), chunk by chunk."""
    if support is None:
        return _weight_column_sum(weight, chunk_size, operand_dtype, compute_dtype)
    total = torch.zeros(weight.shape[1], dtype=compute_dtype, device=weight.device)
    for start, stop in _chunks(weight.shape[0], chunk_size):
        chunk = _operand(weight[start:stop], operand_dtype, compute_dtype)
        total = total + support[start:stop] @ chunk
    return total


def _terms(options, hidden, weight, bias, labels, counted, eps, class_weight, class_mask, z):
    """``(loss, z_part, lse, eps_slope)`` per row, each O(rows): the lse chunk by chunk, ``x_y``
    from the label's row of the weight, the support sum as a rank-1 product."""
    convention, operand_dtype = options.convention, options.operand_dtype
    chunk_size = options.chunk_size
    compute_dtype = eps.dtype
    num_classes = weight.shape[0]
    hidden = _counted_rows_only(_operand(hidden, operand_dtype, compute_dtype), counted)
    classes = _classes(options, labels, counted, eps, class_weight, class_mask, num_classes)
    target = classes.target
    safe_labels, support = target.safe_labels, classes.support
    forward = _lse_parts(
        options, hidden, weight, bias, class_mask, compute_dtype, support, forward=True
    )
    lse = forward.lse

    def column(classes):  # the (transformed) logit of one class per row
        rows = _operand(_common.at_labels(weight, classes), operand_dtype, compute_dtype)
        bias_y = _operand(_common.at_labels(bias, classes), operand_dtype, compute_dtype)
        value = (hidden * rows).sum(-1) + bias_y
        return _closed_form.transformed(value, options.transform)

    x_y = column(safe_labels)
    w_y = 1.0 if class_weight is None else _common.at_labels(class_weight, safe_labels)
    # sum_{c in S} u_c x_c = hidden . (sum_c u_c weight_c) + sum_c u_c bias_c: rank 1, no pass
    # over the logits. Unlike the dense core (relative to the row max), this needs
    # |logits| < float max / K.
    if options.transform.active:  # the transformed logits' sum, from the forward loop
        support_sum = forward.support_sum
    else:
        weight_sum = _support_column_sum(support, weight, chunk_size, operand_dtype, compute_dtype)
        bias_values = _operand(bias, operand_dtype, compute_dtype)
        bias_sum = bias_values.sum() if support is None else support @ bias_values
        support_sum = hidden @ weight_sum + bias_sum
    if convention != "uniform":  # the label is allowed (else the row is bad): u_y = w_y
        support_sum = support_sum - w_y * x_y
    if convention == "others_but_pad":
        u_pad = 1.0 if support is None else support[options.pad_index]
        support_sum = support_sum - u_pad * column(torch.full_like(labels, options.pad_index))
    # The closed form of statistics relative to the row's max (the rank-1 sum is of unshifted
    # logits), no scaling.
    terms = _closed_form.RowTerms(
        lse,
        x_y,
        w_y,
        support_sum - target.support_weight * lse.peak,
        target.support_weight,
        safe_labels,
        target.bad,
        classes.size,
        1.0,
    )
    form = dict(convention=convention, kl=options.kl)
    output = _closed_form.row_loss(terms, counted, eps, z=z if options.with_z else None, **form)
    loss, z_part = output if options.with_z else (output, torch.zeros_like(output))
    # d loss_row / d eps (O(rows), kept for backward; masked there, after the product with g).
    eps_slope = _closed_form.smoothing_slope(terms, eps, **form)
    if options.with_stats:  # 0, 0 and False on rows that do not count (as the dense loss)
        entropy = torch.where(counted, forward.entropy, 0.0)
        correct = (forward.argmax == safe_labels) & counted & ~target.bad
        correct = correct.to(compute_dtype)
    else:
        # Two tensors: one tensor returned as two outputs aliases them (torch.compile refuses).
        entropy = torch.zeros(0, dtype=compute_dtype, device=hidden.device)
        correct = torch.zeros(0, dtype=compute_dtype, device=hidden.device)
    return loss, z_part, lse.peak, lse.log_sum, eps_slope, entropy, correct


class _FusedRows(torch.autograd.Function):
    """Per-row loss (and z-part) of ``F.linear(hidden, weight, bias)``; backward recomputes
    chunk logits.

    ``setup_context`` + ``generate_vmap_rule`` make it work under ``torch.func`` (grad, vmap
    with batched labels); ``_FusedRowsForwardMode`` adds forward mode. A first-order
    backward builds the gradients chunk by chunk in place; one that will be differentiated
    again (``create_graph=True``, ``torch.func``, forward over reverse) recomputes the lse and
    every chunk through differentiable ops instead, so second derivatives are exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden, weight, bias, labels, counted, eps, class_weight, class_mask, z, options):
        # Autocast off in both passes: the products see the operands rounded by _operand, in
        # float32, the same in forward and backward.
        grad_mode = torch.enable_grad() if _common.traced_functorch() else torch.no_grad()
        with grad_mode, _common.autocast_off(hidden.device.type):
            inputs = (hidden, weight, bias, labels, counted, eps, class_weight, class_mask, z)
            return _terms(options, *inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, options = inputs
        _, _, peak, log_sum, eps_slope, entropy, correct = output
        ctx.options = options
        # The smoothing's per-row slope (O(rows)) is kept only when the smoothing is
        # differentiated (backward) or may carry a tangent (forward mode).
        kept = eps_slope if ctx.needs_input_grad[5] else None
        ctx.save_for_backward(*tensors, peak, log_sum, kept)
        ctx.save_for_forward(*tensors, peak, log_sum, eps_slope)
        ctx.mark_non_differentiable(peak, log_sum, eps_slope, entropy, correct)

    @staticmethod
    def backward(ctx, grad_loss, grad_z, grad_peak, grad_log_sum, grad_slope, *grad_stats):
        """Per chunk: ``coeff = s p - g t`` (rows x chunk; ``p`` the softmax over the allowed
        classes, ``t`` the weighted smoothed target, ``s = g (A + 2 z lse) + g_z 2 z lse``,
        ``A = sum_c t_c``), then ``d hidden += coeff @ W_chunk``, ``d W_chunk = coeff.T @
        hidden``, ``d b_chunk = sum coeff``; ``d eps = sum_rows g slope_row`` and ``d z =
        sum_rows (g + g_z) lse_row**2`` when they are differentiated."""
        # internal statistics, never differentiated.
        del grad_peak, grad_log_sum, grad_slope, grad_stats
        saved = _Saved(*ctx.saved_tensors)
        options = ctx.options
        grad_z = grad_z if options.with_z else None
        if _common.differentiated_again(saved.hidden, saved.weight, saved.bias):
            with _common.autocast_off(saved.hidden.device.type):
                grads = _differentiable_gradients(options, saved, grad_loss, grad_z)
        else:
            grads = _gradients(options, saved, grad_loss, grad_z)
        d_eps = d_z = None
        if saved.eps_slope is not None:  # d eps = sum_rows g * slope (NaN from invalid rows)
            d_eps = _smoothing_rows(options, saved, grad_loss * saved.eps_slope)
            d_eps = d_eps.sum().reshape(saved.eps.shape)
        if ctx.needs_input_grad[8] and options.with_z:
            g_total = grad_loss + grad_z if grad_z is not None else grad_loss
            d_z = _smoothing_rows(options, saved, g_total * saved.lse.square())
            d_z = d_z.sum().reshape(saved.z.shape)
        return (*grads, None, None, d_eps, None, None, d_z, None)


class _FusedRowsForwardMode(_FusedRows):
    """``_FusedRows`` with ``jvp`` (``torch.func.jvp``/``jacfwd``/``hessian``,
    ``torch.autograd.forward_ad``); Dynamo traces ``_FusedRows`` (see ``_with_forward_mode``)."""

    @staticmethod
    def jvp(ctx, hidden_tangent, weight_tangent, bias_tangent, *other_tangents):
        """``d loss = sum_c ((A + 2 z lse) p_c - t_c) dx_c`` and ``d z_part = sum_c 2 z lse p_c
        dx_c`` with ``dx = d hidden @ W.T + hidden @ d W.T + d b``, one ``rows x chunk_size``
        block at a time; plus ``slope d eps`` and ``lse**2 d z``."""
        eps_tangent, z_tangent = other_tangents[2], other_tangents[5]  # labels, masks: constants
        saved = _Saved(*ctx.saved_tensors)
        options = ctx.options
        with _common.autocast_off(saved.hidden.device.type):
            tangents = (hidden_tangent, weight_tangent, bias_tangent)
            d_loss, d_z = _loss_tangent(options, saved, tangents)
        if eps_tangent is not None:
            d_loss = d_loss + _smoothing_rows(options, saved, times(eps_tangent, saved.eps_slope))
        if z_tangent is not None and options.with_z:
            z_rows = _smoothing_rows(options, saved, times(z_tangent, saved.lse.square()))
            d_loss, d_z = d_loss + z_rows, d_z + z_rows
        # the lse's parts, the slope, the statistics: non-differentiable
        return d_loss, d_z, None, None, None, None, None


class _Saved(NamedTuple):
    """What the core's backward and forward mode read: its inputs and the forward's per-row
    lse and smoothing slope (the slope None where the smoothing is not differentiated)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    labels: torch.Tensor
    counted: torch.Tensor
    eps: torch.Tensor
    class_weight: torch.Tensor | None
    class_mask: torch.Tensor | None
    z: torch.Tensor
    peak: torch.Tensor  # lse = peak + log_sum (_lse_parts)
    log_sum: torch.Tensor
    eps_slope: torch.Tensor | None

    @property
    def lse(self) -> torch.Tensor:
        return self.peak + self.log_sum


def _smoothing_rows(options, saved: _Saved, per_row):
    """``per_row`` (a term of an option's derivative) on the rows that count, NaN on the
    invalid ones, 0 elsewhere (a select: the others may hold anything)."""
    num_classes = saved.weight.shape[0]
    _, bad = _closed_form.label_rows(
        saved.labels, saved.counted, saved.eps, num_classes, saved.class_mask
    )
    return _closed_form.counted_only(saved.counted, bad, per_row.to(saved.eps.dtype))


class _Rows(NamedTuple):
    """What every pass over the chunks shares."""

    hidden: torch.Tensor  # the operand hidden in the compute dtype, rows that do not count zeroed
    safe_labels: torch.Tensor  # (rows,): the target's column
    softmax_scale: torch.Tensor  # (rows, 1): s = g (A + 2 z lse) + g_z 2 z lse
    target_true: torch.Tensor  # (rows, 1): g (1 - eps) w_y, the target's mass
    target_other: torch.Tensor  # (rows, 1): g eps / |S|, each support class's before u_c
    support: torch.Tensor | None  # (V,): u_c = w_c m_c; None when all 1
    class_mask: torch.Tensor | None
    peak: torch.Tensor  # (rows, 1): lse = peak + log_sum, both 0 on rows that do not count
    log_sum: torch.Tensor  # (rows, 1)


def _rows(options, saved: _Saved, grad_loss, grad_z) -> _Rows:
    """The per-row factors of the chunks' ``coeff = s p - g t`` for the cotangents ``grad_loss``
    and ``grad_z`` (None: 0); ``grad_loss = 1`` gives the tangent's factors. NaN on invalid
    rows, 0 on rows that do not count."""
    compute_dtype, counted, eps = saved.eps.dtype, saved.counted, saved.eps
    num_classes = saved.weight.shape[0]
    classes = _classes(
        options, saved.labels, counted, eps, saved.class_weight, saved.class_mask, num_classes
    )
    target = classes.target
    hidden = _counted_rows_only(
        _operand(saved.hidden, options.operand_dtype, compute_dtype), counted
    )
    g = grad_loss.to(compute_dtype)
    peak = torch.where(counted, saved.peak, 0.0)
    log_sum = torch.where(counted, saved.log_sum, 0.0)
    lse = peak + log_sum
    softmax_scale = g * target.mass()
    if options.with_z:
        z_scale = 2.0 * saved.z * lse
        g_total = g if grad_z is None else g + grad_z.to(compute_dtype)
        softmax_scale = softmax_scale + g_total * z_scale

    def row_factor(value):
        value = torch.as_tensor(value, dtype=compute_dtype, device=hidden.device)
        value = value.expand(counted.shape)
        return _closed_form.counted_only(counted, target.bad, value).unsqueeze(-1)

    return _Rows(
        hidden,
        target.safe_labels,
        row_factor(softmax_scale),
        row_factor(g * target.on_true),
        row_factor(g * target.per_class),
        classes.support,
        classes.class_mask,
        peak.unsqueeze(-1),
        log_sum.unsqueeze(-1),
    )


def _chunk_target(options, rows: _Rows, start, stop, device):
    """``g t`` on the classes [start, stop): (rows, chunk), out of place."""
    classes = torch.arange(start, stop, device=device)
    other = rows.target_other
    if rows.support is not None:
        other = other * rows.support[start:stop]
    return _closed_form.smoothed_target(
        options.convention, options.pad_index, classes, rows.safe_labels, rows.target_true, other
    )


def _chunk_softmax(rows: _Rows, logits, start, stop):
    """The softmax over the allowed classes of a chunk's logits, out of place (0 masked)."""
    softmax = torch.exp((logits - rows.peak) - rows.log_sum)
    if rows.class_mask is not None:
        softmax = softmax.masked_fill(~rows.class_mask[start:stop], 0.0)
    return softmax


def _gradients(options, saved: _Saved, grad_loss, grad_z):
    """The first-order gradients, each chunk's ``coeff`` built in its logits' buffer. ``d
    hidden`` accumulates over the chunks in the compute dtype (float32 for bf16/fp16 inputs)
    and each class's ``d weight`` row is one float32 product over every row: both are rounded
    to the inputs' dtype once."""
    operand_dtype = options.operand_dtype
    hidden, weight, bias = saved.hidden, saved.weight, saved.bias
    counted = saved.counted
    compute_dtype = saved.eps.dtype
    num_classes = weight.shape[0]
    rows = _rows(options, saved, grad_loss, grad_z)
    hidden_c = rows.hidden
    keep = counted.unsqueeze(-1)
    d_hidden = torch.zeros_like(hidden_c)
    d_weight = torch.empty_like(weight)
    d_bias = torch.empty_like(bias)
    with torch.no_grad(), _common.autocast_off(hidden.device.type):
        for start, stop in _chunks(num_classes, options.chunk_size):
            coeff = _chunk_logits(hidden_c, weight, bias, start, stop, operand_dtype, compute_dtype)
            slope = None
            if options.transform.active:  # the chain rule through t = softcap(scale * x)
                slope = _closed_form.transform_slope(coeff, options.transform)
                coeff = _closed_form.transformed(coeff, options.transform)
            coeff.sub_(rows.peak).sub_(rows.log_sum).exp_()  # softmax, in the logits' buffer
            if rows.class_mask is not None:
                coeff.masked_fill_(~rows.class_mask[start:stop], 0.0)
            coeff.mul_(rows.softmax_scale)
            coeff.sub_(_chunk_target(options, rows, start, stop, hidden.device))
            if slope is not None:
                coeff.mul_(slope)
                del slope
            # Select, do not multiply: 0 * NaN would leak a non-counted row's NaN features.
            coeff.masked_fill_(~keep, 0.0)
            weight_chunk = _operand(weight[start:stop], operand_dtype, compute_dtype)
            d_hidden.addmm_(coeff, weight_chunk)
            d_weight[start:stop] = (coeff.T @ hidden_c).to(weight.dtype)
            d_bias[start:stop] = coeff.sum(0).to(bias.dtype)
    return d_hidden.to(hidden.dtype), d_weight, d_bias


def _differentiable_gradients(options, saved: _Saved, grad_loss, grad_z):
    """The same gradients through differentiable, out-of-place ops, with the lse recomputed
    from (hidden, weight, bias): their own derivatives (double backward, forward over reverse)
    are then exact. Chunked as the first-order pass; a recorded graph keeps what it needs."""
    operand_dtype, compute_dtype = options.operand_dtype, saved.eps.dtype
    hidden, weight, bias, counted = saved.hidden, saved.weight, saved.bias, saved.counted
    num_classes = weight.shape[0]
    chunks = _chunks(num_classes, options.chunk_size)
    hidden_c = _counted_rows_only(_operand(hidden, operand_dtype, compute_dtype), counted)
    lse = _lse_parts(options, hidden_c, weight, bias, saved.class_mask, compute_dtype)
    recomputed = saved._replace(peak=lse.peak, log_sum=lse.log_sum)
    rows = _rows(options, recomputed, grad_loss, grad_z)._replace(hidden=hidden_c)
    keep = counted.unsqueeze(-1)
    d_hidden, d_weight, d_bias = 0.0, [], []
    for start, stop in chunks:
        raw = _chunk_logits(hidden_c, weight, bias, start, stop, operand_dtype, compute_dtype)
        logits = _closed_form.transformed(raw, options.transform)
        softmax = _chunk_softmax(rows, logits, start, stop)
        target = _chunk_target(options, rows, start, stop, hidden.device)
        coeff = rows.softmax_scale * softmax - target
        if options.transform.active:  # the chain rule through t = softcap(scale * x)
            coeff = coeff * _closed_form.transform_slope(raw, options.transform)
        coeff = torch.where(keep, coeff, 0.0)
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
    """Per row ``(d loss, d z_part)``: ``sum_c ((A + 2 z lse) p_c - t_c) dx_c`` and ``sum_c 2 z
    lse p_c dx_c`` (NaN where the row is, 0 where it does not count), ``dx`` the tangent of the
    chunk's logits."""
    operand_dtype, compute_dtype = options.operand_dtype, saved.eps.dtype
    hidden, weight, bias = saved.hidden, saved.weight, saved.bias
    labels, counted = saved.labels, saved.counted
    hidden_tangent, weight_tangent, bias_tangent = tangents
    num_classes = weight.shape[0]
    ones = torch.ones(labels.shape, dtype=compute_dtype, device=hidden.device)
    rows = _rows(options, saved, ones, None)
    z_rows = None
    if options.with_z:  # the z-part's own: s = 2 z lse, t = 0
        z_rows = _rows(options, saved, torch.zeros_like(ones), ones)
    hidden_c = rows.hidden
    if hidden_tangent is not None:  # rounding to the operand dtype passes tangents unchanged
        hidden_tangent = _counted_rows_only(hidden_tangent.to(compute_dtype), counted)
    d_loss = torch.zeros(labels.shape, dtype=compute_dtype, device=hidden.device)
    d_z = torch.zeros_like(d_loss)
    for start, stop in _chunks(num_classes, options.chunk_size):
        raw = _chunk_logits(hidden_c, weight, bias, start, stop, operand_dtype, compute_dtype)
        logits = _closed_form.transformed(raw, options.transform)
        softmax = _chunk_softmax(rows, logits, start, stop)
        target = _chunk_target(options, rows, start, stop, hidden.device)
        coeff = rows.softmax_scale * softmax - target
        d_logits = 0.0
        if hidden_tangent is not None:
            weight_chunk = _operand(weight[start:stop], operand_dtype, compute_dtype)
            d_logits = d_logits + hidden_tangent @ weight_chunk.T
        if weight_tangent is not None:
            d_logits = d_logits + hidden_c @ weight_tangent[start:stop].to(compute_dtype).T
        if bias_tangent is not None:
            d_logits = d_logits + bias_tangent[start:stop].to(compute_dtype)
        if options.transform.active:  # dt = dt/dx dx
            d_logits = d_logits * _closed_form.transform_slope(raw, options.transform)
        d_loss = d_loss + (coeff * d_logits).sum(-1)
        if z_rows is not None:
            d_z = d_z + (z_rows.softmax_scale * softmax * d_logits).sum(-1)
    return torch.where(counted, d_loss, 0.0), torch.where(counted, d_z, 0.0)
