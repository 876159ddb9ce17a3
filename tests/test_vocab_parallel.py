"""Vocabulary parallelism in PyTorch over 2 and 4 gloo processes on CPU.

One subprocess (``tests/vocab_parallel_checks.py``) starts its own process group of 4 ranks and
runs every check over the whole world and over two groups of 2 ranks side by side: the
vocabulary-parallel loss with class weights (its Hessian-vector products and forward-mode
tangents included), the vocabulary-parallel fused head (under autocast too, and its
Hessian-vector products), Megatron's
``vocab_parallel_cross_entropy`` and ``lstorch.smoothed_cross_entropy`` of DTensor logits
sharded on the class axis. Each result equals the single-process loss and gradients, is bit for
bit the same on every rank of its group, and runs the stated collectives: their number and
their bytes, O(rows) each, never rows x V. Here, the fused head is compared with its JAX twin,
Megatron's call with a float64 oracle of Megatron's intended formula and with Megatron's own
local-V formula (the numbers its docstring states), and the bad calls' messages are read.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lsjax.compat.megatron
import lsjax.sharded
import lstorch.compat.megatron
from parity_tests import oracles
from tests.check_scripts import run_check_script

# (rtol, atol) by dtype: the sharded sums are added in another order than the dense ones.
TOLERANCES = {"float64": (1e-12, 1e-13), "float32": (1e-5, 1e-6)}
BYTES = {"float64": 8, "float32": 4}


@pytest.fixture(scope="module")
def results():
    output = run_check_script("vocab_parallel_checks.py")
    result = json.loads(output.strip().splitlines()[-1])
    assert result["world"] == 4 and len(result["ranks"]) == 4
    return [dict(case, rank=rank) for rank, cases in enumerate(result["ranks"]) for case in cases]


def _of(results, check):
    found = [case for case in results if case["check"] == check]
    assert {case["world"] for case in found} == {2, 4}, check  # both group sizes ran
    return found


def _close(case, name):
    rtol, atol = TOLERANCES[case["dtype"]]
    return case[f"{name}_diff"] <= atol + rtol * case[f"{name}_scale"]


@pytest.mark.parametrize("check", ["dense", "fused", "dtensor"])
def test_each_rank_gets_the_single_process_loss_and_gradients(results, check):
    for case in _of(results, check):
        assert _close(case, "loss"), case
        assert _close(case, "grad"), case  # this rank's slice; the whole d hidden (fused)
        if check != "dtensor":  # d loss / d smoothing: the whole loss's, on every rank
            assert _close(case, "eps_grad"), case


def test_with_class_weights_second_derivatives_and_forward_mode_equal_the_dense_ones(results):
    for case in _of(results, "higher order"):
        assert _close(case, "hvp"), case  # double backward: the other ranks' terms included
        assert _close(case, "jvp"), case  # forward mode: each rank's share, all-reduced


def test_fused_head_second_derivatives_equal_torchs_and_the_dense_ones(results):
    """Hessian-vector products by double backward of the hidden states and of each rank's rows
    of the weight and bias: the other ranks' terms reach both through the lse's all-reduce,
    and the hidden states' through the all-reduce of their gradient."""
    cases = _of(results, "fused higher order")
    assert len(cases) == 4 * 4 * 2  # 4 cases, on 4 ranks, over the world and over pairs
    for case in cases:
        assert "error" not in case and _close(case, "hvp"), case
        assert _close(case, "func_hvp"), case  # torch.func.grad of torch.func.grad
        if "torch_hvp_diff" in case:
            assert _close(case, "torch_hvp"), case
    assert sum("torch_hvp_diff" in case for case in cases) == 8  # uniform, torch's own loss
    groups = {}
    for case in cases:  # the hidden states' product, all-reduced: the same on every rank
        groups.setdefault((case["group"], case["case"]), set()).add(case["hvp_bytes"][0])
    assert all(len(hidden_bytes) == 1 for hidden_bytes in groups.values()), groups


def test_fused_head_under_autocast_rounds_as_the_single_process_fused_loss(results):
    for case in _of(results, "autocast"):
        assert _close(case, "loss") and _close(case, "grad"), case
        assert case["grad_dtypes"] == ["torch.float32"] * 3, case  # the inputs' own dtypes


def test_the_dense_loss_under_autocast_computes_as_outside_it(results):
    # Autocast ran the class-weighted support sum (a matrix product) in bf16: loss and
    # gradient now equal the call outside the region bit for bit, and the single process's.
    for case in _of(results, "autocast dense"):
        assert case["same_as_outside"], case
        assert _close(case, "loss") and _close(case, "grad"), case
        assert case["dtypes"] == ["torch.float32"] * 2, case


def test_class_weights_give_torch_cross_entropy(results):
    # The uniform convention with class weights is F.cross_entropy(weight=..., label_smoothing).
    cases = [case for case in _of(results, "dense") if case["case"].startswith("uniform")]
    assert cases
    for case in cases:
        rtol, atol = TOLERANCES[case["dtype"]]
        assert case["torch_diff"] <= atol + rtol * case["loss_scale"], case


def test_fused_head_equals_its_jax_twin(results):
    # lsjax.sharded.sharded_fused_linear_smoothed_cross_entropy, the same keywords, on one
    # device's mesh: the same loss and gradients as each rank's (its slice of d weight, d bias).
    cases = [case for case in _of(results, "fused") if case["twin"]]
    assert {case["world"] for case in cases} == {2, 4}
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
    jax_results = {}  # by group size: the same data on every rank of every group of that size
    for case in cases:
        twin = case["twin"]
        if case["world"] not in jax_results:
            inputs = [jnp.asarray(twin[name], jnp.float64) for name in ("hidden", "weight", "bias")]

            def loss_fn(hidden, weight, bias, twin=twin):
                return lsjax.sharded.sharded_fused_linear_smoothed_cross_entropy(
                    hidden, weight, jnp.asarray(twin["labels"]), mesh=mesh, batch_axis=None,
                    vocab_axis="vocab", bias=bias, smoothing=twin["smoothing"], chunk_size=2,
                    **twin["options"],
                )  # fmt: skip

            loss, vjp = jax.vjp(jax.jit(loss_fn), *inputs)
            cotangent = jnp.asarray(twin["cotangent"], jnp.float64)
            jax_results[case["world"]] = (loss, *vjp(cotangent))
        loss, d_hidden, d_weight, d_bias = jax_results[case["world"]]
        local, rank = len(twin["d_bias"]), case["rank"] % case["world"]
        mine = slice(rank * local, (rank + 1) * local)
        pairs = [(twin["loss"], loss), (twin["d_hidden"], d_hidden),
                 (twin["d_weight"], d_weight[mine]), (twin["d_bias"], d_bias[mine])]  # fmt: skip
        for ours, theirs in pairs:
            np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-12, atol=1e-13)


def test_fused_head_without_bias_returns_no_bias_gradient(results):
    for case in _of(results, "fused"):
        assert case["bias_grad_none"] == ("bias=False" in case["case"]), case


def test_dtensor_logits_give_a_replicated_loss_and_a_sharded_gradient(results):
    for case in _of(results, "dtensor"):
        assert case["replicated"], case
        assert case["grad_placements"] == "(Shard(dim=1),)", case


@pytest.mark.parametrize(
    "check",
    ["dense", "fused", "megatron", "dtensor", "higher order", "autocast", "autocast dense"],
)
def test_every_rank_of_a_group_is_bit_identical(results, check):
    groups = {}
    for case in _of(results, check):
        key = (case["group"], case["case"], case.get("dtype"))
        groups.setdefault(key, []).append(case)
    for key, cases in groups.items():
        assert len(cases) == cases[0]["world"], key  # every rank of the group reported
        assert len({case["loss_bytes"] for case in cases}) == 1, key
        if check == "fused":  # d hidden, all-reduced: the same on every rank too
            assert len({case["d_hidden_bytes"] for case in cases}) == 1, key


def _forward_bytes(rows, weighted, value_bytes, stats=False, shard_sizes=True):
    """The forward all-reduces on the CPU, where the host reads the labels: each rank's class
    count and its negative (two int64), so that shards of unequal size raise on every rank
    before any check that depends on K; then the loss's two: the rows' max and the shard sizes
    (two values), and the packed sums (sum-exp, x_y, the support sum, x_pad; with class weights
    w_y per row and two scalars). ``return_stats`` adds each row's raw max to the first and
    two rows (the entropy's sum and the argmax's tie count) to the second. A DTensor's layout
    gives every rank its classes (``shard_sizes=False``): no class counts to compare."""
    maxima = 2 * rows + 2 if stats else rows + 2
    packed = (5 * rows + 2 if weighted else 4 * rows) + (2 * rows if stats else 0)
    loss = [["all_reduce", maxima * value_bytes], ["all_reduce", packed * value_bytes]]
    return [["all_reduce", 2 * 8], *loss] if shard_sizes else loss


@pytest.mark.parametrize("check", ["dense", "fused", "dtensor"])
def test_collectives_per_call_are_stated_and_o_of_rows(results, check):
    for case in _of(results, check):
        value_bytes, rows = BYTES[case["dtype"]], case["rows"]
        weighted = check == "dense" or "weighted=True" in case["case"]
        # a DTensor's layout gives each rank its classes: no class counts to compare
        forward = _forward_bytes(rows, weighted, value_bytes, shard_sizes=check != "dtensor")
        assert case["forward"] == forward, case
        # Backward: nothing for the logits; the fused head all-reduces d hidden (rows x D).
        expected = []
        if check == "fused":
            expected = [["all_reduce", rows * case["features"] * value_bytes]]
        assert case["backward"] == expected, case
        vocab = 5 * case["world"]
        largest = max(size for _, size in case["forward"] + case["backward"])
        assert largest < rows * vocab * value_bytes, case  # never rows x V


def test_where_normalizer_kl_mask_and_z_loss_give_the_single_process_loss_and_gradients(results):
    # Both losses: the loss, the z-part (return_z_loss), every gradient and d z_loss equal
    # lstorch.smoothed_cross_entropy's of the full logits; no collective beyond the plain call's.
    cases = _of(results, "options")
    assert {case["case"] for case in cases} == {
        f"{kind}/{name}"
        for kind in ("dense", "fused")
        for name in (
            "where/normalizer",
            "kl",
            "z_loss",
            "kl/z_loss",
            "class_mask",
            "class_mask/weight/z_loss",
            "pad_minus_inf",
        )
    }
    groups = {}
    for case in cases:
        assert _close(case, "loss") and _close(case, "grad"), case
        # return_z_loss=True: (loss, z-part), as the single-process loss returns
        assert case["returned_z"] == case["expected_z"] == case["asked_z"], case
        # A class mask travels as support weights u = w m: the weighted call's packed sum.
        assert case["forward"] == _forward_bytes(case["rows"], case["weighted"], 8), case
        expected = []
        if case["case"].startswith("fused"):  # d hidden, as without the options
            expected = [["all_reduce", case["rows"] * case["features"] * 8]]
        assert case["backward"] == expected, case
        groups.setdefault((case["group"], case["case"]), []).append(case)
    for key, group in groups.items():  # bit for bit the same on every rank of its group
        # (the loss, and what each rank gets whole: d hidden of the fused head, d z_loss)
        assert len(group) == group[0]["world"], key
        assert len({(case["loss_bytes"], case["grad_bytes"]) for case in group}) == 1, key


def test_a_compiled_step_gives_the_eager_and_single_process_results(results):
    # torch.compile of a step that calls the loss and .backward() (as the losses' own error
    # for a compiled torch.func transform advises): Inductor in torch 2.13 miscompiled the
    # cores' in-place all-reduce of a concatenation (the fused head's loss 6.40 for 5.94; the
    # dense loss's stats.correct False on correct rows), so the loss's Function runs outside
    # the graph. Loss, z-part, stats and gradients equal the eager step's on both ranks of a
    # pair (the bug showed on 2 ranks as on 4), the step's backward sending a 0-d grad_outputs
    # into a scaled loss (dense) or random per-row cotangents (fused, unreduced).
    cases = [case for case in results if case["check"] == "compiled"]
    assert sorted((case["case"], case["rank"]) for case in cases) == [
        (kind, rank) for kind in ("dense", "fused") for rank in (0, 1)
    ]
    for case in cases:
        assert _close(case, "loss") and _close(case, "grad"), case
        rtol, atol = TOLERANCES["float32"]  # against the single process: other summing orders
        assert case["expected_diff"] <= atol + rtol * case["loss_scale"], case
        compiled, eager, expected = case["correct"]
        assert compiled == eager == expected, case
        assert any(expected) and not all(expected), case  # rows of both kinds


def test_log_probabilities_give_the_single_process_loss_and_derivatives(results):
    # from_log_probs=True, each rank holding its slice of log_softmax over the whole
    # vocabulary: the loss, the gradient's slice, d smoothing, the double backward's derivative
    # in the cotangent and the forward-mode tangent equal lstorch.smoothed_cross_entropy's of
    # the whole log-probabilities, in float64 and float32; the plain call's collectives (the
    # lse is 0, not all-reduced: the same packed bytes), none in backward, even with
    # create_graph (no lse to recompute).
    cases = _of(results, "log probs")
    names = {
        "uniform/mean",
        "others/kl/none",
        "others_but_pad/weight/sum",
        "class_mask/weight/where/normalizer",
    }
    assert {(case["case"], case["dtype"]) for case in cases} == {
        (name, dtype) for name in names for dtype in ("float64", "float32")
    }
    groups = {}
    for case in cases:
        assert _close(case, "loss") and _close(case, "grad"), case
        assert _close(case, "eps_grad") and _close(case, "jvp"), case
        value_bytes = BYTES[case["dtype"]]
        assert case["forward"] == _forward_bytes(case["rows"], case["weighted"], value_bytes)
        assert case["backward"] == [], case
        groups.setdefault((case["group"], case["case"], case["dtype"]), []).append(case)
    for key, group in groups.items():  # bit for bit the same on every rank of its group
        assert len(group) == group[0]["world"], key
        assert len({case["loss_bytes"] for case in group}) == 1, key


def test_softcap_logit_scale_and_return_stats_give_the_single_process_results(results):
    # Both losses with softcap, logit_scale and return_stats: the loss, every gradient and the
    # stats (lse, entropy, correct) equal lstorch.smoothed_cross_entropy's of the full logits.
    # The transform needs no collective; return_stats adds bytes to the same two all-reduces
    # (the raw max beside the peak; the entropy's sum and the argmax's tie count in the
    # packed sum), and none in backward.
    cases = _of(results, "transforms")
    assert {case["case"] for case in cases} == {
        f"{kind}/{name}"
        for kind in ("dense", "fused")
        for name in (
            "softcap",
            "logit_scale",
            "softcap/logit_scale/weight/z_loss",
            "return_stats",
            "return_stats/softcap/weight",
            "return_stats/class_mask/return_z_loss",
        )
    }
    groups = {}
    for case in cases:
        assert _close(case, "loss") and _close(case, "grad"), case
        assert case["returned_stats"] == case["stats"], case
        rows = case["rows"]
        if case["stats"]:
            ours, expected = case["correct"]
            assert ours == expected, case  # torch.argmax's first-max rule, across ranks
            if case["case"].startswith("dense"):
                # all equal: the first class; a tie across ranks: not the later label; the
                # label at the argmax
                assert ours[3:6] == [True, False, True], case
        forward = _forward_bytes(rows, case["weighted"], 8, stats=case["stats"])
        assert case["forward"] == forward, case
        expected_backward = []
        if case["case"].startswith("fused"):  # d hidden, as without the options
            expected_backward = [["all_reduce", rows * case["features"] * 8]]
        assert case["backward"] == expected_backward, case
        groups.setdefault((case["group"], case["case"]), []).append(case)
    for key, group in groups.items():  # bit for bit the same on every rank of its group
        assert len(group) == group[0]["world"], key
        assert len({(case["loss_bytes"], case["d_hidden_bytes"]) for case in group}) == 1, key


def test_dtensor_logits_take_the_vocabulary_parallel_options(results):
    # where, normalizer, kl, class_mask, z_loss/return_z_loss; softcap, logit_scale, weight,
    # return_stats: what the dense call returns, every tensor a replicated DTensor; the
    # collectives of the vocabulary-parallel loss (none in backward).
    cases = _of(results, "dtensor options")
    assert {case["case"] for case in cases} == {
        "where/normalizer/kl/class_mask/z_loss",
        "softcap/logit_scale/weight/return_stats",
        "from_log_probs/kl/class_mask",
    }
    groups = {}
    for case in cases:
        assert case["replicated"] and case["outputs"] == case["expected_outputs"], case
        assert case["bools_equal"], case  # stats.correct
        assert _close(case, "loss") and _close(case, "grad"), case
        forward = _forward_bytes(case["rows"], case["weighted"], 8, stats=case["stats"],
                                 shard_sizes=False)  # fmt: skip
        assert case["forward"] == forward, case
        assert case["backward"] == [], case
        groups.setdefault((case["group"], case["case"]), []).append(case)
    for key, group in groups.items():
        assert len(group) == group[0]["world"], key
        assert len({case["loss_bytes"] for case in group}) == 1, key


def test_dtensor_vocabularies_that_do_not_divide_by_the_mesh(results):
    """K = world * 5 - 3 split as torch's Shard splits it (5, 5, 5, 2 classes on 4 ranks; 4, 3
    on 2), as torch's loss_parallel takes it: the single-process loss and gradient, with a label
    and the pad in the smallest shard, class weights, a class mask, z-loss, stats, a transform
    and the KL form; the loss's two all-reduces (the layout needs no collective)."""
    cases = _of(results, "dtensor uneven")
    assert len(cases) == 2 * 4 * 4  # two groups of every rank, four cases
    assert {case["local_classes"] for case in cases} == {5, 2, 4, 3}
    for case in cases:
        assert _close(case, "loss") and _close(case, "grad") and case["bools_equal"], case
        forward = _forward_bytes(case["rows"], case["weighted"], 8, stats=case["stats"],
                                 shard_sizes=False)  # fmt: skip
        assert case["forward"] == forward, case


def _megatron_own_loss(logits, target, label_smoothing, rank, world):
    """Megatron-core's ``vocab_parallel_cross_entropy`` as its code computes it on one rank
    (megatron/core/tensor_parallel/cross_entropy.py, ``_VocabParallelCrossEntropy.forward``):
    the global log-softmax, then smoothing with the LOCAL vocabulary size and the LOCAL mean
    of the log-probabilities, over the rank's own slice. Float64 NumPy, per token."""
    x = np.asarray(logits, np.float64)
    local_vocab = x.shape[-1] // world
    shifted = x - x.max(-1, keepdims=True)  # the global max and sum-exp, all-reduced
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, np.asarray(target)[..., None], -1)[..., 0]
    local = log_probs[..., rank * local_vocab : (rank + 1) * local_vocab]
    smoothing = label_smoothing * local_vocab / (local_vocab - 1)
    return (1 - smoothing) * nll - smoothing * local.mean(-1)


def test_megatron_compat_is_megatrons_intended_formula_on_every_rank(results):
    cases = [case for case in _of(results, "megatron") if case["case"] == "random"]
    assert len(cases) == 8  # every rank, in the world and in its pair
    for case in cases:
        expected, vjp = oracles.megatron_cross_entropy(case["logits"], case["target"], 0.2)
        np.testing.assert_allclose(case["loss"], expected, rtol=1e-12, atol=1e-13)
        world, local = case["world"], len(case["grad"][0][0])
        rank = case["rank"] % world
        full_grad = vjp(np.ones(np.shape(expected)))
        np.testing.assert_allclose(
            case["grad"], full_grad[..., rank * local : (rank + 1) * local], rtol=1e-12, atol=1e-13
        )
        # Megatron's own code at this many ranks gives another loss on each rank.
        own = _megatron_own_loss(case["logits"], case["target"], 0.2, rank, world)
        assert np.abs(own - expected).max() > 1e-3


def test_megatron_docstring_states_the_two_rank_numbers(results):
    example = [[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.25]]
    cases = [case for case in results if case["case"] == "docstring example"]
    intended, _ = oracles.megatron_cross_entropy(example, [0], 0.1)
    doc = " ".join(lstorch.compat.megatron.vocab_parallel_cross_entropy.__doc__.split())
    assert f"returns {float(intended[0]):.4f} on both ranks" in doc
    for case in cases:  # ours: the intended value on every rank, with 2 ranks
        assert case["world"] == 2
        np.testing.assert_allclose(case["loss"], intended, rtol=1e-14)
        assert case["forward"] == _forward_bytes(1, False, 8)
    own = [float(_megatron_own_loss(example, [0], 0.1, rank, 2)[0]) for rank in (0, 1)]
    assert f"returns {own[0]:.4f} on rank 0 and {own[1]:.4f} on rank 1" in doc


ERRORS = {  # case: what the message must say (the function, the argument, the value or shape)
    "dense weight shape": "vocab_parallel_smoothed_cross_entropy: `weight` must have shape (5,), "
    "this rank's slice of the class weights; got shape (20,).",
    # shards of unequal size: every rank learns it from the max all-reduce and raises alike
    "dense uneven shards": "vocab_parallel_smoothed_cross_entropy: every rank of `group` must "
    "hold the same number of classes (split the vocabulary evenly: pad it to a multiple of the "
    "world size); got shards of 5 to 6 classes.",
    "fused uneven shards": "vocab_parallel_fused_linear_smoothed_cross_entropy: every rank of "
    "`group` must hold the same number of classes",
    # ... before any check that depends on K = world * V_local, so that a label, a pad_index or
    # a class_mask that is out of range on the smaller shard's rank alone leaves no rank waiting
    "dense uneven shards, a label past the smaller": "vocab_parallel_smoothed_cross_entropy: "
    "every rank of `group` must hold the same number of classes (split the vocabulary evenly: "
    "pad it to a multiple of the world size); got shards of 4 to 5 classes.",
    "fused uneven shards, a label past the smaller": "vocab_parallel_fused_linear_smoothed_cross_"
    "entropy: every rank of `group` must hold the same number of classes",
    "dense uneven shards, pad_index past the smaller": "vocab_parallel_smoothed_cross_entropy: "
    "every rank of `group` must hold the same number of classes",
    "dense uneven shards, the full class_mask": "vocab_parallel_smoothed_cross_entropy: every "
    "rank of `group` must hold the same number of classes",
    "fused class_weight shape": "vocab_parallel_fused_linear_smoothed_cross_entropy: "
    "`class_weight` must have shape (5,), this rank's slice of the class weights; got shape (20,).",
    "fused weight_shard shape": "vocab_parallel_fused_linear_smoothed_cross_entropy: "
    "`weight_shard` must have shape (V, 4)",
    # the full (K,) class mask on every rank: every rank checks it and raises alike
    "dense class_mask shape": "vocab_parallel_smoothed_cross_entropy: `class_mask` must have "
    "shape (20,); got shape (5,).",
    "fused masked label": "vocab_parallel_fused_linear_smoothed_cross_entropy: `labels` of "
    "counted rows must be classes that `class_mask` allows (True); got labels of masked classes "
    "[1",
    # every option of the vocabulary-parallel loss passes; its backward is never in place
    "dtensor inplace_backward": "smoothed_cross_entropy: `inplace_backward` is not supported "
    "with DTensor logits (the vocabulary-parallel path takes smoothing, convention, "
    "ignore_index, pad_index, reduction, where, normalizer, kl, from_log_probs, class_mask, "
    "z_loss, return_z_loss, softcap, logit_scale, return_stats, check_labels, weight and axis); "
    "got inplace_backward=True.",
    # log-probabilities have no logsumexp to penalise, as in the single-device loss
    "dense from_log_probs z_loss": "vocab_parallel_smoothed_cross_entropy: `z_loss` (and "
    "return_z_loss=True) needs logits: with from_log_probs=True there is no logsumexp to "
    "penalise; got z_loss=0.1, return_z_loss=False.",
    "fused softcap": "vocab_parallel_fused_linear_smoothed_cross_entropy: `softcap` must be None "
    "or a finite number > 0; got 0.0.",
    "dense return_stats": "vocab_parallel_smoothed_cross_entropy: `return_stats` must be True or "
    "False; got 'yes' (str).",
    "dtensor weight of K + 2 classes": "smoothed_cross_entropy: `weight` must have shape (20,); "
    "got shape (22,).",
    "dtensor weight of K - 1 classes, sharded": "smoothed_cross_entropy: `weight` must have shape "
    "(20,); got shape (19,).",
    "dense 0-d local_logits": "vocab_parallel_smoothed_cross_entropy: `local_logits` must have at "
    "least one dimension (a class axis); got shape ().",
    "dense group 'tp'": "vocab_parallel_smoothed_cross_entropy: `group` must be a "
    "torch.distributed.ProcessGroup, or None for the default group; got 'tp' (str).",
    "dtensor a rank without a class": "smoothed_cross_entropy: DTensor `logits` split as torch's "
    "Shard splits it (2 classes a rank) leaves the last ranks no class: 5 classes over 4 ranks; "
    "use at most 3 ranks, or pad the vocabulary.",
    "dtensor replicated logits": "smoothed_cross_entropy: DTensor `logits` must be sharded on its "
    "class axis 1 over a 1-D device mesh",
    "dense compiled func.grad": "NotImplementedError: vocab_parallel_smoothed_cross_entropy: "
    "torch.compile of a torch.func transform of this loss (torch.func.grad, vjp, jacrev, ...) "
    "is not supported",
    "fused compiled func.grad": "NotImplementedError: "
    "vocab_parallel_fused_linear_smoothed_cross_entropy: torch.compile of a torch.func transform",
    "fused forward mode": "NotImplementedError: "
    "vocab_parallel_fused_linear_smoothed_cross_entropy: forward-mode AD (jvp, "
    "torch.autograd.forward_ad, jacfwd) is not implemented",
}


def test_bad_calls_name_the_function_the_argument_and_the_value(results):
    cases = [case for case in results if case["check"] == "errors"]
    assert len(cases) == 4 * len(ERRORS)
    for case in cases:
        assert case["message"] is not None, case
        assert ERRORS[case["case"]] in case["message"], case


def test_uneven_shards_unread_give_nan_rows_not_a_number(results):
    """Where the host reads no value (an accelerator's default: no host sync), shards of
    unequal size cannot raise; every counted row is NaN instead, never a plausible loss."""
    cases = [case for case in results if case["check"] == "uneven unread"]
    assert len(cases) == 4, cases  # every rank of the 4-rank group
    for case in cases:
        assert case["counted"] > 0 and case["counted_nan"] and case["ignored_zero"], case


def test_megatron_compat_checks_its_arguments_as_megatron():
    call = lstorch.compat.megatron.vocab_parallel_cross_entropy
    logits, target = torch.zeros(2, 4), torch.tensor([0, 1])
    message = r"cross_entropy: `label_smoothing` must be in \[0, 1\); got 1.0"
    with pytest.raises(ValueError, match=message):  # Megatron asserts 0 <= label_smoothing < 1
        call(logits, target, 1.0)
    with pytest.raises(ValueError, match=message):  # the JAX twin in the same words
        lsjax.compat.megatron.cross_entropy(logits.numpy(), target.numpy(), 1.0)
    with pytest.raises(ValueError, match="as `group` or as `tp_group`; got both"):
        call(logits, target, 0.1, object(), tp_group=object())
