"""Forward-mode and second-order derivatives of every lstorch loss, in float64.

* Forward mode: ``torch.func.jvp``/``jacfwd``/``hessian`` (forward over reverse) and
  ``torch.autograd.forward_ad`` dual numbers.
* Second order: ``torch.autograd.grad(..., create_graph=True)`` (Hessian-vector products,
  gradient penalties) and ``torch.func`` transforms over the losses.

Expected values come from torch's own functions on the dense logits, never from the code under
test: ``F.cross_entropy(x, y, label_smoothing=eps)`` where the formula coincides (the uniform
convention, with weights and ``ignore_index``), and otherwise ``F.cross_entropy`` against the
smoothed target given as probabilities (``-sum_c w_c q_c log_softmax(x)_c``, the same formula for
every convention, weights and class masks included); ``F.binary_cross_entropy_with_logits``; and
``torch.autograd.gradcheck``/``gradgradcheck`` (finite differences, forward over reverse and
reverse over reverse).

Tolerances: every value here is float64 and O(1); ours and the reference round differently (a
closed form against a log-softmax), ~1e-15 apart, so ``rtol=1e-10, atol=1e-12`` leaves a wide
margin and still catches any wrong term.
"""

import functools

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.nn.functional as F

import lstorch
from lstorch.compat import fairseq, hf, keras, t5x, timm
from lstorch.distributed import vocab_parallel_smoothed_cross_entropy
from parity_tests import oracles
from parity_tests.paths import KernelLaunches

TOLERANCE = dict(rtol=1e-10, atol=1e-12)
DTYPE = torch.float64
ROWS, CLASSES = 5, 6
IGNORE = -100


def _assert_close(actual, expected):
    """Tensors, or tuples of them (the two outputs with ``return_z_loss=True``), equal."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_close(a, e)
        return
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def _leaves(value):
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _random(*shape, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, dtype=DTYPE, generator=generator)


def _dual_tangents(fn, x, tangent):
    """Outputs and their tangents by ``torch.autograd.forward_ad`` dual numbers."""
    with fwAD.dual_level():
        outputs = fn(fwAD.make_dual(x, tangent))
        unpacked = [fwAD.unpack_dual(out) for out in _leaves(outputs)]
        values = [u.primal.clone() for u in unpacked]
        tangents = [
            torch.zeros_like(u.primal) if u.tangent is None else u.tangent.clone() for u in unpacked
        ]
    return values, tangents


def _hvp_by_double_backward(fn, inputs, vectors):
    """``d/d inputs <d total/d inputs, vectors>`` by ``create_graph=True`` double backward,
    ``total`` the sum of every output."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    total = sum(out.sum() for out in _leaves(fn(*inputs)))
    grads = torch.autograd.grad(total, inputs, create_graph=True)
    inner = sum((g * v).sum() for g, v in zip(grads, vectors, strict=True))
    if not inner.requires_grad:  # a gradient that does not depend on the inputs (linear loss)
        return tuple(torch.zeros_like(x) for x in inputs)
    return torch.autograd.grad(inner, inputs, allow_unused=True, materialize_grads=True)


def _sum_of_outputs(fn):
    return lambda *args: sum(out.sum() for out in _leaves(fn(*args)))


# --------------------------------------------------------------------------------------------
# The reference: torch's own F.cross_entropy on the dense logits


def _counted(labels, ignore_index=None, pad_index=None, where=None):
    counted = torch.ones_like(labels, dtype=torch.bool)
    if ignore_index is not None:
        counted = counted & (labels != ignore_index)
    if pad_index is not None:
        counted = counted & (labels != pad_index)
    if where is not None:
        counted = counted & where
    return counted


def _smoothed_target(labels, counted, num_classes, smoothing, convention, pad_index, class_mask):
    """``q_c = (1 - eps) [c = y] + eps / |S| [c in S]`` (SEMANTICS.md §1), the support ``S``
    without the classes ``class_mask`` leaves out; rows that do not count get label 0."""
    classes = torch.arange(num_classes)
    is_target = classes == torch.where(counted, labels, 0).unsqueeze(-1)
    support = torch.ones_like(is_target)
    if class_mask is not None:
        support = support & class_mask
    if convention != "uniform":
        support = support & ~is_target
    if convention == "others_but_pad":
        support = support & (classes != pad_index)
    spread = support.to(DTYPE) / support.sum(-1, keepdim=True)
    return (1 - smoothing) * is_target.to(DTYPE) + smoothing * spread


def _reduce(rows, row_weight, reduction, normalizer=None):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    denominator = row_weight.sum() if normalizer is None else torch.tensor(normalizer, dtype=DTYPE)
    return rows.sum() / denominator


def reference_smoothed(logits, labels, **options):
    """``lstorch.smoothed_cross_entropy``'s outputs, from ``F.cross_entropy`` with the smoothed
    target as probabilities (and ``torch.logsumexp`` for the z-loss)."""
    smoothing = options.get("smoothing", 0.0)
    convention = options.get("convention", "uniform")
    pad_index, weight = options.get("pad_index"), options.get("weight")
    class_mask, reduction = options.get("class_mask"), options.get("reduction", "none")
    z_loss = options.get("z_loss", 0.0)
    x = logits.movedim(options.get("axis", -1), -1)
    if options.get("logit_scale", 1.0) != 1.0:  # softcap(logit_scale * x), by torch's own ops
        x = x * options["logit_scale"]
    if options.get("softcap") is not None:
        x = options["softcap"] * torch.tanh(x / options["softcap"])
    num_classes = x.shape[-1]
    counted = _counted(labels, options.get("ignore_index"), pad_index, options.get("where"))
    q = _smoothed_target(labels, counted, num_classes, smoothing, convention, pad_index, class_mask)
    w = torch.ones(num_classes, dtype=DTYPE) if weight is None else weight
    if options.get("from_log_probs"):
        rows = -(w * q * x).sum(-1)
    else:
        # A masked class takes no part: exp(-1e4 - lse) is exactly 0 in float64.
        allowed = x if class_mask is None else torch.where(class_mask, x, -1e4)
        flat = F.cross_entropy(
            allowed.reshape(-1, num_classes),
            q.reshape(-1, num_classes),
            weight=weight,
            reduction="none",
        )
        rows = flat.reshape(x.shape[:-1])
        z_rows = z_loss * torch.logsumexp(allowed, -1).square()
        if z_loss or options.get("return_z_loss"):
            rows = rows + z_rows
    if options.get("kl"):
        rows = rows + torch.xlogy(q, q).sum(-1)
    rows = torch.where(counted, rows, 0.0)
    row_weight = torch.where(counted, w[torch.where(counted, labels, 0)], 0.0)
    loss = _reduce(rows, row_weight, reduction, options.get("normalizer"))
    if options.get("return_z_loss"):
        return loss, _reduce(torch.where(counted, z_rows, 0.0), row_weight, reduction)
    return loss


# --------------------------------------------------------------------------------------------
# The core: lstorch.smoothed_cross_entropy, every option


def _core_problem(name):
    """(logits, labels, options) of one core case; every tensor option built here."""
    options = dict(CORE_CASES[name])
    labels = torch.tensor([0, 3, IGNORE, 5, 2, 1])[:ROWS]
    if options.get("ignore_index") is None:
        labels = torch.where(labels == IGNORE, 1, labels)
    if options.pop("weight", False):
        options["weight"] = torch.linspace(0.5, 2.0, CLASSES, dtype=DTYPE)
    if options.pop("class_mask", False):
        options["class_mask"] = torch.arange(CLASSES) != 4  # no label is 4
    if options.pop("where", False):
        options["where"] = torch.tensor([True, True, False, True, True])
    logits = _random(ROWS, CLASSES)
    if options.get("axis") == 0:
        logits = logits.T.contiguous()
    return logits, labels, options


CORE_CASES = {
    "uniform-none": dict(smoothing=0.1),
    "uniform-weight-ignore-none": dict(
        smoothing=0.3, weight=True, ignore_index=IGNORE, reduction="none"
    ),
    "uniform-weight-ignore-sum": dict(
        smoothing=0.3, weight=True, ignore_index=IGNORE, reduction="sum"
    ),
    "uniform-weight-ignore-mean": dict(
        smoothing=0.3, weight=True, ignore_index=IGNORE, reduction="mean"
    ),
    "others-sum": dict(smoothing=0.2, convention="others", reduction="sum"),
    "others_but_pad-kl-mean": dict(
        smoothing=0.5, convention="others_but_pad", pad_index=1, kl=True, reduction="mean"
    ),
    "others-class_mask-weight-ignore-sum": dict(
        smoothing=0.25,
        convention="others",
        class_mask=True,
        weight=True,
        ignore_index=IGNORE,
        reduction="sum",
    ),
    "others_but_pad-class_mask-none": dict(
        smoothing=0.4, convention="others_but_pad", pad_index=0, class_mask=True
    ),
    "uniform-z_loss-ignore-mean": dict(
        smoothing=0.1, z_loss=0.05, ignore_index=IGNORE, reduction="mean"
    ),
    "others-z_loss-returned-class_mask-none": dict(
        smoothing=0.1, convention="others", z_loss=0.05, return_z_loss=True, class_mask=True
    ),
    "uniform-z_loss-returned-weight-ignore-mean": dict(
        smoothing=0.2,
        z_loss=0.1,
        return_z_loss=True,
        weight=True,
        ignore_index=IGNORE,
        reduction="mean",
    ),
    "from_log_probs-others_but_pad-weight-ignore-mean": dict(
        smoothing=0.4,
        from_log_probs=True,
        convention="others_but_pad",
        pad_index=2,
        weight=True,
        ignore_index=IGNORE,
        reduction="mean",
    ),
    "from_log_probs-uniform-kl-sum": dict(
        smoothing=0.2, from_log_probs=True, kl=True, reduction="sum"
    ),
    "where-normalizer-kl-mean": dict(
        smoothing=0.2, where=True, kl=True, normalizer=7.0, reduction="mean"
    ),
    "smoothing_one-kl-others-sum": dict(
        smoothing=1.0, convention="others", kl=True, reduction="sum"
    ),
    "axis_0-others-ignore-mean": dict(
        smoothing=0.3, convention="others", axis=0, ignore_index=IGNORE, reduction="mean"
    ),
}


def _core(name):
    logits, labels, options = _core_problem(name)
    ours = functools.partial(lstorch.smoothed_cross_entropy, labels=labels, **options)
    reference = functools.partial(reference_smoothed, labels=labels, **options)
    return logits, ours, reference


@pytest.mark.parametrize("name", CORE_CASES)
def test_core_dual_numbers_match_f_cross_entropy(name):
    logits, ours, reference = _core(name)
    tangent = _random(*logits.shape, seed=1, scale=1.0)
    values, tangents = _dual_tangents(ours, logits, tangent)
    expected_values, expected_tangents = _dual_tangents(reference, logits, tangent)
    _assert_close(values, expected_values)
    _assert_close(tangents, expected_tangents)


@pytest.mark.parametrize("name", CORE_CASES)
def test_core_jacfwd_equals_jacrev_equals_f_cross_entropy(name):
    logits, ours, reference = _core(name)
    forward = torch.func.jacfwd(ours)(logits)
    _assert_close(forward, torch.func.jacrev(ours)(logits))
    _assert_close(forward, torch.func.jacrev(reference)(logits))


@pytest.mark.parametrize("name", CORE_CASES)
def test_core_hessian_matches_f_cross_entropy(name):
    logits, ours, reference = _core(name)
    _assert_close(torch.func.hessian(ours)(logits), torch.func.hessian(reference)(logits))
    vector = _random(*logits.shape, seed=2, scale=1.0)
    _assert_close(
        _hvp_by_double_backward(ours, [logits], [vector]),
        _hvp_by_double_backward(reference, [logits], [vector]),
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_core_uniform_derivatives_equal_f_cross_entropy_label_smoothing(reduction):
    """The convention F.cross_entropy implements, with weights and ignored rows: its own
    label_smoothing, on the same logits."""
    logits = _random(ROWS, CLASSES)
    labels = torch.tensor([0, 3, IGNORE, 5, 2])
    weight = torch.linspace(0.5, 2.0, CLASSES, dtype=DTYPE)
    options = dict(weight=weight, ignore_index=IGNORE, reduction=reduction)
    ours = functools.partial(
        lstorch.smoothed_cross_entropy, labels=labels, smoothing=0.3, **options
    )
    theirs = functools.partial(F.cross_entropy, target=labels, label_smoothing=0.3, **options)
    _assert_close(torch.func.hessian(ours)(logits), torch.func.hessian(theirs)(logits))
    _assert_close(torch.func.jacfwd(ours)(logits), torch.func.jacfwd(theirs)(logits))
    tangent = _random(ROWS, CLASSES, seed=1, scale=1.0)
    _assert_close(_dual_tangents(ours, logits, tangent), _dual_tangents(theirs, logits, tangent))
    _assert_close(
        torch.func.jvp(ours, (logits,), (tangent,)), torch.func.jvp(theirs, (logits,), (tangent,))
    )


@pytest.mark.parametrize("name", CORE_CASES)
def test_core_forward_ad_and_second_order_by_finite_differences(name):
    logits, ours, _ = _core(name)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        ours, (x,), check_forward_ad=True, check_batched_forward_grad=True
    )
    assert torch.autograd.gradgradcheck(ours, (x,), check_fwd_over_rev=True)


def test_core_forward_over_reverse_hvp_with_inplace_backward():
    """``inplace_backward=True`` must not overwrite logits whose tangents are still needed:
    forward over reverse (a dual input through a first-order backward) is the exact HVP."""
    logits, labels, options = _core_problem("uniform-weight-ignore-mean")
    vector = _random(ROWS, CLASSES, seed=3, scale=1.0)
    expected = _hvp_by_double_backward(
        functools.partial(reference_smoothed, labels=labels, **options), [logits], [vector]
    )
    leaf = logits.clone().requires_grad_()
    with fwAD.dual_level():
        dual = fwAD.make_dual(leaf, vector) * 1.0  # not a leaf: inplace_backward needs that
        loss = lstorch.smoothed_cross_entropy(dual, labels, inplace_backward=True, **options)
        (grad,) = torch.autograd.grad(loss, dual)
        hvp = fwAD.unpack_dual(grad).tangent
    _assert_close(hvp, expected[0])


def test_core_forward_mode_on_the_triton_kernels(monkeypatch):
    """The kernels compute the forward (float32, here in Triton's interpreter); dual numbers
    and forward over reverse still give F.cross_entropy's derivatives. float32: rtol 1e-5,
    atol 1e-6 (values O(1) summed over 6 classes; the float64 tolerance cannot apply)."""
    pytest.importorskip("triton", reason="Triton is in the dev extras; CI installs it")
    monkeypatch.setenv("LSTORCH_TRITON", "all")
    logits = _random(ROWS, CLASSES).float()
    labels = torch.tensor([0, 3, IGNORE, 5, 2])
    options = dict(label_smoothing=0.3, ignore_index=IGNORE, reduction="mean")
    vector = _random(ROWS, CLASSES, seed=3, scale=1.0).float()

    def forward_over_reverse(loss_fn):
        leaf = logits.clone().requires_grad_()
        with fwAD.dual_level():
            dual = fwAD.make_dual(leaf, vector)
            loss = loss_fn(dual)
            (grad,) = torch.autograd.grad(loss, dual)
            return fwAD.unpack_dual(loss).tangent, fwAD.unpack_dual(grad).tangent

    launches = KernelLaunches()
    with launches.counting():
        ours = forward_over_reverse(
            lambda x: lstorch.smoothed_cross_entropy(
                x, labels, smoothing=0.3, ignore_index=IGNORE, reduction="mean"
            )
        )
    assert launches.count > 0  # the kernels ran
    theirs = forward_over_reverse(lambda x: F.cross_entropy(x, labels, **options))
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_still_traces_the_losses():
    """Dynamo refuses an autograd.Function that defines ``jvp``; under ``torch.compile`` the
    losses apply the same Functions without it, so fullgraph compilation still works."""
    logits, labels, options = _core_problem("uniform-z_loss-returned-weight-ignore-mean")
    hidden, weight, bias, fused_labels, fused_options = _fused_problem("others-bias-sum")
    for loss_fn, args in (
        (lambda x: lstorch.smoothed_cross_entropy(x, labels, **options)[0], (logits,)),
        (
            lambda h, w, b: lstorch.fused_linear_smoothed_cross_entropy(
                h, w, fused_labels, bias=b, **fused_options
            ),
            (hidden, weight, bias),
        ),
        (lambda x: t5x.cross_entropy_with_logits(x, _probabilities(25), Z_LOSS)[0], (logits,)),
    ):
        inputs = [x.clone().requires_grad_() for x in args]
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(*inputs).sum(), inputs)
        _assert_close(got, torch.autograd.grad(loss_fn(*inputs).sum(), inputs))


def test_torch_compile_takes_python_float_options_that_change():
    """A smoothing schedule on a compiled module (``loss_fn.smoothing = eps`` between steps,
    fullgraph), and ``dynamic=True``: Dynamo makes such a float symbolic, so the option checks
    compare it and never round it on the host. Against torch's own ``F.cross_entropy``."""
    logits, labels = _random(ROWS, CLASSES, seed=4), torch.tensor([0, 3, 1, 5, 2])

    def reference(x, eps, z=0.0, reduction="mean"):
        loss = F.cross_entropy(x, labels, label_smoothing=eps, reduction=reduction)
        return loss + z * (torch.logsumexp(x, -1) ** 2).sum()

    module = lstorch.SmoothedCrossEntropyLoss(smoothing=0.1)
    compiled_module = torch.compile(module, fullgraph=True, backend="aot_eager")
    function = torch.compile(
        lambda x, eps, z: lstorch.smoothed_cross_entropy(
            x, labels, smoothing=eps, z_loss=z, reduction="sum"
        ),
        dynamic=True, fullgraph=True, backend="aot_eager",
    )  # fmt: skip
    for eps, z in ((0.1, 0.0), (0.2, 0.01), (0.3, 0.02)):
        module.smoothing = eps
        for ours, theirs in (
            (
                functools.partial(compiled_module, labels=labels),
                functools.partial(reference, eps=eps),
            ),
            (
                functools.partial(function, eps=eps, z=z),
                functools.partial(reference, eps=eps, z=z, reduction="sum"),
            ),
        ):
            x = logits.clone().requires_grad_()
            got = ours(x)
            want = theirs(x)
            _assert_close(got, want)
            _assert_close(torch.autograd.grad(got, x), torch.autograd.grad(want, x))


@pytest.mark.parametrize("kernels", ["off", "all"])
def test_torch_compile_takes_a_new_row_count_every_step_without_recompiling(kernels, monkeypatch):
    """A language model's batches hold a new number of tokens each step. Dynamo compiles the
    first shape, then once more with the row count symbolic (automatic dynamic shapes), and
    that graph must serve every later count: nothing in lstorch may specialize it to a count
    (``int()`` of a symbolic size did, in the mean's overflow scaling, and every new count
    recompiled until Dynamo's cache limit sent the step back to eager). Plain torch ops and
    the Triton kernels (in Triton's interpreter on the CPU); against ``F.cross_entropy``."""
    if kernels == "all":
        pytest.importorskip("triton", reason="Triton is in the dev extras; CI installs it")
    monkeypatch.setenv("LSTORCH_TRITON", kernels)
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.compiler.reset()  # Dynamo remembers which sizes changed, per code object
    counter = CompileCounterWithBackend("aot_eager")

    def step(x, labels):
        return lstorch.smoothed_cross_entropy(
            x, labels, smoothing=0.1, ignore_index=IGNORE, reduction="mean"
        )

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    launches = KernelLaunches()
    for rows in (5, 9, 13, 4, 21):
        x = _random(rows, CLASSES, seed=rows).float().requires_grad_()  # the kernels' dtype
        labels = torch.arange(rows) % CLASSES
        labels[1] = IGNORE
        want = F.cross_entropy(x, labels, label_smoothing=0.1, ignore_index=IGNORE)
        with launches.counting():
            got = compiled(x, labels)
            (grad,) = torch.autograd.grad(got, x)
        # float32 on both sides: torch's own tolerance for float32
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grad, torch.autograd.grad(want, x)[0])
    assert counter.frame_count == 2, counter.frame_count
    assert (launches.count > 0) == (kernels == "all")


@pytest.mark.parametrize("convention", ["others", "others_but_pad"])
def test_torch_compile_with_the_class_axis_second(convention):
    """torch's layout, ``(N, C, d)`` logits with ``axis=1`` (``nn.CrossEntropyLoss``'s), compiled
    with Inductor, forward and backward. torch 2.13's Inductor miscompiled the support sum's
    in-place scatter-and-restore where the buffer's class axis is not last in memory: the
    loss came out 1.07 off (at ``smoothing=0``, the plain cross-entropy, too) with no error.
    Against ``F.cross_entropy`` of the smoothed target."""
    generator = torch.Generator().manual_seed(7)
    logits = _random(3, CLASSES, 5, seed=7)
    labels = torch.randint(0, CLASSES, (3, 5), generator=generator)
    pad_index = 0 if convention == "others_but_pad" else None
    for smoothing in (0.0, 0.1):
        options = dict(smoothing=smoothing, convention=convention, axis=1, reduction="sum",
                       pad_index=pad_index)  # fmt: skip
        torch._dynamo.reset()
        compiled = torch.compile(
            lambda x, options=options: lstorch.smoothed_cross_entropy(x, labels, **options),
            fullgraph=True,
        )
        x = logits.clone().requires_grad_()
        got, want = compiled(x), reference_smoothed(x, labels, **options)
        _assert_close(got, want)
        _assert_close(torch.autograd.grad(got, x), torch.autograd.grad(want, x))


# --------------------------------------------------------------------------------------------
# The fused loss: fused_linear_smoothed_cross_entropy, against F.linear + F.cross_entropy

FEATURES, VOCAB = 3, 7
FUSED_CASES = {
    "uniform-bias-ignore-mean": dict(smoothing=0.1, ignore_index=IGNORE, reduction="mean"),
    "uniform-no_smoothing-ignore-sum": dict(smoothing=0.0, ignore_index=IGNORE, reduction="sum"),
    "others-bias-sum": dict(smoothing=0.2, convention="others", reduction="sum"),
    "others_but_pad-no_bias-none": dict(
        smoothing=0.3, convention="others_but_pad", pad_index=3, reduction="none", bias=False
    ),
}


def _fused_problem(name):
    """(hidden, weight, bias or None, labels, options); ragged chunks of 3 over 7 classes."""
    options = dict(FUSED_CASES[name])
    with_bias = options.pop("bias", True)
    hidden = _random(ROWS, FEATURES, seed=4, scale=1.0)
    weight = _random(VOCAB, FEATURES, seed=5, scale=1.5)
    bias = _random(VOCAB, seed=6, scale=1.0) if with_bias else None
    labels = torch.tensor([0, 3, IGNORE, 6, 2])
    if options.get("ignore_index") is None:
        labels = torch.where(labels == IGNORE, 1, labels)
    return hidden, weight, bias, labels, dict(options, chunk_size=3)


def _fused_dense_reference(labels, options):
    """The loss of ``F.linear(hidden, weight, bias)``: ``F.cross_entropy`` with its own
    label_smoothing (uniform), else with the smoothed target as probabilities."""
    dense = {k: v for k, v in options.items() if k != "chunk_size"}

    def loss(hidden, weight, bias=None):
        logits = F.linear(hidden, weight, bias)
        if dense.get("convention", "uniform") == "uniform":
            return F.cross_entropy(
                logits,
                labels,
                label_smoothing=dense["smoothing"],
                ignore_index=dense.get("ignore_index", IGNORE),
                reduction=dense["reduction"],
            )
        return reference_smoothed(logits, labels, **dense)

    return loss


def _fused(name):
    """Both losses as functions of ONE packed vector of (hidden, weight, bias): one Jacobian or
    Hessian then holds every cross term."""
    hidden, weight, bias, labels, options = _fused_problem(name)
    parts = [hidden, weight] + ([] if bias is None else [bias])
    sizes = [p.numel() for p in parts]

    def unpack(packed):
        pieces = torch.split(packed, sizes)
        return [piece.reshape(part.shape) for piece, part in zip(pieces, parts, strict=True)]

    def ours(packed):
        hidden, weight, *bias = unpack(packed)
        return lstorch.fused_linear_smoothed_cross_entropy(
            hidden, weight, labels, bias=bias[0] if bias else None, **options
        )

    dense = _fused_dense_reference(labels, options)

    def reference(packed):
        return dense(*unpack(packed))

    return torch.cat([p.reshape(-1) for p in parts]), ours, reference


@pytest.mark.parametrize("name", FUSED_CASES)
def test_fused_hessian_vector_product_matches_the_dense_logits(name):
    hidden, weight, bias, labels, options = _fused_problem(name)
    inputs = [hidden, weight] + ([] if bias is None else [bias])
    vectors = [_random(*x.shape, seed=10 + i, scale=1.0) for i, x in enumerate(inputs)]

    def ours(hidden, weight, *bias):
        return lstorch.fused_linear_smoothed_cross_entropy(
            hidden, weight, labels, bias=bias[0] if bias else None, **options
        )

    expected = _hvp_by_double_backward(_fused_dense_reference(labels, options), inputs, vectors)
    _assert_close(_hvp_by_double_backward(ours, inputs, vectors), expected)


def test_fused_gradient_penalty_matches_the_dense_logits():
    """``loss + |d loss / d hidden|^2``, backpropagated: the penalty's own gradient reaches
    the weight and the hidden."""
    hidden, weight, bias, labels, options = _fused_problem("uniform-bias-ignore-mean")

    def penalised(loss_fn):
        inputs = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
        loss = loss_fn(*inputs)
        (grad_hidden,) = torch.autograd.grad(loss, inputs[0], create_graph=True)
        (loss + grad_hidden.square().sum()).backward()
        return [x.grad for x in inputs]

    def ours(hidden, weight, bias):
        return lstorch.fused_linear_smoothed_cross_entropy(
            hidden, weight, labels, bias=bias, **options
        )

    _assert_close(penalised(ours), penalised(_fused_dense_reference(labels, options)))


@pytest.mark.parametrize("name", FUSED_CASES)
def test_fused_forward_mode_and_hessian_match_the_dense_logits(name):
    packed, ours, reference = _fused(name)
    forward = torch.func.jacfwd(ours)(packed)
    _assert_close(forward, torch.func.jacrev(ours)(packed))
    _assert_close(forward, torch.func.jacrev(reference)(packed))
    _assert_close(torch.func.hessian(ours)(packed), torch.func.hessian(reference)(packed))
    tangent = _random(*packed.shape, seed=7, scale=1.0)
    _assert_close(_dual_tangents(ours, packed, tangent), _dual_tangents(reference, packed, tangent))


@pytest.mark.parametrize("name", FUSED_CASES)
def test_fused_forward_ad_and_second_order_by_finite_differences(name):
    hidden, weight, bias, labels, options = _fused_problem(name)
    inputs = tuple(
        x.clone().requires_grad_() for x in [hidden, weight] + ([] if bias is None else [bias])
    )

    def ours(hidden, weight, *bias):
        return lstorch.fused_linear_smoothed_cross_entropy(
            hidden, weight, labels, bias=bias[0] if bias else None, **options
        )

    assert torch.autograd.gradcheck(
        ours, inputs, check_forward_ad=True, check_batched_forward_grad=True
    )
    assert torch.autograd.gradgradcheck(ours, inputs, check_fwd_over_rev=True)


def test_fused_torch_func_grad_and_per_sample_vmap_with_batched_labels():
    """``torch.func.grad`` of the loss, and per-sample gradients: ``vmap`` over examples of
    (hidden, labels), the weight shared, each against the dense loss of that example."""
    hidden, weight, bias, labels, options = _fused_problem("others-bias-sum")

    def ours(hidden, weight, bias, labels):
        return lstorch.fused_linear_smoothed_cross_entropy(
            hidden, weight, labels, bias=bias, **options
        )

    def dense(hidden, weight, bias, labels):
        return _fused_dense_reference(labels, options)(hidden, weight, bias)

    grads = torch.func.grad(ours, argnums=(0, 1, 2))(hidden, weight, bias, labels)
    _assert_close(grads, torch.func.grad(dense, argnums=(0, 1, 2))(hidden, weight, bias, labels))
    examples = hidden.unsqueeze(1), labels.unsqueeze(1)  # ROWS examples of one row each
    per_sample = torch.func.vmap(torch.func.grad(ours, argnums=(1, 2)), in_dims=(0, None, None, 0))(
        examples[0], weight, bias, examples[1]
    )
    for index in range(ROWS):
        expected = torch.func.grad(dense, argnums=(1, 2))(
            examples[0][index], weight, bias, examples[1][index]
        )
        _assert_close([g[index] for g in per_sample], expected)


# Every option the fused head's forward computes (masked classes, class weights, ignored rows,
# the z-loss, softcap and logit scale), for the float64 NumPy oracle.
_COMPILED_OPTIONS = dict(
    smoothing=0.2, convention="others", ignore_index=IGNORE, reduction="mean", z_loss=0.01,
    softcap=4.0, logit_scale=0.8, chunk_size=3,
)  # fmt: skip


@pytest.mark.parametrize("wrt", [("weight", "bias"), ("hidden",), ("hidden", "weight", "bias")])
def test_fused_under_torch_compile_of_torch_func_grad(wrt):
    """A functional step compiled whole, ``torch.compile(torch.func.grad(loss))``: Dynamo
    traces the transform, inlines the Function's ``forward`` and differentiates its ops,
    skipping ``backward`` (pytorch#193279, in torch 2.13). The forward ran under ``no_grad``,
    and where the hidden states were not differentiated (a head trained on fixed features, a
    ``functional_call`` over the head's parameters) the gradient came out exactly 0. Against
    the float64 NumPy oracle, with every option the forward computes."""
    hidden, weight, bias, labels, _ = _fused_problem("uniform-bias-ignore-mean")
    class_weight = torch.linspace(0.5, 1.5, VOCAB, dtype=DTYPE)
    class_mask = torch.arange(VOCAB) != 5
    given = dict(hidden=hidden, weight=weight, bias=bias)
    options = dict(_COMPILED_OPTIONS, class_weight=class_weight, class_mask=class_mask)

    def loss(*differentiated):
        inputs = dict(given, **dict(zip(wrt, differentiated, strict=True)))
        return lstorch.fused_linear_smoothed_cross_entropy(
            inputs["hidden"], inputs["weight"], labels, bias=inputs["bias"], **options
        )

    torch._dynamo.reset()
    argnums = tuple(range(len(wrt)))
    step = torch.compile(torch.func.grad_and_value(loss, argnums=argnums), backend="eager")
    grads, value = step(*(given[name].clone() for name in wrt))
    numpy_options = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    expected, vjp = oracles.fused_linear_smoothed_cross_entropy(
        hidden.numpy(), weight.numpy(), labels.numpy(), bias=bias.numpy(), wrt=wrt,
        **numpy_options,
    )  # fmt: skip
    _assert_close(value, torch.as_tensor(expected))
    _assert_close(grads, tuple(torch.as_tensor(g) for g in vjp(np.ones(()))))


# --------------------------------------------------------------------------------------------
# The vocabulary-parallel loss, on a one-rank gloo group


@pytest.fixture(scope="module")
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


DISTRIBUTED_CASES = {
    "uniform-ignore-mean": dict(smoothing=0.1, ignore_index=IGNORE, reduction="mean"),
    "others-sum": dict(smoothing=0.2, convention="others", reduction="sum"),
    "others_but_pad-none": dict(smoothing=0.3, convention="others_but_pad", pad_index=2),
    # the KL form with a z-loss: z lse**2 of the global lse, its curvature and tangents included
    "others-kl-z_loss-none": dict(smoothing=0.2, convention="others", kl=True, z_loss=0.05),
    # class 4 masked: out of the lse, the softmax and the support
    "others_but_pad-class_mask-sum": dict(
        smoothing=0.2,
        convention="others_but_pad",
        pad_index=2,
        reduction="sum",
        class_mask=torch.arange(CLASSES) != 4,
    ),
    # softcap(logit_scale * x) on each rank's logits, the chain rule through tanh; a z-loss
    # of the transformed logits' global lse
    "others-softcap-logit_scale-z_loss-sum": dict(
        smoothing=0.2,
        convention="others",
        reduction="sum",
        softcap=2.0,
        logit_scale=1.5,
        z_loss=0.05,
    ),
}


def _distributed(name, group):
    options = dict(DISTRIBUTED_CASES[name])
    logits = _random(ROWS, CLASSES, seed=8)
    labels = torch.tensor([0, 3, IGNORE, 5, 2])
    if options.get("ignore_index") is None:
        labels = torch.where(labels == IGNORE, 1, labels)
    ours = functools.partial(
        vocab_parallel_smoothed_cross_entropy, labels=labels, group=group, **options
    )
    if options.get("convention", "uniform") == "uniform":
        reference = functools.partial(
            F.cross_entropy,
            target=labels,
            label_smoothing=options["smoothing"],
            ignore_index=IGNORE,
            reduction=options["reduction"],
        )
    else:
        reference = functools.partial(reference_smoothed, labels=labels, **options)
    return logits, ours, reference


def test_vocab_parallel_refuses_torch_compile_of_a_torch_func_transform(one_rank_group):
    """``torch.compile(torch.func.grad(loss))``: Dynamo may inline the Function's forward and
    skip its backward (pytorch#193279); the vocabulary-parallel forward, written for its
    backward, then gave a gradient off by 0.15 (against ``F.cross_entropy``), on one rank as on
    two. Refused by name instead (eager ``torch.func.grad`` is right: the tests above)."""
    logits, labels = _random(ROWS, CLASSES, seed=8), torch.tensor([0, 3, 1, 5, 2])

    def loss(x):
        return vocab_parallel_smoothed_cross_entropy(
            x, labels, smoothing=0.1, reduction="mean", group=one_rank_group
        )

    torch._dynamo.reset()
    message = "vocab_parallel_smoothed_cross_entropy: torch.compile of a torch.func transform"
    with pytest.raises(NotImplementedError, match=message):
        torch.compile(torch.func.grad(loss), backend="eager")(logits)


@pytest.mark.parametrize("name", DISTRIBUTED_CASES)
def test_vocab_parallel_hessian_vector_product_matches_the_dense_logits(name, one_rank_group):
    logits, ours, reference = _distributed(name, one_rank_group)
    vector = _random(*logits.shape, seed=9, scale=1.0)
    _assert_close(
        _hvp_by_double_backward(ours, [logits], [vector]),
        _hvp_by_double_backward(reference, [logits], [vector]),
    )


@pytest.mark.parametrize("name", DISTRIBUTED_CASES)
def test_vocab_parallel_dual_numbers_match_the_dense_logits(name, one_rank_group):
    logits, ours, reference = _distributed(name, one_rank_group)
    tangent = _random(*logits.shape, seed=1, scale=1.0)
    _assert_close(_dual_tangents(ours, logits, tangent), _dual_tangents(reference, logits, tangent))
    # Forward over reverse: a dual input through the first-order backward.
    vector = _random(*logits.shape, seed=9, scale=1.0)
    leaf = logits.clone().requires_grad_()
    with fwAD.dual_level():
        dual = fwAD.make_dual(leaf, vector)
        (grad,) = torch.autograd.grad(ours(dual).sum(), dual)
        hvp = fwAD.unpack_dual(grad).tangent
    _assert_close(hvp, _hvp_by_double_backward(reference, [logits], [vector])[0])


@pytest.mark.parametrize("name", DISTRIBUTED_CASES)
def test_vocab_parallel_forward_ad_and_second_order_by_finite_differences(name, one_rank_group):
    logits, ours, _ = _distributed(name, one_rank_group)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(ours, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(ours, (x,), check_fwd_over_rev=True)


@pytest.mark.parametrize("name", DISTRIBUTED_CASES)
def test_vocab_parallel_under_torch_func_matches_the_dense_logits(name, one_rank_group):
    """``jacfwd``, ``jacrev`` and ``hessian`` (vmap over the collectives) and per-sample
    gradients with the labels batched by ``vmap``."""
    logits, ours, reference = _distributed(name, one_rank_group)
    _assert_close(torch.func.jacfwd(ours)(logits), torch.func.jacrev(reference)(logits))
    _assert_close(torch.func.jacrev(ours)(logits), torch.func.jacrev(reference)(logits))
    _assert_close(torch.func.hessian(ours)(logits), torch.func.hessian(reference)(logits))
    options = dict(DISTRIBUTED_CASES[name])
    labels = torch.tensor([0, 3, 4, 5, 2])
    if "class_mask" in options:  # every example's label allowed
        labels = torch.where(options["class_mask"][labels], labels, 0)

    def per_example(x, label):
        return vocab_parallel_smoothed_cross_entropy(
            x, label, group=one_rank_group, **options
        ).sum()

    per_sample = torch.func.vmap(torch.func.grad(per_example))(
        logits.unsqueeze(1), labels.unsqueeze(1)
    )
    # Every example is one counted row, so each reduction is that row's loss: the expected
    # per-sample gradients are the diagonal blocks of the rows' Jacobian.
    rows = dict(options, reduction="none")
    expected = torch.func.jacrev(lambda x: reference_smoothed(x, labels, **rows))(logits)
    _assert_close(per_sample.squeeze(1), torch.diagonal(expected, dim1=0, dim2=1).T)


# --------------------------------------------------------------------------------------------
# T5X's custom gradient: its forward-mode rule is the transpose of its backward rule


def _t5x_inputs(normalised):
    logits = _random(ROWS, CLASSES, seed=11)
    targets = torch.rand(ROWS, CLASSES, dtype=DTYPE, generator=torch.Generator().manual_seed(12))
    if normalised:
        targets = targets / targets.sum(-1, keepdim=True)
    return logits, targets


Z_LOSS = 0.05


def _t5x(logits, targets):
    return t5x.cross_entropy_with_logits(logits, targets, Z_LOSS)


def test_t5x_forward_mode_is_the_transpose_of_its_custom_backward():
    """Targets that do not sum to 1, where T5X's rule is not the true derivative: jacfwd still
    equals jacrev, for both arguments, and a dual number's tangent is <vjp(g), v>."""
    logits, targets = _t5x_inputs(normalised=False)
    forward = torch.func.jacfwd(_t5x, argnums=(0, 1))(logits, targets)
    _assert_close(forward, torch.func.jacrev(_t5x, argnums=(0, 1))(logits, targets))
    tangents = _random(ROWS, CLASSES, seed=13), _random(ROWS, CLASSES, seed=14)
    cotangent = _random(ROWS, seed=15)
    (_, z_part), vjp = torch.func.vjp(_t5x, logits, targets)
    pulled = vjp((cotangent, torch.zeros_like(z_part)))
    transposed = sum((p * t).sum() for p, t in zip(pulled, tangents, strict=True))
    with fwAD.dual_level():
        outputs = _t5x(
            *(fwAD.make_dual(x, t) for x, t in zip((logits, targets), tangents, strict=True))
        )
        loss_tangent, z_tangent = (fwAD.unpack_dual(out).tangent for out in outputs)
        _assert_close((cotangent * loss_tangent).sum(), transposed)
        # T5X drops the z-part's cotangent, so the z-part's tangent is 0.
        assert z_tangent is None or not z_tangent.any()


def test_t5x_derivatives_match_f_cross_entropy_for_target_distributions():
    """Targets that sum to 1: T5X's rule is the true first derivative of the loss (in both
    arguments) and its derivative with respect to the logits is the true Hessian, so these equal
    those of ``F.cross_entropy(x, t) + z lse**2``. (Differentiating the rule with respect to the
    targets leaves the simplex, where the rule's ``1`` is not ``sum_c t_c``: that block differs,
    as it does in T5X.)"""
    logits, targets = _t5x_inputs(normalised=True)

    def ours(logits, targets):
        return _t5x(logits, targets)[0]

    def reference(logits, targets):
        ce = F.cross_entropy(logits, targets, reduction="none")
        return ce + Z_LOSS * torch.logsumexp(logits, -1).square()

    both = (0, 1)
    _assert_close(
        torch.func.jacfwd(ours, argnums=both)(logits, targets),
        torch.func.jacfwd(reference, argnums=both)(logits, targets),
    )
    _assert_close(
        torch.func.hessian(ours)(logits, targets), torch.func.hessian(reference)(logits, targets)
    )
    vector = _random(ROWS, CLASSES, seed=16)
    _assert_close(
        _hvp_by_double_backward(lambda x: ours(x, targets), [logits], [vector]),
        _hvp_by_double_backward(lambda x: reference(x, targets), [logits], [vector]),
    )


def test_t5x_forward_ad_and_second_order_by_finite_differences():
    logits, targets = (x.requires_grad_() for x in _t5x_inputs(normalised=True))
    loss_only = lambda x, t: _t5x(x, t)[0]  # noqa: E731  (the z-part's gradient is dropped)
    assert torch.autograd.gradcheck(loss_only, (logits, targets), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(loss_only, (logits, targets), check_fwd_over_rev=True)


# --------------------------------------------------------------------------------------------
# Every public function: forward mode and second order


def _labels():
    return torch.tensor([0, 3, 1, 5, 2])


# Built once, outside the transforms (vmap refuses random operations inside).
_PROBABILITIES = {
    seed: torch.softmax(_random(ROWS, CLASSES, seed=seed), -1) for seed in range(20, 30)
}
_HEAD = _random(CLASSES + 1, CLASSES, seed=22)  # a (V, D) weight for the fused loss


def _probabilities(seed):
    return _PROBABILITIES[seed]


EVERY_FUNCTION = {
    "smoothed_cross_entropy": lambda x: lstorch.smoothed_cross_entropy(
        x, _labels(), smoothing=0.2, convention="others", reduction="mean"
    ),
    "SmoothedCrossEntropyLoss": lambda x: lstorch.SmoothedCrossEntropyLoss(smoothing=0.1)(
        x, _labels()
    ),
    "label_smoothing_loss": lambda x: lstorch.label_smoothing_loss(
        x, _labels(), classes=CLASSES, smoothing=0.2
    ),
    "kl_label_smoothing_loss": lambda x: lstorch.kl_label_smoothing_loss(
        torch.log_softmax(x, -1),
        _labels(),
        label_smoothing=0.2,
        tgt_vocab_size=CLASSES,
        ignore_index=1,
    ),
    "soft_target_cross_entropy": lambda x: lstorch.soft_target_cross_entropy(
        x,
        _probabilities(20),
        smoothing=0.1,
        weight=torch.linspace(0.5, 2, CLASSES, dtype=DTYPE),
        z_loss=0.05,
        reduction="mean",
    ),
    "sigmoid_binary_cross_entropy": lambda x: lstorch.sigmoid_binary_cross_entropy(
        x,
        (_probabilities(21) > 0.15).to(DTYPE),
        smoothing=0.1,
        pos_weight=torch.linspace(0.5, 2, CLASSES, dtype=DTYPE),
        reduction="sum",
    ),
    "fused_linear_smoothed_cross_entropy": lambda x: lstorch.fused_linear_smoothed_cross_entropy(
        x,
        _HEAD,
        torch.tensor([0, 3, 1, 6, 2]),
        smoothing=0.1,
        chunk_size=4,
    ),
    "FusedLinearSmoothedCrossEntropyLoss": lambda x: lstorch.FusedLinearSmoothedCrossEntropyLoss(
        smoothing=0.2, convention="others", chunk_size=4
    )(x, _HEAD, torch.tensor([0, 3, 1, 6, 2])),
    "fairseq.label_smoothed_nll_loss": lambda x: fairseq.label_smoothed_nll_loss(
        torch.log_softmax(x, -1), _labels(), 0.1, ignore_index=1
    ),
    "hf.label_smoother": lambda x: hf.label_smoother(x, _labels(), epsilon=0.1),
    "keras.categorical_crossentropy": lambda x: keras.categorical_crossentropy(
        _probabilities(23), x, from_logits=True, label_smoothing=0.1
    ),
    "keras.categorical_crossentropy (probabilities)": lambda x: keras.categorical_crossentropy(
        _probabilities(23), torch.softmax(x, -1), label_smoothing=0.1
    ),
    "keras.binary_crossentropy": lambda x: keras.binary_crossentropy(
        (_probabilities(24) > 0.15).to(DTYPE), x, from_logits=True, label_smoothing=0.1
    ),
    "t5x.cross_entropy_with_logits": lambda x: t5x.cross_entropy_with_logits(
        x, _probabilities(25), Z_LOSS
    )[0],
    "t5x.compute_weighted_cross_entropy": lambda x: t5x.compute_weighted_cross_entropy(
        x, _labels(), label_smoothing=0.1, z_loss=Z_LOSS
    )[0],
    "timm.label_smoothing_cross_entropy": lambda x: timm.label_smoothing_cross_entropy(
        x, _labels(), smoothing=0.1
    ),
    "timm.soft_target_cross_entropy": lambda x: timm.soft_target_cross_entropy(
        x, _probabilities(26)
    ),
}


@pytest.mark.parametrize("name", EVERY_FUNCTION)
def test_every_function_forward_mode_equals_reverse_mode_at_both_orders(name):
    """jacfwd equals jacrev, forward over reverse (``torch.func.hessian``) equals reverse over
    reverse (double backward), and both agree with finite differences."""
    fn = EVERY_FUNCTION[name]
    x = _random(ROWS, CLASSES, seed=27)
    _assert_close(torch.func.jacfwd(fn)(x), torch.func.jacrev(fn)(x))
    _assert_close(
        torch.func.hessian(_sum_of_outputs(fn))(x),
        torch.func.jacrev(torch.func.jacrev(_sum_of_outputs(fn)))(x),
    )
    x.requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (x,), check_fwd_over_rev=True)


def test_soft_and_binary_second_derivatives_equal_torch_functions():
    """The two losses built from differentiable torch ops, against torch's own functions."""
    x = _random(ROWS, CLASSES, seed=28)
    targets = _probabilities(29)
    _assert_close(
        torch.func.hessian(
            lambda x: lstorch.soft_target_cross_entropy(x, targets, smoothing=0.2, reduction="sum")
        )(x),
        torch.func.hessian(
            lambda x: F.cross_entropy(x, targets, label_smoothing=0.2, reduction="sum")
        )(x),
    )
    labels = (targets > 0.15).to(DTYPE)
    pos_weight = torch.linspace(0.5, 2, CLASSES, dtype=DTYPE)
    _assert_close(
        torch.func.hessian(
            lambda x: lstorch.sigmoid_binary_cross_entropy(
                x, labels, smoothing=0.1, pos_weight=pos_weight, reduction="mean"
            )
        )(x),
        torch.func.hessian(
            lambda x: F.binary_cross_entropy_with_logits(
                x, labels * 0.9 + 0.05, pos_weight=pos_weight, reduction="mean"
            )
        )(x),
    )


def test_vocab_parallel_z_part_tangent_and_z_loss_gradient(one_rank_group):
    """``return_z_loss``: the z-part's own forward-mode tangent and both parts' ``d z_loss``
    equal those of ``z * logsumexp**2`` and the reference loss."""
    logits, labels = _random(ROWS, CLASSES, seed=8), torch.tensor([0, 3, IGNORE, 5, 2])
    tangent = _random(ROWS, CLASSES, seed=1, scale=1.0)
    options = dict(smoothing=0.1, ignore_index=IGNORE, reduction="sum")
    counted = (labels != IGNORE).to(DTYPE)

    def ours(x, z):
        return vocab_parallel_smoothed_cross_entropy(
            x, labels, group=one_rank_group, z_loss=z, return_z_loss=True, **options
        )

    def reference(x, z):
        z_part = (counted * z * torch.logsumexp(x, -1).square()).sum()
        return reference_smoothed(x, labels, z_loss=z, **options), z_part

    z = torch.tensor(0.05, dtype=DTYPE)
    _assert_close(
        torch.func.jvp(ours, (logits, z), (tangent, torch.tensor(0.5, dtype=DTYPE)))[1],
        torch.func.jvp(reference, (logits, z), (tangent, torch.tensor(0.5, dtype=DTYPE)))[1],
    )
    for part in (0, 1):
        _assert_close(
            torch.func.grad(lambda x, z, part=part: ours(x, z)[part], argnums=(0, 1))(logits, z),
            torch.func.grad(lambda x, z, part=part: reference(x, z)[part], argnums=(0, 1))(
                logits, z
            ),
        )
