"""The label-smoothed cross-entropy family in JAX: one closed-form core, no one-hot ever built.

Every loss of this package with integer targets reduces to :func:`smoothed_cross_entropy`; its
PyTorch twin is ``lstorch.smoothed_cross_entropy`` (same name, same keywords, same meaning,
but for ``implementation`` here, ``inplace_backward`` there and ``axis``'s default: see
``lsjax``'s docstring).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import lsspec
from lsjax import _closed_form, _common
from lsjax._common import Array, ArrayLike, is_zero


def _upcast_alone(x: Array, compute_dtype, companion: Array) -> Array:
    """``x.astype(compute_dtype)`` for ONE reduction to fuse into.

    When two reductions read the same upcast, XLA computes the upcast once and materialises it:
    a float32 copy of a bf16 ``x``. An optimisation barrier (an identity) over ``x`` and a
    per-reduction ``companion`` array keeps each upcast apart: barriers with different operands
    cannot be merged by common-subexpression elimination, so each upcast fuses into its own
    reduction. (A constant companion does not survive XLA's constant folding under x64.)
    """
    if x.dtype == compute_dtype:
        return x
    x, _ = jax.lax.optimization_barrier((x, companion))
    return x.astype(compute_dtype)


_IDENTITY = lsspec.LogitTransform()


def _transformed_alone(x: Array, compute_dtype, companion: Array, transform) -> Array:
    """``transform(x.astype(compute_dtype))`` for ONE reduction to fuse into: as
    :func:`_upcast_alone`, with a barrier even when no upcast is needed, since XLA would
    otherwise compute one ``tanh(x / cap)`` for every reduction that reads it and materialise
    it (a rows x K temporary)."""
    if not transform.active:
        return _upcast_alone(x, compute_dtype, companion)
    x, scale, cap = _apart(x, compute_dtype, companion, transform)
    return _closed_form.transformed(x.astype(compute_dtype), transform, scale, cap)


def _apart(x: Array, compute_dtype, companion: Array, transform):
    """``(x, scale, cap)`` through one barrier with ``companion``: the transform's values as 0-d
    arrays of this use only. As constants, XLA would share one rows x K broadcast of each
    between the reductions and materialise it."""
    values = (jnp.asarray(transform.scale, compute_dtype),
              jnp.asarray(transform.cap or 1.0, compute_dtype))  # fmt: skip
    x, scale, cap, _ = jax.lax.optimization_barrier((x, *values, companion))
    return x, scale, cap


def _logsumexp_parts(x: Array, compute_dtype, class_mask: Array | None = None, transform=_IDENTITY):
    """``(peak, log_sum)`` with ``logsumexp(x) = peak + log_sum`` over the last axis (over the
    allowed classes): ``peak`` the row's max (0 where it is not finite), ``log_sum`` the log of
    ``sum_c exp(x_c - peak)``, accumulated in ``compute_dtype``. Kept apart, as
    ``torch.log_softmax`` keeps them: ``x_c - peak - log_sum`` is exact where ``x_c - lse``
    would round ``lse`` first (at ``x ~ 3e38`` a float32 lse cannot hold ``log 2``).

    The max is taken in ``x``'s own dtype (exact), so the upcast feeds a single reduction and
    XLA fuses it there: a bf16 ``x`` never gets a float32 copy. A row of -inf gives
    ``log_sum = -inf``. With a ``class_mask``: :func:`_allowed_logsumexp`, one pass that never
    lets a masked logit in, whatever its value (-inf, or far above every allowed one).
    With a ``transform`` (increasing), the parts are those of the transformed logits: the peak
    is the transform of the max.
    """
    if class_mask is not None:
        return _allowed_logsumexp(x, class_mask, compute_dtype, transform)
    peak = _closed_form.transformed(jnp.max(x, axis=-1).astype(compute_dtype), transform)
    peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
    upcast = _transformed_alone(x, compute_dtype, peak, transform)
    terms = jnp.exp(upcast - peak[..., None])
    return peak, jnp.log(jnp.sum(terms, axis=-1))


def _allowed_logsumexp(x: Array, class_mask: Array, compute_dtype, transform):
    """``(peak, log_sum)`` over the last axis and the allowed classes, in ONE variadic reduction
    (:func:`_allowed_reduction`): a masked logit of any size (-inf, or far above every allowed
    one) never enters, so it neither overflows nor underflows the sum."""
    values = x.astype(compute_dtype)
    if transform.active:
        values = _transformed_alone(x, compute_dtype, class_mask, transform)
    peak, total = _allowed_reduction(values, class_mask)
    return jax.lax.stop_gradient(peak), jnp.log(total)


@jax.custom_jvp
def _allowed_reduction(values: Array, class_mask: Array) -> tuple[Array, Array]:
    """``(peak, total)``: the allowed entries' max (0 where it is not finite) and
    ``sum_c exp(values_c - peak)`` over them. The reduction's state is the running (max, sum of
    exp(x - max)) of the allowed entries seen, as an online softmax keeps it. The operands are
    ``values``, a broadcast 1 and the broadcast mask, which XLA fuses into the reduction: no
    rows x K temporary (an elementwise-masked ``x`` feeding a max or a sum is materialised by
    XLA:CPU).

    Its derivative is given (:func:`_allowed_reduction_jvp`): JAX cannot differentiate a
    variadic reduction with constant operands (the broadcast 1 and mask), and the core's own
    derivative rule is differentiated through this at second order (``jax.hessian``)."""
    ones = jnp.ones(values.shape, values.dtype)
    allowed = jnp.broadcast_to(class_mask, values.shape)

    def combine(left, right):
        (left_max, left_sum, left_any), (right_max, right_sum, right_any) = left, right
        left_max = jnp.where(left_any, left_max, -jnp.inf)
        right_max = jnp.where(right_any, right_max, -jnp.inf)
        peak = jnp.maximum(left_max, right_max)
        safe = jnp.where(jnp.isfinite(peak), peak, 0.0)
        total = jnp.where(left_any, left_sum * jnp.exp(left_max - safe), 0.0) + jnp.where(
            right_any, right_sum * jnp.exp(right_max - safe), 0.0
        )
        return peak, total, left_any | right_any

    dtype = values.dtype
    start = (np.array(-np.inf, dtype), np.array(0.0, dtype), np.array(False))
    peak, total, _ = jax.lax.reduce((values, ones, allowed), start, combine, (values.ndim - 1,))
    return jnp.where(jnp.isfinite(peak), peak, 0.0), total


@_allowed_reduction.defjvp
def _allowed_reduction_jvp(primals, tangents):
    """The peak is a shift the caller holds constant (its gradient stopped), so ``d peak = 0``
    and ``d total = sum_c exp(values_c - peak) d values_c`` over the allowed classes."""
    values, class_mask = primals
    peak, total = _allowed_reduction(values, class_mask)
    shifted = jnp.where(class_mask, values, -jnp.inf) - peak[..., None]
    d_total = jnp.sum(jnp.exp(shifted) * tangents[0], axis=-1)
    return (peak, total), (jnp.zeros_like(peak), d_total)


def _mask_for(class_mask: Array, dtype, companion: Array) -> Array:
    """The (K,) mask as 0/1 values, kept apart for ONE consumer.

    XLA shares identical broadcasts of the same (K,) constant between reductions and then
    materialises the shared rows x K broadcast; a barrier with a per-consumer ``companion``
    (as in :func:`_upcast_alone`) makes each use distinct, so each broadcast fuses.
    """
    mask, _ = jax.lax.optimization_barrier((class_mask.astype(dtype), companion))
    return mask


def _zero_masked(x: Array, class_mask: Array, companion: Array) -> Array:
    """``x`` with masked columns set to 0, by arithmetic XLA fuses into the reduction that reads
    it (a select would be materialised): masked values, -inf and +inf included, are clipped to
    the dtype's finite range and multiplied by 0; allowed columns are untouched."""
    finite = jnp.finfo(x.dtype)
    floor = jnp.where(class_mask, -jnp.inf, finite.min).astype(x.dtype)
    ceiling = jnp.where(class_mask, jnp.inf, finite.max).astype(x.dtype)
    floor, ceiling, mask, _ = jax.lax.optimization_barrier(
        (floor, ceiling, class_mask.astype(x.dtype), companion)
    )
    return jnp.minimum(jnp.maximum(x, floor), ceiling) * mask


def _support_sum(values: Array, in_support: Array | None) -> Array:
    """``sum_c values_c`` over the columns ``in_support`` (all of them when None)."""
    if in_support is None:
        return jnp.sum(values, axis=-1)
    return _selected_sum(values, in_support)


@jax.custom_jvp
def _selected_sum(values: Array, selected: Array) -> Array:
    """``sum_c values_c [selected_c]`` over the last axis, as ONE variadic reduction whose
    operands are ``values`` and ``selected``: XLA:CPU fuses the select into it (a select
    feeding a plain sum is materialised as rows x K). A value that is not selected never
    enters, whatever it is (-inf, NaN)."""

    def combine(left, right):
        (left_sum, left_kept), (right_sum, right_kept) = left, right
        total = jnp.where(left_kept, left_sum, 0.0) + jnp.where(right_kept, right_sum, 0.0)
        return total, jnp.ones_like(left_kept)

    start = (np.array(0.0, values.dtype), np.array(True))
    total, _ = jax.lax.reduce((values, selected), start, combine, (values.ndim - 1,))
    return total


@_selected_sum.defjvp
def _selected_sum_jvp(primals, tangents):
    """Linear in ``values``: ``d total = sum_c d values_c [selected_c]``."""
    values, selected = primals
    d_total = jnp.sum(jnp.where(selected, tangents[0], 0.0), axis=-1)
    return _selected_sum(values, selected), d_total


def _support_columns(options, shape, safe_labels) -> Array | None:
    """Whether each column of a ``shape`` array is in its row's support (before a class mask):
    all but the label (``"others"``), also not the pad (``"others_but_pad"``); None for
    ``"uniform"``, where every column is."""
    if options.convention == "uniform":
        return None
    classes = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    # An identity gather (the safe labels are in [0, K)): XLA computes it in a fusion of its
    # own, so the reduction reads int32 labels whatever the labels' dtype and is the same code.
    labels = jnp.arange(shape[-1], dtype=jnp.int32)[safe_labels]
    in_support = classes != labels[..., None]
    if options.convention == "others_but_pad":
        in_support = in_support & (classes != options.pad_index)
    return in_support


def _check_arrays(fn, logits, labels, axis, weight, where, class_mask=None):
    """Shared input checks; returns (logits, labels widened by ``_common.index_labels``, class
    axis as a non-negative int). ``weight``, ``where`` and ``class_mask`` may be any array-like
    (a Python list too)."""
    (logits,) = _common.floating(fn, logits=logits)
    labels = _common.integer_labels(fn, labels)
    lsspec.check_has_class_axis(fn, "logits", logits.shape)
    axis = lsspec.check_axis(fn, axis, logits.ndim)
    rows = lsspec.row_shape(logits.shape, axis)
    lsspec.check_labels_shape(fn, labels.shape, rows)
    lsspec.check_row_options_shapes(
        fn, logits.shape[axis], rows, weight=weight, where=where, class_mask=class_mask
    )
    _common.check_bool(fn, "where", where)
    _common.check_bool(fn, "class_mask", class_mask)
    return logits, labels, axis


def smoothed_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    smoothing: float | Array = 0.0,
    convention: str = "uniform",
    ignore_index: int | None = None,
    pad_index: int | None = None,
    weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    axis: int = -1,
    reduction: str = "none",
    normalizer: float | Array | None = None,
    kl: bool = False,
    from_log_probs: bool = False,
    class_mask: ArrayLike | None = None,
    z_loss: float | Array = 0.0,
    return_z_loss: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    implementation: str = "auto",
    check_labels: bool | None = None,
    _caller: lsspec.Caller | None = None,
) -> Array | tuple:
    r"""Label-smoothed cross-entropy from integer labels, in closed form.

    The smoothed target of a row is ``q = (1 - eps) * onehot(y) + eps * u``, with ``u`` uniform
    over the convention's support ``S`` (SEMANTICS.md §1). The loss is computed without building
    ``q`` from three per-row statistics, ``lse = logsumexp(x)``, ``x_y`` and ``sum_c x_c``::

        loss = (1 - eps) * (lse - x_y) + eps * (lse - mean_{c in S} x_c)

    ``mean_S x`` is ``sum(x)/K`` (``"uniform"``), ``(sum(x) - x_y)/(K-1)`` (``"others"``) or
    ``(sum(x) - x_y - x_pad)/(K-2)`` (``"others_but_pad"``). The gradient with respect to the
    logits is ``g * (softmax(x) - q)``; extra memory is O(rows), never O(rows x K).

    With class ``weight`` ``w`` (torch's semantics, SEMANTICS.md §4) a row is
    ``(1 - eps) * w_y * (lse - x_y) + eps * sum_{c in S} w_c (lse - x_c) / |S|`` and ``"mean"``
    divides by the sum of ``w_y`` over counted rows.

    With a ``class_mask`` ``m`` (SEMANTICS.md §7) the masked classes (``m_c = False``) leave both
    the softmax and the support: ``lse = logsumexp_{m_c} x_c``, ``S`` holds allowed classes only
    and ``K`` becomes ``sum(m)``; masked logits may be ``-inf`` and loss and gradient stay finite.
    With ``z_loss`` ``z`` every counted row adds ``z * lse**2`` (the PaLM/T5X z-loss), whose
    gradient is ``2 z lse softmax(x)``; ``z = 0`` leaves the loss and its gradient untouched.

    Reproduces:
      * ``convention="uniform"``: ``torch.nn.functional.cross_entropy(x, y, weight=w,
        ignore_index=i, reduction=r, label_smoothing=eps)`` (class axis given by ``axis``), and
        ``optax.softmax_cross_entropy(x, optax.smooth_labels(onehot(y), eps))``;
      * ``convention="others"``: the forum's ``LabelSmoothingLoss(classes, smoothing)``, fairseq's
        ``label_smoothed_nll_loss`` (with ``from_log_probs=True``) and T5X/Flax (with ``kl=True``);
      * ``convention="others_but_pad", kl=True, from_log_probs=True``: OpenNMT-py's
        ``LabelSmoothingLoss(label_smoothing, tgt_vocab_size, ignore_index)``;
      * ``convention="uniform", class_mask=m``: ``optax.softmax_cross_entropy(x,
        optax.smooth_labels(onehot(y), eps, where=m), where=m)``;
      * ``convention="others", kl=True, z_loss=z, return_z_loss=True``: the per-token loss and
        z-loss of T5X's ``compute_weighted_cross_entropy`` (see ``lsjax.compat.t5x``).

    Args:
      logits: float array; the class axis is ``axis``. bf16/fp16 are accumulated in float32.
      labels: int array with the logits' shape minus the class axis. Any integer dtype (uint8
        included) gives what int64 labels give; an ``ignore_index`` the dtype cannot hold (-100
        with uint8 labels) matches no label.
      smoothing: ``eps`` in [0, 1]; a Python float or a scalar array (may be traced).
        A value within ``lsspec.UNIT_INTERVAL_ULPS`` (4) ulps outside [0, 1] in its own dtype
        is rounding (a schedule that ends at 0) and is clamped; farther out it raises when
        concrete and gives NaN rows when traced. Differentiable (``jax.grad``, also under
        ``jit``/``vmap``), for a learned or scheduled smoothing: ``d loss_row / d eps =
        -w_y (lse - x_y) + sum_{c in S} w_c (lse - x_c) / |S|``, plus with ``kl=True`` the KL
        constant's ``c (log(eps/|S|) - log q_y)`` (``c = (|S|-1)/|S|`` uniform, else 1). That
        one is infinite at the ends; the one-sided limits are returned: ``-inf`` at
        ``eps = 0``, ``+inf`` at ``eps = 1`` for ``"others"``/``"others_but_pad"`` (finite for
        ``"uniform"``). The clamp of a rounding is transparent to the derivative.
      convention: ``"uniform"`` | ``"others"`` | ``"others_but_pad"``.
      ignore_index: rows whose label equals it count for nothing (torch's ``ignore_index``).
      pad_index: the pad column, required by and only allowed with ``"others_but_pad"``. It never
        receives smoothing mass, and rows whose label is the pad count for nothing.
      weight: per-class weights, shape ``(K,)``. A constant: differentiating through it
        raises a TypeError (a silent zero derivative would be a wrong number).
      where: boolean row mask with the labels' shape (optax's ``where``); False rows count for
        nothing.
      axis: the class axis of ``logits``; the last by default at every rank (optax's and Flax's
        layout). ``lstorch.smoothed_cross_entropy`` requires it for 3 or more dimensions (torch
        reads ``(N, C, d1, ...)`` with the classes on axis 1); with an explicit ``axis`` the
        twins are equal.
      reduction: ``"none"`` (the labels' shape, 0 on rows that do not count), ``"sum"`` or
        ``"mean"`` (sum over counted rows of ``w_y``, or their number without weights).
      normalizer: with ``reduction="mean"``, divide the sum by this instead (for gradient
        accumulation: the token count of the whole accumulated batch). A finite number > 0 (a
        Python number or 0-d array); traced and not > 0 or not finite, the mean is NaN.
      kl: return the KL form, the loss minus the target's entropy (SEMANTICS.md §2): same
        gradient, minimum 0, finite at smoothing = 1. Not defined with ``weight``.
      from_log_probs: ``logits`` already are log-probabilities: the loss is ``-sum_c q_c x_c``
        and its gradient ``-q`` (OpenNMT's KL loss and fairseq take log-probs).
      class_mask: boolean ``(K,)``; False classes leave the softmax and the smoothing support.
        A counted row whose label is a masked class raises (concrete) or is NaN (traced).
      z_loss: ``z >= 0`` and finite (traced and out of range: NaN rows); adds ``z * lse**2``
        to every counted row. Needs logits (not allowed with ``from_log_probs=True``).
        Differentiable: ``d loss_row / d z = lse**2`` (a traced 0 included; the Python number 0
        leaves the z-loss out of the program).
      return_z_loss: also return the z-loss part alone, reduced like the loss:
        ``(loss, z_part)`` where ``loss`` already includes ``z_part`` (T5X's convention). The
        z-part's gradient is ``2 z lse softmax(x)``.
      softcap: ``None`` (the default) or a finite number ``cap > 0``: the loss is taken on
        ``t = cap * tanh(logit_scale * x / cap)`` instead of the logits (Gemma 2/3's final-logit
        softcapping). The transform is applied inside the closed form, as each reduction and
        the gradient read the logits: no transformed rows x K copy is kept for backward. The
        gradient is the chain rule, ``dt/dx = logit_scale * (1 - tanh(logit_scale * x /
        cap)**2)`` times the gradient for ``t``. The z-loss and the statistics are those of
        ``t``. A Python number, compiled in: not differentiated (a new value recompiles).
        Needs logits (not allowed with ``from_log_probs=True``).
      logit_scale: a finite number ``> 0`` (default 1.0) the logits are multiplied by first
        (flash-attn's ``logit_scale``; ``1 / temperature``). 0 (every logit equal) and
        negative values (the class order reversed) are refused. Like ``softcap``: a Python
        number, not differentiated, and it needs logits.
      return_stats: also return per-row statistics of the (transformed) logits, from the pass
        that computes the loss: ``(loss, stats)``, or ``(loss, z_part, stats)`` with
        ``return_z_loss=True``, ``stats`` a ``lsjax.RowStats(lse, entropy, correct)`` of per-row
        arrays (the labels' shape, whatever the ``reduction``): the logsumexp, the entropy of
        the softmax, and whether the argmax is the label (the first maximal index on ties, as
        ``torch.argmax``; taken on the logits before the increasing transform). Rows that do not
        count hold 0, 0 and False. The statistics carry no gradient. Needs logits. The mean of
        ``correct`` over the counted rows is the token accuracy::

          loss, stats = lsjax.smoothed_cross_entropy(
              logits, labels, smoothing=0.1, ignore_index=-100, reduction="mean",
              return_stats=True)
          counted = labels != -100
          accuracy = stats.correct.sum() / counted.sum()
      implementation: ``"auto"`` | ``"xla"`` | ``"pallas"``: how the core runs.
        ``"pallas"``: on the Pallas kernels of ``lsjax.pallas_kernels`` (one read of the
        logits in forward, one read and one write in backward); compiled on a GPU (Triton) or
        TPU (Mosaic), in Pallas's slow interpret mode elsewhere. They take logits, not
        ``from_log_probs=True`` (an error), and reverse-mode derivatives only (``grad``,
        ``vjp``, under ``jit``/``vmap``; ``jax.jvp``/``jacfwd``/``hessian`` and grad of grad
        are a ``NotImplementedError``).
        ``"xla"``: plain XLA ops, every derivative. ``"auto"``: the kernels for
        float32/bf16/fp16 logits when JAX's default backend is a GPU and JAX sees one device
        (XLA's partitioner does not split a kernel: sharded logits would be gathered whole;
        inside ``shard_map`` pass ``"pallas"`` and ``check_vma=False``), XLA elsewhere (TPU
        too) and wherever the call is differentiated in forward mode or twice (``jvp``,
        ``jacfwd``, ``hessian``; not seen through an inner ``jit``/``checkpoint``: pass
        ``"xla"`` there);
        the environment variable ``LSJAX_IMPLEMENTATION=xla|pallas`` overrides that choice
        (log-probabilities stay on XLA). The tests run the kernels in interpret mode on CPUs;
        on an H200 they ran in the GPU benchmark (``benchmarks/RESULTS.md``, run 4), values
        checked before timing; never on a TPU.
      check_labels: whether the host reads concrete array values to check them: the labels
        (in range, not of a masked class), a ``class_mask`` (leaves a class to smooth over) and
        the scalar options given as arrays (``smoothing``, ``z_loss``, ``normalizer``).
        ``None`` (the default) and ``True``: concrete arrays are read and a bad value raises
        (reading one waits for the device that computed it); ``False``: nothing is read, so
        an out-of-range counted label gives a NaN loss and gradient for its row, as under
        ``jit``. Traced values are never read: under ``jit`` the keyword changes nothing.
        Python numbers are checked whatever the value. The twin of lstorch's keyword, where
        ``None`` reads CPU tensors only.

    Returns:
      The loss in ``float32`` for bf16/fp16/float32 logits and ``float64`` for float64 logits:
      per row with ``reduction="none"``, else a scalar. When no row counts, ``"mean"`` returns 0
      with a zero gradient (torch returns NaN there).

    Sharded inputs: logits split over the rows, the classes or both, under ``jit``. On a mesh
    with ``Explicit`` axes (``jax.make_mesh``'s default) the loss computes under
    ``jax.sharding.auto_axes`` (XLA's partitioner plans the same temporaries as on an ``Auto``
    mesh) and returns the per-row loss laid out as the logits' rows, a scalar replicated.

    Errors and traced inputs: every bad option raises ``ValueError``/``TypeError`` naming the
    argument, the value given and what is allowed. The scalar options (``smoothing``,
    ``normalizer``, ``z_loss``) are Python numbers or 0-d arrays of a real dtype; concrete
    ones are checked like numbers. Under ``jit``/``vmap`` (traced values, which cannot be read)
    an out-of-range value gives NaN, never a plausible number: a ``smoothing`` more than 4 ulps
    outside [0, 1] makes every counted row NaN, a negative or non-finite ``z_loss`` too, and a
    ``normalizer`` that is not a finite number > 0 makes the mean NaN. Labels out of range raise
    when they are concrete; under ``jit`` such a row's loss (and so any reduction over it) is
    NaN.

    ``_caller`` is internal: the public function that called this one on the user's behalf
    (``lsspec.Caller``), named in error messages instead of this function.

    References:
      Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision";
      Müller, Kornblith & Hinton 2019, "When Does Label Smoothing Help?".
    """
    fn = lsspec.caller("smoothed_cross_entropy", _caller)
    weight = _common.array_or_none(fn, "weight", weight)
    where = _common.array_or_none(fn, "where", where)
    class_mask = _common.array_or_none(fn, "class_mask", class_mask)
    logits, labels, axis = _check_arrays(fn, logits, labels, axis, weight, where, class_mask)
    num_classes = logits.shape[axis]
    label_options = lsspec.LabelOptions(smoothing, convention, ignore_index, pad_index, reduction)
    z_value, transform = _common.check_loss_options(
        fn, num_classes, label_options, check_labels, normalizer=normalizer, kl=kl,
        has_weight=weight is not None, from_log_probs=from_log_probs, z_loss=z_loss,
        return_z_loss=return_z_loss, softcap=softcap, logit_scale=logit_scale,
        return_stats=return_stats,
    )  # fmt: skip
    from lsjax import pallas_kernels  # imports Pallas: only when a loss is computed

    core = _row_loss_jit
    differentiable = (smoothing, z_loss)
    if pallas_kernels.chosen(
        fn, implementation, logits, from_log_probs=from_log_probs, options=differentiable
    ):
        core = pallas_kernels.row_loss
    _common.check_class_mask_support(fn, class_mask, convention, pad_index, check_labels)
    _common.check_label_range(
        fn, labels, num_classes, ignore_index, pad_index, where, class_mask, check_labels
    )

    # z-loss is compiled in only when it can matter: a concrete 0 leaves the program unchanged.
    with_z = return_z_loss or not (lsspec.is_number(z_value) and z_value == 0)
    options = _Options(convention, pad_index, kl, from_log_probs, with_z, transform, return_stats)
    layout = _Layout(
        axis, reduction, return_z_loss, core is _row_loss_jit, ignore_index,
        _common.ulp_of_one(smoothing),
    )  # fmt: skip
    # (With the Pallas kernels, as the calls around them: their block sizes are chosen for the
    # platform when a program is traced, and a cached trace would keep another platform's.)
    after_checks = _after_checks_jit if layout.xla else _after_checks
    weight = _common.constant(fn, "weight", weight)
    after_checks = _common.with_auto_axes(
        after_checks, logits, axis, labels, where, weight, class_mask
    )
    return after_checks(
        layout, options, logits, labels, where, smoothing, weight, class_mask,
        z_loss if with_z else None, normalizer,
    )  # fmt: skip


class _Layout(NamedTuple):
    """The static options of what runs around the core: the class axis, the reduction, whether
    the z-part is returned, which core (XLA's or the Pallas kernels'), the ignored label and
    the rounding slack of the smoothing's own dtype."""

    axis: int
    reduction: str
    return_z_loss: bool
    xla: bool
    ignore_index: int | None
    smoothing_ulp: float  # _common.ulp_of_one of the smoothing as given


def _after_checks(layout, options, logits, labels, where, smoothing, weight, class_mask, z_loss,
                  normalizer):  # fmt: skip
    """Everything after the checks, as one program (:data:`_after_checks_jit`): the counted
    rows, the options as arrays of the compute dtype, the core on the class-last logits, the
    per-row weights, the statistics and the reduction. ``z_loss`` is None without a z-part."""
    from lsjax import pallas_kernels

    core = _row_loss_jit if layout.xla else pallas_kernels.row_loss
    x = jnp.moveaxis(logits, layout.axis, -1)
    num_classes = x.shape[-1]
    compute_dtype = _common.compute_dtype(x.dtype)
    counted = _common.counted_rows(labels, layout.ignore_index, options.pad_index, where)
    # differentiated (see _row_loss_jvp)
    eps = _common.smoothing_array(smoothing, compute_dtype, layout.smoothing_ulp)
    if weight is not None:
        weight = jax.lax.stop_gradient(weight.astype(compute_dtype))
    if class_mask is not None:
        class_mask = jax.lax.stop_gradient(class_mask)
    z = None if z_loss is None else _common.z_loss_array(z_loss, compute_dtype)
    loss = core(options, x, labels, counted, eps, weight, class_mask, z)
    w_y = 1.0 if weight is None else weight[jnp.where(counted, labels, 0).clip(0, num_classes - 1)]
    row_weight = jnp.where(counted, w_y, 0.0).astype(compute_dtype)
    stats = None
    with_z = options.with_z
    if options.with_stats:
        *loss, (lse, entropy, correct) = loss
        loss = tuple(loss) if with_z else loss[0]
        stats = _closed_form.RowStats(lse, entropy, correct > 0)
    outputs = (loss,)
    if with_z:
        loss, z_part = loss
        outputs = (loss, z_part) if layout.return_z_loss else (loss,)
    outputs = tuple(
        _common.reduce(value, row_weight, layout.reduction, normalizer) for value in outputs
    )
    if stats is not None:
        return (*outputs, stats)
    return outputs if len(outputs) > 1 else outputs[0]


class _Options(NamedTuple):
    """The static (hashable) options of the core."""

    convention: str
    pad_index: int | None
    kl: bool
    from_log_probs: bool
    with_z: bool = False
    transform: lsspec.LogitTransform = lsspec.LogitTransform()
    with_stats: bool = False


def _row_terms(options, x, labels, counted, eps, weight, class_mask=None) -> _closed_form.RowTerms:
    """Per-row statistics of the closed form; ``x`` is (..., K), class axis last.

    Only O(rows) values come out (``_closed_form.RowTerms``): lse, x_y, the sum over the
    support of ``w_c (x_c - lse)`` and of ``w_c``, and the support's size.
    Each reduction reads ``x`` in its own dtype and accumulates in float32 (or float64): there is
    no float32 copy of a bf16 ``x``. Rows that do not count may hold NaN here; callers mask them.
    Masked classes are replaced inside each reduction (``-inf`` for lse, 0 for the sums), so a
    ``-inf`` logit in a masked column never meets a multiplication.
    """
    num_classes = x.shape[-1]
    compute_dtype = eps.dtype
    # A counted row whose label is out of range (or masked), or a (traced) smoothing outside
    # [0, 1], gives NaN: never a plausible number.
    safe_labels, bad = _closed_form.label_rows(labels, counted, eps, num_classes, class_mask)
    size = _closed_form.support_size(
        options.convention, num_classes, options.pad_index, class_mask, compute_dtype
    )
    transform = options.transform
    if options.from_log_probs:
        peak = log_sum = jnp.zeros(labels.shape, compute_dtype)
    else:
        peak, log_sum = _logsumexp_parts(x, compute_dtype, class_mask, transform)
    # The upcast comes first (kept apart from the other reductions), then the shift and the
    # mask: a barrier over an already-masked array would materialise it.
    # Its own copy of the peak: XLA would share one rows x K broadcast of it with the lse's
    # reduction and materialise it.
    peak_apart, _ = jax.lax.optimization_barrier((peak, counted))
    scale = lsspec.sum_scale(num_classes)
    x_summed = _transformed_alone(x, compute_dtype, labels, transform)
    x_summed = x_summed - peak_apart[..., None]
    if class_mask is not None:
        x_summed = _zero_masked(x_summed, class_mask, labels)
    # The label (and the pad) never enter the support's sums: summed and subtracted after, the
    # label's term w_y (x_y - peak) would cancel against the others' (at smoothing 1 with a
    # confident label, the float32 rounding of ~16 in a sum of ~1e-4), a pad logit of -1e9
    # would swamp the others' sum and a -inf one make it NaN. The select compares each column
    # with the row's label, so XLA fuses it into the reduction (no rows x K temporary).
    in_support = _support_columns(options, x.shape, safe_labels)
    x_y = jnp.take_along_axis(x, safe_labels[..., None], axis=-1)[..., 0].astype(compute_dtype)
    x_y = _closed_form.transformed(x_y, transform)
    mask_weight = 1.0 if class_mask is None else class_mask.astype(compute_dtype)
    if weight is None:
        w_y = 1.0
        w_pad = 1.0 if class_mask is None else mask_weight[options.pad_index or 0]
        support_sum = _support_sum(x_summed * scale, in_support)
        support_weight = float(num_classes) if class_mask is None else jnp.sum(mask_weight)
    else:
        masked_weight = weight * mask_weight
        w_y = weight[safe_labels]
        w_pad = masked_weight[options.pad_index] if options.pad_index is not None else 0.0
        support_sum = _support_sum(x_summed * (weight * scale), in_support)
        support_weight = jnp.sum(masked_weight)
    if options.convention != "uniform":  # (y and the pad are out of support_sum already)
        support_weight = support_weight - w_y
    if options.convention == "others_but_pad":
        support_weight = support_weight - w_pad
    return _closed_form.RowTerms(
        peak + log_sum,
        peak,
        log_sum,
        x_y,
        w_y,
        support_sum,
        support_weight,
        safe_labels,
        bad,
        size,
        scale,
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _row_loss(options, x, labels, counted, eps, weight, class_mask, z):
    """The closed-form core: the per-row loss, 0 on rows that do not count.

    With ``options.with_z`` it returns ``(loss, z_part)``, the loss including the z-loss; with
    ``options.with_stats`` the :func:`_row_stats` come last, ``correct`` as 0/1 in the compute
    dtype (a custom_jvp output has a float tangent).
    """
    terms = _row_terms(options, x, labels, counted, eps, weight, class_mask)
    loss = _loss_from_terms(options, terms, counted, eps, z)
    if not options.with_stats:
        return loss
    loss = loss if options.with_z else (loss,)
    return (*loss, _row_stats(options, x, terms, counted, class_mask))


def _row_stats(options, x, terms, counted, class_mask):
    """``(lse, entropy, correct)`` per row (``_closed_form.RowStats``), 0 on rows that do not
    count; constants to autodiff. The entropy ``-sum_c p_c log p_c`` is one more reduction over
    ``x`` beside the lse's (XLA fuses the transform and the softmax into it: no rows x K
    temporary); the argmax, ``jnp.argmax``'s first maximal index (``torch.argmax``'s rule),
    is taken over the allowed logits before the (increasing) transform."""
    dtype = terms.lse.dtype
    peak, log_sum, _ = jax.lax.optimization_barrier((terms.peak, terms.log_sum, counted))
    upcast = _transformed_alone(x, dtype, log_sum, options.transform)
    log_p = jnp.minimum((upcast - peak[..., None]) - log_sum[..., None], 0.0)
    p = jnp.exp(log_p)
    if class_mask is not None:
        p = p * _mask_for(class_mask, dtype, log_sum)
    entropy = -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)
    values = x if class_mask is None else jnp.where(class_mask, x, -jnp.inf)
    hit = (jnp.argmax(values, axis=-1) == terms.safe_labels) & counted & ~terms.bad
    zero = jnp.zeros((), dtype)
    stats = (jnp.where(counted, terms.lse, zero), jnp.where(counted, entropy, zero),
             hit.astype(dtype))  # fmt: skip
    return jax.lax.stop_gradient(stats)


def _loss_from_terms(options, terms, counted, eps, z):
    """:func:`lsjax._closed_form.row_loss` with the core's options."""
    kl = options.kl
    return _closed_form.row_loss(terms, counted, eps, convention=options.convention, kl=kl, z=z)


def _row_loss_jvp(options, primals, tangents):
    """Tangents with respect to the logits ``x``, the smoothing ``eps`` and the z-loss ``z``.

    ``d loss_row = sum_c r_c dx_c + s d_eps + lse**2 d_z``, with ``s`` the per-row slope
    (``_closed_form.smoothing_slope``); the z-part alone has ``sum_c 2 z lse p_c dx_c +
    lse**2 d_z``.
    Labels, masks and class weights are constants. An input that is not differentiated comes
    as a symbolic zero and its term is not built: differentiating the logits only costs nothing
    more, and differentiating ``eps`` or ``z`` only is O(rows) work on the statistics.
    """
    x, labels, counted, eps, weight, class_mask, z = primals
    dx, d_eps, d_z = tangents[0], tangents[3], tangents[6]
    terms = _row_terms(options, x, labels, counted, eps, weight, class_mask)
    loss = _loss_from_terms(options, terms, counted, eps, z)
    lse, bad = terms.lse, terms.bad
    loss_tangent = z_tangent = jnp.zeros(labels.shape, eps.dtype)
    if not is_zero(dx):
        loss_tangent, z_tangent = _logits_tangents(
            options, x, dx, terms, counted, eps, weight, class_mask, z
        )
    if not is_zero(d_eps):
        slope = _closed_form.smoothing_slope(
            terms, eps, convention=options.convention, kl=options.kl
        )
        slope = _closed_form.counted_only(counted, bad, slope)
        loss_tangent = loss_tangent + slope * d_eps
    if options.with_z and not is_zero(d_z):
        z_slope = _closed_form.counted_only(counted, bad, jnp.square(lse)) * d_z
        loss_tangent, z_tangent = loss_tangent + z_slope, z_tangent + z_slope
    tangents = (loss_tangent, z_tangent) if options.with_z else loss_tangent
    if not options.with_stats:
        return loss, tangents
    tangents = tangents if options.with_z else (tangents,)
    loss = loss if options.with_z else (loss,)
    stats = _row_stats(options, x, terms, counted, class_mask)
    zeros = tuple(jnp.zeros_like(value) for value in stats)
    return (*loss, stats), (*tangents, zeros)


def _logits_tangents(options, x, dx, terms, counted, eps, weight, class_mask, z):
    """d loss_row = sum_c r_c dx_c with r = (A + 2 z lse) * p - t (logits) or r = -t (log-probs).

    ``t_c = (1 - eps) w_y [c = y] + (eps / |S|) w_c [c in S]`` is the (weighted) smoothed target,
    ``A = sum_c t_c`` and ``p`` the softmax over the allowed classes (0 on masked ones). The
    z-part alone has ``d z_row = sum_c 2 z lse p_c dx_c``. ``r`` is elementwise in ``x`` and
    per-row statistics, so under ``jit`` the gradient ``g * r`` is one fused pass that writes the
    output: no rows x K temporary. Returns (loss tangent, z-part tangent; zeros without z).
    """
    lse, w_y, support_weight = terms.lse, terms.w_y, terms.support_weight
    safe_labels, bad, size = terms.safe_labels, terms.bad, terms.size
    keep = counted[..., None]
    classes = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    is_target = classes == safe_labels[..., None].astype(jnp.int32)  # (int64 under x64)
    in_support = _support_columns(options, x.shape, safe_labels)
    w = 1.0 if weight is None else weight
    if class_mask is not None:  # masked classes leave the support (a (K,) product, not a select)
        w = w * class_mask.astype(eps.dtype)
    on_true = (1.0 - eps) * w_y
    per_class = eps / size
    smoothing_part = per_class * w
    if in_support is not None:
        smoothing_part = jnp.where(in_support, smoothing_part, 0.0)
    target = jnp.where(is_target, on_true[..., None], 0.0) + smoothing_part
    dx = dx.astype(eps.dtype)
    transform = options.transform
    if transform.active:  # the chain rule: dt = (dt/dx) dx, elementwise
        raw, scale, cap = _apart(x, eps.dtype, terms.log_sum, transform)
        safe_raw = jnp.where(keep, raw, 0).astype(eps.dtype)  # rows not counted may hold NaN
        dx = dx * _closed_form.transform_slope(safe_raw, transform, scale, cap)
    if options.from_log_probs:
        coefficient = -target
    else:
        mass = on_true + per_class * support_weight
        safe_x = jnp.where(keep, x, 0).astype(eps.dtype)
        if transform.active:
            raw, scale, cap = _apart(x, eps.dtype, terms.lse, transform)
            safe_x = jnp.where(keep, raw, 0).astype(eps.dtype)
            safe_x = _closed_form.transformed(safe_x, transform, scale, cap)
        # x - lse as (x - peak) - log_sum: exact where a rounded lse would not be. The peak
        # passes a barrier: XLA would otherwise share one rows x K broadcast of it with the
        # lse's reduction and materialise it.
        peak, log_sum = jax.lax.optimization_barrier((terms.peak, terms.log_sum))
        peak = jnp.where(counted, peak, 0.0)[..., None]
        log_sum = jnp.where(counted, log_sum, 0.0)[..., None]
        if class_mask is None:
            softmax = jnp.exp((safe_x - peak) - log_sum)
        else:
            # 0 on masked classes by a (K,) product: allowed x - lse <= 0, so the clamp only
            # keeps a masked logit (finite or -inf) from overflowing before it is zeroed.
            shifted = jnp.minimum((safe_x - peak) - log_sum, 0.0)
            softmax = jnp.exp(shifted) * _mask_for(class_mask, eps.dtype, lse)
        if options.with_z:
            mass = mass + 2.0 * z * jnp.where(counted, lse, 0.0)
        coefficient = mass[..., None] * softmax - target
    coefficient = jnp.where(keep, jnp.where(bad[..., None], jnp.nan, coefficient), 0.0)
    loss_tangent = jnp.sum(coefficient * dx, axis=-1)
    if not options.with_z:
        return loss_tangent, jnp.zeros_like(loss_tangent)
    z_coefficient = (2.0 * z * jnp.where(counted, lse, 0.0))[..., None] * softmax
    z_coefficient = jnp.where(keep, jnp.where(bad[..., None], jnp.nan, z_coefficient), 0.0)
    return loss_tangent, jnp.sum(z_coefficient * dx, axis=-1)


_row_loss.defjvp(_row_loss_jvp, symbolic_zeros=True)


# The core as one compiled program per (options, shapes): inside a user's jit it is inlined;
# called eagerly (or under eager grad/vmap) it runs as one cached executable instead of dozens of
# primitives dispatched one by one.
_row_loss_jit = jax.jit(_row_loss, static_argnums=(0,))
# What runs after the checks, as one program per (options, shapes): an eager call (and eager
# grad or vmap) lowers and runs it once, instead of the dozens of primitives around the core
# each dispatched (and, for a new shape, lowered) on its own. Inside a user's jit it is inlined.
_after_checks_jit = jax.jit(_after_checks, static_argnums=(0, 1))
