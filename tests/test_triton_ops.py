"""lstorch's Triton kernels as PyTorch operators (``torch.ops.lstorch.smoothed_rows*``).

* ``torch.library.opcheck`` passes for the three operators (forward; backward into a new tensor;
  backward over the logits in place) over the options that change what the kernels read:
  conventions, class weights, a class mask, the z-loss, bf16 logits.
* ``torch.compile(fullgraph=True)`` of a model that calls ``lstorch.smoothed_cross_entropy``
  keeps the kernels: they are launched from the compiled graph (counted), and the loss and
  gradient equal the eager plain-torch path's. Every twin with kernels also runs the registry
  on the ``torch: compile + triton`` path (``tests/test_paths.py``).

On a machine without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set
by conftest before Triton is imported).
"""

import pytest
import torch

import lstorch
from lstorch import smoothed

kernels = pytest.importorskip("lstorch.triton_kernels")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS, CLASSES = 6, 37
OPTION_SETS = {
    "uniform": dict(convention="uniform", pad_index=None, weight=False, mask=False, with_z=False),
    "others+weight+z": dict(
        convention="others", pad_index=None, weight=True, mask=False, with_z=True
    ),
    "others_but_pad+mask": dict(
        convention="others_but_pad", pad_index=3, weight=False, mask=True, with_z=False
    ),
    # softcap and logit scale applied in the kernels, with the per-row statistics
    "uniform+softcap+stats": dict(
        convention="uniform",
        pad_index=None,
        weight=False,
        mask=True,
        with_z=True,
        logit_scale=0.5,
        softcap=2.0,
        with_stats=True,
    ),
}


def _arguments(options, dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, CLASSES, generator=generator).to(dtype).to(DEVICE)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=generator).to(DEVICE)
    labels[labels == 3] = 4  # keep the pad out of the labels
    counted = torch.ones(ROWS, dtype=torch.bool, device=DEVICE)
    counted[1] = False
    weight = None
    if options["weight"]:
        weight = torch.rand(CLASSES, generator=generator).to(DEVICE) + 0.5
    class_mask = None
    if options["mask"]:
        class_mask = torch.ones(CLASSES, dtype=torch.bool, device=DEVICE)
        class_mask[[0, 5]] = False
        labels[(labels == 0) | (labels == 5)] = 6
    eps = torch.tensor(0.1, device=DEVICE)
    z = torch.tensor(1e-3 if options["with_z"] else 0.0, device=DEVICE)
    params = smoothed.kernel_params(
        options["convention"], CLASSES, eps, weight, class_mask, z, pad_index=options["pad_index"]
    )
    return x, labels, counted, params, weight, class_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_opcheck_passes_for_the_three_operators(name, dtype):
    options = OPTION_SETS[name]
    x, labels, counted, params, weight, class_mask = _arguments(options, dtype)
    transform = (options.get("logit_scale", 1.0), options.get("softcap"))
    tail = (options["convention"], options["pad_index"], options["with_z"], *transform)
    forward = (x, labels, counted, params, weight, class_mask, *tail,
               options.get("with_stats", False))  # fmt: skip
    torch.library.opcheck(torch.ops.lstorch.smoothed_rows.default, forward)
    _, _, peak, log_sum, *_ = torch.ops.lstorch.smoothed_rows(*forward)
    grad = torch.rand(ROWS, device=DEVICE)
    grad_z = torch.rand(ROWS, device=DEVICE) if options["with_z"] else None
    stats = (peak, log_sum, grad, grad_z)
    backward = (x, labels, counted, params, weight, class_mask, *stats, *tail)
    torch.library.opcheck(torch.ops.lstorch.smoothed_rows_backward.default, backward)
    in_place = (x.clone(), *backward[1:])
    torch.library.opcheck(torch.ops.lstorch.smoothed_rows_backward_.default, in_place)
    # the in-place operator writes what the out-of-place one returns
    expected = torch.ops.lstorch.smoothed_rows_backward(*backward)
    target = x.clone()
    torch.ops.lstorch.smoothed_rows_backward_(target, *backward[1:])
    torch.testing.assert_close(target, expected, rtol=0, atol=0)


def _loss_and_grad(loss_fn, x, labels, inplace):
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1.0 if inplace else leaf  # in place needs a non-leaf
    loss = loss_fn(logits, labels)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace_backward"])
def test_torch_compile_keeps_the_kernels(inplace, monkeypatch):
    def loss_fn(logits, labels):
        return lstorch.smoothed_cross_entropy(
            logits,
            labels,
            smoothing=0.1,
            convention="others",
            z_loss=1e-3,
            reduction="mean",
            inplace_backward=inplace,
        )

    x = torch.randn(ROWS, CLASSES, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    labels = torch.arange(ROWS, device=DEVICE) % CLASSES
    monkeypatch.setenv("LSTORCH_TRITON", "off")
    expected_loss, expected_grad = _loss_and_grad(loss_fn, x, labels, inplace)
    monkeypatch.setenv("LSTORCH_TRITON", "all")
    launched = []

    def counted(name, original):
        def launch(*args, **kwargs):
            launched.append(name)
            return original(*args, **kwargs)

        return launch

    for name in ("forward", "backward"):
        monkeypatch.setattr(kernels, name, counted(name, getattr(kernels, name)))
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss, grad = _loss_and_grad(compiled, x, labels, inplace)
    assert launched == ["forward", "backward"]
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)
