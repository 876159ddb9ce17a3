"""The derivative of every loss with respect to its options ``smoothing`` and ``z_loss``.

A learned or scheduled smoothing (or z-loss weight) trains only if ``d loss / d smoothing`` and
``d loss / d z_loss`` are the true derivatives, not a silent 0. Checked in both frameworks, in
float64, for ``smoothed_cross_entropy`` (every convention, with weights, a class mask, ignored
rows, ``where``, the KL form, log-probabilities, the z-loss, every reduction and a normaliser),
what is built on it (the torch module, compat twins, the forum's and OpenNMT's functions),
``soft_target_cross_entropy``, ``sigmoid_binary_cross_entropy`` and
``fused_linear_smoothed_cross_entropy``; under ``jax.jit``/``jax.vmap`` and ``torch.func``;
and on lstorch's Triton path (its kernels in Triton's interpreter on a CPU).

Expected values: central finite differences in float64 of the loss VALUE (the value itself is
proven against the float64 oracles by tests/test_parity.py). At smoothing 0 and 1 a central
difference would step outside [0, 1]: there the expectation is the closed form of
``parity_tests.oracles.smoothed_cross_entropy_option_derivatives`` (checked against finite
differences in tests/test_oracles.py), and the one-sided difference where that is finite. With
``kl=True`` the KL constant's derivative is infinite there (``x log x`` at 0): the documented
one-sided limit, ``-inf`` at smoothing 0, ``+inf`` at smoothing 1 for ``"others"`` and
``"others_but_pad"`` (the target's mass ``1 - eps`` reaches 0) and finite for ``"uniform"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lsjax
import lstorch
from parity_tests import oracles

# Every loss here is linear in smoothing and in z_loss but for the KL constant (whose third
# derivative is ~2/eps^2 at eps = 0.1): a central difference with this step is exact to ~1e-10
# of the loss's size (float64 rounding over the step), far inside the tolerance.
STEP = 1e-5
RTOL, ATOL = 1e-7, 1e-8
SMOOTHINGS = (0.1, 0.5, 0.9)
CONVENTIONS = ("uniform", "others", "others_but_pad")
CLASSES, PAD, MASKED = 6, 1, 4
FRAMEWORKS = ("jax", "torch")


# ---------------------------------------------------------------------------------------------
# One objective per framework: (smoothing, z_loss) -> the scalar sum(cotangent * output).


def _to(framework, value):
    if not isinstance(value, np.ndarray):
        return value
    return jnp.asarray(value) if framework == "jax" else torch.as_tensor(value)


def _objective(framework, fn, inputs, options, cotangent, z_keyword=None, eps_keyword="smoothing"):
    """``(smoothing, z_loss) -> sum(cotangent * loss) + 0.5 * sum(cotangent * z_part)``; the
    z-part is weighted apart so that its own derivative is checked too."""
    inputs = [_to(framework, value) for value in inputs]
    options = {key: _to(framework, value) for key, value in options.items()}
    cot = _to(framework, cotangent)

    def objective(smoothing, z_loss):
        kwargs = dict(options)
        kwargs[eps_keyword] = smoothing
        if z_keyword is not None:
            kwargs[z_keyword] = z_loss
        out = fn(*inputs, **kwargs)
        parts = out if isinstance(out, tuple) else (out,)
        total = 0.0
        for scale, part in zip((1.0, 0.5), parts[:2], strict=False):
            total = total + scale * (part * cot if part.ndim else part).sum()
        return total

    return objective


def _value(objective, smoothing, z_loss):
    return float(objective(smoothing, z_loss))


def _central(objective, smoothing, z_loss):
    """(d / d smoothing, d / d z_loss) by central differences of the value."""
    d_eps = _value(objective, smoothing + STEP, z_loss) - _value(
        objective, smoothing - STEP, z_loss
    )
    if z_loss < STEP:  # z_loss >= 0 is required; the loss is linear in it: a forward difference
        d_z = 2 * (
            _value(objective, smoothing, z_loss + STEP) - _value(objective, smoothing, z_loss)
        )
    else:
        d_z = _value(objective, smoothing, z_loss + STEP) - _value(
            objective, smoothing, z_loss - STEP
        )
    return d_eps / (2 * STEP), d_z / (2 * STEP)


def _derivatives(framework, objective, smoothing, z_loss, with_z):
    """(d / d smoothing, d / d z_loss) by the framework's autodiff (None: z not an option)."""
    if framework == "jax":
        d_eps, d_z = jax.grad(objective, argnums=(0, 1))(
            jnp.float64(smoothing), jnp.float64(z_loss)
        )
        return float(d_eps), float(d_z) if with_z else None
    eps = torch.tensor(smoothing, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(z_loss, dtype=torch.float64, requires_grad=with_z)
    value = objective(eps, z)
    assert value.requires_grad, "the loss does not require grad while its smoothing does"
    wrt = (eps, z) if with_z else (eps,)
    grads = torch.autograd.grad(value, wrt)
    return float(grads[0]), float(grads[1]) if with_z else None


def _check(framework, objective, smoothing, z_loss=0.0, with_z=False, label=""):
    d_eps, d_z = _derivatives(framework, objective, smoothing, z_loss, with_z)
    expected_eps, expected_z = _central(objective, smoothing, z_loss)
    message = f"{framework} {label} smoothing={smoothing}"
    np.testing.assert_allclose(d_eps, expected_eps, rtol=RTOL, atol=ATOL, err_msg=message)
    if with_z:
        np.testing.assert_allclose(d_z, expected_z, rtol=RTOL, atol=ATOL, err_msg=message)


# ---------------------------------------------------------------------------------------------
# smoothed_cross_entropy


CORE_CASES = {
    "none": dict(reduction="none"),
    "weight-ignored-mean": dict(weight=True, ignore_index=-100, reduction="mean"),
    "class_mask-sum": dict(class_mask=True, reduction="sum"),
    "where-kl-mean": dict(where=True, kl=True, reduction="mean"),
    "log_probs-kl-ignored-sum": dict(
        from_log_probs=True, kl=True, ignore_index=-100, reduction="sum"
    ),
    "z_loss-ignored-mean": dict(
        z_loss=0.05, return_z_loss=True, ignore_index=-100, reduction="mean"
    ),
    "class_mask-kl-z_loss-none": dict(class_mask=True, kl=True, z_loss=0.02, reduction="none"),
    "axis-normalizer": dict(axis=1, normalizer=13.0, reduction="mean"),
}


def core_inputs(convention, case, seed=0):
    """(logits, labels), options and a cotangent for ``smoothed_cross_entropy``, NumPy float64."""
    rng = np.random.default_rng(seed)
    options = dict(case, convention=convention)
    axis = options.get("axis", -1)
    shape = (3, CLASSES, 3) if axis == 1 else (9, CLASSES)
    logits = 3.0 * rng.standard_normal(shape)
    row_shape = tuple(size for dim, size in enumerate(shape) if dim != axis % len(shape))
    labels = rng.choice([0, 1, 2, 3, 5], size=row_shape)  # never the maskable class 4
    if options.get("ignore_index") is not None:
        labels.reshape(-1)[::4] = options["ignore_index"]
    if convention == "others_but_pad":
        options["pad_index"] = PAD  # rows labelled with it count for nothing
    if options.pop("weight", False):
        options["weight"] = np.linspace(0.5, 2.0, CLASSES)
    if options.pop("class_mask", False):
        options["class_mask"] = np.arange(CLASSES) != MASKED
    if options.pop("where", False):
        options["where"] = rng.uniform(size=row_shape) < 0.7
    if options.get("from_log_probs"):
        logits = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    cotangent = rng.uniform(0.5, 1.5, size=row_shape)
    return (logits, labels), options, cotangent


def _core_fn(framework):
    return lsjax.smoothed_cross_entropy if framework == "jax" else lstorch.smoothed_cross_entropy


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("case", CORE_CASES, ids=str)
def test_smoothed_cross_entropy_derivatives_equal_finite_differences(framework, convention, case):
    inputs, options, cotangent = core_inputs(convention, CORE_CASES[case])
    z_loss = options.pop("z_loss", None)
    with_z = z_loss is not None
    objective = _objective(
        framework, _core_fn(framework), inputs, options, cotangent, "z_loss" if with_z else None
    )
    for smoothing in SMOOTHINGS:
        _check(framework, objective, smoothing, z_loss or 0.0, with_z, label=case)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("kl", [False, True], ids=["ce", "kl"])
def test_at_smoothing_zero_and_one_the_derivative_is_the_one_sided_one(framework, convention, kl):
    """Non-KL losses are linear in smoothing: the one-sided difference is exact there, and the
    oracle's closed form agrees. With ``kl=True`` the derivative is the one-sided limit of the
    KL constant's: -inf at 0, +inf at 1 where the target's own mass vanishes (not uniform)."""
    case = dict(ignore_index=-100, reduction="sum", kl=kl)
    inputs, options, cotangent = core_inputs(convention, case, seed=3)
    objective = _objective(framework, _core_fn(framework), inputs, options, cotangent)
    for smoothing, side in ((0.0, 1.0), (1.0, -1.0)):
        d_eps, _ = _derivatives(framework, objective, smoothing, 0.0, False)
        expected, _ = oracles.smoothed_cross_entropy_option_derivatives(
            *inputs, smoothing=smoothing, **options
        )
        label = f"{framework} smoothing={smoothing}"
        np.testing.assert_allclose(d_eps, expected, rtol=RTOL, atol=ATOL, err_msg=label)
        if np.isfinite(expected):
            step = side * STEP
            one_sided = (
                _value(objective, smoothing + step, 0.0) - _value(objective, smoothing, 0.0)
            ) / step
            # Exact for a loss linear in smoothing; the uniform KL constant at 1 is curved
            # (second derivative ~ K/|S| there), which a one-sided difference sees at O(step).
            tolerance = 1e-3 if kl else RTOL
            np.testing.assert_allclose(d_eps, one_sided, rtol=tolerance, atol=ATOL, err_msg=label)
    if kl:  # the documented one-sided limits
        assert _derivatives(framework, objective, 0.0, 0.0, False)[0] == -np.inf
        at_one = _derivatives(framework, objective, 1.0, 0.0, False)[0]
        assert np.isfinite(at_one) if convention == "uniform" else at_one == np.inf


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_z_loss_that_starts_at_zero_has_its_derivative(framework):
    """A z-loss schedule that starts at 0 (a traced/tensor 0, not the Python number)."""
    inputs, options, cotangent = core_inputs("others", dict(ignore_index=-100, reduction="mean"))
    for return_z_loss in (False, True):
        options["return_z_loss"] = return_z_loss
        objective = _objective(framework, _core_fn(framework), inputs, options, cotangent, "z_loss")
        _check(framework, objective, 0.1, 0.0, True, label=f"return_z_loss={return_z_loss}")


# ---------------------------------------------------------------------------------------------
# Everything built on them: torch module, the forum's and OpenNMT's functions, compat twins.


def _one_hot(framework, labels):
    if framework == "jax":
        return jax.nn.one_hot(labels, CLASSES, dtype=jnp.float64)
    return torch.nn.functional.one_hot(labels, CLASSES).to(torch.float64)


def _built_on(framework):
    lib = lsjax if framework == "jax" else lstorch
    return {
        "label_smoothing_loss": (
            lambda x, y, **kw: lib.label_smoothing_loss(x, y, classes=CLASSES, **kw),
            "smoothing",
            None,
        ),
        "kl_label_smoothing_loss": (
            lambda x, y, **kw: lib.kl_label_smoothing_loss(
                x, y, tgt_vocab_size=CLASSES, ignore_index=PAD, **kw
            ),
            "label_smoothing",
            None,
        ),
        "hf.label_smoother": (lib.compat.hf.label_smoother, "epsilon", None),
        "fairseq.label_smoothed_nll_loss": (
            lambda x, y, **kw: lib.compat.fairseq.label_smoothed_nll_loss(
                x, y, ignore_index=-100, **kw
            ),
            "epsilon",
            None,
        ),
        "timm.label_smoothing_cross_entropy": (
            lib.compat.timm.label_smoothing_cross_entropy,
            "smoothing",
            None,
        ),
        "t5x.compute_weighted_cross_entropy": (
            lambda x, y, **kw: lib.compat.t5x.compute_weighted_cross_entropy(x, y, **kw)[:1],
            "label_smoothing",
            "z_loss",
        ),
        "keras.categorical_crossentropy": (  # over soft_target_cross_entropy
            lambda x, y, **kw: lib.compat.keras.categorical_crossentropy(
                _one_hot(framework, y), x, from_logits=True, **kw
            ),
            "label_smoothing",
            None,
        ),
        "keras.binary_crossentropy": (  # over sigmoid_binary_cross_entropy
            lambda x, y, **kw: lib.compat.keras.binary_crossentropy(
                _one_hot(framework, y), x, from_logits=True, **kw
            ),
            "label_smoothing",
            None,
        ),
    }


BUILT_ON = list(_built_on("jax"))


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("name", BUILT_ON)
def test_functions_built_on_them_have_the_derivative(framework, name):
    fn, eps_keyword, z_keyword = _built_on(framework)[name]
    rng = np.random.default_rng(5)
    logits = 3.0 * rng.standard_normal((8, CLASSES))
    labels = rng.choice([0, 2, 3, 5], size=8)
    if name.startswith(("fairseq", "kl_")):
        logits = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # log-probabilities
    if name.startswith(("fairseq", "hf")):
        labels[::3] = -100
    objective = _objective(framework, fn, (logits, labels), {}, 1.0, z_keyword, eps_keyword)
    with_z = z_keyword is not None
    for smoothing in (0.3, 0.7):
        _check(framework, objective, smoothing, 0.01 if with_z else 0.0, with_z, label=name)


def test_a_learned_smoothing_parameter_of_the_torch_module_gets_its_gradient():
    rng = np.random.default_rng(6)
    logits = torch.as_tensor(3.0 * rng.standard_normal((8, CLASSES)))
    labels = torch.as_tensor(rng.choice([0, 2, 3, 5], size=8))
    labels[::3] = -100
    smoothing = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
    module = lstorch.SmoothedCrossEntropyLoss(smoothing=smoothing, convention="others")
    assert any(parameter is smoothing for parameter in module.parameters())
    module(logits, labels).backward()

    def value(eps):
        return float(
            lstorch.smoothed_cross_entropy(
                logits,
                labels,
                smoothing=eps,
                convention="others",
                ignore_index=-100,
                reduction="mean",
            )
        )

    expected = (value(0.2 + STEP) - value(0.2 - STEP)) / (2 * STEP)
    np.testing.assert_allclose(float(smoothing.grad), expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# soft_target_cross_entropy and sigmoid_binary_cross_entropy


SOFT_CASES = {
    "none": dict(reduction="none"),
    "weight-where-mean": dict(weight=True, where=True, reduction="mean"),
    "log_probs-sum": dict(from_log_probs=True, reduction="sum"),
    "z_loss-weight-none": dict(weight=True, z_loss=0.05, return_z_loss=True, reduction="none"),
    "z_loss-where-mean": dict(where=True, z_loss=0.03, reduction="mean"),
}


def soft_inputs(case, seed=1):
    rng = np.random.default_rng(seed)
    options = dict(case)
    logits = 3.0 * rng.standard_normal((7, CLASSES))
    targets = rng.dirichlet(np.ones(CLASSES), size=7)
    if options.pop("weight", False):
        options["weight"] = np.linspace(0.5, 2.0, CLASSES)
    if options.pop("where", False):
        options["where"] = np.arange(7) % 3 != 1
    if options.get("from_log_probs"):
        logits = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return (logits, targets), options, rng.uniform(0.5, 1.5, size=7)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", SOFT_CASES, ids=str)
def test_soft_target_cross_entropy_derivatives_equal_finite_differences(framework, case):
    inputs, options, cotangent = soft_inputs(SOFT_CASES[case])
    z_loss = options.pop("z_loss", None)
    with_z = z_loss is not None
    fn = (
        lsjax.soft_target_cross_entropy if framework == "jax" else lstorch.soft_target_cross_entropy
    )
    objective = _objective(framework, fn, inputs, options, cotangent, "z_loss" if with_z else None)
    for smoothing in SMOOTHINGS:
        _check(framework, objective, smoothing, z_loss or 0.0, with_z, label=case)
    # Linear in smoothing: the one-sided difference at 0 and 1 is exact.
    for smoothing, step in ((0.0, STEP), (1.0, -STEP)):
        d_eps, _ = _derivatives(framework, objective, smoothing, z_loss or 0.0, with_z)
        one_sided = (
            _value(objective, smoothing + step, z_loss or 0.0)
            - _value(objective, smoothing, z_loss or 0.0)
        ) / step
        np.testing.assert_allclose(d_eps, one_sided, rtol=RTOL, atol=ATOL, err_msg=f"{smoothing}")


BINARY_CASES = {
    "none": dict(reduction="none"),
    "pos_weight-mean": dict(pos_weight=True, reduction="mean"),
    "sum": dict(reduction="sum"),
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", BINARY_CASES, ids=str)
def test_sigmoid_binary_cross_entropy_derivative_equals_finite_differences(framework, case):
    rng = np.random.default_rng(2)
    options = dict(BINARY_CASES[case])
    logits = 3.0 * rng.standard_normal((5, 4))
    labels = (rng.uniform(size=(5, 4)) < 0.4).astype(np.float64)
    if options.pop("pos_weight", False):
        options["pos_weight"] = np.array([0.5, 1.0, 2.0, 3.0])
    fn = (
        lsjax.sigmoid_binary_cross_entropy
        if framework == "jax"
        else lstorch.sigmoid_binary_cross_entropy
    )
    objective = _objective(framework, fn, (logits, labels), options, rng.uniform(0.5, 1.5, (5, 4)))
    for smoothing in SMOOTHINGS:
        _check(framework, objective, smoothing, label=case)
    for smoothing, step in ((0.0, STEP), (1.0, -STEP)):
        d_eps, _ = _derivatives(framework, objective, smoothing, 0.0, False)
        one_sided = (
            _value(objective, smoothing + step, 0.0) - _value(objective, smoothing, 0.0)
        ) / step
        np.testing.assert_allclose(d_eps, one_sided, rtol=RTOL, atol=ATOL, err_msg=f"{smoothing}")


# ---------------------------------------------------------------------------------------------
# fused_linear_smoothed_cross_entropy


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fused_linear_derivative_equals_finite_differences(framework, convention, reduction):
    rng = np.random.default_rng(4)
    hidden = rng.standard_normal((9, 5))
    weight = rng.standard_normal((CLASSES, 5))
    bias = rng.standard_normal(CLASSES)
    labels = rng.choice([0, 2, 3, 5], size=9)
    labels[::4] = -100
    options = dict(
        bias=bias, convention=convention, ignore_index=-100, reduction=reduction, chunk_size=4
    )
    if convention == "others_but_pad":
        options["pad_index"] = PAD
    lib = lsjax if framework == "jax" else lstorch
    objective = _objective(
        framework,
        lib.fused_linear_smoothed_cross_entropy,
        (hidden, weight, labels),
        options,
        rng.uniform(0.5, 1.5, size=9),
    )
    for smoothing in SMOOTHINGS:
        _check(framework, objective, smoothing, label=f"{convention} {reduction}")


# ---------------------------------------------------------------------------------------------
# Under transforms: jax.jit, jax.vmap; torch.func.grad, torch.func.vmap, torch.compile of grad


def _transform_objectives(framework):
    """name -> (objective, takes z_loss): the core with KL and z, soft with z, binary, fused."""
    core_in, core_options, core_cot = core_inputs("others", CORE_CASES["class_mask-kl-z_loss-none"])
    core_options.pop("z_loss")
    soft_in, soft_options, soft_cot = soft_inputs(SOFT_CASES["z_loss-weight-none"])
    soft_options.pop("z_loss")
    lib = lsjax if framework == "jax" else lstorch
    rng = np.random.default_rng(8)
    objectives = {
        "smoothed_cross_entropy": (
            _objective(
                framework, lib.smoothed_cross_entropy, core_in, core_options, core_cot, "z_loss"
            ),
            True,
        ),
        "soft_target_cross_entropy": (
            _objective(
                framework, lib.soft_target_cross_entropy, soft_in, soft_options, soft_cot, "z_loss"
            ),
            True,
        ),
        "sigmoid_binary_cross_entropy": (
            _objective(
                framework,
                lib.sigmoid_binary_cross_entropy,
                (rng.standard_normal((4, 3)), (rng.uniform(size=(4, 3)) < 0.5) * 1.0),
                {"reduction": "mean"},
                1.0,
            ),
            False,
        ),
    }
    objectives["fused_linear_smoothed_cross_entropy"] = (
        _objective(
            framework,
            lib.fused_linear_smoothed_cross_entropy,
            (
                rng.standard_normal((5, 3)),
                rng.standard_normal((CLASSES, 3)),
                rng.integers(0, CLASSES, 5),
            ),
            {"convention": "others", "reduction": "sum"},
            1.0,
        ),
        False,
    )
    return objectives


TRANSFORMED = list(_transform_objectives("jax"))


@pytest.mark.parametrize("name", TRANSFORMED)
def test_jax_grad_over_smoothing_under_jit_and_vmap(name):
    objective, with_z = _transform_objectives("jax")[name]
    jitted = jax.jit(jax.grad(objective, argnums=(0, 1)))
    batched = jax.vmap(jax.grad(objective, argnums=(0, 1)))
    z_loss = 0.02
    smoothings = jnp.asarray(SMOOTHINGS, jnp.float64)
    d_eps_batch, d_z_batch = batched(smoothings, jnp.full(3, z_loss, jnp.float64))
    for index, smoothing in enumerate(SMOOTHINGS):
        expected_eps, expected_z = _central(objective, smoothing, z_loss)
        d_eps, d_z = jitted(jnp.float64(smoothing), jnp.float64(z_loss))
        for got_eps, got_z in ((d_eps, d_z), (d_eps_batch[index], d_z_batch[index])):
            np.testing.assert_allclose(float(got_eps), expected_eps, rtol=RTOL, atol=ATOL)
            if with_z:
                np.testing.assert_allclose(float(got_z), expected_z, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", TRANSFORMED)
def test_torch_func_grad_over_a_smoothing_tensor_batched_and_compiled(name):
    objective, with_z = _transform_objectives("torch")[name]
    grad = torch.func.grad(objective, argnums=(0, 1))
    z_loss = torch.tensor(0.02, dtype=torch.float64)
    smoothings = torch.tensor(SMOOTHINGS, dtype=torch.float64)
    d_eps_batch, d_z_batch = torch.func.vmap(grad, in_dims=(0, None))(smoothings, z_loss)
    # Compiled whole, Dynamo traces the transform itself (see docs/pytorch.md).
    torch._dynamo.reset()
    compiled = torch.compile(grad, backend="eager")
    for index, smoothing in enumerate(SMOOTHINGS):
        expected_eps, expected_z = _central(objective, smoothing, 0.02)
        d_eps, d_z = grad(smoothings[index], z_loss)
        d_eps_compiled, d_z_compiled = compiled(smoothings[index], z_loss)
        for got_eps, got_z in (
            (d_eps, d_z),
            (d_eps_batch[index], d_z_batch[index]),
            (d_eps_compiled, d_z_compiled),
        ):
            np.testing.assert_allclose(float(got_eps), expected_eps, rtol=RTOL, atol=ATOL)
            if with_z:
                np.testing.assert_allclose(float(got_z), expected_z, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# torch: the loss requires grad when an option does


def test_torch_losses_require_grad_when_only_an_option_does():
    rng = np.random.default_rng(9)
    logits = torch.as_tensor(rng.standard_normal((4, CLASSES)))
    labels = torch.as_tensor(rng.integers(0, CLASSES, 4))
    targets = torch.softmax(torch.as_tensor(rng.standard_normal((4, CLASSES))), -1)
    eps = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    weight = torch.as_tensor(rng.standard_normal((CLASSES, 3)))
    losses = {
        "smoothed_cross_entropy": lstorch.smoothed_cross_entropy(logits, labels, smoothing=eps),
        "smoothed_cross_entropy z_loss": lstorch.smoothed_cross_entropy(logits, labels, z_loss=z),
        "soft_target_cross_entropy": lstorch.soft_target_cross_entropy(
            logits, targets, smoothing=eps
        ),
        "soft_target_cross_entropy z_loss": lstorch.soft_target_cross_entropy(
            logits, targets, z_loss=z
        ),
        "sigmoid_binary_cross_entropy": lstorch.sigmoid_binary_cross_entropy(
            logits, targets, smoothing=eps
        ),
        "fused_linear_smoothed_cross_entropy": lstorch.fused_linear_smoothed_cross_entropy(
            logits[:, :3], weight, labels, smoothing=eps
        ),
        "SmoothedCrossEntropyLoss": lstorch.SmoothedCrossEntropyLoss(smoothing=eps)(logits, labels),
    }
    for name, loss in losses.items():
        assert loss.requires_grad, name
    # A float32 smoothing for float64 logits gets a float32 gradient of the float64 derivative.
    eps32 = torch.tensor(0.1, dtype=torch.float32, requires_grad=True)
    lstorch.smoothed_cross_entropy(logits, labels, smoothing=eps32, reduction="sum").backward()
    eps.grad = None
    lstorch.smoothed_cross_entropy(logits, labels, smoothing=eps, reduction="sum").backward()
    assert eps32.grad.dtype == torch.float32
    np.testing.assert_allclose(float(eps32.grad), float(eps.grad), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# lstorch's Triton path (the kernels in Triton's interpreter on a CPU; on the GPU with CUDA)


TRITON_CASES = {
    "uniform-weight-ignored": dict(convention="uniform", weight=True, ignore_index=-100),
    "others-kl-z_loss": dict(convention="others", kl=True, z_loss=0.02, return_z_loss=True),
    "others_but_pad-class_mask-z_loss": dict(
        convention="others_but_pad", class_mask=True, z_loss=0.02, reduction="mean"
    ),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace_backward"])
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_the_triton_path_gives_the_option_derivatives(monkeypatch, case, inplace):
    pytest.importorskip("triton", reason="Triton is in the dev extras")
    monkeypatch.setenv("LSTORCH_TRITON", "all")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = dict(TRITON_CASES[case])
    convention = options.pop("convention")
    (logits, labels), options, cotangent = core_inputs(convention, options, seed=11)
    logits = logits.astype(np.float32).astype(np.float64)  # the float32 values, exactly
    z_value = options.pop("z_loss", None)
    with_z = z_value is not None
    reference = _objective(
        "torch",
        lstorch.smoothed_cross_entropy,
        (logits, labels),
        options,
        cotangent,
        "z_loss" if with_z else None,
    )
    expected_eps, expected_z = _central(reference, 0.3, z_value or 0.0)

    x = torch.tensor(logits, dtype=torch.float32, device=device)
    x_leaf = x.clone().requires_grad_(True)
    x_in = x_leaf * 1.0  # a non-leaf, so that inplace_backward may overwrite it
    from lstorch import triton_kernels as kernels

    ran = []
    for name in ("forward", "backward"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(
            kernels,
            name,
            lambda *a, _kernel=kernel, _name=name, **k: ran.append(_name) or _kernel(*a, **k),
        )
    eps = torch.tensor(0.3, dtype=torch.float32, device=device, requires_grad=True)
    z = torch.tensor(z_value or 0.0, dtype=torch.float32, device=device, requires_grad=with_z)
    kwargs = {key: _to("torch", value) for key, value in options.items()}
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    if with_z:
        kwargs["z_loss"] = z
    out = lstorch.smoothed_cross_entropy(
        x_in,
        torch.as_tensor(labels, device=device),
        smoothing=eps,
        inplace_backward=inplace,
        **kwargs,
    )
    parts = out if isinstance(out, tuple) else (out,)
    cot = torch.tensor(cotangent, dtype=torch.float32, device=device)
    total = sum(
        scale * (part * cot if part.ndim else part).sum()
        for scale, part in zip((1.0, 0.5), parts, strict=False)
    )
    wrt = (eps, z, x_leaf) if with_z else (eps, x_leaf)
    grads = torch.autograd.grad(total, wrt)
    # float32 logits and statistics: the derivative to float32 accuracy of the row sums.
    np.testing.assert_allclose(float(grads[0]), expected_eps, rtol=2e-5, atol=2e-5)
    if with_z:
        np.testing.assert_allclose(float(grads[1]), expected_z, rtol=2e-5, atol=2e-5)
    assert torch.isfinite(grads[-1]).all()
    assert ran == ["forward", "backward"]  # the kernels ran, both passes


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("transform", ["grad", "jit"])
def test_kl_with_a_class_mask_differentiates_float32_logits_under_x64(convention, transform):
    """With ``jax_enable_x64`` on (as in this suite), float32 logits, ``kl=True`` and a
    ``class_mask``: the masked support size was an int64 count, which promoted the KL constant's
    tangent to float64 and made ``jax.grad`` over the smoothing raise a custom-JVP dtype error."""
    (logits, labels), options, _ = core_inputs(convention, dict(class_mask=True, kl=True))
    options["reduction"] = "sum"
    x32 = jnp.asarray(logits, jnp.float32)

    def loss(smoothing):
        return lsjax.smoothed_cross_entropy(x32, labels, smoothing=smoothing, **options)

    grad = jax.grad(loss) if transform == "grad" else jax.jit(jax.grad(loss))
    d_eps = grad(jnp.float32(0.2))
    expected, _ = oracles.smoothed_cross_entropy_option_derivatives(
        np.asarray(x32, np.float64), labels, smoothing=0.2, **options
    )
    assert d_eps.dtype == jnp.float32
    # float32 logits: a sum over 9 rows of float32 log-probabilities, each within ~1e-6 relative
    np.testing.assert_allclose(d_eps, expected, rtol=1e-5, atol=1e-5)
