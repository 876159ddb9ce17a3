"""Bad input gets a clear error naming the argument, what was given and what is allowed, in both
frameworks, with the same words (the messages come from lsspec)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lsjax
import lstorch
from tests.helpers import FRAMEWORKS


def _data(num_classes=5, rows=4, int_labels=True):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=rows)
    return logits, labels


# (keywords or input change, exception type, regex the message must match)
BAD_OPTIONS = [
    ({"smoothing": -0.1}, ValueError, r"`smoothing` must be in \[0, 1\]; got -0\.1"),
    ({"smoothing": 1.5}, ValueError, r"`smoothing` must be in \[0, 1\]; got 1\.5"),
    (
        {"convention": "eps/K"},
        ValueError,
        r"`convention` must be one of \['uniform', 'others', 'others_but_pad'\]; got 'eps/K'",
    ),
    (
        {"reduction": "avg"},
        ValueError,
        r"`reduction` must be one of \['none', 'sum', 'mean'\]; got 'avg'",
    ),
    (
        {"convention": "others_but_pad"},
        ValueError,
        r"needs `pad_index`, an int in \[0, 4\]; got None",
    ),
    (
        {"convention": "others_but_pad", "pad_index": 5},
        ValueError,
        r"`pad_index`, an int in \[0, 4\]; got 5",
    ),
    ({"pad_index": 0}, ValueError, r"`pad_index` is only used by convention='others_but_pad'"),
    ({"normalizer": 3.0}, ValueError, r"`normalizer` replaces the denominator of reduction='mean'"),
    (
        {"normalizer": 0.0, "reduction": "mean"},
        ValueError,
        r"`normalizer` must be a finite number > 0; got 0\.0",
    ),
    (
        {"kl": True, "weight": np.ones(5, np.float32)},
        ValueError,
        r"kl=True is not defined with class `weight`",
    ),
    (
        {"weight": np.ones(4, np.float32)},
        ValueError,
        r"`weight` must have shape \(5,\); got shape \(4,\)",
    ),
    (
        {"where": np.ones(3, bool)},
        ValueError,
        r"`where` must have the labels' shape \(4,\); got shape \(3,\)",
    ),
    (
        {"where": np.ones(4, np.float32)},
        TypeError,
        r"`where` must have dtype bool; got dtype (torch\.)?float32",
    ),
    (
        {"axis": 2},
        ValueError,
        r"`axis` must be an int in \[-2, 1\] for logits with 2 dimension\(s\); got 2",
    ),
]


@pytest.mark.parametrize(
    ("options", "error", "message"), BAD_OPTIONS, ids=[str(o) for o, _, _ in BAD_OPTIONS]
)
def test_bad_option_is_named(framework, options, error, message):
    module, array = framework
    logits, labels = _data()
    options = {k: array(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    with pytest.raises(error, match=message):
        module.smoothed_cross_entropy(array(logits), array(labels), **options)


def test_non_float_logits(framework):
    module, array = framework
    _, labels = _data()
    with pytest.raises(TypeError, match=r"`logits` must have a floating dtype.*; got dtype .*int"):
        module.smoothed_cross_entropy(
            array(labels[:, None] * np.ones((1, 5), np.int64)), array(labels)
        )


def test_float_labels(framework):
    module, array = framework
    logits, labels = _data()
    with pytest.raises(
        TypeError, match=r"`labels` must have an integer dtype.*; got dtype .*float"
    ):
        module.smoothed_cross_entropy(array(logits), array(labels.astype(np.float32)))


def test_labels_shape_mismatch(framework):
    module, array = framework
    logits, labels = _data()
    with pytest.raises(
        ValueError,
        match=r"`labels` must have the logits' shape without the class "
        r"axis, \(4,\); got shape \(4, 1\)",
    ):
        module.smoothed_cross_entropy(array(logits), array(labels[:, None]))


@pytest.mark.parametrize(
    ("convention", "num_classes", "options"),
    [("others", 1, {}), ("others_but_pad", 2, {"pad_index": 0})],
)
def test_too_few_classes(framework, convention, num_classes, options):
    module, array = framework
    logits, labels = _data(num_classes=num_classes)
    with pytest.raises(
        ValueError,
        match=rf"convention='{convention}' needs at least "
        rf"{num_classes + 1} classes along the class axis; got "
        rf"{num_classes}",
    ):
        module.smoothed_cross_entropy(
            array(logits), array(labels), convention=convention, **options
        )


@pytest.mark.parametrize("bad_label", [-1, 5, 7])
def test_concrete_labels_out_of_range_raise(framework, bad_label):
    module, array = framework
    logits, labels = _data()
    labels[2] = bad_label
    with pytest.raises(
        ValueError,
        match=rf"`labels` must lie in \[0, 4\]; got out-of-range values "
        rf"\[{bad_label}\]",
    ):
        module.smoothed_cross_entropy(array(logits), array(labels))


def test_ignored_labels_are_not_out_of_range(framework):
    module, array = framework
    logits, labels = _data()
    labels[2] = -100
    loss = module.smoothed_cross_entropy(array(logits), array(labels), ignore_index=-100)
    assert float(loss[2]) == 0.0


def test_traced_labels_out_of_range_give_nan_not_a_number():
    logits, labels = _data()
    labels[2] = 7
    rows = jax.jit(lambda x, y: lsjax.smoothed_cross_entropy(x, y, smoothing=0.1))(
        jnp.asarray(logits), jnp.asarray(labels)
    )
    assert np.isnan(rows[2]) and np.isfinite(np.delete(np.asarray(rows), 2)).all()
    mean = jax.jit(lambda x, y: lsjax.smoothed_cross_entropy(x, y, reduction="mean"))(
        jnp.asarray(logits), jnp.asarray(labels)
    )
    assert np.isnan(mean)
    grad = jax.jit(jax.grad(lambda x, y: lsjax.smoothed_cross_entropy(x, y, reduction="sum")))(
        jnp.asarray(logits), jnp.asarray(labels)
    )
    assert np.isnan(grad[2]).all() and np.isfinite(np.delete(np.asarray(grad), 2, axis=0)).all()


def test_traced_smoothing_out_of_range_gives_nan():
    logits, labels = _data()
    rows = jax.jit(lambda x, y, eps: lsjax.smoothed_cross_entropy(x, y, smoothing=eps))(
        jnp.asarray(logits), jnp.asarray(labels), 1.5
    )
    assert np.isnan(rows).all()


def test_tensor_smoothing_out_of_range_gives_nan_in_torch():
    logits, labels = _data()
    rows = lstorch.smoothed_cross_entropy(
        torch.as_tensor(logits), torch.as_tensor(labels), smoothing=torch.tensor(1.5)
    )
    assert torch.isnan(rows).all()


def test_seed_modules_check_their_constructor_arguments():
    with pytest.raises(ValueError, match=r"`label_smoothing` must be in \(0, 1\]; got 0\.0"):
        lstorch.KLLabelSmoothingLoss(0.0, 10)
    with pytest.raises(ValueError, match=r"`ignore_index` must be an int below tgt_vocab_size=10"):
        lstorch.KLLabelSmoothingLoss(0.1, 10, ignore_index=10)
    logits, labels = _data()
    for module, array in FRAMEWORKS.values():
        with pytest.raises(
            ValueError, match=r"`classes` must equal the size of the class axis, 5; got 6"
        ):
            module.label_smoothing_loss(array(logits), array(labels), classes=6)
        with pytest.raises(
            ValueError, match=r"`tgt_vocab_size` must equal the size of the class axis, 5; got 4"
        ):
            module.kl_label_smoothing_loss(
                array(logits), array(labels), label_smoothing=0.1, tgt_vocab_size=4
            )


def test_cross_entropy_mirror_refuses_ignore_index_with_probabilities():
    logits, _ = _data()
    probabilities = np.full_like(logits, 0.2)
    with pytest.raises(
        ValueError, match=r"`ignore_index` is not supported with probability targets"
    ):
        lsjax.cross_entropy(logits, probabilities, ignore_index=0)
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):  # torch agrees
        torch.nn.functional.cross_entropy(
            torch.as_tensor(logits), torch.as_tensor(probabilities), ignore_index=0
        )
