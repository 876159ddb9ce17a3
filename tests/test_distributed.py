"""``lstorch.distributed.vocab_parallel_smoothed_cross_entropy`` over 3 gloo processes on CPU.

One subprocess (``tests/distributed_checks.py 3``) spawns the ranks, each holding a third of the
vocabulary of the same logits. On every rank: the loss equals the dense single-process loss
(global K, global lse, global sums and 'mean' denominator), the gradient equals that rank's slice
of the dense gradient, the derivative with respect to the smoothing equals the dense one, and the
loss is bit-for-bit the same on all ranks; the Hessian-vector product (double backward) is that
rank's slice of the dense one, cross-rank terms included, and the loss's forward-mode tangent
(each rank holding its slice of the tangent) is the dense one. Two cases add a row mask
(``where``), one with a ``normalizer``.
"""

import json

import pytest

from tests.check_scripts import run_check_script

WORLD = 3
# (rtol, atol) by dtype: the sharded sums are added in another order than the dense ones.
TOLERANCES = {"float64": (1e-12, 1e-14), "float32": (1e-6, 1e-6)}


@pytest.fixture(scope="module")
def ranks():
    output = run_check_script("distributed_checks.py", str(WORLD))
    result = json.loads(output.strip().splitlines()[-1])
    assert result["world"] == WORLD and len(result["ranks"]) == WORLD
    return result["ranks"]


def test_every_rank_gets_the_dense_loss_and_its_slice_of_the_dense_gradient(ranks):
    assert len(ranks[0]) == 12  # 6 cases x (float64, float32)
    for rank in ranks:
        for case in rank:
            rtol, atol = TOLERANCES[case["case"].rsplit("/", 1)[1]]
            assert case["loss_diff"] <= atol + rtol * case["loss_scale"], case
            assert case["grad_diff"] <= atol + rtol, case  # entries are O(1)
            # d loss / d smoothing: the whole loss's on every rank, and not a silent 0.
            assert case["eps_grad_diff"] <= atol + rtol * case["eps_grad_scale"], case
            assert case["eps_grad_scale"] > 0, case


def test_second_derivatives_and_forward_mode_equal_the_dense_ones(ranks):
    for rank in ranks:
        for case in rank:
            rtol, atol = TOLERANCES[case["case"].rsplit("/", 1)[1]]
            assert case["hvp_diff"] <= atol + rtol * max(1.0, case["hvp_scale"]), case
            assert case["jvp_diff"] <= atol + rtol * max(1.0, case["jvp_scale"]), case


def test_the_loss_is_bit_for_bit_identical_on_every_rank(ranks):
    for index in range(len(ranks[0])):
        assert len({rank[index]["loss_bytes"] for rank in ranks}) == 1, ranks[0][index]["case"]
