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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import lsspec
from lsjax import _closed_form, _common
from lsjax.fused import (
    DEFAULT_CHUNK_SIZE,
    _check_extra_options,
    _check_fused,
    _fused_rows,
    _FusedOptions,
    _gather,
    _zero_bias,
)

Array = jax.Array


def _laid_out(mesh: Mesh, specs: tuple, inputs: tuple) -> tuple:
    """The inputs laid out as ``specs`` say, on a mesh with explicit axes (the default of
    ``jax.make_mesh``), where ``shard_map`` checks the inputs' layout against its ``in_specs``
    instead of moving them; on an auto mesh it moves them itself, and they pass unchanged."""
    if all(kind == AxisType.Auto for kind in mesh.axis_types):
        return inputs
    return jax.tree.map(
        lambda spec, value: jax.sharding.reshard(value, NamedSharding(mesh, spec)),
        specs,
        inputs,
        is_leaf=lambda node: isinstance(node, PartitionSpec),
    )


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
    class_weight: Array | None = None,
    where: Array | None = None,
    normalizer: float | Array | None = None,
    kl: bool = False,
    class_mask: Array | None = None,
    z_loss: float | Array = 0.0,
    return_z_loss: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_labels: bool | None = None,
) -> Array | tuple:
    r""":func:`lsjax.fused_linear_smoothed_cross_entropy` with the weight split over the vocabulary.

    The same loss, keywords and result as the single-device function (global ``K = V``, global
    sums, global 'mean' denominator: the number of counted rows, or the sum of their
    ``class_weight``, over the whole batch; or ``normalizer``). ``hidden`` ``(N, D)``, ``labels``
    and ``where`` ``(N,)`` are split over ``batch_axis`` (None: replicated), ``weight``
    ``(V, D)``, ``bias``, ``class_weight`` and ``class_mask`` ``(V,)`` over ``vocab_axis`` of
    ``mesh``; ``N`` and ``V`` must divide by those axes' sizes. Every option of the
    single-device function is taken, with the same meaning. Call it under ``jax.jit``; with
    ``reduction="none"`` the per-row losses (and z-parts) come back split over ``batch_axis``.

    Per device: the local chunks give a local logsumexp, all-reduced over ``vocab_axis`` as
    ``m = pmax(lse)``, ``lse = m + log(psum(exp(lse - m)))``; ``x_y`` (only the shard holding
    ``y`` contributes) and ``sum_c x_c = hidden . sum_c w_c + sum_c b_c`` are ``psum`` s. The
    backward pass all-reduces ``d hidden``; ``d weight`` and ``d bias`` stay local. A traced
    ``smoothing`` is differentiated as in the fused loss (its derivative is summed over the
    batch shards, once: the per-row slope is already global over the vocabulary). Second order
    through reverse mode (``jax.hessian``, Hessian-vector products) as in the single-device
    function: the all-reduced max is a shift the result does not depend on, held constant.

    ``softcap``, ``logit_scale`` and ``return_stats`` as in the single-device function: the
    transformed support sum is a ``psum`` of each shard's forward-loop sum; the statistics'
    entropy sum is moved to the global max and summed, and the argmax is the smallest class
    index among the shards that hold the global max (``torch.argmax``'s first-max rule). The
    statistics come back split over ``batch_axis``, as the per-row losses.
    """
    fn = lsspec.caller("sharded_fused_linear_smoothed_cross_entropy")
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"{fn}: `mesh` must be a jax.sharding.Mesh; got {mesh!r} ({type(mesh).__name__})."
        )
    if batch_axis is not None and batch_axis == vocab_axis:
        # one mesh axis cannot split both: each device would hold the rows and classes of
        # its own index only, and the loss would mix rows
        raise ValueError(
            f"{fn}: `batch_axis` and `vocab_axis` must be different axes of the mesh (or "
            f"batch_axis=None); got both {vocab_axis!r}."
        )
    options = lsspec.LabelOptions(smoothing, convention, ignore_index, pad_index, reduction)
    hidden, weight, bias, labels = _check_fused(fn, hidden, weight, bias, labels)
    if hidden.ndim != 2:
        raise lsspec.shape_error(fn, "hidden", hidden.shape, "two dimensions (N, D)")
    num_classes = weight.shape[0]
    extra = _check_extra_options(
        fn, options, num_classes, labels.shape, class_weight, where, normalizer, kl, class_mask,
        z_loss, return_z_loss, check_labels, softcap, logit_scale, return_stats,
    )  # fmt: skip
    _common.check_label_range(
        fn, labels, num_classes, ignore_index, pad_index, extra.where, extra.class_mask,
        check_labels,
    )  # fmt: skip
    transform = extra.transform
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
    # differentiated, as in the fused loss
    eps = _common.smoothing_array(smoothing, compute_dtype, _common.ulp_of_one(smoothing))
    class_weight, class_mask, z = extra.arrays(compute_dtype)
    options = _FusedOptions(
        convention, pad_index, chunk_size, vocab_axis, kl, z is not None, transform, return_stats
    )
    # ones_like: laid out as the labels are (an explicit-axes mesh checks it against in_specs)
    row_mask = jnp.ones_like(labels, dtype=bool) if extra.where is None else extra.where
    classes = {"class_weight": class_weight, "class_mask": class_mask}
    classes = {name: value for name, value in classes.items() if value is not None}

    def local(hidden, weight, bias, labels, row_mask, eps, z, classes):
        counted = _common.counted_rows(labels, ignore_index, pad_index, row_mask)
        class_weight, class_mask = classes.get("class_weight"), classes.get("class_mask")
        z = z if options.with_z else None
        rows = _fused_rows(
            options, hidden, weight, bias, labels, counted, eps, class_weight, class_mask, z
        )
        stats = ()
        if return_stats:  # per row, split over the batch axis as the rows
            *rows, row_stats = rows
            rows = tuple(rows) if options.with_z else rows[0]
            stats = (tuple(jax.lax.stop_gradient(value) for value in row_stats),)
        parts = rows if isinstance(rows, tuple) else (rows,)
        if reduction == "none":
            return (*(parts if return_z_loss else parts[:1]), *stats)
        w_y = 1.0
        if class_weight is not None:
            start = jax.lax.axis_index(vocab_axis) * weight.shape[0]
            w_y = _gather(options, class_weight, jnp.where(counted, labels, 0), start)
        count = jnp.sum(jnp.where(counted, w_y, 0.0).astype(compute_dtype))
        totals = [jnp.sum(part) for part in parts]
        if batch_axis is not None:
            totals = [jax.lax.psum(total, batch_axis) for total in totals]
            count = jax.lax.psum(count, batch_axis)
        reduced = [_common.reduce(total, count, reduction, normalizer) for total in totals]
        return (*(reduced if return_z_loss else reduced[:1]), *stats)

    rows_spec = PartitionSpec(batch_axis)
    out_spec = rows_spec if reduction == "none" else PartitionSpec()
    in_specs = (
        PartitionSpec(batch_axis, None),
        PartitionSpec(vocab_axis, None),
        PartitionSpec(vocab_axis),
        rows_spec,
        rows_spec,
        PartitionSpec(),
        PartitionSpec(),
        {name: PartitionSpec(vocab_axis) for name in classes},
    )
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=(
            *((out_spec, out_spec) if return_z_loss else (out_spec,)),
            *(((rows_spec, rows_spec, rows_spec),) if return_stats else ()),
        ),
    )
    z = jnp.zeros((), compute_dtype) if z is None else z  # a placeholder without a z-loss
    bias = _zero_bias(weight, bias)
    inputs = (hidden, weight, bias, labels, row_mask, eps, z, classes)
    outputs = sharded(*_laid_out(mesh, in_specs, inputs))
    if return_stats:
        lse, entropy, correct = outputs[-1]
        outputs = (*outputs[:-1], _closed_form.RowStats(lse, entropy, correct > 0))
    return outputs if len(outputs) > 1 else outputs[0]
