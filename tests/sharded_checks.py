"""The 8-device JAX checks of tests/test_sharded.py, run in a subprocess.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX is imported, so
the test starts this script with it; it prints one JSON object of measurements.
"""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import lsjax
from lsjax.sharded import sharded_fused_linear_smoothed_cross_entropy

ROWS, FEATURES, VOCAB = 32, 8, 1024  # V/4 = 256 per device: rows x V/4 would be an all-gather


def all_gathers(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather in a compiled HLO text."""
    shapes = []
    for line in hlo.splitlines():
        if "all-gather(" in line or "all-gather-start(" in line:
            head = line.split("=", 1)[1]
            for dims in re.findall(r"\[([\d,]*)\]", head.split("all-gather")[0]):
                shapes.append(tuple(int(d) for d in dims.split(",") if d))
    return shapes


def biggest(shapes):
    return max((int(np.prod(s)) for s in shapes), default=0)


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("batch", "vocab"))
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((ROWS, FEATURES)).astype(np.float32)
    weight = (rng.standard_normal((VOCAB, FEATURES)) / np.sqrt(FEATURES)).astype(np.float32)
    bias = rng.standard_normal(VOCAB).astype(np.float32)
    labels = rng.integers(0, VOCAB, ROWS).astype(np.int32)
    labels[rng.random(ROWS) < 0.25] = -100
    logits = np.asarray(
        jnp.dot(hidden, weight.T, precision=jax.lax.Precision.HIGHEST) + bias, np.float32
    )
    results = {"logits": [], "fused": [], "fused_explicit": []}
    # jax.make_mesh's default: the layout is part of each array's type, and JAX checks it.
    explicit = jax.make_mesh((2, 4), ("batch", "vocab"), axis_types=(AxisType.Explicit,) * 2)
    class_weight = rng.uniform(0.5, 2.0, VOCAB).astype(np.float32)

    # 1. smoothed_cross_entropy on logits sharded (batch, vocab) by a NamedSharding under jit,
    # on a mesh with Auto axes and on one with Explicit axes (with the class weights split over
    # the vocabulary, as the logits are).
    for convention, pad_index, reduction, on in (
        ("uniform", None, "none", mesh),
        ("others", None, "mean", mesh),
        ("others_but_pad", 5, "sum", mesh),
        ("uniform", None, "none", explicit),
        ("others_but_pad", 5, "sum", explicit),
    ):
        options = dict(
            smoothing=0.1,
            convention=convention,
            pad_index=pad_index,
            ignore_index=-100,
            reduction=reduction,
        )
        if on is explicit:
            options["weight"] = class_weight

        def loss(x, y, eps, options=options):
            def scalar(x, eps):
                return jnp.sum(lsjax.smoothed_cross_entropy(x, y, **{**options, "smoothing": eps}))

            out = lsjax.smoothed_cross_entropy(x, y, **options)
            return out, *jax.grad(scalar, argnums=(0, 1))(x, eps)

        eps = jnp.float32(options["smoothing"])
        single = jax.jit(loss)(jnp.asarray(logits), jnp.asarray(labels), eps)
        if on is explicit:
            options["weight"] = jax.device_put(
                class_weight, NamedSharding(on, PartitionSpec("vocab"))
            )
        x = jax.device_put(logits, NamedSharding(on, PartitionSpec("batch", "vocab")))
        y = jax.device_put(labels, NamedSharding(on, PartitionSpec("batch")))
        compiled = jax.jit(loss).lower(x, y, eps).compile()
        sharded = compiled(x, y, eps)
        gathers = all_gathers(compiled.as_text())
        results["logits"].append(
            dict(
                case=f"{convention}/{reduction}/{'explicit' if on is explicit else 'auto'}",
                temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
                loss_diff=float(np.max(np.abs(np.asarray(sharded[0]) - np.asarray(single[0])))),
                grad_diff=float(np.max(np.abs(np.asarray(sharded[1]) - np.asarray(single[1])))),
                loss_scale=float(np.max(np.abs(np.asarray(single[0])))),
                # d loss / d smoothing: the derivative of the whole (global) loss.
                eps_grad_diff=float(abs(sharded[2] - single[2])),
                eps_grad_scale=float(abs(single[2])),
                grad_sharded=str(sharded[1].sharding.spec),
                replicas_identical=bool(
                    reduction == "none"
                    or len({np.asarray(s.data).tobytes() for s in sharded[0].addressable_shards})
                    == 1
                ),
                biggest_all_gather=biggest(gathers),
            )
        )

    # 2. The fused loss with the weight split over the vocabulary (shard_map), with the dense
    # loss's other options too: class weights and mask split over the vocabulary as the weight,
    # the row mask over the batch.
    class_mask = rng.random(VOCAB) < 0.7
    class_mask[labels[labels >= 0]] = True  # every label allowed
    class_mask[300] = False  # a masked pad
    row_mask = rng.random(ROWS) < 0.8
    everything = dict(
        class_weight=class_weight,
        class_mask=class_mask,
        where=row_mask,
        z_loss=0.1,
        return_z_loss=True,
    )
    for convention, pad_index, reduction, more in (
        ("uniform", None, "mean", {}),
        ("others", None, "none", {}),
        ("others_but_pad", 300, "sum", {}),
        ("uniform", None, "mean", {**everything, "normalizer": 20.0}),
        ("others_but_pad", 300, "none", everything),
        ("others", None, "sum", dict(kl=True, class_mask=class_mask, z_loss=0.1)),
        # The language-model options: the transform, and the statistics (the entropy's sum and
        # the first argmax combined over the vocabulary shards).
        ("others", None, "none", dict(softcap=2.0, logit_scale=0.7, z_loss=0.1, return_stats=True)),
        ("uniform", None, "mean", dict(softcap=3.0, class_mask=class_mask, return_stats=True)),
    ):
        options = dict(
            smoothing=0.1,
            convention=convention,
            pad_index=pad_index,
            ignore_index=-100,
            reduction=reduction,
            chunk_size=96,  # ragged within each shard's 256 classes
            **more,
        )

        # Gradients for hidden, weight, bias and the smoothing (a differentiated argument).
        def single(h, w, b, y, eps, options=options):
            def scalar(h, w, b, eps):
                out = lsjax.fused_linear_smoothed_cross_entropy(
                    h, w, y, bias=b, **{**options, "smoothing": eps}
                )
                return sum(jnp.sum(part) for part in jax.tree.leaves(out))

            out = lsjax.fused_linear_smoothed_cross_entropy(h, w, y, bias=b, **options)
            return out, jax.grad(scalar, argnums=(0, 1, 2, 3))(h, w, b, eps)

        def split(h, w, b, y, eps, options=options):
            def scalar(h, w, b, eps):
                out = sharded_fused_linear_smoothed_cross_entropy(
                    h, w, y, bias=b, mesh=mesh, **{**options, "smoothing": eps}
                )
                return sum(jnp.sum(part) for part in jax.tree.leaves(out))

            out = sharded_fused_linear_smoothed_cross_entropy(h, w, y, bias=b, mesh=mesh, **options)
            return out, jax.grad(scalar, argnums=(0, 1, 2, 3))(h, w, b, eps)

        eps = jnp.float32(options["smoothing"])
        args = [jnp.asarray(a) for a in (hidden, weight, bias, labels)] + [eps]
        expected = jax.jit(single)(*args)
        placed = [
            jax.device_put(hidden, NamedSharding(mesh, PartitionSpec("batch", None))),
            jax.device_put(weight, NamedSharding(mesh, PartitionSpec("vocab", None))),
            jax.device_put(bias, NamedSharding(mesh, PartitionSpec("vocab"))),
            jax.device_put(labels, NamedSharding(mesh, PartitionSpec("batch"))),
            eps,
        ]
        compiled = jax.jit(split).lower(*placed).compile()
        got = compiled(*placed)
        # NaN, +inf, -inf in the hidden of the ignored rows: the same loss and gradients, bit
        # for bit (those rows enter the core as zeros), and nothing non-finite.
        poisoned = hidden.copy()
        ignored = np.flatnonzero(labels == -100)
        poisoned[ignored] = np.resize([np.nan, np.inf, -np.inf], len(ignored))[:, None]
        poisoned_got = compiled(
            jax.device_put(poisoned, NamedSharding(mesh, PartitionSpec("batch", None))),
            *placed[1:],
        )
        poisoned_leaves = [np.asarray(a) for a in jax.tree.leaves(poisoned_got)]
        non_finite_reaches_nothing = bool(
            len(ignored) > 0
            and all(np.isfinite(a).all() for a in poisoned_leaves)
            and all(
                np.array_equal(a, np.asarray(b))
                for a, b in zip(poisoned_leaves, jax.tree.leaves(got), strict=True)
            )
        )
        # The dense single-device loss, too (the fused loss's own reference).
        dense_options = {k: v for k, v in options.items() if k != "chunk_size"}
        dense_options["weight"] = dense_options.pop("class_weight", None)
        dense = lsjax.smoothed_cross_entropy(
            jnp.asarray(logits), jnp.asarray(labels), **dense_options
        )
        flat_got, flat_expected = jax.tree.leaves(got), jax.tree.leaves(expected)
        results["fused"].append(
            dict(
                case=f"{convention}/{reduction}/{'+'.join(more)}",
                diffs=[  # float64: the statistics' `correct` is boolean
                    float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                    for a, b in zip(flat_got, flat_expected, strict=True)
                ],
                scales=[float(np.max(np.abs(np.asarray(b, np.float64)))) for b in flat_expected],
                dense_diff=max(
                    float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(dense), strict=True)
                ),
                biggest_all_gather=biggest(all_gathers(compiled.as_text())),
                non_finite_reaches_nothing=non_finite_reaches_nothing,
                # Bit-for-bit: every device's copy of the (replicated) loss is the same.
                replicas_identical=bool(
                    reduction == "none"
                    or len(
                        {
                            np.asarray(s.data).tobytes()
                            for s in jax.tree.leaves(got[0])[0].addressable_shards
                        }
                    )
                    == 1
                ),
            )
        )
    # 3. A mesh with explicit axes (jax.make_mesh's default): shard_map checks the inputs'
    # layout there instead of moving them, so the loss lays them out itself. The hidden states
    # placed on the batch axis, the rest (labels, weight, bias) as the caller has them.
    options = dict(smoothing=0.1, convention="others", ignore_index=-100, reduction="mean",
                   chunk_size=96)  # fmt: skip

    def on_explicit(h, w, b, y):
        def scalar(h, w, b):
            return sharded_fused_linear_smoothed_cross_entropy(
                h, w, y, bias=b, mesh=explicit, **options
            )

        return jax.value_and_grad(scalar, argnums=(0, 1, 2))(h, w, b)

    def on_one_device(h, w, b, y):
        def scalar(h, w, b):
            return lsjax.fused_linear_smoothed_cross_entropy(h, w, y, bias=b, **options)

        return jax.value_and_grad(scalar, argnums=(0, 1, 2))(h, w, b)

    expected = jax.jit(on_one_device)(*(jnp.asarray(a) for a in (hidden, weight, bias, labels)))
    h = jax.device_put(hidden, NamedSharding(explicit, PartitionSpec("batch", None)))
    got = jax.jit(on_explicit)(h, *(jnp.asarray(a) for a in (weight, bias, labels)))
    results["explicit"] = dict(
        diffs=[
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True)
        ],
        scales=[float(np.max(np.abs(np.asarray(b)))) for b in jax.tree.leaves(expected)],
    )
    # 4. The fused loss itself (not the sharded one) on inputs laid over the explicit mesh, as
    # a data-parallel step has them (the hidden states split over the batch, the weight whole),
    # and with the weight and bias split over the vocabulary too: the single-device results.
    for weight_spec in (PartitionSpec(), PartitionSpec("vocab", None)):
        bias_spec = PartitionSpec(*weight_spec[:1])
        placed = [
            jax.device_put(hidden, NamedSharding(explicit, PartitionSpec("batch", None))),
            jax.device_put(weight, NamedSharding(explicit, weight_spec)),
            jax.device_put(bias, NamedSharding(explicit, bias_spec)),
            jax.device_put(labels, NamedSharding(explicit, PartitionSpec("batch"))),
        ]
        got = jax.jit(on_one_device)(*placed)
        results["fused_explicit"].append(
            dict(
                case=str(weight_spec),
                diffs=[
                    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True)
                ],
                scales=[float(np.max(np.abs(np.asarray(b)))) for b in jax.tree.leaves(expected)],
                layouts=[str(leaf.sharding.spec) for leaf in jax.tree.leaves(got)],
            )
        )

    # 5. Inside shard_map over the batch axis of the explicit mesh (its other axis still
    # Explicit): the per-shard logits split over the vocabulary (the loss; JAX 0.10 cannot take
    # a gradient through auto_axes there, for its own functions too), then not split at all
    # (the loss and its gradient).
    def per_batch_shard(x, y):
        return jax.lax.psum(lsjax.smoothed_cross_entropy(x, y, **sum_options), "batch")

    sum_options = dict(smoothing=0.1, ignore_index=-100, reduction="sum")
    in_batch = jax.shard_map(per_batch_shard, mesh=explicit, in_specs=PartitionSpec("batch"),
                             out_specs=PartitionSpec(), axis_names={"batch"})  # fmt: skip
    single = jax.value_and_grad(lambda x: lsjax.smoothed_cross_entropy(x, labels, **sum_options))
    expected = single(jnp.asarray(logits))
    results["partial_manual"] = []
    for spec, differentiated in (
        (PartitionSpec("batch", "vocab"), False),
        (PartitionSpec("batch", None), True),
    ):
        x = jax.device_put(logits, NamedSharding(explicit, spec))
        y = jax.device_put(labels, NamedSharding(explicit, PartitionSpec("batch")))
        if differentiated:
            got = jax.jit(jax.value_and_grad(in_batch))(x, y)
        else:
            got = (jax.jit(in_batch)(x, y),)
        results["partial_manual"].append(
            dict(
                case=str(spec),
                diffs=[
                    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                    for a, b in zip(got, expected, strict=False)
                ],
                scales=[float(np.max(np.abs(np.asarray(b)))) for b in expected[: len(got)]],
            )
        )
    # Control: the parser does see an all-gather of the logits when one is asked for.
    x = jax.device_put(logits, NamedSharding(mesh, PartitionSpec("batch", "vocab")))
    gather = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, PartitionSpec()))
    results["control_all_gather"] = biggest(all_gathers(gather.lower(x).compile().as_text()))
    results["rows_x_vocab_per_device"] = ROWS // 2 * VOCAB // 4
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
