"""lstorch's label-smoothed loss in a Hugging Face ``transformers.Trainer``.

``compute_loss_func(smoothing=..., **options)`` is the function ``Trainer(compute_loss_func=...)``
calls: every option of :func:`lstorch.smoothed_cross_entropy` (``convention``, ``z_loss``,
``weight``, ``class_mask``, ``kl``, ...), the causal shift, ``ignore_index=-100``, and the
loss normalised by the token count of the whole accumulated batch that the Trainer passes as
``num_items_in_batch``, so that gradient accumulation gives the update of the whole batch.

``fused_causal_lm_loss(model, input_ids, labels, ...)`` is the same loss computed from the
model's last hidden state and its linear output layer by
:func:`lstorch.fused_linear_smoothed_cross_entropy`: the ``rows x V`` logits are never built.

    from transformers import Trainer
    from lstorch.integrations.huggingface import compute_loss_func

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      compute_loss_func=compute_loss_func(smoothing=0.1, z_loss=1e-4))

Needs transformers (``pip install 'label-smoothing-parity[hf]'``); without it, importing this
module raises an ImportError that names the extra. The functions read the model's outputs by
duck typing (``outputs["logits"]``, ``outputs.logits`` or ``outputs[0]``) and the model through
``get_output_embeddings()`` and ``base_model``, so they use no private API of transformers.
``docs/language_models.md`` shows both in a Trainer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import lsspec

try:
    import transformers  # noqa: F401  (the [hf] extra: what this module is for)
except ModuleNotFoundError as error:
    if not lsspec.is_missing(error, ("transformers",)):
        raise
    raise ImportError(
        lsspec.install_hint("lstorch.integrations.huggingface", "transformers", "hf", error)
    ) from error

import torch
from torch import nn

from lstorch import _common, fused, smoothed
from lstorch.fused import fused_linear_smoothed_cross_entropy
from lstorch.smoothed import smoothed_cross_entropy

__all__ = ["compute_loss_func", "fused_causal_lm_loss"]

# The options each function sets itself, and why: the Trainer's contract fixes them.
_SET_HERE = {
    "axis": "the vocabulary is the logits' last axis",
    "reduction": "the Trainer takes one number: the sum over counted tokens divided by "
    "`num_items_in_batch` (without it, by their count)",
    "normalizer": "it is the `num_items_in_batch` the Trainer passes at every call",
    "where": "the causal shift and `ignore_index` decide which tokens count",
    "return_z_loss": "the Trainer takes one loss tensor",
    "return_stats": "the Trainer takes one loss tensor",
}

# Config attributes of models whose forward changes the logits after the output layer (Gemma 2
# and 3 soft-cap them, Cohere and Granite scale them): the fused loss would compute another loss.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
}


def compute_loss_func(
    *,
    smoothing: float | torch.Tensor = 0.0,
    shift_labels: bool = True,
    ignore_index: int | None = -100,
    **options: Any,
) -> Callable[..., torch.Tensor]:
    r"""The loss for ``transformers.Trainer(compute_loss_func=...)``: label-smoothed cross-entropy.

    Returns ``loss(outputs, labels, num_items_in_batch=None)``, which the Trainer calls after
    each forward pass. With ``x`` the logits (``outputs["logits"]``, ``outputs.logits`` or
    ``outputs[0]``, vocabulary last) and ``y_t = labels[t + 1]`` (``shift_labels=True``, a causal
    LM: position ``t`` predicts the next token; the last position predicts nothing)::

        loss = sum_{counted t} smoothed_cross_entropy(x_t, y_t, smoothing, **options) / n

    A token counts unless its label is ``ignore_index``. ``n`` is ``num_items_in_batch``, the
    Trainer's count of the whole accumulated batch's tokens, or, when it is None, the counted
    tokens of this call. Dividing every micro-batch by the whole batch's count makes the
    accumulated gradient that of the whole batch (``lstorch.smoothed_cross_entropy``'s
    ``normalizer``). The count is whatever the Trainer passes, as its own loss divides by it:
    for models whose ``loss_type`` is ``ForCausalLM`` (Llama, ...) it counts ``labels[...,
    1:]``, the shifted tokens; for others (GPT-2's ``loss_type`` is None) every label that is
    not -100, the first position's too (which no position predicts), and the Trainer's own loss
    divides by that same count. A count of 0 (no token of the whole
    batch counts: an all-padding batch) gives NaN with a zero gradient, transformers' ``0 /
    0``, which the Trainer leaves out of its logged loss and its ``eval_loss``. With several
    GPUs in one process (``torch.nn.DataParallel``) the Trainer passes the count once per
    device, ``(n_gpu, 1)``: that shape is taken too, its first value used.

    With ``smoothing=eps`` and the default ``convention="uniform"`` this is the Trainer's own
    ``label_smoothing_factor=eps`` (``transformers.trainer_pt_utils.LabelSmoother``), which
    ``tests/test_huggingface.py`` checks step by step: ``(1 - eps) * nll + eps * mean_c(-log
    p_c)``. Differences: no token counted with ``num_items_in_batch=None`` gives 0 (HF: NaN; a
    count of 0 gives NaN in both); a negative label other than
    ``ignore_index`` raises (HF clamps it to class 0). The shift reads the labels one position
    on instead of slicing the logits, so no copy of the ``(batch, time, V)`` logits is made
    (HF's slices copy them) and ``inplace_backward=True`` can write the gradient into them.

    Args:
      smoothing: ``eps`` in [0, 1].
      shift_labels: True for a causal LM (its labels are its inputs, as the Trainer passes
        them); False when ``labels[t]`` is already the target of ``logits[t]`` (a masked LM,
        token classification, a seq2seq decoder's labels) or there is no time axis (sequence
        classification: ``(batch,)`` labels, which raise with True).
      ignore_index: the label of tokens that do not count (None: every token counts).
      **options: any other keyword of :func:`lstorch.smoothed_cross_entropy`: ``convention``,
        ``pad_index``, ``weight``, ``class_mask``, ``z_loss``, ``kl``, ``from_log_probs``,
        ``inplace_backward``, ``check_labels`` (``None``: the labels are checked on the CPU
        only, so a CUDA step has no host read-back; ``True``: on any device; ``False``:
        never). Those the Trainer's contract fixes (``axis``, ``reduction``,
        ``normalizer``, ``where``, ``return_z_loss``) raise ``TypeError``, as do unknown names;
        option values that need no input are checked here, before training starts.

    Errors name ``compute_loss_func``; a ``num_items_in_batch`` that is not a count (a finite
    number >= 0) raises (a CUDA tensor is not read, unless ``check_labels=True``, nor any
    tensor with ``check_labels=False``: then a count that is not > 0 gives NaN).
    """
    fn = lsspec.caller("compute_loss_func", normalizer="num_items_in_batch")
    lsspec.check_flags(fn, shift_labels=shift_labels)
    _check_options(fn, options, smoothed_cross_entropy)
    _check_values(fn, smoothed_cross_entropy, smoothing, ignore_index, options)

    def loss(outputs: Any, labels: torch.Tensor | None, num_items_in_batch: Any = None):
        logits = _logits(fn, outputs)
        if labels is None:
            raise ValueError(
                f"{fn}: the Trainer passed labels=None; the loss needs the batch's `labels` (a "
                "dataset column named 'labels', or `label_names` in TrainingArguments)."
            )
        _common.tensors(fn, labels=labels)
        count, empty = _count(fn, num_items_in_batch, options.get("check_labels"))
        labels = labels.to(logits.device)
        where = None
        if shift_labels:
            labels, where = _next_token_labels(fn, labels)
        loss = smoothed_cross_entropy(
            logits,
            labels,
            smoothing=smoothing,
            ignore_index=ignore_index,
            where=where,
            axis=-1,
            reduction="sum" if empty else "mean",
            normalizer=count,
            _caller=fn,
            **_on_device(options, logits.device),
        )
        return _zero_count(loss) if empty else loss

    return loss


def fused_causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    smoothing: float | torch.Tensor = 0.0,
    shift_labels: bool = True,
    ignore_index: int | None = -100,
    **options: Any,
) -> torch.Tensor:
    r"""A causal LM's label-smoothed loss from its last hidden state: the logits are never built.

    Equal (loss and gradients, to float rounding) to ``compute_loss_func(smoothing=...,
    **options)(model(input_ids, attention_mask=attention_mask), labels, num_items_in_batch)``.
    The model's body (``model.base_model``: GPT-2's ``transformer``, Llama's ``model``) gives
    the last hidden state ``h`` ``(batch, time, D)``; the output layer
    (``model.get_output_embeddings()``, an ``nn.Linear`` ``(V, D)``, tied or not) is applied
    inside :func:`lstorch.fused_linear_smoothed_cross_entropy`, chunk by chunk over the
    vocabulary, so memory grows as ``rows x chunk_size``, not ``rows x V``.

    ``num_items_in_batch`` divides the fused loss's sum (``reduction="sum"``) as
    ``compute_loss_func`` divides the dense one; without it the loss is the mean over this
    call's counted tokens. ``shift_labels=True`` drops the last position's hidden state and the
    first label (a copy of ``(batch, time - 1, D)``, not of any ``V``-sized array).

    For a Trainer, override ``compute_loss`` with it (``docs/language_models.md`` shows how).
    The model must be the ``PreTrainedModel`` itself, in one process: a
    ``DistributedDataParallel`` wrapper starts its gradient synchronisation in its own forward,
    which this function does not call. Models whose forward changes the logits after the
    output layer (a config with ``final_logit_softcapping``, ``logit_scale`` or
    ``logits_scaling``: Gemma 2/3, Cohere, Granite) raise ``ValueError``, since the fused loss
    would compute another loss; so does an output layer that is not an ``nn.Linear`` (a LoRA
    wrapper adds its own term). Any other change the model makes to the logits after its
    output layer is not detected: use ``compute_loss_func`` for such models.

    Args:
      model: a causal LM (``...ForCausalLM`` / ``...LMHeadModel``).
      input_ids: ``(batch, time)`` token ids; ``attention_mask`` as the model takes it.
      labels: ``(batch, time)``, ``ignore_index`` where a token does not count.
      num_items_in_batch: the counted tokens of the whole accumulated batch (the Trainer's).
      smoothing, shift_labels, ignore_index: as in :func:`compute_loss_func`.
      **options: any other keyword of :func:`lstorch.fused_linear_smoothed_cross_entropy`
        (``convention``, ``pad_index``, ``chunk_size``, ``check_labels``, which also decides
        whether a ``num_items_in_batch`` tensor is read); ``reduction`` is set here.

    Returns:
      The scalar loss, float32 for bf16/fp16/float32 models.
    """
    fn = lsspec.caller("fused_causal_lm_loss", normalizer="num_items_in_batch")
    lsspec.check_flags(fn, shift_labels=shift_labels)
    _check_options(fn, options, fused_linear_smoothed_cross_entropy)
    _check_values(fn, fused_linear_smoothed_cross_entropy, smoothing, ignore_index, options)
    _common.tensors(fn, input_ids=input_ids, labels=labels)
    _common.integer_labels(fn, input_ids, "input_ids")  # token ids, before the model sees them
    if shift_labels:
        _check_time_axis(fn, labels)
    if tuple(labels.shape) != tuple(input_ids.shape):  # checked as given, not after the shift
        allowed = f"the input_ids' shape {tuple(input_ids.shape)}"
        raise lsspec.shape_error(fn, "labels", tuple(labels.shape), allowed)
    if attention_mask is not None:
        _common.tensors(fn, attention_mask=attention_mask)
    count, empty = _count(fn, num_items_in_batch, options.get("check_labels"))
    head, body = _head_and_body(fn, model)
    outputs = body(input_ids=input_ids, attention_mask=attention_mask)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    labels = labels.to(hidden.device)
    if shift_labels:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    loss = fused_linear_smoothed_cross_entropy(
        hidden,
        head.weight,
        labels,
        bias=head.bias,
        smoothing=smoothing,
        ignore_index=ignore_index,
        reduction="mean" if count is None and not empty else "sum",
        _caller=fn,
        **options,
    )
    if empty:
        return _zero_count(loss)
    if count is None:
        return loss
    # The sum divided by the count, with smoothed_cross_entropy's handling of a normalizer that
    # could not be read (NaN where it is not a finite number > 0).
    return _common.reduce(loss.reshape(1), None, "mean", count)


def _keywords(function: Callable) -> dict:
    """``function``'s public keyword-only arguments and their defaults."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and not name.startswith("_")
    }


def _check_options(fn: lsspec.Caller, options: dict, function: Callable) -> None:
    """Each keyword in ``options`` is one ``function`` takes and this integration leaves to the
    user: TypeError otherwise, naming what is allowed."""
    taken = set(_keywords(function))
    allowed = sorted(taken - set(_SET_HERE) - {"smoothing", "ignore_index", "bias"})
    for name in options:
        if name in _SET_HERE and name in taken:
            raise TypeError(f"{fn}: `{name}` is set here: {_SET_HERE[name]}; leave it out.")
        if name not in allowed:
            raise TypeError(
                f"{fn}: got an unexpected keyword argument {name!r}; the options are "
                f"smoothing, shift_labels, ignore_index and {allowed}."
            )


_OPTION_CHECKS = {
    smoothed_cross_entropy: smoothed._check_options,
    fused_linear_smoothed_cross_entropy: fused._check_options,
}


def _check_values(
    fn: lsspec.Caller, function: Callable, smoothing: object, ignore_index: object, options: dict
) -> None:
    """Check what needs no input now, as ``function``'s module does at construction (its
    option check with ``num_classes=None``), so a bad option fails before training starts."""
    values = _keywords(function)
    values.update(options, smoothing=smoothing, ignore_index=ignore_index, reduction="mean")
    _OPTION_CHECKS[function](fn, None, lsspec.LabelOptions.of(values), **values)
    tensors = {  # each a tensor, or a list of numbers
        name: _common.tensor_option(fn, name, options[name], None)
        for name in ("weight", "class_weight", "class_mask")
        if name in options
    }
    _common.check_class_tensors(
        fn, tensors, values["convention"], values["pad_index"], values.get("check_labels")
    )


def _on_device(options: dict, device: torch.device) -> dict:
    """The options with their tensors (``weight``, ``class_mask``) on the logits' device: they
    were made before the Trainer moved the model there."""
    return {
        name: value.to(device) if isinstance(value, torch.Tensor) and value.ndim else value
        for name, value in options.items()
    }


def _logits(fn: lsspec.Caller, outputs: Any) -> torch.Tensor:
    """The logits in a model's outputs: a ``ModelOutput`` (a mapping), an object with
    ``.logits``, a tuple whose first item they are, or the tensor itself."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"{fn}: the model's outputs must hold the logits (outputs['logits'], outputs.logits or "
        f"outputs[0]); got {type(outputs).__name__}."
    )


def _count(fn: lsspec.Caller, num_items_in_batch: object, check_labels) -> tuple[Any, bool]:
    """``(the divisor, whether it is a count of 0 that the host read)`` from the Trainer's
    ``num_items_in_batch``: None; a number; a 0-d tensor; or, from a Trainer on several GPUs in
    one process (``torch.nn.DataParallel``), the count repeated once per device, ``(n_gpu, 1)``
    (or ``(n_gpu,)``), whose first value is the count. Where the host reads it (a number, a CPU
    tensor, ``check_labels=True``) it must be a finite number >= 0 and, repeated, the same on
    every device; an unread tensor passes through (a value that is not > 0 gives NaN)."""
    if num_items_in_batch is None:
        return None, False
    count = num_items_in_batch
    if isinstance(count, torch.Tensor) and count.ndim:
        repeated = count.ndim == 1 or (count.ndim == 2 and count.shape[1] == 1)
        if not repeated or count.numel() == 0:
            raise lsspec.shape_error(
                fn, "normalizer", tuple(count.shape),
                "a scalar shape (), or (n_gpu, 1): the count once per device",
            )  # fmt: skip
        if _common.reads_values(count, check_labels) and not bool((count == count[0]).all()):
            raise ValueError(
                f"{fn}: `num_items_in_batch` must be the same count on every device; got "
                f"{count.reshape(-1).tolist()}."
            )
        count = count.reshape(-1)[0]
    value = _common.concrete_scalar(fn, "normalizer", count, check_labels=check_labels)
    if lsspec.is_empty_count(fn, value, num_items_in_batch):
        return None, True
    return count, False


def _zero_count(total: torch.Tensor) -> torch.Tensor:
    """A batch whose count is 0: transformers' ``sum / 0``, NaN (the sum over no counted token
    is 0), with the zero gradient of that sum (the NaN is selected, not multiplied in: 0 * inf
    would be NaN in every gradient)."""
    return _common.reduce(total.reshape(1), None, "mean", 0.0)


def _check_time_axis(fn: lsspec.Caller, labels: torch.Tensor) -> None:
    """``shift_labels=True`` shifts along the labels' last axis, time: ``(batch,)`` labels (a
    sequence classifier's) would be shifted along the batch, each row scored against the next
    row's label."""
    if labels.ndim < 2:
        raise ValueError(
            f"{fn}: `shift_labels=True` shifts `labels` along their last axis, time, but "
            f"`labels` has shape {tuple(labels.shape)} (no time axis: a sequence classifier's "
            f"labels?); pass shift_labels=False."
        )


def _next_token_labels(fn: lsspec.Caller, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(labels[..., t + 1] at position t, the positions that have a next token)``: the causal
    shift on the labels, so that the logits are used where they are (no sliced copy)."""
    _check_time_axis(fn, labels)
    shifted = torch.cat([labels[..., 1:], torch.zeros_like(labels[..., :1])], dim=-1)
    has_next = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    has_next[..., -1] = False
    return shifted, has_next


def _head_and_body(fn: lsspec.Caller, model: nn.Module) -> tuple[nn.Linear, nn.Module]:
    """The model's linear output layer and the body whose last hidden state feeds it."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        got = type(model).__name__ if head is None else f"an output layer {type(head).__name__}"
        raise TypeError(
            f"{fn}: `model` must be a causal LM whose get_output_embeddings() is an nn.Linear "
            f"(the PreTrainedModel itself, not a DistributedDataParallel or PEFT wrapper); "
            f"got {got}."
        )
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        raise TypeError(
            f"{fn}: `model` must have a body (model.base_model, the module named by its "
            f"base_model_prefix) that returns the last hidden state; got {type(model).__name__}."
        )
    config = getattr(model, "config", None)
    for name, plain in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, plain)
        if value is not None and value != plain:
            raise ValueError(
                f"{fn}: {type(model).__name__} transforms its logits after the output layer "
                f"(config.{name}={value!r}), which the fused loss does not; use "
                "compute_loss_func."
            )
    return head, body
