"""The label-smoothed cross-entropy family in PyTorch: one closed-form core, no one-hot ever built.

Twin of ``lsjax.smoothed_cross_entropy`` (same name, same keywords, same meaning, but for
``inplace_backward`` here, ``implementation`` there and ``axis``'s default: see ``lstorch``'s
docstring). The core is a
``torch.autograd.Function`` that saves only the input and per-row statistics for backward.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

import lsspec
from lstorch import _closed_form, _common
from lstorch._common import times


class _Options(NamedTuple):
    """The static options of the core."""

    convention: str
    pad_index: int | None
    kl: bool
    from_log_probs: bool
    with_z: bool = False
    triton: bool = False  # forward statistics and backward gradient by lstorch.triton_kernels
    inplace: bool = False  # backward writes the gradient into the logits' storage
    transform: lsspec.LogitTransform = _closed_form.IDENTITY  # softcap(logit_scale * x)
    with_stats: bool = False  # also the rows' entropy and whether the argmax is the label


# Whether Triton is installed, found without importing it (a millisecond; importing it and
# torch._dynamo, as ``torch.compiler.assume_constant_result`` did here, doubled the time of
# ``import lstorch``). A constant, so ``torch.compile`` reads it without a guard that could fail.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


# Why the kernels could not be imported, once a call has tried: Python does not remember a failed
# import, so without this every call would import Triton again, and fall back in silence.
_TRITON_IMPORT_ERROR: list[ImportError] = []


def _triton_available() -> bool:
    """Whether the kernels are there. The first call that asks imports
    ``lstorch.triton_kernels``, which registers the operators ``torch.ops.lstorch.smoothed_rows*``
    (inside ``torch.compile`` too, where the import runs as the call is traced). A Triton that
    is installed but cannot be imported leaves the calls on torch's own ops (the same values,
    slower): said once, as a ``RuntimeWarning`` that carries the import's error, and not tried
    again in this process."""
    if not _TRITON_INSTALLED or _TRITON_IMPORT_ERROR:
        return False
    try:
        from lstorch import triton_kernels  # noqa: F401
    except ImportError as error:
        _TRITON_IMPORT_ERROR.append(error)
        warnings.warn(
            "lstorch: Triton is installed, but lstorch's Triton kernels could not be imported "
            f"({type(error).__name__}: {error}); the losses run on torch's own ops instead "
            "(the same values, slower). LSTORCH_TRITON=off silences this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def _dtensor_smoothed_cross_entropy() -> Callable:
    """``lstorch.distributed.dtensor_smoothed_cross_entropy``, imported at the first DTensor call
    (``lstorch.distributed`` imports ``torch._dynamo``, which ``import lstorch`` does not)."""
    from lstorch.distributed import dtensor_smoothed_cross_entropy

    return dtensor_smoothed_cross_entropy


def _use_triton(x: torch.Tensor, from_log_probs: bool) -> bool:
    """Whether the core runs on the Triton kernels: CUDA tensors (every device with
    ``LSTORCH_TRITON=all``, which with ``TRITON_INTERPRET=1`` runs them on the CPU; never with
    ``LSTORCH_TRITON=off``), float32/bf16/fp16 logits, outside ``torch.func`` transforms (the
    generated vmap rule needs plain torch ops). Inside ``torch.compile`` too: the kernels are
    operators (``torch.ops.lstorch.smoothed_rows*``) that the compiled graph calls as they are."""
    mode = lsspec.check_choice(
        "smoothed_cross_entropy",
        "LSTORCH_TRITON (environment variable)",
        os.environ.get("LSTORCH_TRITON", "auto"),
        ("auto", "all", "off"),
    )
    if mode == "off" or (mode == "auto" and not x.is_cuda):
        return False
    if from_log_probs or x.dtype == torch.float64:
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return _triton_available()


def _check_arrays(fn, logits, labels, axis, weight, where, class_mask=None):
    """Shared input checks; returns (labels widened by ``_common.index_labels``, the class axis
    as a non-negative int)."""
    _common.floating(fn, logits=logits)
    labels = _common.integer_labels(fn, labels)
    _common.same_device(fn, "logits", logits.device, labels=labels)
    lsspec.check_has_class_axis(fn, "logits", tuple(logits.shape))
    axis = _common.class_axis(fn, axis, logits.ndim, tuple(logits.shape))
    rows = lsspec.row_shape(logits.shape, axis)
    lsspec.check_labels_shape(fn, tuple(labels.shape), rows)
    lsspec.check_row_options_shapes(
        fn, logits.shape[axis], rows, weight=weight, where=where, class_mask=class_mask
    )
    _common.check_bool(fn, "where", where)
    _common.check_bool(fn, "class_mask", class_mask)
    return labels, axis


def _check_options(
    fn,
    num_classes: int | None,
    options: lsspec.LabelOptions,
    *,
    weight,
    normalizer,
    kl,
    from_log_probs,
    z_loss,
    return_z_loss,
    softcap=None,
    logit_scale=1.0,
    return_stats=False,
    inplace_backward=False,
    check_labels=None,
    **_inputs,
):
    """Check the plain options of :func:`smoothed_cross_entropy`: the label ``options`` and the
    others by keyword (any more, ``where``, ``axis``, ..., are passed over); the function's, and
    its module's at construction (``num_classes=None``, before any input). Returns ``z_loss`` as
    read (a float, or the tensor that was not read: ``_common.reads_values``)."""
    z_value, _ = _common.check_loss_options(
        fn, num_classes, options, check_labels, normalizer=normalizer, kl=kl,
        has_weight=weight is not None, from_log_probs=from_log_probs, z_loss=z_loss,
        return_z_loss=return_z_loss, softcap=softcap, logit_scale=logit_scale,
        return_stats=return_stats,
    )  # fmt: skip
    lsspec.check_flags(fn, inplace_backward=inplace_backward)
    return z_value


def smoothed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    smoothing: float | torch.Tensor = 0.0,
    convention: str = "uniform",
    ignore_index: int | None = None,
    pad_index: int | None = None,
    weight: torch.Tensor | None = None,
    where: torch.Tensor | None = None,
    axis: int | None = None,
    reduction: str = "none",
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
    _caller: lsspec.Caller | None = None,
) -> torch.Tensor | tuple:
    r"""Label-smoothed cross-entropy from integer labels, in closed form (PyTorch).

    The smoothed target of a row is ``q = (1 - eps) * onehot(y) + eps * u``, with ``u`` uniform
    over the convention's support ``S`` (SEMANTICS.md §1): ``"uniform"``, all K classes;
    ``"others"``, all but ``y``; ``"others_but_pad"``, all but ``y`` and ``pad_index``. The loss
    is computed without building ``q``, from per-row statistics (``lse = logsumexp(x)``, ``x_y``
    and the sum over ``S``)::

        loss = (1 - eps) * w_y * (lse - x_y) + eps * sum_{c in S} w_c (lse - x_c) / |S|

    with ``w = 1`` without class weights. The gradient with respect to the logits is
    ``g * (A * softmax(x) - t)`` (``t`` the weighted smoothed target, ``A = sum_c t_c``), or
    ``-g * t`` with ``from_log_probs=True``. With a ``class_mask`` the masked classes leave both
    the softmax and the support (SEMANTICS.md §7); with ``z_loss`` ``z`` every counted row adds
    ``z * lse**2`` (the PaLM/T5X z-loss).

    Reproduces ``torch.nn.functional.cross_entropy(x, y, weight=w, ignore_index=i, reduction=r,
    label_smoothing=eps)`` with ``convention="uniform"`` and the class axis given by ``axis``,
    except that when no row counts ``"mean"`` returns 0 with a zero gradient (torch: NaN). The
    other conventions reproduce the peers of ``lstorch.compat`` (SEMANTICS.md §6). Its JAX twin
    is ``lsjax.smoothed_cross_entropy``: the same keywords and meaning (with an explicit
    ``axis``, the same values).

    Memory: backward keeps the input and O(rows) statistics only (no rows x K log-softmax as
    ``F.cross_entropy`` keeps) and builds the gradient in one buffer. On CUDA (outside
    ``torch.func`` transforms) forward and backward run on the Triton kernels of
    ``lstorch.triton_kernels`` (one read of the logits in forward, one read and one write in
    backward), for float32/bf16/fp16 logits; the environment variable ``LSTORCH_TRITON=off``
    turns them off.

    Args:
      logits: float tensor; the class axis is ``axis``. bf16/fp16 are accumulated in float32.
        A DTensor sharded on the class axis over a 1-D mesh is computed vocabulary-parallel,
        never gathered (``lstorch.distributed.dtensor_smoothed_cross_entropy``), with every
        option but ``inplace_backward``; each output tensor comes back
        a replicated DTensor.
      labels: int tensor with the logits' shape without the class axis. Any integer dtype
        (uint8 included) gives what int64 labels give; an ``ignore_index`` the dtype cannot
        hold (-100 with uint8 labels) matches no label.
      smoothing: ``eps`` in [0, 1]: a Python number, or a one-element tensor (or NumPy array)
        of a real dtype. A value within ``lsspec.UNIT_INTERVAL_ULPS`` (4) ulps outside [0, 1]
        in its own dtype is rounding (a schedule that ends at 0) and is clamped; farther out it
        raises when it can be read and gives NaN rows otherwise. A tensor that requires grad is
        differentiated (also under ``torch.func``): ``d loss_row / d eps = -w_y (lse - x_y) +
        sum_{c in S} w_c (lse - x_c) / |S|``, plus with ``kl=True`` the KL constant's
        ``c (log(eps/|S|) - log q_y)`` (``c = (|S|-1)/|S|`` uniform, else 1), whose one-sided
        limits are returned at the ends (``-inf`` at ``eps = 0``, ``+inf`` at ``eps = 1`` for
        ``"others"``/``"others_but_pad"``). Backward then reads the logits once more, for
        ``x_y`` and the support sums (O(rows) results).
      convention: ``"uniform"`` | ``"others"`` | ``"others_but_pad"``.
      ignore_index: rows whose label equals it count for nothing (torch's ``ignore_index``).
      pad_index: the pad column, required by and only allowed with ``"others_but_pad"``. It never
        receives smoothing mass, and rows whose label is the pad count for nothing.
      weight: per-class weights, shape ``(K,)``, a tensor or a Python list; a constant: one
        that requires grad (autograd recording) is a TypeError, as in ``F.cross_entropy``.
      where: boolean row mask with the labels' shape (a tensor or a list); False rows count for
        nothing.
      axis: the class axis of ``logits``. ``None`` (the default) is the last axis of ``(C,)``
        and ``(N, C)`` logits, which is where torch puts the classes too. Logits with 3 or more
        dimensions need an explicit ``axis`` (without one: ``ValueError``): ``axis=1`` for
        torch's ``(N, C, d1, ...)``, ``axis=-1`` for the classes last (a language model's
        ``(batch, time, vocab)``); a guess would silently compute another loss whenever the two
        sizes agree.
      reduction: ``"none"`` (the labels' shape, 0 on rows that do not count), ``"sum"`` or
        ``"mean"`` (over the sum of ``w_y`` on counted rows, or their number without weights).
      normalizer: with ``reduction="mean"``, divide the sum by this instead (for gradient
        accumulation: the token count of the whole accumulated batch). A finite number > 0 (a
        Python number or one-element tensor); one that cannot be read and is not a finite
        number > 0 makes the mean NaN.
      kl: return the KL form, the loss minus the target's entropy (SEMANTICS.md §2): same
        gradient, minimum 0, finite at smoothing = 1. Not defined with ``weight``.
      from_log_probs: ``logits`` already are log-probabilities: the loss is ``-sum_c q_c x_c``
        and its gradient ``-q`` (OpenNMT's KL loss and fairseq take log-probabilities).
      class_mask: boolean ``(K,)`` (a tensor or a list); False classes leave the softmax and the
        smoothing support, and their logits may be ``-inf``. A counted row whose label is a
        masked class raises (or is NaN where the labels cannot be read).
      z_loss: ``z >= 0`` and finite (a value that cannot be read and is out of range: NaN rows);
        adds ``z * lse**2`` to every counted row. Needs logits (not allowed with
        ``from_log_probs=True``). A tensor that requires grad is differentiated:
        ``d loss_row / d z = lse**2``.
      return_z_loss: also return the z-loss part alone, reduced like the loss:
        ``(loss, z_part)`` where ``loss`` already includes ``z_part`` (T5X's convention).
      softcap: ``None`` (the default) or a finite number ``cap > 0``: the loss is taken on
        ``t = cap * tanh(logit_scale * x / cap)`` instead of the logits (Gemma 2/3's final-logit
        softcapping). The transform is applied inside the closed form, as each reduction and
        the gradient read the logits: no transformed rows x K copy is kept for backward. The
        gradient is the chain rule, ``dt/dx = logit_scale * (1 - tanh(logit_scale * x /
        cap)**2)`` times the gradient for ``t``. The z-loss and the statistics are those of
        ``t``. A Python number, compiled in: not differentiated (a new value recompiles).
        Needs logits (not allowed with ``from_log_probs=True``). On plain torch ops the
        transform costs one transient rows x K buffer in forward and in backward (freed at
        once; with ``inplace_backward`` and float32 logits the gradient is built beside the
        logits and copied into them); the Triton kernels apply it in registers.
      logit_scale: a finite number ``> 0`` (default 1.0) the logits are multiplied by first
        (flash-attn's ``logit_scale``; ``1 / temperature``). 0 (every logit equal) and
        negative values (the class order reversed) are refused. Like ``softcap``: a Python
        number, not differentiated, and it needs logits.
      return_stats: also return per-row statistics of the (transformed) logits, from the pass
        that computes the loss: ``(loss, stats)``, or ``(loss, z_part, stats)`` with
        ``return_z_loss=True``, ``stats`` a ``lstorch.RowStats(lse, entropy, correct)`` of per-row
        arrays (the labels' shape, whatever the ``reduction``): the logsumexp, the entropy of
        the softmax, and whether the argmax is the label (the first maximal index on ties, as
        ``torch.argmax``; taken on the logits before the increasing transform). Rows that do not
        count hold 0, 0 and False. The statistics carry no gradient. Needs logits. The mean of
        ``correct`` over the counted rows is the token accuracy::

          loss, stats = lstorch.smoothed_cross_entropy(
              logits, labels, smoothing=0.1, ignore_index=-100, reduction="mean",
              return_stats=True)
          counted = labels != -100
          accuracy = stats.correct.sum() / counted.sum()
      inplace_backward: make backward write the gradient into the logits' own storage instead
        of a new rows x K buffer, as Liger-Kernel's loss does: after backward the logits hold
        their gradient (JAX's counterpart is buffer donation, ``jax.jit(...,
        donate_argnums=0)``). Use it when nothing else needs the logits' values (the usual
        output layer of a language model); another autograd node that saved them then raises
        PyTorch's "modified by an inplace operation" error rather than computing with the
        gradient. It needs logits that are neither a leaf tensor nor a view of one, such as
        ``param.view(N, K)`` (the leaf's ``.grad`` would alias its storage), and that are
        contiguous with the class axis moved last.
      check_labels: whether the host reads tensor values to check them: the labels (in range,
        not of a masked class), a ``class_mask`` (leaves a class to smooth over) and the scalar
        options given as tensors (``smoothing``, ``z_loss``, ``normalizer``). ``None`` (the
        default): CPU tensors are read and a bad value raises, as ever; on an accelerator
        nothing is read, so the call never makes the host wait for the device (no ``.item()``,
        no ``bool(tensor)``: CUDA-graph capturable, ``torch.cuda.set_sync_debug_mode("error")``
        passes), and an out-of-range counted label gives a NaN loss and gradient for its row,
        exactly as under ``torch.compile``. ``True``: read and check on any device, paying
        that wait. ``False``: never read a value to check it (NaN instead of an error, on the
        CPU too). Python numbers are checked whatever the value, for free.

    Returns:
      The loss in float32 for bf16/fp16/float32 logits and float64 for float64 logits: per row
      with ``reduction="none"``, else a scalar; ``(loss, z_part)`` with ``return_z_loss=True``.
      Inside a ``torch.autocast`` region the loss and its derivatives are computed exactly as
      outside it, as ``F.cross_entropy`` (on autocast's float32 list) is.

    Errors and values that are not read: every bad option raises ``ValueError``/``TypeError``
    naming the argument, the value given and what is allowed. A number, and a tensor that
    ``check_labels`` lets the host read (a CPU tensor by default), is checked like a number. A
    tensor on an accelerator is not read by default (that would make the host wait for the
    device on every call), nor is any tensor with ``check_labels=False``, inside
    ``torch.compile`` or batched by ``torch.func.vmap``: out of range, such a value gives NaN,
    never a plausible number (a smoothing outside [0, 1], a negative or non-finite ``z_loss``:
    every counted row; a ``normalizer`` that is not a finite number > 0: the mean; a label out
    of range or of a masked class: its row, loss and gradient; a ``class_mask`` that leaves no
    class to smooth over: every counted row's gradient, and its loss where the smoothing is
    > 0). Labels out of range raise ``ValueError`` where they are read.

    ``_caller`` is internal: the public function or module that called this one on the user's
    behalf (``lsspec.Caller``), named in error messages instead of this function.

    References:
      Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision";
      Müller, Kornblith & Hinton 2019, "When Does Label Smoothing Help?".
    """
    if _common.is_dtensor(logits):  # sharded on the class axis: never gathered
        return _dtensor_smoothed_cross_entropy()(**locals())
    fn = lsspec.caller("smoothed_cross_entropy", _caller)
    if isinstance(logits, torch.Tensor):
        weight = _common.tensor_option(fn, "weight", weight, logits.device)
        where = _common.tensor_option(fn, "where", where, logits.device)
        class_mask = _common.tensor_option(fn, "class_mask", class_mask, logits.device)
    labels, axis = _check_arrays(fn, logits, labels, axis, weight, where, class_mask)
    num_classes = logits.shape[axis]
    z_value = _check_options(
        fn,
        num_classes,
        lsspec.LabelOptions(smoothing, convention, ignore_index, pad_index, reduction),
        weight=weight,
        normalizer=normalizer,
        kl=kl,
        from_log_probs=from_log_probs,
        z_loss=z_loss,
        return_z_loss=return_z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        return_stats=return_stats,
        inplace_backward=inplace_backward,
        check_labels=check_labels,
    )
    transform = lsspec.LogitTransform(
        float(logit_scale), None if softcap is None else float(softcap)
    )
    _common.check_class_mask_support(fn, class_mask, convention, pad_index, check_labels)
    counted = _common.counted_rows(labels, ignore_index, pad_index, where)
    _common.check_label_range(
        fn, labels, counted, num_classes, ignore_index, class_mask, check_labels
    )

    x = logits.movedim(axis, -1)
    compute_dtype = _common.compute_dtype(logits.dtype)
    eps = _common.smoothing_tensor(smoothing, compute_dtype, logits.device)  # differentiated
    if weight is not None:
        weight = weight.detach().to(compute_dtype)
    if class_mask is not None:
        class_mask = class_mask.detach().to(logits.device)
    with_z = return_z_loss or isinstance(z_loss, torch.Tensor) or z_value != 0
    z = _common.z_loss_tensor(z_loss if with_z else 0.0, compute_dtype, logits.device)
    if inplace_backward and logits.requires_grad:
        # A view shares its base's storage: the base's .grad would alias the base itself.
        storage_owner = logits if logits._base is None else logits._base
        if storage_owner.is_leaf:
            got = "a leaf" if logits.is_leaf else "a view of a leaf"
            raise ValueError(
                f"{fn}: inplace_backward=True overwrites the logits with their gradient, so "
                "`logits` must be computed by the graph, not a leaf tensor or a view of one "
                f"(the leaf's .grad would alias its storage); got {got} that requires grad."
            )
        if not x.is_contiguous():
            raise ValueError(
                f"{fn}: inplace_backward=True needs `logits` contiguous with the class axis "
                f"last (axis={axis} moved there); got strides {tuple(logits.stride())} for "
                f"shape {tuple(logits.shape)}."
            )
    triton = _use_triton(x, from_log_probs)
    options = _Options(convention, pad_index, kl, from_log_probs, with_z, triton, inplace_backward,
                       transform, return_stats)  # fmt: skip
    core = _common.with_forward_mode(_RowLoss, _RowLossForwardMode)
    loss, z_part, peak, log_sum, entropy, correct = core.apply(
        x, labels, counted, eps, weight, class_mask, z, options
    )
    row_weight = None  # the denominator's terms: only "mean" without a normalizer reads them
    if reduction == "mean" and normalizer is None:
        if weight is None:
            row_weight = counted.to(compute_dtype)
        else:
            safe_labels = torch.where(counted, labels, 0).clamp(0, num_classes - 1)
            row_weight = torch.where(counted, _common.at_labels(weight, safe_labels), 0.0)
            row_weight = row_weight.to(compute_dtype)
    outputs = (loss, z_part) if return_z_loss else (loss,)
    outputs = tuple(_common.reduce(value, row_weight, reduction, normalizer) for value in outputs)
    if return_stats:
        lse = torch.where(counted, peak + log_sum, 0.0)
        stats = _closed_form.RowStats(lse, entropy, correct > 0)
        return (*outputs, stats)
    return outputs if return_z_loss else outputs[0]


def _peak(upcast: torch.Tensor) -> torch.Tensor:
    """The row max of ``upcast`` (masked classes already -inf), 0 where it is not finite;
    a constant for autograd (``lse``'s derivative through the peak is exactly 0)."""
    peak = upcast.detach().amax(-1)
    return torch.where(torch.isfinite(peak), peak, 0.0)


def _masked_logsumexp(x, class_mask, compute_dtype, transform) -> _closed_form.Lse:
    """logsumexp over the allowed classes (all of them without a mask) of the transformed
    logits, in two parts."""
    upcast = _closed_form.transformed(x.to(compute_dtype), transform)
    if class_mask is not None:
        upcast = upcast.masked_fill(~class_mask, -torch.inf)
    peak = _peak(upcast)
    return _closed_form.Lse(peak, (upcast - peak.unsqueeze(-1)).exp().sum(-1).log())


def _column_sum(x: torch.Tensor, column_weight: torch.Tensor, pad_index: int | None):
    """``sum_c column_weight_c x_c`` over the last axis, leaving out column ``pad_index`` (the
    ``others_but_pad`` convention's pad; None: every column) as two products over the columns
    on either side of it (views, no rows x K temporary). Summing the pad and subtracting it
    after would let a pad logit of -1e9 swamp the others' sum (a float32 sum keeps ~7 digits)
    and a -inf one make it NaN, where the loss is finite."""
    if pad_index is None:
        return torch.matmul(x, column_weight)
    before = torch.matmul(x[..., :pad_index], column_weight[:pad_index])
    return before + torch.matmul(x[..., pad_index + 1 :], column_weight[pad_index + 1 :])


def _support_sum(x_summed, column_weight, pad_index, labels, *, own: bool) -> torch.Tensor:
    """``sum_c column_weight_c x_summed_c`` over the support: every column but ``pad_index``
    (:func:`_column_sum`) and, unless ``labels`` is None (``"uniform"``), each row's label.

    The label is left out, not summed and subtracted after: its term would cancel against the
    others' (at smoothing 1 with a confident label, float32's rounding of ~16 in a sum of
    ~1e-4) and a -inf label logit would make it NaN. Its column is set to 0 for the products:
    in place and restored after (O(rows) work) when ``x_summed`` is this call's ``own`` buffer,
    autograd does not record it and the call runs eagerly; otherwise in a copy (the caller's
    float32 log-probabilities: a transient rows x K copy, ~3x the products' time on a CPU;
    under ``torch.compile`` Inductor fuses it into the products)."""
    if labels is None:
        return _column_sum(x_summed, column_weight, pad_index)
    index = labels.unsqueeze(-1)
    recorded = torch.is_grad_enabled() and x_summed.requires_grad
    # Under torch.compile the graph is functional anyway, and torch 2.13's Inductor miscompiled
    # the scatter-and-restore where the buffer's class axis is not last in memory (axis=1 of
    # (N, C, d) logits: the loss 1.07 off, the gradient too, with no error). torch.func.vmap
    # has no batching rule for scatter_ (it would loop over the batch); it is asked only
    # eagerly, as Dynamo's tracer cannot ask functorch.
    compiling = torch.compiler.is_compiling()
    if own and not recorded and not compiling and not _common.vmapped(x_summed):
        kept = x_summed.gather(-1, index)
        total = _column_sum(x_summed.scatter_(-1, index, 0.0), column_weight, pad_index)
        x_summed.scatter_(-1, index, kept)  # restored for its next reader (the softmax)
        return total
    return _column_sum(x_summed.scatter(-1, index, 0.0), column_weight, pad_index)


def _row_terms(
    options, x, labels, counted, eps, weight, class_mask, lse=None
) -> _closed_form.RowTerms:
    """Per-row statistics of the closed form (``lstorch._closed_form.RowTerms``), relative to
    each row's max; ``x`` is (..., K), class axis last. Rows that do not count may hold NaN
    here; callers mask them. Masked classes are filled with ``-inf`` (lse) or 0 (sums) before
    each reduction, so a ``-inf`` logit there is harmless. A given ``lse`` (backward's saved
    :class:`_closed_form.Lse`) is used as it is.

    Without a given lse, ``x - peak`` is built once (a transient rows x K tensor, freed before
    backward): the sums read it, then it becomes the softmax's numerator in place.
    """
    num_classes = x.shape[-1]
    compute_dtype = eps.dtype
    safe_labels, bad = _closed_form.label_rows(labels, counted, eps, num_classes, class_mask)
    if lse is None and options.from_log_probs:
        zeros = torch.zeros(labels.shape, dtype=compute_dtype, device=x.device)
        lse = _closed_form.Lse(
            zeros, torch.zeros_like(zeros)
        )  # two outputs: never one tensor twice
    transform = options.transform
    # Whether ``shifted`` is a buffer of this call's (else it is ``x`` itself: log-probabilities
    # in the compute dtype, no transform)
    own = not options.from_log_probs or transform.active or x.dtype != compute_dtype
    if lse is None:
        upcast = _closed_form.transformed(x.to(compute_dtype), transform)
        if class_mask is not None:
            upcast = upcast.masked_fill(~class_mask, -torch.inf)
        peak = _peak(upcast)
        shifted = upcast - peak.unsqueeze(-1)
    else:  # the sums relative to the given peak (0 for log-probabilities: no shift)
        peak = lse.peak
        shifted = _closed_form.transformed(x.to(compute_dtype), transform)
        if not options.from_log_probs:
            shifted = shifted - peak.unsqueeze(-1)
    x_y = x.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1).to(compute_dtype)
    x_y = _closed_form.transformed(x_y, transform)
    if class_mask is None:
        mask_weight = torch.ones((), dtype=compute_dtype, device=x.device)
        x_summed = shifted
    else:
        mask_weight = class_mask.to(compute_dtype)
        x_summed = shifted.masked_fill(~class_mask, 0)
        own = True
    scale = lsspec.sum_scale(num_classes)
    # Each term scaled before it is added (a product with a (K,) vector: no rows x K temporary).
    if weight is None:
        w_y = 1.0
        w_pad = mask_weight.expand(num_classes)[options.pad_index or 0]
        column_weight = torch.full((num_classes,), scale, dtype=compute_dtype, device=x.device)
        support_weight = mask_weight.expand(num_classes).sum()
    else:
        masked_weight = weight * mask_weight
        w_y = _common.at_labels(weight, safe_labels)
        w_pad = masked_weight[options.pad_index] if options.pad_index is not None else 0.0
        column_weight = weight * scale
        support_weight = masked_weight.sum()
    support_labels = None if options.convention == "uniform" else safe_labels
    support_sum = _support_sum(x_summed, column_weight, options.pad_index, support_labels, own=own)
    if options.convention != "uniform":  # (y and the pad are out of support_sum already)
        support_weight = support_weight - w_y
    if options.convention == "others_but_pad":
        support_weight = support_weight - w_pad
    if lse is None:  # the softmax's numerator, in the same buffer (read by nothing else now)
        lse = _closed_form.Lse(peak, shifted.exp_().sum(-1).log())
    size = _closed_form.support_size(options.convention, num_classes, options.pad_index, class_mask)
    return _closed_form.RowTerms(
        lse, x_y, w_y, support_sum, support_weight, safe_labels, bad, size, scale
    )


class _Saved(NamedTuple):
    """What the core's backward and forward mode read: its inputs and the forward's lse."""

    x: torch.Tensor
    labels: torch.Tensor
    counted: torch.Tensor
    eps: torch.Tensor
    weight: torch.Tensor | None
    class_mask: torch.Tensor | None
    z: torch.Tensor
    lse: _closed_form.Lse

    def terms(self, options) -> _closed_form.RowTerms:
        """The closed form's statistics, the sums recomputed from ``x`` around the saved lse."""
        return _row_terms(options, *self[:6], lse=self.lse)

    def bad(self) -> torch.Tensor:
        return _closed_form.label_rows(
            self.labels, self.counted, self.eps, self.x.shape[-1], self.class_mask
        )[1]


def _option_gradients(options, saved: _Saved, grads, needs):
    """``(d eps, d z)`` of ``sum_rows g loss_row + g_z z_row`` (None where ``needs`` is False):
    ``sum_rows g slope_row`` and ``sum_rows (g + g_z) lse_row**2`` over counted rows (NaN from
    invalid ones), in the shapes of ``eps`` and ``z``.

    The z-loss's needs only the saved lse. The smoothing's slope needs ``x_y`` and the support
    sums, which backward otherwise does not: they are recomputed here from ``x`` by plain torch
    ops (the Triton forward does not return them), only when the smoothing is differentiated.
    That costs one more read of the logits (O(rows) results; with a class mask, class weights or
    bf16/fp16 logits, the same transient rows x K temporaries as the plain forward's sums).
    """
    grad_rows, grad_z = grads
    need_eps, need_z = needs
    eps, counted, bad = saved.eps, saved.counted, saved.bad()
    g = grad_rows.to(eps.dtype)
    d_eps = d_z = None
    if need_eps:
        slope = _closed_form.smoothing_slope(saved.terms(options), eps, **_form_options(options))
        d_eps = _closed_form.counted_only(counted, bad, g * slope).sum().reshape(eps.shape)
    if need_z:
        g_total = g + grad_z.to(eps.dtype) if options.with_z else g
        d_z = (
            _closed_form.counted_only(counted, bad, g_total * saved.lse.value.square())
            .sum()
            .to(eps.dtype)
        )
    return d_eps, d_z


def _option_tangents(options, saved: _Saved, tangents):
    """Per-row ``(d loss, d z_part)`` from the tangents of ``eps`` and ``z`` (forward mode):
    ``slope_row * d eps`` (the smoothing's closed-form slope, as in :func:`_option_gradients`)
    and ``lse_row**2 * d z``, 0 on rows that do not count and NaN on invalid ones. A zero
    tangent contributes exactly 0 (``times``), even where the slope is infinite (``kl=True`` at
    eps = 0 or 1): autograd hands zeros for inputs that carry no tangent."""
    eps_tangent, z_tangent = tangents
    counted, bad = saved.counted, saved.bad()
    d_loss, d_z = torch.zeros_like(saved.lse.peak), torch.zeros_like(saved.lse.peak)
    if eps_tangent is not None:
        slope = _closed_form.smoothing_slope(
            saved.terms(options), saved.eps, **_form_options(options)
        )
        d_loss = d_loss + _closed_form.counted_only(counted, bad, times(eps_tangent, slope))
    if z_tangent is not None and options.with_z:
        d_z = _closed_form.counted_only(counted, bad, times(z_tangent, saved.lse.value.square()))
        d_loss = d_loss + d_z
    return d_loss, d_z


def _form_options(options) -> dict:
    """The core's options that the closed form (``lstorch._closed_form``) takes."""
    return {"convention": options.convention, "kl": options.kl}


def kernel_params(
    convention, num_classes, eps, weight=None, class_mask=None, z=None, *, pad_index=None, kl=False
):
    """The ``params`` operand of the kernel operators (``torch.ops.lstorch.smoothed_rows``,
    ``smoothed_rows_backward``, ``smoothed_rows_backward_``): the loss's scalars as one float32
    tensor on ``eps``'s device, built there (no host copy): ``[eps, |S|, sum_c u_c, u_pad, z,
    KL constant]``, ``u`` the class weights times the class mask (ones without either), the KL
    constant 0 unless ``kl``. ``eps`` and ``z`` are 0-d tensors (``z`` None: 0)."""
    z = eps * 0 if z is None else z
    size = _closed_form.support_size(convention, num_classes, pad_index, class_mask)
    zero = eps * 0
    u = weight
    if class_mask is not None:
        u = class_mask.to(eps.dtype) if u is None else u * class_mask
    total = zero + num_classes if u is None else u.sum()
    pad_weight = zero
    if pad_index is not None:
        pad_weight = zero + 1 if u is None else u[pad_index]
    kl_constant = sum(_closed_form.kl_terms(convention, eps, size), zero) if kl else zero
    values = [eps, zero + size, total, pad_weight, z, kl_constant]
    return torch.stack([torch.as_tensor(v).to(eps.device) for v in values]).to(torch.float32)


def _kernel_call(options, x, labels, counted, weight, class_mask):
    """The arguments every ``lstorch.triton_kernels`` call shares."""
    return dict(
        labels=labels.contiguous(),
        counted=counted.contiguous(),
        weight=None if weight is None else weight.to(torch.float32).contiguous(),
        class_mask=None if class_mask is None else class_mask.contiguous(),
        convention=options.convention,
        pad_index=options.pad_index,
        with_z=options.with_z,
    )


def _row_loss_forward(options, x, labels, counted, eps, weight, class_mask, z):
    """``(loss, z_part, peak, log_sum, entropy, correct)`` per row (the last two 0 without
    ``with_stats``; ``correct`` as 0/1 in the compute dtype): on the Triton kernel (one pass
    over ``x``), or the closed form (``lstorch._closed_form.row_loss``) of the statistics of
    ``x``."""
    if options.triton:  # one pass over x, the per-row closed form in the kernel
        params = kernel_params(options.convention, x.shape[-1], eps, weight, class_mask, z,
                               pad_index=options.pad_index, kl=options.kl)  # fmt: skip
        call = _kernel_call(options, x, labels, counted, weight, class_mask)
        return torch.ops.lstorch.smoothed_rows(
            x, call["labels"], call["counted"], params, call["weight"], call["class_mask"],
            options.convention, options.pad_index, options.with_z, options.transform.scale,
            options.transform.cap, options.with_stats,
        )  # fmt: skip
    terms = _row_terms(options, x, labels, counted, eps, weight, class_mask)
    if options.with_z:
        loss, z_part = _closed_form.row_loss(terms, counted, eps, **_form_options(options), z=z)
    else:
        loss = _closed_form.row_loss(terms, counted, eps, **_form_options(options))
        z_part = torch.zeros_like(loss)
    entropy, correct = torch.zeros_like(loss), torch.zeros_like(loss)
    if options.with_stats:
        entropy, correct = _eager_stats(options, x, terms, counted, class_mask)
    return loss, z_part, *terms.lse, entropy, correct


def _eager_stats(options, x, terms: _closed_form.RowTerms, counted, class_mask):
    """``(entropy, correct)`` per row on plain torch ops, 0 on rows that do not count: the
    entropy ``-sum_c p_c log p_c`` of the (transformed) softmax, from the lse just computed
    (one more read of ``x``, two transient rows x K buffers), and whether the first maximal
    allowed logit (``torch.argmax``) is the label, over the logits before the transform."""
    dtype = terms.lse.peak.dtype
    probs = terms.lse.counted(counted).log_softmax(x, dtype, options.transform).exp_()
    if class_mask is not None:
        probs = probs.masked_fill_(~class_mask, 0.0)
    entropy = torch.where(counted, torch.special.entr(probs).sum(-1), 0.0)
    values = x if class_mask is None else x.masked_fill(~class_mask, -torch.inf)
    hit = (values.argmax(-1) == terms.safe_labels) & counted & ~terms.bad
    return entropy, hit.to(dtype)


# ---------------------------------------------------------------------------------------------
# The gradient with respect to the logits, in three modes: the Triton kernel, a first-order
# backward built in one buffer in place (the logits' own storage with inplace_backward), and
# out of place, through differentiable ops, when the gradient will be differentiated again.


class _Target(NamedTuple):
    """The weighted smoothed target of each row, ``t_c = on_true [c = y] + per_class w_c
    [c in S]``, and its total mass ``A = sum_c t_c = on_true + per_class support_weight``."""

    safe_labels: torch.Tensor
    bad: torch.Tensor  # counted rows with an invalid label or smoothing: NaN
    w: torch.Tensor  # (K,) class weights times the class mask (ones without either)
    on_true: torch.Tensor  # (1 - eps) w_y
    per_class: torch.Tensor  # eps / |S|
    support_weight: torch.Tensor  # sum over S of w_c

    def mass(self) -> torch.Tensor:
        return self.on_true + self.per_class * self.support_weight


def _target(options, num_classes, labels, counted, eps, weight, class_mask) -> _Target:
    safe_labels, bad = _closed_form.label_rows(labels, counted, eps, num_classes, class_mask)
    size = _closed_form.support_size(options.convention, num_classes, options.pad_index, class_mask)
    unmasked = torch.ones((), dtype=eps.dtype, device=eps.device) if weight is None else weight
    w = unmasked.expand(num_classes)
    if class_mask is not None:
        w = w * class_mask.to(eps.dtype)  # masked classes leave the support
    w_y = _common.at_labels(unmasked.expand(num_classes), safe_labels)
    support_weight = w.sum()
    if options.convention != "uniform":
        support_weight = support_weight - w_y
    if options.convention == "others_but_pad":
        support_weight = support_weight - w[options.pad_index]
    return _Target(safe_labels, bad, w, (1.0 - eps) * w_y, eps / size, support_weight)


class _GradientOps(NamedTuple):
    """The tensor operations the gradient is built with: in place, into one buffer (first
    order), or out of place, so that autograd can differentiate them (higher orders)."""

    exp: Callable
    masked_fill: Callable
    mul: Callable
    addcmul: Callable
    scatter_add: Callable


_IN_PLACE = _GradientOps(
    torch.Tensor.exp_,
    torch.Tensor.masked_fill_,
    torch.Tensor.mul_,
    torch.Tensor.addcmul_,
    torch.Tensor.scatter_add_,
)
_OUT_OF_PLACE = _GradientOps(torch.exp, torch.masked_fill, torch.mul, torch.addcmul,
                             torch.scatter_add)  # fmt: skip


def _build_gradient(ops: _GradientOps, start, options, saved: _Saved, grads) -> torch.Tensor:
    """``g * r + g_z * 2 z lse p`` with ``r = (A + 2 z lse) * p - t`` (logits) or ``-t``
    (log-probabilities), from ``start``: the log-softmax ``(x - peak) - log_sum`` (logits) or
    zeros (log-probabilities), rows x K in the compute dtype.

    ``t`` and ``A`` as in :class:`_Target`, ``p`` the softmax over the allowed classes,
    ``g``/``g_z`` the upstream gradients of the loss and of the z-part. Per element:
    ``grad_c = scale p_c - g m_c + [c = y] correction + [c = pad] pad_mass``, with ``m =
    (eps / |S|) w`` the smoothing mass; the row scales are applied before the target is
    subtracted, so that with ``ops = _IN_PLACE`` one buffer holds every step.
    """
    x, counted, eps, class_mask = saved.x, saved.counted, saved.eps, saved.class_mask
    grad_rows, grad_z = grads
    target = _target(options, x.shape[-1], saved.labels, counted, eps, saved.weight, class_mask)
    g = grad_rows.to(eps.dtype)
    grad = start  # (the log-softmax of the transformed logits t: a gradient for t, first)
    if not options.from_log_probs:
        scale = g * target.mass()
        if options.with_z:
            safe_lse = saved.lse.counted(counted)
            scale = scale + 2.0 * saved.z * safe_lse.value * (g + grad_z.to(eps.dtype))
        grad = ops.exp(grad)  # softmax(x)
        if class_mask is not None:
            grad = ops.masked_fill(grad, ~class_mask, 0.0)
        grad = ops.mul(grad, scale.unsqueeze(-1))
    # - g t: the smoothing mass over the support, then the confidence on the target.
    grad = ops.addcmul(grad, g.unsqueeze(-1), target.per_class * target.w, value=-1)
    correction = -target.on_true
    if options.convention != "uniform":  # y is not in the support
        correction = correction + target.per_class * _common.at_labels(target.w, target.safe_labels)
    labels = target.safe_labels.unsqueeze(-1)
    grad = ops.scatter_add(grad, -1, labels, (g * correction).unsqueeze(-1))
    if options.convention == "others_but_pad":
        pad_mass = g * target.per_class * target.w[options.pad_index]
        pad_column = torch.full_like(labels, options.pad_index)
        grad = ops.scatter_add(grad, -1, pad_column, pad_mass.unsqueeze(-1).to(grad.dtype))
    if options.transform.active:  # the chain rule: d/dx = dt/dx d/dt, elementwise
        grad = ops.mul(grad, _closed_form.transform_slope(x.to(eps.dtype), options.transform))
    grad = ops.masked_fill(grad, target.bad.unsqueeze(-1), torch.nan)
    return ops.masked_fill(grad, ~counted.unsqueeze(-1), 0.0)


def _kernel_gradient(options, saved: _Saved, grads) -> torch.Tensor:
    """The Triton kernel: one read of ``x`` and one write of the gradient, into ``x`` itself
    with ``inplace_backward`` (an operator that declares it mutates ``x``, so autograd counts
    a version)."""
    x, lse = saved.x, saved.lse
    grad_rows, grad_z = grads
    call = _kernel_call(options, x, saved.labels, saved.counted, saved.weight, saved.class_mask)
    params = kernel_params(options.convention, x.shape[-1], saved.eps, saved.weight,
                           saved.class_mask, saved.z, pad_index=options.pad_index,
                           kl=options.kl)  # fmt: skip
    arguments = (
        call["labels"], call["counted"], params, call["weight"], call["class_mask"],
        lse.peak, lse.log_sum, grad_rows.to(torch.float32),
        grad_z.to(torch.float32) if options.with_z else None,
        options.convention, options.pad_index, options.with_z, options.transform.scale,
        options.transform.cap,
    )  # fmt: skip
    if options.inplace:
        torch.ops.lstorch.smoothed_rows_backward_(x, *arguments)
        return x.detach()  # x's storage, no longer x's history
    return torch.ops.lstorch.smoothed_rows_backward(x, *arguments)


def _first_order_gradient(options, saved: _Saved, grads) -> torch.Tensor:
    """Built in place in one rows x K buffer: a new one, or with ``inplace_backward`` the
    logits' own storage (directly when they are in the compute dtype, else copied back)."""
    x, eps, lse = saved.x, saved.eps, saved.lse.counted(saved.counted)
    # Built in x itself, unless the chain rule through a transform reads x at the end.
    in_x = options.inplace and x.dtype == eps.dtype and not options.transform.active
    if options.from_log_probs:
        start = x.zero_() if in_x else torch.zeros(x.shape, dtype=eps.dtype, device=x.device)
    elif in_x:  # the log-softmax, (x - peak) - log_sum
        start = x.sub_(lse.peak.unsqueeze(-1)).sub_(lse.log_sum.unsqueeze(-1))
    else:
        start = lse.log_softmax(x, eps.dtype, options.transform)
    grad = _build_gradient(_IN_PLACE, start, options, saved, grads)
    if options.inplace:
        return (x if in_x else x.copy_(grad)).detach()  # x's storage, not its history
    return grad.to(x.dtype)


def _differentiable_gradient(options, saved: _Saved, grads) -> torch.Tensor:
    """Out of place, through differentiable ops (double backward, forward over reverse): the
    logits are left as they are, even with ``inplace_backward`` (the recorded graph needs them)."""
    x, eps, lse = saved.x, saved.eps, saved.lse.counted(saved.counted)
    if options.from_log_probs:
        start = torch.zeros(x.shape, dtype=eps.dtype, device=x.device)
    else:
        start = lse.log_softmax(x, eps.dtype, options.transform)
    return _build_gradient(_OUT_OF_PLACE, start, options, saved, grads).to(x.dtype)


def _row_loss_gradient(options, saved: _Saved, grads, *, again: bool) -> torch.Tensor:
    """The logits' gradient by the mode that fits: out of place when it will be differentiated
    ``again`` (``_common.differentiated_again``), else the Triton kernel where the forward ran
    on it, else in place."""
    if again:
        return _differentiable_gradient(options, saved, grads)
    if options.triton:
        return _kernel_gradient(options, saved, grads)
    return _first_order_gradient(options, saved, grads)


def _row_loss_tangent(options, saved: _Saved, tangent):
    """Forward-mode derivative of the rows (loss, z-part) along ``dx = tangent``.

    ``d loss = sum_c (A p_c - t_c) dx_c + d z_part`` with ``d z_part = 2 z lse sum_c p_c dx_c``
    (logits), or ``d loss = -sum_c t_c dx_c`` (``from_log_probs``), ``t``, ``A`` and ``p`` as in
    :func:`_build_gradient`. The target's part is O(rows): ``sum_c t_c dx_c = (1 - eps) w_y
    dx_y + (eps / |S|) (sum_c w_c dx_c - [others] w_y dx_y - [others_but_pad] w_pad dx_pad)``;
    the only rows x K temporary is ``p`` (and the tangent's upcast for bf16/fp16), contracted
    with ``dx`` by a batched product.
    """
    x, counted, eps, class_mask = saved.x, saved.counted, saved.eps, saved.class_mask
    target = _target(options, x.shape[-1], saved.labels, counted, eps, saved.weight, class_mask)
    w = target.w
    dx = tangent.to(eps.dtype)
    if options.transform.active:  # the tangent of the transformed logits
        dx = dx * _closed_form.transform_slope(x.to(eps.dtype), options.transform)
    dx_y = dx.gather(-1, target.safe_labels.unsqueeze(-1)).squeeze(-1)
    support_dot = torch.matmul(dx, w)
    if options.convention != "uniform":
        support_dot = support_dot - _common.at_labels(w, target.safe_labels) * dx_y
    if options.convention == "others_but_pad":
        support_dot = support_dot - w[options.pad_index] * dx[..., options.pad_index]
    target_dot = target.on_true * dx_y + target.per_class * support_dot
    d_z = torch.zeros_like(target_dot)
    if options.from_log_probs:
        d_loss = -target_dot
    else:
        safe_lse = saved.lse.counted(counted)
        probs = safe_lse.log_softmax(x, eps.dtype, options.transform).exp_()  # in its own buffer
        if class_mask is not None:
            probs = probs.masked_fill_(~class_mask, 0.0)
        prob_dot = torch.matmul(probs.unsqueeze(-2), dx.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        d_loss = target.mass() * prob_dot - target_dot
        if options.with_z:
            d_z = 2.0 * saved.z * safe_lse.value * prob_dot
            d_loss = d_loss + d_z
    return _closed_form.counted_only(counted, target.bad, d_loss), _closed_form.counted_only(
        counted, target.bad, d_z
    )


class _RowLoss(torch.autograd.Function):
    """Per-row closed-form loss and z-part; backward recomputes softmax from ``x`` and saved lse.

    ``setup_context`` + ``generate_vmap_rule`` make it work under ``torch.func`` (grad, vmap)
    and ``torch.compile`` (fullgraph) as well as plain autograd; ``_RowLossForwardMode`` adds
    forward mode. Second derivatives: backward runs through differentiable ops, with the lse
    recomputed from ``x``, whenever its result will be differentiated again
    (``_common.differentiated_again``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, labels, counted, eps, weight, class_mask, z, options):
        with _common.autocast_off(x.device.type):
            return _row_loss_forward(options, x, labels, counted, eps, weight, class_mask, z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, labels, counted, eps, weight, class_mask, z, options = inputs
        _, _, peak, log_sum, entropy, correct = output
        ctx.options = options
        ctx.optional = (weight is not None, class_mask is not None)
        extra = [t for t in (weight, class_mask) if t is not None]
        ctx.save_for_backward(x, labels, counted, eps, z, peak, log_sum, *extra)
        ctx.save_for_forward(x, labels, counted, eps, z, peak, log_sum, *extra)  # the same
        ctx.mark_non_differentiable(peak, log_sum, entropy, correct)
        # No zero cotangents built for the outputs nobody differentiates (the statistics, an
        # unused z-part): each would be one more launch per call on a GPU.
        ctx.set_materialize_grads(False)

    @staticmethod
    def _unpack(ctx) -> _Saved:
        x, labels, counted, eps, z, peak, log_sum, *rest = ctx.saved_tensors
        weight = rest.pop(0) if ctx.optional[0] else None
        class_mask = rest.pop(0) if ctx.optional[1] else None
        return _Saved(
            x, labels, counted, eps, weight, class_mask, z, _closed_form.Lse(peak, log_sum)
        )

    @staticmethod
    def backward(ctx, grad_loss, grad_z, *grad_statistics):
        """Gradients for the logits ``x``, the smoothing ``eps`` and the z-loss ``z`` (each only
        when needed); labels, masks and class weights are constants."""
        del grad_statistics  # the lse's parts and the statistics are never differentiated
        if grad_loss is None and grad_z is None:
            return (None,) * 8
        saved = _RowLoss._unpack(ctx)
        # A backward called inside an autocast region (on the CPU autograd runs it on the
        # caller's thread, in its autocast state) computes as the forward did.
        with _common.autocast_off(saved.x.device.type):
            return _RowLoss._backward(ctx, saved, grad_loss, grad_z)

    @staticmethod
    def _backward(ctx, saved: _Saved, grad_loss, grad_z):
        if grad_loss is None:
            grad_loss = torch.zeros_like(grad_z)
        if grad_z is None and ctx.options.with_z:
            grad_z = torch.zeros_like(grad_loss)
        need_x, need_eps, need_z = (ctx.needs_input_grad[i] for i in (0, 3, 6))
        again = _common.differentiated_again(saved.x)
        if again and not ctx.options.from_log_probs:
            # Differentiated again: lse must be a function of x for the Hessian to be right.
            lse = _masked_logsumexp(
                saved.x, saved.class_mask, saved.eps.dtype, ctx.options.transform
            )
            saved = saved._replace(lse=lse)
        grads = (grad_loss, grad_z)
        d_eps = d_z = grad = None
        if need_eps or need_z:  # first: inplace_backward overwrites x with its gradient
            d_eps, d_z = _option_gradients(ctx.options, saved, grads, (need_eps, need_z))
        if need_x:
            grad = _row_loss_gradient(ctx.options, saved, grads, again=again)
        if d_z is not None:
            d_z = d_z.reshape(saved.z.shape)
        return grad, None, None, d_eps, None, None, d_z, None


class _RowLossForwardMode(_RowLoss):
    """``_RowLoss`` with ``jvp``: ``torch.func.jvp``/``jacfwd``/``hessian`` and
    ``torch.autograd.forward_ad`` (``_common.with_forward_mode`` says why it is a separate class).
    Tangents of the logits, the smoothing and the z-loss weight move the rows; labels, masks
    and class weights are constants."""

    @staticmethod
    def jvp(ctx, x_tangent, *other_tangents):
        saved = _RowLoss._unpack(ctx)
        with _common.autocast_off(saved.x.device.type):
            return _RowLossForwardMode._jvp(ctx, saved, x_tangent, other_tangents)

    @staticmethod
    def _jvp(ctx, saved: _Saved, x_tangent, other_tangents):
        eps_tangent, z_tangent = other_tangents[2], other_tangents[5]
        d_loss, d_z = torch.zeros_like(saved.lse.peak), torch.zeros_like(saved.lse.peak)
        if x_tangent is not None:
            d_loss, d_z = _row_loss_tangent(ctx.options, saved, x_tangent)
        if eps_tangent is not None or z_tangent is not None:
            option_loss, option_z = _option_tangents(ctx.options, saved, (eps_tangent, z_tangent))
            d_loss, d_z = d_loss + option_loss, d_z + option_z
        return d_loss, d_z, None, None, None, None  # the statistics: non-differentiable
