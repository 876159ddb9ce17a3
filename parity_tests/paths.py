"""Execution paths: every way a user's call can reach a twin, each proven like the plain call.

A twin (``registry.TWINS``) is proven on its plain path by ``compare``: eager JAX against eager
PyTorch. Users run other paths: lstorch's Triton kernels, ``inplace_backward``,
``torch.compile``, ``torch.autocast`` (mixed precision) eager and under ``torch.compile``,
``torch.func`` and ``torch.compile`` of a ``torch.func`` transform;
``jax.jit``, ``vmap``, arrays sharded over a mesh whose axes are ``Auto`` (XLA's partitioner
lays out the rest) or ``Explicit`` (``jax.make_mesh``'s default: the layout is part of each
array's type, and JAX checks it). A fast path is only as
good as the proof that it equals the plain one in every call users make, so each path here runs
the registry's own cases and, for each case and dtype, checks the path's outputs and gradient

* against the PLAIN path of the same framework (eager, same dtype, same upstream gradient), and
* against the twin's float64 NumPy oracle on the same rounded inputs,

with the twin's per-dtype tolerances (twice them against the plain path: two approximations of
one exact value, each within the tolerance of it). The gradient is pulled back with every
UPSTREAM gradient that users produce, because that is what a backward kernel reads (a 0-d
gradient expanded to the rows' shape, with stride 0, after a ``"mean"``/``"sum"`` reduction or
``loss.sum()``):

* ``random``: a random cotangent of each output's shape (non-scalar for per-row losses);
* ``sum``: ``loss.sum()`` (``jnp.sum``), summed over the outputs;
* ``mean``: ``loss.mean()``;
* ``scaled``: ``loss.sum() * 2**16``, as AMP's ``GradScaler`` scales it (the gradient is
  divided by the scale again before it is compared);
* ``0-d grad_outputs``: ``torch.autograd.grad(loss.sum(), x, grad_outputs=tensor(0.375))``
  (``vjp`` with a 0-d cotangent in JAX).

A twin reaches a path where its call can: a Triton row needs a call that runs lstorch's kernels
(``Twin.kernels``), a Pallas row one that reaches lsjax's core with logits (``Twin.pallas``;
``LSJAX_IMPLEMENTATION=pallas``), an ``inplace_backward`` row one that takes that keyword
(``Twin.inplace``), an explicit-mesh row one whose ``x`` is one array (not the fused twins'
packed vector, ``Twin.packed``), and only the side of a twin that is this project's code is run
on its paths (``Twin.ours``: ``F.cross_entropy`` and optax's route are specifications, not
ours to prove). A path that a twin cannot take yet says why (``Twin.unreachable``); the
report prints it.

The CPU interprets the Triton and Pallas kernels (slow) and compiles with Inductor (seconds per
graph), so a run may SAMPLE each twin's cases per path (:data:`SAMPLES`): every reduction of the
twin's grid is in every sample, and every sampled case runs every upstream gradient, so every
twin, every reduction and every upstream gradient goes through every path it reaches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import sys
import warnings
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Without a GPU the Triton path runs the kernels in Triton's interpreter, which must be
    # switched on before Triton is imported. It changes nothing else: Inductor compiles C++ on
    # the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import jax
import jax.numpy as jnp

from parity_tests.compare import (
    DEFAULT_TOLERANCES,
    DTYPES,
    _to_device,
    _to_float64,
    _to_jax,
    _to_torch,
    allclose,
    jax_precision,
    max_abs_diff,
    output_leaves,
    round_to,
    unflatten_output,
)

UPSTREAM = ("random", "sum", "mean", "scaled", "0-d grad_outputs")
GRAD_SCALE = 2.0**16  # torch.amp.GradScaler's default init_scale
ZERO_DIM_GRAD = 0.375  # exact in every dtype
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
JAX_DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Cases per twin and path (None: every case): "report" is what ``python -m parity_tests`` runs
# by default, "all" is ``--sample all``. "ci", what the test suite runs on CI's CPU, is
# :func:`ci_sample`, a few cases of the twin rows' pairwise cover; a number here limits it.
SAMPLES = {
    # torch.compile costs seconds of Inductor and C++ compilation per case and dtype.
    "ci": {
        "torch: compile": 1,
        "torch: compile + triton": 1,
        "torch: compile + autocast": 1,
        "torch: compile + func.grad": 1,
    },
    "report": {
        "default": 6,
        "torch: compile": 3,
        "torch: compile + triton": 3,
        "torch: compile + autocast": 3,
        "torch: compile + func.grad": 3,
    },
    "all": {"default": None},
}


def cotangents(kind: str, outputs: Sequence[np.ndarray], rng: np.random.Generator) -> list:
    """The dense upstream gradient, per output, that ``kind`` amounts to (for the oracle)."""
    if kind == "random":
        return [rng.uniform(0.5, 1.5, size=np.shape(out)) for out in outputs]
    scale = {"mean": None, "0-d grad_outputs": ZERO_DIM_GRAD}.get(kind, 1.0)
    return [
        np.full(np.shape(out), 1.0 / max(np.size(out), 1) if scale is None else scale)
        for out in outputs
    ]


# --------------------------------------------------------------------------------------------
# PyTorch


def _torch_total(outputs, kind):
    """The scalar a user backpropagates: the sum (or mean) of every floating output, scaled."""
    leaves = [leaf for leaf in output_leaves(outputs) if leaf.is_floating_point()]
    total = sum(leaf.mean() if kind == "mean" else leaf.sum() for leaf in leaves)
    if kind == "scaled":
        total = total * torch.tensor(GRAD_SCALE, dtype=torch.float32, device=total.device)
    return total


def _as_numpy(grad, kind) -> np.ndarray:
    grad = grad.detach().to(torch.float64).cpu().numpy()
    return grad / GRAD_SCALE if kind == "scaled" else grad


def _outputs_numpy(outputs) -> list[np.ndarray]:
    return [leaf.detach().to(torch.float64).cpu().numpy() for leaf in output_leaves(outputs)]


def _torch_autograd(outputs, x, kind, dense, retain_graph=False):
    """Gradient of ``outputs`` with respect to ``x`` by ``torch.autograd.grad``
    (``retain_graph``: keeping the graph for another upstream gradient)."""
    leaves = output_leaves(outputs)
    if kind == "random":
        pairs = [
            (leaf, torch.tensor(c, dtype=leaf.dtype, device=leaf.device))
            for leaf, c in zip(leaves, dense, strict=True)
            if leaf.requires_grad
        ]
        if not pairs:
            return torch.zeros_like(x)
        leaves, cot = zip(*pairs, strict=True)
        return torch.autograd.grad(leaves, x, cot, allow_unused=True, retain_graph=retain_graph)[0]
    total = _torch_total(outputs, kind)
    if not total.requires_grad:
        return torch.zeros_like(x)
    upstream = None
    if kind == "0-d grad_outputs":
        upstream = torch.tensor(ZERO_DIM_GRAD, dtype=total.dtype, device=total.device)
    return torch.autograd.grad(total, x, upstream, allow_unused=True, retain_graph=retain_graph)[0]


def _torch_func(call, x, kind, dense):
    """Outputs and gradient by ``torch.func`` (``grad``, or ``vjp`` for cotangents)."""
    if kind == "random":
        # torch.func.vjp takes floating outputs only: a bool one (return_stats's ``correct``)
        # travels as auxiliary output, without a cotangent.
        def floating_and_all(x):
            outputs = call(x)
            return [leaf for leaf in output_leaves(outputs) if leaf.is_floating_point()], outputs

        _, pull, outputs = torch.func.vjp(floating_and_all, x, has_aux=True)
        cot = [  # as_tensor: a NumPy array here, a tensor where Dynamo traces it
            torch.as_tensor(c, dtype=leaf.dtype, device=leaf.device)
            for c, leaf in zip(dense, output_leaves(outputs), strict=True)
            if leaf.is_floating_point()
        ]
        (grad,) = pull(cot)
        return outputs, grad

    def total(x):
        outputs = call(x)
        return _torch_total(outputs, kind), outputs

    if kind == "0-d grad_outputs":
        value, pull, outputs = torch.func.vjp(total, x, has_aux=True)
        (grad,) = pull(torch.tensor(ZERO_DIM_GRAD, dtype=value.dtype, device=value.device))
        return outputs, grad
    grad, outputs = torch.func.grad(total, has_aux=True)(x)
    return outputs, grad


@contextlib.contextmanager
def _environment(**values):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class KernelLaunches:
    """Counts the calls into ``lstorch.triton_kernels`` (forward and backward) while active."""

    def __init__(self):
        self.count = 0

    @contextlib.contextmanager
    def counting(self):
        try:
            from lstorch import triton_kernels as kernels
        except ImportError:  # no Triton: nothing can launch
            yield
            return
        originals = kernels.forward, kernels.backward

        def counted(original):
            def call(*args, **kwargs):
                self.count += 1
                return original(*args, **kwargs)

            return call

        kernels.forward, kernels.backward = (counted(f) for f in originals)
        try:
            yield
        finally:
            kernels.forward, kernels.backward = originals


def _torch_inputs(args, kwargs, dtype, device):
    others = torch.float64 if dtype == "float64" else torch.float32
    x = torch.tensor(round_to(args[0], dtype)).to(TORCH_DTYPES[dtype]).to(device)
    rest = [_move(_to_torch(value, others), device) for value in args[1:]]
    options = {key: _move(_to_torch(value, others), device) for key, value in kwargs.items()}
    return x, rest, options


def _move(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def torch_eager(fn, args, kwargs, dtype, dense_by_kind, *, device="cpu", inplace=False):
    """The plain call (``inplace=True``: with ``inplace_backward=True``): one forward, and
    ``torch.autograd.grad`` for each upstream kind, the graph kept between them (a fresh
    forward per kind with ``inplace_backward``, whose backward overwrites the logits)."""
    results = {}
    outputs = leaf = None
    kinds = list(dense_by_kind)
    for position, (kind, dense) in enumerate(dense_by_kind.items()):
        if inplace or outputs is None:
            x, rest, options = _torch_inputs(args, kwargs, dtype, device)
            leaf = x.requires_grad_(True)
            if inplace:
                # inplace_backward needs a non-leaf whose memory is class-last: a layer's output.
                axis = options.get("axis", -1)
                base = leaf.movedim(axis, -1).clone(memory_format=torch.contiguous_format)
                x = base.movedim(-1, axis)
                options["inplace_backward"] = True
            outputs = fn(x, *rest, **options)
        retain = not inplace and position < len(kinds) - 1
        grad = _torch_autograd(outputs, leaf, kind, dense, retain_graph=retain)
        results[kind] = (_outputs_numpy(outputs), _as_numpy(grad, kind))
    return [results]


def torch_triton(fn, args, kwargs, dtype, dense_by_kind, *, inplace=False, launches=None):
    """The call with lstorch's Triton kernels forced on (the GPU when there is one, else
    Triton's interpreter on the CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with _environment(LSTORCH_TRITON="all"), launches.counting():
        return torch_eager(fn, args, kwargs, dtype, dense_by_kind, device=device, inplace=inplace)


class _CountingBackend:
    """A ``torch.compile`` backend counting the graphs it was given: Inductor, or with
    ``inductor=False`` the ``"eager"`` backend (the graph Dynamo traced, run as it is)."""

    def __init__(self, inductor: bool = True):
        self.inductor = inductor
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        if not self.inductor:
            return graph.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(graph, example_inputs)


def torch_compile(fn, args, kwargs, dtype, dense_by_kind, *, device="cpu"):
    """``torch.compile(fullgraph=True)`` with Inductor, compiled afresh for each case (so no
    recompilation limit can send a case back to eager), the backward through AOTAutograd."""
    torch._dynamo.reset()
    backend = _CountingBackend()
    x, rest, options = _torch_inputs(args, kwargs, dtype, device)
    compiled = torch.compile(lambda x, *rest: fn(x, *rest, **options), backend=backend,
                             fullgraph=True)  # fmt: skip
    results = {}
    for kind, dense in dense_by_kind.items():
        # A fresh compiled forward per kind, as a training step makes it: torch 2.13's Inductor
        # may reuse a saved activation's buffer in the compiled backward, so a second backward
        # through one graph (retain_graph=True) can read an overwritten value.
        leaf = x.detach().clone().requires_grad_(True)
        outputs = compiled(leaf, *rest)
        grad = _torch_autograd(outputs, leaf, kind, dense)
        results[kind] = (_outputs_numpy(outputs), _as_numpy(grad, kind))
    if backend.graphs == 0:
        raise RuntimeError("torch.compile compiled no graph: the call ran eagerly")
    return [results]


def torch_autocast(fn, args, kwargs, dtype, dense_by_kind):
    """The plain call, forward and backward, inside ``torch.autocast("cpu", torch.bfloat16)``,
    AMP's region (on the CPU autograd runs the backward on the caller's thread, in its autocast
    state). Autocast casts the inputs of the ops on its lists, ``matmul`` to bf16; a loss
    computes as outside the region, as ``F.cross_entropy`` (on autocast's float32 list) does.
    The fused head rounds its operands as ``F.linear`` would be cast (by design, in float32):
    it takes this path in float64 and bfloat16, where that cast changes nothing."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return torch_eager(fn, args, kwargs, dtype, dense_by_kind)


def torch_compile_autocast(fn, args, kwargs, dtype, dense_by_kind):
    """:func:`torch_compile` inside ``torch.autocast("cpu", torch.bfloat16)``: AMP's region
    around a compiled training step, the usual way a language model trains. What it guards is
    autocast reaching a loss's own ops, the closed form's support-sum product above all, which
    the losses prevent by switching autocast off inside their Functions
    (``lstorch._common.autocast_off``); Dynamo must carry that switch, and the region, into the
    compiled forward and backward. Without the switch, float32 logits at 1,000 classes (16
    rows, summed) came out 7e-3 off eagerly and under this path, and within 2e-5 under
    Inductor's default CPU code (below).

    Each twin runs in the one dtype where that shows: float32 logits, whose tolerance is about
    1e-5 relative (bf16 logits were as far off, inside bf16's tolerance; float64, which
    autocast leaves alone, would prove :func:`torch_compile` again); the fused head in
    bfloat16 (in float32 it rounds its operands as autocast casts ``F.linear``'s, by design).
    The plain path is compared as in :func:`torch_autocast`."""
    # Inductor rounds where eager rounds (each bf16 result of an op on autocast's lists). By
    # default, on a CPU, it fuses a bf16 matrix product into float32 code and skips the rounding
    # that a GPU's bf16 matrix multiply makes: the bug above would pass here and fail on a GPU.
    from torch._inductor import config as inductor_config

    with inductor_config.patch(emulate_precision_casts=True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch_compile(fn, args, kwargs, dtype, dense_by_kind)


def _bound(fn, rest, options, x):
    """``fn(x, *rest, **options)``: the call with everything but ``x`` bound."""
    return fn(x, *rest, **options)


def torch_func_grad(fn, args, kwargs, dtype, dense_by_kind):
    """``torch.func.grad`` (``torch.func.vjp`` for a cotangent or a 0-d upstream gradient)."""
    results = {}
    for kind, dense in dense_by_kind.items():
        x, rest, options = _torch_inputs(args, kwargs, dtype, "cpu")
        call = functools.partial(_bound, fn, rest, options)
        outputs, grad = _torch_func(call, x, kind, dense)
        results[kind] = (_outputs_numpy(outputs), _as_numpy(grad, kind))
    return [results]


def torch_compile_func_grad(fn, args, kwargs, dtype, dense_by_kind):
    """``torch.compile`` of ``torch.func.grad`` (``vjp`` for a cotangent or a 0-d upstream
    gradient): a functional training step compiled whole. Dynamo traces the transform itself,
    and may inline an autograd.Function's ``forward`` where it should call its ``backward``
    (pytorch#193279, in torch 2.13): T5X's custom rule gave way to the true derivative here
    (the fused head's zero gradient, with the hidden states not differentiated, is outside the
    packed inputs: ``tests/test_autodiff_orders.py``). The backend is ``"eager"``: what goes
    wrong is in the graph Dynamo traces, and Inductor would add seconds of C++ compilation per
    case. One compiled step takes the five upstream
    gradients, each its own transform (a third less tracing than a step each)."""
    torch._dynamo.reset()
    backend = _CountingBackend(inductor=False)
    x, rest, options = _torch_inputs(args, kwargs, dtype, "cpu")
    call = functools.partial(_bound, fn, rest, options)

    def steps(x):
        return [_torch_func(call, x, kind, dense) for kind, dense in dense_by_kind.items()]

    results = {}
    stepped = torch.compile(steps, backend=backend)(x)
    for kind, (outputs, grad) in zip(dense_by_kind, stepped, strict=True):
        results[kind] = (_outputs_numpy(outputs), _as_numpy(grad, kind))
    if backend.graphs == 0:
        raise RuntimeError("torch.compile compiled no graph: the call ran eagerly")
    return [results]


@contextlib.contextmanager
def vmap_without_loops():
    """Raises ``RuntimeError`` where ``torch.func.vmap`` in the block ran an op once per
    example. vmap runs every op by its batching rule; an op without one (an in-place
    ``scatter_``, for one) falls back to a loop over the examples, and torch warns of "a
    performance drop". The warnings are caught whatever the filters outside say."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    slow = {str(w.message) for w in caught if "performance drop" in str(w.message)}
    if slow:
        raise RuntimeError(f"torch.func.vmap looped over the examples: {sorted(slow)}")


def torch_func_vmap(fn, args, kwargs, dtype, dense_by_kind):
    """``torch.func.vmap`` of the per-example ``torch.func`` gradient (as per-sample-gradient
    code does) over a batch of two examples, ``x`` and ``x / 2``, every positional array (the
    labels or targets) batched with it; returns one result per example. Raises where an op
    has no batching rule: vmap then runs it once per example, and torch warns of "a
    performance drop"."""
    results = [{}, {}]
    for kind, dense in dense_by_kind.items():
        x, rest, options = _torch_inputs(args, kwargs, dtype, "cpu")
        batch = torch.stack([x, x / 2])
        rests = [torch.stack([r, r]) if isinstance(r, torch.Tensor) else r for r in rest]
        dims = [0 if isinstance(r, torch.Tensor) else None for r in rest]

        def example(x, *rest, kind=kind, dense=dense, options=options):
            return _torch_func(functools.partial(_bound, fn, rest, options), x, kind, dense)

        with vmap_without_loops():
            outputs, grads = torch.func.vmap(example, in_dims=(0, *dims))(batch, *rests)
        for index in range(2):
            per_example = [leaf[index] for leaf in output_leaves(outputs)]
            results[index][kind] = (_outputs_numpy(per_example), _as_numpy(grads[index], kind))
    return results


# --------------------------------------------------------------------------------------------
# JAX


def _jax_total(outputs, kind):
    leaves = [leaf for leaf in output_leaves(outputs) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    total = sum(jnp.mean(leaf) if kind == "mean" else jnp.sum(leaf) for leaf in leaves)
    return total * GRAD_SCALE if kind == "scaled" else total


def _jax_pull(call, x, kind, dense):
    """Outputs and gradient of ``call`` at ``x`` for one upstream kind (traceable)."""
    if kind == "random":
        outputs, pull = jax.vjp(call, x)
        leaves = output_leaves(outputs)
        cot = [_to_device(c, leaf.dtype) for c, leaf in zip(dense, leaves, strict=True)]
        (grad,) = pull(unflatten_output(outputs, cot))
        return outputs, grad

    def total(x):
        outputs = call(x)
        return _jax_total(outputs, kind), outputs

    value, pull, outputs = jax.vjp(total, x, has_aux=True)
    upstream = ZERO_DIM_GRAD if kind == "0-d grad_outputs" else 1.0
    (grad,) = pull(_to_device(upstream, value.dtype))
    return outputs, grad


def _jax_numpy(outputs, grad, kind):
    values = [_to_float64(leaf) for leaf in output_leaves(outputs)]
    grad = _to_float64(grad)
    return values, grad / GRAD_SCALE if kind == "scaled" else grad


def _jax_inputs(args, kwargs, dtype):
    others = jnp.float64 if dtype == "float64" else jnp.float32
    x = _to_device(round_to(args[0], dtype), JAX_DTYPES[dtype])
    rest = [_to_jax(value, others) for value in args[1:]]
    arrays = {k: _to_jax(v, others) for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    constants = {k: v for k, v in kwargs.items() if k not in arrays}
    return x, rest, arrays, constants


def jax_eager(fn, args, kwargs, dtype, dense_by_kind):
    """The plain call: eager ``jax.vjp`` per upstream kind."""
    with jax_precision(dtype):
        x, rest, arrays, constants = _jax_inputs(args, kwargs, dtype)
        call = lambda x: fn(x, *rest, **arrays, **constants)  # noqa: E731
        return [
            {
                kind: _jax_numpy(*_jax_pull(call, x, kind, dense), kind)
                for kind, dense in dense_by_kind.items()
            }
        ]


def _jitted(fn, constants, dense_by_kind):
    """One ``jax.jit`` program computing every upstream kind: arrays are traced arguments
    (labels too, so the concrete label checks do not run, as in a user's train step), Python
    options are constants."""

    def program(x, rest, arrays):
        call = lambda x: fn(x, *rest, **arrays, **constants)  # noqa: E731
        return {kind: _jax_pull(call, x, kind, dense) for kind, dense in dense_by_kind.items()}

    return jax.jit(program)


def jax_jit(fn, args, kwargs, dtype, dense_by_kind, *, sharded=None):
    """``jax.jit`` of forward and pull-back (``sharded``: :func:`_shard`'s mesh, with ``x`` laid
    over every device)."""
    with jax_precision(dtype):
        x, rest, arrays, constants = _jax_inputs(args, kwargs, dtype)
        if sharded is not None:
            x, arrays = _shard(x, arrays, kwargs, explicit=sharded == "explicit")
        results = _jitted(fn, constants, dense_by_kind)(x, rest, arrays)
        return [{kind: _jax_numpy(*value, kind) for kind, value in results.items()}]


def jax_sharded(fn, args, kwargs, dtype, dense_by_kind):
    return jax_jit(fn, args, kwargs, dtype, dense_by_kind, sharded="auto")


def jax_sharded_explicit(fn, args, kwargs, dtype, dense_by_kind):
    return jax_jit(fn, args, kwargs, dtype, dense_by_kind, sharded="explicit")


def jax_pallas(fn, args, kwargs, dtype, dense_by_kind, launches):
    """The plain call with lsjax's Pallas kernels forced on (``LSJAX_IMPLEMENTATION=pallas``:
    compiled on a GPU, in Pallas's interpret mode on a CPU); ``launches`` counts the
    ``pallas_call``s in the traced program of the gradient (the kernels' own jit caches its
    trace, so counting calls into Python would miss cached ones)."""
    with _environment(LSJAX_IMPLEMENTATION="pallas"):
        results = jax_eager(fn, args, kwargs, dtype, dense_by_kind)
        with jax_precision(dtype):
            x, rest, arrays, constants = _jax_inputs(args, kwargs, dtype)
            call = lambda x: jax.grad(  # noqa: E731
                lambda x: _jax_total(fn(x, *rest, **arrays, **constants), "sum")
            )(x)
            launches.count += str(jax.make_jaxpr(call)(x)).count("pallas_call")
    return results


class NotApplicable(Exception):
    """This case cannot take this path (e.g. no axis of ``x`` divides over the devices)."""


def _split_axis(shape, kwargs) -> int:
    """The axis of ``x`` that the sharded path splits over the devices: its class axis where
    that divides, else its first axis that does; :class:`NotApplicable` when none does."""
    count = len(jax.devices())
    if count < 2:
        raise NotApplicable("needs 2+ devices")
    axis = kwargs.get("axis", kwargs.get("dim", -1))
    order = [axis % len(shape), *range(len(shape))] if shape else []
    split = next((dim for dim in order if shape[dim] % count == 0), None)
    if split is None:
        raise NotApplicable(f"no axis of shape {tuple(shape)} divides over {count} devices")
    return split


def _check_shardable(args, kwargs):
    _split_axis(np.shape(args[0]), kwargs)


def _shard(x, arrays, kwargs, *, explicit=False):
    """``x`` laid over every device, split along its class axis where that divides, else its
    first axis that does; the other arrays as they were. ``explicit``: on a mesh whose axis is
    ``Explicit`` (``jax.make_mesh``'s default: the layout is part of each array's type and JAX
    checks every operation against it) instead of ``Auto`` (XLA's partitioner decides), and,
    where the classes are split, each class vector (a ``(K,)`` array option: a class weight, a
    class mask) split with them, as a vocabulary-parallel model holds it."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    count = len(jax.devices())
    split = _split_axis(x.shape, kwargs)
    spec = [None] * x.ndim
    spec[split] = "devices"
    kind = AxisType.Explicit if explicit else AxisType.Auto
    mesh = jax.make_mesh((count,), ("devices",), axis_types=(kind,))
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))
    classes = kwargs.get("axis", kwargs.get("dim", -1)) % x.ndim
    if explicit and split == classes:
        by_class = NamedSharding(mesh, PartitionSpec("devices"))
        arrays = {
            key: jax.device_put(value, by_class) if value.shape == (x.shape[classes],) else value
            for key, value in arrays.items()
        }
    return x, arrays


def jax_vmap(fn, args, kwargs, dtype, dense_by_kind):
    """``jax.vmap`` of the per-example pull-back over ``x`` and ``x / 2``, the positional arrays
    (labels or targets) batched with it, inside one ``jax.jit`` that computes every upstream
    kind (as a train step that vmaps a per-example loss is jitted); one result per example."""
    with jax_precision(dtype):
        x, rest, arrays, constants = _jax_inputs(args, kwargs, dtype)
        batch = jnp.stack([x, x / 2])
        rests = [jnp.stack([r, r]) for r in rest]

        def example(x, rest, arrays):
            call = lambda x: fn(x, *rest, **arrays, **constants)  # noqa: E731
            return {kind: _jax_pull(call, x, kind, dense) for kind, dense in dense_by_kind.items()}

        batched = jax.jit(jax.vmap(example, in_axes=(0, 0, None)))(batch, rests, arrays)
        results = [{}, {}]
        for kind, (outputs, grads) in batched.items():
            for index in range(2):
                per_example = [leaf[index] for leaf in output_leaves(outputs)]
                results[index][kind] = _jax_numpy(per_example, grads[index], kind)
        return results


# --------------------------------------------------------------------------------------------
# The paths and how a twin takes them


TRITON_DTYPES = ("float32", "bfloat16")  # the kernels take float32/bf16/fp16 logits


@dataclasses.dataclass(frozen=True)
class Path:
    """One way a call reaches a twin. ``run(fn, args, kwargs, dtype, dense_by_kind)`` returns a
    list of ``{kind: (outputs, grad)}``, one per example (two under ``vmap``: ``x`` and
    ``x / 2``), as float64 NumPy. ``plain`` names the path it is compared with."""

    name: str
    framework: str
    run: Callable
    # the Twin flags this path needs: "kernels", "inplace", "pallas", "unpacked" (not packed)
    needs: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = DTYPES  # the kernels take float32/bf16/fp16 logits, not float64
    kernels: str = ""  # the kernels ("Triton", "Pallas") the path must be seen to launch
    examples: int = 1  # results per call: 2 under vmap (x and x / 2)
    devices: int = 1  # the devices the path needs (the sharded paths lay x over 2)
    # ``check(args, kwargs)`` raises NotApplicable for a case the path cannot take, before the
    # case's oracle and plain path are computed (None: every case applies).
    check: Callable | None = None
    # The dtypes of ``dtypes`` that the packed twins (the fused head) take, and those that the
    # other twins take (None: all of them).
    packed_dtypes: tuple[str, ...] | None = None
    unpacked_dtypes: tuple[str, ...] | None = None

    def dtypes_of(self, twin) -> tuple[str, ...]:
        """The dtypes ``twin`` runs in on this path."""
        taken = self.packed_dtypes if twin.packed else self.unpacked_dtypes
        if taken is not None:
            return tuple(dtype for dtype in self.dtypes if dtype in taken)
        return self.dtypes

    @property
    def plain(self) -> str:
        return f"{self.framework}: eager"


def _triton_path(name, inplace):
    def run(fn, args, kwargs, dtype, dense_by_kind, launches):
        return torch_triton(
            fn, args, kwargs, dtype, dense_by_kind, inplace=inplace, launches=launches
        )

    needs = ("kernels", "inplace") if inplace else ("kernels",)
    return Path(name, "torch", run, needs, dtypes=TRITON_DTYPES, kernels="Triton")


def _compiled_triton(fn, args, kwargs, dtype, dense_by_kind, launches):
    """``torch.compile(fullgraph=True)`` with the kernels forced on: the compiled graph calls
    them as operators (``torch.ops.lstorch.smoothed_rows*``); the launches are counted."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with _environment(LSTORCH_TRITON="all"), launches.counting():
        return torch_compile(fn, args, kwargs, dtype, dense_by_kind, device=device)


def _inplace(fn, args, kwargs, dtype, dense_by_kind):
    return torch_eager(fn, args, kwargs, dtype, dense_by_kind, inplace=True)


PATHS: tuple[Path, ...] = (
    _triton_path("torch: triton", inplace=False),
    Path("torch: inplace_backward", "torch", _inplace, ("inplace",)),
    _triton_path("torch: triton + inplace_backward", inplace=True),
    Path("torch: compile", "torch", torch_compile),
    Path(
        "torch: compile + triton",
        "torch",
        _compiled_triton,
        ("kernels",),
        TRITON_DTYPES,
        kernels="Triton",
    ),
    Path("torch: autocast", "torch", torch_autocast, packed_dtypes=("float64", "bfloat16")),
    Path(
        "torch: compile + autocast",
        "torch",
        torch_compile_autocast,
        dtypes=("float32", "bfloat16"),
        packed_dtypes=("bfloat16",),
        unpacked_dtypes=("float32",),
    ),
    Path("torch: func.grad", "torch", torch_func_grad),
    Path("torch: func.vmap", "torch", torch_func_vmap, examples=2),
    Path("torch: compile + func.grad", "torch", torch_compile_func_grad),
    Path("jax: jit", "jax", jax_jit),
    Path("jax: vmap", "jax", jax_vmap, examples=2),
    Path("jax: sharded", "jax", jax_sharded, check=_check_shardable, devices=2),
    # (the fused head's own inputs on an explicit mesh: tests/test_sharded.py)
    Path(
        "jax: sharded, explicit mesh",
        "jax",
        jax_sharded_explicit,
        ("unpacked",),
        check=_check_shardable,
        devices=2,
    ),
    Path("jax: pallas", "jax", jax_pallas, ("pallas",), ("float32", "bfloat16"), "Pallas"),
)
PLAIN = {"torch": torch_eager, "jax": jax_eager}


def reaches(twin, path: Path) -> bool | str:
    """True when ``twin`` takes ``path``; False when it cannot by design; a string (the
    reason) when it should and does not yet."""
    if path.framework not in twin.ours:
        return False
    flags = {"kernels": twin.kernels, "inplace": twin.inplace, "pallas": twin.pallas,
             "unpacked": not twin.packed}  # fmt: skip
    if not all(flags[need] for need in path.needs):
        return False
    return twin.unreachable.get(path.name, True)


# Case keys that put a case in every sample: the registry's special classes.
ALWAYS_SAMPLED = ("confident", "label_dtype", "masked_far_above", "extreme")


def sample(cases: Sequence[dict], size: int | None) -> list[int]:
    """Indices of about ``size`` cases (None: all), spread over the grid, always including one
    case of each reduction the grid has and every case of the special classes
    (:data:`ALWAYS_SAMPLED`)."""
    if size is None or len(cases) <= size:
        return list(range(len(cases)))
    # The registry's special classes are always in: confident predictions (bf16 near
    # softmax(x_y) = 1 is where fast paths have lost the true-class gradient) and narrow label
    # dtypes (a kernel reading uint8 labels as int64 would read garbage), masked logits far
    # above the allowed ones and extreme logits (near the float32 maximum, or offset by 1e5).
    chosen = [i for i, case in enumerate(cases) if set(case) & set(ALWAYS_SAMPLED)]
    for key in ("reduction", "reduce"):
        for value in dict.fromkeys(case[key] for case in cases if key in case):
            chosen.append(next(i for i, case in enumerate(cases) if case.get(key) == value))
    for step in range(size):
        if len(dict.fromkeys(chosen)) >= size:
            break
        chosen.append(int(step * len(cases) / size))
    return sorted(dict.fromkeys(chosen))


def _features(case: dict) -> set:
    """The case's (key, value) pairs and every pair of them."""
    items = sorted((key, repr(value)) for key, value in case.items())
    return set(items) | set(itertools.combinations(items, 2))


@functools.cache
def _greedy_cover(features: tuple[frozenset, ...], seed: int) -> tuple[int, ...]:
    """Indices of candidates that together hold every feature any candidate holds: each time
    the one with the most features not held yet, ties broken in an order drawn from ``seed``."""
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(features))]
    needed = set().union(*features) if features else set()
    chosen = []
    while needed:
        best = max(order, key=lambda i: len(features[i] & needed))
        chosen.append(best)
        order.remove(best)
        needed -= features[best]
    return tuple(chosen)


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def pairwise_cover(cases: Sequence[dict], seed: int | str, **axes: Sequence) -> list[tuple]:
    """A few of ``cases`` that together hold every value of every key, and every pair of
    values of two keys, that any case holds (the special classes' markers included).

    Each of ``axes`` (e.g. ``dtype=DTYPES``) is one more key that every case can take any value
    of: the cover then meets every dtype with every option value, and every pair of option
    values in some dtype. Returns ``(index, *axis values)`` tuples, sorted. Greedy, ties broken
    in an order drawn from ``seed`` (a string is hashed): the same cover in every run and
    process, and another seed gives another cover.
    """
    combos = list(itertools.product(*axes.values()))
    features = tuple(
        frozenset(_features({**case, **dict(zip(axes, combo, strict=True))}))
        for case in cases
        for combo in combos
    )
    chosen = sorted(_greedy_cover(features, _seed(seed) if isinstance(seed, str) else seed))
    return [(i // len(combos), *combos[i % len(combos)]) for i in chosen]


def twin_cover(twin) -> list[tuple[int, str]]:
    """``(case index, dtype)``: the pairwise cover of the twin's grid with the dtype as one more
    option. The ``ci`` sample of the twin rows (``tests/test_parity.py``) and of the paths:
    every option value in every dtype, every pair of option values in some dtype; about a tenth of
    the registry's case runs (the counts are in ``docs/testing.md``, which a test keeps
    current). Computed once per twin and process (tens of ms for a large grid)."""
    key = (twin.name, id(twin.cases))
    if key not in _COVERS:
        _COVERS[key] = pairwise_cover(twin.cases, twin.name, dtype=DTYPES)
    return list(_COVERS[key])


_COVERS: dict[tuple[str, int], list[tuple[int, str]]] = {}


def ci_sample(twin, path: Path) -> list[tuple[int, tuple[str, ...]]]:
    """``(case index, dtypes)`` that the ``ci`` profile runs on ``path``: a few of the cases of
    :func:`twin_cover` (so the plain path's compiled programs are the ones the twin rows
    compiled already), together holding every reduction of the grid, every special class
    (:data:`ALWAYS_SAMPLED`, each value of it) and every dtype of the path; on a path that
    ``SAMPLES["ci"]`` limits (``torch.compile``: seconds of Inductor and C++ compilation per
    case and dtype), the first (case, dtype) of them only. The eager Triton paths run each
    chosen case in both of their dtypes; under ``torch.compile`` a twin's one case runs in one
    dtype, as on the compile path without the kernels (the draw gives float32 to 7 twins and
    bfloat16 to 4; ``python -m parity_tests`` compiles 3 cases in every dtype). A path with a
    ``check`` takes only the cases it applies to (the first case that applies when none of the
    cover does)."""
    kernels = bool(path.kernels)
    cover = twin_cover(twin)
    path_dtypes = path.dtypes_of(twin)
    limit = SAMPLES["ci"].get(path.name)
    if "kernels" in path.needs and limit is None:
        candidates = [(index, path_dtypes) for index in dict.fromkeys(i for i, _ in cover)]
    elif "kernels" in path.needs:
        indices = dict.fromkeys(i for i, _ in cover)
        candidates = [(index, (dtype,)) for index in indices for dtype in path_dtypes]
    else:
        candidates = [(index, (dtype,)) for index, dtype in cover if dtype in path_dtypes]
    if path.check is not None:
        applicable = [pair for pair in candidates if _applies(twin, path, pair[0])]
        if not applicable:
            everything = range(len(twin.cases))
            applicable = [(i, path_dtypes) for i in everything if _applies(twin, path, i)][:1]
        candidates = applicable
    features = []
    for index, dtypes in candidates:
        case = twin.cases[index]
        held = {(key, repr(case[key])) for key in ("reduction", "reduce") if key in case}
        held |= {(key, repr(case[key])) for key in ALWAYS_SAMPLED if key in case}
        features.append(frozenset(held | {("dtype", dtype) for dtype in dtypes}))
    # Ties broken by the twin alone on the paths without kernels: those of the same dtypes take
    # the same cases, so they share the plain calls they are compared with (computed once,
    # :func:`_plain`). The kernel paths keep a draw of their own: a twin's soft-target cases
    # stay on XLA and torch, and the draw of the twin alone gave Pallas a dtype with none of
    # its cases on the kernels (a dtype whose cases launch no kernel fails the run).
    chosen = _greedy_cover(
        tuple(features), _seed(f"{twin.name} | {path.name}" if kernels else twin.name)
    )
    chosen = chosen[:limit]
    return [candidates[i] for i in sorted(chosen)]


def ci_upstream(path: Path, position: int, count: int) -> tuple[str, ...]:
    """The upstream gradients the ``position``-th of ``count`` cases of a ``ci`` sample runs.

    On the JAX paths each case runs the random cotangent and its share of the four scalar
    upstream gradients (``sum``, ``mean``, ``scaled``, ``0-d grad_outputs``), dealt in turn,
    so the sample still runs all five: in JAX each kind is more compiled programs, and the
    scalar ones differ only by a scalar factor there (no stride-0 tensor reaches a kernel).
    The PyTorch paths run all five on every case (what their kernels read differs)."""
    if path.framework != "jax" or count <= 1:
        return UPSTREAM
    scalar = UPSTREAM[1:]
    return (UPSTREAM[0], *scalar[position::count])


def _applies(twin, path: Path, index: int) -> bool:
    args, kwargs = twin.make_inputs(np.random.default_rng(index), dict(twin.cases[index]))
    try:
        path.check(args, kwargs)
    except NotApplicable:
        return False
    return True


@dataclasses.dataclass
class PathResult:
    """One twin, path and dtype: every sampled case x upstream gradient."""

    twin: str
    path: str
    dtype: str
    checks: int = 0
    plain_loss: float = 0.0  # max |Δ| against the plain path
    plain_grad: float = 0.0
    oracle_loss: float = 0.0  # max |Δ| against the float64 oracle
    oracle_grad: float = 0.0
    failures: list = dataclasses.field(default_factory=list)
    skipped: int = 0  # sampled cases this path does not apply to (NotApplicable)
    upstream: list = dataclasses.field(default_factory=list)  # the upstream kinds checked
    cases: list = dataclasses.field(default_factory=list)  # the registry cases run (indices)

    @property
    def passed(self) -> bool:
        return self.checks > 0 and not self.failures

    def row(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


def _check(result, case_name, kind, got, plain, expected, tolerance):
    """Compare one (outputs, grad) with the plain path's and the oracle's."""
    rtol, atol = tolerance
    (outputs, grad), (plain_out, plain_grad) = got, plain
    result.checks += 1
    if kind not in result.upstream:
        result.upstream.append(kind)
    result.plain_loss = max(result.plain_loss, max_abs_diff(outputs, plain_out))
    result.plain_grad = max(result.plain_grad, max_abs_diff([grad], [plain_grad]))
    # Against the plain path, twice the tolerance: both sides approximate the same exact value,
    # each within (rtol, atol) of it (checked against the oracle just below), so they may be up
    # to twice that apart. Measured: a confident float32 row (softmax(x_y) = 0.99996, logits
    # ~20, whose ulp is 1.9e-6) puts the Triton and the eager gradient 1.57e-6 and 1.17e-6 from
    # the oracle on opposite sides, 2.7e-6 apart, where one tolerance is 2.45e-6.
    same = allclose(outputs, plain_out, 2 * rtol, 2 * atol) and allclose(
        [grad], [plain_grad], 2 * rtol, 2 * atol
    )
    if not same:
        result.failures.append(f"{case_name} upstream={kind}: differs from the plain path")
    if expected is not None:
        exp_out, exp_grad = expected
        result.oracle_loss = max(result.oracle_loss, max_abs_diff(outputs, exp_out))
        result.oracle_grad = max(result.oracle_grad, max_abs_diff([grad], [exp_grad]))
        right = allclose(outputs, exp_out, rtol, atol) and allclose([grad], [exp_grad], rtol, atol)
        if not right:
            result.failures.append(f"{case_name} upstream={kind}: differs from the oracle")


def _scaled(args, factor):
    return (np.asarray(args[0]) * factor, *args[1:]) if factor != 1 else args


def _with_fallback(indices, total, results):
    """``(position, index)`` of the sampled cases; then, while no case could take the path
    (``NotApplicable``, e.g. no axis divides over the devices), the others in turn, each in
    every dtype (position None)."""
    yield from enumerate(indices)
    for index in range(total):
        if any(result.checks for result in results.values()):
            return
        if index not in indices:
            yield None, index


# The plain call's results, per (framework, twin, case, dtype, scale of x): every path of a twin
# compares with the same plain call on the same inputs (the case's seed fixes them and its
# upstream gradients), so a process computes each once. Eager JAX lowers every primitive of a
# new shape or option set on its first call, which makes the plain call the larger part of a
# JAX path's time.
_PLAIN_RESULTS: dict[tuple, dict] = {}


def _plain(framework, twin, index, dtype, factor, fn, scaled, kwargs, dense_by_kind):
    key = (framework, twin.name, index, dtype, factor)
    known = _PLAIN_RESULTS.setdefault(key, {})
    missing = {kind: dense for kind, dense in dense_by_kind.items() if kind not in known}
    if missing:
        known.update(PLAIN[framework](fn, scaled, kwargs, dtype, missing)[0])
    return {kind: known[kind] for kind in dense_by_kind}


def run_twin_path(twin, path: Path, *, profile: str = "report", dtypes=DTYPES) -> list[PathResult]:
    """Run ``twin`` on ``path`` (the sample of ``profile``), one :class:`PathResult` per dtype.

    The ``ci`` profile runs :func:`ci_sample`, each case in one dtype (both, on the eager
    Triton paths); the other profiles run each sampled case in every dtype of the path.
    """
    fn = twin.jax_fn if path.framework == "jax" else twin.torch_fn
    tolerances = {**DEFAULT_TOLERANCES, **(twin.path_tolerances or {})}
    dtypes = [dtype for dtype in dtypes if dtype in path.dtypes_of(twin)]
    results = {dtype: PathResult(twin.name, path.name, dtype) for dtype in dtypes}
    launches = {dtype: KernelLaunches() for dtype in dtypes}
    factors = (1.0, 0.5)[: path.examples]  # the scale of x in each example of a call
    if profile == "ci":
        chosen = ci_sample(twin, path)
        plan = (
            (index, [d for d in dtypes if d in ds], ci_upstream(path, position, len(chosen)))
            for position, (index, ds) in enumerate(chosen)
        )
    else:
        size = SAMPLES[profile].get(path.name, SAMPLES[profile]["default"])
        indices = sample(twin.cases, size)
        fallback = _with_fallback(indices, len(twin.cases), results)
        plan = ((index, dtypes, UPSTREAM) for _, index in fallback)
    for index, case_dtypes, kinds in plan:
        case = twin.cases[index]
        args, kwargs = twin.make_inputs(np.random.default_rng(index), dict(case))
        for dtype in case_dtypes:
            result = results[dtype]
            rounded = (round_to(args[0], dtype), *args[1:])
            name = f"case {index} {case}"
            expected_by_scale, plain_by_scale = {}, {}
            try:
                if path.check is not None:
                    path.check(rounded, kwargs)
                dense_by_kind = None
                for factor in factors:
                    scaled = _scaled(rounded, factor)
                    expected, vjp = twin.oracle(*scaled, **kwargs) if twin.oracle else (None, None)
                    several = isinstance(expected, tuple)
                    # The outputs' leaves (nested ones too: return_stats's RowStats)
                    leaves = output_leaves(expected) if several else [expected]
                    if dense_by_kind is None:  # the upstream gradients, shaped as the outputs
                        shapes = leaves
                        if expected is None:
                            plain = PLAIN[path.framework](fn, scaled, kwargs, dtype, {"sum": None})
                            shapes = plain[0]["sum"][0]
                        rng = np.random.default_rng(index + 1)
                        dense_by_kind = {kind: cotangents(kind, shapes, rng) for kind in UPSTREAM}
                        dense_by_kind = {kind: dense_by_kind[kind] for kind in kinds}
                    if expected is not None:
                        outputs = [np.asarray(out) for out in leaves]
                        expected_by_scale[factor] = {
                            kind: (outputs, vjp(dense if several else dense[0]))
                            for kind, dense in dense_by_kind.items()
                        }
                    plain_by_scale[factor] = _plain(
                        path.framework, twin, index, dtype, factor, fn, scaled, kwargs,
                        dense_by_kind,
                    )  # fmt: skip
                if path.kernels:
                    runs = path.run(fn, rounded, kwargs, dtype, dense_by_kind, launches[dtype])
                else:
                    runs = path.run(fn, rounded, kwargs, dtype, dense_by_kind)
            except NotApplicable:
                result.skipped += 1
                continue
            except Exception as error:  # a crash on the path is a failed case, reported
                result.checks += 1
                result.failures.append(f"{name}: {type(error).__name__}: {error}")
                continue
            tolerance = tolerances[dtype]
            result.cases.append(index)
            for factor, per_kind in zip(factors, runs, strict=True):
                for kind, got in per_kind.items():
                    _check(
                        result,
                        name if factor == 1 else f"{name} (vmap example x/2)",
                        kind,
                        got,
                        plain_by_scale[factor][kind],
                        expected_by_scale.get(factor, {}).get(kind),
                        tolerance,
                    )
    for dtype, result in results.items():
        # (A dtype that ran no case, as on a compiled path in ci, launched nothing to count.)
        if path.kernels and result.checks and launches[dtype].count == 0:
            result.failures.append(f"the {path.kernels} kernels were never launched on this path")
    return list(results.values())


def run_paths(twins, paths=PATHS, *, profile="report", dtypes=DTYPES):
    """Every twin on every path it reaches: ``(results, unreachable)``, the latter a list of
    ``(twin, path, reason)`` for the paths a twin should take and cannot yet."""
    results, unreachable = [], []
    for twin in twins:
        for path in paths:
            verdict = reaches(twin, path)
            if verdict is False:
                continue
            if isinstance(verdict, str):
                unreachable.append((twin.name, path.name, verdict))
                continue
            results.extend(run_twin_path(twin, path, profile=profile, dtypes=dtypes))
    return results, unreachable


def format_paths(results: Sequence[PathResult], unreachable=()) -> str:
    """The report's path table: twin, path, dtype, checks (cases x upstream gradients), the
    largest difference from the plain path and from the float64 oracle, pass/fail."""
    width = max([len("twin"), *(len(r.twin) for r in results)])
    path_width = max([len("path"), *(len(r.path) for r in results)])
    header = (
        f"{'twin':<{width}} {'path':<{path_width}} {'dtype':<9} {'checks':>6} "
        f"{'plain Δloss':>11} {'plain Δgrad':>11} {'oracle Δloss':>12} {'oracle Δgrad':>12}  "
        "result"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        verdict = "pass" if r.passed else f"FAIL ({len(r.failures)})"
        if r.checks == 0 and not r.failures:
            why = f"{r.skipped} cases not applicable" if r.skipped else "none sampled in this dtype"
            verdict = f"not run ({why})"
        lines.append(
            f"{r.twin:<{width}} {r.path:<{path_width}} {r.dtype:<9} {r.checks:>6} "
            f"{r.plain_loss:>11.3g} {r.plain_grad:>11.3g} {r.oracle_loss:>12.3g} "
            f"{r.oracle_grad:>12.3g}  {verdict}"
        )
    for twin, path, reason in unreachable:
        lines.append(f"{twin:<{width}} {path:<{path_width}} not reachable yet: {reason}")
    return "\n".join(lines)
