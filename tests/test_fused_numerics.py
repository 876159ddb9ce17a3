"""Numerics of the fused linear + label-smoothed cross-entropy that the dense comparisons miss.

* Non-finite hidden states in rows that do not count (ignored, or labelled with the pad of
  ``"others_but_pad"``): NaN, +inf or -inf there reach neither the loss nor any gradient, in
  both frameworks. Oracles: the same call with those rows' hidden replaced by zeros (the claim
  itself: such a row is as if it held zeros, bit for bit), and the float64 dense oracle
  ``parity_tests.oracles.fused_linear_smoothed_cross_entropy`` on that finite input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lsjax
import lstorch
from parity_tests import oracles

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
