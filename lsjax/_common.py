"""The prologue and epilogue every lsjax loss shares: input checks, options, rows, reduction.

Each loss family adds only its own arithmetic on top of these: the checks of arrays and labels
(dtype, range, masked class), the scalar options (``smoothing``, ``z_loss``, ``normalizer``) as
numbers to check and as arrays to compute with, the mask of the rows that count, the zero-safe
product :func:`times`, and the reduction. Their PyTorch counterparts are in
``lstorch._common``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

import lsspec

Array = jax.Array
ArrayLike = Any


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def compute_dtype(dtype) -> Any:
    """The dtype a loss accumulates in: float32 for bf16/fp16/float32, float64 for float64.
    (Chosen, not promoted: ``jnp.promote_types`` raises under
    ``jax.numpy_dtype_promotion("strict")``, which has no implicit bf16 -> float32.)"""
    return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32)


def xlogx(value: Array) -> Array:
    """x * log(x) with 0 log 0 = 0, so smoothing = 1 (confidence 0) stays finite."""
    return jax.scipy.special.xlogy(value, value)


@jax.custom_jvp
def times(scale: Array, term: Array) -> Array:
    """``scale * term`` that is exactly 0 when ``scale`` is 0, even where ``term`` is infinite.

    With smoothing = 0 and a -inf logit the smoothing term is +inf; ``0 * inf`` would be NaN.
    Its derivative is the product's, at ``scale = 0`` too: ``term`` with respect to ``scale``
    (a select would give 0 there: a smoothing at 0 would never move), ``scale`` (0 there, not
    ``0 * inf``) with respect to ``term``.
    """
    return jnp.where(scale == 0, jnp.zeros_like(term), scale * term)


def explicit_mesh(*arrays: Any) -> tuple[Any, tuple[str, ...]]:
    """``(mesh, axes)``: the mesh and its ``Explicit`` axes where one of ``arrays`` is split
    over one of them (its type's sharding names it), else ``(None, ())``. A mesh's other axes
    (``Auto``, or ``Manual`` inside ``shard_map``) are not among them."""
    for value in arrays:
        sharding = getattr(jax.typeof(value), "sharding", None) if value is not None else None
        mesh = getattr(sharding, "mesh", None)
        names, kinds = getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ())
        explicit = {
            name
            for name, kind in zip(names, kinds, strict=True)
            if kind == jax.sharding.AxisType.Explicit
        }
        used = set()
        for entry in getattr(sharding, "spec", None) or ():
            used |= set(entry if isinstance(entry, tuple) else (entry,)) & explicit
        if used:
            return mesh, tuple(sorted(explicit))
    return None, ()


def with_auto_axes(fn: Any, inputs: Any, class_axis: int, *others: Any) -> Any:
    """``fn`` itself, or, where ``inputs`` (the logits or hidden states: rows and a class or
    feature axis ``class_axis``) or one of ``others`` is laid out over an ``Explicit`` mesh
    (``jax.make_mesh``'s default), ``fn`` under ``jax.sharding.auto_axes``.

    On an ``Explicit`` mesh the layout is part of each array's type and JAX checks every
    operation against it: it refuses the gather of the labels' logits from vocabulary-split
    logits, and the products of a hand-written derivative whose layout it cannot tell; where it
    accepts them, it lays out rows x K temporaries that XLA's fusions would not have kept (the
    dense loss on vocabulary-split logits: 396 KB of temporaries for 64 x 1024 float32 logits,
    against 3.6 KB). Inside ``auto_axes`` the mesh's axes are ``Auto``: XLA's partitioner lays
    out every intermediate as on an ``Auto`` mesh, which the sharded execution path proves.
    Each output comes back laid out as the rows of ``inputs`` (a per-row output) or replicated
    (a scalar). Only the JAX arrays among ``fn``'s arguments pass through ``auto_axes``; the
    others (static options, Python numbers) are bound."""
    mesh, axes = explicit_mesh(inputs, *others)
    if mesh is None:
        return fn
    spec = tuple(jax.typeof(inputs).sharding.spec)
    spec = spec + (None,) * (inputs.ndim - len(spec))
    rows = spec[: class_axis % inputs.ndim] + spec[class_axis % inputs.ndim + 1 :]

    def layout(leaf):
        leaf_spec = rows if leaf.ndim == len(rows) else (None,) * leaf.ndim
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*leaf_spec))

    def run(*args):
        traced = [i for i, arg in enumerate(args) if isinstance(arg, jax.Array)]

        def on_arrays(*arrays):
            full = list(args)
            for i, array in zip(traced, arrays, strict=True):
                full[i] = array
            return fn(*full)

        arrays = [args[i] for i in traced]
        # The outputs' shapes, traced with the mesh's axes Auto as well (every output
        # replicated): traced as they are, the arrays would meet the checks of Explicit axes.
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        on_auto = jax.sharding.auto_axes(on_arrays, axes=axes, out_sharding=replicated)
        layouts = jax.tree.map(layout, jax.eval_shape(on_auto, *arrays))
        return jax.sharding.auto_axes(on_arrays, axes=axes, out_sharding=layouts)(*arrays)

    return run


def is_zero(tangent: Any) -> bool:
    """Whether a tangent is JAX's symbolic zero: that input is not being differentiated."""
    return isinstance(tangent, SymbolicZero)


def constant(fn: Any, name: str, value: Any) -> Any:
    """``value``, an input the loss takes as a constant (a class weight). Where it is being
    differentiated (under ``jax.grad``/``jax.jvp``, its tangent is not JAX's symbolic zero) the
    derivative raises ``lsspec.differentiated_constant_error`` naming ``fn`` and ``name``,
    instead of the silent zero that ``jax.lax.stop_gradient`` would give. A concrete value (or
    None) is returned as it is, binding nothing."""
    return _traced_constant(fn, name, value) if is_traced(value) else value


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _traced_constant(fn: Any, name: str, value: Array) -> Array:
    return value


def _traced_constant_jvp(fn, name, primals, tangents):
    if not is_zero(tangents[0]):
        raise lsspec.differentiated_constant_error(fn, name)
    return primals[0], jnp.zeros_like(primals[0])


_traced_constant.defjvp(_traced_constant_jvp, symbolic_zeros=True)


def _times_jvp(primals, tangents):
    scale, term = primals
    d_scale, d_term = tangents
    value = times(scale, term)
    tangent = jnp.zeros_like(value)
    if not is_zero(d_term):
        tangent = tangent + times(scale, d_term)
    if not is_zero(d_scale):  # skipped when scale is constant: 0 * inf would be NaN
        tangent = tangent + d_scale * term
    return value, tangent


times.defjvp(_times_jvp, symbolic_zeros=True)


# --------------------------------------------------------------------------------------------
# Scalar options


def reads_values(value: Any, check_labels: bool | None = None) -> bool:
    """Whether the host reads an array's values to check them: THE one decision behind every
    check of an array's values (labels in range, of an allowed class, a ``class_mask`` that
    leaves a support, a smoothing, ``z_loss`` or ``normalizer`` given as an array).

    ``check_labels`` (the losses' keyword, the twin of lstorch's): ``None`` or ``True``, a
    concrete array (reading it waits for the device that computes it); ``False``, never. A
    traced value (under ``jit``, ``vmap``, ``grad``) is never read, whatever ``check_labels``
    says. A value that is not read is not checked: out of range, it gives NaN where it is
    used, never a plausible number."""
    return check_labels is not False and not is_traced(value)


def concrete_scalar(
    fn: Any, name: str, value: Any, *, optional: bool = False, check_labels=None
) -> Any:
    """A scalar option (smoothing, normalizer, z_loss, ...) as a Python float for checking: a
    number, or a 0-d array of a real dtype that ``reads_values`` reads (concrete, and
    ``check_labels`` not False). Any other array passes through unread (out of range, it
    gives NaN). None is kept where ``optional``; anything else (None, a string, a tuple, a
    bool) raises TypeError, an array of more than one element ValueError."""
    if value is None and optional:
        return None
    if lsspec.is_number(value):
        return float(value)
    if not isinstance(value, jax.Array | np.ndarray | np.generic):
        raise lsspec.scalar_type_error(fn, name, value)
    if np.ndim(value) != 0:
        raise lsspec.shape_error(fn, name, np.shape(value), "a scalar shape ()")
    dtype = value.dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise lsspec.scalar_type_error(fn, name, value)
    if not reads_values(value, check_labels):
        return value
    return float(np.asarray(value))


_FLOAT64_ULP = float(np.finfo(np.float64).eps)


def ulp_of_one(value: Any) -> float:
    """The spacing of ``value``'s own float dtype at 1.0 (float64's for a Python number): read
    before ``value`` enters a ``jit``, which may canonicalize its dtype (a float64 NumPy scalar
    becomes float32 without ``jax_enable_x64``)."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        return float(jnp.finfo(dtype).eps)
    return _FLOAT64_ULP


def concrete_smoothing(fn: Any, value: Any, name: str = "smoothing", check_labels=None) -> Any:
    """A smoothing that ``reads_values`` reads (or a number) as a Python float, snapped into
    [0, 1] when it is only rounding outside it (``lsspec.UNIT_INTERVAL_ULPS``); other values
    (traced, or with ``check_labels=False``) pass through."""
    concrete = concrete_scalar(fn, name, value, check_labels=check_labels)
    if lsspec.is_number(concrete):
        return lsspec.snap_to_unit_interval(concrete, ulp_of_one(value))
    return concrete


def check_smoothing_below_one(fn: Any, name: str, value: Any, check_labels=None) -> None:
    """The smoothing of a loss whose library asserts it is below 1 (timm, Megatron):
    ``check_labels`` checked, then a value ``concrete_scalar`` reads held to [0, 1) (a value
    it does not read is held to [0, 1] by the loss, NaN outside)."""
    lsspec.check_check_labels(fn, check_labels)
    value = concrete_scalar(fn, name, value, check_labels=check_labels)
    lsspec.check_positive_below_one(fn, name, value)


def check_label_options(
    fn, num_classes: int | None, options: lsspec.LabelOptions, check_labels=None, **more
) -> None:
    """``lsspec.check_options`` of a loss with integer labels: its ``options``,
    ``check_labels`` and ``more`` (the dense loss's ``normalizer``, ``kl``, ...). A smoothing
    that ``reads_values`` reads is checked; any other passes."""
    lsspec.check_check_labels(fn, check_labels)
    lsspec.check_options(
        fn,
        num_classes=num_classes,
        check_labels=check_labels,
        smoothing=concrete_smoothing(fn, options.smoothing, check_labels=check_labels),
        convention=options.convention,
        reduction=options.reduction,
        pad_index=options.pad_index,
        ignore_index=options.ignore_index,
        **more,
    )


def check_loss_options(
    fn, num_classes, options: lsspec.LabelOptions, check_labels=None, *, normalizer=None,
    kl=False, has_weight=False, from_log_probs=False, z_loss=0.0, return_z_loss=False,
    softcap=None, logit_scale=1.0, return_stats=False,
):  # fmt: skip
    """The option checks every loss with integer labels shares (dense, fused, sharded,
    vocabulary-parallel): :func:`check_label_options` with the ``normalizer``, ``kl`` and
    ``from_log_probs``, then the z-loss, the logit transform and ``return_stats``. Returns
    ``(z_loss as read, the lsspec.LogitTransform)``: a number, or the value that
    ``reads_values`` did not read."""
    check_label_options(
        fn, num_classes, options, check_labels,
        normalizer=concrete_scalar(
            fn, "normalizer", normalizer, optional=True, check_labels=check_labels
        ),
        kl=kl, has_weight=has_weight, from_log_probs=from_log_probs,
    )  # fmt: skip
    z_value = concrete_scalar(fn, "z_loss", z_loss, check_labels=check_labels)
    lsspec.check_z_loss(fn, z_value, from_log_probs=from_log_probs, return_z_loss=return_z_loss)
    transform = lsspec.check_logit_transform(
        fn, softcap, logit_scale, from_log_probs=from_log_probs
    )
    lsspec.check_return_stats(fn, return_stats, from_log_probs=from_log_probs)
    return z_value, transform


def smoothing_array(value: Any, dtype, ulp: float) -> Array:
    """``value`` as a 0-d ``dtype`` array, clamped into [0, 1] where it lies within the rounding
    slack outside it (a traced schedule that ends at 0); farther out it stays out of range, and
    the rows it reaches are NaN. ``ulp``: :func:`ulp_of_one` of the value the user gave. Called
    inside the losses' compiled programs, so an eager call dispatches none of these operations."""
    slack = lsspec.unit_interval_slack(ulp)
    eps = jnp.asarray(value, dtype)
    snapped = jnp.clip(eps, 0, 1)
    rounding = (eps != snapped) & (jnp.abs(eps - snapped) <= slack)
    # The snap is rounding, not a change of value: its derivative is 1 (straight through), so
    # a learned smoothing at 0 or 1 keeps its whole derivative (clip's would be 1/2 there).
    return jnp.where(rounding, eps + jax.lax.stop_gradient(snapped - eps), eps)


def z_loss_array(value: Any, dtype) -> Array:
    """``z_loss`` as a 0-d ``dtype`` array, NaN where it is negative or not finite (a traced
    value the checks could not read): the rows it reaches are NaN, never a plausible number."""
    z = jnp.asarray(value, dtype)
    return jnp.where((z >= 0) & jnp.isfinite(z), z, jnp.nan)


# --------------------------------------------------------------------------------------------
# Arrays and labels


def as_array(fn: Any, name: str, value: Any) -> Array:
    """Input ``name`` of ``fn`` as a ``jax.Array``, as ``jnp.asarray(value)`` gives it, without
    running a program: a ``jax.Array`` (a tracer too) as it is (``jnp.asarray`` would bind an
    identity conversion, which an eager ``jax.grad`` dispatches and linearizes on every call), a
    NumPy array or scalar by ``jax.device_put`` (``jnp.asarray`` runs a compiled identity per
    shape, each call). Anything else (a Python number or list) by ``jnp.asarray``; what that
    refuses (None, a string, a ragged list) is a TypeError naming ``fn`` and ``name``."""
    if isinstance(value, jax.Array):
        return value
    if isinstance(value, np.ndarray | np.generic):
        return jax.device_put(value)
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError) as error:
        fn, arg = lsspec.names(fn)
        raise TypeError(
            f"{fn}: `{arg(name)}` must be an array or a list of numbers; got {value!r} "
            f"({type(value).__name__}: {error})."
        ) from None


def array_or_none(fn: Any, name: str, value: Any) -> Any:
    """``weight``/``where``/``class_mask`` as an array (a Python list becomes one), or None; a
    complex one is a TypeError (``lsspec.check_real``)."""
    if value is None:
        return None
    value = as_array(fn, name, value)
    lsspec.check_real(fn, name, value)
    return value


def floating(fn: Any, **arrays: ArrayLike) -> tuple[Array, ...]:
    """The named inputs as arrays, each of a floating dtype of 16 bits or more (else a
    TypeError naming it): float8 has no arithmetic of its own to accumulate a loss in, and
    torch's losses refuse it too."""
    checked = []
    for name, value in arrays.items():
        value = as_array(fn, name, value)
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise lsspec.dtype_error(fn, name, value.dtype, "a floating dtype")
        if value.dtype.itemsize < 2:
            raise lsspec.dtype_error(fn, name, value.dtype, lsspec.WIDE_FLOATS)
        checked.append(value)
    return tuple(checked)


def check_bool(fn: Any, name: str, value: Any) -> None:
    """A mask option (``where``, ``class_mask``), when given, has dtype bool."""
    if value is not None and jnp.asarray(value).dtype != jnp.bool_:
        raise lsspec.dtype_error(fn, name, jnp.asarray(value).dtype, "dtype bool")


def integer_labels(fn: Any, labels: ArrayLike) -> Array:
    """``labels`` as an array of an integer dtype (else a TypeError), widened by
    :func:`index_labels` before any comparison with ``ignore_index`` or ``pad_index``.

    Without ``jax_enable_x64``, JAX converts int64/uint64 NumPy labels to int32 by wrapping
    (``2**32 + 3`` becomes 3, a real class): such labels whose values int32 cannot hold raise a
    ValueError here, before they are converted, whatever ``check_labels`` says (they are on the
    host; no class index is that large)."""
    if isinstance(labels, np.ndarray | np.generic) and np.issubdtype(labels.dtype, np.integer):
        canonical = jax.dtypes.canonicalize_dtype(labels.dtype)
        if canonical != labels.dtype:
            info = np.iinfo(canonical)
            lost = (labels < info.min) | (labels > info.max)
            if np.any(lost):
                name, arg = lsspec.names(fn)
                raise ValueError(
                    f"{name}: `{arg('labels')}` must fit JAX's default integer dtype, {canonical}"
                    f" (jax_enable_x64 is off), or they would wrap to other classes; got "
                    f"{labels.dtype} values {sorted(set(np.asarray(labels)[lost].tolist()))[:5]}."
                )
    labels = as_array(fn, "labels", labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise lsspec.dtype_error(fn, "labels", labels.dtype, "an integer dtype")
    return index_labels(labels)


def index_labels(labels: Array) -> Array:
    """Integer ``labels`` (already checked) in JAX's default integer dtype (int64 under
    ``jax_enable_x64``, else int32) wherever that holds them, so that every class index and
    every ``ignore_index``/``pad_index`` fits: uint8, int8, uint16, int16 (and, under x64, int32
    and uint32) are widened.

    JAX compares an array with a Python int in the array's dtype, so in uint8 ``-100`` would be
    156 (a real class, silently ignored) and ``K = 259`` would be 3 (real labels out of range).
    Widening before any comparison makes narrow labels give exactly what int64 labels give, and
    widening to ONE dtype makes the compiled program the same whatever the labels' dtype: XLA's
    fusion choices (and so the order of float32 additions) may otherwise differ by a last bit.
    Inside a caller's jit the widening itself is fused into the loss's fusions, which changes
    their operand order and so which products XLA:CPU fuses into multiply-adds: a result may
    differ there by one unit in the last place. Labels as wide as the target are left as they
    are.
    """
    target = jnp.dtype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    if labels.dtype.itemsize < target.itemsize:
        return labels.astype(target)
    return labels


def counted_rows(labels, ignore_index=None, pad_index=None, where=None, *, xp: Any = jnp):
    """The rows that count: label not ``ignore_index``, not ``pad_index``, and ``where`` True.
    ``xp``: ``jax.numpy`` inside the losses' programs, ``numpy`` for the host's checks."""
    counted = xp.ones(labels.shape, dtype=bool)
    for index in (ignore_index, pad_index):
        if index is not None and _holds(labels.dtype, index):
            counted = counted & (labels != index)
    if where is not None:
        counted = counted & xp.asarray(where)
    return counted


def _holds(dtype, index: int) -> bool:
    """Whether integer ``dtype`` holds ``index``. JAX compares an array with a Python int in the
    array's dtype (in uint32, ``-1`` is ``2**32 - 1``), so an ``ignore_index`` the labels' dtype
    cannot hold is no label's value and matches none."""
    info = np.iinfo(dtype)
    return bool(info.min <= index <= info.max)


def check_label_range(
    fn, labels, num_classes, ignore_index, pad_index=None, where=None, class_mask=None,
    check_labels=None,
) -> None:  # fmt: skip
    """Counted labels (:func:`counted_rows`) out of range (or of a masked class) raise where
    ``reads_values`` reads the labels and ``where`` (concrete, and ``check_labels`` not False);
    traced ones, and any with ``check_labels=False``, give NaN rows instead. The check runs on
    the host, in NumPy, on the values it reads: it dispatches nothing to the device."""
    if not reads_values(labels, check_labels):
        return
    if where is not None and not reads_values(where, check_labels):
        return
    labels_np = np.asarray(labels)
    where_np = None if where is None else np.asarray(where)
    counted = counted_rows(labels_np, ignore_index, pad_index, where_np, xp=np)
    bad = counted & ((labels_np < 0) | (labels_np >= num_classes))
    if bad.any():
        raise lsspec.label_range_error(fn, labels_np[bad].tolist(), num_classes, ignore_index)
    if class_mask is not None and reads_values(class_mask, check_labels):
        allowed = np.asarray(class_mask)
        masked = counted & ~allowed[np.clip(labels_np, 0, num_classes - 1)]
        if masked.any():
            raise lsspec.masked_label_error(fn, labels_np[masked].tolist())


def check_class_mask_support(fn, class_mask, convention, pad_index, check_labels=None) -> None:
    """A ``class_mask`` that ``reads_values`` reads must leave the convention a class to smooth
    over (``lsspec.check_class_mask_support``); one that is not read and leaves none gives
    NaN: the gradient of every counted row, and its loss where the smoothing is > 0."""
    if class_mask is not None and reads_values(class_mask, check_labels):
        lsspec.check_class_mask_support(fn, np.asarray(class_mask).tolist(), convention, pad_index)


# --------------------------------------------------------------------------------------------
# The reduction


def reduce(loss: Array, row_weight: Array, reduction: str, normalizer: Any = None) -> Array:
    """``"none"``: ``loss``; ``"sum"``: its sum; ``"mean"``: the sum over ``sum(row_weight)`` (0
    when that is 0), or over ``normalizer`` when given."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    # The mean of rows near the float32 maximum is finite while their sum is not: each row is
    # scaled by a power of two before it is added and the quotient scaled back, which is the
    # unscaled quotient bit for bit wherever that one is finite (lsspec.sum_scale).
    scale = lsspec.sum_scale(loss.size)
    total = jnp.sum(loss * scale)
    if normalizer is not None:
        # A traced normalizer that is not a finite number > 0 gives NaN (a concrete one raised).
        denominator = jnp.asarray(normalizer, loss.dtype)
        valid = (denominator > 0) & jnp.isfinite(denominator)
        return jnp.where(valid, total / jnp.where(valid, denominator, 1.0) / scale, jnp.nan)
    denominator = jnp.sum(row_weight)
    nothing_counts = denominator == 0
    return jnp.where(
        nothing_counts, 0.0, total / jnp.where(nothing_counts, 1.0, denominator) / scale
    )
