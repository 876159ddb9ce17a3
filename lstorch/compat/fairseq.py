"""fairseq's ``label_smoothed_nll_loss`` in PyTorch (twin: ``lsjax.compat.fairseq``)."""

from __future__ import annotations

import torch

import lsspec
from lstorch import _common
from lstorch.smoothed import smoothed_cross_entropy


def label_smoothed_nll_loss(
    lprobs: torch.Tensor,
    target: torch.Tensor,
    epsilon: float,
    ignore_index: int | None = None,
    reduce: bool = True,
    *,
    pre_2021: bool = False,
    check_labels: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""fairseq's ``label_smoothed_nll_loss(lprobs, target, epsilon, ignore_index, reduce)``.

    ``loss = (1 - epsilon - eps_i) * nll + eps_i * smooth`` with ``nll = -lprobs[y]``,
    ``smooth = -sum(lprobs)``, ``eps_i = epsilon / (V - 1)`` (``pre_2021=True``: ``eps_i =
    epsilon / V``, ``loss = (1 - epsilon) * nll + eps_i * smooth``), ignored rows zeroed,
    summed when ``reduce``: ``smoothed_cross_entropy(lprobs, target, smoothing=epsilon,
    convention="others", from_log_probs=True, ignore_index=ignore_index, reduction="sum" if
    reduce else "none")``, and ``nll`` the same call with ``smoothing=0``; the gradient is
    ``-q``. ``lprobs`` has the vocabulary on its last axis.

    Returns ``(loss, nll_loss)`` like fairseq: scalars when ``reduce``; otherwise per row, with
    a trailing axis of 1 when ``ignore_index`` is given (fairseq keeps the gathered
    ``(..., 1)`` shape then and squeezes it otherwise). ``target`` may carry that trailing 1.
    Differences: an ``epsilon`` outside [0, 1] or a (non-ignored) target out of range raises
    instead of computing a number. ``check_labels`` is :func:`lstorch.smoothed_cross_entropy`'s:
    ``None`` checks the targets on the CPU only (on an accelerator, no host read-back: a target
    out of range gives a NaN row), ``True`` on any device, ``False`` never.
    """
    fn = "label_smoothed_nll_loss"
    _common.tensors(fn, lprobs=lprobs, target=target)
    lsspec.check_flags(fn, reduce=reduce, pre_2021=pre_2021)
    trailing = lsspec.fairseq_labels_shape(fn, tuple(target.shape), tuple(lprobs.shape))
    labels = target[..., 0] if trailing else target
    options = dict(
        from_log_probs=True,
        ignore_index=ignore_index,
        reduction="sum" if reduce else "none",
        check_labels=check_labels,
    )
    convention = "uniform" if pre_2021 else "others"
    # Errors below name this function and its arguments; the class axis is the last.
    options.update(
        axis=-1, _caller=lsspec.caller(fn, logits="lprobs", labels="target", smoothing="epsilon")
    )
    loss = smoothed_cross_entropy(
        lprobs, labels, smoothing=epsilon, convention=convention, **options
    )
    nll_loss = smoothed_cross_entropy(lprobs, labels, smoothing=0.0, **options)
    if not reduce and ignore_index is not None:
        return loss.unsqueeze(-1), nll_loss.unsqueeze(-1)
    return loss, nll_loss
