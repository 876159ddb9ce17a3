"""``nn.Module`` forms: the constructor takes the keywords, ``forward(logits, labels)`` the data.

Every module takes every keyword of its function (``tests/test_modules.py`` checks it from the
signatures), stores it as an attribute of the same name, shows it in ``repr`` and checks at
construction what needs no input; errors, there and in ``forward``, name the module.
"""

from __future__ import annotations

import torch
from torch import nn

import lsspec
from lstorch import _common
from lstorch.compat.opennmt import kl_label_smoothing_loss
from lstorch.compat.pytorch_forum import label_smoothing_loss
from lstorch.smoothed import smoothed_cross_entropy


def _shown(value: object) -> str:
    """An option as ``repr`` shows it: a one-element tensor by its value, a larger one by its
    shape and dtype (a class weight of 50 000 entries stays one line)."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return f"{value.detach().reshape(()).item():g}"
        return (
            f"tensor(shape={tuple(value.shape)}, dtype={str(value.dtype).removeprefix('torch.')})"
        )
    return repr(value)


def _buffer(value: object) -> torch.Tensor | None:
    """``weight`` / ``class_mask`` as a tensor to register (a Python list becomes one)."""
    return value if value is None or isinstance(value, torch.Tensor) else torch.as_tensor(value)


class SmoothedCrossEntropyLoss(nn.Module):
    """Module form of :func:`lstorch.smoothed_cross_entropy`.

    Every keyword of the function is a constructor argument of the same name and meaning, except
    ``where``, which changes with the batch and goes to ``forward``. ``weight`` and
    ``class_mask`` are registered buffers (Python lists are made tensors), so ``.to(device)``
    and ``state_dict`` carry them; the other options are plain attributes, which may be changed
    between calls (``loss_fn.smoothing = next_value`` for a schedule; a tensor or parameter
    works too).

    Differences from the function's defaults, for a training objective and as
    ``torch.nn.CrossEntropyLoss``: ``reduction="mean"`` and ``ignore_index=-100`` (pass
    ``ignore_index=None`` to count every row).

    The class axis, as in the function: ``axis=None`` (the default) is the last axis of
    ``(C,)`` and ``(N, C)`` logits, where ``nn.CrossEntropyLoss`` finds the classes too. Logits
    with 3 or more dimensions need ``axis``: ``axis=1`` for ``nn.CrossEntropyLoss``'s
    ``(N, C, d1, ...)``, ``axis=-1`` for the classes last (a language model's
    ``(batch, time, vocab)``); without it they raise ``ValueError`` rather than guess (when
    ``C`` equals ``d1`` a guess would silently give another loss).

    Options that need no input (``convention``, ``reduction``, ``smoothing``, ``z_loss``,
    ``normalizer``, ``pad_index``, ...) are checked at construction; errors name this module.

    Shape:
      - logits: ``(C,)``, ``(N, C)``, or any shape with the classes on ``axis``.
      - labels: the logits' shape without the class axis, integer.
      - where (optional): the labels' shape, bool.
      - output: a scalar for ``"mean"``/``"sum"``, the labels' shape for ``"none"``;
        ``(loss, z_part)`` with ``return_z_loss=True``.

    Example::

        loss_fn = SmoothedCrossEntropyLoss(smoothing=0.1, convention="others")
        loss = loss_fn(logits, labels)
    """

    def __init__(
        self,
        *,
        smoothing: float | torch.Tensor = 0.0,
        convention: str = "uniform",
        ignore_index: int | None = -100,
        pad_index: int | None = None,
        weight: torch.Tensor | None = None,
        axis: int | None = None,
        reduction: str = "mean",
        normalizer: float | torch.Tensor | None = None,
        kl: bool = False,
        from_log_probs: bool = False,
        class_mask: torch.Tensor | None = None,
        z_loss: float | torch.Tensor = 0.0,
        return_z_loss: bool = False,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        fn = lsspec.caller(type(self).__name__)
        lsspec.check_options(
            fn,
            num_classes=None,
            smoothing=_common.concrete_smoothing(fn, smoothing),
            convention=convention,
            reduction=reduction,
            pad_index=pad_index,
            ignore_index=ignore_index,
            normalizer=_common.concrete_scalar(fn, "normalizer", normalizer, optional=True),
            kl=kl,
            has_weight=weight is not None,
            from_log_probs=from_log_probs,
        )
        z_value = _common.concrete_scalar(fn, "z_loss", z_loss)
        lsspec.check_z_loss(fn, z_value, from_log_probs=from_log_probs, return_z_loss=return_z_loss)
        if axis is not None and not lsspec.is_index(axis):
            raise ValueError(f"{fn}: `axis` must be an int or None; got {axis!r}.")
        self.smoothing = smoothing
        self.convention = convention
        self.ignore_index = ignore_index
        self.pad_index = pad_index
        self.register_buffer("weight", _buffer(weight))
        self.axis = axis
        self.reduction = reduction
        self.normalizer = normalizer
        self.kl = kl
        self.from_log_probs = from_log_probs
        self.register_buffer("class_mask", _buffer(class_mask))
        self.z_loss = z_loss
        self.return_z_loss = return_z_loss
        self.inplace_backward = inplace_backward

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, where: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
            class_mask=self.class_mask,
            z_loss=self.z_loss,
            return_z_loss=self.return_z_loss,
            inplace_backward=self.inplace_backward,
            _caller=lsspec.caller(type(self).__name__),
        )

    def extra_repr(self) -> str:
        names = (
            "smoothing", "convention", "ignore_index", "pad_index", "weight", "axis",
            "reduction", "normalizer", "kl", "from_log_probs", "class_mask", "z_loss",
            "return_z_loss", "inplace_backward",
        )  # fmt: skip
        return ", ".join(f"{name}={_shown(getattr(self, name))}" for name in names)


class LabelSmoothingLoss(nn.Module):
    """Drop-in for the forum's ``LabelSmoothingLoss(classes, smoothing=0.0, dim=-1)``.

    Logits in, ``"others"`` convention, mean over rows; ``dim`` works for any class axis.
    See :func:`lstorch.label_smoothing_loss`. ``classes`` (an int >= 2), ``smoothing`` (in
    [0, 1]) and ``dim`` are checked at construction; errors name this module.
    """

    def __init__(self, classes: int, smoothing: float = 0.0, dim: int = -1) -> None:
        super().__init__()
        fn = lsspec.caller(type(self).__name__)
        smoothing_value = _common.concrete_smoothing(fn, smoothing)
        lsspec.check_label_smoothing_loss_options(fn, classes, smoothing_value, dim)
        self.cls = classes
        self.smoothing = smoothing
        self.confidence = 1.0 - smoothing
        self.dim = dim

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return label_smoothing_loss(
            pred,
            target,
            classes=self.cls,
            smoothing=self.smoothing,
            dim=self.dim,
            _caller=lsspec.caller(type(self).__name__),
        )

    def extra_repr(self) -> str:
        return f"classes={self.cls}, smoothing={_shown(self.smoothing)}, dim={self.dim}"


class KLLabelSmoothingLoss(nn.Module):
    """Drop-in for OpenNMT-py's ``LabelSmoothingLoss(label_smoothing, tgt_vocab_size,
    ignore_index=-100)`` (renamed: the forum's loss has that name).

    Log-probabilities in, KL form, ``"others_but_pad"``, summed. See
    :func:`lstorch.kl_label_smoothing_loss` for the documented fix of OpenNMT's
    ``one_hot[-100]`` bug. The arguments are checked at construction, as OpenNMT's asserts
    did, in its terms: ``tgt_vocab_size`` must leave the smoothing a class to go to (>= 3 with a
    pad column, >= 2 without); errors name this module.
    """

    def __init__(
        self, label_smoothing: float, tgt_vocab_size: int, ignore_index: int = -100
    ) -> None:
        super().__init__()
        fn = lsspec.caller(type(self).__name__)
        value = _common.concrete_scalar(fn, "label_smoothing", label_smoothing)
        lsspec.opennmt_kl_options(fn, value, ignore_index, tgt_vocab_size)
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
            _caller=lsspec.caller(type(self).__name__),
        )

    def extra_repr(self) -> str:
        return (
            f"label_smoothing={_shown(self.label_smoothing)}, "
            f"tgt_vocab_size={self.tgt_vocab_size}, ignore_index={self.ignore_index}"
        )
