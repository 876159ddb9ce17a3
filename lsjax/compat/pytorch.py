"""``torch.nn.functional.cross_entropy`` in JAX (also ``lsjax.cross_entropy``).

Its twin is torch's own function. It is a thin binding: class-index targets go to
:func:`lsjax.smoothed_cross_entropy` (``convention="uniform"``), probability targets to
:func:`lsjax.soft_target_cross_entropy`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import lsspec
from lsjax._common import ArrayLike, as_array
from lsjax.smoothed import smoothed_cross_entropy
from lsjax.soft import soft_target_cross_entropy


def cross_entropy(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> jax.Array:
    """``torch.nn.functional.cross_entropy`` in JAX, same arguments, same semantics.

    The arguments after ``weight`` are keyword-only: torch's fourth and sixth positions hold
    its deprecated ``size_average`` and ``reduce``, so ``cross_entropy(x, y, None, 2)`` would
    mean another thing here than in torch.

    ``input`` has shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)`` (class axis 1, as torch).
    ``target`` holds class indices (the input's shape without the class axis) or class
    probabilities (the input's shape). With indices the loss is
    ``(1 - eps) * w_y * (lse - x_y) + (eps/C) * sum_c w_c * (lse - x_c)`` and ``"mean"`` divides
    by the sum of ``w_y`` over rows whose target is not ``ignore_index``; with probabilities the
    target is smoothed to ``t * (1 - eps) + eps/C``, ``"mean"`` divides by the number of rows and
    ``ignore_index`` must be negative, any negative value meaning nothing (torch refuses
    ``ignore_index >= 0`` there).

    Output dtype is the input's, as torch: the value is accumulated in float32 for bf16/fp16
    and rounded once. Documented difference: when every row is ignored, ``"mean"`` returns 0 with
    a zero gradient where torch returns NaN.
    """
    fn = "cross_entropy"
    # Errors of the functions called below name this one and its arguments.
    caller = lsspec.caller(
        fn, logits="input", labels="target", targets="target", smoothing="label_smoothing"
    )
    input = as_array(fn, "input", input)
    target = as_array(fn, "target", target)
    if input.ndim < 1:
        raise lsspec.shape_error(fn, "input", input.shape, "shape (C,), (N, C) or (N, C, d1, ...)")
    class_axis = 0 if input.ndim == 1 else 1
    if jnp.issubdtype(target.dtype, jnp.floating):
        if ignore_index is not None and not lsspec.is_index(ignore_index):
            raise ValueError(f"{fn}: `ignore_index` must be an int or None; got {ignore_index!r}.")
        if ignore_index is not None and ignore_index >= 0:  # torch: TORCH_CHECK(ignore_index < 0)
            raise ValueError(
                f"{fn}: `ignore_index` is not supported with probability targets (as in torch): "
                f"it must be negative, and is then unused; got ignore_index={ignore_index!r}."
            )
        loss = soft_target_cross_entropy(
            input,
            target,
            smoothing=label_smoothing,
            weight=weight,
            axis=class_axis,
            reduction=reduction,
            _caller=caller,
        )
    else:
        lsspec.check_choice(fn, "reduction", reduction, lsspec.REDUCTIONS)
        loss = smoothed_cross_entropy(
            input,
            target,
            smoothing=label_smoothing,
            ignore_index=ignore_index,
            weight=weight,
            axis=class_axis,
            reduction=reduction,
            _caller=caller,
        )
    # torch returns the input's dtype: bf16/fp16 results are rounded once, in a program of its
    # own after the loss's. (A float32/float64 result binds no identity cast: under an eager
    # jax.grad that would be one more program.)
    return loss if loss.dtype == input.dtype else loss.astype(input.dtype)
