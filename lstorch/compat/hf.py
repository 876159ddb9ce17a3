"""The Hugging Face Trainer's ``LabelSmoother`` in PyTorch (twin: ``lsjax.compat.hf``)."""

from __future__ import annotations

import torch

import lsspec
from lstorch import _common
from lstorch.smoothed import smoothed_cross_entropy


def label_smoother(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float = 0.1,
    ignore_index: int = -100,
    shift_labels: bool = False,
    num_items_in_batch: float | torch.Tensor | None = None,
    check_labels: bool | None = None,
) -> torch.Tensor:
    r"""``transformers.trainer_pt_utils.LabelSmoother(epsilon, ignore_index)(logits, labels,
    shift_labels, num_items_in_batch)``.

    ``(1 - eps) * sum(-lp[y]) / n + eps * sum(-sum_c lp_c) / (n K)`` over the ``n`` rows not
    labelled ``ignore_index``: ``smoothed_cross_entropy(logits, labels, smoothing=epsilon,
    ignore_index=ignore_index, reduction="mean")``, the class axis last; ``shift_labels=True``
    drops the last position of ``logits`` (axis -2) and the first of ``labels`` (causal LM).
    ``labels`` may carry a trailing axis of 1, as HF accepts. ``num_items_in_batch`` (the
    Trainer's count of the whole accumulated batch's tokens) replaces ``n`` in both terms, as
    ``smoothed_cross_entropy``'s ``normalizer``. A count of 0 (no token of the whole batch
    counts) gives HF's ``0 / 0``, NaN, with a zero gradient.

    Differences: when every row is ignored and ``num_items_in_batch`` is None this returns 0
    with a zero gradient (HF: NaN, 0/0);
    a negative label other than ``ignore_index`` raises (HF clamps it to class 0 and counts it)
    where the labels are checked: ``check_labels`` is :func:`lstorch.smoothed_cross_entropy`'s
    (``None``: on the CPU only; on an accelerator such a row is NaN, with no host read-back;
    ``True``: on any device; ``False``: never).
    """
    fn = lsspec.caller("label_smoother", smoothing="epsilon", normalizer="num_items_in_batch")
    _common.tensors(fn, logits=logits, labels=labels)
    lsspec.check_flags(fn, shift_labels=shift_labels)
    if shift_labels:
        lsspec.check_causal_shift(fn, tuple(logits.shape), tuple(labels.shape))
        logits = logits[..., :-1, :]
        labels = labels[..., 1:]
    if labels.ndim == logits.ndim and labels.shape[-1] == 1:  # any other shape is refused
        labels = labels[..., 0]
    count = _common.concrete_scalar(
        fn, "normalizer", num_items_in_batch, optional=True, check_labels=check_labels
    )
    empty = lsspec.is_empty_count(fn, count, num_items_in_batch)  # read as 0: HF's sum / 0
    loss = smoothed_cross_entropy(
        logits,
        labels,
        smoothing=epsilon,
        ignore_index=ignore_index,
        reduction="sum" if empty else "mean",
        axis=-1,
        normalizer=None if empty else num_items_in_batch,
        check_labels=check_labels,
        _caller=fn,
    )
    # NaN with the sum's zero gradient (selected, not multiplied in: 0 * inf would be NaN)
    return _common.reduce(loss.reshape(1), None, "mean", 0.0) if empty else loss
