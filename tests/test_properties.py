"""Property-based parity and invariants (hypothesis), over both frameworks.

Random shapes (one row, one class where the convention allows it, odd sizes), class axis,
convention, smoothing, ignored rows, class weights, ``where`` masks, KL form, log-prob inputs,
reductions and extreme logits (scale up to 1e4). Expected values come from the float64 NumPy
oracle (``parity_tests.oracles``) and torch's own ``F.cross_entropy``; the invariants need no
expected value at all.

Example counts come from the hypothesis profile (``tests/conftest.py``): ``ci`` by default,
``nightly`` with ``HYPOTHESIS_PROFILE=nightly``. Properties whose every example runs JAX eagerly
several times take a fraction of the profile's count (``_fraction``) to fit CI's time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lsjax
import lstorch
from parity_tests import DEFAULT_TOLERANCES, oracles
from parity_tests.compare import (
    _round_to,
    allclose,
    compare_case,
    max_abs_diff,
    run_jax,
    run_torch,
)
from parity_tests.registry import TWINS

MIN_CLASSES = {"uniform": 1, "others": 2, "others_but_pad": 3}


def _fraction(share: float):
    """A settings decorator running ``share`` of the active profile's example count."""
    return settings(max_examples=max(10, int(settings().max_examples * share)))


@st.composite
def smoothed_cases(draw, *, logits_input=None, allow_weight=True):
    """(args, kwargs) for ``smoothed_cross_entropy``, as NumPy arrays and Python values."""
    convention = draw(st.sampled_from(["uniform", "others", "others_but_pad"]))
    # Few distinct shapes: JAX compiles once per shape and options, and CI's time is finite.
    num_classes = draw(st.sampled_from([k for k in (1, 2, 3, 37) if k >= MIN_CLASSES[convention]]))
    rows = draw(st.sampled_from([1, 7]))
    axis = draw(st.sampled_from([-1, 0, 1]))
    shape = {-1: (rows, num_classes), 0: (num_classes, rows), 1: (rows, num_classes, 2)}[axis]
    row_shape = tuple(size for dim, size in enumerate(shape) if dim != axis % len(shape))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1.0, 3.0, 30.0, 1e4]))
    logits = scale * rng.standard_normal(shape)
    from_log_probs = draw(st.booleans()) if logits_input is None else not logits_input
    if from_log_probs:
        moved = np.moveaxis(logits, axis, -1)
        moved = moved - moved.max(-1, keepdims=True)
        moved = moved - np.log(np.exp(moved).sum(-1, keepdims=True))
        logits = np.moveaxis(moved, -1, axis)
    labels = rng.integers(0, num_classes, size=row_shape)
    kwargs = dict(
        smoothing=draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))),
        convention=convention,
        axis=axis,
        reduction=draw(st.sampled_from(["none", "sum", "mean"])),
        from_log_probs=from_log_probs,
    )
    if convention == "others_but_pad":
        kwargs["pad_index"] = draw(st.sampled_from([0, num_classes - 1]))
    if draw(st.booleans()):
        kwargs["ignore_index"] = -100
        labels = np.where(rng.random(row_shape) < draw(st.sampled_from([0.3, 1.0])), -100, labels)
    weighted = allow_weight and draw(st.booleans())
    if weighted:
        kwargs["weight"] = rng.uniform(0.1, 3.0, size=num_classes)
    else:
        kwargs["kl"] = draw(st.booleans())
    if draw(st.booleans()):
        kwargs["where"] = rng.random(row_shape) < 0.7
    if kwargs["reduction"] == "mean" and draw(st.booleans()):
        kwargs["normalizer"] = float(draw(st.integers(1, 50)))
    return (logits, labels), kwargs


def _counted(labels, kwargs):
    counted = np.ones(labels.shape, bool)
    if "ignore_index" in kwargs:
        counted &= labels != kwargs["ignore_index"]
    if "pad_index" in kwargs:
        counted &= labels != kwargs["pad_index"]
    if "where" in kwargs:
        counted &= kwargs["where"]
    return counted


@given(smoothed_cases())
@_fraction(1.0)
def test_jax_and_torch_equal_the_numpy_oracle(case):
    """Loss and gradient (random upstream cotangent) of both frameworks equal the oracle."""
    args, kwargs = case
    expected, vjp = oracles.smoothed_cross_entropy(*args, **kwargs)
    cotangent = np.random.default_rng(0).uniform(0.5, 1.5, size=np.shape(expected))
    expected_grad = vjp(cotangent)
    scale = max(1.0, float(np.max(np.abs(args[0]))))
    for run in (run_jax, run_torch):
        (value,), grad = run(
            (lsjax if run is run_jax else lstorch).smoothed_cross_entropy,
            args,
            kwargs,
            "float64",
            [cotangent],
        )
        # atol grows with the logits' scale: at |x| = 1e4 the loss is a difference of 1e4-sized
        # terms, exact to ~1e4 * 1e-16 per term.
        assert allclose([value], [expected], 1e-10, 1e-12 * scale), (run.__name__, kwargs)
        assert allclose([grad], [expected_grad], 1e-10, 1e-12 * scale), (run.__name__, kwargs)


@pytest.mark.parametrize("twin", TWINS, ids=[twin.name for twin in TWINS])
@given(data=st.data())
@_fraction(0.02)
def test_every_registered_twin_on_random_cases_and_seeds(twin, data):
    case = data.draw(st.sampled_from(twin.cases))
    seed = data.draw(st.integers(0, 2**31 - 1))
    dtype = data.draw(st.sampled_from(["float64", "float32", "bfloat16"]))
    args, kwargs = twin.make_inputs(np.random.default_rng(seed), dict(case))
    tolerances = {**DEFAULT_TOLERANCES, **(twin.tolerances or {})}
    result = compare_case(twin.jax_fn, twin.torch_fn, args, kwargs, dtype, *tolerances[dtype])
    assert result.passed, result


FRAMEWORKS = {
    "jax": (lsjax, run_jax),
    "torch": (lstorch, run_torch),
}


def _share(framework: str) -> float:
    # torch runs eagerly in about a millisecond; JAX's eager dispatch costs several.
    return 1.0 if framework == "torch" else 0.25


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_kl_form_is_nonnegative(framework):
    module, run = FRAMEWORKS[framework]

    @given(smoothed_cases(allow_weight=False))
    @_fraction(_share(framework))
    def check(case):
        args, kwargs = case
        kwargs = {**kwargs, "kl": True, "reduction": "none"}
        kwargs.pop("normalizer", None)
        (rows,), _ = run(module.smoothed_cross_entropy, args, kwargs, "float64")
        scale = max(1.0, float(np.max(np.abs(args[0]))))
        assert (rows >= -1e-12 * scale).all(), (rows, kwargs)

    check()


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_loss_unchanged_by_a_constant_added_to_a_rows_logits(framework):
    module, run = FRAMEWORKS[framework]

    @given(smoothed_cases(logits_input=True), st.floats(-100.0, 100.0))
    @_fraction(_share(framework))
    def check(case, shift):
        (logits, labels), kwargs = case
        axis = kwargs["axis"]
        offsets = shift * np.random.default_rng(1).standard_normal(labels.shape)
        shifted = logits + np.expand_dims(offsets, axis % logits.ndim)
        (before,), _ = run(module.smoothed_cross_entropy, (logits, labels), kwargs, "float64")
        (after,), _ = run(module.smoothed_cross_entropy, (shifted, labels), kwargs, "float64")
        scale = max(1.0, float(np.max(np.abs(shifted))))
        assert allclose([after], [before], 1e-9, 1e-11 * scale), (
            max_abs_diff([after], [before]),
            kwargs,
        )

    check()


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_gradient_rows_sum_to_zero_for_counted_rows(framework):
    module, run = FRAMEWORKS[framework]

    @given(smoothed_cases(logits_input=True, allow_weight=False))
    @_fraction(_share(framework))
    def check(case):
        (logits, labels), kwargs = case
        kwargs = {**kwargs, "reduction": "none"}
        kwargs.pop("normalizer", None)
        cotangent = np.random.default_rng(2).uniform(0.5, 1.5, size=labels.shape)
        (_,), grad = run(
            module.smoothed_cross_entropy, (logits, labels), kwargs, "float64", [cotangent]
        )
        rows = np.moveaxis(grad, kwargs["axis"], -1)  # (..., K)
        counted = _counted(labels, kwargs)
        assert np.abs(rows[counted].sum(-1)).max(initial=0.0) < 1e-12 * rows.shape[-1]
        assert not np.any(rows[~counted])  # rows that do not count get exactly zero

    check()


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_smoothing_zero_is_plain_cross_entropy(framework):
    module, run = FRAMEWORKS[framework]

    @given(smoothed_cases(logits_input=True))
    @_fraction(_share(framework))
    def check(case):
        (logits, labels), kwargs = case
        kwargs = {**kwargs, "smoothing": 0.0, "reduction": "none", "kl": False}
        kwargs.pop("normalizer", None)
        kwargs.pop("where", None)
        (rows,), _ = run(module.smoothed_cross_entropy, (logits, labels), kwargs, "float64")
        counted = _counted(labels, kwargs)
        x = torch.tensor(np.moveaxis(logits, kwargs["axis"], -1)).reshape(
            -1, logits.shape[kwargs["axis"]]
        )
        weight = None if "weight" not in kwargs else torch.tensor(kwargs["weight"])
        plain = (
            F.cross_entropy(
                x,
                torch.tensor(np.where(counted, labels, 0)).reshape(-1),
                weight=weight,
                reduction="none",
            )
            .reshape(labels.shape)
            .numpy()
        )
        np.testing.assert_allclose(
            rows[counted],
            plain[counted],
            rtol=1e-10,
            atol=1e-12 * max(1.0, float(np.abs(logits).max())),
        )

    check()


@given(st.integers(20000, 60000), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
@settings(max_examples=8)
def test_huge_vocabulary(num_classes, smoothing, seed):
    """K up to 60000 (the fp16-overflow regime of transformers#10674), float32 and bf16: the
    value equals the float64 oracle on the same (rounded) inputs to float32 accuracy, because
    lse, sum x and the mean are accumulated in float32 whatever the input dtype."""
    rng = np.random.default_rng(seed)
    logits, labels = 3 * rng.standard_normal((3, num_classes)), rng.integers(0, num_classes, 3)
    kwargs = dict(smoothing=smoothing, reduction="mean")
    for dtype in ("float32", "bfloat16"):
        rounded = _round_to(logits, dtype)
        expected, vjp = oracles.smoothed_cross_entropy(rounded, labels, **kwargs)
        expected_grad = vjp(1.0)
        grad_rtol, grad_atol = DEFAULT_TOLERANCES[dtype]
        for run, module in ((run_jax, lsjax), (run_torch, lstorch)):
            (value,), grad = run(
                module.smoothed_cross_entropy, (rounded, labels), kwargs, dtype, [1.0]
            )
            assert abs(value - expected) <= 1e-5 * abs(expected), (dtype, value, expected)
            np.testing.assert_allclose(grad, expected_grad, rtol=grad_rtol, atol=grad_atol)


@given(smoothed_cases(logits_input=True), st.data())
@_fraction(0.25)
def test_minus_inf_in_masked_classes_stays_finite(case, data):
    """A class mask removes classes from the softmax and the smoothing support: logits of -inf
    there (a masked vocabulary) give a finite loss and gradient in both frameworks, equal to the
    oracle's on the same logits with the masked columns set to 0."""
    (logits, labels), kwargs = case
    axis = kwargs["axis"] % logits.ndim
    num_classes = logits.shape[axis]
    needed = {"uniform": 1, "others": 2, "others_but_pad": 3}[kwargs["convention"]]
    if num_classes < needed + 1:
        return  # nothing left to mask
    masked = data.draw(
        st.sets(st.integers(0, num_classes - 1), min_size=1, max_size=num_classes - needed)
    )
    masked -= {kwargs.get("pad_index")}
    class_mask = np.ones(num_classes, bool)
    class_mask[sorted(masked)] = False
    allowed = np.flatnonzero(class_mask)
    moved_labels = np.where(
        np.isin(labels, allowed) | (labels == -100), labels, allowed[labels % len(allowed)]
    )
    kwargs = {**kwargs, "class_mask": class_mask, "kl": False}
    expected, vjp = oracles.smoothed_cross_entropy(logits, moved_labels, **kwargs)
    cotangent = np.random.default_rng(3).uniform(0.5, 1.5, size=np.shape(expected))
    expected_grad = vjp(cotangent)
    shape = [1] * logits.ndim
    shape[axis] = num_classes
    with_inf = np.where(class_mask.reshape(shape), logits, -np.inf)
    for run, module in ((run_jax, lsjax), (run_torch, lstorch)):
        (value,), grad = run(
            module.smoothed_cross_entropy, (with_inf, moved_labels), kwargs, "float64", [cotangent]
        )
        assert np.isfinite(value).all() and np.isfinite(grad).all(), (run.__name__, kwargs)
        scale = max(1.0, float(np.abs(logits).max()))
        assert allclose([value], [expected], 1e-10, 1e-12 * scale), (run.__name__, kwargs)
        assert allclose([grad], [expected_grad], 1e-10, 1e-12 * scale), (run.__name__, kwargs)
