"""The oracles themselves, and the independent oracles besides the NumPy one.

* The NumPy oracles' gradients agree with central finite differences of their own losses.
* ``lstorch.smoothed_cross_entropy(convention="uniform")`` equals torch's own
  ``F.cross_entropy(label_smoothing=...)`` for every weight / ignore_index / reduction.
* ``lsjax.smoothed_cross_entropy(convention="uniform")`` equals optax's
  ``softmax_cross_entropy(logits, smooth_labels(one_hot, eps))``.
* ``compare`` cannot pass vacuously: a wrong twin, or a twin wrong only in its gradient, fails.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

import lsjax
import lstorch
from parity_tests import compare, oracles
from parity_tests.registry import TWINS
from tests.helpers import finite_difference_vjp


def _oracle_value(oracle, rest, kwargs, x):
    """Every differentiable output of the oracle, flattened into one vector (several outputs:
    fairseq); the per-row statistics of ``return_stats`` (a nested tuple) carry no gradient."""
    output = oracle(x, *rest, **kwargs)[0]
    outputs = output if isinstance(output, tuple) else (output,)
    return np.concatenate([np.ravel(out) for out in outputs if not isinstance(out, tuple)])


# A twin flagged custom_gradient reproduces a peer's gradient RULE (T5X's), which is not the
# derivative of its outputs; tests/test_compat.py checks that rule against finite differences
# where T5X's rule and the derivative coincide.
@pytest.mark.parametrize(
    "twin", [t for t in TWINS if t.oracle and not t.custom_gradient], ids=lambda t: t.name
)
def test_oracle_gradient_matches_finite_differences(twin):
    # Small-K cases (finite differences cost 2 evaluations per element), a spread of them: K <= 3,
    # or the twin's smallest K where it has none that small.
    limit = max(3, min(case.get("num_classes", 3) for case in twin.cases))
    small = [case for case in twin.cases if case.get("num_classes", 3) <= limit][::5][:12]
    assert small
    for index, case in enumerate(small):
        (x, *rest), kwargs = twin.make_inputs(np.random.default_rng(index), dict(case))
        output, vjp = twin.oracle(x, *rest, **kwargs)
        several = isinstance(output, tuple)
        outputs = output if several else (output,)
        rng = np.random.default_rng(99)
        cotangents = [
            tuple(np.zeros(np.shape(field)) for field in out)  # statistics: no gradient
            if isinstance(out, tuple)
            else rng.uniform(0.5, 1.5, size=np.shape(out))
            for out in outputs
        ]
        flat_cotangent = np.concatenate(
            [np.ravel(c) for c in cotangents if not isinstance(c, tuple)]
        )
        expected = finite_difference_vjp(
            functools.partial(_oracle_value, twin.oracle, rest, kwargs), x, flat_cotangent
        )
        np.testing.assert_allclose(
            vjp(cotangents if several else cotangents[0]),
            expected,
            rtol=1e-6,
            atol=1e-7,
            err_msg=str(case),
        )


GRID = list(
    itertools.product([0.0, 0.1, 0.5, 1.0], [False, True], [None, -100, 2], ["none", "sum", "mean"])
)


@pytest.mark.parametrize(("smoothing", "weighted", "ignore_index", "reduction"), GRID)
def test_lstorch_uniform_equals_torch_cross_entropy(smoothing, weighted, ignore_index, reduction):
    rng = np.random.default_rng(0)
    x = torch.tensor(3 * rng.standard_normal((3, 5, 11)), requires_grad=True)  # (N, C, d)
    labels = torch.tensor(rng.integers(0, 5, size=(3, 11)))
    if ignore_index is not None:
        labels[0, :4] = ignore_index
    weight = torch.tensor(rng.uniform(0.5, 2, 5)) if weighted else None
    ours = lstorch.smoothed_cross_entropy(
        x,
        labels,
        smoothing=smoothing,
        weight=weight,
        axis=1,
        reduction=reduction,
        ignore_index=ignore_index,
    )
    theirs = F.cross_entropy(
        x,
        labels,
        weight=weight,
        reduction=reduction,
        label_smoothing=smoothing,
        ignore_index=-100 if ignore_index is None else ignore_index,
    )
    cotangent = torch.tensor(rng.uniform(0.5, 1.5, size=ours.shape))
    (ours_grad,) = torch.autograd.grad(ours, x, cotangent)
    (theirs_grad,) = torch.autograd.grad(theirs, x, cotangent)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("num_classes", [2, 3, 1000])
def test_lsjax_uniform_equals_optax(smoothing, num_classes):
    rng = np.random.default_rng(num_classes)
    logits = jnp.asarray(3 * rng.standard_normal((9, num_classes)))
    labels = jnp.asarray(rng.integers(0, num_classes, size=9))

    def optax_loss(x):
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=x.dtype), smoothing)
        return optax.softmax_cross_entropy(x, targets)

    def our_loss(x):
        return lsjax.smoothed_cross_entropy(x, labels, smoothing=smoothing)

    cotangent = jnp.asarray(rng.uniform(0.5, 1.5, size=9))
    ours, our_vjp = jax.vjp(our_loss, logits)
    theirs, their_vjp = jax.vjp(optax_loss, logits)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        our_vjp(cotangent)[0], their_vjp(cotangent)[0], rtol=1e-10, atol=1e-12
    )


def _inputs(rng, case):
    return (rng.standard_normal((5, 4)), rng.integers(0, 4, size=5)), {"smoothing": 0.2}


def test_compare_fails_on_a_wrong_twin():
    report = compare(
        lambda x, y, smoothing: lsjax.smoothed_cross_entropy(x, y, smoothing=smoothing),
        lambda x, y, smoothing: lstorch.smoothed_cross_entropy(
            x, y, smoothing=smoothing, convention="others"
        ),
        _inputs,
        dtypes=("float64",),
    )
    assert not report.passed
    assert report.results[0].loss_diff > 1e-3


def test_compare_fails_when_only_the_gradient_differs():
    def torch_side(x, y, smoothing):
        loss = lstorch.smoothed_cross_entropy(x, y, smoothing=smoothing)
        wrong = lstorch.smoothed_cross_entropy(x, y, smoothing=0.9)
        return loss.detach() + wrong - wrong.detach()  # same value, another gradient

    report = compare(
        lambda x, y, smoothing: lsjax.smoothed_cross_entropy(x, y, smoothing=smoothing),
        torch_side,
        _inputs,
        dtypes=("float64",),
    )
    assert not report.passed
    assert report.results[0].loss_diff < 1e-12 and report.results[0].grad_diff > 1e-3


def test_compare_passes_a_true_twin_and_reports_per_dtype():
    report = compare(
        lambda x, y, smoothing: lsjax.smoothed_cross_entropy(x, y, smoothing=smoothing),
        lambda x, y, smoothing: lstorch.smoothed_cross_entropy(x, y, smoothing=smoothing),
        _inputs,
        cases=[{}, {}],
    )
    assert report.passed
    assert [row["dtype"] for row in report.summary()] == ["float64", "float32", "bfloat16"]
    assert all(row["cases"] == 2 for row in report.summary())


def test_oracle_reproduces_opennmt_kl_value_for_a_real_pad_column():
    # OpenNMT's loss with pad column 0, written out by hand for one row: V=4, eps=0.3,
    # target 2: q = [0, 0.15, 0.7, 0.15]; loss = sum q (log q - output).
    output = np.log(np.array([[0.1, 0.2, 0.3, 0.4]]))
    q = np.array([0.0, 0.15, 0.7, 0.15])
    expected = np.sum(q[1:] * (np.log(q[1:]) - output[0, 1:]))
    value, _ = oracles.opennmt_kl_label_smoothing_loss(
        output, np.array([2]), label_smoothing=0.3, tgt_vocab_size=4, ignore_index=0
    )
    assert value == pytest.approx(expected, rel=1e-12)


OPTION_DERIVATIVE_CASES = [
    dict(convention="uniform", reduction="none"),
    dict(convention="others", weight=True, ignore_index=-100, reduction="mean"),
    dict(convention="others_but_pad", pad_index=1, kl=True, reduction="sum"),
    dict(convention="uniform", class_mask=True, kl=True, z_loss=0.05, reduction="mean"),
    dict(convention="others", from_log_probs=True, kl=True, reduction="sum"),
]


@pytest.mark.parametrize("case", OPTION_DERIVATIVE_CASES, ids=str)
def test_oracle_option_derivatives_match_finite_differences(case):
    rng = np.random.default_rng(7)
    options = dict(case)
    logits = 3 * rng.standard_normal((9, 6))
    labels = rng.choice([0, 2, 3, 5], size=9)  # class 4 may be masked, 1 may be the pad
    labels[::4] = -100 if options.get("ignore_index") else labels[::4]
    if options.pop("weight", False):
        options["weight"] = np.linspace(0.5, 2.0, 6)
    if options.pop("class_mask", False):
        options["class_mask"] = np.arange(6) != 4
    if options.pop("from_log_probs", False):
        logits = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        options["from_log_probs"] = True
    cotangent = rng.uniform(0.5, 1.5, size=9) if options["reduction"] == "none" else 1.0
    step = 1e-5

    def value(smoothing, z_loss):
        extra = {"z_loss": z_loss} if "z_loss" in options else {}
        loss = oracles.smoothed_cross_entropy(
            logits, labels, **{**options, **extra, "smoothing": smoothing}
        )[0]
        return np.sum(cotangent * loss)

    for smoothing in (0.1, 0.5, 0.9):
        d_eps, d_z = oracles.smoothed_cross_entropy_option_derivatives(
            logits, labels, **{**options, "smoothing": smoothing}
        )
        z_loss = options.get("z_loss", 0.0)
        expected_eps = (value(smoothing + step, z_loss) - value(smoothing - step, z_loss)) / step
        np.testing.assert_allclose(np.sum(cotangent * d_eps), expected_eps / 2, rtol=1e-7)
        if "z_loss" in options:
            expected_z = (value(smoothing, z_loss + step) - value(smoothing, z_loss - step)) / step
            np.testing.assert_allclose(np.sum(cotangent * d_z), expected_z / 2, rtol=1e-7)
