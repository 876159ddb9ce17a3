"""OpenNMT-py's KL ``LabelSmoothingLoss`` in PyTorch (twin: ``lsjax.compat.opennmt``).

Its module form is ``lstorch.KLLabelSmoothingLoss`` (renamed from OpenNMT's
``LabelSmoothingLoss``, which names another loss in ``lstorch.compat.pytorch_forum``).
"""

from __future__ import annotations

import torch

import lsspec
from lstorch import _common
from lstorch.smoothed import smoothed_cross_entropy


def kl_label_smoothing_loss(
    output: torch.Tensor,
    target: torch.Tensor,
    *,
    label_smoothing: float,
    tgt_vocab_size: int,
    ignore_index: int = -100,
    check_labels: bool | None = None,
    _caller: lsspec.Caller | None = None,
) -> torch.Tensor:
    """OpenNMT-py's ``LabelSmoothingLoss(label_smoothing, tgt_vocab_size, ignore_index)``.

    Log-probabilities in (class axis last), ``F.kl_div(output, q, reduction='sum')``: the KL
    form summed over all rows, where ``q`` puts ``1 - eps`` on the target, no mass on the pad
    column ``ignore_index`` and ``eps/(K-2)`` on every other class, and rows whose target is the
    pad are zeroed. That is ``smoothed_cross_entropy(output, target, smoothing=eps,
    convention="others_but_pad", pad_index=ignore_index, kl=True, from_log_probs=True,
    reduction="sum")`` (SEMANTICS.md §3).

    Deviation, on purpose: OpenNMT writes ``one_hot[ignore_index] = 0``, which with the default
    ``-100`` zeroes column ``K - 100`` (or raises IndexError when K < 100) while still dividing
    ``eps`` by ``K - 2``. Here a negative ``ignore_index`` excludes no column: ``eps`` is spread
    over the ``K - 1`` other classes (``convention="others"``) and rows whose target equals
    ``ignore_index`` are zeroed. For ``0 <= ignore_index < K`` OpenNMT is reproduced exactly.

    Args:
      output: log-probabilities ``(..., K)``, the class axis last.
      target: int tensor ``output.shape[:-1]``.
      label_smoothing: ``eps`` in (0, 1], as OpenNMT asserts (checked when it can be read, a
        number or a CPU tensor; otherwise only [0, 1] is enforced, by NaN).
      tgt_vocab_size: the number of classes; must equal the size of the class axis, and leave
        the smoothing a class to go to (>= 3 with a pad column, >= 2 without).
      ignore_index: the pad column (``0 <= ignore_index < K``), or negative for none.
      check_labels: whether the host reads tensor values to check them (the targets, a
        ``label_smoothing`` tensor), as in :func:`lstorch.smoothed_cross_entropy`: ``None``, CPU
        tensors only; ``True``, on any device (a sync); ``False``, never (a target out of range
        gives a NaN row).

    Returns:
      The summed loss, a scalar: float32 for bf16/fp16/float32 input, float64 for float64.

    ``_caller`` is internal (who errors name: ``KLLabelSmoothingLoss`` when the module called).
    """
    fn = lsspec.caller("kl_label_smoothing_loss", _caller)
    lsspec.check_check_labels(fn, check_labels)
    value = _common.concrete_scalar(
        fn, "label_smoothing", label_smoothing, check_labels=check_labels
    )
    options = lsspec.opennmt_kl_options(fn, value, ignore_index, tgt_vocab_size)
    if isinstance(output, torch.Tensor) and output.ndim:
        lsspec.check_declared_classes(fn, "tgt_vocab_size", tgt_vocab_size, output.shape[-1])
    inner = lsspec.caller(
        "kl_label_smoothing_loss",
        _caller,
        logits="output",
        labels="target",
        smoothing="label_smoothing",
        pad_index="ignore_index",
    )
    return smoothed_cross_entropy(
        output,
        target,
        smoothing=label_smoothing,
        kl=True,
        from_log_probs=True,
        reduction="sum",
        axis=-1,
        check_labels=check_labels,
        _caller=inner,
        **options,
    )
