"""lstorch's Triton kernels (the CUDA fast path) against the float64 oracle.

CI has no GPU, so ``tests/triton_checks.py`` runs the kernels in Triton's interpreter on the CPU,
in a subprocess (the interpreter must be switched on before Triton is imported). On a machine
with CUDA the same script runs them on the GPU. When the kernels run and when lstorch falls
back to plain torch ops is tested here, by counting the calls into ``lstorch.triton_kernels``.
"""

import importlib.abc
import importlib.util
import sys
import warnings

import pytest
import torch

from parity_tests.paths import KernelLaunches
from tests.check_scripts import run_check_script
from tests.helpers import profile


def test_the_kernels_equal_the_oracle_in_every_option():
    pytest.importorskip("triton", reason="Triton is in the dev extras; CI installs it")
    output = run_check_script("triton_checks.py", timeout=600)
    # ci: a pairwise cover of the 270 (shape, convention, variant, reduction, dtype) cases;
    # nightly: all
    expected = "270 of 270 cases" if profile() == "nightly" else " of 270 cases"
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


class _BrokenKernels(importlib.abc.MetaPathFinder):
    """Makes ``import lstorch.triton_kernels`` fail, as a Triton that is installed but does not
    match torch does, and counts the tries."""

    tries = 0

    def find_spec(self, name, path=None, target=None):
        if name == "lstorch.triton_kernels":
            self.tries += 1
            raise ImportError("simulated: this Triton does not match torch")
        return None


def test_a_triton_that_cannot_be_imported_is_said_once_and_not_tried_again(monkeypatch):
    import lstorch
    from lstorch import smoothed

    labels = torch.tensor([0, 2, 1])
    x = torch.randn(3, 4, requires_grad=True)

    def loss_and_gradient():
        loss = lstorch.smoothed_cross_entropy(x, labels, smoothing=0.1, reduction="mean")
        return loss.detach(), torch.autograd.grad(loss, x)[0]

    monkeypatch.setenv("LSTORCH_TRITON", "off")
    want = loss_and_gradient()
    broken = _BrokenKernels()
    monkeypatch.setattr(smoothed, "_TRITON_INSTALLED", True)
    monkeypatch.setattr(smoothed, "_TRITON_IMPORT_ERROR", [])
    monkeypatch.delitem(sys.modules, "lstorch.triton_kernels", raising=False)
    monkeypatch.delattr(lstorch, "triton_kernels", raising=False)
    monkeypatch.setattr(sys, "meta_path", [broken, *sys.meta_path])
    monkeypatch.setenv("LSTORCH_TRITON", "all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [loss_and_gradient() for _ in range(3)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert broken.tries == 1, broken.tries
    assert len(messages) == 1 and "simulated: this Triton does not match torch" in messages[0]
    assert "torch's own ops" in messages[0] and "LSTORCH_TRITON=off" in messages[0]
    for loss, grad in got:  # the fallback's values are the plain path's, bit for bit
        assert torch.equal(loss, want[0]) and torch.equal(grad, want[1])


def test_inplace_backward_on_a_leaf_or_a_view_of_one_is_an_error():
    """A view of a leaf (``param.view(...)``, ``param[...]``) shares the leaf's storage: in place,
    backward would leave the parameter holding its own gradient, its ``.grad`` aliasing it."""
    import lstorch

    logits = torch.zeros(2, 3, requires_grad=True)
    flat = torch.zeros(6, requires_grad=True)
    labels = torch.tensor([0, 1])
    for given, got in ((logits, "a leaf"), (flat.view(2, 3), "a view of a leaf"),
                       (logits[:, :], "a view of a leaf")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"inplace_backward=True.*not a leaf.*got {got} "):
            lstorch.smoothed_cross_entropy(given, labels, inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward=True needs `logits` contiguous"):
        lstorch.smoothed_cross_entropy(
            logits * 1.0, torch.tensor([0, 1, 1]), axis=0, inplace_backward=True
        )
    # A view of a computed tensor is the graph's memory, not a parameter's: allowed.
    computed = flat * 1.0
    loss = lstorch.smoothed_cross_entropy(
        computed.view(2, 3), labels, reduction="mean", inplace_backward=True
    )
    loss.backward()
    assert torch.equal(flat, torch.zeros(6)) and flat.grad is not None


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


def test_stats_across_blocks_take_the_first_maximum(monkeypatch):
    """The kernels walk a row in blocks of columns (8192 on a GPU, one block for every K the
    registry's cases have); blocks of 16 over K = 50 here, three whole and a partial one, so the
    running argmax meets a maximum in the last, partial block and ties across blocks (torch's
    first maximum wins). Oracle: float64 NumPy (``tests.helpers.stats_across_blocks_case``)."""
    pytest.importorskip("triton", reason="Triton is in the dev extras; CI installs it")
    import numpy as np

    import lstorch
    from lstorch import triton_kernels
    from tests.helpers import stats_across_blocks_case

    logits, labels, expected = stats_across_blocks_case()
    monkeypatch.setattr(triton_kernels, "_config", lambda num_classes, kernel: (16, 4))
    monkeypatch.setenv("LSTORCH_TRITON", "all")
    x = torch.tensor(logits, requires_grad=True)

    def call():
        return lstorch.smoothed_cross_entropy(x, torch.tensor(labels), smoothing=0.1,
                                              return_stats=True)  # fmt: skip

    assert _launches(call) > 0
    *_, stats = call()
    assert stats.correct.tolist() == expected["correct"].tolist()
    np.testing.assert_allclose(stats.lse.numpy(), expected["lse"], rtol=1e-6)
    np.testing.assert_allclose(stats.entropy.numpy(), expected["entropy"], rtol=1e-5)
