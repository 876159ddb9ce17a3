"""Every ``nn.Module`` of lstorch: the constructor takes the keywords, ``forward`` the data.

As ``torch.nn``'s losses: a module stores its options (``weight`` and ``class_mask`` as
registered buffers, so ``.to(device)`` and ``state_dict`` carry them; the others as plain
attributes, which may be changed between calls, e.g. ``loss_fn.smoothing = next_value`` for a
schedule), and ``forward`` is one call into its function. Each module takes every keyword of
its function (``tests/test_modules.py`` checks it from the signatures), shows them in ``repr``
and checks at construction what needs no input; errors, there and in ``forward``, name the
module. Its docstring's ``Args:`` are its function's (``lstorch._doc``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import lsspec
from lstorch import _common, fused, smoothed
from lstorch._doc import module_args
from lstorch.compat.opennmt import kl_label_smoothing_loss
from lstorch.compat.pytorch_forum import label_smoothing_loss
from lstorch.fused import DEFAULT_CHUNK_SIZE, fused_linear_smoothed_cross_entropy
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


class _LossModule(nn.Module):
    """What every loss module shares: its constructor's arguments stored under their own names
    (the tensor options as buffers), checked at construction by :meth:`_check`, shown by
    ``repr``, and handed with the data to the function, whose errors then name the module."""

    _function: Callable  # the function this module is the form of (a staticmethod)
    _buffer_names: tuple[str, ...] = ()  # the arguments registered as buffers

    def __init__(self, arguments: dict) -> None:
        """``arguments``: the subclass constructor's ``locals()``, its arguments by name."""
        super().__init__()
        self._option_names = tuple(n for n in arguments if n not in ("self", "__class__"))
        for name in self._option_names:
            if name in self._buffer_names:
                # A list becomes a tensor (_common.tensor_option), registered on the CPU.
                value = _common.tensor_option(self._caller(), name, arguments[name], None)
                self.register_buffer(name, value)
            else:
                setattr(self, name, arguments[name])
        if self._buffer_names:  # (each module with buffers takes a convention and a pad)
            _common.check_class_tensors(
                self._caller(), {name: getattr(self, name) for name in self._buffer_names},
                self.convention, self.pad_index, self.check_labels,
            )  # fmt: skip
        self._check(self._caller())

    def _caller(self) -> lsspec.Caller:
        return lsspec.caller(type(self).__name__)

    def _options(self) -> dict:
        """The options as they are now (an attribute may have changed since construction)."""
        return {name: getattr(self, name) for name in self._option_names}

    def _check(self, fn: lsspec.Caller) -> None:
        """Check at construction what needs no input; errors name ``fn``, the module."""

    def _loss(self, *data: object, **per_call: object):
        return self._function(*data, **per_call, **self._options(), _caller=self._caller())

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={_shown(value)}" for name, value in self._options().items())


@module_args(smoothed_cross_entropy)
class SmoothedCrossEntropyLoss(_LossModule):
    """Module form of :func:`lstorch.smoothed_cross_entropy`: label-smoothed cross-entropy from
    integer labels.

    Every keyword of the function is a constructor argument of the same name and meaning,
    except ``where``, which changes with the batch and goes to ``forward``. Differences from
    the function's defaults, for a training objective and as ``torch.nn.CrossEntropyLoss``:
    ``reduction="mean"`` and ``ignore_index=-100`` (pass ``ignore_index=None`` to count every
    row).

    Shape:
      - logits: ``(C,)``, ``(N, C)``, or any shape with the classes on ``axis`` (which logits
        with 3 or more dimensions need: ``axis=1`` for ``nn.CrossEntropyLoss``'s
        ``(N, C, d1, ...)``, ``axis=-1`` for a language model's ``(batch, time, vocab)``).
      - labels: the logits' shape without the class axis, integer.
      - where (optional): the labels' shape, bool.
      - output: a scalar for ``"mean"``/``"sum"``, the labels' shape for ``"none"``;
        ``(loss, z_part)`` with ``return_z_loss=True``; ``(loss, stats)`` or ``(loss, z_part,
        stats)`` with ``return_stats=True`` (``stats`` an :class:`lstorch.RowStats` of the
        labels' shape).

    Example::

        loss_fn = SmoothedCrossEntropyLoss(smoothing=0.1, convention="others")
        loss = loss_fn(logits, labels)
    """

    _function = staticmethod(smoothed_cross_entropy)
    _buffer_names = ("weight", "class_mask")

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
        softcap: float | None = None,
        logit_scale: float = 1.0,
        return_stats: bool = False,
        inplace_backward: bool = False,
        check_labels: bool | None = None,
    ) -> None:
        super().__init__(locals())

    def _check(self, fn: lsspec.Caller) -> None:
        options = self._options()
        smoothed._check_options(fn, None, lsspec.LabelOptions.of(options), **options)
        if self.axis is not None and not lsspec.is_index(self.axis):
            raise ValueError(f"{fn}: `axis` must be an int or None; got {self.axis!r}.")

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, where: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self._loss(logits, labels, where=where)


@module_args(fused_linear_smoothed_cross_entropy)
class FusedLinearSmoothedCrossEntropyLoss(_LossModule):
    """Module form of :func:`lstorch.fused_linear_smoothed_cross_entropy`: the output layer and
    the label-smoothed cross-entropy in one, the ``rows x V`` logits never built.

    ``forward(hidden, weight, labels, bias=None)`` takes the output layer's parameters, so a
    model keeps its own ``nn.Linear`` (or tied embedding) and hands ``head.weight`` /
    ``head.bias`` here instead of calling the head. Every keyword of the function is a
    constructor argument (``bias`` and the row mask ``where``, which change with the batch, go
    to ``forward``; ``class_weight`` and ``class_mask`` are buffers). As
    ``SmoothedCrossEntropyLoss``, ``ignore_index`` defaults to -100. Under ``torch.autocast``
    the inputs are rounded as ``F.linear`` would cast them (see the function).

    Shape:
      - hidden: ``(..., D)``.
      - weight: ``(V, D)``, as ``nn.Linear(D, V).weight``.
      - labels: ``hidden.shape[:-1]``, integer.
      - bias (optional): ``(V,)``.
      - where (optional): the labels' shape, bool.
      - output: a scalar for ``"mean"``/``"sum"``, the labels' shape for ``"none"``;
        ``(loss, z_part)`` with ``return_z_loss=True``; ``stats`` (an :class:`lstorch.RowStats`)
        after them with ``return_stats=True``.

    Example::

        head = nn.Linear(512, 131072)
        loss_fn = FusedLinearSmoothedCrossEntropyLoss(smoothing=0.1)
        loss = loss_fn(features, head.weight, labels, head.bias)
    """

    _function = staticmethod(fused_linear_smoothed_cross_entropy)
    _buffer_names = ("class_weight", "class_mask")

    def __init__(
        self,
        *,
        smoothing: float | torch.Tensor = 0.0,
        convention: str = "uniform",
        ignore_index: int | None = -100,
        pad_index: int | None = None,
        reduction: str = "mean",
        class_weight: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
        kl: bool = False,
        class_mask: torch.Tensor | None = None,
        z_loss: float | torch.Tensor = 0.0,
        return_z_loss: bool = False,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        return_stats: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        check_labels: bool | None = None,
    ) -> None:
        super().__init__(locals())

    def _check(self, fn: lsspec.Caller) -> None:
        options = self._options()
        fused._check_options(fn, None, lsspec.LabelOptions.of(options), **options)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        where: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple:
        return self._loss(hidden, weight, labels, bias=bias, where=where)


@module_args(label_smoothing_loss)
class LabelSmoothingLoss(_LossModule):
    """Drop-in for the forum's ``LabelSmoothingLoss(classes, smoothing=0.0, dim=-1)``
    (:func:`lstorch.label_smoothing_loss`): logits in, the ``"others"`` convention, the mean
    over rows; ``dim`` works for any class axis.

    The arguments are checked at construction: ``classes`` an int >= 2, ``smoothing`` in [0, 1],
    ``dim`` an int. As the original, it keeps ``cls`` (= ``classes``) and ``confidence``
    (= ``1 - smoothing``).

    Shape:
      - pred: logits with the classes on ``dim``, ``classes`` of them.
      - target: ``pred``'s shape without ``dim``, integer.
      - output: a scalar.
    """

    _function = staticmethod(label_smoothing_loss)

    def __init__(
        self,
        classes: int,
        smoothing: float = 0.0,
        dim: int = -1,
        *,
        check_labels: bool | None = None,
    ) -> None:
        super().__init__(locals())

    def _check(self, fn: lsspec.Caller) -> None:
        lsspec.check_check_labels(fn, self.check_labels)
        smoothing = _common.concrete_smoothing(fn, self.smoothing, check_labels=self.check_labels)
        lsspec.check_label_smoothing_loss_options(fn, self.classes, smoothing, self.dim)

    @property
    def cls(self) -> int:
        return self.classes

    @property
    def confidence(self) -> float | torch.Tensor:
        return 1.0 - self.smoothing

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss(pred, target)


@module_args(kl_label_smoothing_loss)
class KLLabelSmoothingLoss(_LossModule):
    """Drop-in for OpenNMT-py's ``LabelSmoothingLoss(label_smoothing, tgt_vocab_size,
    ignore_index=-100)`` (:func:`lstorch.kl_label_smoothing_loss`), renamed: the forum's loss
    (:class:`LabelSmoothingLoss`) has that name. Log-probabilities in, the KL form, the
    ``"others_but_pad"`` convention, summed; a negative ``ignore_index`` excludes no column
    (OpenNMT's ``one_hot[-100]`` is not reproduced: see the function).

    The arguments are checked at construction, as OpenNMT's asserts did, in its terms:
    ``tgt_vocab_size`` must leave the smoothing a class to go to (>= 3 with a pad column, >= 2
    without). As the original, it keeps ``confidence`` (= ``1 - label_smoothing``). A
    ``state_dict`` saved with OpenNMT's module in its place loads with ``strict=True``: OpenNMT's
    ``one_hot`` buffer is checked against these arguments and dropped (this module keeps none).

    Shape:
      - output: log-probabilities ``(..., tgt_vocab_size)``.
      - target: ``output.shape[:-1]``, integer.
      - output (returned): a scalar.
    """

    _function = staticmethod(kl_label_smoothing_loss)

    def __init__(
        self,
        label_smoothing: float,
        tgt_vocab_size: int,
        ignore_index: int = -100,
        *,
        check_labels: bool | None = None,
    ) -> None:
        super().__init__(locals())

    def _check(self, fn: lsspec.Caller) -> None:
        lsspec.check_check_labels(fn, self.check_labels)
        value = _common.concrete_scalar(
            fn, "label_smoothing", self.label_smoothing, check_labels=self.check_labels
        )
        lsspec.opennmt_kl_options(fn, value, self.ignore_index, self.tgt_vocab_size)

    @property
    def confidence(self) -> float | torch.Tensor:
        return 1.0 - self.label_smoothing

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss(output, target)

    def _opennmt_one_hot(self) -> torch.Tensor | None:
        """The ``one_hot`` buffer OpenNMT-py's module builds from these arguments, ``(1, V)``
        float32: ``eps / (V - 2)`` everywhere and 0 at ``one_hot[ignore_index]`` (Python
        indexing: -100 is column V - 100); None where OpenNMT's constructor would have failed."""
        size, index = self.tgt_vocab_size, self.ignore_index
        if not -size <= index < size:
            return None
        one_hot = torch.full((size,), float(self.label_smoothing) / (size - 2))
        one_hot[index] = 0
        return one_hot.unsqueeze(0)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        """Also loads a ``state_dict`` saved with OpenNMT-py's module in this one's place (a
        model that holds its loss as a submodule): OpenNMT registers its smoothed target row as
        a buffer, ``one_hot``, which this module does not keep (it computes the loss in closed
        form). The saved row must be the one OpenNMT builds from this module's arguments, else
        the checkpoint is of another configuration and loading fails; it is then dropped."""
        error_msgs = args[-1]
        saved = state_dict.pop(prefix + "one_hot", None)
        if saved is not None:
            expected = self._opennmt_one_hot()
            # float32 rounding of eps / (V - 2) (a float64 model holds it in float64)
            same = (
                expected is not None
                and tuple(saved.shape) == tuple(expected.shape)
                and torch.allclose(saved.detach().cpu().double(), expected.double(), rtol=1e-6)
            )
            if not same:
                error_msgs.append(
                    f"{type(self).__name__}: the saved buffer {prefix}one_hot (OpenNMT-py's "
                    f"smoothed target row) is not the one OpenNMT builds from "
                    f"label_smoothing={self.label_smoothing!r}, tgt_vocab_size="
                    f"{self.tgt_vocab_size!r}, ignore_index={self.ignore_index!r}: the "
                    f"checkpoint is of another configuration."
                )
        super()._load_from_state_dict(state_dict, prefix, *args)
