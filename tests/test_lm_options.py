"""The language-model options of ``smoothed_cross_entropy`` in both frameworks: ``softcap``,
``logit_scale`` and ``return_stats``.

The registry twin "smoothed_cross_entropy (softcap, logit_scale, return_stats)" runs them against
the float64 oracle on every execution path (tests/test_parity.py, tests/test_paths.py). Here:
what the grid does not pin down. The argmax's tie rule (the first maximal index, as
``torch.argmax``, checked against ``torch.argmax`` and ``np.argmax``), the rows that do not count,
the structure returned with ``return_z_loss``, the token-accuracy recipe of the docstring, that
the statistics carry no gradient, the second derivatives through the transform (against each
framework's own autodiff of ``cap * tanh(scale * x / cap)`` followed by the plain loss), and the
errors for bad values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lsjax
import lstorch
from parity_tests import oracles

K = 11


def _inputs(seed=0, rows=6):
    rng = np.random.default_rng(seed)
    logits = 4.0 * rng.standard_normal((rows, K))
    labels = rng.integers(0, K, rows)
    labels[::2] = np.argmax(logits[::2], axis=-1)  # some rows right, some wrong
    labels[1] = -100
    return logits, labels


def _numpy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().numpy()
    return np.asarray(value)


@pytest.mark.parametrize("options", [dict(softcap=2.0), dict(logit_scale=0.5, softcap=30.0)])
def test_stats_equal_the_oracle_with_return_z_loss(framework, options):
    module, array = framework
    logits, labels = _inputs()
    kwargs = dict(smoothing=0.1, ignore_index=-100, z_loss=1e-2, return_z_loss=True, **options)
    loss, z_part, stats = module.smoothed_cross_entropy(
        array(logits), array(labels), return_stats=True, reduction="mean", **kwargs
    )
    (want_loss, want_z, want_stats), _ = oracles.smoothed_cross_entropy(
        logits, labels, return_stats=True, reduction="mean", **kwargs
    )
    assert isinstance(stats, module.RowStats)
    assert stats._fields == ("lse", "entropy", "correct")
    np.testing.assert_allclose(_numpy(loss), want_loss, rtol=1e-12)
    np.testing.assert_allclose(_numpy(z_part), want_z, rtol=1e-12)
    for got, want in zip(stats, want_stats, strict=True):
        np.testing.assert_allclose(_numpy(got), want, rtol=1e-12, atol=1e-12)
    assert _numpy(stats.correct).dtype == np.bool_
    # The ignored row holds 0, 0, False; both kinds of counted rows are there.
    assert _numpy(stats.lse)[1] == 0 and _numpy(stats.entropy)[1] == 0
    assert not _numpy(stats.correct)[1]
    assert _numpy(stats.correct).any() and not _numpy(stats.correct)[[3, 5]].all()


def test_ties_go_to_the_first_maximal_index_as_torch_argmax(framework):
    module, array = framework
    logits = np.array([[1.0, 5.0, 5.0, 0.0], [1.0, 5.0, 5.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    labels = np.array([1, 2, 0])
    expected = torch.argmax(torch.as_tensor(logits), -1).numpy() == labels
    assert (np.argmax(logits, -1) == labels).tolist() == expected.tolist() == [True, False, True]
    _, stats = module.smoothed_cross_entropy(array(logits), array(labels), return_stats=True)
    assert _numpy(stats.correct).tolist() == expected.tolist()


def test_argmax_is_taken_before_the_transform_so_a_saturated_cap_makes_no_tie(framework):
    # In float32, tanh(10) and tanh(11) are both 1.0: capped, the two logits tie and argmax of
    # the capped logits would be column 0. The transform is increasing, so the argmax of the
    # transformed logits is that of the logits, column 1 (float64 keeps them apart: the oracle).
    module, array = framework
    logits = np.array([[10.0, 11.0, 0.0]], np.float32)
    labels = np.array([1])
    capped = 1.0 * np.tanh(logits.astype(np.float32))
    assert capped[0, 0] == capped[0, 1]
    _, stats = module.smoothed_cross_entropy(
        array(logits), array(labels), softcap=1.0, return_stats=True
    )
    (_, want), _ = oracles.smoothed_cross_entropy(logits, labels, softcap=1.0, return_stats=True)
    assert _numpy(stats.correct).tolist() == want[2].tolist() == [True]


def test_token_accuracy_recipe_of_the_docstring(framework):
    module, array = framework
    logits, labels = _inputs(seed=3, rows=9)
    _, stats = module.smoothed_cross_entropy(
        array(logits),
        array(labels),
        smoothing=0.1,
        ignore_index=-100,
        reduction="mean",
        return_stats=True,
    )
    counted = array(labels) != -100
    accuracy = float(stats.correct.sum() / counted.sum())
    kept = labels != -100
    assert accuracy == pytest.approx(np.mean(np.argmax(logits[kept], -1) == labels[kept]))


def test_the_statistics_carry_no_gradient():
    logits, labels = _inputs()
    labels = np.abs(labels) % K

    def total(x):
        _, stats = lsjax.smoothed_cross_entropy(x, labels, softcap=3.0, return_stats=True)
        return stats.lse.sum() + stats.entropy.sum()

    assert not np.any(np.asarray(jax.grad(total)(jnp.asarray(logits))))
    x = torch.tensor(logits, requires_grad=True)
    _, stats = lstorch.smoothed_cross_entropy(x, torch.tensor(labels), return_stats=True)
    assert not any(value.requires_grad for value in stats)


def _capped(x, tanh):
    return 3.0 * tanh(0.5 * x / 3.0)


def test_second_derivatives_through_the_transform_jax():
    logits, labels = _inputs(rows=3)
    labels = np.where(labels < 0, 0, labels)
    options = dict(smoothing=0.2, convention="others", z_loss=1e-2)

    def ours(x):
        return lsjax.smoothed_cross_entropy(x, labels, softcap=3.0, logit_scale=0.5, **options)

    def explicit(x):
        return lsjax.smoothed_cross_entropy(_capped(x, jnp.tanh), labels, **options)

    x = jnp.asarray(logits)
    np.testing.assert_allclose(
        jax.hessian(lambda x: ours(x).sum())(x),
        jax.hessian(lambda x: explicit(x).sum())(x),
        rtol=1e-10,
        atol=1e-12,
    )
    tangent = jnp.asarray(np.random.default_rng(1).standard_normal(logits.shape))
    np.testing.assert_allclose(
        jax.jvp(ours, (x,), (tangent,))[1], jax.jvp(explicit, (x,), (tangent,))[1], rtol=1e-10
    )


def test_second_derivatives_through_the_transform_torch():
    logits, labels = _inputs(rows=3)
    labels = torch.tensor(np.where(labels < 0, 0, labels))
    options = dict(smoothing=0.2, convention="others", z_loss=1e-2)

    def ours(x):
        return lstorch.smoothed_cross_entropy(x, labels, softcap=3.0, logit_scale=0.5, **options)

    def explicit(x):
        return lstorch.smoothed_cross_entropy(_capped(x, torch.tanh), labels, **options)

    x = torch.tensor(logits)
    torch.testing.assert_close(
        torch.func.hessian(lambda x: ours(x).sum())(x),
        torch.autograd.functional.hessian(lambda x: explicit(x).sum(), x),
        rtol=1e-10,
        atol=1e-12,
    )
    tangent = torch.randn_like(x)
    torch.testing.assert_close(
        torch.func.jvp(ours, (x,), (tangent,))[1],
        torch.func.jvp(explicit, (x,), (tangent,))[1],
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        (dict(softcap=0.0), ValueError, "`softcap` must be None or a finite number > 0; got 0.0"),
        (dict(softcap=-1), ValueError, "`softcap` must be None or a finite number > 0; got -1"),
        (dict(softcap=float("inf")), ValueError, "`softcap` must be None or a finite number"),
        (dict(softcap=float("nan")), ValueError, "`softcap` must be None or a finite number"),
        (dict(softcap="30"), TypeError, "`softcap` must be None or a finite number > 0 (a"),
        (dict(softcap=True), TypeError, "got True (bool)"),
        (dict(logit_scale=0.0), ValueError, "`logit_scale` must be a finite number > 0; got 0.0"),
        (dict(logit_scale=-2.0), ValueError, "`logit_scale` must be a finite number > 0; got -2"),
        (dict(logit_scale=None), TypeError, "`logit_scale` must be a finite number > 0 (a"),
        (dict(softcap=30.0, from_log_probs=True), ValueError, "`softcap` and `logit_scale`"),
        (dict(logit_scale=2.0, from_log_probs=True), ValueError, "from_log_probs=True"),
        (dict(return_stats=1), TypeError, "`return_stats` must be True or False; got 1"),
        (dict(return_stats=True, from_log_probs=True), ValueError, "return_stats=True needs"),
    ],
)
def test_bad_values_are_errors_that_name_the_function_argument_and_value(
    framework, options, error, words
):
    module, array = framework
    logits, labels = _inputs()
    with pytest.raises(error, match=r"^smoothed_cross_entropy: ") as raised:
        module.smoothed_cross_entropy(array(logits), array(np.abs(labels)), **options)
    assert words in str(raised.value)


def test_the_module_checks_and_passes_the_options():
    with pytest.raises(ValueError, match=r"^SmoothedCrossEntropyLoss: `softcap` must be"):
        lstorch.SmoothedCrossEntropyLoss(softcap=0.0)
    logits, labels = _inputs()
    module = lstorch.SmoothedCrossEntropyLoss(softcap=2.0, logit_scale=0.5, return_stats=True)
    loss, stats = module(torch.tensor(logits), torch.tensor(labels))
    (want, want_stats), _ = oracles.smoothed_cross_entropy(
        logits, labels, softcap=2.0, logit_scale=0.5, ignore_index=-100, reduction="mean",
        return_stats=True,
    )  # fmt: skip
    np.testing.assert_allclose(loss.item(), want, rtol=1e-12)
    np.testing.assert_allclose(stats.entropy.numpy(), want_stats[1], rtol=1e-12, atol=1e-12)
    assert "softcap=2.0" in repr(module)
