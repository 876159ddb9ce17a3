"""Megatron-core's vocabulary-parallel cross-entropy, on full logits, in JAX.

Twin: ``lstorch.compat.megatron.vocab_parallel_cross_entropy``.
"""

from __future__ import annotations

import jax

import lsspec
from lsjax import _common
from lsjax._common import ArrayLike
from lsjax.smoothed import smoothed_cross_entropy


def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    label_smoothing: float = 0.0,
    *,
    check_labels: bool | None = None,
) -> jax.Array:
    r"""Megatron-core's ``vocab_parallel_cross_entropy(logits, target, label_smoothing)``, as
    intended (at tensor-parallel size 1), on full logits ``(..., V)``.

    Megatron writes, with ``s = eps V / (V - 1)`` and ``lp = log_softmax(logits)``::

        loss = (1 - s) * (-lp[y]) - s * mean_c lp_c

    which is ``(1 - eps) (lse - x_y) + eps mean_{c != y} (lse - x_c)``: the ``"others"``
    convention, i.e. ``smoothed_cross_entropy(logits, target, smoothing=label_smoothing,
    convention="others")`` (per token, no reduction, class axis last). As Megatron (which
    asserts it), ``label_smoothing`` must lie in [0, 1) (checked when concrete). Returns float32
    for bf16/fp16/float32 logits, as Megatron (which casts the logits to float32).

    Under ``jax.jit`` with logits split over the vocabulary by a ``NamedSharding``, this is the
    vocabulary-parallel loss with the global ``V`` and the global mean. Megatron's own code at
    tensor-parallel size > 1 uses the local ones instead (Megatron-LM#737): with 2 ranks, ``V =
    8``, ``label_smoothing = 0.1``, logits ``[2, 1, 0.5, 0, -0.5, -1, 1.5, 0.25]`` and target 0,
    it returns 1.1202 on rank 0 and 1.2286 on rank 1, where this returns 1.1452.
    ``check_labels`` as ``lsjax.smoothed_cross_entropy`` (``False``: no concrete check, NaN).
    """
    fn = "cross_entropy"
    _common.check_smoothing_below_one(fn, "label_smoothing", label_smoothing, check_labels)
    return smoothed_cross_entropy(
        logits,
        target,
        smoothing=label_smoothing,
        convention="others",
        axis=-1,
        check_labels=check_labels,
        _caller=lsspec.caller(fn, labels="target", smoothing="label_smoothing"),
    )
