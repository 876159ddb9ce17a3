"""``parity_tests.compare``, the tool a user runs on their own port: its verdict per dtype
(parity in float64 and float32, accuracy against the float64 reference in low precision), and
outputs given as pytrees, with structure and shape mismatches explained in words.

The pair under test throughout is a correct one from outside this project: optax's label
smoothing route, ``softmax_cross_entropy(x, smooth_labels(one_hot(y), eps))``, against
PyTorch's own ``F.cross_entropy(x, y, label_smoothing=eps, reduction="none")``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from parity_tests import compare, rounding_budget
from parity_tests.compare import UNIT_ROUNDOFF, describe_mismatch, round_to

NUM_CLASSES = 11
SMOOTHINGS = [{"smoothing": 0.1}, {"smoothing": 0.3}]


def make_inputs(rng, case):
    logits = 3.0 * rng.standard_normal((9, NUM_CLASSES))
    labels = rng.integers(0, NUM_CLASSES, size=9)
    return (logits, labels), {"smoothing": case["smoothing"]}


def optax_route(x, y, smoothing):
    targets = optax.smooth_labels(jax.nn.one_hot(y, NUM_CLASSES), smoothing)
    return optax.softmax_cross_entropy(x, targets)


def torch_cross_entropy(x, y, smoothing):
    return F.cross_entropy(x, y, label_smoothing=smoothing, reduction="none")


# --------------------------------------------------------------------------------------------
# The verdict


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
def test_a_correct_pair_passes_in_every_dtype(dtype):
    # In bf16 optax rounds its log-softmax in bf16: its gradient is ~0.015 off the float64
    # value, far above the former atol of 2**-9 against torch's float32 result, well within the
    # rounding budget.
    report = compare(
        optax_route, torch_cross_entropy, make_inputs, cases=SMOOTHINGS, dtypes=(dtype,)
    )
    assert report.passed, str(report)
    for result in report.results:
        assert 0 <= result.used <= 1
        assert set(result.accuracy) == {"jax", "torch"}


def test_low_precision_reports_parity_apart_from_accuracy():
    report = compare(
        optax_route, torch_cross_entropy, make_inputs, cases=SMOOTHINGS, dtypes=("bfloat16",)
    )
    (row,) = report.summary()
    # Each side is judged against the float64 reference; the two sides differ from each other
    # by about the sum of their errors, which is reported and not judged.
    assert row["passed"]
    assert row["max_grad_diff"] > 2.0**-9  # the former verdict failed on this
    for side in ("jax", "torch"):
        assert 0 < row[f"{side}_loss_error"] < 0.1 and 0 < row[f"{side}_grad_error"] < 0.1
    assert "parity" in str(report) and "accuracy" in str(report)


def smoothing_off(x, y, smoothing):
    return optax_route(x, y, smoothing + 1e-3)


def value_off(x, y, smoothing):
    value = optax_route(x, y, smoothing)
    frozen = jax.lax.stop_gradient(value)
    return 1.001 * frozen + (value - frozen)  # the value x 1.001, the same gradient


def gradient_off(x, y, smoothing):
    value = optax_route(x, y, smoothing)
    frozen = jax.lax.stop_gradient(value)
    return frozen + 1.001 * (value - frozen)  # the same value, the gradient x 1.001


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("wrong", "where"),  # where: the part that is off (smoothing moves both)
    [(smoothing_off, None), (value_off, "output"), (gradient_off, "gradient")],
    ids=["smoothing+1e-3", "value*1.001", "gradient*1.001"],
)
def test_a_wrong_pair_fails_in_float32_and_float64(wrong, where, dtype):
    report = compare(wrong, torch_cross_entropy, make_inputs, cases=SMOOTHINGS, dtypes=(dtype,))
    assert not report.passed
    for result in report.results:
        assert not result.passed and result.used > 1
        if where is not None:
            assert result.error.startswith(where), result.error
        # Accuracy tells which side is off: torch is within float32 rounding of the reference.
        jax_error, torch_error = result.accuracy["jax"], result.accuracy["torch"]
        assert max(jax_error) > 1e-4 and max(torch_error) < 1e-5, result.accuracy


def test_the_low_precision_verdict_is_the_documented_budget():
    """A side whose outputs are the exact value plus 0.9 (1.1) times ``rounding_budget`` passes
    (fails), with ``used`` ~0.9 (1.1)."""
    u = UNIT_ROUNDOFF["bfloat16"]

    def off_by(fraction):
        # bfloat16 rows run the JAX side with x64 off, as users run it: the "exact" value is
        # float32's, within ~1e-7 of it relative, so ``used`` is the fraction to ~1e-5.
        def loss(x, y, smoothing):
            exact = optax_route(x.astype(jnp.float32), y, smoothing)
            scale = 1.0 + jnp.max(jnp.abs(x.astype(jnp.float32)))
            return exact + jax.lax.stop_gradient(fraction * 4 * u * (jnp.abs(exact) + scale))

        return loss

    for fraction, passes in ((0.9, True), (1.1, False)):
        report = compare(
            off_by(fraction),
            torch_cross_entropy,
            make_inputs,
            cases=SMOOTHINGS,
            dtypes=("bfloat16",),
        )
        assert report.passed is passes, str(report)
        for result in report.results:
            assert result.used == pytest.approx(fraction, rel=1e-4)  # float32's "exact" (above)
            assert ("rounding budget" in result.error) is not passes


def test_rounding_budget_follows_its_formula():
    reference = np.array([0.0, -2.0, 5.0, np.nan])
    u = UNIT_ROUNDOFF["bfloat16"]
    np.testing.assert_array_equal(
        rounding_budget(reference, "bfloat16", 3.0), 4 * u * (np.array([0, 2, 5, 0]) + 3.0)
    )
    np.testing.assert_array_equal(
        rounding_budget(reference, "bfloat16", 3.0, gradient=True),
        4 * u * (np.array([0, 2, 5, 0]) + 3.0 * 5.0),
    )
    with pytest.raises(ValueError, match=r"rounding_budget: `dtype` must be one of .*'int8'"):
        rounding_budget(reference, "int8", 3.0)


def test_a_widening_tolerance_lets_a_coarser_side_pass():
    u = UNIT_ROUNDOFF["bfloat16"]

    def loss(x, y, smoothing):  # float32: the widest dtype a bfloat16 row's JAX side has
        exact = optax_route(x.astype(jnp.float32), y, smoothing)
        return exact + jax.lax.stop_gradient(8 * u * (jnp.abs(exact) + 20.0))

    assert not compare(
        loss, torch_cross_entropy, make_inputs, dtypes=("bfloat16",), cases=SMOOTHINGS
    ).passed
    widened = compare(
        loss,
        torch_cross_entropy,
        make_inputs,
        dtypes=("bfloat16",),
        cases=SMOOTHINGS,
        tolerances={"bfloat16": (0.1, 1.0)},
    )
    assert widened.passed, str(widened)


def test_the_reference_side_can_be_jax():
    report = compare(
        optax_route,
        torch_cross_entropy,
        make_inputs,
        cases=SMOOTHINGS,
        dtypes=("float64", "bfloat16"),
        reference="jax",
    )
    assert report.passed, str(report)
    float64 = [result for result in report.results if result.dtype == "float64"]
    assert all(result.accuracy["jax"] == (0.0, 0.0) for result in float64)
    expected = r"compare: `reference` must be 'torch' or 'jax'; got 'np'"
    with pytest.raises(ValueError, match=expected):
        compare(optax_route, torch_cross_entropy, make_inputs, reference="np")


def test_a_crash_names_the_side_and_dtype():
    def broken(x, y, smoothing):
        raise RuntimeError("no bf16 kernel")

    report = compare(optax_route, broken, make_inputs, cases=SMOOTHINGS[:1], dtypes=("float32",))
    assert not report.passed
    assert report.results[0].error.startswith("the float64 reference (torch_fn in float64")
    assert "RuntimeError: no bf16 kernel" in report.results[0].error

    def broken_in_bf16(x, y, smoothing):
        if x.dtype == jnp.bfloat16:
            raise RuntimeError("no bf16 kernel")
        return optax_route(x, y, smoothing)

    report = compare(broken_in_bf16, torch_cross_entropy, make_inputs, cases=SMOOTHINGS[:1])
    errors = {result.dtype: result.error for result in report.results}
    assert errors["float64"] == errors["float32"] == ""
    assert errors["bfloat16"] == "jax_fn in bfloat16: RuntimeError: no bf16 kernel"


def test_round_to_gives_the_values_the_dtype_holds():
    values = np.array([0.1, 1.0 + 2.0**-10, 3.0])
    np.testing.assert_array_equal(round_to(values, "float32"), values.astype(np.float32))
    np.testing.assert_array_equal(round_to(values, "bfloat16"), [0.10009765625, 1.0, 3.0])
    np.testing.assert_array_equal(round_to(values, "float16"), values.astype(np.float16))
    np.testing.assert_array_equal(round_to(values, "float64"), values)


# --------------------------------------------------------------------------------------------
# Outputs as pytrees


class Rows(NamedTuple):
    loss: Any
    lse: Any


def jax_named(x, y, smoothing):
    return Rows(optax_route(x, y, smoothing), jax.nn.logsumexp(x, axis=-1))


def torch_named(x, y, smoothing):
    return Rows(torch_cross_entropy(x, y, smoothing), torch.logsumexp(x, dim=-1))


def jax_dict(x, y, smoothing):
    counted = jnp.sum(y >= 0)  # an integer leaf: pulled back with a float0 zero
    return {"loss": optax_route(x, y, smoothing), "lse": jax.nn.logsumexp(x, -1), "n": counted}


def torch_dict(x, y, smoothing):
    loss = torch_cross_entropy(x, y, smoothing)
    return {"n": (y >= 0).sum(), "lse": torch.logsumexp(x, -1), "loss": loss}


@pytest.mark.parametrize(
    ("jax_fn", "torch_fn"),
    [
        (jax_named, torch_named),
        (jax_dict, torch_dict),
        (jax_named, lambda *a, **k: list(torch_named(*a, **k))),  # sequences match by position
        (
            lambda *a, **k: {"rows": jax_named(*a, **k)},
            lambda *a, **k: {"rows": tuple(torch_named(*a, **k))},
        ),
    ],
    ids=["NamedTuple", "dict", "NamedTuple vs list", "nested"],
)
def test_pytree_outputs_are_compared_leaf_by_leaf(jax_fn, torch_fn):
    report = compare(jax_fn, torch_fn, make_inputs, cases=SMOOTHINGS)
    assert report.passed, str(report)
    assert len(report.results) == 6


@pytest.mark.parametrize(
    ("jax_fn", "torch_fn", "message"),
    [
        (
            lambda *a, **k: (*jax_named(*a, **k), jnp.zeros(9)),
            torch_named,
            "torch returns 2 outputs, jax 3",
        ),
        (
            jax_named,
            lambda *a, **k: Rows(torch_cross_entropy(*a, **k), torch.logsumexp(a[0], -1)[:, None]),
            "torch output 1 has shape (9, 1), jax (9,)",
        ),
        (
            lambda *a, **k: (
                {key: v for key, v in jax_dict(*a, **k).items() if key != "n"} | {"aux": a[0]}
            ),
            torch_dict,
            "dict keys differ: only torch has ['n'], only jax has ['aux']",
        ),
        (
            jax_named,
            torch_dict,
            "torch returns a dict with keys ['loss', 'lse', 'n'], jax a NamedTuple Rows of 2",
        ),
        (
            lambda *a, **k: {"rows": jax_named(*a, **k)},
            lambda *a, **k: {"rows": torch_cross_entropy(*a, **k)},
            "torch output 'rows' is an array of shape (9,), jax a NamedTuple Rows of 2",
        ),
    ],
    ids=["count", "shape", "dict keys", "kind", "nested kind"],
)
def test_a_structure_mismatch_is_explained(jax_fn, torch_fn, message):
    report = compare(jax_fn, torch_fn, make_inputs, cases=SMOOTHINGS[:1])
    assert not report.passed
    assert [result.error for result in report.results] == [message] * 3
    assert message in str(report)


def test_describe_mismatch_names_nested_leaves():
    left = {"a": (np.zeros(3), np.zeros((2, 2)))}
    right = {"a": [np.zeros(3), np.zeros(4)]}
    assert describe_mismatch(left, right) == "torch output ['a'][1] has shape (2, 2), jax (4,)"
    assert describe_mismatch(left, left) == ""
    assert describe_mismatch(np.zeros(2), (np.zeros(2),), ("oracle", "jax")) == (
        "oracle returns an array of shape (2,), jax a tuple of 1"
    )


def test_a_float32_port_that_needs_x64_fails_as_users_run_it():
    """A port that only works with ``jax_enable_x64`` on (a constant without a dtype promotes
    it to float64 there) computes in float32 in the float32 row, as users run JAX: the shift
    below rounds the logits to float32's step at 2**14 (2**-9), and the report says so; in
    float64 its step (2**-38) is within the tolerance."""

    def port(x, y, smoothing):
        shift = 2.0**14 * jnp.ones(())  # float64 under x64, float32 otherwise
        shifted = (x + shift) - shift
        return optax_route(shifted, y, smoothing)

    assert compare(port, torch_cross_entropy, make_inputs, cases=SMOOTHINGS).results[0].passed
    float32 = compare(port, torch_cross_entropy, make_inputs, cases=SMOOTHINGS, dtypes=("float32",))
    assert not float32.passed, str(float32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dtypes="float32"), r"`dtypes` must be a sequence of dtype names.*got the string"),
        (dict(rtol=-1e-5), r"`rtol` must be a finite number >= 0; got -1e-05"),
        (dict(atol=float("nan")), r"`atol` must be a finite number >= 0; got nan"),
        (dict(tolerances={"bf16": (0.1, 1.0)}), r"`tolerances` keys must be among .*got 'bf16'"),
        (dict(tolerances={"bfloat16": 0.1}), r"`tolerances\['bfloat16'\]` must be a pair"),
        (dict(tolerances={"float32": (0.1, -1)}), r"`tolerances\['float32'\]` must be a finite"),
    ],
)
def test_bad_arguments_are_errors_not_a_quietly_different_check(kwargs, message):
    """A misspelt dtype key or a negative tolerance would be ignored or make every element
    fail (or none pass) for a reason that is not the functions': each is an error."""
    with pytest.raises(ValueError, match=r"compare: " + message):
        compare(optax_route, torch_cross_entropy, make_inputs, cases=SMOOTHINGS, **kwargs)
