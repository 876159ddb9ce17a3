"""Vocabulary-sharded losses on 8 simulated CPU devices (a 2 x 4 batch x vocab mesh).

The device count is fixed when JAX is imported, so every JAX check runs in ONE subprocess
(``tests/sharded_checks.py``) started with ``--xla_force_host_platform_device_count=8``; this
test reads its JSON. Checked, for the sharded logits (``smoothed_cross_entropy`` under jit with a
NamedSharding) and the sharded weight (``sharded_fused_linear_smoothed_cross_entropy``):
single-device loss and gradients, the smoothing's included (global K, sums and 'mean'
denominator), the same loss bytes on every device, NaN/inf hidden in ignored rows changing
nothing (fused), and no all-gather of a rows x V array in the compiled HLO (a control shows the
HLO reader does see one when the program asks for it).
"""

import json

import pytest

from tests.check_scripts import run_check_script

# float32 with a different summation order (per shard, then all-reduced): the loss differs by a
# few ulps of its size, gradients by a few ulps of their largest entry.
RTOL = 1e-6


@pytest.fixture(scope="module")
def results():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    output = run_check_script("sharded_checks.py", env=env)
    return json.loads(output.strip().splitlines()[-1])


def test_the_hlo_reader_sees_an_all_gather_of_the_logits(results):
    assert results["control_all_gather"] >= results["rows_x_vocab_per_device"]


def test_sharded_logits_give_the_single_device_loss_and_gradient(results):
    assert len(results["logits"]) == 5
    for case in results["logits"]:
        assert case["loss_diff"] <= 4 * RTOL * case["loss_scale"], case
        assert case["grad_diff"] <= 1e-7, case  # gradient entries are O(1/rows)
        assert case["eps_grad_diff"] <= 4 * RTOL * max(case["eps_grad_scale"], 1.0), case
        assert case["eps_grad_scale"] > 0, case  # d loss / d smoothing is not a silent 0
        assert case["grad_sharded"] == "P('batch', 'vocab')", case
        assert case["replicas_identical"], case
        assert case["biggest_all_gather"] < results["rows_x_vocab_per_device"], case


def test_explicit_mesh_axes_keep_the_auto_meshs_temporaries(results):
    """On a mesh with ``Explicit`` axes (``jax.make_mesh``'s default) the dense loss runs
    under ``auto_axes``: XLA plans the temporaries it plans on an ``Auto`` mesh, not the
    rows x V/devices arrays the explicit layout rules would keep (the class weights, split over
    the vocabulary, add a few hundred bytes)."""
    by_case = {case["case"]: case for case in results["logits"]}
    for options in ("uniform/none", "others_but_pad/sum"):
        auto, explicit = by_case[f"{options}/auto"], by_case[f"{options}/explicit"]
        # A float32 rows x V/devices array is 4 x rows_x_vocab_per_device bytes: the slack is a
        # quarter of one.
        assert explicit["temp_bytes"] <= auto["temp_bytes"] + results["rows_x_vocab_per_device"]


def test_the_fused_loss_on_inputs_laid_over_an_explicit_mesh(results):
    """``lsjax.fused_linear_smoothed_cross_entropy`` (not the sharded head) on an explicit
    mesh: its hand-written derivative's products have no layout JAX's rules can tell, so it
    refused every layout; under ``auto_axes`` it gives the single-device loss and gradients,
    each gradient laid out as its input."""
    cases = results["fused_explicit"]
    assert [case["case"] for case in cases] == ["P()", "P('vocab', None)"]
    for case in cases:
        assert len(case["diffs"]) == 4, case  # the loss and d hidden, d weight, d bias
        for diff, scale in zip(case["diffs"], case["scales"], strict=True):
            assert scale > 0 and diff <= 4 * RTOL * max(scale, 1.0), case
    assert cases[0]["layouts"] == ["P()", "P('batch', None)", "P(None, None)", "P(None,)"]
    assert cases[1]["layouts"] == ["P()", "P('batch', None)", "P('vocab', None)", "P('vocab',)"]


def test_inside_shard_map_over_one_axis_of_an_explicit_mesh(results):
    """In ``shard_map`` over the batch axis of a (batch, vocab) mesh with explicit axes, the
    vocabulary axis is still ``Explicit`` and the batch axis ``Manual``, which ``auto_axes``
    may not turn ``Auto``: the loss takes only the explicit axes there (it raised
    ``NotImplementedError`` when it took them all). Logits split over the vocabulary inside:
    the single-device loss (JAX 0.10 takes no gradient through ``auto_axes`` inside
    ``shard_map``, not even of ``jax.nn.logsumexp``); not split: the loss and its gradient."""
    cases = results["partial_manual"]
    assert [case["case"] for case in cases] == ["P('batch', 'vocab')", "P('batch', None)"]
    assert [len(case["diffs"]) for case in cases] == [1, 2]
    for case in cases:
        for diff, scale in zip(case["diffs"], case["scales"], strict=True):
            assert scale > 0 and diff <= 4 * RTOL * max(scale, 1.0), case


def test_sharded_weight_gives_the_single_device_fused_and_dense_results(results):
    assert len(results["fused"]) == 8
    for case in results["fused"]:
        assert case["scales"][-1] > 0, case  # d loss / d smoothing (the last leaf) is not 0
        for diff, scale in zip(case["diffs"], case["scales"], strict=True):
            assert diff <= 4 * RTOL * max(scale, 1.0), case
        assert case["dense_diff"] <= 4 * RTOL * case["scales"][0], case
        assert case["replicas_identical"], case
        assert case["biggest_all_gather"] < results["rows_x_vocab_per_device"], case
        assert case["non_finite_reaches_nothing"], case


def test_the_sharded_fused_loss_on_a_mesh_with_explicit_axes(results):
    """``jax.make_mesh``'s default axes are explicit: ``shard_map`` then checks its inputs'
    layout instead of moving them, and the loss failed unless the caller had placed every
    input (and its own mask of rows) exactly as its ``in_specs`` say. It lays them out itself
    now: the loss and its gradients equal the single-device fused loss's."""
    case = results["explicit"]
    assert len(case["diffs"]) == 4, case  # the loss and d hidden, d weight, d bias
    for diff, scale in zip(case["diffs"], case["scales"], strict=True):
        assert scale > 0 and diff <= 4 * RTOL * max(scale, 1.0), case


def test_check_labels_decides_whether_the_sharded_fused_loss_reads_the_labels():
    """As in ``lsjax.fused_linear_smoothed_cross_entropy``: concrete labels out of range raise
    by default (the host reads them); ``check_labels=False`` reads nothing, and the row that
    label reaches is NaN, never a plausible number. One device in the mesh: the check runs
    before anything is split."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import lsjax.sharded

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
    hidden = jnp.ones((3, 4), jnp.float32)
    weight = jnp.arange(20, dtype=jnp.float32).reshape(5, 4) / 20
    labels = jnp.array([0, 7, 2])  # 7 is out of range for 5 classes
    loss = lsjax.sharded.sharded_fused_linear_smoothed_cross_entropy
    options = {"mesh": mesh, "batch_axis": None, "smoothing": 0.1, "reduction": "none"}
    with pytest.raises(ValueError, match=r"sharded_fused_linear_smoothed_cross_entropy.*labels"):
        loss(hidden, weight, labels, **options)
    rows = np.asarray(loss(hidden, weight, labels, check_labels=False, **options))
    assert np.isnan(rows[1]) and np.isfinite(rows[[0, 2]]).all()


def test_bad_meshes_and_axes_raise_and_name_the_function():
    """A mesh that is not one, and one mesh axis asked to split both the rows and the classes
    (each device would hold the rows and classes of its own index only, and the loss mixed
    rows: 3.333 for 2.643 before this check)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import lsjax.sharded

    loss = lsjax.sharded.sharded_fused_linear_smoothed_cross_entropy
    hidden, weight = jnp.ones((4, 3), jnp.float32), jnp.ones((4, 3), jnp.float32)
    labels = jnp.array([0, 1, 2, 3])
    with pytest.raises(TypeError, match=r"sharded_fused_linear_smoothed_cross_entropy: `mesh` "
                       r"must be a jax.sharding.Mesh; got None \(NoneType\)\."):  # fmt: skip
        loss(hidden, weight, labels, mesh=None)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
    with pytest.raises(ValueError, match=r"sharded_fused_linear_smoothed_cross_entropy: "
                       r"`batch_axis` and `vocab_axis` must be different axes of the mesh \(or "
                       r"batch_axis=None\); got both 'vocab'\."):  # fmt: skip
        loss(hidden, weight, labels, mesh=mesh, batch_axis="vocab", vocab_axis="vocab")
