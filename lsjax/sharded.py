"""Vocabulary-sharded losses on JAX's sharding: global K, global sums, global 'mean' denominator.

Two ways, both giving the single-device result (SEMANTICS.md §6: Megatron's vocab-parallel label
smoothing uses the LOCAL vocabulary size and the LOCAL mean, Megatron-LM#737; this does not):

* **Sharded logits**: :func:`lsjax.smoothed_cross_entropy` itself, under ``jax.jit`` with logits
  placed by a ``NamedSharding`` (rows over a batch axis, classes over a vocabulary axis). Its
  closed form is written on the global array, so XLA's partitioner turns each per-row reduction
  (max, sum-exp, sum, the target's logit) into a local reduction plus an all-reduce of O(rows)
  values; no rows x V array is gathered (``tests/test_sharded.py`` reads the compiled HLO).
* **Sharded weight** (an LM head split over the vocabulary, as Megatron's tensor parallelism):
  :func:`sharded_fused_linear_smoothed_cross_entropy`, the fused loss inside ``jax.shard_map``.
  Each device holds ``V / n`` rows of the weight; the logsumexp is combined by an all-reduce of
  the max and of the sum-exp, ``x_y`` and ``sum_c x_c`` by all-reduced sums, and ``d hidden`` by
  an all-reduce of each shard's part. Nothing rows x V exists anywhere, not even per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

import lsspec
from lsjax import _common
from lsjax.fused import DEFAULT_CHUNK_SIZE, _check_fused, _fused_rows, _FusedOptions

Array = jax.Array


def sharded_fused_linear_smoothed_cross_entropy(
    hidden: Array,
    weight: Array,
    labels: Array,
    *,
    mesh: Mesh,
    batch_axis: str | None = "batch",
    vocab_axis: str = "vocab",
    bias: Array | None = None,
    smoothing: float | Array = 0.0,
    convention: str = "uniform",
    ignore_index: int | None = None,
    pad_index: int | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Array:
    r""":func:`lsjax.fused_linear_smoothed_cross_entropy` with the weight split over the vocabulary.

    The same loss, keywords and result as the single-device function (global ``K = V``, global
    sums, global 'mean' denominator: the number of counted rows over the whole batch). ``hidden``
    ``(N, D)`` and ``labels`` ``(N,)`` are split over ``batch_axis`` (None: replicated),
    ``weight`` ``(V, D)`` and ``bias`` ``(V,)`` over ``vocab_axis`` of ``mesh``; ``N`` and ``V``
    must divide by those axes' sizes. Call it under ``jax.jit``; with ``reduction="none"`` the
    per-row losses come back split over ``batch_axis``.

    Per device: the local chunks give a local logsumexp, all-reduced over ``vocab_axis`` as
    ``m = pmax(lse)``, ``lse = m + log(psum(exp(lse - m)))``; ``x_y`` (only the shard holding
    ``y`` contributes) and ``sum_c x_c = hidden . sum_c w_c + sum_c b_c`` are ``psum`` s. The
    backward pass all-reduces ``d hidden``; ``d weight`` and ``d bias`` stay local. A traced
    ``smoothing`` is differentiated as in the fused loss (its derivative is summed over the
    batch shards, once: the per-row slope is already global over the vocabulary).
    """
    fn = "sharded_fused_linear_smoothed_cross_entropy"
    options = lsspec.LabelOptions(smoothing, convention, ignore_index, pad_index, reduction)
    hidden, weight, bias, labels = _check_fused(fn, hidden, weight, bias, labels, options)
    if hidden.ndim != 2:
        raise lsspec.shape_error(fn, "hidden", hidden.shape, "two dimensions (N, D)")
    chunk_size = lsspec.check_chunk_size(fn, chunk_size)
    for name, axis, size in (("vocab_axis", vocab_axis, weight.shape[0]),) + (
        (("batch_axis", batch_axis, hidden.shape[0]),) if batch_axis is not None else ()
    ):
        if axis not in mesh.axis_names:
            raise ValueError(
                f"{fn}: `{name}` must be one of the mesh's axes {list(mesh.axis_names)}; "
                f"got {axis!r}."
            )
        if size % mesh.shape[axis]:
            raise ValueError(
                f"{fn}: `{name}`={axis!r} has {mesh.shape[axis]} devices, which must divide "
                f"the size they split; got {size}."
            )
    compute_dtype = _common.compute_dtype(hidden.dtype)
    eps = _common.smoothing_array(smoothing, compute_dtype)  # differentiated, as in the fused loss
    options = _FusedOptions(convention, pad_index, chunk_size, vocab_axis)

    def local(hidden, weight, bias, labels, eps):
        counted = _common.counted_rows(labels, ignore_index, pad_index)
        rows = _fused_rows(options, hidden, weight, bias, labels, counted, eps)
        if reduction == "none":
            return rows
        total, count = jnp.sum(rows), jnp.sum(counted.astype(compute_dtype))
        if batch_axis is not None:
            total = jax.lax.psum(total, batch_axis)
            count = jax.lax.psum(count, batch_axis)
        if reduction == "sum":
            return total
        nothing_counts = count == 0
        return jnp.where(nothing_counts, 0.0, total / jnp.where(nothing_counts, 1.0, count))

    rows_spec = PartitionSpec(batch_axis)
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(
            PartitionSpec(batch_axis, None),
            PartitionSpec(vocab_axis, None),
            PartitionSpec(vocab_axis),
            rows_spec,
            PartitionSpec(),
        ),
        out_specs=rows_spec if reduction == "none" else PartitionSpec(),
    )
    return sharded(hidden, weight, bias, labels, eps)
