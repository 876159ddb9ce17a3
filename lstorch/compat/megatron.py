"""Megatron-core's vocabulary-parallel cross-entropy in PyTorch, with its intended smoothing.

Twin: ``lsjax.compat.megatron.cross_entropy`` (on full logits).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import lsspec
from lstorch import _common
from lstorch.smoothed import smoothed_cross_entropy


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
    group: dist.ProcessGroup | None = None,
    *,
    tp_group: dist.ProcessGroup | None = None,
    check_labels: bool | None = None,
) -> torch.Tensor:
    r"""``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``, as Megatron intends it.

    Megatron-core's signature and return: ``vocab_parallel_logits`` ``(..., V / n)`` is this
    rank's slice of the vocabulary (rank ``r`` of the ``n`` ranks of ``group`` holds classes
    ``[r V / n, (r + 1) V / n)``), ``target`` the global class ids (the same on every rank), and
    the result is the per-token loss, float32 (float64 for float64 logits). ``group`` is the
    tensor-parallel process group (default: the world; ``tp_group`` is Megatron's current name
    for it). Without an initialised process group, the logits are the whole vocabulary.

    Megatron's intended formula, with ``s = eps V / (V - 1)`` and ``lp = log_softmax(logits)``::

        loss = (1 - s) * (-lp[y]) - s * mean_c lp_c
             = (1 - eps) (lse - x_y) + eps mean_{c != y} (lse - x_c)

    is the ``"others"`` convention; this computes it exactly at every tensor-parallel size,
    with the global ``V`` and the global mean (``vocab_parallel_smoothed_cross_entropy(...,
    convention="others")``: two all-reduces of O(tokens) values in forward, none in backward),
    and the gradient is that loss's, each rank getting its slice.

    Difference from Megatron's own code at tensor-parallel size > 1
    (``megatron/core/tensor_parallel/cross_entropy.py``, Megatron-LM#737): Megatron smooths
    with the LOCAL vocabulary size (``s = eps V_local / (V_local - 1)``) and the LOCAL mean of
    the log-probabilities (over the rank's own slice), so its loss differs from rank to rank
    and from the formula above. With 2 ranks, ``V = 8``, ``label_smoothing = 0.1``, logits
    ``[2, 1, 0.5, 0, -0.5, -1, 1.5, 0.25]`` and target 0, this returns 1.1452 on both ranks
    (Megatron's formula at size 1); Megatron's code returns 1.1202 on rank 0 and 1.2286 on
    rank 1. Without smoothing the two agree. As Megatron (which asserts it),
    ``label_smoothing`` must lie in [0, 1); targets must be class ids in range (Megatron has no
    ``ignore_index``). ``check_labels`` as ``lstorch.smoothed_cross_entropy`` (``None``: the
    targets are read and checked on the CPU only, so a call on a GPU never waits for it).
    """
    fn = "vocab_parallel_cross_entropy"
    if tp_group is not None:
        if group is not None:
            raise ValueError(
                f"{fn}: give the tensor-parallel group once, as `group` or as `tp_group`; got both."
            )
        group = tp_group
    _common.check_smoothing_below_one(fn, "label_smoothing", label_smoothing, check_labels)
    caller = lsspec.caller(
        fn, logits="vocab_parallel_logits", local_logits="vocab_parallel_logits",
        labels="target", smoothing="label_smoothing",
    )  # fmt: skip
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return smoothed_cross_entropy(
            vocab_parallel_logits, target, smoothing=label_smoothing, convention="others",
            axis=-1, check_labels=check_labels, _caller=caller,
        )  # fmt: skip
    # imported here: lstorch.distributed imports torch._dynamo, which import lstorch does not
    from lstorch.distributed import vocab_parallel_smoothed_cross_entropy

    return vocab_parallel_smoothed_cross_entropy(
        vocab_parallel_logits, target, group=group, smoothing=label_smoothing,
        convention="others", check_labels=check_labels, _caller=caller,
    )  # fmt: skip
