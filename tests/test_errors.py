"""Bad input gets a clear error naming the argument, what was given and what is allowed, in both
frameworks, with the same words (the messages come from lsspec)."""

import functools
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lsjax
import lstorch
from parity_tests import oracles
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


# Scalar options given as concrete 0-d arrays/tensors are checked like the numbers they hold.
BAD_ARRAY_OPTIONS = [
    ({"smoothing": 1.5}, r"`smoothing` must be in \[0, 1\]; got 1\.5"),
    ({"smoothing": -0.1}, r"`smoothing` must be in \[0, 1\]; got -0\.1"),
    (
        {"normalizer": -2.0, "reduction": "mean"},
        r"`normalizer` must be a finite number > 0; got -2",
    ),
    ({"normalizer": 0.0, "reduction": "mean"}, r"`normalizer` must be a finite number > 0; got 0"),
    ({"z_loss": -1.0}, r"`z_loss` must be a finite number >= 0; got -1\.0"),
    ({"z_loss": np.inf}, r"`z_loss` must be a finite number >= 0; got inf"),
]


@pytest.mark.parametrize(("options", "message"), BAD_ARRAY_OPTIONS, ids=str)
def test_concrete_array_options_are_checked_like_numbers(framework, options, message):
    module, array = framework
    logits, labels = _data()
    options = {
        name: array(np.float32(value)) if name in ("smoothing", "normalizer", "z_loss") else value
        for name, value in options.items()
    }
    with pytest.raises(ValueError, match=message):
        module.smoothed_cross_entropy(array(logits), array(labels), **options)


@pytest.mark.parametrize("framework_name", list(FRAMEWORKS))
def test_concrete_array_options_are_checked_in_every_function(framework_name):
    module, array = FRAMEWORKS[framework_name]
    logits, labels = _data()
    x, y, probs = array(logits), array(labels), array(np.full((4, 5), 0.2, np.float32))
    with pytest.raises(ValueError, match=r"`z_loss` must be a finite number >= 0; got -1\.0"):
        module.soft_target_cross_entropy(x, probs, z_loss=array(np.float32(-1.0)), axis=-1)
    calls = {
        "soft_target_cross_entropy smoothing": lambda: module.soft_target_cross_entropy(
            x, probs, smoothing=array(np.float32(1.5)), axis=-1
        ),
        "sigmoid_binary_cross_entropy smoothing": lambda: module.sigmoid_binary_cross_entropy(
            x, probs, smoothing=array(np.float32(1.5))
        ),
        "fused smoothing": lambda: module.fused_linear_smoothed_cross_entropy(
            x, array(np.ones((3, 5), np.float32)), y, smoothing=array(np.float32(1.5))
        ),
        "kl_label_smoothing_loss label_smoothing": lambda: module.kl_label_smoothing_loss(
            x, y, label_smoothing=array(np.float32(0.0)), tgt_vocab_size=5
        ),
        "timm smoothing": lambda: module.compat.timm.label_smoothing_cross_entropy(
            x, y, smoothing=array(np.float32(1.0))
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"must be in [\[(]0, 1[\])]"):
            call()
            pytest.fail(f"{name}: no error")


def test_traced_z_loss_and_normalizer_out_of_range_give_nan():
    """Under jit/vmap the value cannot be read: out of range it gives NaN, never a number."""
    logits, labels = _data()
    x, y = jnp.asarray(logits), jnp.asarray(labels)

    def mean(normalizer):
        return lsjax.smoothed_cross_entropy(x, y, reduction="mean", normalizer=normalizer)

    for bad in (-2.0, 0.0, np.inf):
        assert np.isnan(jax.jit(mean)(bad)), bad
    assert np.isclose(jax.jit(mean)(8.0), mean(8.0))
    rows = jax.jit(lambda z: lsjax.smoothed_cross_entropy(x, y, z_loss=z))(-1.0)
    assert np.isnan(rows).all()
    rows = jax.vmap(lambda z: lsjax.smoothed_cross_entropy(x, y, z_loss=z, reduction="sum"))(
        jnp.array([0.1, -1.0, jnp.inf])
    )
    assert np.isfinite(rows[0]) and np.isnan(rows[1:]).all()
    soft = jax.jit(lambda z: lsjax.soft_target_cross_entropy(x, jax.nn.softmax(x), z_loss=z))
    assert np.isnan(soft(-1.0)).all()


def test_unread_tensor_options_out_of_range_give_nan_in_torch():
    """Inside torch.compile (and batched by torch.func.vmap) lstorch does not read a tensor
    option; out of range it gives NaN, never a number."""
    logits, labels = _data()
    x, y = torch.as_tensor(logits), torch.as_tensor(labels)

    @torch.compile(fullgraph=True, backend="eager")
    def loss(smoothing, normalizer, z_loss):
        return lstorch.smoothed_cross_entropy(
            x, y, smoothing=smoothing, normalizer=normalizer, z_loss=z_loss, reduction="mean"
        )

    good = dict(smoothing=torch.tensor(0.1), normalizer=torch.tensor(8.0), z_loss=torch.tensor(0.0))
    expected = lstorch.smoothed_cross_entropy(x, y, smoothing=0.1, normalizer=8.0, reduction="mean")
    torch.testing.assert_close(loss(**good), expected)
    for name, bad in (("smoothing", 1.5), ("normalizer", -2.0), ("z_loss", -1.0)):
        assert torch.isnan(loss(**{**good, name: torch.tensor(bad)})), name
    # torch.func.vmap over per-example options: batched values are not read either.
    per_example = torch.func.vmap(
        lambda eps: lstorch.smoothed_cross_entropy(x, y, smoothing=eps, reduction="sum")
    )(torch.tensor([0.1, 1.5]))
    assert torch.isfinite(per_example[0]) and torch.isnan(per_example[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accelerator_tensor_options_are_not_read_and_give_nan():
    """A CUDA tensor option is not read back (the host would wait for the device on every
    call): in range it gives the loss, out of range NaN instead of an error."""
    logits, labels = _data()
    x, y = torch.as_tensor(logits, device="cuda"), torch.as_tensor(labels, device="cuda")

    def loss(**options):
        return lstorch.smoothed_cross_entropy(x, y, reduction="mean", **options).item()

    expected = loss(smoothing=0.1, normalizer=8.0, z_loss=0.01)
    got = loss(
        smoothing=torch.tensor(0.1, device="cuda"),
        normalizer=torch.tensor(8.0, device="cuda"),
        z_loss=torch.tensor(0.01, device="cuda"),
    )
    assert got == pytest.approx(expected, rel=1e-6)
    for name, bad in (("smoothing", 1.5), ("normalizer", -2.0), ("z_loss", -1.0)):
        assert np.isnan(loss(**{name: torch.tensor(bad, device="cuda")})), name


@pytest.mark.parametrize(
    "value",
    [None, "0.1", (0.1,), [0.1], True, Fraction(1, 10), np.True_, np.array("0.1")],
    ids=repr,
)
def test_a_scalar_option_of_the_wrong_type_is_named(framework, value):
    module, array = framework
    logits, labels = _data()
    message = (  # the value as given (not a tensor lstorch made of it)
        r"smoothed_cross_entropy: `smoothing` must be a real number \(a Python or NumPy int or "
        rf"float\) or a 0-d array/tensor of a real dtype; got {re.escape(repr(value))} "
    )
    with pytest.raises(TypeError, match=message):
        module.smoothed_cross_entropy(array(logits), array(labels), smoothing=value)
    with pytest.raises(TypeError, match=r"`z_loss` must be a real number"):
        module.smoothed_cross_entropy(array(logits), array(labels), z_loss=value)
    if value is not None:  # normalizer=None means "not given"
        with pytest.raises(TypeError, match=r"`normalizer` must be a real number"):
            module.smoothed_cross_entropy(
                array(logits), array(labels), normalizer=value, reduction="mean"
            )


def test_weight_and_where_may_be_python_lists(framework):
    module, array = framework
    logits, labels = _data()
    weight, where = [0.5, 1.0, 2.0, 1.0, 3.0], [True, False, True, True]
    from_lists = module.smoothed_cross_entropy(
        array(logits), array(labels), smoothing=0.1, weight=weight, where=where, reduction="mean"
    )
    expected, _ = oracles.smoothed_cross_entropy(
        logits, labels, smoothing=0.1, weight=np.array(weight), where=np.array(where),
        reduction="mean",
    )  # fmt: skip
    np.testing.assert_allclose(float(from_lists), expected, rtol=1e-5)
    soft = module.soft_target_cross_entropy(
        array(logits), array(np.full((4, 5), 0.2, np.float32)), weight=weight, where=where,
        axis=-1,
    )  # fmt: skip
    assert soft.shape == (4,) and float(soft[1]) == 0.0


@pytest.mark.parametrize("name", ["pad_index", "ignore_index"])
def test_a_bool_is_not_a_class_index(framework, name):
    module, array = framework
    logits, labels = _data()
    options = {name: True}
    if name == "pad_index":
        options["convention"] = "others_but_pad"
    with pytest.raises(ValueError, match=rf"`{name}`.* an int.*; got True"):
        module.smoothed_cross_entropy(array(logits), array(labels), **options)


def _log_probs(logits):
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


_LOGITS, _LABELS = _data()
_BAD_LABELS = np.array([0, 1, 9, 2])
_PROBS = np.full((4, 5), 0.2, np.float32)

# (call(module, array), regex): each error names the function the user called and that
# function's own name of the argument, not the function it hands the work to.
NAMED_CALLS = [
    (
        lambda m, a: m.label_smoothing_loss(a(_LOGITS), a(_BAD_LABELS), classes=5),
        r"^label_smoothing_loss: `target` must lie in \[0, 4\]",
    ),
    (
        lambda m, a: m.label_smoothing_loss(a(_LOGITS), a(_LABELS), classes=5, smoothing=1.2),
        r"^label_smoothing_loss: `smoothing` must be in \[0, 1\]; got 1\.2",
    ),
    (
        lambda m, a: m.kl_label_smoothing_loss(
            a(_log_probs(_LOGITS)), a(_LABELS), label_smoothing=0.1, tgt_vocab_size=5,
            ignore_index=5,
        ),
        r"^kl_label_smoothing_loss: `ignore_index` must be an int below tgt_vocab_size=5",
    ),
    (
        lambda m, a: m.kl_label_smoothing_loss(
            a(_log_probs(_LOGITS[:, :2])), a(_LABELS % 2), label_smoothing=0.1,
            tgt_vocab_size=2, ignore_index=0,
        ),
        r"^kl_label_smoothing_loss: `tgt_vocab_size` must be >= 3 with a pad column",
    ),
    (
        lambda m, a: m.compat.fairseq.label_smoothed_nll_loss(
            a(_log_probs(_LOGITS)), a(_LABELS), 2.0
        ),
        r"^label_smoothed_nll_loss: `epsilon` must be in \[0, 1\]; got 2\.0",
    ),
    (
        lambda m, a: m.compat.fairseq.label_smoothed_nll_loss(
            a(_log_probs(_LOGITS)), a(_BAD_LABELS), 0.1
        ),
        r"^label_smoothed_nll_loss: `target` must lie in \[0, 4\]",
    ),
    (
        lambda m, a: m.compat.hf.label_smoother(a(_LOGITS), a(_LABELS), epsilon=-0.5),
        r"^label_smoother: `epsilon` must be in \[0, 1\]; got -0\.5",
    ),
    (
        lambda m, a: m.compat.keras.categorical_crossentropy(
            a(_PROBS), a(_LOGITS), from_logits=True, label_smoothing=2.0
        ),
        r"^categorical_crossentropy: `label_smoothing` must be in \[0, 1\]",
    ),
    (
        lambda m, a: m.compat.keras.binary_crossentropy(
            a(_PROBS), a(_LOGITS), from_logits=True, label_smoothing=2.0
        ),
        r"^binary_crossentropy: `label_smoothing` must be in \[0, 1\]",
    ),
    (
        lambda m, a: m.compat.t5x.compute_weighted_cross_entropy(
            a(_LOGITS), a(_LABELS), label_smoothing=2.0
        ),
        r"^compute_weighted_cross_entropy: `label_smoothing` must be in \[0, 1\]",
    ),
    (
        lambda m, a: m.compat.t5x.compute_weighted_cross_entropy(a(_LOGITS), a(_BAD_LABELS)),
        r"^compute_weighted_cross_entropy: `targets` must lie in \[0, 4\]",
    ),
    (
        lambda m, a: m.compat.t5x.cross_entropy_with_logits(a(_LOGITS), a(_PROBS), -1.0),
        r"^cross_entropy_with_logits: `z_loss` must be a finite number >= 0; got -1\.0",
    ),
    (
        lambda m, a: m.compat.timm.label_smoothing_cross_entropy(a(_LOGITS), a(_BAD_LABELS)),
        r"^label_smoothing_cross_entropy: `target` must lie in \[0, 4\]",
    ),
    (
        lambda m, a: m.compat.timm.soft_target_cross_entropy(a(_LOGITS), a(_PROBS[:, :4])),
        r"^soft_target_cross_entropy: `target` must have the x's shape",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("call", "message"), NAMED_CALLS, ids=[m for _, m in NAMED_CALLS])
def test_errors_name_the_function_called_and_its_arguments(framework, call, message):
    module, array = framework
    with pytest.raises(ValueError, match=message):
        call(module, array)


_COMPLEX = np.array([1, 2j, 1, 1, 1], np.complex64)
_HIDDEN, _OUTPUT = np.ones((4, 3), np.float32), np.ones((5, 3), np.float32)

# Every numeric option a loss casts to its real dtype, given complex: each would lose its
# imaginary part silently (torch's F.cross_entropy refuses a complex weight).
COMPLEX_CALLS = [
    (lambda m, a: m.smoothed_cross_entropy(a(_LOGITS), a(_LABELS), weight=a(_COMPLEX)),
     "smoothed_cross_entropy: `weight`"),
    (lambda m, a: m.soft_target_cross_entropy(a(_LOGITS), a(_PROBS), weight=list(_COMPLEX)),
     "soft_target_cross_entropy: `weight`"),
    (lambda m, a: m.sigmoid_binary_cross_entropy(a(_LOGITS), a(_PROBS), pos_weight=a(_COMPLEX)),
     "sigmoid_binary_cross_entropy: `pos_weight`"),
    (lambda m, a: m.fused_linear_smoothed_cross_entropy(
        a(_HIDDEN), a(_OUTPUT), a(_LABELS), class_weight=a(_COMPLEX)),
     "fused_linear_smoothed_cross_entropy: `class_weight`"),
    (lambda m, a: m.compat.t5x.compute_weighted_cross_entropy(
        a(_LOGITS), a(_LABELS), weights=a(_COMPLEX[:4])),
     "compute_weighted_cross_entropy: `weights`"),
    (lambda m, a: m.compat.keras.categorical_crossentropy(
        a(_PROBS * 1j), a(_LOGITS), from_logits=True),
     "categorical_crossentropy: `y_true`"),
    (lambda m, a: m.compat.keras.binary_crossentropy(a(_PROBS * 1j), a(_LOGITS)),
     "binary_crossentropy: `y_true`"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "named"), COMPLEX_CALLS, ids=[n for _, n in COMPLEX_CALLS])
def test_a_complex_weight_or_target_is_refused(framework, call, named):
    module, array = framework
    with pytest.raises(TypeError, match=rf"^{named} must have a real \(not complex\) dtype; "):
        call(module, array)


# float8 logits (or hidden states): each function's first floating input, named in its words.
FLOAT8_CALLS = [
    (lambda m, a, q: m.smoothed_cross_entropy(q(_LOGITS), a(_LABELS)),
     "smoothed_cross_entropy: `logits`"),
    (lambda m, a, q: m.soft_target_cross_entropy(a(_LOGITS), q(_PROBS)),
     "soft_target_cross_entropy: `targets`"),
    (lambda m, a, q: m.sigmoid_binary_cross_entropy(q(_LOGITS), a(_PROBS)),
     "sigmoid_binary_cross_entropy: `logits`"),
    (lambda m, a, q: m.fused_linear_smoothed_cross_entropy(q(_HIDDEN), q(_OUTPUT), a(_LABELS)),
     "fused_linear_smoothed_cross_entropy: `hidden`"),
    (lambda m, a, q: m.label_smoothing_loss(q(_LOGITS), a(_LABELS), classes=5),
     "label_smoothing_loss: `pred`"),
    (lambda m, a, q: m.compat.t5x.cross_entropy_with_logits(q(_LOGITS), a(_PROBS), 0.0),
     "cross_entropy_with_logits: `logits`"),
    (lambda m, a, q: m.compat.keras.categorical_crossentropy(a(_PROBS), q(_LOGITS)),
     "categorical_crossentropy: `y_pred`"),
]  # fmt: skip
_FLOAT8 = {
    "jax": lambda value: jnp.asarray(value, jnp.float8_e4m3fn),
    "torch": lambda value: torch.as_tensor(value).to(torch.float8_e4m3fn),
}


@pytest.mark.parametrize("framework_name", list(FRAMEWORKS))
@pytest.mark.parametrize(("call", "named"), FLOAT8_CALLS, ids=[n for _, n in FLOAT8_CALLS])
def test_float8_inputs_are_refused(framework_name, call, named):
    """float8 has no arithmetic to accumulate a loss in (torch's losses refuse it; JAX found
    no promotion path): one named rule in both frameworks, not each one's own error."""
    module, array = FRAMEWORKS[framework_name]
    message = rf"^{named} must have a floating dtype of 16 bits or more \(float16, bfloat16, "
    with pytest.raises(TypeError, match=message):
        call(module, array, _FLOAT8[framework_name])


# Each function's class weight, as f(weight) for the frameworks' derivatives.
_WEIGHTED = {
    "smoothed_cross_entropy: `weight`":
        lambda m, a, w: m.smoothed_cross_entropy(a(_LOGITS), a(_LABELS), weight=w, reduction="sum"),
    "soft_target_cross_entropy: `weight`":
        lambda m, a, w: m.soft_target_cross_entropy(a(_LOGITS), a(_PROBS), weight=w,
                                                    reduction="sum"),
    "sigmoid_binary_cross_entropy: `pos_weight`":
        lambda m, a, w: m.sigmoid_binary_cross_entropy(a(_LOGITS), a(_PROBS), pos_weight=w,
                                                       reduction="sum"),
    "fused_linear_smoothed_cross_entropy: `class_weight`":
        lambda m, a, w: m.fused_linear_smoothed_cross_entropy(
            a(_HIDDEN), a(_OUTPUT), a(_LABELS), class_weight=w, reduction="sum"),
}  # fmt: skip


@pytest.mark.parametrize("named", list(_WEIGHTED))
def test_a_class_weight_being_differentiated_is_refused(named):
    """The class weights are constants of the losses. Differentiated, JAX's stop_gradient gave
    a silent zero derivative and lstorch's detach a missing one (``weight.grad is None``):
    plausible wrong numbers. Now a named error in both frameworks, under ``jax.grad`` and
    ``jax.jvp``, and for a tensor that requires grad or a ``torch.func.grad`` input (torch's
    ``F.cross_entropy`` refuses such a weight too). Not differentiated, a traced weight works."""
    call = _WEIGHTED[named]
    weights = np.linspace(0.5, 1.5, 5, dtype=np.float32)
    message = rf"^{named} is a constant of the loss \(its derivative is not computed\)"
    jax_loss = functools.partial(call, lsjax, jnp.asarray)
    for derivative in (jax.grad, lambda f: lambda w: jax.jvp(f, (w,), (w,))):
        with pytest.raises(TypeError, match=message):
            derivative(jax_loss)(jnp.asarray(weights))
    torch_loss = functools.partial(call, lstorch, torch.as_tensor)
    with pytest.raises(TypeError, match=message):
        torch_loss(torch.tensor(weights, requires_grad=True))
    with pytest.raises(TypeError, match=message):
        torch.func.grad(torch_loss)(torch.tensor(weights))
    # Constants they are: a traced or grad-requiring weight that is not differentiated works.
    want = float(torch_loss(torch.tensor(weights)))
    np.testing.assert_allclose(float(jax.jit(jax_loss)(jnp.asarray(weights))), want, rtol=1e-6)
    with torch.no_grad():
        got = torch_loss(torch.tensor(weights, requires_grad=True))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


# PyTorch only: one input of each call left on the CPU while the rest are on another device
# ("meta": shapes without storage, the one other device every machine has), as f(on, cpu).
_DEVICE_CALLS = [
    (lambda on, cpu: lstorch.smoothed_cross_entropy(on(_LOGITS), cpu(_LABELS)),
     "smoothed_cross_entropy: `labels` must be on the device of `logits`"),
    (lambda on, cpu: lstorch.smoothed_cross_entropy(
        on(_LOGITS), on(_LABELS), weight=cpu(_PROBS[0])),
     "smoothed_cross_entropy: `weight` must be on the device of `logits`"),
    (lambda on, cpu: lstorch.smoothed_cross_entropy(
        on(_LOGITS), on(_LABELS), class_mask=cpu(np.ones(5, bool))),
     "smoothed_cross_entropy: `class_mask` must be on the device of `logits`"),
    (lambda on, cpu: lstorch.SmoothedCrossEntropyLoss(weight=cpu(_PROBS[0]))(
        on(_LOGITS), on(_LABELS)),
     "SmoothedCrossEntropyLoss: `weight` must be on the device of `logits`"),
    (lambda on, cpu: lstorch.soft_target_cross_entropy(on(_LOGITS), cpu(_PROBS)),
     "soft_target_cross_entropy: `targets` must be on the device of `logits`"),
    (lambda on, cpu: lstorch.sigmoid_binary_cross_entropy(
        on(_LOGITS), on(_PROBS), pos_weight=cpu(_PROBS[0])),
     "sigmoid_binary_cross_entropy: `pos_weight` must be on the device of `logits`"),
    (lambda on, cpu: lstorch.fused_linear_smoothed_cross_entropy(
        on(_HIDDEN), cpu(_OUTPUT), on(_LABELS)),
     "fused_linear_smoothed_cross_entropy: `weight` must be on the device of `hidden`"),
    (lambda on, cpu: lstorch.fused_linear_smoothed_cross_entropy(
        on(_HIDDEN), on(_OUTPUT), on(_LABELS), where=cpu(np.ones(4, bool))),
     "fused_linear_smoothed_cross_entropy: `where` must be on the device of `hidden`"),
    (lambda on, cpu: lstorch.label_smoothing_loss(on(_LOGITS), cpu(_LABELS), classes=5),
     "label_smoothing_loss: `target` must be on the device of `pred`"),
    (lambda on, cpu: lstorch.compat.fairseq.label_smoothed_nll_loss(
        on(_LOGITS), cpu(_LABELS), 0.1),
     "label_smoothed_nll_loss: `target` must be on the device of `lprobs`"),
    (lambda on, cpu: lstorch.compat.t5x.compute_weighted_cross_entropy(
        on(_LOGITS), on(_LABELS), weights=cpu(_PROBS[:, 0])),
     "compute_weighted_cross_entropy: `weights` must be on the device of `logits`"),
    (lambda on, cpu: lstorch.compat.keras.categorical_crossentropy(cpu(_PROBS), on(_LOGITS)),
     "categorical_crossentropy: `y_true` must be on the device of `y_pred`"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "named"), _DEVICE_CALLS, ids=[n for _, n in _DEVICE_CALLS])
def test_an_input_on_another_device_is_named(call, named):
    """A tensor left on another device than the logits: torch's own error came from inside
    the loss and named neither the function nor the argument (and a Triton kernel would be
    handed a pointer it cannot read). Each entry point names both, as it names a bad shape."""

    def on(value):
        return torch.as_tensor(value, device="meta")

    with pytest.raises(ValueError, match=rf"^{named} \(meta\); got a tensor on cpu\."):
        call(on, torch.as_tensor)


def test_a_0d_cpu_option_is_a_scalar_on_any_device():
    """torch's ops take a 0-d CPU tensor as a scalar on any device, and so do the options of
    the losses (``pos_weight``, a 0-d ``where`` of one row); labels are not options: on the
    CPU they are refused as above, as torch's CUDA losses refuse them."""
    logits, probs = torch.as_tensor(_LOGITS, device="meta"), torch.as_tensor(_PROBS, device="meta")
    loss = lstorch.sigmoid_binary_cross_entropy(logits, probs, pos_weight=torch.tensor(2.0))
    assert loss.device.type == "meta" and loss.shape == (4, 5)
    row, label = torch.as_tensor(_LOGITS[0], device="meta"), torch.tensor(1, device="meta")
    loss = lstorch.smoothed_cross_entropy(row, label, smoothing=0.1, where=torch.tensor(True))
    assert loss.device.type == "meta" and loss.shape == ()
    with pytest.raises(ValueError, match=r"`labels` must be on the device of `logits` \(meta\)"):
        lstorch.smoothed_cross_entropy(row, torch.tensor(1), smoothing=0.1)


def test_keras_binary_crossentropy_of_0d_inputs_is_named_in_both_frameworks(framework):
    """Keras takes the mean over ``axis``, which a 0-d input does not have (lsjax raised
    ``jnp.mean``'s IndexError; lstorch returned a number)."""
    module, array = framework
    with pytest.raises(ValueError, match=r"^binary_crossentropy: `y_pred` must have at least one "
                       r"dimension, for the mean; got shape \(\)\.$"):  # fmt: skip
        module.compat.keras.binary_crossentropy(array(np.float32(1.0)), array(np.float32(0.3)))


def test_the_hf_label_smoothers_shift_needs_a_time_axis(framework):
    """``shift_labels=True`` on 1-D logits raised an IndexError from the slicing, and labels
    with a trailing axis of 1 were shifted along it ("got shape (1, 4, 0)")."""
    module, array = framework
    smoother = module.compat.hf.label_smoother
    with pytest.raises(
        ValueError,
        match=r"^label_smoother: `logits` must have a time axis "
        r"before the class axis for shift_labels=True .*; got shape \(5,\)",
    ):
        smoother(array(_LOGITS[0]), array(np.array(2)), shift_labels=True)
    with pytest.raises(
        ValueError,
        match=r"^label_smoother: `labels` must have no trailing axis "
        r"of 1 with shift_labels=True.*; got shape \(1, 4, 1\)",
    ):
        smoother(array(_LOGITS[None]), array(_LABELS[None, :, None]), shift_labels=True)
    # without the shift, HF's trailing axis of 1 is taken
    np.testing.assert_allclose(
        np.asarray(smoother(array(_LOGITS[None]), array(_LABELS[None, :, None]))),
        np.asarray(smoother(array(_LOGITS[None]), array(_LABELS[None]))),
    )


def test_soft_targets_over_no_class_are_named(framework):
    """K = 0: the smoothing's eps / K was 0/0, a NaN per row (the labelled losses raised)."""
    module, array = framework
    empty = array(np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match=r"^soft_target_cross_entropy: `logits` must have at "
                       r"least 1 class along the class axis; got 0\.$"):  # fmt: skip
        module.soft_target_cross_entropy(empty, empty)
    with pytest.raises(ValueError, match=r"^soft_target_cross_entropy: `x` must have at least"):
        module.compat.timm.soft_target_cross_entropy(empty, empty)


@pytest.mark.parametrize(
    ("module", "weight_name"),
    [
        ("SmoothedCrossEntropyLoss", "weight"),
        ("FusedLinearSmoothedCrossEntropyLoss", "class_weight"),
    ],
)
def test_a_module_checks_its_class_tensors_when_built(module, weight_name):
    """What needs no input is checked at construction, before training starts: a weight of
    two dimensions, an integer class mask, one that masks every class (these raised only in
    the first ``forward``)."""
    build = getattr(lstorch, module)
    with pytest.raises(ValueError, match=rf"^{module}: `{weight_name}` must have one dimension, "
                       r"\(K,\); got shape \(5, 1\)\.$"):  # fmt: skip
        build(**{weight_name: torch.ones(5, 1)})
    with pytest.raises(TypeError, match=rf"^{module}: `class_mask` must have dtype bool"):
        build(class_mask=torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=rf"^{module}: `class_mask` allows 0 class\(es\)"):
        build(class_mask=[False] * 5)


def test_a_module_refuses_a_complex_weight_when_built():
    with pytest.raises(TypeError, match=r"^SmoothedCrossEntropyLoss: `weight` must have a real"):
        lstorch.SmoothedCrossEntropyLoss(weight=torch.as_tensor(_COMPLEX))


def test_cross_entropy_mirror_names_itself_and_torchs_arguments():
    logits, labels = _data()
    with pytest.raises(
        ValueError, match=r"^cross_entropy: `label_smoothing` must be in \[0, 1\]; got 2\.0"
    ):
        lsjax.cross_entropy(logits, labels, label_smoothing=2.0)
    with pytest.raises(
        ValueError,
        match=r"^cross_entropy: `target` must have the input's shape without the class axis",
    ):
        lsjax.cross_entropy(logits, labels[:3])
    with pytest.raises(ValueError, match=r"^cross_entropy: `label_smoothing` must be in"):
        lsjax.cross_entropy(logits, np.full((4, 5), 0.2, np.float32), label_smoothing=-1.0)


def test_modules_name_themselves_and_their_arguments():
    logits, _ = _data()
    x = torch.as_tensor(logits)
    with pytest.raises(ValueError, match=r"^LabelSmoothingLoss: `smoothing` must be in \[0, 1\]"):
        lstorch.LabelSmoothingLoss(5, 1.2)
    with pytest.raises(ValueError, match=r"^LabelSmoothingLoss: `classes` must be an int >= 2"):
        lstorch.LabelSmoothingLoss(1, 0.1)
    with pytest.raises(ValueError, match=r"^LabelSmoothingLoss: `target` must lie in \[0, 4\]"):
        lstorch.LabelSmoothingLoss(5, 0.1)(x, torch.tensor([0, 1, 9, 2]))
    # OpenNMT's KL loss with a pad column needs 3 classes: said at construction, in its terms.
    with pytest.raises(
        ValueError, match=r"^KLLabelSmoothingLoss: `tgt_vocab_size` must be >= 3 with a pad column"
    ):
        lstorch.KLLabelSmoothingLoss(0.1, 2, ignore_index=0)
    with pytest.raises(
        ValueError, match=r"^KLLabelSmoothingLoss: `label_smoothing` must be in \(0, 1\]"
    ):
        lstorch.KLLabelSmoothingLoss(torch.tensor(0.0), 10)
    with pytest.raises(ValueError, match=r"^SmoothedCrossEntropyLoss: `smoothing` must be in"):
        lstorch.SmoothedCrossEntropyLoss(smoothing=torch.tensor(1.5))
    with pytest.raises(ValueError, match=r"^SmoothedCrossEntropyLoss: `z_loss` must be"):
        lstorch.SmoothedCrossEntropyLoss(z_loss=-1.0)
    with pytest.raises(ValueError, match=r"^SmoothedCrossEntropyLoss: `reduction` must be one of"):
        lstorch.SmoothedCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match=r"^SmoothedCrossEntropyLoss: `labels` must lie in"):
        lstorch.SmoothedCrossEntropyLoss()(x, torch.tensor([0, 1, 9, 2]))
    with pytest.raises(
        ValueError, match=r"^FusedLinearSmoothedCrossEntropyLoss: `chunk_size` must be"
    ):
        lstorch.FusedLinearSmoothedCrossEntropyLoss(chunk_size=0)
    fused = lstorch.FusedLinearSmoothedCrossEntropyLoss()
    with pytest.raises(ValueError, match=r"^FusedLinearSmoothedCrossEntropyLoss: `labels` must"):
        fused(x, torch.ones(3, 5), torch.tensor([0, 1, 9, 2]))


def test_calibration_takes_a_concrete_0d_array_temperature():
    from lsjax import calibration

    logits, labels = _data()
    expected = calibration.negative_log_likelihood(logits, labels, temperature=2.0)
    for temperature in (jnp.array(2.0), np.array(2.0), np.float32(2.0), jnp.array(2)):
        got = calibration.negative_log_likelihood(logits, labels, temperature=temperature)
        assert got == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0; got -1"):
        calibration.negative_log_likelihood(logits, labels, temperature=jnp.array(-1.0))
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
        calibration.negative_log_likelihood(logits, labels, temperature=jnp.array([2.0]))


def test_forum_and_opennmt_losses_check_their_constructor_arguments():
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


def test_cross_entropy_mirror_takes_ignore_index_with_probabilities_as_torch():
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
    # A negative ignore_index is accepted and unused with probabilities, by torch and by us.
    for ignore_index in (-1, -100):
        expected = torch.nn.functional.cross_entropy(
            torch.as_tensor(logits), torch.as_tensor(probabilities), ignore_index=ignore_index
        )
        got = lsjax.cross_entropy(logits, probabilities, ignore_index=ignore_index)
        np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Flags, scalar shapes and inputs that are not arrays: each refused with the function's name,
# where a truth test, a broadcast or an internal helper would otherwise decide.

_LOG_PROBS = _log_probs(_LOGITS)

# (call(module, array, value) passing `value` as the flag, the flag's name as the user wrote it)
FLAG_CALLS = [
    (lambda m, a, v: m.smoothed_cross_entropy(a(_LOGITS), a(_LABELS), kl=v), "kl"),
    (lambda m, a, v: m.smoothed_cross_entropy(a(_LOGITS), a(_LABELS), from_log_probs=v),
     "from_log_probs"),
    (lambda m, a, v: m.smoothed_cross_entropy(a(_LOGITS), a(_LABELS), return_z_loss=v),
     "return_z_loss"),
    (lambda m, a, v: m.smoothed_cross_entropy(a(_LOGITS), a(_LABELS), return_stats=v),
     "return_stats"),
    (lambda m, a, v: m.soft_target_cross_entropy(a(_LOGITS), a(_PROBS), from_log_probs=v),
     "from_log_probs"),
    (lambda m, a, v: m.fused_linear_smoothed_cross_entropy(
        a(_LOGITS), a(np.eye(5, dtype=np.float32)), a(_LABELS), kl=v), "kl"),
    (lambda m, a, v: m.compat.keras.categorical_crossentropy(a(_PROBS), a(_LOGITS),
                                                             from_logits=v), "from_logits"),
    (lambda m, a, v: m.compat.keras.binary_crossentropy(a(_PROBS), a(_LOGITS), from_logits=v),
     "from_logits"),
    (lambda m, a, v: m.compat.fairseq.label_smoothed_nll_loss(a(_LOG_PROBS), a(_LABELS), 0.1,
                                                              reduce=v), "reduce"),
    (lambda m, a, v: m.compat.hf.label_smoother(a(_LOGITS), a(_LABELS), shift_labels=v),
     "shift_labels"),
]  # fmt: skip


@pytest.mark.parametrize("value", ["False", 0, np.array(False)], ids=repr)
@pytest.mark.parametrize(("call", "flag"), FLAG_CALLS, ids=[f for _, f in FLAG_CALLS])
def test_a_flag_must_be_true_or_false(framework, call, flag, value):
    """``kl="False"`` is a truthy string: read as a flag, it would give the KL form."""
    module, array = framework
    with pytest.raises(TypeError, match=rf": `{flag}` must be True or False; got "):
        call(module, array, value)


def test_inplace_backward_must_be_true_or_false_and_leaves_the_logits_alone():
    """A truthy ``inplace_backward="False"`` would let backward overwrite the logits."""
    logits = torch.as_tensor(_LOGITS).requires_grad_(True) * 1.0
    before = logits.detach().clone()
    with pytest.raises(TypeError, match=r"`inplace_backward` must be True or False; got 'no'"):
        lstorch.smoothed_cross_entropy(logits, torch.as_tensor(_LABELS), inplace_backward="no")
    with pytest.raises(TypeError, match=r"^SmoothedCrossEntropyLoss: `kl` must be True or False"):
        lstorch.SmoothedCrossEntropyLoss(kl="False")
    with pytest.raises(TypeError, match=r"^SmoothedCrossEntropyLoss: `inplace_backward` must be"):
        lstorch.SmoothedCrossEntropyLoss(inplace_backward="yes")
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("name", ["smoothing", "z_loss"])
def test_a_scalar_option_of_shape_1_is_refused(framework, name):
    """A ``(1,)`` option would broadcast the per-row losses to ``(1, N)``."""
    module, array = framework
    message = rf"`{name}` must have a scalar shape \(\); got shape \(1,\)"
    with pytest.raises(ValueError, match=message):
        module.smoothed_cross_entropy(
            array(_LOGITS), array(_LABELS), **{name: array(np.array([0.1], np.float32))}
        )


def test_inputs_that_are_not_arrays_are_named():
    with pytest.raises(TypeError, match=r"^smoothed_cross_entropy: `logits` must be an array"):
        lsjax.smoothed_cross_entropy(None, _LABELS)
    with pytest.raises(TypeError, match=r"^smoothed_cross_entropy: `weight` must be an array"):
        lsjax.smoothed_cross_entropy(_LOGITS, _LABELS, weight="abc")
    with pytest.raises(TypeError, match=r"^cross_entropy: `target` must be an array"):
        lsjax.cross_entropy(_LOGITS, None)
    torch_labels = torch.as_tensor(_LABELS)
    with pytest.raises(
        TypeError,
        match=r"^smoothed_cross_entropy: `logits` must be a torch.Tensor \(torch.as_tensor"
        r"\(\.\.\.\) makes one\); got numpy.ndarray",
    ):
        lstorch.smoothed_cross_entropy(_LOGITS, torch_labels)
    with pytest.raises(TypeError, match=r"^label_smoother: `labels` must be a torch.Tensor; got "
                       r"NoneType"):  # fmt: skip
        lstorch.compat.hf.label_smoother(torch.as_tensor(_LOGITS), None)
    with pytest.raises(TypeError, match=r"^categorical_crossentropy: `y_true` must be a torch"):
        lstorch.compat.keras.categorical_crossentropy(None, torch.as_tensor(_LOGITS))
    with pytest.raises(TypeError, match=r"^SmoothedCrossEntropyLoss: `weight` must be a tensor"):
        lstorch.SmoothedCrossEntropyLoss(weight="abc")


def test_0d_logits_are_named_not_the_axis(framework):
    module, array = framework
    scalar = array(np.float32(1.0))
    with pytest.raises(ValueError, match=r"^soft_target_cross_entropy: `logits` must have at"):
        module.soft_target_cross_entropy(scalar, scalar)
    with pytest.raises(ValueError, match=r"^categorical_crossentropy: `y_pred` must have at least"):
        module.compat.keras.categorical_crossentropy(scalar, scalar)


def test_soft_target_where_must_be_boolean(framework):
    """A float mask of 0.5 and 2 would otherwise be cast to True."""
    module, array = framework
    with pytest.raises(TypeError, match=r"`where` must have dtype bool"):
        module.soft_target_cross_entropy(
            array(_LOGITS), array(_PROBS), where=array(np.array([1, 0.5, 0, 2], np.float32))
        )


def test_hf_label_smoother_takes_only_a_trailing_axis_of_1(framework):
    module, array = framework
    with pytest.raises(ValueError, match=r"^label_smoother: `labels` must have the logits' shape"):
        module.compat.hf.label_smoother(array(_LOGITS), array(np.tile(_LABELS[:, None], (1, 3))))
    trailing = module.compat.hf.label_smoother(array(_LOGITS), array(_LABELS[:, None]))
    plain = module.compat.hf.label_smoother(array(_LOGITS), array(_LABELS))
    assert float(trailing) == float(plain)


def test_t5x_weights_and_normalizing_factor_are_checked(framework):
    module, array = framework
    loss = module.compat.t5x.compute_weighted_cross_entropy
    logits, targets = array(_LOGITS), array(_LABELS)
    for shape in ((4, 1), (1,), (5,)):  # (4, 1) would broadcast against (4,) to (4, 4)
        with pytest.raises(ValueError, match=r"`weights` must have the targets' shape \(4,\)"):
            loss(logits, targets, weights=array(np.ones(shape, np.float32)))
    for factor in (0.0, -2.0, float("inf")):
        with pytest.raises(ValueError, match=r"`loss_normalizing_factor` must be a finite number"):
            loss(logits, targets, loss_normalizing_factor=factor)
    with pytest.raises(TypeError, match=r"`loss_normalizing_factor` must be a real number"):
        loss(logits, targets, loss_normalizing_factor="2")


def test_fused_head_with_no_hidden_features_is_named(framework):
    module, array = framework
    with pytest.raises(ValueError, match=r"`hidden` must have at least one feature"):
        module.fused_linear_smoothed_cross_entropy(
            array(np.zeros((4, 0), np.float32)), array(np.zeros((5, 0), np.float32)),
            array(_LABELS),
        )  # fmt: skip


def test_cross_entropy_mirror_ignore_index_with_probabilities_is_an_int_or_none():
    for bad in (-1.5, "a"):
        with pytest.raises(ValueError, match=r"^cross_entropy: `ignore_index` must be an int"):
            lsjax.cross_entropy(_LOGITS, _PROBS, ignore_index=bad)
    expected = torch.nn.functional.cross_entropy(torch.as_tensor(_LOGITS), torch.as_tensor(_PROBS))
    got = lsjax.cross_entropy(_LOGITS, _PROBS, ignore_index=None)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6)


def test_cross_entropy_mirror_takes_torchs_later_arguments_by_keyword_only():
    """torch's fourth position is its deprecated ``size_average``, not ``ignore_index``."""
    with pytest.raises(TypeError, match="positional"):
        lsjax.cross_entropy(_LOGITS, _LABELS, None, 2)


def test_calibration_refuses_a_complex_temperature():
    import lsjax.calibration

    for temperature in (np.array(2 + 0j), jnp.array(2 + 0j)):
        with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
            lsjax.calibration.negative_log_likelihood(_LOGITS, _LABELS, temperature=temperature)


def test_compute_loss_func_checks_option_values_before_training():
    from lstorch.integrations.huggingface import compute_loss_func

    for options, message in (
        ({"softcap": 0.0}, r"`softcap` must be None or a finite number > 0"),
        ({"logit_scale": -1.0}, r"`logit_scale` must be a finite number > 0"),
        ({"kl": "no"}, r"`kl` must be True or False"),
        ({"inplace_backward": 1}, r"`inplace_backward` must be True or False"),
    ):
        with pytest.raises((TypeError, ValueError), match=rf"^compute_loss_func: {message}"):
            compute_loss_func(**options)


def test_an_ignore_index_beyond_int64_matches_no_label(framework):
    """As in lsjax, an index the labels cannot hold ignores nothing (lstorch overflowed)."""
    module, array = framework
    expected = torch.nn.functional.cross_entropy(
        torch.as_tensor(_LOGITS), torch.as_tensor(_LABELS), label_smoothing=0.1, reduction="none"
    )
    got = module.smoothed_cross_entropy(
        array(_LOGITS), array(_LABELS), smoothing=0.1, ignore_index=2**70
    )
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6)
