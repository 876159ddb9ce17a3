"""Functional forms of the two seed modules (twins of ``lsjax.label_smoothing_loss`` and
``lsjax.kl_label_smoothing_loss``); the modules themselves are in ``lstorch.modules``.
"""

from __future__ import annotations

import torch

import lsspec
from lstorch import _common
from lstorch.smoothed import smoothed_cross_entropy


def label_smoothing_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    classes: int,
    smoothing: float = 0.0,
    dim: int = -1,
    _caller: lsspec.Caller | None = None,
) -> torch.Tensor:
    """The seed's ``LabelSmoothingLoss(classes, smoothing, dim)``: logits in, mean over rows.

    ``mean_rows(-sum_c q_c log_softmax(pred)_c)`` on the ``"others"`` convention, i.e.
    ``smoothed_cross_entropy(pred, target, smoothing=smoothing, convention="others", axis=dim,
    reduction="mean")``. ``dim`` may be any class axis of any rank, and ``classes`` must equal
    its size (see ``lsjax.label_smoothing_loss``). ``_caller`` is internal (who errors name:
    ``LabelSmoothingLoss`` when the module called).
    """
    fn = lsspec.caller("label_smoothing_loss", _caller)
    if isinstance(pred, torch.Tensor) and pred.ndim:
        axis = lsspec.check_axis(fn, dim, pred.ndim, name="dim")
        lsspec.check_declared_classes(fn, "classes", classes, pred.shape[axis])
    return smoothed_cross_entropy(
        pred,
        target,
        smoothing=smoothing,
        convention="others",
        axis=dim,
        reduction="mean",
        _caller=lsspec.caller(
            "label_smoothing_loss", _caller, logits="pred", labels="target", axis="dim"
        ),
    )


def kl_label_smoothing_loss(
    output: torch.Tensor,
    target: torch.Tensor,
    *,
    label_smoothing: float,
    tgt_vocab_size: int,
    ignore_index: int = -100,
    _caller: lsspec.Caller | None = None,
) -> torch.Tensor:
    """The seed's OpenNMT-style KL ``LabelSmoothingLoss(label_smoothing, tgt_vocab_size, ...)``.

    Log-probabilities in (class axis last), ``F.kl_div(output, q, reduction='sum')`` with no mass
    on the pad column ``ignore_index``, ``eps/(K-2)`` on every non-target class and pad rows
    zeroed. A negative ``ignore_index`` excludes no column (the seed's ``one_hot[-100] = 0`` bug
    is not reproduced): see ``lsjax.kl_label_smoothing_loss`` for the exact statement.
    ``label_smoothing`` must lie in (0, 1] when it can be read (a number or a CPU tensor);
    otherwise only [0, 1] is enforced, by NaN. ``_caller`` is internal (who errors name:
    ``KLLabelSmoothingLoss`` when the module called).
    """
    fn = lsspec.caller("kl_label_smoothing_loss", _caller)
    value = _common.concrete_scalar(fn, "label_smoothing", label_smoothing)
    options = lsspec.seed_kl_options(fn, value, ignore_index, tgt_vocab_size)
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
        _caller=inner,
        **options,
    )
