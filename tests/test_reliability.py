"""Non-finite inputs, every transformation users apply, determinism, in both frameworks, and
torch's default dtype.

Expected values come from torch's own functions (hvp, F.cross_entropy), from the plain eager
call of the same loss (itself checked against the float64 oracle in test_parity/test_properties),
or need none (finiteness, bitwise equality).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lsjax
import lstorch
from parity_tests import oracles, paths
from parity_tests.compare import output_leaves
from parity_tests.registry import TWINS

CONFIGS = [
    dict(smoothing=0.1, reduction="mean", ignore_index=-100),
    dict(smoothing=0.4, convention="others", reduction="sum", ignore_index=-100),
    dict(smoothing=0.7, convention="others_but_pad", pad_index=3, reduction="none"),
    dict(smoothing=1.0, convention="others", kl=True, reduction="mean", ignore_index=-100),
]


def _data(rows=7, classes=6, seed=0):
    rng = np.random.default_rng(seed)
    logits = 3 * rng.standard_normal((rows, classes))
    labels = rng.integers(0, classes, size=rows)
    labels[1] = -100
    return logits, labels


def _labels_for(config, labels):
    return labels if config.get("ignore_index") == -100 else np.where(labels < 0, 3, labels)


def _both(logits, labels, config):
    """(loss, grad) from each framework for sum(loss) in float64."""
    out = {}
    value, grad = jax.value_and_grad(
        lambda x: jnp.sum(lsjax.smoothed_cross_entropy(x, jnp.asarray(labels), **config))
    )(jnp.asarray(logits))
    out["jax"] = (np.asarray(value), np.asarray(grad))
    x = torch.tensor(logits, requires_grad=True)
    loss = lstorch.smoothed_cross_entropy(x, torch.tensor(labels), **config).sum()
    loss.backward()
    out["torch"] = (loss.detach().numpy(), x.grad.numpy())
    return out


# ---------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_non_finite_in_a_row_that_does_not_count_reaches_nothing(config, bad):
    logits, labels = _data()
    labels = _labels_for(config, labels)
    uncounted = 1 if config.get("ignore_index") == -100 else int(np.flatnonzero(labels == 3)[0])
    clean = _both(logits, labels, config)
    logits[uncounted, :] = bad
    for framework, (value, grad) in _both(logits, labels, config).items():
        assert np.isfinite(value) and np.isfinite(grad).all(), framework
        assert not grad[uncounted].any(), framework
        np.testing.assert_allclose(value, clean[framework][0], rtol=1e-12)
        np.testing.assert_allclose(grad, clean[framework][1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_in_a_where_false_row_reaches_nothing(bad):
    logits, labels = _data()
    labels = np.where(labels < 0, 0, labels)
    where = np.ones(7, bool)
    where[4] = False
    logits[4, 2] = bad
    value, grad = jax.value_and_grad(
        lambda x: lsjax.smoothed_cross_entropy(
            x, labels, smoothing=0.2, where=jnp.asarray(where), reduction="mean"
        )
    )(logits)
    assert np.isfinite(value) and np.isfinite(grad).all() and not grad[4].any()
    x = torch.tensor(logits, requires_grad=True)
    loss = lstorch.smoothed_cross_entropy(
        x, torch.tensor(labels), smoothing=0.2, where=torch.tensor(where), reduction="mean"
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and not x.grad[4].any()


MASKED_CONFIGS = [*CONFIGS, dict(smoothing=0.3, softcap=5.0, logit_scale=0.5, z_loss=1e-3)]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, 1e30])
@pytest.mark.parametrize("config", MASKED_CONFIGS, ids=str)
def test_a_masked_column_holding_inf_or_a_huge_logit_reaches_nothing(config, bad):
    """``class_mask`` takes its columns out of the softmax and the support, whatever they hold:
    +inf, -inf or a logit far above the allowed ones there give the loss and gradient of the
    float64 oracle on the allowed columns, and those columns a zero gradient (what a NaN there
    gives is in docs/options.md: it differs between the frameworks)."""
    logits, labels = _data()
    labels = _labels_for(config, labels)
    class_mask = np.ones(6, bool)
    class_mask[[1, 4]] = False  # the pad (3) stays allowed
    labels = np.where(np.isin(labels, [1, 4]), 0, labels)
    config = {**config, "class_mask": class_mask}
    expected, vjp = oracles.smoothed_cross_entropy(logits, labels, **config)
    expected_grad = vjp(np.ones_like(expected))
    logits[:, ~class_mask] = bad
    for framework, (value, grad) in _both(logits, labels, config).items():
        np.testing.assert_allclose(value, np.sum(expected), rtol=1e-12, err_msg=framework)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-12, err_msg=framework)
        assert not grad[:, ~class_mask].any(), framework


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_nan_in_a_counted_row_propagates(config):
    logits, labels = _data()
    labels = _labels_for(config, labels)
    logits[0, 2] = np.nan  # row 0 counts in every config
    for framework, (value, grad) in _both(logits, labels, config).items():
        assert np.isnan(value), framework
        assert np.isnan(grad[0]).all(), framework
        assert np.isfinite(np.delete(grad, 0, axis=0)).all(), framework  # other rows unharmed


def test_minus_inf_logit_without_a_class_mask_gives_an_honest_inf():
    # SEMANTICS §7: with no class mask, the uniform term of a class at -inf is +inf.
    logits, labels = _data()
    labels = np.where(labels < 0, 0, labels)
    logits[:, 5] = -np.inf
    labels[labels == 5] = 0
    rows = lsjax.smoothed_cross_entropy(logits, labels, smoothing=0.1)
    assert np.isposinf(rows).all()
    no_smoothing = lsjax.smoothed_cross_entropy(logits, labels, smoothing=0.0)
    assert np.isfinite(no_smoothing).all()  # eps = 0 never multiplies the inf (no 0 * inf NaN)
    torch_rows = lstorch.smoothed_cross_entropy(
        torch.tensor(logits), torch.tensor(labels), smoothing=0.0
    )
    np.testing.assert_allclose(torch_rows.numpy(), no_smoothing, rtol=1e-12)


def test_forward_mode_at_smoothing_0_with_a_minus_inf_logit():
    """With a -inf logit the smoothing slope is +inf (one-sided, at 0). A jvp that leaves the
    smoothing still is exact where that tangent is a symbolic zero (lsjax, the smoothing closed
    over) or a zero lstorch's jvp multiplies safely; an explicit zero tangent in lsjax gives
    NaN (0 * inf: its tangent must stay linear for jax.grad to transpose it), as
    docs/options.md says. Against the float64 oracle's vjp."""
    rng = np.random.default_rng(3)
    logits, labels = rng.standard_normal((4, 6)), np.array([0, 1, 2, 3])
    logits[:, 5] = -np.inf
    tangent = rng.standard_normal(logits.shape)
    value, vjp = oracles.smoothed_cross_entropy(logits, labels, smoothing=0.0, reduction="sum")
    expected = np.sum(vjp(np.ones(())) * tangent)  # the -inf column's gradient is exactly 0

    def loss(x, smoothing):
        return lsjax.smoothed_cross_entropy(x, labels, smoothing=smoothing, reduction="sum")

    got = jax.jvp(lambda x: loss(x, 0.0), (jnp.asarray(logits),), (jnp.asarray(tangent),))
    np.testing.assert_allclose(got, (value, expected), rtol=1e-12)
    explicit = jax.jvp(loss, (jnp.asarray(logits), 0.0), (jnp.asarray(tangent), 0.0))[1]
    assert np.isnan(explicit)
    torch_got = torch.func.jvp(
        lambda x, eps: lstorch.smoothed_cross_entropy(
            x, torch.as_tensor(labels), smoothing=eps, reduction="sum"
        ),
        (torch.as_tensor(logits), torch.tensor(0.0, dtype=torch.float64)),
        (torch.as_tensor(tangent), torch.tensor(0.0, dtype=torch.float64)),
    )
    np.testing.assert_allclose([float(t) for t in torch_got], (value, expected), rtol=1e-12)


# ------------------------------------------------------------------------- JAX transformations


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_jacfwd_equals_jacrev(config):
    logits, labels = _data(rows=3, classes=4)
    labels = np.where(labels < 0, 0, labels) if config.get("ignore_index") != -100 else labels
    config = {**config, "pad_index": 3} if "pad_index" in config else config
    fn = functools.partial(lsjax.smoothed_cross_entropy, labels=jnp.asarray(labels), **config)
    forward = jax.jacfwd(fn)(jnp.asarray(logits))
    reverse = jax.jacrev(fn)(jnp.asarray(logits))
    np.testing.assert_allclose(forward, reverse, rtol=1e-12, atol=1e-15)


def test_checkpoint_and_donation_change_nothing():
    logits, labels = _data(rows=33, classes=101)
    labels = np.where(labels < 0, 0, labels)
    loss = functools.partial(lsjax.smoothed_cross_entropy, smoothing=0.1, reduction="mean")
    plain = jax.jit(jax.value_and_grad(loss))(jnp.asarray(logits), jnp.asarray(labels))
    remat = jax.jit(jax.value_and_grad(jax.checkpoint(loss)))(
        jnp.asarray(logits), jnp.asarray(labels)
    )
    donated = jax.jit(jax.value_and_grad(loss), donate_argnums=0)(
        jnp.asarray(logits), jnp.asarray(labels)
    )
    for value, grad in (remat, donated):
        np.testing.assert_array_equal(value, plain[0])
        np.testing.assert_array_equal(grad, plain[1])


# ----------------------------------------------------------------------- torch transformations


def _torch_loss(labels, config):
    return functools.partial(lstorch.smoothed_cross_entropy, labels=torch.tensor(labels), **config)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_torch_func_grad_and_vmap(config):
    logits = np.stack([_data(seed=s)[0] for s in range(3)])
    labels = _labels_for(config, _data()[1])
    loss = _torch_loss(labels, config)
    scalar = lambda x: loss(x).sum()  # noqa: E731
    batched = torch.func.vmap(torch.func.grad(scalar))(torch.tensor(logits))
    for index in range(3):
        x = torch.tensor(logits[index], requires_grad=True)
        scalar(x).backward()
        torch.testing.assert_close(batched[index], x.grad, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(
            torch.func.grad(scalar)(torch.tensor(logits[index])), x.grad, rtol=1e-12, atol=1e-15
        )


def test_torch_compile_fullgraph_with_reduction_none():
    torch._dynamo.reset()
    logits, labels = _data()
    config = dict(smoothing=0.3, convention="others", ignore_index=-100, reduction="none")
    loss = _torch_loss(labels, config)
    compiled = torch.compile(loss, fullgraph=True)
    cotangent = torch.linspace(0.5, 1.5, 7, dtype=torch.float64)  # a non-scalar upstream grad
    eager_x = torch.tensor(logits, requires_grad=True)
    compiled_x = torch.tensor(logits, requires_grad=True)
    eager, compiled_out = loss(eager_x), compiled(compiled_x)
    eager.backward(cotangent)
    compiled_out.backward(cotangent)
    torch.testing.assert_close(compiled_out, eager, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_bitwise_deterministic_across_calls(config):
    logits, labels = _data(rows=257, classes=1001)
    labels = _labels_for(config, labels)
    first, second = _both(logits, labels, config), _both(logits, labels, config)
    for framework in first:
        for a, b in zip(first[framework], second[framework], strict=True):
            assert a.tobytes() == b.tobytes(), framework
    jitted = jax.jit(
        jax.value_and_grad(
            lambda x: jnp.sum(lsjax.smoothed_cross_entropy(x, jnp.asarray(labels), **config))
        )
    )
    runs = [jitted(jnp.asarray(logits, jnp.float32)) for _ in range(2)]
    assert np.asarray(runs[0][0]).tobytes() == np.asarray(runs[1][0]).tobytes()
    assert np.asarray(runs[0][1]).tobytes() == np.asarray(runs[1][1]).tobytes()


# ------------------------------------------------------------------------- torch's default dtype


def _torch_call(twin, index, dtype):
    """The twin's PyTorch call on registry case ``index`` in ``dtype`` (its other floating
    arrays in float32): the outputs' leaves and the gradient of their sum, as tensors."""
    args, kwargs = twin.make_inputs(np.random.default_rng(index), dict(twin.cases[index]))

    def tensor(value, floating):
        if not isinstance(value, np.ndarray):
            return value
        if np.issubdtype(value.dtype, np.floating):
            return torch.tensor(value, dtype=floating)
        return torch.from_numpy(value)

    x = tensor(np.asarray(args[0]), dtype).requires_grad_(True)
    rest = [tensor(value, torch.float32) for value in args[1:]]
    options = {key: tensor(value, torch.float32) for key, value in kwargs.items()}
    leaves = output_leaves(twin.torch_fn(x, *rest, **options))
    total = sum(leaf.double().sum() for leaf in leaves if leaf.requires_grad)
    (grad,) = torch.autograd.grad(total, x)
    return [leaf.detach() for leaf in leaves], grad


@pytest.mark.parametrize(
    "twin", [twin for twin in TWINS if "torch" in twin.ours], ids=lambda twin: twin.name
)
def test_torch_default_dtype_float64_changes_no_output(twin):
    """``torch.set_default_dtype(torch.float64)``, as scientific code sets it, changes neither
    the dtype nor a bit of any output or gradient of float32 and bf16 logits. A fill built from
    two Python numbers takes the default dtype: ``soft_target_cross_entropy``'s NaN-or-0 fill
    made its float32 loss (and T5X's and Keras's over it) come back float64."""
    cover = [(index, dtype) for index, dtype in paths.twin_cover(twin) if dtype != "float64"]
    for index, name in cover[:4]:
        dtype = getattr(torch, name)
        expected, expected_grad = _torch_call(twin, index, dtype)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            leaves, grad = _torch_call(twin, index, dtype)
        finally:
            torch.set_default_dtype(previous)
        assert len(leaves) == len(expected), index
        for leaf, want in zip([*leaves, grad], [*expected, expected_grad], strict=True):
            # the same dtype (checked by default) and the same values, NaN where NaN
            torch.testing.assert_close(leaf, want, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------ JAX's strict dtype promotion


def _jax_call(twin, index, dtype):
    """The twin's JAX call on registry case ``index`` in ``dtype`` (its other floating arrays
    in float32): the outputs' leaves and the gradient of their sum."""
    args, kwargs = twin.make_inputs(np.random.default_rng(index), dict(twin.cases[index]))

    def array(value, floating):
        if not isinstance(value, np.ndarray):
            return value
        return jnp.asarray(value, floating if np.issubdtype(value.dtype, np.floating) else None)

    rest = [array(value, jnp.float32) for value in args[1:]]
    options = {key: array(value, jnp.float32) for key, value in kwargs.items()}

    def total(x):
        leaves = output_leaves(twin.jax_fn(x, *rest, **options))
        floating = [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
        return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in floating), leaves

    grad, leaves = jax.grad(total, has_aux=True)(array(np.asarray(args[0]), dtype))
    return [np.asarray(leaf) for leaf in leaves], np.asarray(grad)


@pytest.mark.parametrize(
    "twin", [twin for twin in TWINS if "jax" in twin.ours], ids=lambda twin: twin.name
)
def test_jax_strict_dtype_promotion_changes_no_output(twin):
    """Under ``jax.numpy_dtype_promotion("strict")`` (no implicit promotion between dtypes of
    one kind, bf16 -> float32 included) every JAX twin runs, with the outputs and gradient of
    the default promotion, bit for bit and dtype for dtype. It raised for bf16 logits in every
    twin (``jnp.promote_types(bf16, float32)`` for the compute dtype), and for a class mask
    (an integer class count met float sums)."""
    cover = [(index, dtype) for index, dtype in paths.twin_cover(twin) if dtype != "float64"]
    masked = [(i, d) for i, d in cover if "mask" in str(twin.cases[i]).lower()]
    for index, name in list(dict.fromkeys(cover[:2] + masked[:1])):
        dtype = getattr(jnp, name)
        expected, expected_grad = _jax_call(twin, index, dtype)
        with jax.numpy_dtype_promotion("strict"):
            leaves, grad = _jax_call(twin, index, dtype)
        for leaf, want in zip([*leaves, grad], [*expected, expected_grad], strict=True):
            assert leaf.dtype == want.dtype, (twin.name, index)
            np.testing.assert_array_equal(leaf, want, strict=True)
