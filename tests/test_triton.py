"""lstorch's Triton kernels (the CUDA fast path) against the float64 oracle.

CI has no GPU, so ``tests/triton_checks.py`` runs the kernels in Triton's interpreter on the CPU,
in a subprocess (the interpreter must be switched on before Triton is imported). On a machine
with CUDA the same script runs them on the GPU. When the kernels run and when lstorch falls
back to plain torch ops is tested here, by counting the calls into ``lstorch.triton_kernels``.
"""

import importlib.util

import pytest
import torch

from parity_tests.paths import KernelLaunches
from tests.check_scripts import run_check_script
from tests.helpers import profile


def test_the_kernels_equal_the_oracle_in_every_option():
    pytest.importorskip("triton", reason="Triton is in the dev extras; CI installs it")
    output = run_check_script("triton_checks.py", timeout=600)
    # ci: a pairwise cover of the 90 (shape, convention, variant, dtype) cases; nightly: all
    expected = "90 of 90 cases" if profile() == "nightly" else " of 90 cases"
    assert expected in output and ": 0 failures" in output, output


def _launches(call) -> int:
    """How many times ``call()`` entered lstorch's Triton kernels (forward or backward)."""
    launches = KernelLaunches()
    with launches.counting():
        call()
    return launches.count


def test_the_kernels_are_used_only_where_they_apply(monkeypatch):
    import lstorch

    labels = torch.tensor([0, 2])
    cpu = torch.randn(2, 3)

    def loss(x, **options):
        return lstorch.smoothed_cross_entropy(x, labels, smoothing=0.1, **options).sum()

    monkeypatch.setenv("LSTORCH_TRITON", "auto")
    assert _launches(lambda: loss(cpu)) == 0  # CPU tensors: plain torch ops
    monkeypatch.setenv("LSTORCH_TRITON", "all")
    available = importlib.util.find_spec("triton") is not None
    assert (_launches(lambda: loss(cpu)) > 0) == available
    assert _launches(lambda: loss(torch.log_softmax(cpu, -1), from_log_probs=True)) == 0
    assert _launches(lambda: loss(cpu.double())) == 0
    # Under a torch.func transform the kernels are off.
    assert _launches(lambda: torch.func.grad(loss)(cpu)) == 0
    monkeypatch.setenv("LSTORCH_TRITON", "off")
    assert _launches(lambda: loss(cpu)) == 0
    monkeypatch.setenv("LSTORCH_TRITON", "fast")
    with pytest.raises(ValueError, match=r"LSTORCH_TRITON.*'auto', 'all', 'off'.*'fast'"):
        loss(cpu)


def test_inplace_backward_on_a_leaf_is_an_error():
    import lstorch

    logits = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"inplace_backward=True.*not a leaf"):
        lstorch.smoothed_cross_entropy(logits, torch.tensor([0, 1]), inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward=True needs `logits` contiguous"):
        lstorch.smoothed_cross_entropy(
            logits.view_as(logits), torch.tensor([0, 1, 1]), axis=0, inplace_backward=True
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_inplace_backward_on_plain_torch_ops_gives_the_same_gradient(dtype):
    """The CPU path of ``inplace_backward``: bitwise the out-of-place gradient, left in the
    logits, and the weight gradient of the layer below unchanged."""
    import lstorch

    torch.manual_seed(0)
    weight = torch.randn(8, 37, dtype=dtype, requires_grad=True)
    hidden = torch.randn(6, 8, dtype=dtype)
    labels = torch.tensor([0, 5, -100, 36, 2, 2])
    results = []
    for inplace in (False, True):
        weight.grad = None
        logits = hidden @ weight
        loss_fn = lstorch.SmoothedCrossEntropyLoss(
            smoothing=0.2, convention="others", inplace_backward=inplace
        )
        (grad_logits,) = torch.autograd.grad(loss_fn(logits, labels), logits, retain_graph=True)
        logits = hidden @ weight
        loss_fn(logits, labels).backward()
        results.append((grad_logits, weight.grad.clone(), logits.detach()))
    (plain, plain_weight, untouched), (inplace, inplace_weight, overwritten) = results
    assert torch.equal(plain, inplace) and torch.equal(plain_weight, inplace_weight)
    assert not torch.equal(untouched, plain)
    assert torch.equal(overwritten, plain)  # the logits now hold their gradient


def test_inplace_backward_refuses_to_corrupt_a_node_that_saved_the_logits():
    import lstorch

    x = torch.randn(4, 5, requires_grad=True)
    logits = torch.relu(x)  # relu saves its output for its own backward
    loss = lstorch.smoothed_cross_entropy(
        logits, torch.tensor([0, 1, 2, 3]), smoothing=0.1, reduction="mean", inplace_backward=True
    )
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
