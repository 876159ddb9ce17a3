"""Narrow label dtypes give the loss and the gradient of int64 labels, in every function that
takes labels, in both frameworks.

The reference is the same call with the same label values held as int64 (the claim is "a narrow
dtype changes nothing"), so each comparison is exact. The classes number ``K = 259``: more than
a uint8/int8 can hold, so a comparison ``labels < K`` made in the label's dtype wraps, and the
labels 255 and 156 are real classes. With ``ignore_index=-100`` a uint8 label 156 must count
(``-100`` cast to uint8 is 156): ``-100`` matches no uint8 label.

The sharded JAX loss runs on a one-device mesh and the torch distributed loss on a one-rank gloo
group: the label handling is the whole of what differs here (tests/test_sharded.py and
tests/test_distributed.py check the multi-device arithmetic).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.distributed as dist
from jax.sharding import Mesh

import lsjax
import lsjax.compat
import lstorch
import lstorch.compat
from lsjax import calibration
from lsjax.sharded import sharded_fused_linear_smoothed_cross_entropy
from lstorch.distributed import vocab_parallel_smoothed_cross_entropy

K = 259
FEATURES = 16
NARROW = ["uint8", "int8", "int16", "uint16", "int32"]


def label_values(dtype: str, ignored: bool) -> np.ndarray:
    """Labels in [0, K) that ``dtype`` holds (255 and 156 where it can), plus two rows labelled
    -100 when the call ignores -100 and ``dtype`` is signed."""
    info = np.iinfo(dtype)
    values = [v for v in (1, 3, 255, 156, 258, 0, 127, 100) if info.min <= v <= info.max]
    if ignored and info.min < 0:
        values += [-100, -100]
    return np.array(values, np.int64)


def inputs_for(kind: str, rows: int) -> list[np.ndarray]:
    """The differentiated inputs, float32, the same for every dtype of a row count."""
    rng = np.random.default_rng(rows)
    logits = (3 * rng.standard_normal((rows, K))).astype(np.float32)
    if kind == "logits":
        return [logits]
    if kind == "log_probs":
        shifted = logits - logits.max(-1, keepdims=True)
        return [shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))]
    if kind == "probs":
        exp = np.exp(logits - logits.max(-1, keepdims=True))
        return [exp / exp.sum(-1, keepdims=True)]
    hidden = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    weight = (0.5 * rng.standard_normal((K, FEATURES))).astype(np.float32)
    return [hidden, weight]


def cotangent(shape) -> np.ndarray:
    """A fixed upstream gradient, different on every row (1 for a scalar)."""
    size = int(np.prod(shape))
    return (1.0 + np.arange(size) / max(size, 1)).reshape(shape).astype(np.float32)


class Case(NamedTuple):
    name: str
    kind: str  # "logits", "log_probs", "probs" or "linear" (hidden and weight)
    ignored: bool  # whether the call ignores label -100
    call: Callable  # call(*inputs, labels) -> an array or a tuple of arrays
    differentiable: bool = True
    # Units in the last place the narrow labels' results may differ by (0: bit for bit). Only
    # a call inside a user's jit needs 1: XLA:CPU fuses the labels' widening into the loss's
    # fusions, which changes their operand order, and it contracts a * b + c into fused
    # multiply-adds in that order, so a product can be rounded once or twice.
    max_ulp: int = 0


# ----------------------------------------------------------------------------------------------
# JAX


def _one_device_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("batch", "vocab"))


JAX_CASES = [
    Case(
        "smoothed_cross_entropy",
        "logits",
        True,
        lambda x, y: lsjax.smoothed_cross_entropy(x, y, smoothing=0.1, ignore_index=-100),
    ),
    Case(
        "smoothed_cross_entropy/others_but_pad,pad_index=156,weight",
        "logits",
        True,
        lambda x, y: lsjax.smoothed_cross_entropy(
            x,
            y,
            smoothing=0.2,
            convention="others_but_pad",
            pad_index=156,
            ignore_index=-100,
            weight=jnp.linspace(0.5, 1.5, K, dtype=jnp.float32),
            reduction="mean",
        ),
    ),
    Case(
        "smoothed_cross_entropy/class_mask,z_loss",
        "logits",
        True,
        lambda x, y: lsjax.smoothed_cross_entropy(
            x,
            y,
            smoothing=0.1,
            ignore_index=-100,
            class_mask=jnp.arange(K) != 2,
            z_loss=1e-3,
        ),
    ),
    Case(
        "smoothed_cross_entropy/jit",
        "logits",
        True,
        jax.jit(
            lambda x, y: lsjax.smoothed_cross_entropy(
                x, y, smoothing=0.1, convention="others", ignore_index=-100
            )
        ),
        max_ulp=1,
    ),
    Case(
        "cross_entropy",
        "logits",
        True,
        lambda x, y: lsjax.cross_entropy(x, y, reduction="none", label_smoothing=0.1),
    ),
    Case(
        "fused_linear_smoothed_cross_entropy",
        "linear",
        True,
        lambda h, w, y: lsjax.fused_linear_smoothed_cross_entropy(
            h, w, y, smoothing=0.1, ignore_index=-100, reduction="none", chunk_size=64
        ),
    ),
    Case(
        "sharded_fused_linear_smoothed_cross_entropy",
        "linear",
        True,
        jax.jit(
            lambda h, w, y: sharded_fused_linear_smoothed_cross_entropy(
                h,
                w,
                y,
                mesh=_one_device_mesh(),
                smoothing=0.1,
                convention="others",
                ignore_index=-100,
                reduction="sum",
                chunk_size=64,
            )
        ),
    ),
    Case(
        "compat.fairseq.label_smoothed_nll_loss",
        "log_probs",
        True,
        lambda lp, y: lsjax.compat.fairseq.label_smoothed_nll_loss(
            lp, y, 0.1, ignore_index=-100, reduce=False
        ),
    ),
    Case(
        "compat.t5x.compute_weighted_cross_entropy",
        "logits",
        False,
        lambda x, y: lsjax.compat.t5x.compute_weighted_cross_entropy(
            x, y, label_smoothing=0.1, z_loss=1e-4
        ),
    ),
    Case(
        "compat.hf.label_smoother",
        "logits",
        True,
        lambda x, y: lsjax.compat.hf.label_smoother(x, y, epsilon=0.1),
    ),
    Case(
        "compat.timm.label_smoothing_cross_entropy",
        "logits",
        False,
        lambda x, y: lsjax.compat.timm.label_smoothing_cross_entropy(x, y, smoothing=0.1),
    ),
    Case(
        "label_smoothing_loss",
        "logits",
        False,
        lambda x, y: lsjax.label_smoothing_loss(x, y, classes=K, smoothing=0.1),
    ),
    Case(
        "kl_label_smoothing_loss",
        "log_probs",
        True,
        lambda lp, y: lsjax.kl_label_smoothing_loss(
            lp, y, label_smoothing=0.1, tgt_vocab_size=K, ignore_index=-100
        ),
    ),
    Case(
        "kl_label_smoothing_loss/ignore_index=156",
        "log_probs",
        False,
        lambda lp, y: lsjax.kl_label_smoothing_loss(
            lp, y, label_smoothing=0.1, tgt_vocab_size=K, ignore_index=156
        ),
    ),
    Case(
        "calibration.negative_log_likelihood,fit_temperature",
        "logits",
        False,
        lambda x, y: (
            calibration.negative_log_likelihood(x, y, temperature=1.5),
            calibration.fit_temperature(x, y),
        ),
        differentiable=False,
    ),
    Case(
        "calibration.reliability_diagram,expected/maximum_calibration_error",
        "probs",
        False,
        lambda p, y: (
            calibration.reliability_diagram(p, y, num_bins=5).count,
            calibration.expected_calibration_error(p, y),
            calibration.maximum_calibration_error(p, y),
        ),
        differentiable=False,
    ),
]


def _first(outputs):
    return outputs[0] if isinstance(outputs, tuple) else outputs


def jax_results(case: Case, labels: np.ndarray) -> list[np.ndarray]:
    """The outputs of ``case`` and the gradient of its first output (times a fixed cotangent)
    with respect to every input, as NumPy arrays."""
    inputs = [jnp.asarray(a) for a in inputs_for(case.kind, len(labels))]
    labels = jnp.asarray(labels)
    if not case.differentiable:
        outputs = case.call(*inputs, labels)
        return [np.asarray(o) for o in outputs]

    def scalar(*inputs):
        outputs = case.call(*inputs, labels)
        first = _first(outputs)
        return jnp.sum(first * cotangent(first.shape)), outputs

    argnums = tuple(range(len(inputs)))
    grads, outputs = jax.grad(scalar, argnums=argnums, has_aux=True)(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [np.asarray(o) for o in (*outputs, *grads)]


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("case", JAX_CASES, ids=lambda case: case.name)
def test_jax_narrow_labels_give_the_int64_loss_and_gradient(case, dtype):
    values = label_values(dtype, case.ignored)
    narrow = values.astype(dtype)
    assert jnp.asarray(narrow).dtype == np.dtype(dtype)  # the call sees the narrow dtype
    expected = jax_results(case, values)
    got = jax_results(case, narrow)
    for expected_array in expected:
        assert np.isfinite(expected_array.astype(np.float64)).all()  # NaN == NaN would pass
    assert len(got) == len(expected)
    for got_array, expected_array in zip(got, expected, strict=True):
        if case.max_ulp:
            np.testing.assert_array_max_ulp(got_array, expected_array, maxulp=case.max_ulp)
        else:
            np.testing.assert_array_equal(got_array, expected_array)


def test_jax_uint8_label_156_counts_under_ignore_index_minus_100():
    """The reported case: K = 200, label 156, ignore_index=-100 (which a uint8 cast makes 156)."""
    logits = jnp.asarray(inputs_for("logits", 2)[0][:, :200])
    labels = np.array([156, 7])
    expected = lsjax.smoothed_cross_entropy(logits, labels, ignore_index=-100)
    got = lsjax.smoothed_cross_entropy(logits, labels.astype(np.uint8), ignore_index=-100)
    assert float(expected[0]) > 0
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_jax_without_x64_wide_labels_neither_wrap_nor_match_a_negative_ignore_index():
    """Without ``jax_enable_x64`` JAX keeps uint32 labels as they are and wraps int64 ones to
    int32. A uint32 label ``2**32 - 1`` is out of range, not ``ignore_index=-1`` (which uint32
    cannot hold): concrete it raises, traced it gives NaN as an int64 label would. An int64
    NumPy label int32 cannot hold raises before JAX wraps it to another class."""
    logits = inputs_for("logits", 2)[0].astype(np.float32)
    with jax.enable_x64(False):
        for dtype in (np.uint32, np.int64):
            labels = np.array([1, 2**32 - 1], dtype)
            message = r"must lie in \[0, 258\]" if dtype == np.uint32 else "must fit JAX's default"
            with pytest.raises(ValueError, match=message):
                lsjax.smoothed_cross_entropy(logits, labels, ignore_index=-1)
        labels = np.array([1, 2**32 - 1], np.uint32)
        for call in (
            jax.jit(lambda x, y: lsjax.smoothed_cross_entropy(x, y, ignore_index=-1)),
            lambda x, y: lsjax.smoothed_cross_entropy(x, y, ignore_index=-1, check_labels=False),
        ):
            loss = np.asarray(call(logits, labels))
            assert np.isfinite(loss[0]) and np.isnan(loss[1]), loss


# ----------------------------------------------------------------------------------------------
# PyTorch


@contextlib.contextmanager
def _triton_kernels():
    """Every lstorch call inside runs on the Triton kernels (Triton's interpreter on a CPU);
    fails unless they were launched."""
    pytest.importorskip("triton", reason="Triton is in the dev extras; CI installs it")
    from parity_tests.paths import KernelLaunches

    launches = KernelLaunches()
    with mock.patch.dict(os.environ, {"LSTORCH_TRITON": "all"}), launches.counting():
        yield
    assert launches.count > 0, "the Triton kernels did not run"


def _on_triton(call):
    def run(*args):
        with _triton_kernels():
            return call(*args)

    return run


TORCH_CASES = [
    Case(
        "smoothed_cross_entropy",
        "logits",
        True,
        lambda x, y: lstorch.smoothed_cross_entropy(x, y, smoothing=0.1, ignore_index=-100),
    ),
    Case(
        "smoothed_cross_entropy/others_but_pad,pad_index=156,weight",
        "logits",
        True,
        lambda x, y: lstorch.smoothed_cross_entropy(
            x,
            y,
            smoothing=0.2,
            convention="others_but_pad",
            pad_index=156,
            ignore_index=-100,
            weight=torch.linspace(0.5, 1.5, K),
            reduction="mean",
        ),
    ),
    Case(
        "smoothed_cross_entropy/class_mask,z_loss",
        "logits",
        True,
        lambda x, y: lstorch.smoothed_cross_entropy(
            x,
            y,
            smoothing=0.1,
            ignore_index=-100,
            class_mask=torch.arange(K) != 2,
            z_loss=1e-3,
        ),
    ),
    Case(
        "smoothed_cross_entropy/inplace_backward",
        "logits",
        True,
        lambda x, y: lstorch.smoothed_cross_entropy(
            x * 1.0, y, smoothing=0.1, ignore_index=-100, inplace_backward=True
        ),
    ),
    Case(
        "smoothed_cross_entropy/triton",
        "logits",
        True,
        _on_triton(
            lambda x, y: lstorch.smoothed_cross_entropy(
                x, y, smoothing=0.1, convention="others", ignore_index=-100
            )
        ),
    ),
    Case(
        "SmoothedCrossEntropyLoss",
        "logits",
        True,
        lambda x, y: lstorch.SmoothedCrossEntropyLoss(smoothing=0.1)(x, y),
    ),
    Case(
        "fused_linear_smoothed_cross_entropy",
        "linear",
        True,
        lambda h, w, y: lstorch.fused_linear_smoothed_cross_entropy(
            h, w, y, smoothing=0.1, ignore_index=-100, reduction="none", chunk_size=64
        ),
    ),
    Case(
        "FusedLinearSmoothedCrossEntropyLoss",
        "linear",
        True,
        lambda h, w, y: lstorch.FusedLinearSmoothedCrossEntropyLoss(
            smoothing=0.1, convention="others", chunk_size=64
        )(h, w, y),
    ),
    Case(
        "vocab_parallel_smoothed_cross_entropy",
        "logits",
        True,
        lambda x, y: vocab_parallel_smoothed_cross_entropy(
            x, y, smoothing=0.1, convention="others", ignore_index=-100
        ),
    ),
    Case(
        "compat.fairseq.label_smoothed_nll_loss",
        "log_probs",
        True,
        lambda lp, y: lstorch.compat.fairseq.label_smoothed_nll_loss(
            lp, y, 0.1, ignore_index=-100, reduce=False
        ),
    ),
    Case(
        "compat.t5x.compute_weighted_cross_entropy",
        "logits",
        False,
        lambda x, y: lstorch.compat.t5x.compute_weighted_cross_entropy(
            x, y, label_smoothing=0.1, z_loss=1e-4
        ),
    ),
    Case(
        "compat.hf.label_smoother",
        "logits",
        True,
        lambda x, y: lstorch.compat.hf.label_smoother(x, y, epsilon=0.1),
    ),
    Case(
        "compat.timm.label_smoothing_cross_entropy",
        "logits",
        False,
        lambda x, y: lstorch.compat.timm.label_smoothing_cross_entropy(x, y, smoothing=0.1),
    ),
    Case(
        "label_smoothing_loss",
        "logits",
        False,
        lambda x, y: lstorch.label_smoothing_loss(x, y, classes=K, smoothing=0.1),
    ),
    Case(
        "LabelSmoothingLoss",
        "logits",
        False,
        lambda x, y: lstorch.LabelSmoothingLoss(K, smoothing=0.1)(x, y),
    ),
    Case(
        "kl_label_smoothing_loss",
        "log_probs",
        True,
        lambda lp, y: lstorch.kl_label_smoothing_loss(
            lp, y, label_smoothing=0.1, tgt_vocab_size=K, ignore_index=-100
        ),
    ),
    Case(
        "KLLabelSmoothingLoss/ignore_index=156",
        "log_probs",
        False,
        lambda lp, y: lstorch.KLLabelSmoothingLoss(0.1, K, ignore_index=156)(lp, y),
    ),
]


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """The default process group, one gloo rank (vocab_parallel_smoothed_cross_entropy needs
    one); torn down after this file's tests."""
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def torch_results(case: Case, labels: torch.Tensor) -> list[np.ndarray]:
    """The outputs of ``case`` and the gradient of its first output (times a fixed cotangent)
    with respect to every input, as NumPy arrays."""
    inputs = [torch.tensor(a, requires_grad=True) for a in inputs_for(case.kind, len(labels))]
    outputs = case.call(*inputs, labels)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    first = outputs[0]
    grads = torch.autograd.grad(first, inputs, torch.from_numpy(cotangent(first.shape)))
    return [t.detach().numpy() for t in (*outputs, *grads)]


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda case: case.name)
def test_torch_narrow_labels_give_the_int64_loss_and_gradient(case, dtype, one_rank_group):
    values = label_values(dtype, case.ignored)
    expected = torch_results(case, torch.from_numpy(values))
    got = torch_results(case, torch.from_numpy(values).to(getattr(torch, dtype)))
    for expected_array in expected:
        assert np.isfinite(expected_array.astype(np.float64)).all()  # NaN == NaN would pass
    for got_array, expected_array in zip(got, expected, strict=True):
        np.testing.assert_array_equal(got_array, expected_array)


def test_torch_fused_uint8_labels_are_class_indices_not_a_mask():
    """``weight[labels]`` with uint8 labels would be a boolean mask in torch."""
    hidden, weight = (torch.tensor(a) for a in inputs_for("linear", 4))
    labels = torch.tensor([1, 0, 200, 7])
    expected = lstorch.fused_linear_smoothed_cross_entropy(hidden, weight, labels, smoothing=0.1)
    got = lstorch.fused_linear_smoothed_cross_entropy(
        hidden, weight, labels.to(torch.uint8), smoothing=0.1
    )
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------
# Both: errors keep their meaning with narrow labels


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "uint16", "int32", "int64"])
def test_out_of_range_narrow_labels_raise_the_int64_error(dtype):
    logits = inputs_for("logits", 2)[0][:, :100]
    labels = np.array([1, 120], np.int64).astype(dtype)  # 120 >= K = 100
    message = r"`labels` must lie in \[0, 99\] or equal ignore_index=-100; got .* \[120\]"
    with pytest.raises(ValueError, match=message):
        lsjax.smoothed_cross_entropy(logits, labels, ignore_index=-100)
    with pytest.raises(ValueError, match=message):
        lstorch.smoothed_cross_entropy(
            torch.tensor(logits),
            torch.tensor(labels.astype(np.int64)).to(getattr(torch, dtype)),
            ignore_index=-100,
        )


def test_bool_labels_stay_an_error():
    logits = inputs_for("logits", 2)[0]
    hidden, weight = inputs_for("linear", 2)
    labels = np.array([True, False])
    jax_calls = [
        lambda: lsjax.smoothed_cross_entropy(logits, labels),
        lambda: lsjax.fused_linear_smoothed_cross_entropy(hidden, weight, labels),
        lambda: sharded_fused_linear_smoothed_cross_entropy(
            hidden, weight, labels, mesh=_one_device_mesh()
        ),
    ]
    tlogits, thidden, tweight = (torch.tensor(a) for a in (logits, hidden, weight))
    tlabels = torch.tensor(labels)
    torch_calls = [
        lambda: lstorch.smoothed_cross_entropy(tlogits, tlabels),
        lambda: lstorch.fused_linear_smoothed_cross_entropy(thidden, tweight, tlabels),
        lambda: vocab_parallel_smoothed_cross_entropy(tlogits, tlabels),
    ]
    for call in jax_calls + torch_calls:
        with pytest.raises(TypeError, match=r"`labels` must have an integer dtype.*got dtype"):
            call()
