"""Fused linear + label-smoothed cross-entropy in JAX: the rows x V logits are never built.

For a language-model head ``logits = hidden @ weight.T + bias`` with a large vocabulary ``V``,
the dense route materialises ``rows x V`` logits (and as much again for their gradient). Here
the closed form of :func:`lsjax.smoothed_cross_entropy` (SEMANTICS.md §1) is evaluated from three
per-row statistics that need no ``rows x V`` array:

* ``lse``: logsumexp over the classes, accumulated chunk by chunk over the vocabulary
  (``chunk_size`` classes at a time, each chunk's logits recomputed from ``hidden`` and
  ``weight``);
* ``x_y = hidden . weight[y] + bias[y]``: one gathered row of the weight per row;
* ``sum_c x_c = hidden . (sum_c weight[c]) + sum_c bias[c]``: the smoothing term is a rank-1
  product with the column sums of the weight, no pass over the logits at all.

The backward pass (a ``jax.custom_vjp``) keeps only those O(rows) statistics besides the inputs,
and recomputes each chunk's logits to form ``g * (softmax - q)`` one chunk at a time:
``d hidden += coeff @ weight_chunk``, ``d weight_chunk = coeff.T @ hidden``,
``d bias_chunk = sum_rows coeff``.
Its PyTorch twin is ``lstorch.fused_linear_smoothed_cross_entropy``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import lsspec
from lsjax import _closed_form, _common
from lsjax._common import Array, ArrayLike

DEFAULT_CHUNK_SIZE = 2048
_HIGHEST = jax.lax.Precision.HIGHEST


class _FusedOptions(NamedTuple):
    """The static (hashable) options of the fused core."""

    convention: str
    pad_index: int | None
    chunk_size: int
    axis_name: Any  # the mesh axis the vocabulary is split over (inside shard_map), or None


def fused_linear_smoothed_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    smoothing: float | Array = 0.0,
    convention: str = "uniform",
    ignore_index: int | None = None,
    pad_index: int | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_labels: bool | None = None,
    _caller: lsspec.Caller | None = None,
) -> Array:
    r"""``smoothed_cross_entropy(hidden @ weight.T + bias, labels, ...)`` without the logits.

    With ``x = hidden @ weight.T + bias`` (``K = V`` classes), each row's loss is the closed form
    of SEMANTICS.md §1::

        loss = (1 - eps) * (lse - x_y) + eps * (lse - mean_{c in S} x_c)

    where ``lse`` is accumulated over vocabulary chunks of ``chunk_size`` classes,
    ``x_y = hidden . weight[y] + bias[y]`` and ``sum_c x_c = hidden . weight.sum(0) + bias.sum()``
    (``mean_S x``: ``sum(x)/K`` uniform, ``(sum(x) - x_y)/(K-1)`` others,
    ``(sum(x) - x_y - x_pad)/(K-2)`` others_but_pad). The gradient with respect to the logits is
    ``g * (softmax(x) - q)``, formed chunk by chunk in the backward pass and contracted at once
    with ``weight`` (for ``hidden``) and ``hidden`` (for ``weight`` and ``bias``).

    Reproduces ``lsjax.smoothed_cross_entropy(hidden @ weight.T + bias, labels, ...)`` (and so
    ``torch.nn.functional.cross_entropy(F.linear(hidden, weight, bias), labels,
    label_smoothing=eps)`` for the uniform convention), loss and gradients for ``hidden``,
    ``weight`` and ``bias``, up to float rounding.

    Memory: besides the inputs, the compiled forward + backward keeps O(rows) statistics and a
    few ``rows x chunk_size`` chunk buffers (float32): at rows=8192, D=512, V=131072 and the
    default chunk size that is under 5% of the dense logits' bytes (``tests/test_fused.py``).

    Args:
      hidden: float array ``(..., D)``: the features that feed the output layer.
      weight: ``(V, D)``, the layout of ``torch.nn.Linear(D, V).weight`` and of a tied embedding
        table: one row per class.
      labels: int array with the hidden's shape without its last axis; any integer dtype, as in
        :func:`lsjax.smoothed_cross_entropy`.
      bias: optional ``(V,)``.
      smoothing: ``eps`` in [0, 1] (may be traced); differentiable: ``d loss_row / d eps =
        x_y - mean_{c in S} x_c`` (one O(rows) statistic kept for the backward pass).
      convention: ``"uniform"`` | ``"others"`` | ``"others_but_pad"`` (needs ``pad_index``).
      ignore_index: rows whose label equals it count for nothing (left out of 'mean').
      pad_index: the pad column of ``"others_but_pad"``; rows labelled with it count for nothing.
      reduction: ``"none"`` | ``"sum"`` | ``"mean"`` (over counted rows; 0 when none counts).
      chunk_size: classes per chunk. Temporaries grow as ``rows x chunk_size``; larger chunks
        mean fewer, larger matrix products.
      check_labels: whether the host reads concrete labels (and a ``smoothing`` array) to check
        them, as in :func:`lsjax.smoothed_cross_entropy`: ``None``/``True``, concrete values;
        ``False``, never (a label out of range gives a NaN row, as under ``jit``).
      _caller: internal, the public function or module that called this one for the user (its
        name is the one errors give).

    Returns:
      float32 for bf16/fp16/float32 inputs (accumulated in float32: every logit, lse and sum),
      float64 for float64; per row for ``"none"``, else a scalar. Gradients come back in the
      inputs' dtypes.
    """
    fn = lsspec.caller("fused_linear_smoothed_cross_entropy", _caller)
    options = lsspec.LabelOptions(smoothing, convention, ignore_index, pad_index, reduction)
    hidden, weight, bias, labels = _check_fused(
        fn, hidden, weight, bias, labels, options, check_labels
    )
    chunk_size = lsspec.check_chunk_size(fn, chunk_size)
    num_classes = weight.shape[0]
    counted = _common.counted_rows(labels, ignore_index, pad_index)
    _common.check_label_range(
        fn, labels, counted, num_classes, ignore_index, check_labels=check_labels
    )
    compute_dtype = _common.compute_dtype(hidden.dtype)
    eps = _common.smoothing_array(smoothing, compute_dtype)  # differentiated (_fused_rows_bwd)
    options = _FusedOptions(convention, pad_index, chunk_size, None)
    row_shape = labels.shape
    loss = _fused_rows_jit(
        options,
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        labels.reshape(-1),
        counted.reshape(-1),
        eps,
    ).reshape(row_shape)
    return _common.reduce(loss, counted.astype(compute_dtype), reduction)


def _check_fused(fn, hidden, weight, bias, labels, options: lsspec.LabelOptions, check_labels=None):
    """The fused losses' checks: the arrays (returned, bias zeros when None) and the options."""
    (hidden,) = _common.floating(fn, hidden=hidden)
    weight = jnp.asarray(weight)
    labels = _common.integer_labels(fn, labels)  # widened before any comparison
    lsspec.check_linear_shapes(
        fn, hidden.shape, weight.shape, None if bias is None else jnp.shape(bias), labels.shape
    )
    if weight.dtype != hidden.dtype:
        raise lsspec.dtype_mismatch_error(fn, "weight", weight.dtype, hidden.dtype)
    if bias is None:
        bias = jnp.zeros((weight.shape[0],), hidden.dtype)
    else:
        bias = jnp.asarray(bias)
        if bias.dtype != hidden.dtype:
            raise lsspec.dtype_mismatch_error(fn, "bias", bias.dtype, hidden.dtype)
    _common.check_label_options(fn, weight.shape[0], options, check_labels)
    return hidden, weight, bias, labels


# --------------------------------------------------------------------------------------------
# The core: rows (N, D), weight (V_local, D), bias (V_local,); with options.axis_name the
# vocabulary is split over that mesh axis (each device holds V_local consecutive classes).


def _vocab_layout(options, local_classes):
    """(first global class held here, global number of classes K)."""
    if options.axis_name is None:
        return 0, local_classes
    shards = jax.lax.axis_size(options.axis_name)
    return jax.lax.axis_index(options.axis_name) * local_classes, local_classes * shards


def _chunking(num_classes, chunk_size):
    """(chunk width, number of chunks): ceil(V / chunk) chunks of one static width.

    Chunk ``i`` starts at ``min(i * chunk, V - chunk)``: the last one is shifted back to end at
    ``V`` and its columns that the previous chunk already covered are masked (``_fresh``). One
    width keeps the loop a single compiled body and avoids a ragged tail, whose concatenation
    with the other chunks' weight gradients would cost a V x D temporary.
    """
    chunk = min(chunk_size, num_classes)
    return chunk, -(-num_classes // chunk)


def _chunk_offset(index, chunk, num_classes):
    return jnp.minimum(index * chunk, num_classes - chunk)


def _fresh(index, offset, chunk):
    """(1, chunk) mask of the columns no earlier chunk covered."""
    return offset + jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1) >= index * chunk


def _slice_upcast(array, start, size, compute_dtype):
    """``array[start:start + size]`` in ``compute_dtype``.

    Known limit: for bf16 on XLA:CPU the compiler still hoists a float32 copy of the whole weight
    out of the loops (about 256 MiB at V=131072, D=512); float32 has no such copy.
    """
    return jax.lax.dynamic_slice_in_dim(array, start, size, 0).astype(compute_dtype)


def _chunk_logits(hidden, weight, bias, start, size, compute_dtype):
    """Logits of classes [start, start + size) in ``compute_dtype``: (N, size)."""
    weight_chunk = _slice_upcast(weight, start, size, compute_dtype)
    bias_chunk = _slice_upcast(bias, start, size, compute_dtype)
    return jnp.dot(hidden, weight_chunk.T, precision=_HIGHEST) + bias_chunk


def _varying_axes(value) -> set:
    """The manual mesh axes ``value`` varies over inside ``shard_map`` (empty outside)."""
    manual = getattr(jax.typeof(value), "manual_axis_type", None)
    return set(getattr(manual, "varying", ()) or ())


def _varying(value, *references):
    """``value`` marked as varying over every mesh axis the references vary over.

    Inside ``shard_map`` a loop's carry must keep one type; a fresh constant is invariant while
    the loop's updates vary over the batch and vocabulary axes. Outside it, a no-op.
    """
    axes = set()
    for reference in references:
        axes |= _varying_axes(reference)
    missing = tuple(sorted(axes - _varying_axes(value)))
    return jax.lax.pcast(value, missing, to="varying") if missing else value


def _sum_to_type(cotangent, primal):
    """psum ``cotangent`` over the mesh axes it varies over and ``primal`` does not."""
    axes = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
    return jax.lax.psum(cotangent, axes) if axes else cotangent


def _psum(value, options):
    return value if options.axis_name is None else jax.lax.psum(value, options.axis_name)


def _local_lse(options, hidden, weight, bias, compute_dtype):
    """logsumexp over the classes held here, one chunk at a time (each chunk fused: max + sum)."""
    num_classes = weight.shape[0]
    chunk, count = _chunking(num_classes, options.chunk_size)

    def step(lse, index):
        offset = _chunk_offset(index, chunk, num_classes)
        logits = _chunk_logits(hidden, weight, bias, offset, chunk, compute_dtype)
        logits = jnp.where(_fresh(index, offset, chunk), logits, -jnp.inf)
        return jnp.logaddexp(lse, jax.nn.logsumexp(logits, axis=-1)), None

    lse = _varying(jnp.full(hidden.shape[:1], -jnp.inf, compute_dtype), hidden, weight, bias)
    lse, _ = jax.lax.scan(step, lse, jnp.arange(count))
    if options.axis_name is not None:  # global lse: all-reduce of the max and of the sum-exp
        peak = jax.lax.pmax(lse, options.axis_name)
        peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
        lse = jnp.log(jax.lax.psum(jnp.exp(lse - peak), options.axis_name)) + peak
    return lse


def _column(options, hidden, weight, bias, classes, start):
    """``x[i, classes[i]]`` for global class indices (0 where another shard holds the class)."""
    local_classes = weight.shape[0]
    local = classes - start
    here = (local >= 0) & (local < local_classes)
    safe = jnp.where(here, local, 0)
    value = jnp.sum(hidden * weight[safe].astype(hidden.dtype), axis=-1)
    value = value + bias[safe].astype(hidden.dtype)
    return _psum(jnp.where(here, value, 0.0), options)


def _counted_rows_only(hidden, counted):
    """``hidden`` with the rows that do not count replaced by zeros (a select, not a product).

    Their loss and ``coeff`` rows are 0 anyway, but ``d weight = coeff.T @ hidden`` would still
    multiply those zeros by the row's features: ``0 * inf`` and ``0 * NaN`` are NaN.
    """
    return jnp.where(counted[:, None], hidden, 0.0)


def _fused_terms(options, hidden, weight, bias, labels, counted, eps):
    """``(loss, lse, eps_slope)`` per row: the closed form (``lsjax._closed_form``) of statistics
    relative to 0 (``peak = 0``, ``log_sum = lse``), each O(rows)."""
    compute_dtype = eps.dtype
    start, num_classes = _vocab_layout(options, weight.shape[0])
    hidden = _counted_rows_only(hidden.astype(compute_dtype), counted)
    lse = _local_lse(options, hidden, weight, bias, compute_dtype)
    safe_labels, bad = _closed_form.label_rows(labels, counted, eps, num_classes)
    x_y = _column(options, hidden, weight, bias, safe_labels, start)
    # sum_c x_c = hidden . (sum_c weight_c) + sum_c bias_c: rank 1, no pass over the logits.
    # Unlike the dense core (relative to the row max), this needs |logits| < float max / K.
    column_sum = jnp.sum(weight, axis=0, dtype=compute_dtype)
    total = jnp.dot(hidden, column_sum, precision=_HIGHEST) + jnp.sum(bias, dtype=compute_dtype)
    support_sum = _psum(total, options)
    if options.convention != "uniform":
        support_sum = support_sum - x_y
    if options.convention == "others_but_pad":
        pad = jnp.full(labels.shape, options.pad_index)
        support_sum = support_sum - _column(options, hidden, weight, bias, pad, start)
    size = _closed_form.support_size(options.convention, num_classes)
    terms = _closed_form.RowTerms(
        lse=lse,
        peak=0.0,
        log_sum=lse,
        x_y=x_y,
        w_y=1.0,
        support_sum=support_sum,
        support_weight=size,
        safe_labels=safe_labels,
        bad=bad,
        size=size,
        sum_scale=1.0,
    )
    loss = _closed_form.row_loss(terms, counted, eps, convention=options.convention)
    # d loss_row / d eps (O(rows), kept for the backward pass).
    slope = _closed_form.smoothing_slope(terms, eps, convention=options.convention)
    return loss, lse, _closed_form.counted_only(counted, bad, slope)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_rows(options, hidden, weight, bias, labels, counted, eps):
    """Per-row loss of ``hidden @ weight.T + bias`` (0 on rows that do not count)."""
    return _fused_terms(options, hidden, weight, bias, labels, counted, eps)[0]


class _Residuals(NamedTuple):
    """What the backward pass reads: the inputs and the O(rows) statistics of the forward."""

    hidden: Array
    weight: Array
    bias: Array
    labels: Array
    counted: Array
    eps: Array
    lse: Array
    eps_slope: Array


def _fused_rows_fwd(options, hidden, weight, bias, labels, counted, eps):
    loss, lse, eps_slope = _fused_terms(options, hidden, weight, bias, labels, counted, eps)
    return loss, _Residuals(hidden, weight, bias, labels, counted, eps, lse, eps_slope)


def _fused_rows_bwd(options, residuals: _Residuals, grad_rows):
    """Chunk by chunk: ``coeff = g * (softmax(x) - q)`` on a ``rows x chunk`` block, then
    ``d hidden += coeff @ W_chunk``, ``d W_chunk = coeff.T @ hidden``, ``d b_chunk = sum coeff``.

    ``q_c = (1 - eps) [c = y] + eps / |S| [c in S]`` is built from an iota compare inside the
    chunk (the uniform part is a constant subtracted elementwise), so nothing outside a chunk is
    rows x V. With a vocabulary axis, ``d hidden`` is the all-reduce of every shard's part.
    """
    hidden, weight, bias = residuals.hidden, residuals.weight, residuals.bias
    labels, counted, eps = residuals.labels, residuals.counted, residuals.eps
    lse, eps_slope = residuals.lse, residuals.eps_slope
    compute_dtype = eps.dtype
    start, num_classes = _vocab_layout(options, weight.shape[0])
    size = _closed_form.support_size(options.convention, num_classes)
    safe_labels, bad = _closed_form.label_rows(labels, counted, eps, num_classes)
    scale = jnp.where(bad, jnp.nan, grad_rows.astype(compute_dtype))
    scale = jnp.where(counted, scale, 0.0)[:, None]
    safe_lse = jnp.where(counted, lse, 0.0)[:, None]
    on_true = 1.0 - eps
    per_class = eps / size
    hidden_c = _counted_rows_only(hidden.astype(compute_dtype), counted)
    local_classes = weight.shape[0]
    chunk, count = _chunking(local_classes, options.chunk_size)

    def step(index, carry):
        d_hidden, d_weight, d_bias = carry
        offset = _chunk_offset(index, chunk, local_classes)
        logits = _chunk_logits(hidden_c, weight, bias, offset, chunk, compute_dtype)
        classes = start + offset + jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        is_target = classes == safe_labels[:, None]
        in_support = jnp.ones(is_target.shape, bool)
        if options.convention != "uniform":
            in_support = ~is_target
        if options.convention == "others_but_pad":
            in_support = in_support & (classes != options.pad_index)
        target = jnp.where(is_target, on_true, 0.0) + jnp.where(in_support, per_class, 0.0)
        coeff = scale * (jnp.exp(logits - safe_lse) - target)
        # Select, do not multiply: 0 * NaN would leak a non-counted row's NaN features.
        coeff = jnp.where(counted[:, None], coeff, 0.0)
        weight_chunk = _slice_upcast(weight, offset, chunk, compute_dtype)
        # Columns an earlier chunk covered (the shifted last chunk) must not count twice in
        # d hidden; their d weight / d bias rows are simply written again with the same values.
        # (Masking the chunk x D weight rows costs less than a second rows x chunk buffer.)
        fresh = _fresh(index, offset, chunk).reshape(chunk, 1)
        fresh_weight = jnp.where(fresh, weight_chunk, 0.0)
        d_hidden = d_hidden + jnp.dot(coeff, fresh_weight, precision=_HIGHEST)
        update = jnp.dot(coeff.T, hidden_c, precision=_HIGHEST).astype(weight.dtype)
        d_weight = jax.lax.dynamic_update_slice_in_dim(d_weight, update, offset, 0)
        update = jnp.sum(coeff, axis=0).astype(bias.dtype)
        d_bias = jax.lax.dynamic_update_slice_in_dim(d_bias, update, offset, 0)
        return d_hidden, d_weight, d_bias

    everything = (hidden, weight, bias, grad_rows)
    carry = (
        _varying(jnp.zeros(hidden.shape, compute_dtype), *everything),
        _varying(jnp.zeros(weight.shape, weight.dtype), *everything),
        _varying(jnp.zeros(bias.shape, bias.dtype), *everything),
    )
    d_hidden, d_weight, d_bias = jax.lax.fori_loop(0, count, step, carry)
    # Inside shard_map: d hidden sums every vocabulary shard's part, d weight / d bias every
    # batch shard's rows (a psum over the axes the cotangent varies over and the input does not).
    d_hidden = _sum_to_type(d_hidden.astype(hidden.dtype), hidden)
    # d eps = sum_rows g * slope (a select: 0 * NaN would leak a non-counted row's NaN upstream);
    # with a batch axis, every batch shard's rows (the slope is already global over the vocab).
    d_eps = jnp.sum(jnp.where(counted, grad_rows.astype(compute_dtype) * eps_slope, 0.0))
    d_eps = _sum_to_type(d_eps.astype(eps.dtype).reshape(eps.shape), eps)
    return (
        d_hidden,
        _sum_to_type(d_weight, weight),
        _sum_to_type(d_bias, bias),
        None,
        None,
        d_eps,
    )


_fused_rows.defvjp(_fused_rows_fwd, _fused_rows_bwd)

# One compiled program per (options, shapes) for eager calls; inlined inside a user's jit.
_fused_rows_jit = jax.jit(_fused_rows, static_argnums=(0,))
