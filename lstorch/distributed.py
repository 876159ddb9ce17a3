"""Vocabulary-parallel label-smoothed cross-entropy over ``torch.distributed``.

Each rank of ``group`` holds one contiguous slice of the vocabulary (rank ``r`` of ``n`` holds
classes ``[r * V_local, (r + 1) * V_local)``, ``K = n * V_local``), as in Megatron's
tensor-parallel output layer, and the same labels (and, for the fused head, the same hidden
states). The loss is the closed form of SEMANTICS.md §1 with GLOBAL statistics, so every rank
gets the single-device loss and the slice of the single-device gradient that belongs to its
logits (Megatron's label smoothing uses the local vocabulary size and the local mean instead:
loss and gradients differ between ranks, Megatron-LM#737).

* :func:`vocab_parallel_smoothed_cross_entropy`: this rank's slice of the logits.
* :func:`vocab_parallel_fused_linear_smoothed_cross_entropy`: this rank's rows of the output
  layer's weight; no rows x V logits anywhere, not even per rank.
* ``lstorch.smoothed_cross_entropy`` of a DTensor sharded on the class axis calls the first
  (:func:`dtensor_smoothed_cross_entropy`).

Communication per call, for ``R`` rows and ``b`` bytes per value of the compute dtype (4 for
bf16/fp16/float32 logits, 8 for float64): two all-reduces in forward, the max (``R b`` bytes)
and then one packed sum (the sum-exp, the label's logit, the support sum and the pad's logit,
plus the label's class weight with ``weight`` or ``class_mask``: ``4 R b``, or ``5 R b + 2 b``).
Backward needs none for the logits (``g * (A softmax - t)`` on the local slice uses the global
statistics saved by the forward); the fused head's backward all-reduces ``d hidden`` (``R D b``
bytes, the price of a replicated input, as Megatron's column-parallel layer pays it). Where the
host reads the labels (CPU tensors by default, or ``check_labels=True``), one all-reduce of two
integers comes first: the ranks' class counts, so that shards of unequal size raise on every
rank before any check that depends on ``K`` could raise on some alone. A backward that will be
differentiated again (``create_graph=True``, forward over reverse) recomputes the global lse
through a differentiable all-reduce (one more of ``R b`` bytes, and one in its own backward), so
that Hessian-vector products are exact (the fused head also passes its hidden states and their
gradient through differentiable all-reduces). Forward mode of the dense loss (``jvp``,
``torch.autograd.forward_ad``; the fused head has none) all-reduces the rows' O(R) tangents once
(``R b`` bytes; ``2 R b`` with a z-loss: the loss's and the z-part's). ``where``,
``normalizer``, ``kl``, ``z_loss`` and ``return_z_loss`` add no
communication: the row mask is the same on every rank, and the KL constant and ``z lse**2`` are
functions of the global statistics already all-reduced. ``class_mask`` is the full ``(K,)`` mask
on every rank (``K`` bytes, as the labels are replicated): every rank checks it and raises alike
(a rank that raised alone would leave the others waiting in a collective), and ``|S|`` needs no
collective; its columns enter the packed sum as support weights ``u = w m`` (the weighted call's
``5 R b + 2 b``). ``softcap`` and ``logit_scale`` add none either: the transform is elementwise,
so each rank applies it to its own logits. ``return_stats=True`` adds bytes to the same two
forward all-reduces and no collective: the max carries each row's raw max logit beside the peak
(``2 R b``), the packed sum two more values per row (``+ 2 R b``: the entropy's ``sum_c exp(t_c
- m) (t_c - m)`` and the argmax's tie count).

Under ``torch.compile`` each loss's ``autograd.Function`` runs outside the graph, as it runs
eagerly (a graph break; PyTorch 2.13's Inductor miscompiled its in-place all-reduces, see
:func:`_eager_apply`), and the rest of the step compiles around it.

The JAX counterparts are ``lsjax.smoothed_cross_entropy`` on logits placed by a
``NamedSharding`` and ``lsjax.sharded.sharded_fused_linear_smoothed_cross_entropy``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

import lsspec
from lstorch import _closed_form, _common
from lstorch import fused as _fused  # its chunking and rounding helpers (private), not copied
from lstorch._common import is_dtensor, times

__all__ = [
    "dtensor_smoothed_cross_entropy",
    "is_dtensor",
    "vocab_parallel_fused_linear_smoothed_cross_entropy",
    "vocab_parallel_smoothed_cross_entropy",
]


def vocab_parallel_smoothed_cross_entropy(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    smoothing: float | torch.Tensor = 0.0,
    convention: str = "uniform",
    ignore_index: int | None = None,
    pad_index: int | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "none",
    where: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    kl: bool = False,
    from_log_probs: bool = False,
    class_mask: torch.Tensor | None = None,
    z_loss: float | torch.Tensor = 0.0,
    return_z_loss: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    check_labels: bool | None = None,
    _caller: lsspec.Caller | None = None,
    _shard: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    r"""``smoothed_cross_entropy`` of logits split over the vocabulary across ``group``'s ranks.

    With ``x`` the (global) logits of a row, ``K = world_size * V_local``, ``w`` the class
    weights (1 without ``weight``)::

        lse = m + log(all_reduce_sum(sum_local exp(x - m))),  m = all_reduce_max(max_local x)
        loss = (1 - eps) w_y (lse - x_y) + eps sum_{c in S} w_c (lse - x_c) / |S|
               [+ sum_c q_c log q_c with kl]  [+ z lse**2 with z_loss]

    where ``x_y``, ``w_y``, ``sum_c w_c x_c``, ``x_pad`` (and ``sum_c w_c``, ``w_pad``) are
    all-reduced sums of each rank's share (only the rank holding the class contributes). Every
    rank returns the same loss, bit for bit, equal to ``lstorch.smoothed_cross_entropy(
    full_logits, labels, ...)`` (and so, for ``convention="uniform"``, to
    ``F.cross_entropy(full_logits, labels, weight=full_weight, label_smoothing=eps)``); the
    gradient with respect to ``local_logits`` is that rank's slice of the full gradient,
    ``(g A + (g + g_z) 2 z lse) softmax(x) - g t`` with ``t`` the weighted smoothed target, ``A
    = sum_c t_c`` and ``g_z`` the z-part's cotangent (``return_z_loss``).

    Communication: two all-reduces in forward, of ``R b`` and ``4 R b`` bytes (``5 R b + 2 b``
    with ``weight`` or ``class_mask``) for ``R`` rows and ``b`` bytes per value (4, or 8 for
    float64 logits), whatever the other options, except ``return_stats``: ``2 R b`` and ``2 R
    b`` more; none in backward. Where the host reads the labels, one of 16 bytes before them
    (the ranks' class counts: see the module's docstring).

    Args:
      local_logits: ``(..., V_local)``, this rank's slice of the class axis (the last axis).
      labels: global class indices, the same on every rank, shape ``local_logits.shape[:-1]``.
      group: the process group the vocabulary is split over (default: the world).
      smoothing: as ``smoothed_cross_entropy``. A ``smoothing`` tensor that requires grad is
        differentiated: every rank gets ``d loss / d smoothing`` of the whole loss (the same on
        every rank, from the global statistics), no further all-reduce.
      convention: as ``smoothed_cross_entropy``.
      ignore_index: as ``smoothed_cross_entropy``.
      pad_index: as ``smoothed_cross_entropy``; a global class index.
      weight: this rank's slice of the class weights, ``(V_local,)`` (classes ``[r * V_local,
        (r + 1) * V_local)`` of torch's ``weight``), a constant; ``"mean"`` divides by the sum
        of ``w_y`` over the counted rows, as torch does.
      reduction: as ``smoothed_cross_entropy``.
      where: as ``smoothed_cross_entropy``: a boolean row mask with the labels' shape, the same
        on every rank; False rows count for nothing.
      normalizer: as ``smoothed_cross_entropy``: with ``reduction="mean"``, divide the sum by
        this instead (the token count of a whole accumulated batch).
      kl: as ``smoothed_cross_entropy``: the KL form (SEMANTICS.md §2), the loss plus the
        target's ``sum_c q_c log q_c``, a constant per row from the global ``|S|``.
      from_log_probs: as ``smoothed_cross_entropy``: ``local_logits`` are this rank's slice of
        log-probabilities (``log_softmax`` over all K classes, taken before the split): the
        loss is ``-sum_c q_c x_c`` with no lse (the two all-reduces carry the same bytes, the
        max and the sum-exp as constants), its gradient ``-g t`` on the slice. Not with
        ``z_loss``, ``softcap``, ``logit_scale`` or ``return_stats``, which need logits.
      class_mask: as ``smoothed_cross_entropy``: the FULL boolean ``(K,)`` mask, the same on
        every rank (unlike ``weight``, not a slice); masked classes leave the lse, the softmax
        and the smoothing's support (SEMANTICS.md §7). A counted row whose label is masked
        raises on every rank (or is NaN where the labels are not read).
      z_loss: as ``smoothed_cross_entropy``: ``z >= 0``; adds ``z * lse**2`` (the global lse)
        to every counted row. A tensor that requires grad is differentiated (``d z``, the whole
        loss's, on every rank).
      return_z_loss: also return the z-part alone, reduced like the loss: ``(loss, z_part)``.
      softcap: as ``smoothed_cross_entropy``: ``t = cap * tanh(x / cap)`` (after
        ``logit_scale``), applied by each rank to its own logits before the lse and the sums;
        no collective.
      logit_scale: as ``smoothed_cross_entropy``: ``x`` times this first (a number > 0).
      return_stats: also return ``lstorch.RowStats(lse, entropy, correct)`` per row, as
        ``smoothed_cross_entropy`` does (after the loss and the z-part), the same on every rank:
        the global lse and entropy of the transformed logits, and whether torch's first-max
        argmax over all K (allowed) logits before the transform is the label. Each rank adds
        its row's raw max to the max all-reduce and two values per row (the entropy's sum, the
        argmax's tie count) to the packed sum: ``3 R b`` more bytes, no further collective.
      check_labels: as ``smoothed_cross_entropy``: ``None`` reads and checks the labels on the
        CPU only (on an accelerator, no read-back: a label out of range gives a NaN row on
        every rank), ``True`` on any device, ``False`` never.

    Returns:
      float32 for bf16/fp16/float32 logits, float64 for float64; per row for ``"none"``, else
      a scalar; ``(loss, z_part)`` with ``return_z_loss``; ``(..., stats)`` with
      ``return_stats``. The same on every rank, and the same inside a ``torch.autocast``
      region as outside it.
    """
    fn = lsspec.caller("vocab_parallel_smoothed_cross_entropy", _caller)
    _common.floating(fn, local_logits=local_logits)
    lsspec.check_has_class_axis(fn, "local_logits", tuple(local_logits.shape))
    labels = _common.integer_labels(fn, labels)  # widened before any comparison
    _common.same_device(fn, "local_logits", local_logits.device, labels=labels)
    lsspec.check_labels_shape(fn, tuple(labels.shape), tuple(local_logits.shape[:-1]))
    options = lsspec.LabelOptions(smoothing, convention, ignore_index, pad_index, reduction)
    where = _common.tensor_option(fn, "where", where, local_logits.device, "local_logits")
    _common.check_bool(fn, "where", where)
    compute_dtype = _common.compute_dtype(local_logits.dtype)
    layout, counted, class_weight, z = _prologue(
        fn, local_logits.shape[-1], labels, options, weight, group, compute_dtype,
        check_labels=check_labels, where=where, normalizer=normalizer, kl=kl,
        from_log_probs=from_log_probs, class_mask=class_mask, z_loss=z_loss,
        return_z_loss=return_z_loss, softcap=softcap, logit_scale=logit_scale,
        return_stats=return_stats, shard=_shard,
    )  # fmt: skip
    eps = _common.smoothing_tensor(smoothing, compute_dtype, local_logits.device)  # differentiated
    _check_not_a_compiled_transform(fn)
    rows = _common.with_forward_mode(_VocabParallelRows, _VocabParallelRowsForwardMode)
    loss, z_part, lse, _, w_y, _, entropy, correct = _eager_apply(
        rows, local_logits, labels, counted, eps, class_weight, z, layout
    )
    outputs = _reduced(loss, z_part, counted, w_y, reduction, normalizer, return_z_loss)
    return _with_stats(outputs, return_stats, counted, lse, entropy, correct)


@torch.compiler.disable
def _eager_apply(function: type[torch.autograd.Function], *inputs):
    """``function.apply(*inputs)``, kept out of ``torch.compile``'s graph: under compile the
    loss's Function runs as it runs eagerly, forward and backward, and the rest of the step is
    compiled around it (a graph break; ``fullgraph=True`` raises).

    Inductor (torch 2.13) miscompiles the cores' collectives: it writes the parts of a
    ``torch.cat`` into the concatenation's own buffer, and then all-reduces that buffer in
    place, so a part the core reads again after the all-reduce (the fused head's local lse; the
    raw max that ``return_stats`` compares with the global one) reads the reduced value
    instead. On 2 gloo ranks the fused head's loss came out 6.40 for 5.94, and the dense loss's
    ``stats.correct`` False for two of four correct rows, with no error
    (``tests/test_vocab_parallel.py``, the compiled step)."""
    return function.apply(*inputs)


def _check_not_a_compiled_transform(fn) -> None:
    """Refuses ``torch.compile`` tracing a ``torch.func`` transform of the loss
    (``lstorch._common.traced_functorch``): Dynamo may inline the autograd.Function's
    ``forward`` and skip its ``backward`` (pytorch#193279, in torch 2.13), and these forwards,
    written for their backward (collectives, no autograd record), then differentiate to a
    wrong gradient: the dense one was off by 0.15 on one rank as on two, a plausible wrong
    number."""
    if _common.traced_functorch():
        name, _ = lsspec.names(fn)
        raise NotImplementedError(
            f"{name}: torch.compile of a torch.func transform of this loss (torch.func.grad, "
            "vjp, jacrev, ...) is not supported: Dynamo inlines the loss's forward and skips its "
            "backward (pytorch#193279, torch 2.13), and the gradient would be wrong. Run the "
            "transform eagerly, or compile a step that calls .backward()."
        )


def _with_stats(outputs, return_stats, counted, lse, entropy, correct):
    """``outputs`` and, with ``return_stats``, a ``RowStats`` after them (as the dense loss
    returns it: 0, 0 and False on rows that do not count)."""
    if not return_stats:
        return outputs
    stats = _closed_form.RowStats(torch.where(counted, lse, 0.0), entropy, correct > 0)
    return (*(outputs if isinstance(outputs, tuple) else (outputs,)), stats)


def _reduced(loss, z_part, counted, w_y, reduction, normalizer, return_z_loss):
    """The rows reduced (the z-part alone too, reduced alike, with ``return_z_loss``)."""
    row_weight = torch.where(counted, w_y, 0.0)
    loss = _common.reduce(loss, row_weight, reduction, normalizer)
    if not return_z_loss:
        return loss
    return loss, _common.reduce(z_part, row_weight, reduction, normalizer)


def vocab_parallel_fused_linear_smoothed_cross_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias_shard: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    smoothing: float | torch.Tensor = 0.0,
    convention: str = "uniform",
    ignore_index: int | None = None,
    pad_index: int | None = None,
    class_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = _fused.DEFAULT_CHUNK_SIZE,
    where: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    kl: bool = False,
    class_mask: torch.Tensor | None = None,
    z_loss: float | torch.Tensor = 0.0,
    return_z_loss: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    check_labels: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    r"""``fused_linear_smoothed_cross_entropy`` with the output layer split over the vocabulary.

    Each rank of ``group`` holds the rows of the output layer's weight (and bias) for its slice
    of the vocabulary, ``weight_shard = weight[r * V_local : (r + 1) * V_local]``, and the same
    ``hidden`` and ``labels``. With ``x = hidden @ weight.T + bias`` (``K = world_size *
    V_local`` classes, never built: each rank walks its own rows in chunks of ``chunk_size``)::

        loss = (1 - eps) w_y (lse - x_y) + eps sum_{c in S} w_c (lse - x_c) / |S|
               [+ sum_c q_c log q_c with kl]  [+ z lse**2 with z_loss]

    ``lse`` is combined from each rank's chunked logsumexp (an all-reduce of the max, then of
    the sum-exp), ``x_y = hidden . weight[y] + bias[y]`` (the rank holding ``y`` contributes)
    and ``sum_c w_c x_c = hidden . (sum_c w_c weight_c) + sum_c w_c bias_c`` (a rank-1 product
    per rank) are all-reduced sums. Every rank returns the same loss, bit for bit, equal to
    ``lstorch.fused_linear_smoothed_cross_entropy(hidden, full_weight, labels, ...)`` and to
    ``lstorch.smoothed_cross_entropy(F.linear(hidden, full_weight, full_bias), labels, ...)``.
    Backward recomputes each chunk's logits: ``d weight_shard`` and ``d bias_shard`` are this
    rank's rows of the full gradients, and ``d hidden`` is summed over the group (an
    all-reduce), so that every rank gets the full gradient for the replicated ``hidden``.

    Communication per call, ``R`` rows, ``D`` features, ``b`` bytes per value (4; 8 for
    float64): forward, two all-reduces of ``R b`` and ``4 R b`` bytes (``5 R b + 2 b`` with
    ``class_weight`` or ``class_mask``), whatever the other options, except ``return_stats``:
    ``2 R b`` and ``2 R b`` more (and, where the host reads the labels, one of 16 bytes before
    them: the ranks' class counts); backward, one of ``R D b`` bytes (``d hidden``, only when
    ``hidden`` requires grad). Nothing ``R x V`` crosses the
    wire or exists on any rank.

    Its JAX twin is ``lsjax.sharded.sharded_fused_linear_smoothed_cross_entropy``, the fused
    loss under ``shard_map`` with the weight split over a vocabulary axis.

    Args:
      hidden: ``(..., D)``, the features that feed the output layer, the same on every rank.
      weight_shard: ``(V_local, D)``, this rank's rows of the ``(V, D)`` weight.
      labels: global class indices, the same on every rank, the hidden's shape without ``D``.
      bias_shard: optional ``(V_local,)``, this rank's slice of the bias.
      group: the process group the vocabulary is split over (default: the world).
      smoothing: ``eps`` in [0, 1], as ``fused_linear_smoothed_cross_entropy``; a tensor that
        requires grad is differentiated (the whole loss's derivative on every rank).
      convention: ``"uniform"`` | ``"others"`` | ``"others_but_pad"`` (needs ``pad_index``).
      ignore_index: rows whose label equals it count for nothing (left out of ``"mean"``).
      pad_index: the pad column of ``"others_but_pad"`` (a global class index).
      class_weight: this rank's slice of the per-class weights, ``(V_local,)``, a constant
        (torch's ``weight`` of ``F.cross_entropy``); ``"mean"`` divides by the sum of ``w_y``.
      reduction: ``"none"`` | ``"sum"`` | ``"mean"`` (over counted rows; 0 when none counts).
      chunk_size: classes per chunk on each rank.
      where: boolean row mask with the labels' shape, the same on every rank; False rows count
        for nothing.
      normalizer: with ``reduction="mean"``, divide the sum by this instead.
      kl: the KL form (SEMANTICS.md §2): plus the target's ``sum_c q_c log q_c`` per row.
      class_mask: the FULL boolean ``(K,)`` mask, the same on every rank (not a slice: every
        rank checks it alike, and ``|S|`` needs no collective); masked classes leave the lse,
        the softmax and the support. A counted row whose label is masked raises on every rank
        (or is NaN where the labels are not read).
      z_loss: ``z >= 0``; adds ``z * lse**2`` (the global lse) to every counted row; a tensor
        that requires grad is differentiated (the whole loss's ``d z`` on every rank).
      return_z_loss: also return the z-part alone, reduced like the loss: ``(loss, z_part)``.
      softcap: as ``smoothed_cross_entropy``: ``t = cap * tanh(x / cap)`` (after
        ``logit_scale``), applied by each rank to its own logits, chunk by chunk, before the
        lse and the sums; no collective.
      logit_scale: as ``smoothed_cross_entropy``: ``x`` times this first (a number > 0).
      return_stats: also return ``lstorch.RowStats(lse, entropy, correct)`` per row, as
        ``smoothed_cross_entropy`` does (after the loss and the z-part), the same on every rank:
        the global lse and entropy of the transformed logits, and whether torch's first-max
        argmax over all K (allowed) logits before the transform is the label. Each rank adds
        its row's raw max to the max all-reduce and two values per row (the entropy's sum, the
        argmax's tie count) to the packed sum: ``3 R b`` more bytes, no further collective.
      check_labels: as ``smoothed_cross_entropy``: ``None`` reads and checks the labels on the
        CPU only, ``True`` on any device, ``False`` never (a label out of range: a NaN row).

    Returns:
      float32 for bf16/fp16/float32 inputs, float64 for float64; per row for ``"none"``, else
      a scalar; ``(loss, z_part)`` with ``return_z_loss``; ``(..., stats)`` with
      ``return_stats``. The same on every rank. Reverse mode to any order: a backward that
      will be differentiated again (``create_graph=True``, ``torch.func.grad`` of
      ``torch.func.grad``) recomputes the global lse through a differentiable all-reduce, and
      the hidden states' gradient is all-reduced as a differentiable op, so Hessian-vector
      products of the hidden states and of each rank's weight rows are exact (one more
      all-reduce of ``R b`` bytes; the second backward all-reduces ``R b`` and ``R D b``).
      Forward mode (``jvp``, ``torch.autograd.forward_ad``) raises.
    """
    fn = "vocab_parallel_fused_linear_smoothed_cross_entropy"
    names = lsspec.caller(fn, weight="weight_shard", bias="bias_shard")
    operand_dtype = _fused._check_fused(names, hidden, weight_shard, bias_shard, labels)
    labels = _common.index_labels(labels)
    options = lsspec.LabelOptions(smoothing, convention, ignore_index, pad_index, reduction)
    chunk_size = lsspec.check_chunk_size(fn, chunk_size)
    compute_dtype = _common.compute_dtype(operand_dtype)
    local_classes = weight_shard.shape[0]
    where = _common.tensor_option(names, "where", where, hidden.device, "hidden")
    _common.check_bool(names, "where", where)
    layout, counted, class_weight, z = _prologue(
        lsspec.caller(fn, weight="class_weight"), local_classes, labels, options, class_weight,
        group, compute_dtype, check_labels=check_labels, where=where, normalizer=normalizer,
        kl=kl, class_mask=class_mask, z_loss=z_loss, return_z_loss=return_z_loss,
        softcap=softcap, logit_scale=logit_scale, return_stats=return_stats,
        chunk_size=chunk_size,
        operand_dtype=operand_dtype,
    )  # fmt: skip
    eps = _common.smoothing_tensor(smoothing, compute_dtype, hidden.device)  # differentiated
    if bias_shard is None:
        bias_shard = torch.zeros(local_classes, dtype=hidden.dtype, device=hidden.device)
    _check_not_a_compiled_transform(fn)
    loss, z_part, lse, _, w_y, _, entropy, correct = _eager_apply(
        _FusedVocabParallelRows,
        hidden.reshape(-1, hidden.shape[-1]),
        weight_shard,
        bias_shard,
        labels.reshape(-1),
        counted.reshape(-1),
        eps,
        class_weight,
        z,
        layout,
    )
    shape = labels.shape
    outputs = _reduced(
        loss.reshape(shape), z_part.reshape(shape), counted, w_y.reshape(shape), reduction,
        normalizer, return_z_loss,
    )  # fmt: skip
    return _with_stats(outputs, return_stats, counted, lse.reshape(shape),
                       entropy.reshape(shape), correct.reshape(shape))  # fmt: skip


# The options of smoothed_cross_entropy that the vocabulary-parallel path takes (and weight).
_DTENSOR_OPTIONS = (
    "smoothing", "convention", "ignore_index", "pad_index", "reduction", "where", "normalizer",
    "kl", "from_log_probs", "class_mask", "z_loss", "return_z_loss", "softcap", "logit_scale",
    "return_stats", "check_labels",
)  # fmt: skip


def _whole(value):
    """A DTensor option as the plain tensor every rank holds whole: its local tensor when
    replicated, else gathered (``full_tensor``: an all-gather of the option, e.g. ``K`` bytes
    of a sharded ``class_mask``); anything else as it is."""
    if not is_dtensor(value):
        return value
    from torch.distributed.tensor import Replicate

    if all(placement == Replicate() for placement in value.placements):
        return value.to_local()
    return value.full_tensor()


def dtensor_smoothed_cross_entropy(logits, labels, *, axis=None, weight=None, _caller=None,
                                   **options):  # fmt: skip
    """``lstorch.smoothed_cross_entropy`` of a DTensor ``logits`` sharded on its class axis
    (``Shard(axis)`` over a 1-D device mesh; as torch's ``loss_parallel``, shards may differ in
    size, ``K`` need not divide by the mesh's size, as long as every rank holds a class): each
    rank computes :func:`vocab_parallel_smoothed_cross_entropy` on its local shard over the
    mesh's process group, without gathering the logits. ``labels`` are a tensor or a
    replicated DTensor; ``weight`` a full ``(K,)`` tensor (each rank takes its slice) or a
    DTensor sharded or replicated over the same mesh. ``where``, ``normalizer``, ``kl``,
    ``from_log_probs``, ``class_mask`` (the full ``(K,)`` mask), ``z_loss``,
    ``return_z_loss``, ``softcap``, ``logit_scale``, ``return_stats`` and ``check_labels`` are
    those of :func:`vocab_parallel_smoothed_cross_entropy` (a tensor option may be a DTensor:
    its local tensor when replicated, else gathered whole). Returns what the dense call
    returns, each tensor a replicated DTensor on the mesh (``(loss, z_part)``, ``RowStats`` of
    DTensors; the loss's backward reaches ``logits`` as a ``Shard(axis)`` gradient).
    ``inplace_backward`` raises when given a value other than its default."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from lstorch.smoothed import smoothed_cross_entropy

    fn = lsspec.caller("smoothed_cross_entropy", _caller)
    name, arg = lsspec.names(fn)
    parameters = inspect.signature(smoothed_cross_entropy).parameters
    for option in [option for option in options if option not in _DTENSOR_OPTIONS]:
        value, default = options.pop(option), parameters[option].default
        if value is not default and not (lsspec.is_number(value) and value == default):
            raise ValueError(
                f"{name}: `{arg(option)}` is not supported with DTensor logits (the "
                f"vocabulary-parallel path takes {', '.join(_DTENSOR_OPTIONS)}, weight and "
                f"axis); got {arg(option)}={value!r}."
            )
    mesh, placements = logits.device_mesh, logits.placements
    axis = _common.class_axis(fn, axis, logits.ndim, tuple(logits.shape))
    if mesh.ndim != 1 or placements != (Shard(axis),):
        raise ValueError(
            f"{name}: DTensor `{arg('logits')}` must be sharded on its class axis {axis} over a "
            f"1-D device mesh (placements (Shard({axis}),)); got a {mesh.ndim}-D mesh with "
            f"placements {placements}."
        )
    world, rank = mesh.size(), mesh.get_local_rank()
    num_classes, local = logits.shape[axis], logits.to_local().movedim(axis, -1)
    # torch's Shard splits as torch.chunk does: ceil(K / world) classes a rank, the last
    # ranks fewer (K = 50257 over 4 ranks: 12565, 12565, 12565, 12562). Every rank knows every
    # shard from K and the world size: the checks below raise on every rank alike.
    chunk = -(-num_classes // world)
    if chunk * (world - 1) >= num_classes:
        raise ValueError(
            f"{name}: DTensor `{arg('logits')}` split as torch's Shard splits it ({chunk} "
            f"classes a rank) leaves the last ranks no class: {num_classes} classes over "
            f"{world} ranks; use at most {-(-num_classes // chunk)} ranks, or pad the "
            f"vocabulary."
        )
    start = rank * chunk
    stop = min(start + chunk, num_classes)
    if local.shape[-1] != stop - start:
        raise ValueError(
            f"{name}: DTensor `{arg('logits')}` must hold classes [{start}, {stop}) of "
            f"{num_classes} on rank {rank} (torch's Shard({axis}) layout); got a local shard "
            f"of {local.shape[-1]} classes."
        )
    if isinstance(labels, DTensor):
        if any(placement != Replicate() for placement in labels.placements):
            raise ValueError(
                f"{name}: DTensor `{arg('labels')}` must be replicated over the mesh; got "
                f"placements {labels.placements}."
            )
        labels = labels.to_local()
    for option in ("where", "normalizer", "class_mask", "z_loss"):
        if option in options:
            options[option] = _whole(options[option])
    if weight is not None:  # (K,) on every rank, whole or as a DTensor: every rank checks it
        if not isinstance(weight, DTensor):
            weight = _common.tensor_option(fn, "weight", weight, logits.device)
        lsspec.check_row_options_shapes(fn, num_classes, (), weight=weight)
    if isinstance(weight, DTensor):
        sharded = weight.placements == (Shard(0),)
        weight = weight.to_local()
        if not sharded:
            weight = weight[start:stop]
    elif weight is not None:
        weight = weight[start:stop]
    output = vocab_parallel_smoothed_cross_entropy(
        local, labels, group=mesh.get_group(), weight=weight, _caller=fn,
        _shard=(start, num_classes), **options,
    )  # fmt: skip

    def replicated(value):  # every rank holds the same value: no check, no collective
        if isinstance(value, _closed_form.RowStats):
            return _closed_form.RowStats(*map(replicated, value))
        if isinstance(value, tuple):  # (loss, z_part[, stats])
            return tuple(map(replicated, value))
        return DTensor.from_local(value, mesh, [Replicate()], run_check=False)

    return replicated(output)


class _Layout(NamedTuple):
    """Where this rank's classes lie in the vocabulary, and the options that need the layout."""

    convention: str
    pad_index: int | None
    start: int  # the first (global) class this rank holds
    num_classes: int  # K, the global number of classes
    group: Any  # the process group the vocabulary is split over
    chunk_size: int = 0  # the fused head's classes per chunk
    operand_dtype: torch.dtype | None = None  # the fused head's operands' (autocast's) dtype
    kl: bool = False  # the KL form: plus the target's sum_c q_c log q_c, a constant per row
    from_log_probs: bool = False  # the input is log-probabilities: lse 0, no softmax
    with_z: bool = False  # a z-loss term z lse**2 (computed only when it can matter)
    class_mask: Any = None  # the full (K,) class mask, the same on every rank, or None
    local_mask: Any = None  # this rank's slice of it
    size: Any = None  # |S| under the class mask (a 0-d tensor), None without one
    transform: lsspec.LogitTransform = _closed_form.IDENTITY  # softcap(logit_scale * x)
    with_stats: bool = False  # also the rows' entropy and whether the argmax is the label
    caller: Any = None  # the function the user called (named by errors)
    check_labels: bool | None = None  # whether the host may read values (_common.reads_values)
    # Whether the caller gave (start, K) (a DTensor's layout, shards of any size); else every
    # rank holds V_local classes, K = world * V_local, and unequal shards are an error.
    given_shard: bool = False


def _size(layout: _Layout):
    """``|S|``, the number of classes smoothed over (global): from the full class mask."""
    if layout.size is not None:
        return layout.size
    return _closed_form.support_size(layout.convention, layout.num_classes)


def _transformed(x, layout: _Layout, compute_dtype):
    """``softcap(logit_scale * x)`` in ``compute_dtype`` (a new tensor), or ``x`` itself
    without a transform (its reductions upcast as before)."""
    if not layout.transform.active:
        return x
    return _closed_form.transformed(x.to(compute_dtype), layout.transform)


def _entropy_share(allowed, global_peak):
    """``sum_c exp(t_c - peak) (t_c - peak)`` per row over ``allowed`` (masked classes at -inf
    give 0, not NaN)."""
    shifted = allowed - global_peak.unsqueeze(-1)
    weights = torch.exp(shifted)
    return torch.where(weights > 0, weights * shifted, 0.0).sum(-1)


def _allowed(x, mask, start=0, stop=None):
    """``x`` with the masked classes at ``-inf`` (out of the lse and the softmax), out of place;
    ``mask`` this rank's slice (None: ``x``), ``[start, stop)`` the columns ``x`` holds."""
    if mask is None:
        return x
    return x.masked_fill(~mask[start : stop if stop is not None else mask.shape[0]], -torch.inf)


def _check_even_shards(fn, local_classes: int, labels, group, check_labels) -> None:
    """Where the host reads values (``_common.reads_values``: CPU tensors by default), one
    all-reduce of this rank's class count and its negative before any check that depends on
    ``K = world * V_local``. With shards of unequal size those checks (labels in range,
    ``class_mask``'s shape, ``pad_index``) would raise on some ranks only, and the others would
    wait in the loss's collectives until the group's timeout; every rank raises alike instead.
    Where the host reads nothing (an accelerator's default), :func:`_global_terms` carries the
    same counts in its first all-reduce and the rows are NaN."""
    if not _common.reads_values(labels, check_labels):
        return
    shards = torch.tensor([local_classes, -local_classes], device=labels.device)
    dist.all_reduce(shards, op=dist.ReduceOp.MAX, group=group)
    largest, smallest = int(shards[0]), int(-shards[1])
    if largest != smallest:
        name, arg = lsspec.names(fn)
        raise ValueError(
            f"{name}: every rank of `{arg('group')}` must hold the same number of classes "
            f"(split the vocabulary evenly: pad it to a multiple of the world size); got shards "
            f"of {smallest} to {largest} classes."
        )


def _prologue(fn, local_classes, labels, options: lsspec.LabelOptions, weight, group,
              compute_dtype, *, check_labels=None, where=None, normalizer=None, kl=False,
              from_log_probs=False, class_mask=None, z_loss=0.0, return_z_loss=False,
              softcap=None, logit_scale=1.0, return_stats=False, shard=None,
              **fused):  # fmt: skip
    """The shared checks: ``(layout, counted rows, this rank's class weights in the compute
    dtype or None, the z-loss weight as a 0-d compute-dtype tensor)``. ``shard``: ``(start,
    K)``, this rank's first class and the global class count, where the caller knows them (a
    DTensor's layout: shards may differ in size); None: ``rank * V_local`` and ``world *
    V_local``, every shard of one size."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        name, arg = lsspec.names(fn)
        raise TypeError(
            f"{name}: `{arg('group')}` must be a torch.distributed.ProcessGroup, or None for "
            f"the default group; got {group!r} ({type(group).__name__})."
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if shard is None:
        _check_even_shards(fn, local_classes, labels, group, check_labels)
        start, num_classes = rank * local_classes, world * local_classes
    else:
        start, num_classes = shard
    lsspec.check_row_options_shapes(fn, num_classes, tuple(labels.shape), where=where)
    z_value, transform = _common.check_loss_options(
        fn, num_classes, options, check_labels, normalizer=normalizer, kl=kl,
        has_weight=weight is not None, from_log_probs=from_log_probs, z_loss=z_loss,
        return_z_loss=return_z_loss, softcap=softcap, logit_scale=logit_scale,
        return_stats=return_stats,
    )  # fmt: skip
    device = labels.device
    # The z-loss is computed only when it can matter (as in the single-device losses).
    with_z = return_z_loss or isinstance(z_loss, torch.Tensor) or z_value != 0
    z = _common.z_loss_tensor(z_loss if with_z else 0.0, compute_dtype, device)
    weight = _common.tensor_option(fn, "weight", weight, device, "labels")
    if weight is not None:
        _common.floating(fn, weight=weight)
        if tuple(weight.shape) != (local_classes,):
            raise lsspec.shape_error(
                fn, "weight", tuple(weight.shape),
                f"shape ({local_classes},), this rank's slice of the class weights",
            )  # fmt: skip
        weight = weight.detach().to(dtype=compute_dtype, device=device)
    class_mask = _common.tensor_option(fn, "class_mask", class_mask, device, "labels")
    local_mask = size = None
    if class_mask is not None:  # the full mask on every rank: every rank checks and raises alike
        _common.check_bool(fn, "class_mask", class_mask)
        lsspec.check_row_options_shapes(fn, num_classes, tuple(labels.shape), class_mask=class_mask)
        class_mask = class_mask.detach()
        _common.check_class_mask_support(
            fn, class_mask, options.convention, options.pad_index, check_labels
        )
        local_mask = class_mask[start : start + local_classes]
        size = _closed_form.support_size(
            options.convention, num_classes, options.pad_index, class_mask
        )
        # The support's weights u_c = w_c m_c (w = 1 without weights): masked classes leave the
        # support sums; an allowed label's u_y is its w_y.
        base = weight if weight is not None else torch.ones((), dtype=compute_dtype, device=device)
        weight = torch.where(local_mask, base, 0.0)
    counted = _common.counted_rows(labels, options.ignore_index, options.pad_index, where)
    _common.check_label_range(
        fn, labels, counted, num_classes, options.ignore_index, class_mask, check_labels
    )
    layout = _Layout(
        options.convention, options.pad_index, start, num_classes, group,
        kl=kl, from_log_probs=from_log_probs, with_z=with_z, class_mask=class_mask,
        local_mask=local_mask, size=size,
        transform=transform, with_stats=return_stats, caller=fn, check_labels=check_labels,
        given_shard=shard is not None, **fused,
    )  # fmt: skip
    return layout, counted, weight, z


def _local_column(x, classes, start):
    """``x[..., classes - start]`` where this rank holds the class, else 0."""
    local = classes - start
    here = (local >= 0) & (local < x.shape[-1])
    value = x.gather(-1, torch.where(here, local, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(here, value, 0.0)


def _local_entry(vector, classes, start):
    """``vector[classes - start]`` where this rank holds the class, else 0 (``vector`` 1-D)."""
    local = classes - start
    here = (local >= 0) & (local < vector.shape[0])
    return torch.where(here, _common.at_labels(vector, torch.where(here, local, 0)), 0.0)


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` over ``group`` as a differentiable op: its backward and its ``jvp``
    are the same all-reduce (of the cotangent, of the tangent), and its backward is itself
    differentiable, so a gradient built from it can be differentiated again. Every rank must
    run it, as every collective; the loss's forward and backward already do so on every rank."""

    @staticmethod
    def forward(tensor, group):
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return _AllReduceSum.apply(tangent, ctx.group)

    @staticmethod
    def vmap(info, in_dims, tensor, group):
        """Elementwise across ranks: the batch axis is reduced with the rest (every rank has the
        same batch, as every rank runs the same transform)."""
        del info
        return _AllReduceSum.apply(tensor, group), in_dims[0]


class _ReducedOutput(_AllReduceSum):
    """``all_reduce(SUM)`` of each rank's part of a tensor every rank then holds whole (the
    fused head's ``d hidden``), whose cotangent every rank holds whole too: the backward passes
    it as is (Megatron's "reduce from the tensor-parallel region")."""

    @staticmethod
    def backward(ctx, grad):
        return _ReplicatedInput.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return _ReducedOutput.apply(tangent, ctx.group)


class _ReplicatedInput(_AllReduceSum):
    """The identity on a tensor every rank holds whole (the fused head's hidden states), whose
    gradient is the sum of the ranks' parts: the backward all-reduces it (Megatron's "copy to
    the tensor-parallel region"). Its backward is :class:`_ReducedOutput`, and the reverse, so
    that both can be differentiated again."""

    @staticmethod
    def forward(tensor, group):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return _ReducedOutput.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return tangent


def _without_pad(local_mask, layout, local_classes: int, device):
    """The columns this rank adds to the support sum: ``local_mask`` (None: all) less the pad
    of ``"others_but_pad"`` where this rank holds it."""
    local_pad = (layout.pad_index or 0) - layout.start
    if layout.convention != "others_but_pad" or not 0 <= local_pad < local_classes:
        return local_mask
    keep = torch.ones(local_classes, dtype=torch.bool, device=device)
    keep[local_pad] = False
    return keep if local_mask is None else local_mask & keep


class _Share(NamedTuple):
    """This rank's share of a row's sums (only the rank holding a class adds its column)."""

    x_y: torch.Tensor  # the label's logit
    total: torch.Tensor  # sum over this rank's classes of w_c x_c (w = 1 without weights)
    x_pad: torch.Tensor  # the pad's logit where ``total`` holds it (the fused head's), else 0
    w_y: torch.Tensor | None = None  # with class weights: the label's weight
    weight_sum: torch.Tensor | None = None  # with class weights: the sum of this rank's (0-d)
    w_pad: torch.Tensor | None = None  # with class weights: the pad's weight (0-d)


def _weight_share(class_weight, safe_labels, layout: _Layout):
    """The class weights' part of :class:`_Share` (None, None, None without weights)."""
    if class_weight is None:
        return None, None, None
    pad = torch.tensor(layout.pad_index or 0, device=class_weight.device)
    return (
        _local_entry(class_weight, safe_labels, layout.start),
        class_weight.sum(),
        _local_entry(class_weight, pad, layout.start),
    )


class _Global(NamedTuple):
    """The closed form's statistics of every row, global over the group (the same on every
    rank), and the per-row ``w_y`` and ``sum_{c in S} w_c`` that backward and the reduction
    read."""

    terms: _closed_form.RowTerms
    w_y: torch.Tensor
    support_weight: torch.Tensor
    entropy: torch.Tensor | None = None  # with return_stats: the softmax's entropy per row
    correct: torch.Tensor | None = None  # with return_stats: 1.0 where the argmax is the label


class _StatsShare(NamedTuple):
    """This rank's part of ``return_stats``: its first maximal allowed logit (before the
    transform, compute dtype) and that class's global index, per row; and ``entropy_at(peak)``,
    ``sum_c exp(t_c - peak) (t_c - peak)`` over this rank's allowed classes."""

    raw_max: torch.Tensor
    first: torch.Tensor
    entropy_at: Any


def _tie_share(stats: _StatsShare, global_max, safe_labels, layout: _Layout, local_classes):
    """Per row: 1 if this rank's first maximal class attains the global max before the label,
    plus, on the rank holding the label, 1 unless its first maximal class is the label and
    attains the global max. Summed over the group it is 0 exactly where the global first
    maximal class (``torch.argmax``'s) is the label."""
    at_max = stats.raw_max == global_max
    earlier = at_max & (stats.first < safe_labels)
    holds = (safe_labels >= layout.start) & (safe_labels < layout.start + local_classes)
    hit = at_max & (stats.first == safe_labels)
    return earlier.to(global_max.dtype) + (holds & ~hit).to(global_max.dtype)


def _global_terms(peak, sum_exp_at, share: _Share, labels, counted, eps, layout,
                  stats: _StatsShare | None = None, local_classes=0) -> _Global:  # fmt: skip
    """Two all-reduces: the max of each row's local ``peak`` and of this rank's class count
    and its negative (``R + 2`` values: every rank learns the largest and the smallest shard),
    then one packed sum of the rows' shares (``sum_exp_at(global_peak)``, ``x_y``, the support
    sum, ``x_pad``, and with class weights ``w_y``, plus two scalars: ``sum w`` and ``w_pad``).
    With ``stats`` (``return_stats``) the max also carries each row's raw max logit (``2 R + 2``
    values), and the packed sum two more rows: the entropy's ``sum_c exp(t_c - peak) (t_c -
    peak)`` and the argmax's tie count (:func:`_tie_share`); no further collective.

    Shards of unequal size make every rank's ``K = world * V_local`` and class offsets wrong:
    where the host reads values (``_common.reads_values`` with the call's ``check_labels``: CPU
    tensors by default) :func:`_check_even_shards` raised on every rank alike before any
    collective of the loss; elsewhere (no host sync) every counted row's lse, so its loss, is
    NaN."""
    convention, num_classes = layout.convention, layout.num_classes
    shards = torch.cat([peak.new_full((1,), local_classes), peak.new_full((1,), -local_classes)])
    maxima = [peak.reshape(-1)] + ([] if stats is None else [stats.raw_max.reshape(-1)])
    reduced = torch.cat([*maxima, shards])
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=layout.group)
    peak = reduced[: peak.numel()].reshape(peak.shape)
    if stats is not None:
        global_max = reduced[peak.numel() : 2 * peak.numel()].reshape(peak.shape)
    # The largest shard is the smallest (a layout the caller gave may hold shards of any size).
    even = reduced[-2] == -reduced[-1]
    if layout.given_shard:
        even = torch.ones_like(even)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    weighted = share.w_y is not None
    rows = [sum_exp_at(peak), share.x_y, share.total, share.x_pad]
    rows += [share.w_y] if weighted else []
    if stats is not None:
        safe = _closed_form.label_rows(labels, counted, eps, num_classes, layout.class_mask)[0]
        rows += [stats.entropy_at(peak), _tie_share(stats, global_max, safe, layout,
                                                    local_classes)]  # fmt: skip
    packed = torch.stack(rows).reshape(-1)
    if weighted:
        packed = torch.cat([packed, torch.stack([share.weight_sum, share.w_pad])])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=layout.group)
    per_row = packed[: len(rows) * peak.numel()].reshape(len(rows), *peak.shape)
    sum_exp, x_y, support_sum, x_pad = per_row[:4]
    lse = torch.where(even, torch.log(sum_exp) + peak, torch.nan)
    if layout.from_log_probs:  # log-probabilities: the lse is 0 (their logsumexp, taken whole)
        lse = torch.where(even, torch.zeros_like(peak), torch.nan)
    entropy = correct = None
    if stats is not None:  # H = log sum_exp - sum_c p_c (t_c - peak); argmax: no tie before y
        entropy = torch.where(counted, torch.log(sum_exp) - per_row[-2] / sum_exp, 0.0)
        correct = (per_row[-1] == 0).to(lse.dtype)
    size = _size(layout)
    if weighted:
        w_y, (weight_sum, w_pad) = per_row[4], packed[len(rows) * peak.numel() :]
        support_weight = weight_sum.expand(peak.shape)
    else:  # w = 1 (a product with 1.0 is exact), sum_{c in S} w_c = |S|
        w_y, w_pad, support_weight = 1.0, 1.0, size
    if convention != "uniform":
        support_sum = support_sum - w_y * x_y
    if convention == "others_but_pad":
        support_sum = support_sum - w_pad * x_pad
    if weighted and convention != "uniform":  # |S| already leaves y (and the pad) out
        support_weight = support_weight - w_y
    if weighted and convention == "others_but_pad":
        support_weight = support_weight - w_pad
    safe_labels, bad = _closed_form.label_rows(labels, counted, eps, num_classes, layout.class_mask)
    # The closed form of statistics relative to 0: peak 0, log_sum the lse, no scaling.
    terms = _closed_form.RowTerms(
        _closed_form.Lse(0.0, lse), x_y, w_y, support_sum, support_weight, safe_labels, bad,
        size, 1.0,
    )  # fmt: skip
    ones = torch.ones_like(lse)
    if correct is not None:
        correct = torch.where(counted & ~bad, correct, 0.0)
    return _Global(terms, ones * w_y, ones * support_weight, entropy, correct)


def _row_outputs(glob: _Global, counted, eps, z, layout):
    """``(loss, z_part, lse, eps_slope, w_y, support_weight, entropy, correct)`` per row: the
    cores' outputs (``z_part`` 0 without a z-loss, the loss includes it; the last two 0
    without ``return_stats``)."""
    terms = glob.terms
    form = dict(convention=layout.convention, kl=layout.kl)
    output = _closed_form.row_loss(terms, counted, eps, z=z if layout.with_z else None, **form)
    loss, z_part = output if layout.with_z else (output, torch.zeros_like(output))
    # d loss_row / d eps from the global statistics (the same on every rank).
    eps_slope = _closed_form.smoothing_slope(terms, eps, **form)
    lse = terms.lse.log_sum
    entropy = glob.entropy if glob.entropy is not None else torch.zeros_like(lse)
    correct = glob.correct if glob.correct is not None else torch.zeros_like(lse)
    return loss, z_part, lse, eps_slope, glob.w_y, glob.support_weight, entropy, correct


def _local_target(labels, counted, eps, class_weight, w_y, layout, start, stop, device):
    """The weighted smoothed target on this rank's classes ``[start, stop)`` (local indices),
    ``t_c = (1 - eps) w_y [c = y] + eps / |S| w_c [c in S]``, out of place."""
    per_class = eps / _size(layout)
    if class_weight is not None:
        per_class = per_class * class_weight[start:stop]
    classes = torch.arange(layout.start + start, layout.start + stop, device=device)
    labels = torch.where(counted, labels, 0)
    on_true = ((1.0 - eps) * w_y).unsqueeze(-1)
    return _closed_form.smoothed_target(
        layout.convention, layout.pad_index, classes, labels, on_true, per_class
    )


def _target_mass(eps, support_weight, w_y, layout):
    """``A = sum_c t_c = (1 - eps) w_y + eps / |S| sum_{c in S} w_c`` per row."""
    size = _size(layout)
    return (1.0 - eps) * w_y + eps / size * support_weight


class _Saved(NamedTuple):
    """What the dense core's backward and forward mode read: the inputs and the forward's
    global statistics (the smoothing's slope None where the smoothing is not differentiated)."""

    x: torch.Tensor
    labels: torch.Tensor
    counted: torch.Tensor
    eps: torch.Tensor
    class_weight: torch.Tensor | None
    z: torch.Tensor
    lse: torch.Tensor
    w_y: torch.Tensor
    support_weight: torch.Tensor
    eps_slope: torch.Tensor | None


def _bad_rows(saved, layout: _Layout):
    """Counted rows with a label out of range or under a smoothing outside [0, 1]: NaN."""
    return _closed_form.label_rows(
        saved.labels, saved.counted, saved.eps, layout.num_classes, layout.class_mask
    )[1]


def _dense_coefficients(saved: _Saved, lse, layout, grad_loss, grad_z=None):
    """``(g A + g_total 2 z lse) softmax(x) - g t`` on this rank's classes (rows x V_local,
    compute dtype), ``g_total = g + g_z`` (the z-part's cotangent, None: 0); the z term only
    with a z-loss. Of log-probabilities (``from_log_probs``): ``-g t``."""
    x, eps = saved.x, saved.eps
    g = grad_loss.to(eps.dtype).unsqueeze(-1)
    target = _local_target(
        saved.labels, saved.counted, eps, saved.class_weight, saved.w_y, layout, 0,
        x.shape[-1], x.device,
    )  # fmt: skip
    if layout.from_log_probs:  # log-probabilities: -g t (no softmax, no z-loss, no transform)
        return -g * target
    scale = g * _target_mass(eps, saved.support_weight, saved.w_y, layout).unsqueeze(-1)
    scale = scale + _z_scale(saved.z, lse, layout, grad_loss, grad_z)
    t = _closed_form.transformed(x.to(eps.dtype), layout.transform)
    coeff = scale * torch.exp(_allowed(t, layout.local_mask) - lse.unsqueeze(-1)) - g * target
    if layout.transform.active:  # the chain rule: d/dx = dt/dx d/dt, elementwise
        coeff = coeff * _closed_form.transform_slope(x.to(eps.dtype), layout.transform)
    return coeff


def _z_scale(z, lse, layout, grad_loss, grad_z):
    """``(g + g_z) 2 z lse`` per row, ``(rows, 1)`` (``grad_z`` None: ``g_z = 0``); 0 without a
    z-loss."""
    if not layout.with_z:
        return 0.0
    g_total = grad_loss if grad_z is None else grad_loss + grad_z
    return (g_total.to(lse.dtype) * 2.0 * z * lse).unsqueeze(-1)


class _VocabParallelRows(torch.autograd.Function):
    """Per-row loss from global statistics; backward is local (softmax from the global lse).

    ``_VocabParallelRowsForwardMode`` adds forward mode (``jvp``)."""

    @staticmethod
    def forward(x, labels, counted, eps, class_weight, z, layout):
        compute_dtype = eps.dtype
        with torch.no_grad(), _common.autocast_off(x.device.type):
            t = _transformed(x, layout, compute_dtype)  # x itself without a transform
            if layout.from_log_probs:  # no lse (0), so no peak and no sum-exp to share
                allowed = None
                peak = torch.zeros(x.shape[:-1], dtype=compute_dtype, device=x.device)
            else:
                allowed = _allowed(t, layout.local_mask)
                peak = allowed.amax(dim=-1).to(compute_dtype)
            safe_labels, _ = _closed_form.label_rows(
                labels, counted, eps, layout.num_classes, layout.class_mask
            )
            # The support's sums see masked classes as 0, not their logit times a 0 weight: a
            # masked -inf logit would make that product NaN. The pad is left out of them on the
            # rank that holds it: summed and subtracted after, a pad logit of -1e9 would swamp
            # the others' sum and a -inf one make it NaN.
            summed_mask = _without_pad(layout.local_mask, layout, x.shape[-1], x.device)
            summed = t if summed_mask is None else t.masked_fill(~summed_mask, 0)
            if class_weight is None:
                total = summed.sum(-1, dtype=compute_dtype)
            else:
                total = torch.matmul(summed.to(compute_dtype), class_weight)
            share = _Share(
                _local_column(t, safe_labels, layout.start).to(compute_dtype),
                total,
                torch.zeros_like(total),  # the pad is not in total
                *_weight_share(class_weight, safe_labels, layout),
            )

            def sum_exp_at(global_peak):
                if layout.from_log_probs:  # a constant: _global_terms sets lse = 0
                    return torch.zeros_like(global_peak)
                return torch.exp(allowed.to(compute_dtype) - global_peak.unsqueeze(-1)).sum(-1)

            stats = None
            if layout.with_stats:  # the argmax over the logits before the transform
                raw = _allowed(x, layout.local_mask)

                def entropy_at(global_peak):
                    return _entropy_share(allowed.to(compute_dtype), global_peak)

                stats = _StatsShare(raw.amax(-1).to(compute_dtype),
                                    raw.argmax(-1) + layout.start, entropy_at)  # fmt: skip
            glob = _global_terms(peak, sum_exp_at, share, labels, counted, eps, layout, stats,
                                 x.shape[-1])  # fmt: skip
            return _row_outputs(glob, counted, eps, z, layout)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, labels, counted, eps, class_weight, z, layout = inputs
        _, _, lse, eps_slope, w_y, support_weight, entropy, correct = output
        ctx.layout = layout
        # The smoothing's slope (O(rows)) is kept for backward only when it is differentiated.
        kept = eps_slope if ctx.needs_input_grad[3] else None
        statistics = (lse, w_y, support_weight)
        ctx.save_for_backward(x, labels, counted, eps, class_weight, z, *statistics, kept)
        ctx.save_for_forward(x, labels, counted, eps, class_weight, z, *statistics, eps_slope)
        ctx.mark_non_differentiable(lse, eps_slope, w_y, support_weight, entropy, correct)

    @staticmethod
    def vmap(info, in_dims, x, labels, counted, eps, class_weight, z, layout):
        """Rows are independent: a ``torch.func.vmap`` batch axis (``jacrev``, ``jacfwd``,
        ``hessian``, per-sample gradients) becomes one more leading row axis, so each rank runs
        the same collectives once for the whole batch."""
        x_dim, labels_dim, counted_dim, eps_dim, weight_dim, z_dim, _ = in_dims
        if eps_dim is not None or weight_dim is not None or z_dim is not None:
            raise ValueError(
                "vocab_parallel_smoothed_cross_entropy: `smoothing`, `weight` and `z_loss` "
                "cannot be batched by torch.func.vmap (one value for every row); got a vmapped "
                "one."
            )

        def leading(tensor, dim):
            if dim is None:
                return tensor.expand(info.batch_size, *tensor.shape)
            return tensor.movedim(dim, 0)

        rows = _common.with_forward_mode(_VocabParallelRows, _VocabParallelRowsForwardMode)
        outputs = rows.apply(
            leading(x, x_dim),
            leading(labels, labels_dim),
            leading(counted, counted_dim),
            eps,
            class_weight,
            z,
            layout,
        )
        return outputs, (0,) * 8

    @staticmethod
    def backward(ctx, grad_loss, grad_z, *grad_statistics):
        """``(g A + (g + g_z) 2 z lse) softmax(x) - g t`` on this rank's classes (``g_z`` the
        z-part's cotangent; no z term without a z-loss), ``-g t`` of log-probabilities; no
        communication, except when the gradient of logits will be differentiated again: then
        the global lse is recomputed from ``x`` through ``_AllReduceSum`` (shifted by the
        saved lse, the same on every rank), so that its dependence on every rank's logits is in
        the graph."""
        del grad_statistics  # internal statistics, never differentiated.
        saved = _Saved(*ctx.saved_tensors)
        with _common.autocast_off(saved.x.device.type):  # as the forward computed
            return _VocabParallelRows._backward(ctx, saved, grad_loss, grad_z)

    @staticmethod
    def _backward(ctx, saved, grad_loss, grad_z):
        x, counted, eps = saved.x, saved.counted, saved.eps
        safe_lse = torch.where(counted, saved.lse, 0.0)
        if _common.differentiated_again(x) and not ctx.layout.from_log_probs:
            shift = torch.where(torch.isfinite(saved.lse), saved.lse, 0.0).unsqueeze(-1)
            t = _closed_form.transformed(x.to(eps.dtype), ctx.layout.transform)
            local = torch.exp(_allowed(t, ctx.layout.local_mask) - shift).sum(-1)
            total = _AllReduceSum.apply(local, ctx.layout.group)
            safe_lse = torch.where(counted, torch.log(total) + shift.squeeze(-1), 0.0)
        grad_z = grad_z if ctx.layout.with_z else None
        grad = _dense_coefficients(saved, safe_lse, ctx.layout, grad_loss, grad_z)
        bad = _bad_rows(saved, ctx.layout)
        grad = _closed_form.counted_only(counted.unsqueeze(-1), bad.unsqueeze(-1), grad)
        d_eps = None
        if saved.eps_slope is not None:  # d eps = sum_rows g * slope, the whole loss's, every rank
            d_eps = _closed_form.counted_only(counted, bad, grad_loss * saved.eps_slope).sum()
            d_eps = d_eps.reshape(eps.shape)
        d_z = _z_grad(ctx, 5, saved, grad_loss, grad_z, bad)
        return grad.to(x.dtype), None, None, d_eps, None, d_z, None


def _z_grad(ctx, index, saved, grad_loss, grad_z, bad):
    """``d z = sum_rows (g + g_z) lse**2`` (the whole loss's, from the global lse: the same on
    every rank) when the z-loss weight is differentiated, else None."""
    if not (ctx.needs_input_grad[index] and ctx.layout.with_z):
        return None
    g_total = grad_loss if grad_z is None else grad_loss + grad_z
    rows = _closed_form.counted_only(saved.counted, bad, g_total * saved.lse.square())
    return rows.sum().reshape(saved.z.shape)


class _VocabParallelRowsForwardMode(_VocabParallelRows):
    """``_VocabParallelRows`` with ``jvp`` (see ``lstorch._common.with_forward_mode``)."""

    @staticmethod
    def jvp(ctx, x_tangent, *other_tangents):
        """``d loss = sum_c ((A + 2 z lse) softmax(x)_c - t_c) dx_c`` over all K classes (and
        with a z-loss ``d z_part = sum_c 2 z lse softmax(x)_c dx_c``): each rank's share,
        all-reduced (one all-reduce of O(rows) values, two per row with a z-loss, run on every
        rank); plus ``slope d eps`` and ``lse**2 d z``."""
        saved = _Saved(*ctx.saved_tensors)
        with _common.autocast_off(saved.x.device.type):  # as the forward computed
            return _VocabParallelRowsForwardMode._jvp(ctx, saved, x_tangent, other_tangents)

    @staticmethod
    def _jvp(ctx, saved, x_tangent, other_tangents):
        eps_tangent, z_tangent = other_tangents[2], other_tangents[4]  # the rest: constants
        counted, eps, layout = saved.counted, saved.eps, ctx.layout
        d_loss = torch.zeros_like(saved.lse)
        d_z = torch.zeros_like(saved.lse)
        if x_tangent is not None:
            safe_lse = torch.where(counted, saved.lse, 0.0)
            ones = torch.ones_like(safe_lse)
            coeffs = [_dense_coefficients(saved, safe_lse, layout, ones)]
            if layout.with_z:  # the z-part's own: g = 0, g_z = 1
                coeffs.append(_dense_coefficients(saved, safe_lse, layout, 0 * ones, ones))
            dx = x_tangent.to(eps.dtype)
            local = torch.stack([(coeff * dx).sum(-1) for coeff in coeffs])
            total = _AllReduceSum.apply(local, layout.group)
            d_loss = total[0]
            d_z = total[1] if layout.with_z else d_z
        if eps_tangent is not None:  # the same on every rank: no communication
            d_loss = d_loss + times(eps_tangent, saved.eps_slope)  # 0 tangent: exactly 0
        if z_tangent is not None and layout.with_z:
            z_rows = times(z_tangent, saved.lse.square())
            d_loss, d_z = d_loss + z_rows, d_z + z_rows
        bad = _bad_rows(saved, layout)
        d_loss = _closed_form.counted_only(counted, bad, d_loss)
        d_z = _closed_form.counted_only(counted, bad, d_z)
        return d_loss, d_z, *(None,) * 6  # the statistics: non-differentiable


# ---------------------------------------------------------------------------------------------
# The fused head: each rank's rows of the output layer, chunk by chunk (lstorch.fused's helpers).


class _FusedSaved(NamedTuple):
    """What the fused core's backward reads."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    labels: torch.Tensor
    counted: torch.Tensor
    eps: torch.Tensor
    class_weight: torch.Tensor | None
    z: torch.Tensor
    lse: torch.Tensor
    w_y: torch.Tensor
    support_weight: torch.Tensor
    eps_slope: torch.Tensor | None


def _combined_mean(lse_a, mean_a, lse_b, mean_b, lse):
    """The softmax mean of ``t`` over two blocks of classes from each block's lse and mean
    (``lse`` their logaddexp); a block whose lse is -inf (all masked) weighs 0."""
    weight_a, weight_b = torch.exp(lse_a - lse), torch.exp(lse_b - lse)
    part_a = torch.where(weight_a > 0, weight_a * mean_a, 0.0)
    part_b = torch.where(weight_b > 0, weight_b * mean_b, 0.0)
    return part_a + part_b


def _weighted_column_sum(weight, class_weight, layout: _Layout, compute_dtype):
    """``sum_c w_c weight[c]`` over this rank's rows, of the operand, in ``compute_dtype``
    (unweighted: ``lstorch.fused``'s own column sum), chunk by chunk."""
    if class_weight is None:
        return _fused._weight_column_sum(
            weight, layout.chunk_size, layout.operand_dtype, compute_dtype
        )
    total = torch.zeros(weight.shape[1], dtype=compute_dtype, device=weight.device)
    for start, stop in _fused._chunks(weight.shape[0], layout.chunk_size):
        rows = _fused._operand(weight[start:stop], layout.operand_dtype, compute_dtype)
        total = total + class_weight[start:stop] @ rows
    return total


class _FusedVocabParallelRows(torch.autograd.Function):
    """Per-row loss of ``F.linear(hidden, weight, bias)`` with the weight's rows split over the
    group; backward recomputes each local chunk's logits and all-reduces ``d hidden``."""

    @staticmethod
    def forward(hidden, weight, bias, labels, counted, eps, class_weight, z, layout):
        operand_dtype, compute_dtype = layout.operand_dtype, eps.dtype
        with torch.no_grad(), _common.autocast_off(hidden.device.type):
            hidden_c = _fused._counted_rows_only(
                _fused._operand(hidden, operand_dtype, compute_dtype), counted
            )
            full = functools.partial(torch.full, labels.shape, dtype=compute_dtype,
                                     device=hidden.device)  # fmt: skip
            local_lse = full(-torch.inf)
            transform, with_stats = layout.transform, layout.with_stats
            # With a transform, sum_c w_c t_c is summed chunk by chunk (t is not linear in x).
            transformed_sum = full(0.0) if transform.active else None
            # With return_stats: the first maximal raw logit and its class, and sum_c p_c t_c
            # of this rank's own softmax (combined chunk by chunk, as the lse).
            raw_max, first, local_mean = full(-torch.inf), torch.zeros_like(labels), full(0.0)
            for start, stop in _fused._chunks(weight.shape[0], layout.chunk_size):
                logits = _fused._chunk_logits(
                    hidden_c, weight, bias, start, stop, operand_dtype, compute_dtype
                )
                if with_stats:
                    chunk_max, chunk_first = _allowed(logits, layout.local_mask, start,
                                                      stop).max(-1)  # fmt: skip
                    better = chunk_max > raw_max  # strictly: the first maximal class stays
                    raw_max = torch.where(better, chunk_max, raw_max)
                    first = torch.where(better, chunk_first + layout.start + start, first)
                logits = _closed_form.transformed(logits, transform)
                if transformed_sum is not None:
                    chunk_weight = None if class_weight is None else class_weight[start:stop]
                    transformed_sum += (
                        logits.sum(-1) if chunk_weight is None else logits @ chunk_weight
                    )
                logits = _allowed(logits, layout.local_mask, start, stop)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                combined = torch.logaddexp(local_lse, chunk_lse)
                if with_stats:
                    chunk_mean = _entropy_share(logits, chunk_lse) + chunk_lse  # E_p[t]
                    local_mean = _combined_mean(local_lse, local_mean, chunk_lse, chunk_mean,
                                                combined)  # fmt: skip
                local_lse = combined
            safe_labels, _ = _closed_form.label_rows(
                labels, counted, eps, layout.num_classes, layout.class_mask
            )

            def column(classes):  # t_c where this rank holds class c, else 0
                local = classes - layout.start
                here = (local >= 0) & (local < weight.shape[0])
                local = torch.where(here, local, 0)
                rows = _fused._operand(weight[local], operand_dtype, compute_dtype)
                bias_c = _fused._operand(bias[local], operand_dtype, compute_dtype)
                value = _closed_form.transformed((hidden_c * rows).sum(-1) + bias_c, transform)
                return torch.where(here, value, 0.0)

            if transformed_sum is None:  # sum_c w_c x_c = hidden . sum_c w_c W_c + sum w_c b_c
                bias_c = _fused._operand(bias, operand_dtype, compute_dtype)
                bias_sum = bias_c.sum() if class_weight is None else class_weight @ bias_c
                column_sum = _weighted_column_sum(weight, class_weight, layout, compute_dtype)
                transformed_sum = hidden_c @ column_sum + bias_sum
            share = _Share(
                column(safe_labels),
                transformed_sum,
                column(torch.full_like(labels, layout.pad_index or 0)),
                *_weight_share(class_weight, safe_labels, layout),
            )

            def sum_exp_at(global_peak):
                return torch.exp(local_lse - global_peak)

            stats = None
            if with_stats:

                def entropy_at(global_peak):  # sum_c exp(t_c - peak) (t_c - peak), this rank's
                    weight_here = torch.exp(local_lse - global_peak)
                    return torch.where(weight_here > 0,
                                       weight_here * (local_mean - global_peak), 0.0)  # fmt: skip

                stats = _StatsShare(raw_max, first, entropy_at)
            glob = _global_terms(local_lse.clone(), sum_exp_at, share, labels, counted, eps,
                                 layout, stats, weight.shape[0])  # fmt: skip
            return _row_outputs(glob, counted, eps, z, layout)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, counted, eps, class_weight, z, layout = inputs
        _, _, lse, eps_slope, w_y, support_weight, entropy, correct = output
        ctx.layout = layout
        kept = eps_slope if ctx.needs_input_grad[5] else None
        ctx.save_for_backward(hidden, weight, bias, labels, counted, eps, class_weight, z, lse,
                              w_y, support_weight, kept)  # fmt: skip
        ctx.mark_non_differentiable(lse, eps_slope, w_y, support_weight, entropy, correct)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            "vocab_parallel_fused_linear_smoothed_cross_entropy: forward-mode AD (jvp, "
            "torch.autograd.forward_ad, jacfwd) is not implemented; reverse mode is, to any "
            "order (double backward, torch.func.grad of torch.func.grad). For forward mode use "
            "vocab_parallel_smoothed_cross_entropy of F.linear(hidden, weight_shard, "
            "bias_shard)."
        )

    @staticmethod
    def backward(ctx, grad_loss, grad_z, *grad_statistics):
        """Per local chunk: ``coeff = g * (A softmax(x) - t)`` (rows x chunk), ``d hidden +=
        coeff @ W_chunk``, ``d W_chunk = coeff.T @ hidden``, ``d b_chunk = sum coeff``; then
        ``d hidden`` is all-reduced over the group (each rank holds its classes' part). A
        backward that will be differentiated again builds the same through differentiable ops
        (:func:`_differentiable_fused_gradients`)."""
        del grad_statistics  # internal statistics, never differentiated.
        saved = _FusedSaved(*ctx.saved_tensors)
        layout = ctx.layout
        grad_z = grad_z if layout.with_z else None
        if _common.differentiated_again(saved.hidden, saved.weight, saved.bias):
            with _common.autocast_off(saved.hidden.device.type):
                d_hidden, d_weight, d_bias = _differentiable_fused_gradients(
                    saved, grad_loss, grad_z, layout
                )
        else:
            d_hidden, d_weight, d_bias = _fused_gradients(saved, grad_loss, grad_z, layout)
            if ctx.needs_input_grad[0]:
                dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=layout.group)
        d_eps = None
        bad = _bad_rows(saved, layout)
        if saved.eps_slope is not None:  # the whole loss's derivative, the same on every rank
            d_eps = _closed_form.counted_only(saved.counted, bad, grad_loss * saved.eps_slope)
            d_eps = d_eps.sum().reshape(saved.eps.shape)
        d_z = _z_grad(ctx, 7, saved, grad_loss, grad_z, bad)
        hidden, weight, bias = saved.hidden, saved.weight, saved.bias
        return (
            d_hidden.to(hidden.dtype), d_weight.to(weight.dtype), d_bias.to(bias.dtype),
            None, None, d_eps, None, d_z, None,
        )  # fmt: skip


def _differentiable_fused_gradients(saved: _FusedSaved, grad_loss, grad_z, layout: _Layout):
    """:func:`_fused_gradients` (``d hidden`` all-reduced) through differentiable, out-of-place
    ops, for a backward that will be differentiated again. The global lse is recomputed from
    (hidden, weight, bias) through :class:`_AllReduceSum` (relative to the saved lse, the same
    on every rank); the hidden states enter through :class:`_ReplicatedInput` and ``d hidden``
    leaves through :class:`_ReducedOutput`. A second derivative then has every rank's terms:
    of the hidden states (all-reduced), and of each rank's rows of the weight and bias (the
    other ranks' through the lse)."""
    operand_dtype, compute_dtype = layout.operand_dtype, saved.eps.dtype
    weight, bias, counted = saved.weight, saved.bias, saved.counted
    hidden = _ReplicatedInput.apply(saved.hidden, layout.group)
    hidden_c = _fused._counted_rows_only(
        _fused._operand(hidden, operand_dtype, compute_dtype), counted
    )
    chunks = _fused._chunks(weight.shape[0], layout.chunk_size)

    def chunk_logits(start, stop):  # (raw, transformed)
        raw = _fused._chunk_logits(hidden_c, weight, bias, start, stop, operand_dtype,
                                   compute_dtype)  # fmt: skip
        return raw, _closed_form.transformed(raw, layout.transform)

    shift = torch.where(counted & torch.isfinite(saved.lse), saved.lse, 0.0).unsqueeze(-1)
    local = 0.0
    for start, stop in chunks:
        _, logits = chunk_logits(start, stop)
        local = local + torch.exp(_allowed(logits, layout.local_mask, start, stop) - shift).sum(-1)
    total = _AllReduceSum.apply(local, layout.group)
    lse = torch.where(counted, torch.log(total) + shift.squeeze(-1), 0.0)
    bad = _bad_rows(saved, layout)
    scale = torch.where(bad, torch.nan, grad_loss.to(compute_dtype))
    scale = torch.where(counted, scale, 0.0).unsqueeze(-1)
    mass = _target_mass(saved.eps, saved.support_weight, saved.w_y, layout).unsqueeze(-1)
    softmax_scale = scale * mass + _z_scale(saved.z, lse, layout, grad_loss, grad_z)
    keep = counted.unsqueeze(-1)
    part, d_weight, d_bias = 0.0, [], []
    for start, stop in chunks:
        raw, logits = chunk_logits(start, stop)
        softmax = torch.exp(_allowed(logits, layout.local_mask, start, stop) - lse.unsqueeze(-1))
        target = _local_target(
            saved.labels, counted, saved.eps, saved.class_weight, saved.w_y, layout, start,
            stop, hidden.device,
        )  # fmt: skip
        coeff = softmax_scale * softmax - target * scale
        if layout.transform.active:  # the chain rule through t = softcap(scale * x)
            coeff = coeff * _closed_form.transform_slope(raw, layout.transform)
        coeff = torch.where(keep, coeff, 0.0)
        weight_chunk = _fused._operand(weight[start:stop], operand_dtype, compute_dtype)
        part = part + coeff @ weight_chunk
        d_weight.append(coeff.T @ hidden_c)
        d_bias.append(coeff.sum(0))
    return _ReducedOutput.apply(part, layout.group), torch.cat(d_weight), torch.cat(d_bias)


def _fused_gradients(saved: _FusedSaved, grad_loss, grad_z, layout: _Layout):
    """This rank's part of ``d hidden`` (before the all-reduce) and its rows of ``d weight``,
    ``d bias``, each chunk's ``coeff`` built in its logits' buffer."""
    operand_dtype, compute_dtype = layout.operand_dtype, saved.eps.dtype
    hidden, weight, bias, counted = saved.hidden, saved.weight, saved.bias, saved.counted
    bad = _bad_rows(saved, layout)
    hidden_c = _fused._counted_rows_only(
        _fused._operand(hidden, operand_dtype, compute_dtype), counted
    )
    scale = torch.where(bad, torch.nan, grad_loss.to(compute_dtype))
    scale = torch.where(counted, scale, 0.0).unsqueeze(-1)
    keep = counted.unsqueeze(-1)
    safe_lse = torch.where(counted, saved.lse, 0.0)
    # s = g A + (g + g_z) 2 z lse: the softmax's factor (NaN on invalid rows, as g's).
    mass = _target_mass(saved.eps, saved.support_weight, saved.w_y, layout).unsqueeze(-1)
    softmax_scale = scale * mass + _z_scale(saved.z, safe_lse, layout, grad_loss, grad_z)
    safe_lse = safe_lse.unsqueeze(-1)
    d_hidden = torch.zeros_like(hidden_c)
    d_weight = torch.empty(weight.shape, dtype=compute_dtype, device=weight.device)
    d_bias = torch.empty(bias.shape, dtype=compute_dtype, device=bias.device)
    with torch.no_grad(), _common.autocast_off(hidden.device.type):
        for start, stop in _fused._chunks(weight.shape[0], layout.chunk_size):
            coeff = _fused._chunk_logits(
                hidden_c, weight, bias, start, stop, operand_dtype, compute_dtype
            )
            slope = None
            if layout.transform.active:  # d/dx = dt/dx d/dt: the slope from the raw logits
                slope = _closed_form.transform_slope(coeff, layout.transform)
                coeff = _closed_form.transformed(coeff, layout.transform)
            coeff.sub_(safe_lse).exp_()  # the softmax, in the logits' buffer
            if layout.local_mask is not None:  # 0 on the masked classes
                coeff.masked_fill_(~layout.local_mask[start:stop], 0.0)
            coeff.mul_(softmax_scale)
            target = _local_target(
                saved.labels, counted, saved.eps, saved.class_weight, saved.w_y, layout, start,
                stop, hidden.device,
            )  # fmt: skip
            coeff.sub_(target * scale)
            if slope is not None:
                coeff.mul_(slope)
            # Select, do not multiply: 0 * NaN would leak a non-counted row's NaN features.
            coeff.masked_fill_(~keep, 0.0)
            weight_chunk = _fused._operand(weight[start:stop], operand_dtype, compute_dtype)
            d_hidden.addmm_(coeff, weight_chunk)
            d_weight[start:stop] = coeff.T @ hidden_c
            d_bias[start:stop] = coeff.sum(0)
    return d_hidden, d_weight, d_bias
