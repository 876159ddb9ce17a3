"""Framework-free specification shared by ``lsjax`` and ``lstorch``.

This package holds what does not depend on an array library: the names of the conventions and
reductions, the size of each convention's smoothing support, and the checks of plain Python
options with their error messages. Keeping them here means the JAX and the PyTorch functions
reject the same bad input with the same words, while each framework package still installs and
imports alone (this module imports nothing but the standard library). ``lsspec.calibration``
holds the calibration metrics, which need NumPy only; users reach them as ``lsjax.calibration``
or ``lstorch.calibration``.

``lsspec`` stays a top-level package, not a private subpackage of one framework package: both
``lsjax`` and ``lstorch`` import it, and each installs without the other, so it cannot live
inside either; a private home would need a fourth top-level package anyway. The ``ls`` prefix
it shares with ``lsjax`` and ``lstorch`` marks it as this distribution's.

The conventions (SEMANTICS.md §1), with ``K`` classes and target ``y``:

============== ================================ ====================== ==============
convention     support of the smoothing mass    mass on each other     mass on ``y``
============== ================================ ====================== ==============
uniform        all K classes                    eps / K                1 - eps + eps/K
others         every class but y                eps / (K - 1)          1 - eps
others_but_pad every class but y and pad_index  eps / (K - 2)          1 - eps
============== ================================ ====================== ==============
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import NamedTuple

DISTRIBUTION = "label-smoothing-parity"


def is_missing(error: ModuleNotFoundError, modules: tuple[str, ...]) -> bool:
    """Whether ``error`` says that one of ``modules`` (or a submodule of one) is not installed,
    rather than that something inside an installed one failed to import."""
    return (error.name or "").partition(".")[0] in modules


def install_hint(what: str, needs: str, extra: str, error: ModuleNotFoundError) -> str:
    """The message of the ImportError raised when ``what`` lacks an optional dependency (the
    module ``error`` names): it names the extra of this distribution that installs it."""
    missing = (error.name or "").partition(".")[0]
    return (
        f"{what} needs {needs}, and {missing!r} is not installed; install the [{extra}] extra: "
        f"pip install '{DISTRIBUTION}[{extra}]'"
    )


CONVENTIONS = ("uniform", "others", "others_but_pad")
REDUCTIONS = ("none", "sum", "mean")

# Smallest number of classes for which each convention's support is non-empty.
MIN_CLASSES = {"uniform": 1, "others": 2, "others_but_pad": 3}


def support_size(convention: str, num_classes: int) -> int:
    """Number of classes that share the smoothing mass ``eps`` in one row."""
    return num_classes - {"uniform": 0, "others": 1, "others_but_pad": 2}[convention]


def sum_scale(num_classes: int) -> float:
    """The power of two ``2**-k`` every term of a row's support sum is multiplied by before it
    is added: ``k = bit_length(K) + 1``, so that ``K`` terms of size up to ``2 * float max``
    (``x_c - max`` spans at most that) add up to at most ``float max``. A power of two commutes
    with rounding, so the scaled sum is the unscaled one times ``2**-k`` exactly, bit for bit,
    wherever the unscaled one does not overflow; where it would (logits near the float32 maximum,
    ``K`` of them), the loss, which divides the sum by ``|S|``, stays finite."""
    return 2.0 ** -(int(num_classes).bit_length() + 1)


class Caller(NamedTuple):
    """The function or module the user called, and its names for the arguments it hands on.

    Errors name what the user called, in the user's words: ``lsjax.cross_entropy(...,
    label_smoothing=2.0)`` says ``cross_entropy: `label_smoothing` ...``, not the name of the
    function it hands the work to. A public function that hands its arguments on passes
    ``_caller=caller(...)`` to the one it calls (a plain keyword, so it works under ``jit``,
    ``torch.compile`` and ``vmap``); every check here takes ``fn``, a Caller or a plain name.
    ``renamed`` maps the inner function's argument names to the caller's, e.g.
    ``(("smoothing", "label_smoothing"),)``.
    """

    fn: str
    renamed: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.fn

    def arg(self, name: str) -> str:
        """The caller's name for the inner argument ``name``."""
        for inner, outer in self.renamed:
            if inner == name:
                return outer
        return name


def caller(fn: str, given: Caller | None = None, **renamed: str) -> Caller:
    """The Caller to hand on from function ``fn`` (whose own caller is ``given``, None when the
    user called ``fn`` itself), naming the inner arguments ``renamed`` (inner name = ``fn``'s
    name) and, through ``given``, in the words of whoever the user called."""
    if given is None:
        return Caller(fn, tuple(renamed.items()))
    inner = sorted(set(renamed) | {name for name, _ in given.renamed})
    return Caller(given.fn, tuple((name, given.arg(renamed.get(name, name))) for name in inner))


def names(fn: str | Caller) -> tuple[str, Callable[[str], str]]:
    """(the called function's name, the map from inner argument names to the caller's)."""
    if isinstance(fn, Caller):
        return fn.fn, fn.arg
    return str(fn), lambda name: name


def possessive(name: str) -> str:
    """``logits'``, ``input's``: the owner of a shape in a message."""
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def check_choice(fn: str | Caller, name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        fn, arg = names(fn)
        raise ValueError(f"{fn}: `{arg(name)}` must be one of {list(allowed)}; got {value!r}.")
    return value


CHECK_LABELS = (None, True, False)


def check_check_labels(fn: str | Caller, check_labels: object) -> bool | None:
    """``check_labels`` is None (check where it is free: values on the host), True (check on
    any device, waiting for it) or False (never read a value to check it); anything else
    raises, naming the allowed values."""
    if not any(check_labels is allowed for allowed in CHECK_LABELS):
        fn, arg = names(fn)
        raise ValueError(
            f"{fn}: `{arg('check_labels')}` must be one of {list(CHECK_LABELS)}; got "
            f"{check_labels!r}."
        )
    return check_labels


def is_number(value: object) -> bool:
    """A Python or NumPy int or float (not a bool: ``True`` is no smoothing). Other real types
    (``fractions.Fraction``) are not: neither framework takes one as a scalar operand."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral) or not isinstance(value, numbers.Rational)


def is_finite(value: float) -> bool:
    """``math.isfinite(value)`` by comparisons only (NaN fails both): a float that
    ``torch.compile(dynamic=True)`` made symbolic compares (Dynamo guards on the result), but
    cannot go through ``math.isfinite``."""
    return -math.inf < value < math.inf


def is_index(value: object) -> bool:
    """An int (a NumPy integer too), and not a bool: ``True`` is no class index."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def scalar_type_error(fn: str | Caller, name: str, value: object) -> TypeError:
    """A scalar option (smoothing, normalizer, z_loss, ...) that is neither a number
    (:func:`is_number`) nor a 0-d array or tensor of a real dtype: None, a string, a tuple, a
    bool, a ``Fraction``."""
    fn, arg = names(fn)
    return TypeError(
        f"{fn}: `{arg(name)}` must be a real number (a Python or NumPy int or float) or a 0-d "
        f"array/tensor of a real dtype; got "
        f"{value!r} ({type(value).__name__})."
    )


def axis_required_error(fn: str | Caller, shape: tuple) -> ValueError:
    """lstorch, logits with 3+ dimensions and no ``axis``: torch's layout puts the classes on
    axis 1, JAX's (and this library's 2-D default) on the last axis; guessing would silently
    give another loss where both sizes agree."""
    fn, arg = names(fn)
    return ValueError(
        f"{fn}: `{arg('axis')}` must be given for logits with 3 or more dimensions; got shape "
        f"{tuple(shape)} and no `{arg('axis')}`. Pass {arg('axis')}=1 for torch's layout "
        f"(N, C, d1, ...), as torch.nn.CrossEntropyLoss reads it, or {arg('axis')}=-1 for the "
        "classes last (..., C), as JAX/optax and language models' (batch, time, vocab) logits."
    )


# How far outside [0, 1] a smoothing value may lie and still be taken as in range: the rounding of
# an in-range value, such as a schedule that ends at 0 (optax.linear_schedule(0.2, 0.0, 10)(10)
# is -2.98e-9 in float32) or 0.3 - 0.1 * 3 (-5.6e-17). Within UNIT_INTERVAL_ULPS ulps of 1.0, in
# the option's own dtype (float64 for a Python number), a value is clamped into the interval;
# farther out it is an error when concrete and gives NaN when traced.
UNIT_INTERVAL_ULPS = 4


def unit_interval_slack(ulp_of_one: float) -> float:
    """How far outside [0, 1] a value with this ulp (at 1.0) still counts as rounding."""
    return UNIT_INTERVAL_ULPS * ulp_of_one


def snap_to_unit_interval(value: float, ulp_of_one: float) -> float:
    """``value`` clamped into [0, 1] when it lies within the rounding slack outside it."""
    slack = unit_interval_slack(ulp_of_one)
    if -slack <= value < 0.0:
        return 0.0
    if 1.0 < value <= 1.0 + slack:
        return 1.0
    return value


def check_smoothing(fn: str | Caller, smoothing: object, name: str = "smoothing") -> None:
    """Raise unless a concrete ``smoothing`` (already snapped by ``snap_to_unit_interval``) lies
    in [0, 1]. A value that is not concrete (traced, or a tensor on an accelerator) is left
    alone: out of range, it gives NaN."""
    if is_number(smoothing) and not (0.0 <= float(smoothing) <= 1.0):
        fn, arg = names(fn)
        raise ValueError(
            f"{fn}: `{arg(name)}` must be in [0, 1]; got {smoothing!r} (values within "
            f"{UNIT_INTERVAL_ULPS} ulps outside it, in the option's dtype, count as rounding and "
            "are clamped)."
        )


def check_axis(fn: str | Caller, axis: object, ndim: int, name: str = "axis") -> int:
    """Return ``axis`` as a non-negative int, or raise naming the allowed range."""
    if not is_index(axis) or not -ndim <= axis < ndim:
        fn, arg = names(fn)
        raise ValueError(
            f"{fn}: `{arg(name)}` must be an int in [{-ndim}, {ndim - 1}] for logits with {ndim} "
            f"dimension(s); got {axis!r}."
        )
    return int(axis) % ndim


class LabelOptions(NamedTuple):
    """The options every loss with integer labels takes, in the order of its keywords, as the
    user gave them: checked by :func:`check_options`; ``ignore_index`` and ``pad_index`` decide
    which rows count."""

    smoothing: object
    convention: str
    ignore_index: object
    pad_index: object
    reduction: str

    @classmethod
    def of(cls, options: Mapping[str, object]) -> LabelOptions:
        """The label options among ``options``, keyword by keyword (e.g. a module's)."""
        return cls(*(options[name] for name in cls._fields))


def check_options(
    fn: str | Caller,
    *,
    num_classes: int | None,
    smoothing: object,
    convention: str,
    reduction: str,
    pad_index: object,
    ignore_index: object,
    normalizer: object = None,
    kl: bool = False,
    has_weight: bool = False,
    from_log_probs: bool = False,
    check_labels: object = None,
) -> None:
    """Check every plain option of ``smoothed_cross_entropy`` (the same in both frameworks).

    The last four default to "not used", for the losses that have no such option (the fused and
    the vocabulary-parallel losses). ``smoothing`` and ``normalizer`` are checked when they are
    numbers (concrete values); one that is not concrete gives NaN when out of range.
    ``num_classes=None`` (a module's constructor, before any input) skips what needs it."""
    check_choice(fn, "convention", convention, CONVENTIONS)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    check_check_labels(fn, check_labels)
    check_smoothing(fn, smoothing)
    check_flags(fn, kl=kl, from_log_probs=from_log_probs)  # every combination is allowed
    if normalizer is not None:
        check_divisor(fn, "normalizer", normalizer)
    fn, arg = names(fn)
    minimum = MIN_CLASSES[convention]
    if num_classes is not None and num_classes < minimum:
        raise ValueError(
            f"{fn}: {arg('convention')}={convention!r} needs at least {minimum} classes along "
            f"the class axis; got {num_classes}."
        )
    if convention == "others_but_pad":
        if num_classes is None and not (is_index(pad_index) and pad_index >= 0):
            raise ValueError(
                f"{fn}: {arg('convention')}='others_but_pad' needs `{arg('pad_index')}`, an int "
                f">= 0 (the pad column); got {pad_index!r}."
            )
        if num_classes is not None and (
            not is_index(pad_index) or not 0 <= pad_index < num_classes
        ):
            raise ValueError(
                f"{fn}: {arg('convention')}='others_but_pad' needs `{arg('pad_index')}`, an int "
                f"in [0, {num_classes - 1}]; got {pad_index!r}."
            )
    elif pad_index is not None:
        raise ValueError(
            f"{fn}: `{arg('pad_index')}` is only used by {arg('convention')}='others_but_pad'; "
            f"got {arg('pad_index')}={pad_index!r} with {arg('convention')}={convention!r}."
        )
    if ignore_index is not None and not is_index(ignore_index):
        raise ValueError(
            f"{fn}: `{arg('ignore_index')}` must be an int or None; got {ignore_index!r}."
        )
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(
                f"{fn}: `{arg('normalizer')}` replaces the denominator of "
                f"{arg('reduction')}='mean'; got {arg('normalizer')}={normalizer!r} with "
                f"{arg('reduction')}={reduction!r}."
            )
    if kl and has_weight:
        raise ValueError(
            f"{fn}: {arg('kl')}=True is not defined with class `{arg('weight')}` (weights make "
            f"the target a non-distribution, so it has no entropy to subtract); use "
            f"{arg('kl')}=False."
        )


def shape_error(fn: str | Caller, name: str, got: tuple, allowed: str) -> ValueError:
    fn, arg = names(fn)
    return ValueError(f"{fn}: `{arg(name)}` must have {allowed}; got shape {tuple(got)}.")


# The floating dtypes the losses take (float8 is refused: lsjax and lstorch ``floating``).
WIDE_FLOATS = "a floating dtype of 16 bits or more (float16, bfloat16, float32, float64)"


def dtype_error(fn: str | Caller, name: str, got: object, allowed: str) -> TypeError:
    fn, arg = names(fn)
    return TypeError(f"{fn}: `{arg(name)}` must have {allowed}; got dtype {got}.")


def check_real(fn: str | Caller, name: str, value: object) -> None:
    """A numeric option (a weight, a mask, soft labels) of either framework, when given, is not
    complex: casting it to the loss's real dtype would drop its imaginary part silently (torch's
    ``F.cross_entropy`` refuses a complex ``weight``)."""
    dtype = getattr(value, "dtype", None)
    flag = getattr(dtype, "is_complex", None)  # a torch.dtype; a NumPy/JAX dtype has a kind
    if flag is True or (flag is None and getattr(dtype, "kind", None) == "c"):
        raise dtype_error(fn, name, dtype, "a real (not complex) dtype")


def device_error(
    fn: str | Caller, name: str, got: object, reference: str, expected: object
) -> ValueError:
    """A tensor on another device than the input the loss runs on (``reference``: the logits,
    the hidden states): PyTorch's own error would come from inside the loss and name neither
    the function nor the argument."""
    fn, arg = names(fn)
    return ValueError(
        f"{fn}: `{arg(name)}` must be on the device of `{arg(reference)}` ({expected}); got a "
        f"tensor on {got}. Move it there (`.to({arg(reference)}.device)`)."
    )


def differentiated_constant_error(fn: str | Caller, name: str) -> TypeError:
    """A class weight (``weight``, ``class_weight``, ``pos_weight``) that is being
    differentiated: the losses take it as a constant, and a silent zero (or missing) derivative
    would be a plausible wrong number. torch's ``F.cross_entropy`` refuses it too."""
    fn, arg = names(fn)
    return TypeError(
        f"{fn}: `{arg(name)}` is a constant of the loss (its derivative is not computed); got "
        f"a `{arg(name)}` that is being differentiated (requires_grad in PyTorch, an input of "
        "jax.grad or jax.jvp in JAX). Pass it detached (tensor.detach(), "
        "jax.lax.stop_gradient)."
    )


def check_some_classes(fn: str | Caller, num_classes: int) -> None:
    """A loss over soft targets has at least one class: over none, the smoothing's ``eps / K``
    is 0/0 and every row NaN."""
    if num_classes < 1:
        fn, arg = names(fn)
        raise ValueError(
            f"{fn}: `{arg('logits')}` must have at least 1 class along the class axis; got "
            f"{num_classes}."
        )


def check_causal_shift(fn: str | Caller, logits: tuple, labels: tuple) -> None:
    """Hugging Face's ``shift_labels=True`` (``logits[..., :-1, :]``, ``labels[..., 1:]``)
    needs a time axis before the classes in ``logits`` and takes ``labels`` as ``(..., time)``:
    a trailing axis of 1 (which HF accepts without the shift) would be shifted instead of
    time."""
    if len(logits) < 2:
        raise shape_error(fn, "logits", logits, "a time axis before the class axis for "
                          "shift_labels=True (at least 2 dimensions)")  # fmt: skip
    if len(labels) == len(logits) and labels[-1] == 1:
        raise shape_error(fn, "labels", labels, "no trailing axis of 1 with shift_labels=True, "
                          "which shifts their last axis (time)")  # fmt: skip


def check_has_class_axis(fn: str | Caller, name: str, shape: tuple) -> None:
    """An input with a class axis has at least one dimension (a 0-d one has no class axis)."""
    if len(shape) < 1:
        raise shape_error(fn, name, shape, "at least one dimension (a class axis)")


def row_shape(shape: tuple, axis: int) -> tuple:
    """``shape`` without the class axis ``axis`` (a non-negative int): the shape of a row mask."""
    shape = tuple(shape)
    return shape[:axis] + shape[axis + 1 :]


def check_same_shape(fn: str | Caller, name: str, got: tuple, logits_shape: tuple) -> None:
    """``name`` (labels of the binary loss, targets of the soft one) has the logits' shape."""
    if tuple(got) != tuple(logits_shape):
        _, arg = names(fn)
        raise shape_error(
            fn, name, got, f"the {possessive(arg('logits'))} shape {tuple(logits_shape)}"
        )


def check_row_options_shapes(
    fn: str | Caller,
    num_classes: int,
    rows: tuple,
    *,
    weight: object = None,
    where: object = None,
    class_mask: object = None,
    has_labels: bool = True,
) -> None:
    """The shapes of the per-class options (``weight``, ``class_mask``: ``(K,)``) and of the row
    mask ``where`` (``rows``, the logits' shape without the class axis): each an array of either
    framework (its ``.shape`` is read) or None where the option is not given. ``has_labels``:
    the loss takes integer labels, whose shape ``rows`` is."""
    _, arg = names(fn)
    for name, value in (("weight", weight), ("class_mask", class_mask)):
        if value is not None and tuple(value.shape) != (num_classes,):
            raise shape_error(fn, name, tuple(value.shape), f"shape ({num_classes},)")
    if where is not None and tuple(where.shape) != tuple(rows):
        if has_labels:
            allowed = f"the {possessive(arg('labels'))} shape {tuple(rows)}"
        else:
            allowed = f"the {possessive(arg('logits'))} shape without the class axis, {tuple(rows)}"
        raise shape_error(fn, "where", tuple(where.shape), allowed)


def check_labels_shape(fn: str | Caller, labels: tuple, rows: tuple) -> None:
    """Integer labels have the logits' shape without the class axis, ``rows``."""
    if tuple(labels) != tuple(rows):
        _, arg = names(fn)
        raise shape_error(
            fn,
            "labels",
            labels,
            f"the {possessive(arg('logits'))} shape without the class axis, {tuple(rows)}",
        )


def label_range_error(
    fn: str | Caller, bad: list[int], num_classes: int, ignore_index: object
) -> ValueError:
    fn, arg = names(fn)
    extra = f" or equal {arg('ignore_index')}={ignore_index}" if ignore_index is not None else ""
    return ValueError(
        f"{fn}: `{arg('labels')}` must lie in [0, {num_classes - 1}]{extra}; got out-of-range "
        f"values {sorted(set(bad))[:5]}."
    )


def check_declared_classes(fn: str | Caller, name: str, declared: object, actual: int) -> None:
    """The losses that take the class count in their constructor (OpenNMT's, the forum's
    ``LabelSmoothingLoss``): it must match the input."""
    if not is_index(declared) or declared != actual:
        fn, arg = names(fn)
        raise ValueError(
            f"{fn}: `{arg(name)}` must equal the size of the class axis, {actual}; got "
            f"{declared!r}."
        )


def check_label_smoothing_loss_options(
    fn: str | Caller, classes: object, smoothing: object, dim: object
) -> None:
    """The forum's ``LabelSmoothingLoss(classes, smoothing, dim)``, checked at construction:
    ``classes`` an int >= 2 (the smoothing goes to the ``classes - 1`` others), ``smoothing``
    in [0, 1] (when concrete), ``dim`` an int."""
    fn, arg = names(fn)
    if not is_index(classes) or classes < MIN_CLASSES["others"]:
        raise ValueError(
            f"{fn}: `{arg('classes')}` must be an int >= 2 (the smoothing is spread over the "
            f"classes - 1 others); got {classes!r}."
        )
    check_smoothing(Caller(fn), smoothing, arg("smoothing"))
    if not is_index(dim):
        raise ValueError(f"{fn}: `{arg('dim')}` must be an int (the class axis); got {dim!r}.")


def opennmt_kl_options(
    fn: str | Caller, label_smoothing: object, ignore_index: object, vocab: object
) -> dict:
    """Options of ``smoothed_cross_entropy`` that reproduce OpenNMT-py's KL
    ``LabelSmoothingLoss(label_smoothing, tgt_vocab_size, ignore_index)``.

    ``0 <= ignore_index < vocab`` is the pad column ("others_but_pad", exactly OpenNMT's); a
    negative ``ignore_index`` excludes no column ("others") and only zeroes the rows it labels.
    Checked in OpenNMT's own terms (``tgt_vocab_size``, not the convention it maps to), so the
    module can check them at construction.
    """
    fn, arg = names(fn)
    if is_number(label_smoothing) and not 0.0 < label_smoothing <= 1.0:
        raise ValueError(
            f"{fn}: `{arg('label_smoothing')}` must be in (0, 1]; got {label_smoothing!r}."
        )
    if not is_index(vocab) or vocab < 1:
        raise ValueError(
            f"{fn}: `{arg('tgt_vocab_size')}` must be a positive int (the number of classes); "
            f"got {vocab!r}."
        )
    if not is_index(ignore_index) or ignore_index >= vocab:
        raise ValueError(
            f"{fn}: `{arg('ignore_index')}` must be an int below {arg('tgt_vocab_size')}={vocab} "
            f"(a pad column, or negative for none); got {ignore_index!r}."
        )
    if ignore_index >= 0:
        if vocab < MIN_CLASSES["others_but_pad"]:
            raise ValueError(
                f"{fn}: `{arg('tgt_vocab_size')}` must be >= 3 with a pad column "
                f"({arg('ignore_index')}={ignore_index}): the smoothing goes to the "
                f"{arg('tgt_vocab_size')} - 2 classes that are neither the target nor the pad; "
                f"got {vocab}."
            )
        return {"convention": "others_but_pad", "pad_index": int(ignore_index)}
    if vocab < MIN_CLASSES["others"]:
        raise ValueError(
            f"{fn}: `{arg('tgt_vocab_size')}` must be >= 2: the smoothing goes to the "
            f"{arg('tgt_vocab_size')} - 1 classes that are not the target; got {vocab}."
        )
    return {"convention": "others", "ignore_index": int(ignore_index)}


def check_z_loss(
    fn: str | Caller, z_loss: object, *, from_log_probs: bool, return_z_loss: bool
) -> None:
    """``z_loss`` is a finite number >= 0 and needs logits (there is no logsumexp of log-probs).
    A value that is not concrete gives NaN rows when out of range."""
    check_flags(fn, return_z_loss=return_z_loss, from_log_probs=from_log_probs)
    fn, arg = names(fn)
    if is_number(z_loss) and not (z_loss >= 0 and is_finite(z_loss)):
        raise ValueError(f"{fn}: `{arg('z_loss')}` must be a finite number >= 0; got {z_loss!r}.")
    uses_z = return_z_loss or not (is_number(z_loss) and z_loss == 0)
    if from_log_probs and uses_z:
        raise ValueError(
            f"{fn}: `{arg('z_loss')}` (and {arg('return_z_loss')}=True) needs logits: with "
            f"{arg('from_log_probs')}=True there is no logsumexp to penalise; got "
            f"{arg('z_loss')}={z_loss!r}, {arg('return_z_loss')}={return_z_loss!r}."
        )


class LogitTransform(NamedTuple):
    """``t = softcap(logit_scale * x)`` with ``softcap(v) = cap * tanh(v / cap)`` (the identity
    when ``cap`` is None), applied to the logits before the loss: Gemma 2/3's final-logit
    softcapping and flash-attn's ``logit_scale``. Both are Python floats, compiled in."""

    scale: float = 1.0
    cap: float | None = None

    @property
    def active(self) -> bool:
        return self.scale != 1.0 or self.cap is not None


def check_logit_transform(
    fn: str | Caller, softcap: object, logit_scale: object, *, from_log_probs: bool
) -> LogitTransform:
    """``softcap`` (None or a finite number > 0) and ``logit_scale`` (a finite number > 0), as
    Python numbers: they are constants of the model, compiled into the loss, not differentiated.
    A scale <= 0 is refused: 0 makes every logit equal and a negative one reverses the order of
    the classes (the argmax becomes the argmin), which no model means. Both need logits: with
    ``from_log_probs=True`` the input is not logits, and transforming log-probabilities would
    leave them unnormalised."""
    fn, arg = names(fn)
    for name, value, optional in (("softcap", softcap, True), ("logit_scale", logit_scale, False)):
        if optional and value is None:
            continue
        allowed = "None or a finite number > 0" if optional else "a finite number > 0"
        if not is_number(value):
            raise TypeError(
                f"{fn}: `{arg(name)}` must be {allowed} (a Python number: it is compiled in and "
                f"not differentiated); got {value!r} ({type(value).__name__})."
            )
        if not (is_finite(value) and value > 0):
            raise ValueError(f"{fn}: `{arg(name)}` must be {allowed}; got {value!r}.")
    transform = LogitTransform(float(logit_scale), None if softcap is None else float(softcap))
    if from_log_probs and transform.active:
        raise ValueError(
            f"{fn}: `{arg('softcap')}` and `{arg('logit_scale')}` transform logits: with "
            f"{arg('from_log_probs')}=True the input is log-probabilities, which a transform "
            f"would leave unnormalised; got {arg('softcap')}={softcap!r}, "
            f"{arg('logit_scale')}={logit_scale!r}."
        )
    return transform


def is_empty_count(fn: str | Caller, count: object, given: object) -> bool:
    """Whether a token count read on the host (a number; transformers' ``num_items_in_batch``)
    is 0: no token of the whole batch counts, and the loss is transformers' ``0 / 0``. A count
    below 0 or not finite raises, naming ``given``, the value the user passed. An unread one
    (an array) is not 0 here: where it is not > 0, the loss is NaN."""
    if not is_number(count):
        return False
    if not (count >= 0 and math.isfinite(count)):
        name, arg = names(fn)
        raise ValueError(
            f"{name}: `{arg('normalizer')}` must be a count of tokens, a finite number >= 0; "
            f"got {given!r}."
        )
    return count == 0


def check_flags(fn: str | Caller, **flags: object) -> None:
    """Each of ``flags`` (``kl``, ``from_log_probs``, ``inplace_backward``, ...) is True or
    False, a Python bool: a string such as ``"False"``, a number or an array is refused, where
    a truth test would quietly read ``"False"`` as True and an array could not be compiled in."""
    fn, arg = names(fn)
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(
                f"{fn}: `{arg(name)}` must be True or False; got {value!r} "
                f"({type(value).__name__})."
            )


def check_return_stats(fn: str | Caller, return_stats: object, *, from_log_probs: bool) -> None:
    """``return_stats`` is a bool, and needs logits (there is no softmax of log-probabilities to
    take the entropy of; their lse is 0)."""
    check_flags(fn, return_stats=return_stats)
    fn, arg = names(fn)
    if return_stats and from_log_probs:
        raise ValueError(
            f"{fn}: {arg('return_stats')}=True needs logits (the lse, the entropy and the "
            f"argmax of their softmax); got {arg('from_log_probs')}=True."
        )


def check_class_mask_support(
    fn: str | Caller, allowed: list[bool], convention: str, pad_index: object
) -> None:
    """A concrete ``class_mask`` must leave the convention at least one class to smooth over."""
    num_allowed = sum(bool(value) for value in allowed)
    size = num_allowed - (convention != "uniform")
    if convention == "others_but_pad" and bool(allowed[pad_index]):
        size -= 1
    if size < 1:
        fn, arg = names(fn)
        raise ValueError(
            f"{fn}: `{arg('class_mask')}` allows {num_allowed} class(es), which leaves "
            f"{arg('convention')}={convention!r} no class to spread the smoothing over; allow "
            "more classes."
        )


def binary_labels_error(fn: str | Caller, bad: list[float]) -> ValueError:
    """Targets of the sigmoid cross-entropy outside [0, 1] (e.g. -1/+1 labels): torch and
    optax compute a number from them, a negative loss among others."""
    fn, arg = names(fn)
    return ValueError(
        f"{fn}: `{arg('labels')}` must be targets in [0, 1] (for -1/+1 labels pass "
        f"(y + 1) / 2); got values {sorted(set(bad))[:5]}."
    )


def masked_label_error(fn: str | Caller, bad: list[int]) -> ValueError:
    fn, arg = names(fn)
    return ValueError(
        f"{fn}: `{arg('labels')}` of counted rows must be classes that `{arg('class_mask')}` "
        f"allows (True); got labels of masked classes {sorted(set(bad))[:5]}."
    )


def check_positive_below_one(fn: str | Caller, name: str, value: object) -> None:
    """timm asserts ``smoothing < 1``; here: a number in [0, 1)."""
    if is_number(value) and not 0.0 <= float(value) < 1.0:
        fn, arg = names(fn)
        raise ValueError(f"{fn}: `{arg(name)}` must be in [0, 1); got {value!r}.")


def check_broadcastable(fn: str | Caller, name: str, got: tuple, target: tuple) -> None:
    """``got`` must broadcast to ``target`` (e.g. torch's ``pos_weight`` of shape ``(C,)``)."""
    ok = len(got) <= len(target) and all(
        size in (1, want) for size, want in zip(reversed(got), reversed(target), strict=False)
    )
    if not ok:
        _, arg = names(fn)
        raise shape_error(
            fn, name, got, f"a shape that broadcasts to the {possessive(arg('logits'))} "
            f"{tuple(target)}"
        )  # fmt: skip


# Keras's ``backend.epsilon()``: probabilities are clipped to [KERAS_EPSILON, 1 - KERAS_EPSILON].
KERAS_EPSILON = 1e-7


def fairseq_labels_shape(fn: str, target_shape: tuple, lprobs_shape: tuple) -> bool:
    """fairseq takes ``target`` as ``lprobs.shape[:-1]`` or that plus a trailing 1.

    Returns True when the trailing 1 is there (fairseq then keeps it in unreduced outputs).
    """
    rows = tuple(lprobs_shape[:-1])
    if tuple(target_shape) == rows:
        return False
    if tuple(target_shape) == (*rows, 1):
        return True
    raise shape_error(fn, "target", target_shape, f"shape {rows} or {(*rows, 1)}")


def check_divisor(fn: str | Caller, name: str, value: object) -> None:
    """A denominator given as a number (``normalizer``, T5X's ``loss_normalizing_factor``) is
    a finite number > 0: 0 would give inf, a negative one a negative loss. An array that was
    not read passes."""
    if is_number(value) and not (value > 0 and is_finite(value)):
        fn, arg = names(fn)
        raise ValueError(f"{fn}: `{arg(name)}` must be a finite number > 0; got {value!r}.")


def check_t5x_inputs(
    fn: str,
    logits_shape: tuple,
    targets_shape: tuple,
    weights_shape: tuple | None = None,
    loss_normalizing_factor: object = None,
) -> None:
    """T5X: integer ``targets`` have the logits' shape without the last (vocabulary) axis;
    ``weights``, when given, the targets' shape (T5X would broadcast another one, ``(B, 1)``
    against ``(B,)`` to ``(B, B)``, and sum that); ``loss_normalizing_factor`` (as read), when
    given, is a finite number > 0 (:func:`check_divisor`)."""
    if tuple(targets_shape) != tuple(logits_shape[:-1]):
        raise shape_error(
            fn,
            "targets",
            targets_shape,
            f"the logits' shape without the last axis, {tuple(logits_shape[:-1])}",
        )
    if weights_shape is not None and tuple(weights_shape) != tuple(targets_shape):
        allowed = f"the targets' shape {tuple(targets_shape)}"
        raise shape_error(fn, "weights", weights_shape, allowed)
    check_divisor(fn, "loss_normalizing_factor", loss_normalizing_factor)


def check_chunk_size(fn: str | Caller, chunk_size: object) -> int:
    """``chunk_size`` of the fused losses: a positive int (classes per chunk)."""
    if not is_index(chunk_size) or chunk_size < 1:
        fn, arg = names(fn)
        raise ValueError(f"{fn}: `{arg('chunk_size')}` must be a positive int; got {chunk_size!r}.")
    return int(chunk_size)


def check_linear_shapes(
    fn: str | Caller,
    hidden_shape: tuple,
    weight_shape: tuple,
    bias_shape: tuple | None,
    labels_shape: tuple,
) -> None:
    """Shapes of the fused losses: hidden (..., D), weight (V, D), bias (V,), labels (...)."""
    hidden_shape, weight_shape = tuple(hidden_shape), tuple(weight_shape)
    if len(hidden_shape) < 1:
        raise shape_error(fn, "hidden", hidden_shape, "at least one dimension (..., D)")
    features = hidden_shape[-1]
    if features < 1:  # the chunking divides by the features' bytes
        raise shape_error(fn, "hidden", hidden_shape, "at least one feature (..., D) with D >= 1")
    if len(weight_shape) != 2 or weight_shape[1] != features:
        raise shape_error(
            fn, "weight", weight_shape, f"shape (V, {features}) (classes x hidden features)"
        )
    if bias_shape is not None and tuple(bias_shape) != (weight_shape[0],):
        raise shape_error(fn, "bias", bias_shape, f"shape ({weight_shape[0]},)")
    if tuple(labels_shape) != hidden_shape[:-1]:
        raise shape_error(
            fn,
            "labels",
            labels_shape,
            f"the hidden's shape without the last axis, {hidden_shape[:-1]}",
        )


def dtype_mismatch_error(fn: str | Caller, name: str, got: object, expected: object) -> TypeError:
    fn, arg = names(fn)
    return TypeError(
        f"{fn}: `{arg(name)}` must have the hidden's dtype {expected}; got dtype {got}."
    )
