"""The new core capabilities and the peers' twins, beyond the registry's parity rows.

Expected values come from an oracle that is not the code under test: optax, torch's own
functions, finite differences, or the float64 NumPy oracles of ``parity_tests.oracles``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

import lsjax
import lsjax.compat
import lstorch
import lstorch.compat
from parity_tests import oracles
from tests.helpers import FRAMEWORKS, finite_difference_vjp


def _value_and_grad(module, array, fn, x, *args, **kwargs):
    """Loss (summed when it is not a scalar) and its gradient, as float64 NumPy."""
    if module is lsjax:
        value, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, *args, **kwargs)))(array(x))
        return np.asarray(value), np.asarray(grad)
    x = torch.tensor(x, requires_grad=True)
    value = fn(x, *args, **kwargs).sum()
    (grad,) = torch.autograd.grad(value, x)
    return value.detach().numpy(), grad.numpy()


# --------------------------------------------------------------------------------------------
# class_mask


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("use_where", [False, True])
def test_class_mask_equals_optax_smooth_labels_where(smoothing, use_where):
    rng = np.random.default_rng(3)
    logits = jnp.asarray(3 * rng.standard_normal((9, 11)))
    allowed = np.arange(11) % 4 != 1
    labels = jnp.asarray(rng.choice(np.flatnonzero(allowed), size=9))
    where = jnp.asarray(rng.random(9) < 0.7) if use_where else None
    mask = jnp.broadcast_to(jnp.asarray(allowed), logits.shape)

    def optax_loss(x):
        targets = optax.smooth_labels(
            jax.nn.one_hot(labels, 11, dtype=x.dtype), smoothing, where=mask
        )
        rows = optax.softmax_cross_entropy(x, targets, where=mask)
        return rows if where is None else jnp.where(where, rows, 0.0)

    def our_loss(x):
        return lsjax.smoothed_cross_entropy(
            x, labels, smoothing=smoothing, class_mask=jnp.asarray(allowed), where=where
        )

    cotangent = jnp.asarray(rng.uniform(0.5, 1.5, size=9))
    ours, our_vjp = jax.vjp(our_loss, logits)
    theirs, their_vjp = jax.vjp(optax_loss, logits)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        our_vjp(cotangent)[0], their_vjp(cotangent)[0], rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_where_false_rows_leave_the_loss_and_the_means_count(framework, weighted, reduction):
    """``where=False`` rows count for nothing, in the mean's denominator too. Oracle: torch's
    ``F.cross_entropy`` on the rows that count (where True and not ignored). The registry's
    pairwise cover need not hold where x "mean" x unweighted in one case: a mean that kept the
    where-False rows in its count, without class weights only, passed it."""
    module, array = framework
    rng = np.random.default_rng(11)
    logits = 3 * rng.standard_normal((12, 7))
    labels = rng.integers(0, 7, size=12)
    labels[[2, 9]] = -100
    where = rng.random(12) < 0.6
    weight = rng.uniform(0.5, 2.0, size=7) if weighted else None
    counted = where & (labels != -100)
    x = torch.tensor(logits[counted], requires_grad=True)
    expected = F.cross_entropy(
        x, torch.tensor(labels[counted]), label_smoothing=0.1, reduction=reduction,
        weight=None if weight is None else torch.tensor(weight),
    )  # fmt: skip
    (expected_grad,) = torch.autograd.grad(expected, x)
    options = dict(smoothing=0.1, ignore_index=-100, reduction=reduction, where=array(where))
    if weighted:
        options["weight"] = array(weight)
    if module is lsjax:
        loss, grad = jax.value_and_grad(
            lambda z: lsjax.smoothed_cross_entropy(z, array(labels), **options)
        )(array(logits))
    else:
        z = array(logits).requires_grad_()
        loss = lstorch.smoothed_cross_entropy(z, array(labels), **options)
        (grad,) = torch.autograd.grad(loss, z)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad)[counted], expected_grad.numpy(), rtol=1e-10,
                               atol=1e-14)  # fmt: skip
    assert (np.asarray(grad)[~counted] == 0).all()


@pytest.mark.parametrize("convention", ["uniform", "others", "others_but_pad"])
def test_masked_minus_inf_logits_equal_dropping_the_columns(framework, convention):
    # SEMANTICS §7: masked classes leave the softmax and the support, so -inf logits there give
    # the loss of the same rows with those columns removed, and a zero gradient there.
    module, array = framework
    rng = np.random.default_rng(5)
    allowed = np.array([True, True, False, True, True, False])
    logits = 3 * rng.standard_normal((7, 6))
    labels = rng.choice([0, 3, 4], size=7)
    masked_logits = np.where(allowed, logits, -np.inf)
    options = dict(smoothing=0.2, convention=convention, reduction="sum")
    dropped_options = dict(options)
    if convention == "others_but_pad":
        options["pad_index"] = 1
        dropped_options["pad_index"] = 1  # column 1 keeps its index once 2 and 5 are dropped
    value, grad = _value_and_grad(
        module,
        array,
        module.smoothed_cross_entropy,
        masked_logits,
        array(labels),
        class_mask=array(allowed),
        **options,
    )
    remap = np.cumsum(allowed) - 1
    expected, vjp = oracles.smoothed_cross_entropy(
        logits[:, allowed], remap[labels], **dropped_options
    )
    assert np.isfinite(value) and np.isfinite(grad).all()
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    np.testing.assert_allclose(grad[:, allowed], vjp(1.0), rtol=1e-10, atol=1e-12)
    assert (grad[:, ~allowed] == 0).all()


def test_minus_inf_without_a_class_mask_is_honestly_infinite(framework):
    module, array = framework
    logits = np.array([[0.5, -np.inf, 1.0]])
    value = module.smoothed_cross_entropy(array(logits), array(np.array([0])), smoothing=0.1)
    assert np.isposinf(float(value[0]))


# --------------------------------------------------------------------------------------------
# z_loss


def test_z_loss_zero_changes_nothing_bit_for_bit(framework):
    module, array = framework
    rng = np.random.default_rng(1)
    logits, labels = 3 * rng.standard_normal((7, 5)), rng.integers(0, 5, size=7)
    plain = _value_and_grad(
        module, array, module.smoothed_cross_entropy, logits, array(labels), smoothing=0.1
    )
    zero = _value_and_grad(
        module,
        array,
        module.smoothed_cross_entropy,
        logits,
        array(labels),
        smoothing=0.1,
        z_loss=0.0,
    )
    np.testing.assert_array_equal(plain[0], zero[0])
    np.testing.assert_array_equal(plain[1], zero[1])
    loss, z_part = module.smoothed_cross_entropy(
        array(logits), array(labels), smoothing=0.1, return_z_loss=True
    )
    assert np.all(np.asarray(z_part) == 0)
    np.testing.assert_array_equal(
        np.asarray(loss), np.asarray(plain_rows(module, array, logits, labels))
    )


def plain_rows(module, array, logits, labels):
    return module.smoothed_cross_entropy(array(logits), array(labels), smoothing=0.1)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_z_loss_matches_the_oracle_and_comes_back_alone(framework, reduction):
    module, array = framework
    rng = np.random.default_rng(2)
    logits, labels = 3 * rng.standard_normal((7, 5)), rng.integers(0, 5, size=7)
    labels[0] = -100
    options = dict(smoothing=0.1, ignore_index=-100, z_loss=1e-2, reduction=reduction)
    loss, z_part = module.smoothed_cross_entropy(
        array(logits), array(labels), return_z_loss=True, **options
    )
    (expected_loss, expected_z), _ = oracles.smoothed_cross_entropy(
        logits, labels, return_z_loss=True, **options
    )
    np.testing.assert_allclose(np.asarray(loss), expected_loss, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(z_part), expected_z, rtol=1e-10)
    assert np.all(np.asarray(z_part) >= 0) and np.any(np.asarray(z_part) > 0)


# --------------------------------------------------------------------------------------------
# sigmoid_binary_cross_entropy against torch and optax


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_sigmoid_bce_equals_torch_bce_with_logits(smoothing, reduction):
    rng = np.random.default_rng(4)
    x = torch.tensor(3 * rng.standard_normal((7, 5)), requires_grad=True)
    y = torch.tensor(rng.integers(0, 2, size=(7, 5)).astype(np.float64))
    pos_weight = torch.tensor(rng.uniform(0.5, 3.0, size=5))
    ours = lstorch.sigmoid_binary_cross_entropy(
        x, y, smoothing=smoothing, pos_weight=pos_weight, reduction=reduction
    )
    theirs = F.binary_cross_entropy_with_logits(
        x, y * (1 - smoothing) + smoothing / 2, pos_weight=pos_weight, reduction=reduction
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(theirs.sum(), x)[0]
    )
    jax_rows = lsjax.sigmoid_binary_cross_entropy(
        jnp.asarray(x.detach().numpy()), jnp.asarray(y.numpy()), smoothing=smoothing
    )
    optax_rows = optax.sigmoid_binary_cross_entropy(
        jnp.asarray(x.detach().numpy()), jnp.asarray(y.numpy() * (1 - smoothing) + smoothing / 2)
    )
    np.testing.assert_allclose(jax_rows, optax_rows, rtol=1e-10, atol=1e-12)


def test_sigmoid_bce_takes_a_number_or_list_pos_weight_as_torch_takes_a_tensor(framework):
    module, array = framework
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((3, 4)), rng.integers(0, 2, size=(3, 4)).astype(np.float64)
    for pos_weight in (2.0, [0.5, 1.0, 2.0, 3.0]):
        ours = module.sigmoid_binary_cross_entropy(array(x), array(y), pos_weight=pos_weight)
        theirs = F.binary_cross_entropy_with_logits(
            torch.tensor(x), torch.tensor(y),
            pos_weight=torch.tensor(pos_weight, dtype=torch.float64), reduction="none",
        )  # fmt: skip
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-6)


def test_sigmoid_bce_refuses_labels_outside_0_1(framework):
    """-1/+1 labels (an SVM habit) give torch and optax a number, negative for some elements."""
    module, array = framework
    x = np.zeros((2, 3), np.float32)
    for bad in (-1.0, 2.0):
        y = np.array([[0.0, 1.0, bad], [1.0, 0.0, 0.5]], np.float32)
        with pytest.raises(ValueError, match=r"^sigmoid_binary_cross_entropy: `labels` must be "
                           r"targets in \[0, 1\]"):  # fmt: skip
            module.sigmoid_binary_cross_entropy(array(x), array(y))
    with pytest.raises(ValueError, match=r"^binary_crossentropy: `y_true` must be targets"):
        module.compat.keras.binary_crossentropy(array(-np.ones((2, 3), np.float32)), array(x))


def test_sigmoid_bce_labels_outside_0_1_that_are_not_read_give_nan():
    y = np.array([[0.0, 1.0, -1.0], [1.0, 0.0, 0.5]], np.float32)
    x = np.zeros_like(y)
    traced = jax.jit(lsjax.sigmoid_binary_cross_entropy)(x, y)
    batched = torch.func.vmap(lstorch.sigmoid_binary_cross_entropy)(
        torch.as_tensor(x), torch.as_tensor(y)
    )
    for loss in (np.asarray(traced), batched.numpy()):
        assert np.isnan(loss[0, 2]) and np.isfinite(np.delete(loss.ravel(), 2)).all()


def test_sigmoid_bce_is_finite_for_huge_logits(framework):
    module, array = framework
    x = np.array([[-1e4, 1e4, 0.0]])
    value, grad = _value_and_grad(
        module,
        array,
        module.sigmoid_binary_cross_entropy,
        x,
        array(np.array([[1.0, 0.0, 1.0]])),
        smoothing=0.1,
    )
    assert np.isfinite(value) and np.isfinite(grad).all()


# --------------------------------------------------------------------------------------------
# T5X's custom gradient


@pytest.mark.parametrize("name", ["jax", "torch"])
def test_t5x_gradient_is_the_derivative_for_distributions_and_drops_the_z_part(name):
    module, array = FRAMEWORKS[name]
    rng = np.random.default_rng(6)
    logits = 3 * rng.standard_normal((4, 5))
    targets = rng.dirichlet(np.ones(5), size=4)  # rows sum to 1: T5X's rule is the derivative
    fn = module.compat.t5x.cross_entropy_with_logits

    def grad_of(pick):
        if name == "jax":
            return np.asarray(
                jax.grad(lambda x: pick(fn(x, array(targets), 0.1)).sum())(array(logits))
            )
        x = torch.tensor(logits, requires_grad=True)
        return torch.autograd.grad(pick(fn(x, array(targets), 0.1)).sum(), x)[0].numpy()

    def loss_value(x):
        return oracles.t5x_cross_entropy_with_logits(x, targets, 0.1)[0][0].sum()

    np.testing.assert_allclose(
        grad_of(lambda out: out[0]), finite_difference_vjp(loss_value, logits), rtol=1e-6, atol=1e-7
    )
    # T5X ignores the z-loss output's cotangent ("only used for logging"): zero gradient.
    assert np.all(grad_of(lambda out: out[1]) == 0)


@pytest.mark.parametrize("name", ["jax", "torch"])
def test_t5x_z_loss_gets_t5xs_zero_derivative_and_the_weighted_loss_the_true_one(name):
    """T5X's custom rule returns no derivative for ``z_loss``: the twin gives 0 (``jax.grad``,
    ``torch.func.grad``), as documented. ``compute_weighted_cross_entropy``, differentiated by
    autodiff in T5X, gives ``d/dz sum_rows z lse**2 = sum lse**2`` (NumPy's lse)."""
    module, array = FRAMEWORKS[name]
    rng = np.random.default_rng(7)
    logits = 3 * rng.standard_normal((4, 5))
    labels = rng.integers(0, 5, 4)
    targets = rng.dirichlet(np.ones(5), size=4)
    t5x = module.compat.t5x
    grad = jax.grad if name == "jax" else torch.func.grad

    def custom(z):
        return t5x.cross_entropy_with_logits(array(logits), array(targets), z)[0].sum()

    def weighted(z):
        return t5x.compute_weighted_cross_entropy(array(logits), array(labels), z_loss=z)[0]

    z = array(np.float64(0.1))
    lse = np.log(np.exp(logits).sum(-1))
    assert float(grad(custom)(z)) == 0.0
    np.testing.assert_allclose(float(grad(weighted)(z)), np.sum(lse**2), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Bad input names the argument, the value and what is allowed (messages from lsspec)


def test_class_mask_errors(framework):
    module, array = framework
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((4, 5)), np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"`class_mask` must have shape \(5,\); got shape \(4,\)"):
        module.smoothed_cross_entropy(
            array(logits), array(labels), class_mask=array(np.ones(4, bool))
        )
    with pytest.raises(TypeError, match=r"`class_mask` must have dtype bool; got dtype .*int"):
        module.smoothed_cross_entropy(
            array(logits), array(labels), class_mask=array(np.ones(5, int))
        )
    with pytest.raises(
        ValueError, match=r"classes that `class_mask` allows .*masked classes \[3\]"
    ):
        module.smoothed_cross_entropy(
            array(logits), array(labels), class_mask=array(np.arange(5) != 3)
        )
    with pytest.raises(ValueError, match=r"`class_mask` allows 1 class\(es\), which leaves "):
        module.smoothed_cross_entropy(
            array(logits),
            array(np.zeros(4, int)),
            convention="others",
            class_mask=array(np.arange(5) == 0),
        )


def test_z_loss_errors(framework):
    module, array = framework
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((4, 5)), np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"`z_loss` must be a finite number >= 0; got -0\.1"):
        module.smoothed_cross_entropy(array(logits), array(labels), z_loss=-0.1)
    with pytest.raises(ValueError, match=r"`z_loss` \(and return_z_loss=True\) needs logits"):
        module.smoothed_cross_entropy(
            array(logits), array(labels), z_loss=1e-4, from_log_probs=True
        )


def test_compat_errors(framework):
    module, array = framework
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((4, 5)), np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"`smoothing` must be in \[0, 1\); got 1\.0"):
        module.compat.timm.label_smoothing_cross_entropy(
            array(logits), array(labels), smoothing=1.0
        )
    with pytest.raises(
        ValueError, match=r"`target` must have shape \(4,\) or \(4, 1\); got shape \(4, 2\)"
    ):
        module.compat.fairseq.label_smoothed_nll_loss(
            array(logits), array(np.zeros((4, 2), int)), 0.1
        )
    with pytest.raises(
        ValueError, match=r"`targets` must have the logits' shape without the last axis"
    ):
        module.compat.t5x.compute_weighted_cross_entropy(array(logits), array(labels[:3]))
    with pytest.raises(ValueError, match=r"`pos_weight` must have a shape that broadcasts"):
        module.sigmoid_binary_cross_entropy(
            array(logits), array(np.zeros((4, 5))), pos_weight=array(np.ones(3))
        )


def test_fairseq_keeps_its_unreduced_shapes(framework):
    module, array = framework
    rng = np.random.default_rng(0)
    lprobs = np.log(rng.dirichlet(np.ones(5), size=4))
    target = np.array([0, 1, 2, 1])
    fn = module.compat.fairseq.label_smoothed_nll_loss
    loss, nll = fn(array(lprobs), array(target), 0.1, ignore_index=1, reduce=False)
    assert tuple(loss.shape) == tuple(nll.shape) == (4, 1)  # fairseq keeps gather's (N, 1)
    loss, nll = fn(array(lprobs), array(target), 0.1, reduce=False)
    assert tuple(loss.shape) == tuple(nll.shape) == (4,)
    assert float(nll[1]) == pytest.approx(-lprobs[1, 1], rel=1e-12)


@pytest.mark.parametrize(
    ("old", "new", "names"),
    [
        ("lsjax.torch_mirror", "lsjax.compat.pytorch", ["cross_entropy"]),
        (
            "lsjax.seed_modules",
            "lsjax.compat.pytorch_forum",
            ["label_smoothing_loss"],
        ),
        ("lsjax.seed_modules", "lsjax.compat.opennmt", ["kl_label_smoothing_loss"]),
        ("lstorch.seed_modules", "lstorch.compat.pytorch_forum", ["label_smoothing_loss"]),
        ("lstorch.seed_modules", "lstorch.compat.opennmt", ["kl_label_smoothing_loss"]),
    ],
)
def test_moved_modules_keep_a_deprecated_alias(old, new, names):
    # The old module paths still import, warn, and give the very functions of their new home
    # (and of the package: lsjax.cross_entropy, lstorch.label_smoothing_loss, ...).
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.") + " is deprecated"):
        alias = importlib.import_module(old)
    moved = importlib.import_module(new)
    package = importlib.import_module(old.split(".")[0])
    for name in names:
        assert getattr(alias, name) is getattr(moved, name) is getattr(package, name)


# --------------------------------------------------------------------------------------------
# Hugging Face's LabelSmoother itself


@pytest.mark.parametrize("shift_labels", [False, True])
def test_label_smoother_equals_transformers_with_num_items_in_batch(framework, shift_labels):
    """transformers' ``LabelSmoother.__call__(..., shift_labels, num_items_in_batch)``: the
    count of the whole accumulated batch replaces this call's count in both terms."""
    from transformers.trainer_pt_utils import LabelSmoother

    module, array = framework
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((2, 5, 7))
    labels = rng.integers(0, 7, size=(2, 5))
    labels[0, 2] = -100
    for count in (None, 13):
        expected = LabelSmoother(epsilon=0.1)(
            {"logits": torch.tensor(logits)}, torch.tensor(labels), shift_labels=shift_labels,
            num_items_in_batch=count,
        )  # fmt: skip
        got = module.compat.hf.label_smoother(
            array(logits), array(labels), epsilon=0.1, shift_labels=shift_labels,
            num_items_in_batch=count,
        )  # fmt: skip
        # HF sums its smoothing term in float32 (`log_probs.sum(..., dtype=torch.float32)`).
        np.testing.assert_allclose(float(got), float(expected), rtol=1e-7)
    message = (
        r"^label_smoother: `num_items_in_batch` must be a count of tokens, a finite number >= 0; "
        r"got -1\.$"
    )
    with pytest.raises(ValueError, match=message):
        module.compat.hf.label_smoother(array(logits), array(labels), num_items_in_batch=-1)


def test_label_smoother_with_a_count_of_zero_gives_nan_as_transformers(framework):
    """A batch whose every label is ignored, counted 0 by the Trainer: transformers'
    ``LabelSmoother`` gives ``0 / 0``, NaN, with a zero gradient; so do the twins."""
    from transformers.trainer_pt_utils import LabelSmoother

    module, array = framework
    logits = np.random.default_rng(9).standard_normal((2, 5, 7))
    labels = np.full((2, 5), -100)
    leaf = torch.tensor(logits, requires_grad=True)
    expected = LabelSmoother(epsilon=0.1)({"logits": leaf}, torch.tensor(labels),
                                          num_items_in_batch=0)  # fmt: skip
    expected.backward()
    assert expected.isnan() and (leaf.grad == 0).all()  # the oracle's behaviour
    for count in (0, 0.0, array(np.array(0))):
        if module is lsjax:
            loss, grad = jax.value_and_grad(
                lambda x, count=count: module.compat.hf.label_smoother(
                    x, array(labels), epsilon=0.1, num_items_in_batch=count
                )
            )(array(logits))
        else:
            x = array(logits).requires_grad_()
            loss = module.compat.hf.label_smoother(x, array(labels), epsilon=0.1,
                                                   num_items_in_batch=count)  # fmt: skip
            loss.backward()
            grad = x.grad
        assert np.isnan(float(loss)) and (np.asarray(grad) == 0).all(), count


# --------------------------------------------------------------------------------------------
# Defaults: a twin called with the peer's required arguments only computes the peer's call.
# The registry passes every option, so a default changed in both frameworks alike would pass
# the twin rows; these are the peers' own signatures, read from their sources.

PEER_DEFAULTS = {
    # fairseq/criterions/label_smoothed_cross_entropy.py
    ("fairseq", "label_smoothed_nll_loss"): {"ignore_index": None, "reduce": True},
    # t5x/losses.py
    ("t5x", "compute_weighted_cross_entropy"): {
        "weights": None, "label_smoothing": 0.0, "z_loss": 0.0, "loss_normalizing_factor": None,
    },
    # keras/src/losses/losses.py
    ("keras", "categorical_crossentropy"): {"from_logits": False, "label_smoothing": 0.0,
                                            "axis": -1},
    ("keras", "binary_crossentropy"): {"from_logits": False, "label_smoothing": 0.0, "axis": -1},
    # timm/loss/cross_entropy.py: LabelSmoothingCrossEntropy(smoothing=0.1)
    ("timm", "label_smoothing_cross_entropy"): {"smoothing": 0.1},
    # megatron/core/tensor_parallel/cross_entropy.py
    ("megatron", "cross_entropy"): {"label_smoothing": 0.0},
    # OpenNMT-py's LabelSmoothingLoss(label_smoothing, tgt_vocab_size, ignore_index=-100)
    ("opennmt", "kl_label_smoothing_loss"): {"ignore_index": -100},
    # the forum's LabelSmoothingLoss(classes, smoothing=0.0, dim=-1)
    ("pytorch_forum", "label_smoothing_loss"): {"smoothing": 0.0, "dim": -1},
}  # fmt: skip


@pytest.mark.parametrize("peer", sorted(PEER_DEFAULTS), ids="/".join)
def test_compat_defaults_are_the_peers(peer, framework):
    import importlib
    import inspect

    module, _ = framework
    family, name = peer
    if (module, family) == (lstorch, "megatron"):  # PyTorch's is the vocabulary-parallel call
        name = "vocab_parallel_cross_entropy"
    function = getattr(importlib.import_module(f"{module.__name__}.compat.{family}"), name)
    parameters = inspect.signature(function).parameters
    got = {key: parameters[key].default for key in PEER_DEFAULTS[peer]}
    assert got == PEER_DEFAULTS[peer]


def test_label_smoother_defaults_are_transformers(framework):
    """Read from the installed transformers: ``LabelSmoother(epsilon=0.1, ignore_index=-100)``
    and its ``__call__(model_output, labels, shift_labels=False, num_items_in_batch=None)``."""
    import dataclasses
    import inspect

    from transformers.trainer_pt_utils import LabelSmoother

    module, _ = framework
    expected = {field.name: field.default for field in dataclasses.fields(LabelSmoother)}
    call = inspect.signature(LabelSmoother.__call__).parameters
    expected.update({key: call[key].default for key in ("shift_labels", "num_items_in_batch")})
    parameters = inspect.signature(module.compat.hf.label_smoother).parameters
    assert {key: parameters[key].default for key in expected} == expected
