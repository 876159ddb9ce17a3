"""Fused linear + label-smoothed cross-entropy in JAX: the rows x V logits are never built.

For a language-model head ``logits = hidden @ weight.T + bias`` with a large vocabulary ``V``,
the dense route materialises ``rows x V`` logits (and as much again for their gradient). Here
the closed form of :func:`lsjax.smoothed_cross_entropy` (SEMANTICS.md §1) is evaluated from three
per-row statistics that need no ``rows x V`` array:

* ``lse``: logsumexp over the classes, accumulated chunk by chunk over the vocabulary
  (``chunk_size`` classes at a time, each chunk's logits recomputed from ``hidden`` and
  ``weight``) as a running max and the sum of exponentials relative to it (kept apart, as the
  dense core keeps them: the softmax of a confident prediction stays exact);
* ``x_y = hidden . weight[y] + bias[y]``: one gathered row of the weight per row;
* ``sum_c x_c = hidden . (sum_c weight[c]) + sum_c bias[c]``: the smoothing term is a rank-1
  product with the column sums of the weight, no pass over the logits at all.

The backward pass (a ``jax.custom_vjp``) keeps only those O(rows) statistics besides the inputs,
and recomputes each chunk's logits to form ``g * (softmax - q)`` one chunk at a time:
``d hidden += coeff @ weight_chunk``, ``d weight_chunk = coeff.T @ hidden``,
``d bias_chunk = sum_rows coeff``.
Its PyTorch twin is ``lstorch.fused_linear_smoothed_cross_entropy``.

Reverse mode: ``jax.grad``/``jax.vjp`` (under ``jit`` and ``vmap`` too), and second order
through it (``jax.hessian``, which is ``jacfwd`` of ``jacrev``; Hessian-vector products;
gradient penalties): the backward is made of differentiable ops. Forward mode of the loss
itself (``jax.jvp``, ``jax.jacfwd``) raises JAX's "can't apply forward-mode autodiff (jvp) to a
custom_vjp function"; for it use the dense route,
``lsjax.smoothed_cross_entropy(hidden @ weight.T + bias, labels, ...)`` (its logits built).
The PyTorch twin, built on ``torch.autograd.Function``, has forward mode and double backward.
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
    kl: bool = False
    with_z: bool = False  # the core returns (loss, z_part)
    transform: lsspec.LogitTransform = lsspec.LogitTransform()  # softcap(logit_scale * x)
    with_stats: bool = False  # the core also returns (lse, entropy, correct) per row


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
    class_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    normalizer: float | Array | None = None,
    kl: bool = False,
    class_mask: ArrayLike | None = None,
    z_loss: float | Array = 0.0,
    return_z_loss: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_labels: bool | None = None,
    _caller: lsspec.Caller | None = None,
) -> Array | tuple:
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

    Every option of :func:`lsjax.smoothed_cross_entropy` that applies to logits is taken, with
    the same meaning and errors: the class weights (named ``class_weight``, ``weight`` being the
    head's), ``where``, ``normalizer``, ``kl``, ``class_mask``, ``z_loss`` and
    ``return_z_loss``. Weights and mask enter the rank-1 support sum as ``hidden . sum_c w_c m_c
    W_c``, a masked class's logit is left out of each chunk's logsumexp, and the logits'
    gradient is ``g ((A + 2 z lse) softmax(x) - t) + g_z 2 z lse softmax(x)`` (``t`` the
    weighted smoothed target, ``A = sum_c t_c``, ``g_z`` the z-part's cotangent), still one
    ``rows x chunk_size`` block at a time.

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
        tanh(logit_scale * x / cap)``, as in :func:`lsjax.smoothed_cross_entropy`. Applied to
        each chunk's logits where the chunk loop reads them (the smoothing's sum over the
        classes then is one more sum in the forward loop instead of the rank-1 product); the
        gradient is the chain rule, ``dt/dx`` times the gradient for ``t``, in the backward
        loop. The z-loss and the statistics are those of ``t``. A Python number, compiled in.
      logit_scale: a finite number ``> 0`` (default 1.0) the logits are multiplied by first.
      return_stats: also return ``lsjax.RowStats(lse, entropy, correct)`` per row (the labels'
        shape), taken in the forward chunk loop (an online entropy sum and an online argmax
        with ``torch.argmax``'s first-max rule, on the logits before the transform):
        ``(loss, stats)`` or ``(loss, z_part, stats)``, as the dense loss returns them.
      chunk_size: classes per chunk. Temporaries grow as ``rows x chunk_size``; larger chunks
        mean fewer, larger matrix products.
      check_labels: whether the host reads concrete labels (and a ``smoothing`` array) to check
        them, as in :func:`lsjax.smoothed_cross_entropy`: ``None``/``True``, concrete values;
        ``False``, never (a label out of range gives a NaN row, as under ``jit``).
      _caller: internal, the public function or module that called this one for the user (its
        name is the one errors give).

    Returns:
      float32 for bf16/fp16/float32 inputs (accumulated in float32: every logit, lse and sum),
      float64 for float64; per row for ``"none"``, else a scalar; ``(loss, z_part)`` with
      ``return_z_loss=True``. Gradients come back in the inputs' dtypes: ``d hidden`` is
      accumulated over every chunk, and each class's ``d weight`` row over every row, in float32
      (float64 for float64 inputs), and rounded to the inputs' dtype once.

    Sharded inputs: under ``jit``, ``hidden`` and ``weight`` in any layout (for a vocabulary
    split with collectives over the shards, :mod:`lsjax.sharded`). On a mesh with ``Explicit``
    axes (``jax.make_mesh``'s default) the loss computes under ``jax.sharding.auto_axes``, as
    :func:`lsjax.smoothed_cross_entropy` does: each gradient comes back laid out as its input.
    """
    fn = lsspec.caller("fused_linear_smoothed_cross_entropy", _caller)
    options = lsspec.LabelOptions(smoothing, convention, ignore_index, pad_index, reduction)
    hidden, weight, bias, labels = _check_fused(fn, hidden, weight, bias, labels)
    num_classes = weight.shape[0]
    extra = _check_extra_options(
        fn, options, num_classes, labels.shape, class_weight, where, normalizer, kl, class_mask,
        z_loss, return_z_loss, check_labels, softcap, logit_scale, return_stats,
    )  # fmt: skip
    transform = extra.transform
    chunk_size = lsspec.check_chunk_size(fn, chunk_size)
    _common.check_label_range(
        fn, labels, num_classes, ignore_index, pad_index, extra.where, extra.class_mask,
        check_labels,
    )  # fmt: skip
    core_options = _FusedOptions(
        convention, pad_index, chunk_size, None, kl, extra.with_z, transform, return_stats
    )
    layout = _Layout(reduction, return_z_loss, ignore_index, _common.ulp_of_one(smoothing))
    run = _common.with_auto_axes(_after_checks_jit, hidden, -1, weight, bias, labels)
    return run(
        core_options, layout, hidden, weight, bias, labels, extra.where, smoothing,
        extra.class_weight, extra.class_mask, extra.z_loss if extra.with_z else None, normalizer,
    )  # fmt: skip


class _Layout(NamedTuple):
    """The static options of what runs around the core: the reduction, whether the z-part is
    returned, the ignored label and the rounding slack of the smoothing's own dtype."""

    reduction: str
    return_z_loss: bool
    ignore_index: int | None
    smoothing_ulp: float  # _common.ulp_of_one of the smoothing as given


def _after_checks(options, layout, hidden, weight, bias, labels, where, smoothing, class_weight,
                  class_mask, z_loss, normalizer):  # fmt: skip
    """Everything after the checks (:data:`_after_checks_jit`): the counted rows, the options
    as arrays of the compute dtype, the core on the flattened rows, the per-row weights, the
    statistics and the reduction. ``z_loss`` is None without a z-part."""
    num_classes = weight.shape[0]
    compute_dtype = _common.compute_dtype(hidden.dtype)
    bias = _zero_bias(weight, bias)
    counted = _common.counted_rows(labels, layout.ignore_index, options.pad_index, where)
    # differentiated (_fused_rows_bwd)
    eps = _common.smoothing_array(smoothing, compute_dtype, layout.smoothing_ulp)
    class_weight, class_mask, z = _class_arrays(class_weight, class_mask, z_loss, compute_dtype)
    rows = _fused_rows(
        options,
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        labels.reshape(-1),
        counted.reshape(-1),
        eps,
        class_weight,
        class_mask,
        z,
    )
    w_y = 1.0 if class_weight is None else class_weight[_safe_classes(labels, counted, num_classes)]
    row_weight = jnp.where(counted, w_y, 0.0).astype(compute_dtype)
    stats = None
    if options.with_stats:
        *rows, stats = rows
        rows = tuple(rows) if z is not None else rows[0]
        stats = _public_stats(stats, labels.shape)
    loss = _reduced(
        rows, labels.shape, row_weight, layout.reduction, normalizer, layout.return_z_loss
    )
    if stats is None:
        return loss
    return (*loss, stats) if layout.return_z_loss else (loss, stats)


def _public_stats(stats, row_shape):
    """The core's per-row ``(lse, entropy, correct)`` as a :class:`lsjax.RowStats` of the
    labels' shape (constants to autodiff)."""
    lse, entropy, correct = (jax.lax.stop_gradient(v).reshape(row_shape) for v in stats)
    return _closed_form.RowStats(lse, entropy, correct > 0)


def _safe_classes(labels, counted, num_classes):
    """The labels as indices safe to gather with (0 where the row does not count)."""
    return jnp.where(counted, labels, 0).clip(0, num_classes - 1)


def _reduced(rows, row_shape, row_weight, reduction, normalizer, return_z_loss):
    """The core's per-row output (the loss, or ``(loss, z_part)``) reduced as the dense loss
    reduces it; ``(loss, z_part)`` only with ``return_z_loss``."""
    parts = rows if isinstance(rows, tuple) else (rows,)
    parts = [
        _common.reduce(part.reshape(row_shape), row_weight, reduction, normalizer) for part in parts
    ]
    return tuple(parts) if return_z_loss else parts[0]


class _Extra(NamedTuple):
    """The options the fused losses share with the dense one, checked (arrays or None)."""

    class_weight: Any
    where: Any
    class_mask: Any
    z_loss: Any
    with_z: bool
    transform: lsspec.LogitTransform

    def arrays(self, compute_dtype):
        """:func:`_class_arrays` of these options."""
        z_loss = self.z_loss if self.with_z else None
        return _class_arrays(self.class_weight, self.class_mask, z_loss, compute_dtype)


def _class_arrays(class_weight, class_mask, z_loss, compute_dtype):
    """(class weight in ``compute_dtype``, class mask, z-loss weight as an array; each None
    where given None), the first two constants (not differentiated, as in the dense loss)."""
    if class_weight is not None:
        class_weight = jax.lax.stop_gradient(class_weight.astype(compute_dtype))
    class_mask = None if class_mask is None else jax.lax.stop_gradient(class_mask)
    z = None if z_loss is None else _common.z_loss_array(z_loss, compute_dtype)
    return class_weight, class_mask, z


def _check_extra_options(
    fn, options, num_classes, rows, class_weight, where, normalizer, kl, class_mask, z_loss,
    return_z_loss, check_labels=None, softcap=None, logit_scale=1.0, return_stats=False,
) -> _Extra:  # fmt: skip
    """The checks the fused losses share with :func:`lsjax.smoothed_cross_entropy` (the same
    messages; the class weights are called ``class_weight`` here, ``weight`` being the head's).
    ``rows``: the labels' shape (global, for the sharded loss); ``check_labels`` as
    :func:`lsjax._common.reads_values` decides which array values are read."""
    class_weight = _common.array_or_none(fn, "class_weight", class_weight)
    where = _common.array_or_none(fn, "where", where)
    class_mask = _common.array_or_none(fn, "class_mask", class_mask)
    if class_weight is not None and tuple(class_weight.shape) != (num_classes,):
        raise lsspec.shape_error(fn, "class_weight", class_weight.shape, f"shape ({num_classes},)")
    lsspec.check_row_options_shapes(fn, num_classes, rows, where=where, class_mask=class_mask)
    _common.check_bool(fn, "where", where)
    _common.check_bool(fn, "class_mask", class_mask)
    z_value, transform = _common.check_loss_options(
        _class_weight_caller(fn), num_classes, options, check_labels, normalizer=normalizer,
        kl=kl, has_weight=class_weight is not None, z_loss=z_loss, return_z_loss=return_z_loss,
        softcap=softcap, logit_scale=logit_scale, return_stats=return_stats,
    )  # fmt: skip
    _common.check_class_mask_support(
        fn, class_mask, options.convention, options.pad_index, check_labels
    )
    # z-loss is compiled in only when it can matter: a concrete 0 leaves the program unchanged.
    with_z = return_z_loss or not (lsspec.is_number(z_value) and z_value == 0)
    class_weight = _common.constant(fn, "class_weight", class_weight)
    return _Extra(class_weight, where, class_mask, z_loss, with_z, transform)


def _class_weight_caller(fn: lsspec.Caller) -> lsspec.Caller:
    """``fn`` naming the dense loss's ``weight`` (class weights) ``class_weight``."""
    return lsspec.Caller(fn.fn, (*fn.renamed, ("weight", fn.arg("class_weight"))))


def _check_fused(fn, hidden, weight, bias, labels):
    """The fused losses' checks of the arrays (returned; ``bias`` None when not given)."""
    (hidden,) = _common.floating(fn, hidden=hidden)
    weight = _common.as_array(fn, "weight", weight)
    labels = _common.integer_labels(fn, labels)  # widened before any comparison
    lsspec.check_linear_shapes(
        fn, hidden.shape, weight.shape, None if bias is None else jnp.shape(bias), labels.shape
    )
    if weight.dtype != hidden.dtype:
        raise lsspec.dtype_mismatch_error(fn, "weight", weight.dtype, hidden.dtype)
    if bias is not None:
        bias = _common.as_array(fn, "bias", bias)
        if bias.dtype != hidden.dtype:
            raise lsspec.dtype_mismatch_error(fn, "bias", bias.dtype, hidden.dtype)
    return hidden, weight, bias, labels


def _zero_bias(weight, bias):
    """``bias``, or zeros of the head's ``(V,)`` and dtype when it is None."""
    return jnp.zeros(weight.shape[:1], weight.dtype) if bias is None else bias


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


class _Pass(NamedTuple):
    """What the forward chunk loop gathers per row (None where not asked for)."""

    peak: Array  # the running max of the (transformed) allowed logits, 0 where not finite
    log_sum: Array  # log sum_c exp(t_c - peak)
    support_sum: Any  # sum_c u_c t_c over every class (with a transform: t is not linear)
    entropy: Any  # -sum_c p_c log p_c (return_stats)
    argmax: Any  # the first maximal class of the untransformed allowed logits (return_stats)


def _lse_parts(options, hidden, weight, bias, classes, compute_dtype) -> _Pass:
    """``(peak, log_sum)`` with ``lse = peak + log_sum`` over the (allowed) classes: ``peak`` the
    row's max logit (0 where it is not finite), ``log_sum`` the log of ``sum_c exp(x_c -
    peak)``, accumulated one chunk at a time as an online softmax does (a running max and the
    sum relative to it). Kept apart, as the dense core keeps them: with confident predictions
    ``1 - softmax(x)_y`` is ``1 - exp((x_y - peak) - log_sum)``, exact to float32's resolution
    at 1, where ``exp(x_y - lse)`` would carry the rounding of ``lse`` (an ulp of ``|x|``: at
    logits ~20 that is 20x the gradient error of the dense float32 route). A masked class's
    logit is -inf. With a vocabulary axis, the max and the sum are all-reduced.

    The logits are the transformed ones, ``t = softcap(logit_scale * x)``, when
    ``options.transform`` is active; then the same loop also sums ``u_c t_c`` (the smoothing's
    support sum, no longer a rank-1 product). With ``options.with_stats`` it also keeps, online,
    ``sum_c exp(t_c - peak) (t_c - peak)`` (rescaled as the running max moves) for the entropy,
    and the running first argmax of the untransformed allowed logits (a later chunk replaces it
    only with a strictly larger max: ``torch.argmax``'s first-max rule)."""
    class_mask = classes.class_mask
    transform = options.transform
    num_classes = weight.shape[0]
    chunk, count = _chunking(num_classes, options.chunk_size)
    start_class, _ = _vocab_layout(options, num_classes)

    def finite(peak):
        return jnp.where(jnp.isfinite(peak), peak, 0.0)

    def step(carry, index):
        peak, total, support_sum, moment, best, best_index = carry
        offset = _chunk_offset(index, chunk, num_classes)
        raw = _chunk_logits(hidden, weight, bias, offset, chunk, compute_dtype)
        keep = _fresh(index, offset, chunk)
        if class_mask is not None:
            keep = keep & jax.lax.dynamic_slice_in_dim(class_mask, offset, chunk, 0)[None, :]
        transformed = _closed_form.transformed(raw, transform)
        if transform.active:
            fresh = _fresh(index, offset, chunk)
            if classes.support is None:
                term = jnp.where(fresh, transformed, 0.0)
            else:
                support = jax.lax.dynamic_slice_in_dim(classes.support, offset, chunk, 0)
                term = jnp.where(fresh & (support[None, :] != 0), transformed * support, 0.0)
            support_sum = support_sum + jnp.sum(term, axis=-1)
        logits = jnp.where(keep, transformed, -jnp.inf)
        new_peak = jnp.maximum(peak, jnp.max(logits, axis=-1))
        shift = finite(new_peak)
        rescale = jnp.exp(peak - shift)
        relative = logits - shift[:, None]
        exps = jnp.exp(relative)
        if options.with_stats:
            moved = jnp.where(jnp.isfinite(peak), peak - shift, 0.0)
            chunk_moment = jnp.sum(jnp.where(keep, exps * relative, 0.0), axis=-1)
            moment = rescale * (moment + moved * total) + chunk_moment
            values = jnp.where(keep, raw, -jnp.inf)
            chunk_best = jnp.max(values, axis=-1)
            first = jnp.argmax(values, axis=-1).astype(jnp.int32)  # (int64 under x64)
            chunk_index = (start_class + offset + first).astype(jnp.int32)
            take = chunk_best > best
            best = jnp.where(take, chunk_best, best)
            best_index = jnp.where(take, chunk_index, best_index)
        total = total * rescale + jnp.sum(exps, -1)
        return (new_peak, total, support_sum, moment, best, best_index), None

    rows = hidden.shape[:1]
    start = (
        jnp.full(rows, -jnp.inf, compute_dtype),
        jnp.zeros(rows, compute_dtype),
        jnp.zeros(rows, compute_dtype),
        jnp.zeros(rows, compute_dtype),
        jnp.full(rows, -jnp.inf, compute_dtype),
        jnp.zeros(rows, jnp.int32),
    )
    start = tuple(_varying(value, hidden, weight, bias) for value in start)
    carry, _ = jax.lax.scan(step, start, jnp.arange(count, dtype=jnp.int32))
    peak, total, support_sum, moment, best, best_index = carry
    if options.axis_name is not None:  # the global max, and the sum-exp relative to it
        axis = options.axis_name
        # The shift the sum-exp is taken relative to: the result does not depend on it, so it
        # is held constant for differentiation (JAX has no derivative of pmax, and a second
        # derivative differentiates this pass).
        global_peak = jax.lax.pmax(jax.lax.stop_gradient(peak), axis)
        factor = jnp.exp(peak - finite(global_peak))
        if options.with_stats:  # the entropy's sum moved to the global max; the first argmax
            moved = jnp.where(jnp.isfinite(peak), peak - finite(global_peak), 0.0)
            moment = jax.lax.psum(factor * (moment + moved * total), axis)
            global_best = jax.lax.pmax(jax.lax.stop_gradient(best), axis)  # only compared
            later = jnp.iinfo(jnp.int32).max  # a shard without the max offers no class
            best_index = jax.lax.pmin(jnp.where(best == global_best, best_index, later), axis)
        total = jax.lax.psum(total * factor, axis)
        peak = global_peak
    entropy = argmax = None
    if options.with_stats:  # H = log_sum - sum_c p_c (t_c - peak)
        entropy = jnp.log(total) - moment / total
        argmax = best_index
    return _Pass(
        finite(peak),
        jnp.log(total),
        support_sum if transform.active else None,
        entropy,
        argmax,
    )


def _gather(options, values, classes, start):
    """``values[classes]`` of a per-class array (``(V_local,)`` held here) at global class
    indices: the shard holding each class gives it, the others 0, summed over the vocabulary
    axis."""
    local = classes - start
    here = (local >= 0) & (local < values.shape[0])
    value = jnp.where(here, values[jnp.where(here, local, 0)], 0)
    return _psum(value, options)


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


class _Classes(NamedTuple):
    """The per-class factors of the closed form, held here (``(V_local,)`` each, or None)."""

    support: Any  # u_c = w_c m_c, the class weight times the class mask (None: all 1)
    class_weight: Any  # w_c (None: all 1)
    class_mask: Any  # m_c (None: every class allowed)


def _classes(class_weight, class_mask, compute_dtype) -> _Classes:
    support = class_weight
    if class_mask is not None:
        mask = class_mask.astype(compute_dtype)
        support = mask if support is None else support * mask
    return _Classes(support, class_weight, class_mask)


class _RowStats(NamedTuple):
    """The O(rows) statistics the backward pass reads besides the inputs."""

    peak: Array  # lse = peak + log_sum (_lse_parts)
    log_sum: Array
    eps_slope: Array  # d loss_row / d eps, 0 where the row does not count
    w_y: Any  # the label's class weight
    support_weight: Any  # sum over S of u_c
    size: Any  # |S|
    bad: Array  # counted rows with an invalid label or smoothing: NaN


def _row_statistics(options, hidden, weight, bias, labels, counted, eps, classes: _Classes):
    """The closed form's :class:`lsjax._closed_form.RowTerms`, relative to each row's max logit
    (``peak``), each O(rows); ``hidden`` already has the rows that do not count zeroed."""
    compute_dtype = eps.dtype
    start, num_classes = _vocab_layout(options, weight.shape[0])
    forward = _lse_parts(options, hidden, weight, bias, classes, compute_dtype)
    peak, log_sum = forward.peak, forward.log_sum
    transform = options.transform

    def column(classes_at):  # the (transformed) logit of one class per row
        value = _column(options, hidden, weight, bias, classes_at, start)
        return _closed_form.transformed(value, transform)

    safe_labels, bad = _closed_form.label_rows(labels, counted, eps, num_classes)
    size = lsspec.support_size(options.convention, num_classes)
    pad = jnp.full(labels.shape, options.pad_index or 0)
    if classes.class_mask is not None:  # masked classes leave the softmax and the support
        label_allowed = _gather(options, classes.class_mask.astype(jnp.int32), safe_labels, start)
        bad = bad | (counted & (label_allowed == 0))
        size = size - _psum(jnp.sum(~classes.class_mask, dtype=jnp.int32), options)
        if options.convention == "others_but_pad":  # a masked pad is not excluded twice
            size = size + 1 - _gather(options, classes.class_mask.astype(jnp.int32), pad, start)
        size = size.astype(compute_dtype)  # (an integer count would meet float sums)
    x_y = column(safe_labels)
    w_y = 1.0
    if classes.class_weight is not None:
        w_y = _gather(options, classes.class_weight, safe_labels, start)
    # sum_{c in S} u_c x_c = hidden . (sum_c u_c weight_c) + sum_c u_c bias_c: rank 1, no pass
    # over the logits. Unlike the dense core (relative to the row max), this needs
    # |logits| < float max / K.
    if transform.active:  # the transformed logits' sum, from the forward loop
        support_sum = _psum(forward.support_sum, options)
        if classes.support is None:
            support_weight = _psum(jnp.asarray(weight.shape[0], compute_dtype), options)
        else:
            support_weight = _psum(jnp.sum(classes.support), options)
    elif classes.support is None:
        column_sum = jnp.sum(weight, axis=0, dtype=compute_dtype)
        bias_sum = jnp.sum(bias, dtype=compute_dtype)
        support_weight = _psum(jnp.asarray(weight.shape[0], compute_dtype), options)
    else:
        column_sum = jnp.dot(classes.support, weight.astype(compute_dtype), precision=_HIGHEST)
        bias_sum = jnp.dot(classes.support, bias.astype(compute_dtype), precision=_HIGHEST)
        support_weight = _psum(jnp.sum(classes.support), options)
    if not transform.active:
        total = jnp.dot(hidden, column_sum, precision=_HIGHEST) + bias_sum
        support_sum = _psum(total, options)
    if options.convention != "uniform":  # the label is allowed (else the row is bad): u_y = w_y
        support_sum = support_sum - w_y * x_y
        support_weight = support_weight - w_y
    if options.convention == "others_but_pad":
        u_pad = 1.0 if classes.support is None else _gather(options, classes.support, pad, start)
        support_sum = support_sum - u_pad * column(pad)
        support_weight = support_weight - u_pad
    # Relative to the peak, as the closed form takes it (the rank-1 sum is of unshifted logits).
    support_sum = support_sum - support_weight * peak
    terms = _closed_form.RowTerms(
        lse=peak + log_sum,
        peak=peak,
        log_sum=log_sum,
        x_y=x_y,
        w_y=w_y,
        support_sum=support_sum,
        support_weight=support_weight,
        safe_labels=safe_labels,
        bad=bad,
        size=size,
        sum_scale=1.0,
    )
    return terms, forward


def _fused_terms(options, hidden, weight, bias, labels, counted, eps, class_weight, class_mask, z):
    """``(output, stats)``: the per-row loss (``(loss, z_part)`` with ``options.with_z``) by the
    closed form (``lsjax._closed_form``), and the :class:`_RowStats` for the backward pass."""
    compute_dtype = eps.dtype
    classes = _classes(class_weight, class_mask, compute_dtype)
    hidden = _counted_rows_only(hidden.astype(compute_dtype), counted)
    terms, forward = _row_statistics(options, hidden, weight, bias, labels, counted, eps, classes)
    form = dict(convention=options.convention, kl=options.kl)
    output = _closed_form.row_loss(terms, counted, eps, z=z, **form)
    if options.with_stats:  # 0, 0 and False on rows that do not count (as the dense loss)
        on_label = forward.argmax == terms.safe_labels.astype(forward.argmax.dtype)
        correct = on_label & counted & ~terms.bad
        row_stats = (
            jnp.where(counted, terms.lse, 0.0),
            jnp.where(counted, forward.entropy, 0.0),
            correct.astype(compute_dtype),
        )
        output = (*output, row_stats) if options.with_z else (output, row_stats)
    # d loss_row / d eps (O(rows), kept for the backward pass).
    slope = _closed_form.smoothing_slope(terms, eps, **form)
    slope = _closed_form.counted_only(counted, terms.bad, slope)
    stats = _RowStats(
        terms.peak, terms.log_sum, slope, terms.w_y, terms.support_weight, terms.size, terms.bad
    )
    return output, stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_rows(options, hidden, weight, bias, labels, counted, eps, class_weight, class_mask, z):
    """Per-row loss of ``hidden @ weight.T + bias`` (0 on rows that do not count); with
    ``options.with_z``, ``(loss, z_part)``."""
    return _fused_terms(
        options, hidden, weight, bias, labels, counted, eps, class_weight, class_mask, z
    )[0]


class _Residuals(NamedTuple):
    """What the backward pass reads: the inputs and the O(rows) statistics of the forward."""

    hidden: Array
    weight: Array
    bias: Array
    labels: Array
    counted: Array
    eps: Array
    class_weight: Any
    class_mask: Any
    z: Any
    stats: _RowStats


def _fused_rows_fwd(
    options, hidden, weight, bias, labels, counted, eps, class_weight, class_mask, z
):
    inputs = (hidden, weight, bias, labels, counted, eps, class_weight, class_mask, z)
    output, stats = _fused_terms(options, *inputs)
    return output, _Residuals(*inputs, stats)


def _fused_rows_bwd(options, residuals: _Residuals, grads):
    """Chunk by chunk: ``coeff = g (A + 2 z lse) p - g t + g_z 2 z lse p`` on a ``rows x
    chunk`` block (``p`` the softmax over the allowed classes, ``t`` the weighted smoothed
    target, ``A = sum_c t_c``, ``g_z`` the z-part's cotangent), then ``d hidden += coeff @
    W_chunk``, ``d W_chunk = coeff.T @ hidden``, ``d b_chunk = sum coeff``.

    ``t_c = (1 - eps) w_y [c = y] + eps u_c / |S| [c in S]`` is built from an iota compare
    inside the chunk, so nothing outside a chunk is rows x V. With a vocabulary axis, ``d
    hidden`` is the all-reduce of every shard's part. ``d hidden`` and ``d weight`` accumulate
    in float32 (float64 for float64 inputs) over every chunk and row and are rounded to the
    inputs' dtype once.
    """
    hidden, weight, bias = residuals.hidden, residuals.weight, residuals.bias
    labels, counted, eps, z = residuals.labels, residuals.counted, residuals.eps, residuals.z
    stats = residuals.stats
    if options.with_stats:  # the statistics are constants: their cotangent is dropped
        grads = grads[:-1] if options.with_z else grads[0]
    grad_rows, grad_z = grads if options.with_z else (grads, None)
    compute_dtype = eps.dtype
    classes = _classes(residuals.class_weight, residuals.class_mask, compute_dtype)
    start, num_classes = _vocab_layout(options, weight.shape[0])
    safe_labels, _ = _closed_form.label_rows(labels, counted, eps, num_classes)
    bad = stats.bad
    g = grad_rows.astype(compute_dtype)
    safe_peak = jnp.where(counted, stats.peak, 0.0)
    safe_log_sum = jnp.where(counted, stats.log_sum, 0.0)
    safe_lse = safe_peak + safe_log_sum
    on_true = (1.0 - eps) * stats.w_y
    per_class = eps / stats.size
    # The softmax's factor per row: g (A + 2 z lse) (+ g_z 2 z lse for the z-part).
    softmax_scale = g * (on_true + per_class * stats.support_weight)
    if options.with_z:
        z_scale = 2.0 * z * safe_lse
        softmax_scale = softmax_scale + (g + grad_z.astype(compute_dtype)) * z_scale

    def row_factor(value):  # NaN on invalid rows, 0 on rows that do not count, (rows, 1)
        return jnp.where(counted, jnp.where(bad, jnp.nan, value), 0.0)[:, None]

    softmax_scale = row_factor(softmax_scale)
    target_true = row_factor(g * on_true)
    target_other = row_factor(g * per_class)
    hidden_c = _counted_rows_only(hidden.astype(compute_dtype), counted)
    local_classes = weight.shape[0]
    chunk, count = _chunking(local_classes, options.chunk_size)

    def step(index, carry):
        d_hidden, d_weight, d_bias = carry
        offset = _chunk_offset(index, chunk, local_classes)
        raw = _chunk_logits(hidden_c, weight, bias, offset, chunk, compute_dtype)
        logits = _closed_form.transformed(raw, options.transform)
        classes_here = start + offset + jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        is_target = classes_here == safe_labels[:, None].astype(jnp.int32)  # (int64 under x64)
        in_support = jnp.ones(is_target.shape, bool)
        if options.convention != "uniform":
            in_support = ~is_target
        if options.convention == "others_but_pad":
            in_support = in_support & (classes_here != options.pad_index)
        softmax = jnp.exp((logits - safe_peak[:, None]) - safe_log_sum[:, None])
        other = jnp.where(in_support, target_other, 0.0)
        if classes.support is not None:
            support = jax.lax.dynamic_slice_in_dim(classes.support, offset, chunk, 0)
            other = other * support[None, :]
        if classes.class_mask is not None:
            allowed = jax.lax.dynamic_slice_in_dim(classes.class_mask, offset, chunk, 0)
            softmax = jnp.where(allowed[None, :], softmax, 0.0)
        coeff = softmax_scale * softmax - jnp.where(is_target, target_true, 0.0) - other
        if options.transform.active:  # the chain rule through t = softcap(scale * x)
            coeff = coeff * _closed_form.transform_slope(raw, options.transform)
        # Select, do not multiply: 0 * NaN would leak a non-counted row's NaN features.
        coeff = jnp.where(counted[:, None], coeff, 0.0)
        weight_chunk = _slice_upcast(weight, offset, chunk, compute_dtype)
        # Columns an earlier chunk covered (the shifted last chunk) must not count twice in
        # d hidden; their d weight / d bias rows are simply written again with the same values.
        # (Masking the chunk x D weight rows costs less than a second rows x chunk buffer.)
        fresh = _fresh(index, offset, chunk).reshape(chunk, 1)
        fresh_weight = jnp.where(fresh, weight_chunk, 0.0)
        d_hidden = d_hidden + jnp.dot(coeff, fresh_weight, precision=_HIGHEST)
        # Each class's d weight row is one float32 sum over every row, rounded once here.
        update = jnp.dot(coeff.T, hidden_c, precision=_HIGHEST).astype(d_weight.dtype)
        d_weight = jax.lax.dynamic_update_slice_in_dim(d_weight, update, offset, 0)
        update = jnp.sum(coeff, axis=0).astype(d_bias.dtype)
        d_bias = jax.lax.dynamic_update_slice_in_dim(d_bias, update, offset, 0)
        return d_hidden, d_weight, d_bias

    everything = (hidden, weight, bias, grad_rows)
    # Rows split over a batch axis: d weight / d bias are summed over its shards below, in the
    # compute dtype (each shard's part rounded first would round the sum more than once).
    summed_over_rows = bool(_varying_axes(hidden) - _varying_axes(weight))
    weight_dtype = compute_dtype if summed_over_rows else weight.dtype
    bias_dtype = compute_dtype if summed_over_rows else bias.dtype
    carry = (
        _varying(jnp.zeros(hidden.shape, compute_dtype), *everything),
        _varying(jnp.zeros(weight.shape, weight_dtype), *everything),
        _varying(jnp.zeros(bias.shape, bias_dtype), *everything),
    )
    d_hidden, d_weight, d_bias = jax.lax.fori_loop(0, count, step, carry)
    # Inside shard_map: d hidden sums every vocabulary shard's part, d weight / d bias every
    # batch shard's rows (a psum over the axes the cotangent varies over and the input does not).
    # d hidden, a float32 sum over every chunk, is rounded to the hidden's dtype once, here.
    d_hidden = _sum_to_type(d_hidden, hidden).astype(hidden.dtype)
    d_weight = _sum_to_type(d_weight, weight).astype(weight.dtype)
    d_bias = _sum_to_type(d_bias, bias).astype(bias.dtype)
    # d eps = sum_rows g * slope (a select: 0 * NaN would leak a non-counted row's NaN upstream);
    # with a batch axis, every batch shard's rows (the slope is already global over the vocab).
    d_eps = jnp.sum(jnp.where(counted, g * stats.eps_slope, 0.0))
    d_eps = _sum_to_type(d_eps.astype(eps.dtype).reshape(eps.shape), eps)
    d_z = None
    if options.with_z:  # d z = sum_rows (g + g_z) lse**2
        square = jnp.where(bad, jnp.nan, jnp.square(safe_lse))
        d_z = jnp.sum(jnp.where(counted, (g + grad_z.astype(compute_dtype)) * square, 0.0))
        d_z = _sum_to_type(d_z.astype(z.dtype).reshape(z.shape), z)
    return (d_hidden, d_weight, d_bias, None, None, d_eps, None, None, d_z)


_fused_rows.defvjp(_fused_rows_fwd, _fused_rows_bwd)

# What runs after the checks, as one program per (options, shapes): an eager call (and eager grad
# or vmap) lowers and runs it once, instead of the core and each primitive around it on its
# own. Inside a user's jit it is inlined.
_after_checks_jit = jax.jit(_after_checks, static_argnums=(0, 1))
