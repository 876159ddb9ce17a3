"""The Hugging Face Trainer's ``LabelSmoother`` in JAX (twin: ``lstorch.compat.hf``)."""

from __future__ import annotations

import jax

import lsspec
from lsjax._common import ArrayLike, as_array
from lsjax.smoothed import smoothed_cross_entropy


def label_smoother(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    epsilon: float = 0.1,
    ignore_index: int = -100,
    shift_labels: bool = False,
    check_labels: bool | None = None,
) -> jax.Array:
    r"""``transformers.trainer_pt_utils.LabelSmoother(epsilon, ignore_index)(logits, labels)``.

    SEMANTICS.md §6: with ``lp = log_softmax(logits)`` and ``n`` the number of rows whose label
    is not ``ignore_index``::

        (1 - eps) * sum_rows(-lp[y]) / n + eps * sum_rows(-sum_c lp_c) / (n * K)

    the uniform convention averaged over counted rows: ``smoothed_cross_entropy(logits, labels,
    smoothing=epsilon, ignore_index=ignore_index, reduction="mean")``. ``shift_labels=True``
    drops the last position of ``logits`` (axis -2) and the first of ``labels`` (causal LM).
    ``labels`` may carry a trailing axis of 1, as HF accepts.

    Differences: when every row is ignored this returns 0 with a zero gradient (HF: NaN, 0/0);
    a negative label other than ``ignore_index`` raises (HF clamps it to class 0 and counts it).
    ``check_labels`` is :func:`lsjax.smoothed_cross_entropy`'s: ``False`` reads no concrete
    value to check it (a target out of range gives a NaN row, as under ``jit``).
    """
    logits = as_array(logits)
    labels = as_array(labels)
    if shift_labels:
        logits = logits[..., :-1, :]
        labels = labels[..., 1:]
    if labels.ndim == logits.ndim:
        labels = labels[..., 0]
    return smoothed_cross_entropy(
        logits,
        labels,
        smoothing=epsilon,
        ignore_index=ignore_index,
        reduction="mean",
        axis=-1,
        check_labels=check_labels,
        _caller=lsspec.caller("label_smoother", smoothing="epsilon"),
    )
