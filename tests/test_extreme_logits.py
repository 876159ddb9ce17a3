"""Logits near the float32 maximum, and logits offset by a large constant.

* ``[[3e38, 3e38, 0]]`` (label 0, smoothing 0.1) has a finite loss, 1.0e37, which
  ``F.cross_entropy`` returns; a sum of the logits themselves overflows to ``inf`` (the loss
  came out ``-inf`` in lsjax and NaN in lstorch). The support sum is taken relative to the row's
  max and scaled by a power of two (``lsspec.sum_scale``), so every term and the sum are finite.
* The gradient's softmax is ``exp((x - max) - log_sum)``: at ``3e38`` a float32 lse cannot hold
  ``log 2``, and ``exp(x - lse)`` gave ``[1, 1, 0]`` instead of ``[0.5, 0.5, 0]``. Logits offset
  by 1e5 lost 1e-3 (relative) of the loss and 4e-4 of the gradient the same way.
* Logits all below -88 (offset by -1e5): the Triton kernel's online rescale, starting from a
  shift of 0, must not compute ``0 * exp(+1e5)`` (NaN).
* The mean of rows near the float32 maximum: their sum overflows, their mean does not; the
  reduction scales each row by a power of two before adding (``lsspec.sum_scale``).
* A confident wrong label at smoothing 1 (``"others"``): the loss is the other classes' term
  alone, ~1e-4 in float32 log-probabilities, while the label's term is ~16. Summed over every
  class and subtracted after, the label's term left float32's rounding of 16 in the result
  (1% of it). The support's sum leaves the label out as it reads the logits.

Oracles: torch's own ``F.cross_entropy`` (loss and gradient) for ``"uniform"``, and the float64
NumPy formula of ``parity_tests.oracles`` for every convention, on the same float32 inputs. Both
frameworks, on every path a call can take here: eager, ``jax.jit``, lstorch's Triton kernels (in
Triton's interpreter on a CPU) and lsjax's Pallas kernels (in Pallas's interpret mode). The
registry's ``extreme`` cases run these inputs through every execution path as well
(``parity_tests/paths.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lsjax
import lstorch
from parity_tests import oracles

SMOOTHING = 0.1
RNG = np.random.default_rng(20261130)
INPUTS = {
    "issue_example": np.array([[3e38, 3e38, 0.0]], np.float32),
    "near_max_k1000": RNG.uniform(0.0, 3e38, (4, 1000)).astype(np.float32),
    "offset_1e5": (1e5 + RNG.normal(size=(4, 50))).astype(np.float32),
    # every logit below -88 (exp underflows): an online softmax must not rescale by exp(+100)
    "offset_minus_1e5": (-1e5 + RNG.normal(size=(4, 50))).astype(np.float32),
}
CONVENTIONS = {"uniform": {}, "others": {}, "others_but_pad": {"pad_index": 1}}


def _labels(logits):
    # others_but_pad's pad is 1: labels avoid it so that every row counts
    return (np.arange(len(logits)) * 2) % logits.shape[-1]


def _oracle(logits, labels, convention, extra):
    """The float64 loss per row and d sum(loss) / d logits, on the same float32 inputs."""
    value, vjp = oracles.smoothed_cross_entropy(
        logits.astype(np.float64), labels, smoothing=SMOOTHING, convention=convention, **extra
    )
    return value, vjp(np.ones_like(value))


def _torch_loss_and_grad(logits, labels, convention, extra):
    """``extra`` may also override the smoothing."""
    x = torch.tensor(logits, requires_grad=True)
    options = dict(smoothing=SMOOTHING, convention=convention) | extra
    loss = lstorch.smoothed_cross_entropy(x, torch.tensor(labels), **options)
    loss.sum().backward()
    return loss.detach().numpy(), x.grad.numpy()


def _jax_loss_and_grad(logits, labels, convention, extra):
    """``extra`` may also override the smoothing."""
    options = dict(smoothing=SMOOTHING, convention=convention) | extra

    def loss(x):
        return lsjax.smoothed_cross_entropy(x, jnp.asarray(labels), **options)

    value, grad = jax.jit(lambda x: (loss(x), jax.grad(lambda x: loss(x).sum())(x)))(
        jnp.asarray(logits)
    )
    return np.asarray(value), np.asarray(grad)


def _paths():
    paths = [("torch: eager", _torch_loss_and_grad, {}), ("jax: jit", _jax_loss_and_grad, {})]
    paths.append(("torch: triton", _torch_loss_and_grad, {"LSTORCH_TRITON": "all"}))
    paths.append(("jax: pallas", _jax_loss_and_grad, {"LSJAX_IMPLEMENTATION": "pallas"}))
    return paths


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p[0])
@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("name", list(INPUTS))
def test_loss_and_gradient_are_the_exact_ones(name, convention, path, monkeypatch):
    _, run, env = path
    for key, value in env.items():
        if key == "LSTORCH_TRITON" and not torch.cuda.is_available():
            pytest.importorskip("triton")
        monkeypatch.setenv(key, value)
    logits = INPUTS[name]
    labels = _labels(logits)
    extra = CONVENTIONS[convention]
    value, grad = run(logits, labels, convention, extra)
    expected, expected_grad = _oracle(logits, labels, convention, extra)
    assert np.all(np.isfinite(value)), value
    # float32 rounding of a ~1e37 value and of the inputs' 1e5 offset: a few ulps, relative
    np.testing.assert_allclose(value, expected, rtol=2e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=2e-6)


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p[0])
def test_the_mean_of_rows_near_the_maximum_is_finite(path, monkeypatch):
    _, run, env = path
    for key, value in env.items():
        if key == "LSTORCH_TRITON" and not torch.cuda.is_available():
            pytest.importorskip("triton")
        monkeypatch.setenv(key, value)
    logits = INPUTS["near_max_k1000"]
    labels = _labels(logits)
    rows, _ = _oracle(logits, labels, "uniform", {})
    if run is _jax_loss_and_grad:
        value = lsjax.smoothed_cross_entropy(
            jnp.asarray(logits), jnp.asarray(labels), smoothing=SMOOTHING, reduction="mean"
        )
    else:
        value = lstorch.smoothed_cross_entropy(
            torch.tensor(logits), torch.tensor(labels), smoothing=SMOOTHING, reduction="mean"
        )
    assert np.sum(rows.astype(np.float32)) == np.inf  # the float32 sum overflows
    np.testing.assert_allclose(np.asarray(value), rows.mean(), rtol=2e-6)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_the_example_matches_torch_cross_entropy(framework):
    logits = INPUTS["issue_example"]
    labels = np.array([0])
    reference = torch.tensor(logits, requires_grad=True)
    expected = F.cross_entropy(
        reference, torch.tensor(labels), label_smoothing=SMOOTHING, reduction="none"
    )
    expected.sum().backward()
    run = _torch_loss_and_grad if framework == "torch" else _jax_loss_and_grad
    value, grad = run(logits, labels, "uniform", {})
    np.testing.assert_allclose(value, expected.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(grad, reference.grad.numpy(), rtol=0, atol=1e-6)


# Log-probabilities of a confident wrong label (label 1): the other classes' log-probabilities
# are ~-1e-4 (and -30 for others_but_pad's pad, column 2).
CONFIDENT_WRONG = {
    "others": (np.log(np.array([[1.0, 1.1e-4], [1.0, 1.4e-4]]) / [[1.00011], [1.00014]]), {}),
    "others_but_pad": (
        np.log(np.array([[1.0, 1.1e-4, 1e-13], [1.0, 1.4e-4, 1e-13]]) / [[1.00011], [1.00014]]),
        {"pad_index": 2},
    ),
}


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p[0])
@pytest.mark.parametrize("convention", list(CONFIDENT_WRONG))
def test_a_confident_wrong_label_at_smoothing_1_keeps_the_small_loss_exact(
    convention, path, monkeypatch
):
    # Log-probabilities never take the kernels: those two paths check the cores they fall back to
    name, _, env = path
    for key, value in env.items():
        if key == "LSTORCH_TRITON" and not torch.cuda.is_available():
            pytest.importorskip("triton")
        monkeypatch.setenv(key, value)
    log_probs, extra = CONFIDENT_WRONG[convention]
    log_probs = log_probs.astype(np.float32)
    labels = np.array([1, 1])
    weight = np.array([0.7, 1.9, 1.3][: log_probs.shape[-1]], np.float32)
    options = dict(smoothing=1.0, convention=convention, from_log_probs=True, **extra)
    if name.startswith("jax"):
        value = jax.jit(
            lambda x: lsjax.smoothed_cross_entropy(
                x, jnp.asarray(labels), weight=jnp.asarray(weight), **options
            )
        )(jnp.asarray(log_probs))
    else:
        value = lstorch.smoothed_cross_entropy(
            torch.tensor(log_probs), torch.tensor(labels), weight=torch.tensor(weight), **options
        )
    expected, _ = oracles.smoothed_cross_entropy(
        log_probs.astype(np.float64), labels, weight=weight.astype(np.float64), **options
    )
    assert np.all(expected > 5e-5) and np.all(expected < 2e-4)  # the other class's term alone
    # a few float32 roundings of a ~1e-4 value (the label's term summed and subtracted: 1e-2)
    np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-6)


# A label whose logit (or log-probability) is -inf: -log p_y = inf wherever the target weighs the
# label (as in F.cross_entropy), and at smoothing 1 in "others" it does not: the loss is the other
# classes' finite term. Either way the gradient is finite: softmax(x) sum(t) - t, 0 at the label
# at smoothing 1.
NEG_INF_LABEL = np.array([[2.0, -np.inf, 0.5, -1.0], [1.0, 0.0, -np.inf, 3.0]], np.float32)
NEG_INF_LABEL_CONVENTIONS = {"uniform": {}, "others": {}, "others_but_pad": {"pad_index": 3}}


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p[0])
@pytest.mark.parametrize("convention", list(NEG_INF_LABEL_CONVENTIONS))
@pytest.mark.parametrize("from_log_probs", [False, True], ids=["logits", "log_probs"])
def test_a_label_logit_of_minus_inf_gives_inf_or_the_other_classes_finite_loss(
    from_log_probs, convention, path, monkeypatch
):
    _, run, env = path
    for key, value in env.items():
        if key == "LSTORCH_TRITON" and not torch.cuda.is_available():
            pytest.importorskip("triton")
        monkeypatch.setenv(key, value)
    inputs = NEG_INF_LABEL
    if from_log_probs:
        inputs = inputs - np.log(np.exp(inputs.astype(np.float64)).sum(-1, keepdims=True))
        inputs = inputs.astype(np.float32)
    labels = np.array([1, 2])
    extra = NEG_INF_LABEL_CONVENTIONS[convention]
    for smoothing in (0.1, 1.0):
        options = dict(smoothing=smoothing, from_log_probs=from_log_probs, **extra)
        value, grad = run(inputs, labels, convention, options)
        expected, vjp = oracles.smoothed_cross_entropy(
            inputs.astype(np.float64), labels, convention=convention, **options
        )
        at_label = smoothing == 1.0 and convention != "uniform"
        assert np.all(np.isfinite(expected) == at_label), (smoothing, expected)
        # inf where the oracle is inf, else float32 rounding of an O(1) loss
        np.testing.assert_allclose(value, expected, rtol=1e-6)
        assert np.all(np.isfinite(grad)), grad
        np.testing.assert_allclose(grad, vjp(np.ones(2)), rtol=0, atol=1e-6)
