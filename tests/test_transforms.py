"""lsjax under jit, grad, vmap and higher-order differentiation; an eager lsjax call as one
compiled program; lstorch modules and double backward. Expected values come from the eager call
(checked against the oracles elsewhere) or from torch's own F.cross_entropy."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lsjax
import lstorch

OPTIONS = [
    dict(smoothing=0.1),
    dict(smoothing=0.3, convention="others", ignore_index=-100, reduction="mean"),
    dict(smoothing=0.5, convention="others_but_pad", pad_index=1, kl=True, reduction="sum"),
    dict(
        smoothing=1.0, convention="uniform", from_log_probs=True, reduction="mean", normalizer=11.0
    ),
]


def _inputs(dtype=np.float64, rows=6, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(3 * rng.standard_normal((rows, classes)), dtype)
    labels = rng.integers(0, classes, size=rows)
    labels[0] = -100
    labels[1] = 2
    return logits, jnp.asarray(labels)


def _clean(labels, options):
    # Rows labelled -100 only make sense with ignore_index=-100.
    return labels if options.get("ignore_index") == -100 else jnp.where(labels < 0, 0, labels)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_jit_matches_eager_value_and_grad(options):
    logits, labels = _inputs()
    labels = _clean(labels, options)
    loss = functools.partial(lsjax.smoothed_cross_entropy, **options)
    scalar = lambda x, y: jnp.sum(loss(x, y))  # noqa: E731
    eager = jax.value_and_grad(scalar)(logits, labels)
    jitted = jax.jit(jax.value_and_grad(scalar))(logits, labels)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-12)
    np.testing.assert_allclose(jitted[1], eager[1], rtol=1e-12, atol=1e-15)


def test_options_are_static_and_hashable_in_a_jitted_function():
    logits, labels = _inputs(np.float32)
    fn = jax.jit(
        lsjax.smoothed_cross_entropy,
        static_argnames=("smoothing", "convention", "reduction", "pad_index"),
    )
    a = fn(
        logits,
        labels.clip(0),
        smoothing=0.2,
        convention="others_but_pad",
        pad_index=3,
        reduction="mean",
    )
    b = lsjax.smoothed_cross_entropy(
        logits,
        labels.clip(0),
        smoothing=0.2,
        convention="others_but_pad",
        pad_index=3,
        reduction="mean",
    )
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_traced_smoothing_under_jit_matches_concrete():
    logits, labels = _inputs()
    labels = labels.clip(0)
    fn = jax.jit(lambda x, y, eps: lsjax.smoothed_cross_entropy(x, y, smoothing=eps))
    for eps in (0.0, 0.25, 1.0):
        np.testing.assert_allclose(
            fn(logits, labels, eps),
            lsjax.smoothed_cross_entropy(logits, labels, smoothing=eps),
            rtol=1e-12,
        )


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_vmap_over_a_batch_axis_equals_the_loop(options):
    logits = jnp.stack([_inputs(seed=s)[0] for s in range(3)])
    labels = jnp.stack([_clean(_inputs(seed=s)[1], options) for s in range(3)])
    fn = functools.partial(lsjax.smoothed_cross_entropy, **options)
    batched = jax.vmap(jax.value_and_grad(lambda x, y: jnp.sum(fn(x, y))))(logits, labels)
    for index in range(3):
        value, grad = jax.value_and_grad(lambda x, y: jnp.sum(fn(x, y)))(
            logits[index], labels[index]
        )
        np.testing.assert_allclose(batched[0][index], value, rtol=1e-12)
        np.testing.assert_allclose(batched[1][index], grad, rtol=1e-12, atol=1e-15)


_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # JAX's event: one per lowering


@contextlib.contextmanager
def _programs_lowered():
    """A list that gains an entry for each program JAX lowers inside the block. JAX's in-memory
    caches are cleared first, so every program the block runs is lowered, and counted, once
    (the persistent cache on disk may still spare the compilation)."""
    lowered = []

    def listener(event, duration, **kwargs):
        if event == _LOWERED:
            lowered.append(duration)

    jax.clear_caches()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield lowered
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _eager_calls():
    """Each lsjax loss with every array option it takes, all of them NumPy arrays, as a user
    passes them: ``name -> (loss of one array, that array)``."""
    rng = np.random.default_rng(0)
    rows, classes, width = 6, 7, 3
    x = rng.standard_normal((rows, classes))
    labels = rng.integers(1, classes, size=rows)
    labels[0] = -100
    weight = np.linspace(0.5, 2.0, classes)
    where = np.array([True, True, False, True, True, True])
    class_mask = np.ones(classes, bool)
    class_mask[0] = False  # no label is 0
    targets = np.full((rows, classes), 1.0 / classes)
    hidden, head = rng.standard_normal((rows, width)), rng.standard_normal((classes, width))
    dense = dict(smoothing=0.1, ignore_index=-100, where=where, z_loss=1e-4, reduction="mean")
    return {
        "smoothed_cross_entropy": (
            lambda x: lsjax.smoothed_cross_entropy(
                x,
                labels,
                weight=weight,
                class_mask=class_mask,
                normalizer=np.float64(4.0),
                softcap=30.0,
                return_stats=True,
                **dense,
            ),
            x,
        ),
        "soft_target_cross_entropy": (
            lambda x: lsjax.soft_target_cross_entropy(
                x,
                targets,
                smoothing=np.float64(0.1),
                weight=weight,
                where=where,
                z_loss=1e-4,
                reduction="mean",
            ),
            x,
        ),
        "sigmoid_binary_cross_entropy": (
            lambda x: lsjax.sigmoid_binary_cross_entropy(
                x, (targets > 0.1).astype(float), smoothing=0.1, pos_weight=weight
            ),
            x,
        ),
        "fused_linear_smoothed_cross_entropy": (
            lambda h: lsjax.fused_linear_smoothed_cross_entropy(
                h, head, labels, class_weight=weight, class_mask=class_mask, **dense
            ),
            hidden,
        ),
        "label_smoothing_loss": (
            lambda x: lsjax.label_smoothing_loss(x, labels.clip(0), classes=classes, smoothing=0.1),
            x,
        ),
        "kl_label_smoothing_loss": (
            lambda log_probs: lsjax.kl_label_smoothing_loss(
                log_probs,
                labels.clip(0),
                label_smoothing=0.1,
                tgt_vocab_size=classes,
                ignore_index=0,
            ),
            x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True)),
        ),
        "cross_entropy": (
            lambda x: lsjax.cross_entropy(x, labels, weight=weight, label_smoothing=0.1),
            x,
        ),
    }


@pytest.mark.parametrize("name", list(_eager_calls()))
def test_an_eager_call_runs_one_program(name):
    """After its checks (on the host), an lsjax loss runs as one compiled program: the counted
    rows, the options cast to the compute dtype and NumPy inputs moved to the device dispatch
    nothing on their own. So does each half of an eager ``jax.vjp``: the forward, and the
    backward for a cotangent already on the device. (``lsjax.cross_entropy`` of bf16/fp16
    logits rounds its float32 result to their dtype, as torch does, in one more program.)"""
    loss, x = _eager_calls()[name]
    x = jax.device_put(x)
    with _programs_lowered() as lowered:
        jax.block_until_ready(loss(x))
    assert len(lowered) == 1, f"{name}: an eager call ran {len(lowered)} programs"
    with _programs_lowered() as lowered:
        outputs, pull = jax.vjp(loss, x)
    assert len(lowered) == 1, f"{name}: an eager jax.vjp's forward ran {len(lowered)} programs"
    cotangents = jax.tree.map(
        lambda leaf: (
            jax.device_put(np.ones(leaf.shape, leaf.dtype))
            if jnp.issubdtype(leaf.dtype, jnp.inexact)
            else np.zeros(leaf.shape, jax.dtypes.float0)
        ),
        outputs,
    )
    with _programs_lowered() as lowered:
        jax.block_until_ready(pull(cotangents))
    assert len(lowered) == 1, f"{name}: an eager jax.vjp's backward ran {len(lowered)} programs"


def test_hessian_vector_product_matches_torch():
    logits, labels = _inputs()
    labels = labels.clip(0)
    weight = np.linspace(0.5, 2.0, 5)
    rng = np.random.default_rng(1)
    vector = rng.standard_normal(logits.shape)

    def jax_loss(x):
        return lsjax.smoothed_cross_entropy(
            x, labels, smoothing=0.3, weight=weight, reduction="mean"
        )

    _, hvp = jax.jvp(jax.grad(jax_loss), (logits,), (jnp.asarray(vector),))

    def torch_loss(x):
        return F.cross_entropy(
            x, torch.tensor(np.asarray(labels)), torch.as_tensor(weight), label_smoothing=0.3
        )

    _, expected = torch.autograd.functional.hvp(
        torch_loss, torch.tensor(np.asarray(logits)), torch.as_tensor(vector)
    )
    np.testing.assert_allclose(hvp, expected.numpy(), rtol=1e-10, atol=1e-13)
    # lstorch's double backward agrees too.
    _, ours = torch.autograd.functional.hvp(
        lambda x: lstorch.smoothed_cross_entropy(
            x,
            torch.tensor(np.asarray(labels)),
            smoothing=0.3,
            weight=torch.as_tensor(weight),
            reduction="mean",
        ),
        torch.tensor(np.asarray(logits)),
        torch.as_tensor(vector),
    )
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "options",
    [dict(convention="uniform"), dict(convention="others", softcap=2.0, z_loss=0.1)],
    ids=["uniform", "others-softcap-z_loss"],
)
def test_hessian_with_a_class_mask_matches_torch(options):
    """Second order through the masked logsumexp (one variadic reduction with its own
    derivative rule), against torch's ``F.cross_entropy`` on the smoothed target as
    probabilities, the masked classes' logits at -1e30 (out of the softmax, no gradient)."""
    logits, labels = _inputs()
    mask = np.array([True, True, False, True, True])
    labels = np.where(mask[labels.clip(0)], labels.clip(0), 0)
    eps, z = 0.2, options.get("z_loss", 0.0)
    jax_loss = functools.partial(
        lsjax.smoothed_cross_entropy, labels=labels, smoothing=eps, class_mask=mask,
        reduction="sum", implementation="xla", **options,
    )  # fmt: skip
    onehot = np.eye(5)[labels]
    support = mask & (onehot == 0) if options["convention"] == "others" else mask + 0 * onehot
    target = torch.as_tensor((1 - eps) * onehot + eps * support / support.sum(-1, keepdims=True))

    def torch_loss(x):
        cap = options.get("softcap")
        x = x if cap is None else cap * torch.tanh(x / cap)
        x = x.masked_fill(~torch.as_tensor(mask), -1e30)
        lse = torch.logsumexp(x, -1)
        return F.cross_entropy(x, target, reduction="sum") + z * (lse**2).sum()

    expected = torch.func.hessian(torch_loss)(torch.tensor(np.asarray(logits)))
    np.testing.assert_allclose(
        jax.hessian(jax_loss)(logits), expected.numpy(), rtol=1e-10, atol=1e-13
    )


def test_all_rows_ignored_mean_is_zero_with_zero_gradient_in_both_frameworks():
    logits, _ = _inputs()
    labels = np.full(6, -100)
    value, grad = jax.value_and_grad(
        lambda x: lsjax.smoothed_cross_entropy(
            x, labels, smoothing=0.1, ignore_index=-100, reduction="mean"
        )
    )(logits)
    assert float(value) == 0.0 and not np.any(grad)
    x = torch.tensor(np.asarray(logits)).requires_grad_()
    loss = lstorch.smoothed_cross_entropy(
        x, torch.as_tensor(labels), smoothing=0.1, ignore_index=-100, reduction="mean"
    )
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()
    # torch's own function returns NaN here: the documented difference.
    assert torch.isnan(F.cross_entropy(x, torch.as_tensor(labels), label_smoothing=0.1))


def test_a_weighted_mean_over_rows_of_weight_0_is_0_with_a_zero_gradient():
    """Class weights whose counted rows weigh 0 in all (``weight[pad] = 0`` on an all-pad
    batch, the older way to leave the pad out): nothing to average, so 0 with a zero gradient,
    as with every row ignored, where torch gives NaN. Both frameworks, plain and fused."""
    weight, expected = [0.0, 0.0, 1.0, 1.0], 0.0
    rng = np.random.default_rng(7)
    hidden, output = rng.standard_normal((3, 2)), rng.standard_normal((4, 2))
    logits, labels = hidden @ output.T, np.array([0, 1, 0])
    options = dict(smoothing=0.1, reduction="mean")

    def check(value, grad):
        np.testing.assert_equal(float(value), expected)
        assert not np.asarray(grad).any()

    check(
        *jax.value_and_grad(
            lambda x: lsjax.smoothed_cross_entropy(x, labels, weight=np.array(weight), **options)
        )(logits)
    )
    check(
        *jax.value_and_grad(
            lambda h: lsjax.fused_linear_smoothed_cross_entropy(
                h, output, labels, class_weight=np.array(weight), **options
            )
        )(hidden)
    )
    for call, leaf in (
        (
            lambda x: lstorch.smoothed_cross_entropy(
                x, torch.tensor(labels), weight=torch.tensor(weight, dtype=x.dtype), **options
            ),
            torch.tensor(logits),
        ),
        (
            lambda h: lstorch.fused_linear_smoothed_cross_entropy(
                h,
                torch.tensor(output),
                torch.tensor(labels),
                class_weight=torch.tensor(weight, dtype=h.dtype),
                **options,
            ),
            torch.tensor(hidden),
        ),
    ):
        leaf.requires_grad_()
        loss = call(leaf)
        loss.backward()
        check(loss.detach(), leaf.grad)
    # torch's own function: NaN (0/0 in its NLL term)
    torch_value = F.cross_entropy(
        torch.tensor(logits),
        torch.tensor(labels),
        weight=torch.tensor(weight, dtype=torch.float64),
        label_smoothing=0.1,
    )
    assert torch.isnan(torch_value)


def test_nan_in_an_ignored_row_reaches_neither_loss_nor_gradient():
    logits, labels = _inputs()
    logits = logits.at[0].set(jnp.nan)  # row 0 is labelled -100
    value, grad = jax.value_and_grad(
        lambda x: lsjax.smoothed_cross_entropy(
            x, labels, smoothing=0.1, ignore_index=-100, reduction="mean"
        )
    )(logits)
    assert np.isfinite(value) and np.isfinite(grad).all() and not np.any(grad[0])
    x = torch.tensor(np.asarray(logits)).requires_grad_()
    loss = lstorch.smoothed_cross_entropy(
        x, torch.tensor(np.asarray(labels)), smoothing=0.1, ignore_index=-100, reduction="mean"
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and not x.grad[0].any()
    np.testing.assert_allclose(loss.item(), float(value), rtol=1e-12)


def test_smoothing_one_kl_form_is_finite():
    logits, labels = _inputs()
    labels = labels.clip(0)
    for module, array in ((lsjax, jnp.asarray), (lstorch, torch.as_tensor)):
        value = module.smoothed_cross_entropy(
            array(np.array(logits)),
            array(np.array(labels)),
            smoothing=1.0,
            kl=True,
            convention="others",
        )
        assert np.isfinite(np.asarray(value)).all() and (np.asarray(value) >= -1e-12).all()


def test_bf16_loss_is_float32_and_as_accurate_as_float32_rounded_once():
    logits, labels = _inputs(rows=64, classes=1000)
    labels = labels.clip(0)
    low = logits.astype(jnp.bfloat16)
    value = lsjax.smoothed_cross_entropy(low, labels, smoothing=0.1, reduction="mean")
    reference = lsjax.smoothed_cross_entropy(
        low.astype(jnp.float64), labels, smoothing=0.1, reduction="mean"
    )
    assert value.dtype == jnp.float32
    # Accumulated in float32: the error is float32's, nowhere near bf16's 2**-8.
    np.testing.assert_allclose(value, reference, rtol=1e-6)
    torch_value = lstorch.smoothed_cross_entropy(
        torch.tensor(np.asarray(low.astype(jnp.float32))).bfloat16(),
        torch.tensor(np.asarray(labels)),
        smoothing=0.1,
        reduction="mean",
    )
    assert torch_value.dtype == torch.float32
    np.testing.assert_allclose(torch_value.item(), reference, rtol=1e-6)


def test_module_forms_match_their_functions():
    logits, labels = _inputs()
    x = torch.tensor(np.asarray(logits))
    y = torch.tensor(np.asarray(labels))
    module = lstorch.SmoothedCrossEntropyLoss(smoothing=0.2, convention="others")
    expected = lstorch.smoothed_cross_entropy(
        x, y, smoothing=0.2, convention="others", ignore_index=-100, reduction="mean"
    )
    torch.testing.assert_close(module(x, y), expected)
    assert "convention='others'" in repr(module)
    forum = lstorch.LabelSmoothingLoss(5, 0.1)
    assert forum.cls == 5 and forum.confidence == pytest.approx(0.9)
    torch.testing.assert_close(
        forum(x, y.clamp(0)), lstorch.label_smoothing_loss(x, y.clamp(0), classes=5, smoothing=0.1)
    )


def test_forum_label_smoothing_loss_dim_works_for_any_class_axis():
    # The original only handled the last axis of 2-D input; here dim=1 of a 3-D input equals moving
    # the class axis last.
    rng = np.random.default_rng(3)
    pred = torch.as_tensor(rng.standard_normal((4, 7, 6)))
    target = torch.as_tensor(rng.integers(0, 7, size=(4, 6)))
    moved = lstorch.LabelSmoothingLoss(7, 0.2, dim=-1)(pred.movedim(1, -1), target)
    torch.testing.assert_close(lstorch.LabelSmoothingLoss(7, 0.2, dim=1)(pred, target), moved)
