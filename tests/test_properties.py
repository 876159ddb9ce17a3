"""Property-based parity and invariants (hypothesis), over both frameworks.

Random shapes (one row, one class where the convention allows it, odd sizes), class axis,
convention, smoothing, ignored rows, class weights, ``where`` masks, KL form, log-prob inputs,
reductions and extreme logits (scale up to 1e4). Expected values come from the float64 NumPy
oracle (``parity_tests.oracles``) and torch's own ``F.cross_entropy``; the invariants need no
expected value at all.

Every property runs the active hypothesis profile's example count (``tests/conftest.py``):
``ci`` by default (25 per property, derandomized: the same examples in every run), ``nightly``
(10,000 per property, random) with ``python -m pytest --nightly``. Each example checks both
frameworks. JAX runs eagerly (the path that checks concrete inputs): ~8 ms a call, plus
compiling the core once per (options, shapes). Under ``jit`` a call costs ~0.2 ms, but a
program is compiled per full set of static options (reduction, axis, ignore_index, which of
weight/where/normalizer are given, ...), and nearly every example draws a new set: eager is the
cheaper here. The vocabulary property is the exception: its options are fixed and its sizes
few, so it runs JAX under ``jit`` (``run_jax(jit=True)``), a dozen programs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import event, given
from hypothesis import strategies as st

import lsjax
import lstorch
from lsspec import MIN_CLASSES
from parity_tests import DEFAULT_TOLERANCES, oracles
from parity_tests.compare import (
    allclose,
    compare_case,
    max_abs_diff,
    round_to,
    run_jax,
    run_torch,
)
from parity_tests.registry import TWINS


@st.composite
def smoothed_cases(draw, *, logits_input=None, allow_weight=True, spare_classes=0):
    """(args, kwargs) for ``smoothed_cross_entropy``, as NumPy arrays and Python values.

    ``spare_classes``: at least that many classes beyond the convention's minimum.
    """
    convention = draw(st.sampled_from(["uniform", "others", "others_but_pad"]))
    # Few distinct shapes: JAX compiles once per shape and options, and CI's time is finite.
    fewest = MIN_CLASSES[convention] + spare_classes
    num_classes = draw(st.sampled_from([k for k in (1, 2, 3, 37) if k >= fewest]))
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


@given(data=st.data())
def test_every_registered_twin_on_random_cases_and_seeds(data):
    """A random twin, case of its grid, seed and dtype: JAX equals PyTorch (``compare_case``,
    the report's own check). ``--hypothesis-show-statistics`` lists the examples per twin."""
    twin = data.draw(st.sampled_from(TWINS))
    event(twin.name)
    case = data.draw(st.sampled_from(twin.cases))
    seed = data.draw(st.integers(0, 2**31 - 1))
    dtype = data.draw(st.sampled_from(["float64", "float32", "bfloat16"]))
    args, kwargs = twin.make_inputs(np.random.default_rng(seed), dict(case))
    # The twin's own tolerances where it has them, compare's defaults otherwise (the rounding
    # budget in bf16), as compare() and the report judge it.
    rtol, atol = (twin.tolerances or {}).get(dtype, (None, None))
    result = compare_case(twin.jax_fn, twin.torch_fn, args, kwargs, dtype, rtol, atol)
    assert result.passed, result


FRAMEWORKS = ((lsjax, run_jax), (lstorch, run_torch))


@given(smoothed_cases(allow_weight=False))
def test_kl_form_is_nonnegative(case):
    args, kwargs = case
    kwargs = {**kwargs, "kl": True, "reduction": "none"}
    kwargs.pop("normalizer", None)
    scale = max(1.0, float(np.max(np.abs(args[0]))))
    for module, run in FRAMEWORKS:
        (rows,), _ = run(module.smoothed_cross_entropy, args, kwargs, "float64")
        assert (rows >= -1e-12 * scale).all(), (run.__name__, rows, kwargs)


@given(smoothed_cases(logits_input=True), st.floats(-100.0, 100.0))
def test_loss_unchanged_by_a_constant_added_to_a_rows_logits(case, shift):
    (logits, labels), kwargs = case
    axis = kwargs["axis"]
    offsets = shift * np.random.default_rng(1).standard_normal(labels.shape)
    shifted = logits + np.expand_dims(offsets, axis % logits.ndim)
    scale = max(1.0, float(np.max(np.abs(shifted))))
    for module, run in FRAMEWORKS:
        (before,), _ = run(module.smoothed_cross_entropy, (logits, labels), kwargs, "float64")
        (after,), _ = run(module.smoothed_cross_entropy, (shifted, labels), kwargs, "float64")
        assert allclose([after], [before], 1e-9, 1e-11 * scale), (
            run.__name__,
            max_abs_diff([after], [before]),
            kwargs,
        )


@given(smoothed_cases(logits_input=True, allow_weight=False))
def test_gradient_rows_sum_to_zero_for_counted_rows(case):
    (logits, labels), kwargs = case
    kwargs = {**kwargs, "reduction": "none"}
    kwargs.pop("normalizer", None)
    cotangent = np.random.default_rng(2).uniform(0.5, 1.5, size=labels.shape)
    counted = _counted(labels, kwargs)
    for module, run in FRAMEWORKS:
        (_,), grad = run(
            module.smoothed_cross_entropy, (logits, labels), kwargs, "float64", [cotangent]
        )
        rows = np.moveaxis(grad, kwargs["axis"], -1)  # (..., K)
        assert np.abs(rows[counted].sum(-1)).max(initial=0.0) < 1e-12 * rows.shape[-1], run.__name__
        assert not np.any(rows[~counted]), run.__name__  # rows that do not count get exactly 0


@given(smoothed_cases(logits_input=True))
def test_smoothing_zero_is_plain_cross_entropy(case):
    (logits, labels), kwargs = case
    kwargs = {**kwargs, "smoothing": 0.0, "reduction": "none", "kl": False}
    kwargs.pop("normalizer", None)
    kwargs.pop("where", None)
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
    for module, run in FRAMEWORKS:
        (rows,), _ = run(module.smoothed_cross_entropy, (logits, labels), kwargs, "float64")
        np.testing.assert_allclose(
            rows[counted],
            plain[counted],
            rtol=1e-10,
            atol=1e-12 * max(1.0, float(np.abs(logits).max())),
            err_msg=run.__name__,
        )


# Vocabulary sizes from 20000 to 60000: GPT-2's, Llama's, a power of two, odd and round ones.
# A handful, so JAX compiles one program per size and dtype and then reuses it.
HUGE_VOCABULARIES = (20000, 32000, 32768, 40009, 50257, 60000)


@given(
    st.sampled_from(HUGE_VOCABULARIES),
    st.sampled_from(["float32", "bfloat16"]),
    st.floats(0.0, 1.0),
    st.integers(0, 2**32 - 1),
)
def test_huge_vocabulary(num_classes, dtype, smoothing, seed):
    """K up to 60000 (the fp16-overflow regime of transformers#10674), float32 or bf16: the
    value equals the float64 oracle on the same (rounded) inputs to float32 accuracy, because
    lse, sum x and the mean are accumulated in float32 whatever the input dtype. JAX runs
    jitted, smoothing traced (its eager path at large K is covered by the registry's K=1000
    grid and ``tests/test_memory.py``)."""
    rng = np.random.default_rng(seed)
    logits, labels = 3 * rng.standard_normal((3, num_classes)), rng.integers(0, num_classes, 3)
    kwargs = dict(smoothing=smoothing, reduction="mean")
    rounded = round_to(logits, dtype)
    expected, vjp = oracles.smoothed_cross_entropy(rounded, labels, **kwargs)
    expected_grad = vjp(1.0)
    grad_rtol, grad_atol = DEFAULT_TOLERANCES[dtype]
    for run, module in ((run_jax, lsjax), (run_torch, lstorch)):
        options = dict(jit=True) if run is run_jax else {}
        (value,), grad = run(
            module.smoothed_cross_entropy, (rounded, labels), kwargs, dtype, [1.0], **options
        )
        assert abs(value - expected) <= 1e-5 * abs(expected), (run.__name__, value, expected)
        np.testing.assert_allclose(grad, expected_grad, rtol=grad_rtol, atol=grad_atol)


@given(smoothed_cases(logits_input=True, spare_classes=1), st.data())
def test_minus_inf_in_masked_classes_stays_finite(case, data):
    """A class mask removes classes from the softmax and the smoothing support: logits of -inf
    there (a masked vocabulary) give a finite loss and gradient in both frameworks, equal to the
    oracle's on the same logits with the masked columns set to 0."""
    (logits, labels), kwargs = case
    axis = kwargs["axis"] % logits.ndim
    num_classes = logits.shape[axis]
    needed = MIN_CLASSES[kwargs["convention"]]
    assert num_classes >= needed + 1  # spare_classes=1: a class to mask is always there
    maskable = [c for c in range(num_classes) if c != kwargs.get("pad_index")]  # pad stays
    masked = data.draw(
        st.sets(st.sampled_from(maskable), min_size=1, max_size=num_classes - needed)
    )
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
