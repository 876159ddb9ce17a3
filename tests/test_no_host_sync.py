"""``check_labels``: lstorch never makes the host wait for the device unless asked to.

A host read-back of a tensor's value (``.item()``, ``bool(tensor)``, ``float(tensor)``,
``.tolist()``) stalls a CUDA stream and makes CUDA-graph capture impossible. CI has no GPU, so a
``TorchDispatchMode`` records every aten op of forward and backward on the CPU, and the test
asserts that none of them is a read-back (``aten._local_scalar_dense``, which ``.item()``,
``float()`` and ``bool()`` of a tensor end in, ``aten.item``, ``aten.is_nonzero``, or
``aten.nonzero``, whose output size the host must read), and that ``Tensor.tolist``,
``.numpy`` and ``.cpu``, which read without an aten op, are not called: for every lstorch
entry point that takes integer labels (from ``parity_tests.registry``, so a new twin is covered
without editing this file), with ``check_labels=False``, for every option of its grid, with the
scalar options as numbers and as tensors that require grad, on plain torch ops and on the
Triton kernels (in Triton's interpreter). With ``check_labels=None`` a tensor on a device that
is not the CPU (``meta`` here, as a stand-in for CUDA) is not read either.

Then the values: ``check_labels=True`` and ``None`` on the CPU raise on a bad label;
``check_labels=False`` gives that row a NaN loss and gradient, and the other rows
``F.cross_entropy``'s values. The same for lsjax, whose ``check_labels=False`` skips the check
of concrete values.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lsjax
import lsjax.compat
import lstorch
import lstorch.compat
from lstorch.distributed import vocab_parallel_smoothed_cross_entropy
from parity_tests import registry
from parity_tests.paths import twin_cover
from tests.helpers import profile

aten = torch.ops.aten
READ_BACKS = (aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero)
UNDISPATCHED_READS = ("tolist", "numpy", "cpu")
SCALAR_OPTIONS = ("smoothing", "label_smoothing", "epsilon", "z_loss", "normalizer")


class HostReads(TorchDispatchMode):
    """Records the read-backs among the aten ops that run while active, and how many ops ran."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func.overloadpacket in READ_BACKS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch):
    """``record(phase)``: a context that records the read-backs of one phase (forward,
    backward) into ``reads[phase]``, the undispatched reads (``tolist``, ``numpy``, ``cpu``)
    included."""
    reads: dict[str, list[str]] = {}
    ops: dict[str, int] = {}
    active: list[str] = []

    def recorder(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if active:
                reads[active[-1]].append(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        return method

    for name in UNDISPATCHED_READS:
        monkeypatch.setattr(torch.Tensor, name, recorder(name))

    class Record:
        def __init__(self, phase):
            self.phase = phase
            self.mode = HostReads()

        def __enter__(self):
            reads.setdefault(self.phase, [])
            active.append(self.phase)
            self.mode.__enter__()
            return self

        def __exit__(self, *exc):
            self.mode.__exit__(*exc)
            active.pop()
            reads[self.phase] += self.mode.reads
            ops[self.phase] = ops.get(self.phase, 0) + self.mode.ops

    Record.reads, Record.ops = reads, ops
    return Record


def test_the_recorder_sees_every_kind_of_read_back(host_reads):
    """Each read the test forbids is seen: it cannot pass by seeing nothing."""
    tensor = torch.tensor([1.0, 0.0])
    with host_reads("reads"):
        bool(tensor.any())
        float(tensor[0])
        tensor.nonzero()
        tensor.tolist()
        tensor.numpy()
        tensor.cpu()
    seen = host_reads.reads["reads"]
    assert seen.count("aten._local_scalar_dense.default") == 2
    assert "aten.nonzero.default" in seen
    assert {"Tensor.tolist", "Tensor.numpy", "Tensor.cpu"} <= set(seen)


# ---------------------------------------------------------------------------------------------
# Every labelled entry point of the registry, every option of its grid


# The kernels run on a GPU where there is one; on a CPU, in Triton's interpreter (conftest).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _torch_value(value, requires_grad=False, device="cpu"):
    """A registry input (NumPy, float64) as a float32 / integer / bool tensor on ``device``;
    others as they are."""
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            tensor = torch.tensor(value, dtype=torch.float32, device=device)
            return tensor.requires_grad_(requires_grad)
        return torch.as_tensor(value, device=device)
    return value


def _takes_labels(twin) -> bool:
    """Whether the twin's PyTorch side is ours and takes integer labels (some positional input
    after the differentiated one is an integer array)."""
    if "torch" not in twin.ours:
        return False
    args, _ = twin.make_inputs(np.random.default_rng(0), dict(twin.cases[0]))
    return any(isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.integer) for a in args[1:])


LABELLED = [twin for twin in registry.TWINS if _takes_labels(twin)]


def _sampled_cases(twin) -> list[int]:
    """The twin's pairwise cover of its grid (every option value, every pair of them) in
    ``ci``, every case under ``--nightly``."""
    if profile() == "nightly":
        return list(range(len(twin.cases)))
    return list(dict.fromkeys(index for index, _ in twin_cover(twin)))


def _call_without_reads(host_reads, twin, index, *, tensor_options, device="cpu"):
    """Forward and backward of the twin's PyTorch side on case ``index`` with
    ``check_labels=False``, under the recorder; the scalar options as tensors that require
    grad when ``tensor_options``."""
    args, kwargs = twin.make_inputs(np.random.default_rng(index), dict(twin.cases[index]))
    x = _torch_value(args[0], requires_grad=True, device=device)
    rest = [_torch_value(a, device=device) for a in args[1:]]
    options = {key: _torch_value(value, device=device) for key, value in kwargs.items()}
    differentiated = [x]
    if tensor_options:
        for key in SCALAR_OPTIONS:
            if isinstance(options.get(key), float):
                options[key] = torch.tensor(options[key], device=device, requires_grad=True)
                differentiated.append(options[key])
    options["check_labels"] = False
    with host_reads(f"{twin.name} #{index} forward"):
        outputs = twin.torch_fn(x, *rest, **options)
    leaves = [o for o in torch.utils._pytree.tree_leaves(outputs) if o.is_floating_point()]
    weights = [torch.rand(o.shape, dtype=o.dtype, device=o.device) for o in leaves]  # non-uniform
    total = sum((o * w).sum() for o, w in zip(leaves, weights, strict=True) if o.requires_grad)
    with host_reads(f"{twin.name} #{index} backward"):
        torch.autograd.grad(total, differentiated, allow_unused=True)


def _assert_no_reads(host_reads):
    found = {phase: reads for phase, reads in host_reads.reads.items() if reads}
    assert not found, f"host read-backs with check_labels=False: {found}"
    backward = [n for phase, n in host_reads.ops.items() if phase.endswith("backward")]
    assert backward and all(n > 0 for n in backward), "the recorder saw no backward op"


def test_the_registry_has_labelled_twins_of_every_family():
    names = {twin.name for twin in LABELLED}
    assert {"smoothed_cross_entropy", "fused_linear_smoothed_cross_entropy [d hidden, "
            "weight, bias]", "hf.label_smoother", "fairseq.label_smoothed_nll_loss",
            "t5x.compute_weighted_cross_entropy"} <= names  # fmt: skip
    assert "t5x.cross_entropy_with_logits" not in names  # soft targets: no labels


@pytest.mark.parametrize("twin", LABELLED, ids=lambda twin: twin.name)
def test_no_host_read_back_with_check_labels_false(host_reads, twin):
    """Every sampled case with its scalar options as numbers and as tensors that require grad
    (in ``ci``, the cases take turns)."""
    for position, index in enumerate(_sampled_cases(twin)):
        variants = (False, True) if profile() == "nightly" else (position % 2 == 1,)
        for tensor_options in variants:
            _call_without_reads(host_reads, twin, index, tensor_options=tensor_options)
    _assert_no_reads(host_reads)


@pytest.mark.parametrize("twin", [t for t in LABELLED if t.kernels], ids=lambda t: t.name)
def test_no_host_read_back_on_the_triton_kernels(host_reads, twin, monkeypatch):
    """The same with lstorch's Triton kernels forced on (Triton's interpreter on the CPU): two
    cases of each twin in ``ci``, every sampled one under ``--nightly``."""
    pytest.importorskip("triton", reason="Triton is in the dev extras; CI installs it")
    from parity_tests.paths import KernelLaunches

    monkeypatch.setenv("LSTORCH_TRITON", "all")
    launches = KernelLaunches()
    cases = _sampled_cases(twin)
    with launches.counting():
        for position, index in enumerate(cases if profile() == "nightly" else cases[:2]):
            _call_without_reads(
                host_reads, twin, index, tensor_options=position % 2 == 0, device=KERNEL_DEVICE
            )
    assert launches.count > 0
    _assert_no_reads(host_reads)


# Options the registry's grids do not hold: a normalizer (a number and a tensor), a class
# weight with a class mask, every reduction, the z-loss as a tensor that requires grad.
EXTRA_OPTIONS = [
    dict(reduction="mean", normalizer=5.0),
    dict(reduction="mean", normalizer="tensor"),
    dict(reduction="sum", weight="weight", class_mask="mask", where="where"),
    dict(reduction="none", z_loss="tensor", return_z_loss=True, class_mask="mask"),
    dict(reduction="mean", convention="others_but_pad", pad_index=1, kl=True, smoothing="tensor"),
    dict(reduction="sum", from_log_probs=True, convention="others", ignore_index=-100),
]


def _extra(options, device="cpu"):
    values = dict(
        tensor=lambda: torch.tensor(0.25, device=device, requires_grad=True),
        weight=lambda: torch.rand(6, device=device) + 0.5,
        mask=lambda: torch.tensor([True, True, False, True, True, True], device=device),
        where=lambda: torch.tensor([True, False, True, True, True], device=device),
    )
    return {k: values[v]() if isinstance(v, str) and v in values else v for k, v in options.items()}


@pytest.mark.parametrize("triton", [False, True], ids=["torch ops", "triton"])
@pytest.mark.parametrize("options", EXTRA_OPTIONS, ids=lambda o: ",".join(o))
def test_no_host_read_back_for_the_options_no_grid_holds(host_reads, monkeypatch, options,
                                                         triton):  # fmt: skip
    device = "cpu"
    if triton:
        pytest.importorskip("triton", reason="Triton is in the dev extras; CI installs it")
        monkeypatch.setenv("LSTORCH_TRITON", "all")
        device = KERNEL_DEVICE
    x = torch.randn(5, 6, device=device, requires_grad=True)
    labels = torch.tensor([0, 3, 5, -100, 1], device=device)
    options = {"ignore_index": -100, **_extra(options, device)}
    if options.get("from_log_probs"):
        x = torch.log_softmax(torch.randn(5, 6, device=device), -1).requires_grad_(True)
    module_options = {k: v for k, v in options.items() if k != "where"}
    differentiated = [x] + [v for v in options.values() if isinstance(v, torch.Tensor)
                            and v.requires_grad]  # fmt: skip
    calls = {
        "function": lambda: lstorch.smoothed_cross_entropy(
            x, labels, check_labels=False, **options
        ),
        "module": lambda: lstorch.SmoothedCrossEntropyLoss(check_labels=False, **module_options)(
            x, labels, options.get("where")
        ),
    }
    for name, call in calls.items():
        with host_reads(f"{name} forward"):
            outputs = call()
        leaves = outputs if isinstance(outputs, tuple) else (outputs,)
        total = sum(o.sum() for o in leaves)
        with host_reads(f"{name} backward"):
            torch.autograd.grad(total, differentiated, allow_unused=True)
    _assert_no_reads(host_reads)


@pytest.fixture
def one_rank_group():
    """A one-process gloo group (the vocabulary-parallel loss's all-reduces), torn down after."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("smoothing", [0.1, "tensor"])
def test_no_host_read_back_in_the_vocab_parallel_loss(host_reads, one_rank_group, smoothing):
    x = torch.randn(5, 6, requires_grad=True)
    eps = torch.tensor(0.1, requires_grad=True) if smoothing == "tensor" else smoothing
    labels = torch.tensor([0, 3, 5, -100, 1])
    differentiated = [x] + ([eps] if smoothing == "tensor" else [])
    for reduction in ("none", "sum", "mean"):
        with host_reads(f"{reduction} forward"):
            loss = vocab_parallel_smoothed_cross_entropy(
                x, labels, smoothing=eps, ignore_index=-100, reduction=reduction,
                check_labels=False,
            )  # fmt: skip
        with host_reads(f"{reduction} backward"):
            torch.autograd.grad(loss.sum(), differentiated)
    _assert_no_reads(host_reads)


def test_the_default_reads_nothing_on_a_device_that_is_not_the_cpu(host_reads):
    """``check_labels=None`` on a ``meta`` tensor (no values at all: any read would raise)
    reads nothing, as on CUDA; every tensor option too."""
    device = "meta"
    x = torch.randn(5, 6, device=device, requires_grad=True)
    labels = torch.tensor([0, 3, 5, -100, 1], device=device)
    options = dict(
        smoothing=torch.tensor(0.1, device=device, requires_grad=True),
        z_loss=torch.tensor(0.01, device=device),
        normalizer=torch.tensor(4.0, device=device),
        class_mask=torch.ones(6, dtype=torch.bool, device=device),
        weight=torch.ones(6, device=device),
        ignore_index=-100,
        reduction="mean",
    )
    with host_reads("forward"):
        loss = lstorch.smoothed_cross_entropy(x, labels, **options)
    with host_reads("backward"):
        torch.autograd.grad(loss, [x, options["smoothing"]])
    _assert_no_reads(host_reads)


# ---------------------------------------------------------------------------------------------
# The values: raise, or NaN for the bad row only


def _bad_batch():
    """Logits (4, 5), labels with one counted label out of range (row 2), one ignored row."""
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 5, generator=generator, dtype=torch.float64)
    labels = torch.tensor([1, 4, 7, -100])
    return logits, labels


@pytest.mark.parametrize("check_labels", [None, True])
def test_a_bad_label_raises_on_the_cpu_by_default_and_when_asked(check_labels):
    logits, labels = _bad_batch()
    calls = [
        lambda: lstorch.smoothed_cross_entropy(
            logits, labels, ignore_index=-100, check_labels=check_labels
        ),
        lambda: lstorch.SmoothedCrossEntropyLoss(check_labels=check_labels)(logits, labels),
        lambda: lstorch.fused_linear_smoothed_cross_entropy(
            logits,
            torch.eye(5, dtype=torch.float64),
            labels,
            ignore_index=-100,
            check_labels=check_labels,
        ),
        lambda: lstorch.label_smoothing_loss(
            logits, labels.clamp(min=0), classes=5, check_labels=check_labels
        ),
        lambda: lstorch.compat.hf.label_smoother(logits, labels, check_labels=check_labels),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"`(labels|target)` must lie in \[0, 4\].*got .*7"):
            call()


def test_a_bad_class_mask_label_raises_when_read_and_is_nan_when_not():
    logits, _ = _bad_batch()
    labels = torch.tensor([1, 2, 0, 3])
    class_mask = torch.tensor([True, True, False, True, True])
    with pytest.raises(ValueError, match=r"masked classes \[2\]"):
        lstorch.smoothed_cross_entropy(logits, labels, class_mask=class_mask, check_labels=True)
    loss = lstorch.smoothed_cross_entropy(logits, labels, class_mask=class_mask, check_labels=False)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_check_labels_false_gives_the_bad_row_nan_and_the_others_torchs_values(reduction):
    """The bad row's loss and gradient are NaN (so is any reduction over it), never a
    plausible number; every other row is ``F.cross_entropy``'s, loss and gradient."""
    logits, labels = _bad_batch()
    x = logits.clone().requires_grad_(True)
    loss = lstorch.smoothed_cross_entropy(
        x, labels, smoothing=0.1, ignore_index=-100, reduction="none", check_labels=False
    )
    (grad,) = torch.autograd.grad(loss.sum(), x)
    good = torch.tensor([0, 1])
    reference = logits[good].clone().requires_grad_(True)
    expected = F.cross_entropy(reference, labels[good], label_smoothing=0.1, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), reference)
    torch.testing.assert_close(loss[good], expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad[good], expected_grad, rtol=1e-12, atol=1e-12)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    assert loss[3] == 0 and (grad[3] == 0).all()  # the ignored row
    reduced = lstorch.smoothed_cross_entropy(
        x, labels, smoothing=0.1, ignore_index=-100, reduction=reduction, check_labels=False
    )
    assert torch.isnan(reduced).any()


def test_check_labels_false_gives_nan_in_every_labelled_entry_point():
    logits, labels = _bad_batch()
    log_probs = torch.log_softmax(logits, -1)
    calls = {
        "fused": lambda: lstorch.fused_linear_smoothed_cross_entropy(
            logits,
            torch.eye(5, dtype=torch.float64),
            labels,
            ignore_index=-100,
            reduction="none",
            check_labels=False,
        ),
        "forum": lambda: lstorch.LabelSmoothingLoss(5, 0.1, check_labels=False)(logits, labels),
        "opennmt": lambda: lstorch.KLLabelSmoothingLoss(0.1, 5, check_labels=False)(
            log_probs, labels
        ),
        "fairseq": lambda: lstorch.compat.fairseq.label_smoothed_nll_loss(
            log_probs, labels, 0.1, ignore_index=-100, check_labels=False
        )[0],
        "hf": lambda: lstorch.compat.hf.label_smoother(logits, labels, check_labels=False),
        "t5x": lambda: lstorch.compat.t5x.compute_weighted_cross_entropy(
            logits, labels.clamp(min=0), label_smoothing=0.1, check_labels=False
        )[0],
        "timm": lambda: lstorch.compat.timm.label_smoothing_cross_entropy(
            logits, labels.clamp(min=0), check_labels=False
        ),
    }
    for name, call in calls.items():
        assert torch.isnan(call()).any(), name


def test_a_bad_check_labels_value_is_named():
    logits, labels = _bad_batch()
    message = (
        r"smoothed_cross_entropy: `check_labels` must be one of \[None, True, False\]; "
        r"got 'yes'"
    )
    with pytest.raises(ValueError, match=message):
        lstorch.smoothed_cross_entropy(logits, labels.clamp(min=0), check_labels="yes")
    with pytest.raises(ValueError, match=message):
        lsjax.smoothed_cross_entropy(
            jnp.asarray(logits.numpy()), jnp.asarray(labels.clamp(min=0).numpy()),
            check_labels="yes",
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"SmoothedCrossEntropyLoss: `check_labels`.*got 1"):
        lstorch.SmoothedCrossEntropyLoss(check_labels=1)
    with pytest.raises(ValueError, match=r"label_smoothing_cross_entropy: `check_labels`"):
        lstorch.compat.timm.label_smoothing_cross_entropy(logits, labels, check_labels="no")


# ---------------------------------------------------------------------------------------------
# lsjax


@pytest.mark.parametrize("check_labels", [None, True])
def test_lsjax_raises_on_a_concrete_bad_label_unless_told_not_to(check_labels):
    logits, labels = (jnp.asarray(t.numpy()) for t in _bad_batch())
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 4\].*got .*7"):
        lsjax.smoothed_cross_entropy(logits, labels, ignore_index=-100, check_labels=check_labels)
    with pytest.raises(ValueError, match=r"label_smoother: `labels` must lie in \[0, 4\]"):
        lsjax.compat.hf.label_smoother(logits, labels, check_labels=check_labels)


def test_lsjax_check_labels_false_gives_the_bad_row_nan_and_the_others_torchs_values():
    logits_t, labels_t = _bad_batch()
    logits, labels = jnp.asarray(logits_t.numpy()), jnp.asarray(labels_t.numpy())

    def loss(x):
        return lsjax.smoothed_cross_entropy(
            x, labels, smoothing=0.1, ignore_index=-100, check_labels=False
        )

    rows = loss(logits)
    grad = jax.grad(lambda x: loss(x).sum())(logits)
    good = torch.tensor([0, 1])
    reference = logits_t[good].clone().requires_grad_(True)
    expected = F.cross_entropy(reference, labels_t[good], label_smoothing=0.1, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), reference)
    if jax.config.jax_enable_x64:
        tolerance = dict(rtol=1e-12, atol=1e-12)
    else:
        tolerance = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rows)[:2], expected.detach().numpy(), **tolerance)
    np.testing.assert_allclose(np.asarray(grad)[:2], expected_grad.numpy(), **tolerance)
    assert np.isnan(rows[2]) and np.isnan(grad[2]).all()
    assert rows[3] == 0 and (grad[3] == 0).all()
    calls = {
        "fused": lambda: lsjax.fused_linear_smoothed_cross_entropy(
            logits,
            jnp.eye(5, dtype=logits.dtype),
            labels,
            ignore_index=-100,
            reduction="none",
            check_labels=False,
        ),
        "forum": lambda: lsjax.label_smoothing_loss(
            logits, labels, classes=5, smoothing=0.1, check_labels=False
        ),
        "hf": lambda: lsjax.compat.hf.label_smoother(logits, labels, check_labels=False),
        "timm": lambda: lsjax.compat.timm.label_smoothing_cross_entropy(
            logits, jnp.maximum(labels, 0), check_labels=False
        ),
    }
    for name, call in calls.items():
        assert np.isnan(call()).any(), name


def test_lsjax_check_labels_false_reads_no_concrete_option():
    """A concrete smoothing array out of range raises when read, and is NaN with False."""
    logits, labels = (jnp.asarray(t.numpy()) for t in _bad_batch())
    labels = jnp.maximum(labels, 0)
    with pytest.raises(ValueError, match=r"`smoothing` must be in \[0, 1\]"):
        lsjax.smoothed_cross_entropy(logits, labels, smoothing=jnp.asarray(1.5))
    rows = lsjax.smoothed_cross_entropy(
        logits, labels, smoothing=jnp.asarray(1.5), check_labels=False
    )
    assert np.isnan(rows).all()


def test_under_jit_check_labels_changes_nothing():
    logits, labels = (jnp.asarray(t.numpy()) for t in _bad_batch())
    results = [
        jax.jit(lambda x, y, c=check: lsjax.smoothed_cross_entropy(x, y, check_labels=c))(
            logits, labels
        )
        for check in (None, True, False)
    ]
    for result in results:
        np.testing.assert_array_equal(np.asarray(result), np.asarray(results[0]))
    assert np.isnan(results[0][2]) and np.isfinite(np.asarray(results[0])[:2]).all()


# ---------------------------------------------------------------------------------------------
# The keyword is on every labelled function of both frameworks, with the same default


TWIN_FUNCTIONS = [
    "smoothed_cross_entropy",
    "fused_linear_smoothed_cross_entropy",
    "label_smoothing_loss",
    "kl_label_smoothing_loss",
    "compat.fairseq.label_smoothed_nll_loss",
    "compat.hf.label_smoother",
    "compat.t5x.compute_weighted_cross_entropy",
    "compat.timm.label_smoothing_cross_entropy",
]


def _resolve(package, dotted):
    for name in dotted.split("."):
        package = getattr(package, name)
    return package


@pytest.mark.parametrize("name", TWIN_FUNCTIONS)
def test_both_twins_take_check_labels_as_a_keyword(name):
    for package in (lsjax, lstorch):
        parameter = inspect.signature(_resolve(package, name)).parameters["check_labels"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, (package.__name__, name)
        assert parameter.default is None, (package.__name__, name)
    vocab_parallel = inspect.signature(vocab_parallel_smoothed_cross_entropy).parameters
    assert vocab_parallel["check_labels"].default is None


def test_the_hugging_face_loss_takes_check_labels(host_reads):
    pytest.importorskip("transformers")
    from lstorch.integrations.huggingface import compute_loss_func

    with pytest.raises(ValueError, match=r"compute_loss_func: `check_labels`.*got 'yes'"):
        compute_loss_func(smoothing=0.1, check_labels="yes")
    logits = torch.randn(2, 4, 6, requires_grad=True)
    labels = torch.tensor([[1, 2, -100, 3], [4, 9, 0, 1]])  # 9: out of range, counted
    with pytest.raises(ValueError, match=r"compute_loss_func: `labels` must lie in \[0, 5\]"):
        compute_loss_func(smoothing=0.1)(logits, labels)
    loss_fn = compute_loss_func(smoothing=0.1, z_loss=1e-4, check_labels=False)
    with host_reads("forward"):
        loss = loss_fn(logits, labels, num_items_in_batch=torch.tensor(5))
    with host_reads("backward"):
        (grad,) = torch.autograd.grad(loss, logits)
    _assert_no_reads(host_reads)
    assert torch.isnan(loss) and torch.isnan(grad[1, 0]).all()  # position 0 predicts the 9


# ---------------------------------------------------------------------------------------------
# Per-call host cost: the small ops around the kernels


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# The aten ops one call makes around the Triton kernels (forward, backward), numbers as
# options: each is a launch on a GPU, host time per call. Before they were filled on the host
# the smoothing and z-loss took 20 ops and the rows' mask and weights 5 more (43 forward).
OPS_AROUND_THE_KERNELS = {"forward": 22, "backward": 17}


@pytest.mark.parametrize("options", [{}, {"ignore_index": -100}, {"z_loss": 1e-4}])
def test_the_triton_path_makes_few_small_ops_per_call(monkeypatch, options):
    pytest.importorskip("triton", reason="Triton is in the dev extras; CI installs it")
    monkeypatch.setenv("LSTORCH_TRITON", "all")
    x = torch.randn(16, 256, device=KERNEL_DEVICE, requires_grad=True)
    labels = torch.randint(0, 256, (16,), device=KERNEL_DEVICE)

    def loss():
        return lstorch.smoothed_cross_entropy(
            x, labels, smoothing=0.1, reduction="mean", check_labels=False, **options
        )

    loss().backward()  # the first call compiles the kernels
    with OpCount() as forward:
        value = loss()
    with OpCount() as backward:
        value.backward()
    counts = {"forward": len(forward.ops), "backward": len(backward.ops)}
    assert "lstorch.smoothed_rows.default" in forward.ops
    assert "lstorch.smoothed_rows_backward.default" in backward.ops
    for phase, most in OPS_AROUND_THE_KERNELS.items():
        ops = forward.ops if phase == "forward" else backward.ops
        assert counts[phase] <= most, f"{phase}: {counts[phase]} ops: {ops}"


EDGE_SMOOTHINGS = [0.0, -0.0, 0.1, 1 / 3, 1.0, -5.6e-17, -1e-50, 1 + 2.2e-16, 1 - 1e-17, 0.7]


def _same_bits(got, want):
    return torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_number_option_gives_what_the_same_tensor_gives_bit_for_bit(dtype):
    """A Python smoothing or z-loss is rounded and clamped on the host; a 0-d float64 tensor
    of the same value takes the device ops (the expected value): loss and gradient are the
    same bits, signed zeros included."""
    x = torch.randn(6, 7, dtype=dtype)
    labels = torch.tensor([0, 6, 3, -100, 2, 5])
    for value in EDGE_SMOOTHINGS:
        for convention, kl in (("uniform", False), ("others", True)):
            results = []
            for as_option in (float, lambda v: torch.tensor(v, dtype=torch.float64)):
                leaf = x.clone().requires_grad_(True)
                loss = lstorch.smoothed_cross_entropy(
                    leaf,
                    labels,
                    smoothing=as_option(value),
                    z_loss=as_option(abs(value) * 1e-3),
                    convention=convention,
                    kl=kl,
                    ignore_index=-100,
                )
                (grad,) = torch.autograd.grad(loss.sum(), leaf)
                results.append((loss.detach(), grad))
            for got, want in zip(results[0], results[1], strict=True):
                assert _same_bits(got, want), (value, convention)
