"""The prologue and epilogue every lstorch loss shares: input checks, options, rows, reduction.

Each loss family adds only its own arithmetic on top of these: the checks of tensors and labels
(dtype, range, masked class), the scalar options (``smoothing``, ``z_loss``, ``normalizer``) as
numbers to check and as tensors to compute with, the mask of the rows that count, the zero-safe
product :func:`times` (and :func:`scaled`, its differentiable form), the reduction, and the
autograd helpers the cores share (:func:`with_forward_mode`, :func:`differentiated_again`).
Their JAX counterparts are in ``lsjax._common``.
"""

from __future__ import annotations

import contextlib
import math
import struct
import sys

import torch
import torch.autograd.forward_ad as fwAD

import lsspec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def xlogx(value: torch.Tensor) -> torch.Tensor:
    """x * log(x) with 0 log 0 = 0, so smoothing = 1 (confidence 0) stays finite."""
    return torch.xlogy(value, value)


def times(scale: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``scale * term``, exactly 0 when ``scale`` is 0 even where ``term`` is infinite.

    Autograd gives it ``torch.where``'s derivative, 0 with respect to ``scale`` at ``scale = 0``:
    where ``scale`` may be differentiated, use :func:`scaled`."""
    return torch.where(scale == 0, torch.zeros_like(term), scale * term)


class _Times(torch.autograd.Function):
    """:func:`times` with the product's derivative, at ``scale = 0`` too: ``term`` with respect
    to ``scale`` (so a smoothing at 0 still moves) and ``scale`` (0 there, not ``0 * inf``) with
    respect to ``term``. Works under ``torch.func`` and ``torch.compile``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(scale, term):
        return times(scale, term)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        scale, term = ctx.saved_tensors
        d_scale = d_term = None
        if ctx.needs_input_grad[0]:
            d_scale = (grad * term).sum_to_size(scale.shape)
        if ctx.needs_input_grad[1]:
            d_term = times(scale, grad).sum_to_size(term.shape)
        return d_scale, d_term


class _TimesForwardMode(_Times):
    """``_Times`` with ``jvp``, the same product rule: ``d scale * term + scale * d term``
    (``scale * d term`` exactly 0 at ``scale = 0``). See ``with_forward_mode``."""

    @staticmethod
    def jvp(ctx, scale_tangent, term_tangent):
        scale, term = ctx.saved_tensors
        tangent = torch.zeros(torch.broadcast_shapes(scale.shape, term.shape), dtype=term.dtype,
                              device=term.device)  # fmt: skip
        if scale_tangent is not None:
            tangent = tangent + scale_tangent * term
        if term_tangent is not None:
            tangent = tangent + times(scale, term_tangent)
        return tangent


def scaled(scale: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """:func:`times`, differentiable with respect to ``scale`` at ``scale = 0`` (``_Times``)."""
    return with_forward_mode(_Times, _TimesForwardMode).apply(scale, term)


def numpy_as_tensor(value: object) -> object:
    """A NumPy array option (``np.array(0.1)``) as a CPU tensor, as lsjax takes one; any other
    value unchanged."""
    if lsspec.is_number(value) or isinstance(value, torch.Tensor):
        return value  # (a float made symbolic by torch.compile has no hasattr under Dynamo)
    if not hasattr(value, "__array__"):
        return value
    return torch.as_tensor(value)


def reads_values(value: torch.Tensor, check_labels: bool | None = None) -> bool:
    """Whether the host reads ``value``'s values to check them: THE one decision behind every
    check of a tensor's values (labels in range, of an allowed class, a ``class_mask`` that
    leaves a support, a smoothing, ``z_loss`` or ``normalizer`` given as a tensor).

    ``check_labels`` (the losses' keyword): ``None``, a CPU tensor only (reading one on an
    accelerator makes the host wait for the device on every call, and a CUDA graph cannot be
    captured); ``True``, on any device (paying that wait); ``False``, never. In no case inside
    ``torch.compile``, ``torch.jit`` tracing or ``torch.func.vmap`` batching, where the value
    cannot be read (``values_readable``). A value that is not read is not checked: out of
    range, it gives NaN where it is used, never a plausible number."""
    if check_labels is False or torch.jit.is_tracing() or not values_readable(value):
        return False
    return check_labels is True or value.device.type == "cpu"


def concrete_scalar(
    fn: object, name: str, value: object, *, optional: bool = False, check_labels=None
) -> object:
    """A scalar option (smoothing, normalizer, z_loss, ...) as a Python float for checking: a
    number, or a 0-d tensor of a real dtype whose value the host reads
    (``reads_values``: a CPU tensor, unless ``check_labels`` says otherwise). Any other tensor
    passes through unread: out of range, it gives NaN. None is kept where ``optional``;
    anything else (None, a string, a tuple, a bool) raises TypeError."""
    if value is None and optional:
        return None
    if lsspec.is_number(value):
        return float(value)
    given = value  # named as given in errors (np.True_, not its tensor)
    try:
        value = numpy_as_tensor(value)
    except (TypeError, ValueError, RuntimeError):  # a NumPy array of strings or objects
        raise lsspec.scalar_type_error(fn, name, given) from None
    if not isinstance(value, torch.Tensor) or value.dtype == torch.bool or value.is_complex():
        raise lsspec.scalar_type_error(fn, name, given)
    if value.dim() != 0:  # a (1,)-shaped option would broadcast the rows to (1, N)
        raise lsspec.shape_error(fn, name, tuple(value.shape), "a scalar shape ()")
    if reads_values(value, check_labels):
        return float(value.detach().reshape(()))
    return value


_FLOAT64_ULP = torch.finfo(torch.float64).eps


def _ulp_of_one(value: object) -> float:
    """The spacing of ``value``'s own float dtype at 1.0 (float64's for a Python number)."""
    value = numpy_as_tensor(value)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return torch.finfo(value.dtype).eps
    return _FLOAT64_ULP


def concrete_smoothing(
    fn: object, value: object, name: str = "smoothing", check_labels=None
) -> object:
    """A concrete smoothing (a number, or a tensor ``reads_values`` reads: see
    ``concrete_scalar``) as a float, snapped into [0, 1] when it is only rounding outside it
    (``lsspec.UNIT_INTERVAL_ULPS``); other tensors pass through unread."""
    concrete = concrete_scalar(fn, name, value, check_labels=check_labels)
    if lsspec.is_number(concrete):
        return lsspec.snap_to_unit_interval(concrete, _ulp_of_one(value))
    return concrete


def check_smoothing_below_one(fn: object, name: str, value: object, check_labels=None) -> None:
    """The smoothing of a loss whose library asserts it is below 1 (timm, Megatron):
    ``check_labels`` checked, then a value ``concrete_scalar`` reads held to [0, 1) (a value
    it does not read is held to [0, 1] by the loss, NaN outside)."""
    lsspec.check_check_labels(fn, check_labels)
    value = concrete_scalar(fn, name, value, check_labels=check_labels)
    lsspec.check_positive_below_one(fn, name, value)


def _in_dtype(value: float, dtype: torch.dtype) -> float | None:
    """The Python float ``value`` rounded to ``dtype`` (float32 or float64) on the host, as
    ``torch.full((), value, dtype=dtype)`` rounds it; None where that is not a finite float32
    or float64 value (then the caller takes the tensor route)."""
    if dtype == torch.float64:
        return value if math.isfinite(value) else None
    if dtype != torch.float32 or not math.isfinite(value):
        return None
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: inf there
        return None


def smoothing_tensor(value, dtype, device) -> torch.Tensor:
    """``value`` as a 0-d ``dtype`` tensor on ``device``, clamped into [0, 1] where it lies
    within the rounding slack outside it (a schedule that ends at 0); farther out it stays out
    of range, and the rows it reaches are NaN.

    A Python number is rounded and clamped on the host, with the same arithmetic the tensor
    route does on the device (every step exact: the difference of a float and 0 or 1 near it),
    and filled in one op: the same value, bit for bit, without ten small device ops per call."""
    slack = lsspec.unit_interval_slack(_ulp_of_one(value))
    # Under torch.compile the tensor route: a float made symbolic (dynamic=True, or a value
    # that changes between calls) cannot be rounded on the host, and the graph fuses it anyway.
    if lsspec.is_number(value) and not torch.compiler.is_compiling():
        rounded, slack_in_dtype = _in_dtype(float(value), dtype), _in_dtype(slack, dtype)
        if rounded is not None and slack_in_dtype is not None:
            snapped = min(max(rounded, 0.0), 1.0)  # -0.0 stays -0.0, as torch.clamp keeps it
            if rounded != snapped and abs(rounded - snapped) <= slack_in_dtype:
                rounded = snapped
            return torch.full((), rounded, dtype=dtype, device=device)
    eps = device_scalar(value, dtype, device)
    snapped = eps.clamp(0, 1)
    rounding = (eps != snapped) & ((eps - snapped).abs() <= slack)
    # The snap is rounding, not a change of value: its derivative is 1 (straight through), as
    # lsjax's, so a learned smoothing just outside [0, 1] keeps its derivative.
    return torch.where(rounding, eps + (snapped - eps).detach(), eps)


def z_loss_tensor(value, dtype, device) -> torch.Tensor:
    """``z_loss`` as a 0-d ``dtype`` tensor on ``device``, NaN where it is negative or not finite
    (a value the checks could not read): the rows it reaches are NaN, never a plausible
    number. A Python number that is finite and >= 0 in ``dtype`` is filled in one op (the
    same value)."""
    if lsspec.is_number(value) and not torch.compiler.is_compiling():  # as smoothing_tensor
        rounded = _in_dtype(float(value), dtype)
        if rounded is not None and rounded >= 0:
            return torch.full((), rounded, dtype=dtype, device=device)
    z = device_scalar(value, dtype, device)
    return torch.where((z >= 0) & torch.isfinite(z), z, torch.nan)


def tensor_option(fn, name, value, device, reference: str = "logits"):
    """``weight``, ``where``, ``class_mask`` or ``pos_weight`` as a tensor: a Python list or
    number (or another array-like) becomes one on ``device``, as lsjax accepts any array-like; a
    tensor is kept as it is. Python floats become float64, the precision they hold
    (``torch.as_tensor`` would round them to float32, torch's default dtype, and a float64 loss
    would then differ from one given the same weights as a float64 tensor); the loss casts a
    weight to its compute dtype. A NumPy array keeps its dtype. A complex one is a TypeError
    (``lsspec.check_real``), and so is one that requires grad where autograd records: these
    options are constants, and the loss would drop their derivative silently
    (``lsspec.differentiated_constant_error``; torch's ``F.cross_entropy`` refuses such a
    weight too). A tensor on another device than ``device`` (that of the input named
    ``reference``) is a ValueError (:func:`same_device`); ``device=None`` checks none."""
    if value is None or isinstance(value, torch.Tensor):
        lsspec.check_real(fn, name, value)
        if value is not None and value.requires_grad and torch.is_grad_enabled():
            raise lsspec.differentiated_constant_error(fn, name)
        if value is not None and device is not None:
            same_device(fn, reference, device, **{name: value})
        return value
    try:
        tensor = torch.as_tensor(value, device=device)
        if tensor.is_floating_point() and not hasattr(value, "dtype"):
            tensor = torch.as_tensor(value, dtype=torch.float64, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        fn, arg = lsspec.names(fn)
        raise TypeError(
            f"{fn}: `{arg(name)}` must be a tensor or a list of numbers; got {value!r} ({error})."
        ) from None
    lsspec.check_real(fn, name, tensor)
    return tensor


def class_axis(fn, axis, ndim, shape) -> int:
    """The class axis as a non-negative int. ``axis=None`` (the default) is the last axis for
    1-D and 2-D logits, where torch's class axis (0 of ``(C,)``, 1 of ``(N, C)``) is the last
    one too; with 3 or more dimensions it must be given (``lsspec.axis_required_error``)."""
    if axis is None:
        if ndim >= 3:
            raise lsspec.axis_required_error(fn, shape)
        axis = -1
    return lsspec.check_axis(fn, axis, ndim)


def index_labels(labels: torch.Tensor) -> torch.Tensor:
    """Integer ``labels`` (already checked) as int64, the dtype torch indexes with.

    In a narrower dtype ``gather`` refuses the labels, ``weight[labels]`` reads uint8 labels as
    a boolean mask, uint16 has no ``<`` on the CPU, and a comparison with a Python int is made
    in the labels' dtype (uint8: ``-100`` is 156, ``K = 259`` is 3). Widening before any of
    those makes narrow labels give exactly what int64 labels give. A no-op for int64.
    """
    return labels.to(torch.int64)


def at_labels(table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``table[labels]``: the rows of ``table`` (a per-class vector, or a ``(K, D)`` matrix) at
    integer ``labels`` of any shape, 0-d included, as one ``index_select``.

    Indexing with a 0-d tensor reads it on the host (``.item()``), which ``torch.func.vmap``
    refuses: per-example gradients, ``vmap(grad(loss))`` over ``(K,)`` logits and 0-d labels,
    would fail in backward. ``index_select`` takes the labels as a tensor in every shape.
    """
    picked = table.index_select(0, labels.reshape(-1))
    return picked.reshape(labels.shape + table.shape[1:])


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (without importing that
    module: a DTensor cannot exist unless it was imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def values_readable(tensor: torch.Tensor) -> bool:
    """Whether the host can read ``tensor``'s values: not inside ``torch.compile`` (the read
    would break the graph) and not batched by ``torch.func.vmap`` (a vmapped value cannot be
    read; per-sample-gradient code vmaps over the labels)."""
    return not torch.compiler.is_compiling() and not vmapped(tensor)


def vmapped(tensor: torch.Tensor) -> bool:
    """Whether ``torch.func.vmap`` batches ``tensor``, under any other transform too."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):  # e.g. vmap(grad(loss)): unwrap grad's
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


def differentiated_again(*tensors: torch.Tensor) -> bool:
    """Whether a backward's result will itself be differentiated, so that it must be built from
    differentiable ops on the inputs (statistics such as the lse recomputed from them, nothing
    written in place): a graph is being recorded (``create_graph=True``), a ``torch.func``
    transform is active (``hessian``, ``jacfwd`` over ``jacrev``), or an input carries a
    ``torch.autograd.forward_ad`` tangent (forward over reverse)."""
    return (
        torch.is_grad_enabled()
        or torch._C._are_functorch_transforms_active()
        or any(fwAD.unpack_dual(t).tangent is not None for t in tensors if t is not None)
    )


def traced_functorch() -> bool:
    """Whether ``torch.compile`` traces a ``torch.func`` transform (``compile(func.grad(f))``).
    Dynamo may then inline an autograd.Function's ``forward`` and differentiate its ops by
    their own rules, dropping the Function's ``backward`` (pytorch#193279, in torch 2.13; it
    did for the fused head whenever its first input was not differentiated): a forward that
    ran under ``no_grad`` gave an exactly zero gradient."""
    return torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def autocast_off(device_type: str):
    """A context in which ``torch.autocast`` leaves this device type's operations alone.

    The losses compute in their own dtype (``compute_dtype``) inside and out of an autocast
    region, as ``F.cross_entropy`` does (it is on autocast's float32 list): a ``torch.matmul``
    of the closed form (the support sum ``sum_c w_c x_c``) would otherwise run in bf16/fp16."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def with_forward_mode(function: type, with_jvp: type) -> type:
    """The autograd.Function to apply: ``with_jvp`` (``function`` plus a ``jvp`` for forward
    mode), except while ``torch.compile`` traces the call, where Dynamo refuses (graph-breaks
    on) a Function that defines ``jvp`` and gets ``function``, the same in every other way."""
    return function if torch.compiler.is_compiling() else with_jvp


def check_label_range(
    fn, labels, counted, num_classes, ignore_index, class_mask=None, check_labels=None
):
    """Counted labels out of range (or of a masked class) raise, where ``reads_values`` reads
    them (by ``check_labels``: on the CPU by default). Where they are not read (on an
    accelerator by default, with ``check_labels=False``, inside ``torch.compile``, batched
    under ``torch.func.vmap``) such a row's loss and gradient are NaN instead."""
    if not (reads_values(labels, check_labels) and reads_values(counted, check_labels)):
        return
    bad = counted & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise lsspec.label_range_error(fn, labels[bad].tolist(), num_classes, ignore_index)
    if class_mask is not None and reads_values(class_mask, check_labels):
        masked = counted & ~class_mask[labels.clamp(0, num_classes - 1)]
        if bool(masked.any()):
            raise lsspec.masked_label_error(fn, labels[masked].tolist())


def check_class_mask_support(fn, class_mask, convention, pad_index, check_labels=None) -> None:
    """A ``class_mask`` that ``reads_values`` reads must leave the convention a class to smooth
    over (``lsspec.check_class_mask_support``); one that is not read and leaves none gives
    NaN: the gradient of every counted row, and its loss where the smoothing is > 0."""
    if class_mask is not None and reads_values(class_mask, check_labels):
        lsspec.check_class_mask_support(fn, class_mask.tolist(), convention, pad_index)


def check_class_tensors(fn, tensors: dict, convention, pad_index, check_labels=None) -> None:
    """The per-class tensors (a class weight, ``class_mask``), where given, as far as they need
    no input, for a module or a loss built before its first call: one dimension, a class mask
    of dtype bool that leaves a class to smooth over (their length is checked against the
    logits' classes in the call)."""
    for name, value in tensors.items():
        if value is None:
            continue
        if value.ndim != 1:
            raise lsspec.shape_error(fn, name, tuple(value.shape), "one dimension, (K,)")
        if name == "class_mask":
            check_bool(fn, name, value)
            check_class_mask_support(fn, value, convention, pad_index, check_labels)


def device_scalar(value, dtype, device) -> torch.Tensor:
    """A 0-d tensor of ``value`` on ``device``: a Python number is filled there (on a GPU, a
    host-to-device copy from pageable memory would wait for the stream), a tensor is cast."""
    value = numpy_as_tensor(value)
    if isinstance(value, torch.Tensor):
        return value.to(dtype=dtype, device=device)
    return torch.full((), value, dtype=dtype, device=device)


def _sum_scale(loss: torch.Tensor) -> float | torch.Tensor:
    """``lsspec.sum_scale(loss.numel())``, the power of two the rows are scaled by before the
    mean's sum. Under ``torch.compile`` the row count may be symbolic (a dynamic shape: a new
    sequence length in every batch), and ``int()`` of it would make Dynamo specialize the graph
    to that count and recompile for the next one; so when compiling, the same power of two is
    taken in the graph (``frexp`` of the count: the same exponent for any count below 2**24,
    and above it never a larger scale, as rounding can only move the count up to a power of
    two)."""
    count = loss.numel()
    if not torch.compiler.is_compiling():
        return lsspec.sum_scale(count)
    exponent = torch.frexp(torch.full((), count, dtype=torch.float32, device=loss.device))[1]
    return torch.ldexp(torch.ones((), dtype=loss.dtype, device=loss.device), -(exponent + 1))


def reduce(loss, row_weight, reduction: str, normalizer=None) -> torch.Tensor:
    """``"none"``: ``loss``; ``"sum"``: its sum; ``"mean"``: the sum over ``sum(row_weight)`` (0
    when that is 0), or over ``normalizer`` when given."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    # The mean of rows near the float32 maximum is finite while their sum is not: each row is
    # scaled by a power of two before it is added and the quotient scaled back, which is the
    # unscaled quotient bit for bit wherever that one is finite (lsspec.sum_scale).
    scale = _sum_scale(loss)
    total = (loss * scale).sum()
    if normalizer is not None:
        # A normalizer that was not read (a tensor on an accelerator, inside torch.compile) and
        # is not a finite number > 0 gives NaN; a concrete one was checked.
        denominator = device_scalar(normalizer, loss.dtype, loss.device)
        valid = (denominator > 0) & torch.isfinite(denominator)
        return torch.where(valid, total / torch.where(valid, denominator, 1.0) / scale, torch.nan)
    denominator = row_weight.sum()
    nothing_counts = denominator == 0
    return torch.where(
        nothing_counts, 0.0, total / torch.where(nothing_counts, 1.0, denominator) / scale
    )


def check_label_options(
    fn, num_classes: int | None, options: lsspec.LabelOptions, check_labels=None, **more
) -> None:
    """``lsspec.check_options`` of a loss with integer labels: its ``options``,
    ``check_labels`` and ``more`` (the dense loss's ``normalizer``, ``kl``, ...). A smoothing
    given as a number, or as a tensor that ``reads_values`` reads, is checked; any other
    tensor passes."""
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


def not_a_tensor(fn, name: str, value: object) -> TypeError:
    """The error for an input that must be a ``torch.Tensor`` and is something else (a NumPy
    array, a list, None), naming what it is."""
    fn, arg = lsspec.names(fn)
    hint = " (torch.as_tensor(...) makes one)" if hasattr(value, "__array__") else ""
    kind = type(value)
    got = kind.__qualname__
    if kind.__module__ != "builtins":
        got = f"{kind.__module__}.{got}"
    return TypeError(f"{fn}: `{arg(name)}` must be a torch.Tensor{hint}; got {got}.")


def tensors(fn, **inputs: object) -> None:
    """Each named input is a ``torch.Tensor`` (else :func:`not_a_tensor`)."""
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            raise not_a_tensor(fn, name, value)


def floating(fn, **inputs: torch.Tensor) -> None:
    """Each named input is a tensor of a floating dtype of 16 bits or more (else a TypeError
    naming it): float8 has no arithmetic of its own to accumulate a loss in, and torch's
    losses refuse it too."""
    tensors(fn, **inputs)
    for name, value in inputs.items():
        if not value.is_floating_point():
            allowed = "a floating dtype (a float torch.Tensor)"
            raise lsspec.dtype_error(fn, name, value.dtype, allowed)
        if value.dtype.itemsize < 2:
            raise lsspec.dtype_error(fn, name, value.dtype, lsspec.WIDE_FLOATS)


def integer_labels(fn, labels: torch.Tensor, name: str = "labels") -> torch.Tensor:
    """``labels``, a tensor of an integer dtype (not bool, float or complex: else a TypeError),
    widened by :func:`index_labels` before any comparison with ``ignore_index``/``pad_index``."""
    tensors(fn, **{name: labels})
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise lsspec.dtype_error(fn, name, labels.dtype, "an integer dtype (an int torch.Tensor)")
    return index_labels(labels)


def same_device(fn, reference: str, device: torch.device, **inputs: torch.Tensor) -> None:
    """Each named tensor is on ``device``, the device of the input named ``reference`` (else
    ``lsspec.device_error``, naming both): torch's own error would come from inside the loss,
    naming neither, and a Triton kernel would be handed a pointer it cannot read. A 0-d CPU
    tensor other than the labels is a scalar that torch's ops take on any device, as torch's
    losses do, and passes."""
    for name, value in inputs.items():
        if value.device == device:
            continue
        if name not in _LABEL_NAMES and value.ndim == 0 and value.device.type == "cpu":
            continue
        raise lsspec.device_error(fn, name, value.device, reference, device)


_LABEL_NAMES = ("labels", "targets", "target", "y_true")


def check_bool(fn, name: str, value: torch.Tensor | None) -> None:
    """A mask option (``where``, ``class_mask``), when given, has dtype bool."""
    if value is not None and value.dtype != torch.bool:
        raise lsspec.dtype_error(fn, name, value.dtype, "dtype bool")


_INT64 = torch.iinfo(torch.int64)


def counted_rows(labels, ignore_index=None, pad_index=None, where=None) -> torch.Tensor:
    """The rows that count: label not ``ignore_index``, not ``pad_index``, and ``where`` True.
    The first comparison starts the mask (one op fewer than a mask of ones it is and-ed
    with); without one, a fresh mask of ones, never the caller's ``where`` itself."""
    counted = None
    for value in (ignore_index, pad_index):
        # An index int64 (the labels' dtype, index_labels) cannot hold is no label's value and
        # matches none, as in lsjax; comparing with it would overflow.
        if value is not None and _INT64.min <= value <= _INT64.max:
            differs = labels != value
            counted = differs if counted is None else counted & differs
    if counted is None:
        counted = torch.ones_like(labels, dtype=torch.bool)
    if where is not None:
        counted = counted & where
    return counted
