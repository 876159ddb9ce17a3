"""Numerics of the fused linear + label-smoothed cross-entropy that the dense comparisons miss.

* Non-finite hidden states in rows that do not count (ignored, or labelled with the pad of
  ``"others_but_pad"``): NaN, +inf or -inf there reach neither the loss nor any gradient, in
  both frameworks. Oracles: the same call with those rows' hidden replaced by zeros (the claim
  itself: such a row is as if it held zeros, bit for bit), and the float64 dense oracle
  ``parity_tests.oracles.fused_linear_smoothed_cross_entropy`` on that finite input.
* ``lstorch`` under ``torch.autocast``: the inputs are rounded as ``F.linear`` would cast them,
  and both passes compute from those rounded values in float32. Oracle: the float64 dense oracle
  of the SAME rounded inputs (hidden, weight and bias cast to the autocast dtype, then to
  float64); torch's own ``F.cross_entropy(F.linear(...))`` under the same autocast as a sanity
  check, within a bound derived from that path's rounding of the logits.
* bf16 hidden and weight, 4096 rows (16384 nightly) of confident predictions, 16 vocabulary
  chunks, both frameworks: d hidden and d weight accumulate in float32 and are rounded once, so
  their error against the float64 oracle of the same bf16 inputs is at most twice that of the
  float32 dense route (``F.linear`` + ``F.cross_entropy``) rounded once to bf16.
* A tiny loss (``"others"``, smoothing 1, a two-class head confident about the other class):
  the label's logit and the rank-1 support sum are products of their own, so the loss is exact
  to float32 rounding at the logits' scale ``sum_d |h_d W_cd|``, not at its own (the documented
  limit, docs/large-vocab.md). Oracle: the float64 dense oracle of the same float32 inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lsjax
import lstorch
from parity_tests import oracles
from tests.helpers import profile

ROWS, FEATURES, VOCAB = 12, 8, 50
IGNORE, PAD = -100, 3
# Rows that do not count: 1 and 4 are ignored (row 1 non-finite in every feature, row 4 in one),
# 7 is labelled with the pad (it counts for nothing under "others_but_pad", which the case
# below uses; under "uniform" it is an ordinary row and stays finite).
IGNORED_ROWS = (1, 4)
PAD_ROW = 7

# Chunks split the VOCABULARY (every row is in every chunk): one class per chunk, a ragged split
# (50 = 7 * 7 + 1: lsjax shifts the last chunk back and masks its repeated columns), an even-ish
# one, and a single chunk wider than the vocabulary.
CHUNK_SIZES = (1, 7, 16, 2048)
CASES = {
    "uniform": dict(smoothing=0.1, convention="uniform", ignore_index=IGNORE),
    "others_but_pad": dict(
        smoothing=0.3, convention="others_but_pad", pad_index=PAD, ignore_index=IGNORE
    ),
}
# float32 against the float64 oracle: the registry's fused twin tolerance (1e-5, 1e-5), not the
# default (1e-5, 1e-6), for the reason written beside _FLOAT32_CANCELLING_SUMS in
# parity_tests/registry.py: d hidden is a float32 sum over the classes of (softmax - q) * W,
# terms up to ~10 that cancel (measured here: 1.4e-6 on an entry of 0.022, others_but_pad).
RTOL, ATOL = 1e-5, 1e-5


def _problem(case, bad):
    """(hidden with non-finite rows that do not count, the same with zeros there, weight,
    bias, labels, cotangent, the rows that do not count)."""
    rng = np.random.default_rng(len(case))
    hidden = rng.standard_normal((ROWS, FEATURES)).astype(np.float32)
    weight = (3 / np.sqrt(FEATURES) * rng.standard_normal((VOCAB, FEATURES))).astype(np.float32)
    bias = rng.standard_normal(VOCAB).astype(np.float32)
    labels = rng.integers(PAD + 1, VOCAB, ROWS)
    labels[list(IGNORED_ROWS)] = IGNORE
    labels[PAD_ROW] = PAD
    not_counted = list(IGNORED_ROWS) + ([PAD_ROW] if "pad_index" in CASES[case] else [])
    finite = hidden.copy()
    finite[not_counted] = 0.0
    poisoned = finite.copy()
    poisoned[IGNORED_ROWS[0]] = bad
    poisoned[IGNORED_ROWS[1], 2] = bad
    if "pad_index" in CASES[case]:
        poisoned[PAD_ROW, :3] = bad
    cotangent = rng.uniform(0.5, 1.5, ROWS).astype(np.float32)
    return poisoned, finite, weight, bias, labels, cotangent, not_counted


def _jax_run(hidden, weight, bias, labels, cotangent, options):
    def loss(hidden, weight, bias):
        return lsjax.fused_linear_smoothed_cross_entropy(
            hidden, weight, jnp.asarray(labels), bias=bias, **options
        )

    value, vjp = jax.vjp(loss, *(jnp.asarray(a) for a in (hidden, weight, bias)))
    grads = vjp(jnp.asarray(cotangent if value.ndim else 1.0, value.dtype))
    return [np.asarray(a) for a in (value, *grads)]


def _torch_run(hidden, weight, bias, labels, cotangent, options):
    arrays = [torch.tensor(a, requires_grad=True) for a in (hidden, weight, bias)]
    value = lstorch.fused_linear_smoothed_cross_entropy(
        arrays[0], arrays[1], torch.tensor(labels), bias=arrays[2], **options
    )
    cot = torch.tensor(cotangent if value.ndim else 1.0, dtype=value.dtype)
    grads = torch.autograd.grad(value, arrays, cot)
    return [a.detach().numpy() for a in (value, *grads)]


NAMES = ("loss", "d hidden", "d weight", "d bias")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_non_finite_hidden_in_rows_that_do_not_count_reaches_nothing(
    framework, case, chunk_size, reduction, bad
):
    poisoned, finite, weight, bias, labels, cotangent, not_counted = _problem(case, bad)
    options = dict(CASES[case], reduction=reduction, chunk_size=chunk_size)
    run = _jax_run if framework == "jax" else _torch_run
    got = run(poisoned, weight, bias, labels, cotangent, options)
    as_zeros = run(finite, weight, bias, labels, cotangent, options)
    for name, value in zip(NAMES, got, strict=True):
        assert np.isfinite(value).all(), name
    d_hidden = got[1]
    assert not d_hidden[not_counted].any()  # exactly 0 (a select, not 0 * something)
    # The claim itself: a row that does not count is as if its hidden held zeros, bit for bit
    # (same program, same finite operands).
    for name, left, right in zip(NAMES, got, as_zeros, strict=True):
        np.testing.assert_array_equal(left, right, err_msg=name)
    # And against the float64 dense oracle on the finite input.
    for index, wrt in enumerate(("hidden", "weight", "bias"), start=1):
        expected, vjp = oracles.fused_linear_smoothed_cross_entropy(
            finite, weight, labels, bias=bias, wrt=wrt, **options
        )
        np.testing.assert_allclose(got[0], expected, rtol=RTOL, atol=ATOL, err_msg="loss")
        grad = vjp(cotangent if reduction == "none" else 1.0)
        np.testing.assert_allclose(got[index], grad, rtol=RTOL, atol=ATOL, err_msg=NAMES[index])


# --------------------------------------------------------------------------------------------
# lstorch under torch.autocast

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Unit roundoff of the autocast dtype (round to nearest: half an ulp of 1).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11}


# The fused loss under autocast computes in float32 from the rounded inputs, so against the
# float64 oracle of the SAME rounded inputs what remains is float32 arithmetic: the float32
# tolerance above, not a bf16 one. A gradient that comes back in a low-precision dtype (that of
# a low-precision hidden) is rounded once more at the end: relative 2**-9 (bf16) / 2**-11
# (fp16); allowed (4 u, u), as test_fused.TOLERANCES does for bf16 (2**-7, 2**-9).
def _tolerance(dtype):
    if dtype in UNIT_ROUNDOFF:
        return 4 * UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[dtype]
    return RTOL, ATOL


def _autocast_problem(device, rows=40, features=24, vocab=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, features, generator=generator)
    weight = torch.randn(vocab, features, generator=generator) * 3 / features**0.5
    bias = torch.randn(vocab, generator=generator)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[::5] = IGNORE
    return [t.to(device) for t in (hidden, weight, bias, labels)]


def _rounded(tensor, dtype):
    """What autocast's cast makes of ``tensor`` for F.linear, in float64 NumPy."""
    return tensor.detach().to(dtype).cpu().double().numpy()


def _oracle(hidden, weight, bias, labels, options, cotangent):
    """Loss and (d hidden, d weight, d bias) of the float64 dense oracle."""
    grads = []
    for wrt in ("hidden", "weight", "bias"):
        loss, vjp = oracles.fused_linear_smoothed_cross_entropy(
            hidden, weight, labels.cpu().numpy(), bias=bias, wrt=wrt, **options
        )
        grads.append(vjp(cotangent))
    return loss, grads


def _numpy(tensor):
    return tensor.detach().cpu().double().numpy()


@pytest.mark.parametrize(
    "backward_inside", [False, True], ids=["backward-after", "backward-inside"]
)
@pytest.mark.parametrize("chunk_size", [64, 2048])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("autocast_dtype", sorted(AUTOCAST_DTYPES))
@pytest.mark.parametrize("device", DEVICES)
def test_float32_inputs_under_autocast_give_the_loss_of_the_rounded_inputs_in_both_passes(
    device, autocast_dtype, reduction, chunk_size, backward_inside
):
    # Before: the forward's chunk products ran in the autocast dtype (autocast reached inside
    # the autograd.Function) and the backward's in float32, so the loss was ~1e-3 off and the
    # backward differentiated another lse than the forward's.
    dtype = AUTOCAST_DTYPES[autocast_dtype]
    hidden, weight, bias, labels = _autocast_problem(device)
    inputs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    options = dict(smoothing=0.1, ignore_index=IGNORE, reduction=reduction)
    cotangent = torch.linspace(0.5, 1.5, len(labels), device=device)
    with torch.autocast(device, dtype=dtype):
        loss = lstorch.fused_linear_smoothed_cross_entropy(
            inputs[0], inputs[1], labels, bias=inputs[2], chunk_size=chunk_size, **options
        )
        upstream = cotangent if reduction == "none" else torch.ones((), device=device)
        if backward_inside:
            grads = torch.autograd.grad(loss, inputs, upstream)
    if not backward_inside:
        grads = torch.autograd.grad(loss, inputs, upstream)
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32] * 3  # each input's own dtype
    expected, expected_grads = _oracle(
        *(_rounded(t, dtype) for t in (hidden, weight, bias)),
        labels,
        options,
        _numpy(upstream),
    )
    np.testing.assert_allclose(_numpy(loss), expected, rtol=RTOL, atol=ATOL, err_msg="loss")
    # Forward and backward agree: the gradient is that of the loss just checked.
    for name, got, want in zip(NAMES[1:], grads, expected_grads, strict=True):
        np.testing.assert_allclose(_numpy(got), want, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("autocast_dtype", sorted(AUTOCAST_DTYPES))
@pytest.mark.parametrize("device", DEVICES)
def test_a_low_precision_hidden_from_an_autocast_layer_meets_a_float32_head(device, autocast_dtype):
    # Before: "`weight` must have the hidden's dtype bfloat16; got dtype float32", where F.linear
    # would have cast the head's weight.
    dtype = AUTOCAST_DTYPES[autocast_dtype]
    features, weight, bias, labels = _autocast_problem(device)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], device=device)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    projection = torch.nn.Linear(features.shape[1], features.shape[1], device=device)
    loss_fn = lstorch.FusedLinearSmoothedCrossEntropyLoss(smoothing=0.1, ignore_index=IGNORE)
    with torch.autocast(device, dtype=dtype):
        hidden = projection(features)
        assert hidden.dtype == dtype
        loss = loss_fn(hidden, head.weight, labels, head.bias)
        logits = F.linear(hidden, head.weight, head.bias)
        dense = F.cross_entropy(logits, labels, label_smoothing=0.1, ignore_index=IGNORE)
    inputs = (hidden, head.weight, head.bias)
    grads = torch.autograd.grad(loss, inputs)
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]
    expected, expected_grads = _oracle(
        *(_rounded(t, dtype) for t in inputs), labels, dict(smoothing=0.1, ignore_index=IGNORE), 1.0
    )
    np.testing.assert_allclose(_numpy(loss), expected, rtol=RTOL, atol=ATOL, err_msg="loss")
    for name, got, want in zip(NAMES[1:], grads, expected_grads, strict=True):
        rtol, atol = _tolerance(got.dtype)
        np.testing.assert_allclose(_numpy(got), want, rtol=rtol, atol=atol, err_msg=name)
    # Sanity check against torch's own path under the same autocast. That path rounds every
    # logit to the autocast dtype (|error| <= u * |x|, u the unit roundoff); a row's loss moves
    # by at most 2 * max|error| (lse, x_y and the mean of the logits each by at most max|error|),
    # and so does their mean over the rows.
    bound = 2 * UNIT_ROUNDOFF[dtype] * float(logits.detach().abs().max())
    assert abs(loss.item() - dense.item()) <= bound, (loss.item(), dense.item(), bound)


def test_mismatched_dtypes_outside_autocast_still_raise():
    features, weight, bias, labels = _autocast_problem("cpu")
    with pytest.raises(TypeError) as info:
        lstorch.fused_linear_smoothed_cross_entropy(
            features.to(torch.bfloat16), weight, labels, bias=bias
        )
    assert "`weight` must have the hidden's dtype bfloat16; got dtype float32" in str(info.value)
    # Under autocast, float64 is left alone (as by F.linear, which raises too).
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError) as info:
        lstorch.fused_linear_smoothed_cross_entropy(features.double(), weight, labels, bias=bias)
    assert "`weight` must have the hidden's dtype float64; got dtype float32" in str(info.value)


def test_under_torch_compile_and_autocast_forward_and_backward_agree():
    # Inductor does not round at a cast to a lower precision inside a fused kernel unless
    # torch._inductor.config.emulate_precision_casts is set, so by default the rounding of
    # float32 inputs may be skipped there: the loss is then that of the unrounded inputs. Either
    # way, the gradient must be that of the loss returned; with emulated casts, the loss is the
    # one eager autocast gives (of the rounded inputs).
    import torch._inductor.config

    hidden, weight, bias, labels = _autocast_problem("cpu", rows=16, features=8, vocab=100)
    options = dict(smoothing=0.1, ignore_index=IGNORE, reduction="sum")
    rounded = _oracle(
        *(_rounded(t, torch.bfloat16) for t in (hidden, weight, bias)), labels, options, 1.0
    )
    exact = _oracle(*(_numpy(t) for t in (hidden, weight, bias)), labels, options, 1.0)

    def loss_of(hidden, weight, bias):
        return lstorch.fused_linear_smoothed_cross_entropy(
            hidden, weight, labels, bias=bias, chunk_size=32, **options
        )

    for emulate in (False, True):
        torch._dynamo.reset()
        inputs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        with torch._inductor.config.patch(emulate_precision_casts=emulate):
            compiled = torch.compile(loss_of)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = compiled(*inputs)
            grads = torch.autograd.grad(loss, inputs)
        if emulate:
            expected, expected_grads = rounded
        else:
            off = [abs(loss.item() - oracle[0]) for oracle in (rounded, exact)]
            expected, expected_grads = (rounded, exact)[int(np.argmin(off))]
        np.testing.assert_allclose(_numpy(loss), expected, rtol=RTOL, atol=ATOL)
        for name, got, want in zip(NAMES[1:], grads, expected_grads, strict=True):
            np.testing.assert_allclose(_numpy(got), want, rtol=RTOL, atol=ATOL, err_msg=name)


# --------------------------------------------------------------------------------------------
# bf16 hidden and weight: the gradients accumulate in float32 and are rounded once
#
# Oracle: the float64 dense route (parity_tests.oracles) on the SAME bf16-rounded inputs.
# Yardstick: the float32 dense route, F.linear then F.cross_entropy with its gradient in
# float32, rounded once to bf16 (what the gradient of a bf16 parameter can at best be). The
# error is the relative Frobenius norm ||got - oracle||_F / ||oracle||_F of d hidden and of
# d weight; the fused loss may be at most twice the yardstick's.
#
# Why this catches bf16 accumulation (an experiment on a copy of the code): keeping the running
# sum of d hidden over the 16 vocabulary chunks in bf16 gave 4.8e-3 against a yardstick of
# 1.66e-3 (2.9x), and d weight summed over 16 blocks of 256 rows in bf16 gave 4.0e-3 (2.4x):
# both fail the smoothing-0.1 case. With smoothing 0 the yardstick itself is 2.3x larger
# (float32's own resolution of 1 - p_y), so that case does not see them; it is the one that
# catches an lse rounded to an ulp of |x| ~ 21 (2e-6) instead of kept as (max, log-sum): 1 - p_y
# is tiny there, and the fused gradient was 15x the yardstick.

PRECISION_ROWS = 4096 if profile() == "ci" else 16384
PRECISION_FEATURES, PRECISION_VOCAB, PRECISION_CHUNK = 64, 1024, 64


def _confident_bf16_problem(rows):
    """bf16 hidden and weight (no bias), labels, and the float64 values of the rounded inputs:
    each row's hidden points along its label's weight row, so its logit is ~21 and every other
    one ~N(0, 2.6): softmax at the label in [0.999, 1 - 1e-5]."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((PRECISION_VOCAB, PRECISION_FEATURES)) / np.sqrt(
        PRECISION_FEATURES
    )
    labels = rng.integers(0, PRECISION_VOCAB, rows)
    rows_of_label = weight[labels]
    hidden = 21.0 * rows_of_label / (rows_of_label**2).sum(1, keepdims=True)
    hidden = torch.tensor(hidden, dtype=torch.float32).bfloat16()
    weight = torch.tensor(weight, dtype=torch.float32).bfloat16()
    return hidden, weight, labels


def _relative_error(got, expected):
    got = np.asarray(got, np.float64)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def _fused_bf16_gradients(framework, hidden, weight, labels, options):
    """(d hidden, d weight) of the fused loss on bf16 inputs, in float64 NumPy."""
    if framework == "torch":
        inputs = [t.clone().requires_grad_(True) for t in (hidden, weight)]
        loss = lstorch.fused_linear_smoothed_cross_entropy(
            *inputs, torch.as_tensor(labels), **options
        )
        grads = torch.autograd.grad(loss, inputs)
        assert all(g.dtype == torch.bfloat16 for g in grads)
        return [_numpy(g) for g in grads]

    def loss(hidden, weight):
        return lsjax.fused_linear_smoothed_cross_entropy(
            hidden, weight, jnp.asarray(labels), **options
        )

    inputs = [jnp.asarray(t.float().numpy(), jnp.bfloat16) for t in (hidden, weight)]
    grads = jax.grad(loss, argnums=(0, 1))(*inputs)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    return [np.asarray(g.astype(jnp.float32), np.float64) for g in grads]


@functools.cache
def _precision_case(smoothing):
    """(hidden, weight, labels, options, the oracle's (d hidden, d weight), the yardstick's
    errors), shared by both frameworks' tests."""
    hidden, weight, labels = _confident_bf16_problem(PRECISION_ROWS)
    options = dict(smoothing=smoothing, reduction="mean", chunk_size=PRECISION_CHUNK)
    hidden64, weight64 = _numpy(hidden), _numpy(weight)
    logits = hidden64 @ weight64.T
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    label_probs = np.exp(log_probs[np.arange(len(labels)), labels])
    assert label_probs.min() >= 0.999 and np.median(label_probs) > 1 - 1e-4  # confident
    _, vjp = oracles.fused_linear_smoothed_cross_entropy(
        hidden64, weight64, labels, wrt=("hidden", "weight"), **options
    )
    expected = vjp(1.0)
    # The yardstick: float32 dense, rounded once to bf16.
    dense = [t.float().requires_grad_(True) for t in (hidden, weight)]
    loss = F.cross_entropy(F.linear(*dense), torch.as_tensor(labels), label_smoothing=smoothing)
    dense_grads = [g.bfloat16() for g in torch.autograd.grad(loss, dense)]
    yardsticks = [
        _relative_error(_numpy(g), exact) for g, exact in zip(dense_grads, expected, strict=True)
    ]
    return hidden, weight, labels, options, expected, yardsticks


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_bf16_gradients_are_as_accurate_as_the_float32_dense_route_rounded_once(
    framework, smoothing
):
    hidden, weight, labels, options, expected, yardsticks = _precision_case(smoothing)
    assert PRECISION_ROWS >= 4096 and PRECISION_VOCAB // PRECISION_CHUNK >= 8  # several chunks
    got = _fused_bf16_gradients(framework, hidden, weight, labels, options)
    for name, value, exact, yardstick in zip(
        ("d hidden", "d weight"), got, expected, yardsticks, strict=True
    ):
        error = _relative_error(value, exact)
        assert error <= 2 * yardstick, (name, error, yardstick)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_tiny_loss_is_exact_at_the_logits_scale(framework):
    rng = np.random.default_rng(7)
    common = rng.normal(size=64)  # every row leans along it: class 0 far above the label, 1
    hidden = (rng.normal(size=(64, 64)) * 0.3 + common).astype(np.float32)
    weight = (rng.normal(size=(2, 64)) * 0.05 + [[0.14], [-0.1]] * common).astype(np.float32)
    labels = np.ones(64, np.int64)
    options = dict(smoothing=1.0, convention="others", reduction="none")
    if framework == "jax":
        value = lsjax.fused_linear_smoothed_cross_entropy(
            jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels), **options
        )
    else:
        value = lstorch.fused_linear_smoothed_cross_entropy(
            torch.tensor(hidden), torch.tensor(weight), torch.tensor(labels), **options
        )
    hidden64, weight64 = hidden.astype(np.float64), weight.astype(np.float64)
    expected, _ = oracles.smoothed_cross_entropy(hidden64 @ weight64.T, labels, **options)
    assert expected.max() < 1e-4  # losses of 2e-6 to 2e-5: the regime of the limit
    scale = (np.abs(hidden64) @ np.abs(weight64.T)).max(-1)  # the logits' rounding scale
    # 4 float32 ulps of that scale: 1.5 (JAX) and 1.1 (torch) measured here, 43% of the smallest
    # loss; the dense loss of the same logits is off by 0.06 of those ulps
    np.testing.assert_array_less(np.abs(np.asarray(value) - expected), 4 * 2.0**-23 * scale)
