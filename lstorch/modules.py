"""``nn.Module`` forms: the constructor takes the keywords, ``forward(logits, labels)`` the data."""

from __future__ import annotations

import torch
from torch import nn

import lsspec
from lstorch.seed_modules import kl_label_smoothing_loss, label_smoothing_loss
from lstorch.smoothed import smoothed_cross_entropy


class SmoothedCrossEntropyLoss(nn.Module):
    """Module form of :func:`lstorch.smoothed_cross_entropy` (the same keywords).

    ``inplace_backward=True`` makes backward write the gradient into the logits' storage (see
    :func:`lstorch.smoothed_cross_entropy`).

    ``weight`` is registered as a buffer so it follows ``.to(device)``. Unlike
    ``torch.nn.CrossEntropyLoss`` the default reduction is ``"mean"`` (a module is used as a
    training objective) and ``ignore_index`` defaults to -100 as in torch; pass
    ``ignore_index=None`` to count every row.

    Example::

        loss_fn = SmoothedCrossEntropyLoss(smoothing=0.1, convention="others")
        loss = loss_fn(logits, labels)
    """

    def __init__(
        self,
        *,
        smoothing: float = 0.0,
        convention: str = "uniform",
        ignore_index: int | None = -100,
        pad_index: int | None = None,
        weight: torch.Tensor | None = None,
        axis: int = -1,
        reduction: str = "mean",
        normalizer: float | None = None,
        kl: bool = False,
        from_log_probs: bool = False,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        self.smoothing = smoothing
        self.inplace_backward = inplace_backward
        self.convention = convention
        self.ignore_index = ignore_index
        self.pad_index = pad_index
        self.register_buffer("weight", weight)
        self.axis = axis
        self.reduction = reduction
        self.normalizer = normalizer
        self.kl = kl
        self.from_log_probs = from_log_probs

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, where: torch.Tensor | None = None
    ) -> torch.Tensor:
        return smoothed_cross_entropy(
            logits,
            labels,
            smoothing=self.smoothing,
            convention=self.convention,
            ignore_index=self.ignore_index,
            pad_index=self.pad_index,
            weight=self.weight,
            where=where,
            axis=self.axis,
            reduction=self.reduction,
            normalizer=self.normalizer,
            kl=self.kl,
            from_log_probs=self.from_log_probs,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (
            f"smoothing={self.smoothing}, convention={self.convention!r}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        )


class LabelSmoothingLoss(nn.Module):
    """Drop-in for the seed's ``LabelSmoothingLoss(classes, smoothing=0.0, dim=-1)``.

    Logits in, ``"others"`` convention, mean over rows; ``dim`` works for any class axis.
    See :func:`lstorch.label_smoothing_loss`.
    """

    def __init__(self, classes: int, smoothing: float = 0.0, dim: int = -1) -> None:
        super().__init__()
        self.cls = classes
        self.smoothing = smoothing
        self.confidence = 1.0 - smoothing
        self.dim = dim

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return label_smoothing_loss(
            pred, target, classes=self.cls, smoothing=self.smoothing, dim=self.dim
        )


class KLLabelSmoothingLoss(nn.Module):
    """Drop-in for the seed's OpenNMT-style ``LabelSmoothingLoss(label_smoothing,
    tgt_vocab_size, ignore_index=-100)`` (renamed: both seed modules share one name).

    Log-probabilities in, KL form, ``"others_but_pad"``, summed. See
    :func:`lstorch.kl_label_smoothing_loss` for the documented fix of the seed's
    ``one_hot[-100]`` bug.
    """

    def __init__(
        self, label_smoothing: float, tgt_vocab_size: int, ignore_index: int = -100
    ) -> None:
        super().__init__()
        # Validate at construction, as the seed's assert did.
        lsspec.seed_kl_options(type(self).__name__, label_smoothing, ignore_index, tgt_vocab_size)
        self.label_smoothing = label_smoothing
        self.tgt_vocab_size = tgt_vocab_size
        self.ignore_index = ignore_index
        self.confidence = 1.0 - label_smoothing

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return kl_label_smoothing_loss(
            output,
            target,
            label_smoothing=self.label_smoothing,
            tgt_vocab_size=self.tgt_vocab_size,
            ignore_index=self.ignore_index,
        )
