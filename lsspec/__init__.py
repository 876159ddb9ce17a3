"""Framework-free specification shared by ``lsjax`` and ``lstorch``.

This package holds what does not depend on an array library: the names of the conventions and
reductions, the size of each convention's smoothing support, and the checks of plain Python
options with their error messages. Keeping them here means the JAX and the PyTorch functions
reject the same bad input with the same words, while each framework package still installs and
imports alone (this module imports nothing but the standard library).

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


def check_choice(fn: str, name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{fn}: `{name}` must be one of {list(allowed)}; got {value!r}.")
    return value


def is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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


def check_smoothing(fn: str, smoothing: object, name: str = "smoothing") -> None:
    """Raise unless a concrete ``smoothing`` (already snapped by ``snap_to_unit_interval``) lies
    in [0, 1]. Non-numbers are left to the caller."""
    if is_number(smoothing) and not (0.0 <= float(smoothing) <= 1.0):
        raise ValueError(
            f"{fn}: `{name}` must be in [0, 1]; got {smoothing!r} (values within "
            f"{UNIT_INTERVAL_ULPS} ulps outside it, in the option's dtype, count as rounding and "
            "are clamped)."
        )


def check_axis(fn: str, axis: object, ndim: int, name: str = "axis") -> int:
    """Return ``axis`` as a non-negative int, or raise naming the allowed range."""
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool) or not -ndim <= axis < ndim:
        raise ValueError(
            f"{fn}: `{name}` must be an int in [{-ndim}, {ndim - 1}] for logits with {ndim} "
            f"dimension(s); got {axis!r}."
        )
    return int(axis) % ndim


def check_options(
    fn: str,
    *,
    num_classes: int,
    smoothing: object,
    convention: str,
    reduction: str,
    pad_index: object,
    ignore_index: object,
    normalizer: object = None,
    kl: bool = False,
    has_weight: bool = False,
    from_log_probs: bool = False,
) -> None:
    """Check every plain option of ``smoothed_cross_entropy`` (the same in both frameworks).

    The last four default to "not used", for the losses that have no such option (the fused and
    the vocabulary-parallel losses)."""
    check_choice(fn, "convention", convention, CONVENTIONS)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    check_smoothing(fn, smoothing)
    minimum = MIN_CLASSES[convention]
    if num_classes < minimum:
        raise ValueError(
            f"{fn}: convention={convention!r} needs at least {minimum} classes along the class "
            f"axis; got {num_classes}."
        )
    if convention == "others_but_pad":
        if not isinstance(pad_index, numbers.Integral) or not 0 <= pad_index < num_classes:
            raise ValueError(
                f"{fn}: convention='others_but_pad' needs `pad_index`, an int in "
                f"[0, {num_classes - 1}]; got {pad_index!r}."
            )
    elif pad_index is not None:
        raise ValueError(
            f"{fn}: `pad_index` is only used by convention='others_but_pad'; got "
            f"pad_index={pad_index!r} with convention={convention!r}."
        )
    if ignore_index is not None and not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"{fn}: `ignore_index` must be an int or None; got {ignore_index!r}.")
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(
                f"{fn}: `normalizer` replaces the denominator of reduction='mean'; got "
                f"normalizer={normalizer!r} with reduction={reduction!r}."
            )
        if is_number(normalizer) and not (normalizer > 0 and math.isfinite(normalizer)):
            raise ValueError(f"{fn}: `normalizer` must be a finite number > 0; got {normalizer!r}.")
    if kl and has_weight:
        raise ValueError(
            f"{fn}: kl=True is not defined with class `weight` (weights make the target a "
            "non-distribution, so it has no entropy to subtract); use kl=False."
        )
    del from_log_probs  # Every combination with from_log_probs is allowed.


def shape_error(fn: str, name: str, got: tuple, allowed: str) -> ValueError:
    return ValueError(f"{fn}: `{name}` must have {allowed}; got shape {tuple(got)}.")


def dtype_error(fn: str, name: str, got: object, allowed: str) -> TypeError:
    return TypeError(f"{fn}: `{name}` must have {allowed}; got dtype {got}.")


def label_range_error(
    fn: str, bad: list[int], num_classes: int, ignore_index: object
) -> ValueError:
    extra = f" or equal ignore_index={ignore_index}" if ignore_index is not None else ""
    return ValueError(
        f"{fn}: `labels` must lie in [0, {num_classes - 1}]{extra}; got out-of-range values "
        f"{sorted(set(bad))[:5]}."
    )


def check_declared_classes(fn: str, name: str, declared: object, actual: int) -> None:
    """The seed modules take the class count in their constructor; it must match the input."""
    if not isinstance(declared, numbers.Integral) or declared != actual:
        raise ValueError(
            f"{fn}: `{name}` must equal the size of the class axis, {actual}; got {declared!r}."
        )


def seed_kl_options(fn: str, label_smoothing: object, ignore_index: object, vocab: int) -> dict:
    """Options of ``smoothed_cross_entropy`` that reproduce the seed's OpenNMT-style KL module.

    ``0 <= ignore_index < vocab`` is the pad column ("others_but_pad", exactly the seed); a
    negative ``ignore_index`` excludes no column ("others") and only zeroes the rows it labels.
    """
    if is_number(label_smoothing) and not 0.0 < label_smoothing <= 1.0:
        raise ValueError(f"{fn}: `label_smoothing` must be in (0, 1]; got {label_smoothing!r}.")
    if not isinstance(ignore_index, numbers.Integral) or ignore_index >= vocab:
        raise ValueError(
            f"{fn}: `ignore_index` must be an int below tgt_vocab_size={vocab} (a pad column, or "
            f"negative for none); got {ignore_index!r}."
        )
    if ignore_index >= 0:
        return {"convention": "others_but_pad", "pad_index": int(ignore_index)}
    return {"convention": "others", "ignore_index": int(ignore_index)}


def check_z_loss(fn: str, z_loss: object, *, from_log_probs: bool, return_z_loss: bool) -> None:
    """``z_loss`` is a finite number >= 0 and needs logits (there is no logsumexp of log-probs)."""
    if is_number(z_loss) and not (z_loss >= 0 and math.isfinite(z_loss)):
        raise ValueError(f"{fn}: `z_loss` must be a finite number >= 0; got {z_loss!r}.")
    uses_z = return_z_loss or not (is_number(z_loss) and z_loss == 0)
    if from_log_probs and uses_z:
        raise ValueError(
            f"{fn}: `z_loss` (and return_z_loss=True) needs logits: with from_log_probs=True "
            f"there is no logsumexp to penalise; got z_loss={z_loss!r}, "
            f"return_z_loss={return_z_loss!r}."
        )


def check_class_mask_support(
    fn: str, allowed: list[bool], convention: str, pad_index: object
) -> None:
    """A concrete ``class_mask`` must leave the convention at least one class to smooth over."""
    num_allowed = sum(bool(value) for value in allowed)
    size = num_allowed - (convention != "uniform")
    if convention == "others_but_pad" and bool(allowed[pad_index]):
        size -= 1
    if size < 1:
        raise ValueError(
            f"{fn}: `class_mask` allows {num_allowed} class(es), which leaves convention="
            f"{convention!r} no class to spread the smoothing over; allow more classes."
        )


def masked_label_error(fn: str, bad: list[int]) -> ValueError:
    return ValueError(
        f"{fn}: `labels` of counted rows must be classes that `class_mask` allows (True); got "
        f"labels of masked classes {sorted(set(bad))[:5]}."
    )


def check_positive_below_one(fn: str, name: str, value: object) -> None:
    """timm asserts ``smoothing < 1``; here: a number in [0, 1)."""
    if is_number(value) and not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{fn}: `{name}` must be in [0, 1); got {value!r}.")


def check_broadcastable(fn: str, name: str, got: tuple, target: tuple) -> None:
    """``got`` must broadcast to ``target`` (e.g. torch's ``pos_weight`` of shape ``(C,)``)."""
    ok = len(got) <= len(target) and all(
        size in (1, want) for size, want in zip(reversed(got), reversed(target), strict=False)
    )
    if not ok:
        raise shape_error(fn, name, got, f"a shape that broadcasts to the logits' {tuple(target)}")


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


def check_t5x_targets(fn: str, logits_shape: tuple, targets_shape: tuple) -> None:
    """T5X: integer ``targets`` have the logits' shape without the last (vocabulary) axis."""
    if tuple(targets_shape) != tuple(logits_shape[:-1]):
        raise shape_error(
            fn,
            "targets",
            targets_shape,
            f"the logits' shape without the last axis, {tuple(logits_shape[:-1])}",
        )


def check_chunk_size(fn: str, chunk_size: object) -> int:
    """``chunk_size`` of the fused losses: a positive int (classes per chunk)."""
    positive_int = isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool)
    if not positive_int or chunk_size < 1:
        raise ValueError(f"{fn}: `chunk_size` must be a positive int; got {chunk_size!r}.")
    return int(chunk_size)


def check_linear_shapes(
    fn: str, hidden_shape: tuple, weight_shape: tuple, bias_shape: tuple | None, labels_shape: tuple
) -> None:
    """Shapes of the fused losses: hidden (..., D), weight (V, D), bias (V,), labels (...)."""
    hidden_shape, weight_shape = tuple(hidden_shape), tuple(weight_shape)
    if len(hidden_shape) < 1:
        raise shape_error(fn, "hidden", hidden_shape, "at least one dimension (..., D)")
    features = hidden_shape[-1]
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


def dtype_mismatch_error(fn: str, name: str, got: object, expected: object) -> TypeError:
    return TypeError(f"{fn}: `{name}` must have the hidden's dtype {expected}; got dtype {got}.")
