"""Checks of lstorch's Triton kernels against the float64 NumPy oracle, run as a script.

``python tests/triton_checks.py`` runs them on the GPU when CUDA is there, and otherwise in
Triton's interpreter on the CPU (it sets ``TRITON_INTERPRET=1`` before Triton is imported, which
is why this is a script that ``tests/test_triton.py`` starts in a subprocess). Every case forces
the kernels with ``LSTORCH_TRITON=all`` and checks, per dtype, the loss and the gradient pulled
back with the upstream gradient of its reduction (a random cotangent for ``"none"``; a 0-d
scaled one for ``"mean"`` and ``"sum"``, which reaches the kernel expanded, with stride 0)
against ``parity_tests.oracles.smoothed_cross_entropy`` on the same rounded inputs. The loss is
float32 in every dtype (accumulated in float32 from the bf16 values), so its tolerance is
float32's; the bf16 gradient, rounded once, has bf16's. NaN and inf in ignored rows must not
reach the loss or the gradient; and
``inplace_backward=True`` must give bitwise the gradient of the out-of-place path, written into
the logits. First of all, the process's first lstorch call is a compiled one: one graph for
three steps, calling the kernels' operators. Prints one line per failure and a summary; exits 1
on any failure.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["LSTORCH_TRITON"] = "all"

import numpy as np

import lstorch
from parity_tests import DEFAULT_TOLERANCES, oracles
from parity_tests.compare import round_to
from parity_tests.paths import KernelLaunches, pairwise_cover
from tests.helpers import profile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (shape, axis): one block; the class axis in the middle (a copy to rows x K); several blocks of
# 8192 columns with a ragged tail.
SHAPES = (((6, 37), -1), ((3, 37, 2), 1), ((3, 20000), -1))
VARIANTS = ("plain", "weight", "class_mask", "z_loss", "kl")
CONVENTIONS = ("uniform", "others", "others_but_pad")
REDUCTIONS = ("none", "mean", "sum")


def make_case(shape, axis, convention, variant, reduction, seed):
    rng = np.random.default_rng(seed)
    logits = 4.0 * rng.standard_normal(shape)
    num_classes = shape[axis]
    row_shape = tuple(size for dim, size in enumerate(shape) if dim != axis % len(shape))
    labels = rng.integers(0, num_classes, size=row_shape)
    kwargs = dict(smoothing=0.15, convention=convention, axis=axis, reduction=reduction)
    if convention == "others_but_pad":
        kwargs["pad_index"] = 1
    if variant == "weight":
        kwargs["weight"] = rng.uniform(0.2, 2.0, num_classes)
    elif variant == "class_mask":
        class_mask = rng.random(num_classes) < 0.7
        class_mask[[0, 1, 2]] = True  # the pad and enough support for every convention
        kwargs["class_mask"] = class_mask
        allowed = np.flatnonzero(class_mask)
        labels = allowed[labels % len(allowed)]
        moved = np.moveaxis(logits, axis, -1)
        moved[..., ~class_mask] = -np.inf  # a masked vocabulary: -inf must stay harmless
        logits = np.moveaxis(moved, -1, axis)
    elif variant == "z_loss":
        kwargs["z_loss"] = 1e-2
    elif variant == "kl":
        kwargs["kl"] = True
    # Ignored rows holding NaN and inf: they must give 0 and a zero gradient.
    kwargs["ignore_index"] = -100
    flat_labels = labels.reshape(-1)
    flat_labels[0] = -100
    moved = np.moveaxis(logits, axis, -1).reshape(-1, num_classes)
    moved[0, :3] = [np.nan, np.inf, -np.inf]
    logits = np.moveaxis(moved.reshape(np.moveaxis(logits, axis, -1).shape), -1, axis)
    return logits, flat_labels.reshape(row_shape), kwargs


def run(logits, labels, kwargs, dtype, cotangent, inplace=False):
    """Loss and gradient (float64 NumPy) of lstorch on DEVICE; ``inplace`` also returns the
    logits tensor after backward."""
    options = {
        key: torch.tensor(value, device=DEVICE) if isinstance(value, np.ndarray) else value
        for key, value in kwargs.items()
    }
    leaf = torch.tensor(logits, device=DEVICE).to(TORCH_DTYPES[dtype]).requires_grad_(True)
    x = leaf.clone()  # a non-leaf with its own storage, as inplace_backward needs
    loss = lstorch.smoothed_cross_entropy(
        x, torch.tensor(labels, device=DEVICE), inplace_backward=inplace, **options
    )
    (grad,) = torch.autograd.grad(loss, x, torch.tensor(cotangent, device=DEVICE))
    values = loss.detach().double().cpu().numpy(), grad.double().cpu().numpy()
    return (*values, x.detach()) if inplace else values


def check_case(shape, axis, convention, variant, reduction, dtype, seed) -> list[str]:
    logits, labels, kwargs = make_case(shape, axis, convention, variant, reduction, seed)
    rounded = round_to(logits, dtype)
    expected, vjp = oracles.smoothed_cross_entropy(
        np.nan_to_num(rounded, nan=0.0, posinf=0.0, neginf=-np.inf), labels, **kwargs
    )
    cotangent = np.random.default_rng(seed + 1).uniform(0.5, 1.5, np.shape(expected))
    expected_grad = vjp(cotangent)
    rtol, atol = DEFAULT_TOLERANCES[dtype]
    name = f"{shape} axis={axis} {convention} {variant} {reduction} {dtype}"
    failures = []
    value, grad = run(logits, labels, kwargs, dtype, cotangent)
    if not np.allclose(value, expected, *DEFAULT_TOLERANCES["float32"]):
        failures.append(f"{name}: loss off by {np.nanmax(np.abs(value - expected)):.3g}")
    if not np.allclose(grad, expected_grad, rtol=rtol, atol=atol):
        failures.append(f"{name}: gradient off by {np.nanmax(np.abs(grad - expected_grad)):.3g}")
    value_in, grad_in, overwritten = run(logits, labels, kwargs, dtype, cotangent, inplace=True)
    if not (np.array_equal(value_in, value) and np.array_equal(grad_in, grad)):
        failures.append(f"{name}: inplace_backward changed the numbers")
    if not np.array_equal(overwritten.double().cpu().numpy(), grad):
        failures.append(f"{name}: inplace_backward did not leave the gradient in the logits")
    return failures


def check_a_compiled_first_call() -> list[str]:
    """The process's first lstorch call is a compiled training step with the kernels forced on,
    as a user's first step under ``torch.compile``: Dynamo compiles one graph for three steps
    (nothing lstorch keeps from its first call may fail a guard), and the graph calls the
    kernels' operators, not torch's ops."""
    graphs = []

    def backend(graph, example_inputs):  # Dynamo's graph, run as it is
        graphs.append(graph)
        return graph.forward

    labels = torch.tensor([0, 3, 9, 2], device=DEVICE)

    @torch.compile(backend=backend, fullgraph=True)
    def step(x):
        return lstorch.smoothed_cross_entropy(x, labels, smoothing=0.1, reduction="mean")

    for _ in range(3):
        step(torch.randn(4, 10, device=DEVICE, requires_grad=True)).backward()
    called = {
        str(node.target)
        for graph in graphs
        for module in graph.modules()
        if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
        if node.op == "call_function"
    }  # fmt: skip
    failures = [] if len(graphs) == 1 else [f"compiled first: {len(graphs)} graphs in 3 steps"]
    if not {"lstorch.smoothed_rows", "lstorch.smoothed_rows_backward"} <= called:
        failures.append("compiled first: the graph does not call the kernels' operators")
    return failures


def check_the_kernels_ran() -> list[str]:
    """The cases above must go through the kernels, not the eager fallback."""
    x = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    launches = KernelLaunches()
    with launches.counting():
        lstorch.smoothed_cross_entropy(
            x, torch.tensor([0, 3, 9, 2], device=DEVICE)
        ).sum().backward()
    return [] if launches.count == 2 else ["the kernels were not used"]


def main() -> int:
    failures = check_a_compiled_first_call()  # first: no lstorch call may come before it
    failures += check_the_kernels_ran()
    cases = list(itertools.product(SHAPES, CONVENTIONS, VARIANTS, REDUCTIONS, TORCH_DTYPES))
    chosen = range(len(cases))
    if profile() == "ci":  # every pair of (shape, convention, variant, reduction, dtype) values
        names = ("shape", "convention", "variant", "reduction", "dtype")
        keys = [dict(zip(names, case, strict=True)) for case in cases]
        chosen = [index for index, *_ in pairwise_cover(keys, "triton_checks")]
    for seed in chosen:  # a case's seed is its index in the full product, in every profile
        (shape, axis), *options = cases[seed]
        failures += check_case(shape, axis, *options, seed)
    for line in failures:
        print("FAIL", line)
    mode = "GPU" if DEVICE == "cuda" else "Triton interpreter on the CPU"
    print(f"{len(chosen)} of {len(cases)} cases ({mode}): {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
