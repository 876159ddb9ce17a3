"""The fused linear + label-smoothed cross-entropy.

* Memory, deterministic: XLA's ``memory_analysis()`` of the compiled forward + backward at an LLM
  head's size (rows=8192, D=512, V=131072, float32), lowered from ``jax.ShapeDtypeStruct`` so
  nothing is allocated: the fused loss needs <= 5% of the dense logits' bytes in temporaries;
  the dense route needs more than the logits themselves (so the bound can fail).
* PyTorch's autograd graph saves the inputs and O(rows) statistics only.
* Against the dense path (``smoothed_cross_entropy(hidden @ weight.T + bias)``), in each
  framework, float32 and bf16: loss and the gradients of hidden, weight and bias. (The registry
  twins check JAX against PyTorch and both against a float64 NumPy oracle.)
* Every option of the dense loss (class weights, ``where``, ``normalizer``, ``kl``,
  ``class_mask``, ``z_loss``, ``return_z_loss``, ``softcap``, ``logit_scale``), in each
  framework: against torch's own ``F.cross_entropy`` on the materialised logits where it has
  the option, else the float64 dense oracle on them; the derivatives in the smoothing and the
  z-loss weight against the oracle's.
* ``return_stats``: the per-row lse, entropy and argmax hit against the float64 oracle on the
  materialised (transformed) logits, and the argmax's tie rule (the first maximal class, across
  chunks) against ``torch.argmax``.
* Bad input: the same message in both frameworks.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lsjax
import lstorch
from lsjax.sharded import sharded_fused_linear_smoothed_cross_entropy
from parity_tests import oracles
from tests.helpers import compiled_temp_bytes

ROWS, FEATURES, VOCAB = 8192, 512, 131072


def _temp_bytes(loss):
    shapes = (
        jax.ShapeDtypeStruct((ROWS, FEATURES), jnp.float32),
        jax.ShapeDtypeStruct((VOCAB, FEATURES), jnp.float32),
        jax.ShapeDtypeStruct((VOCAB,), jnp.float32),
        jax.ShapeDtypeStruct((ROWS,), jnp.int32),
    )
    return compiled_temp_bytes(loss, *shapes, argnums=(0, 1, 2))


@pytest.mark.parametrize("layout", ["one device", "vocabulary over two devices"])
def test_jax_hessian_of_the_fused_loss_is_torchs_of_the_dense_logits(layout):
    """Second order through reverse mode (``jax.hessian``: ``jacfwd`` of ``jacrev``; a
    Hessian-vector product, a gradient penalty): the custom_vjp's backward is made of
    differentiable ops, so its derivative is exact; only forward mode of the loss itself
    (``jax.jvp``, ``jax.jacfwd``) is refused. Against ``torch.autograd.functional.hessian`` of
    ``F.cross_entropy`` on the dense logits, float64, every block of (hidden, weight, bias).

    With the weight split over two devices
    (``lsjax.sharded.sharded_fused_linear_smoothed_cross_entropy``) a second derivative
    differentiates the forward's statistics, whose global max is an all-reduced max (``pmax``,
    which JAX cannot differentiate; the sum-exp does not depend on that shift); there
    ``return_stats`` adds the argmax's all-reduced max. Chunks of 3 are ragged within the 8
    classes, and within each device's 4."""
    rng = np.random.default_rng(11)
    hidden, weight, bias = (
        rng.standard_normal((4, 3)),
        rng.standard_normal((8, 3)),
        rng.standard_normal(8),
    )
    labels, class_weight = np.array([0, 5, -100, 7]), np.linspace(0.5, 1.5, 8)
    options = dict(smoothing=0.1, ignore_index=-100, reduction="mean", chunk_size=3,
                   class_weight=class_weight)  # fmt: skip
    if layout == "one device":

        def ours(h, w, b):
            return lsjax.fused_linear_smoothed_cross_entropy(h, w, labels, bias=b, **options)

    else:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("batch", "vocab"))

        def ours(h, w, b):
            loss, _ = sharded_fused_linear_smoothed_cross_entropy(
                h, w, labels, mesh=mesh, bias=b, return_stats=True, **options
            )
            return loss

    def dense(h, w, b):
        return F.cross_entropy(
            h @ w.T + b,
            torch.as_tensor(labels),
            weight=torch.as_tensor(class_weight),
            label_smoothing=0.1,
            ignore_index=-100,
        )

    got = jax.jit(jax.hessian(ours, argnums=(0, 1, 2)))(hidden, weight, bias)
    want = torch.autograd.functional.hessian(
        dense, tuple(map(torch.as_tensor, (hidden, weight, bias)))
    )
    for i in range(3):
        for j in range(3):
            np.testing.assert_allclose(got[i][j], want[i][j].numpy(), rtol=1e-10, atol=1e-12)
    if layout == "one device":
        with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
            jax.jacfwd(ours)(hidden, weight, bias)


def test_fused_temporaries_at_the_issue_size_are_under_5_percent_of_the_logits():
    def fused(hidden, weight, bias, labels):
        return lsjax.fused_linear_smoothed_cross_entropy(
            hidden, weight, labels, bias=bias, smoothing=0.1, ignore_index=-100
        )

    temp = _temp_bytes(fused)
    logits_bytes = ROWS * VOCAB * 4
    assert temp <= 0.05 * logits_bytes, f"{temp} bytes ({temp / logits_bytes:.2%} of the logits)"


def test_the_dense_route_is_what_the_bound_rules_out():
    def dense(hidden, weight, bias, labels):
        logits = hidden @ weight.T + bias
        return lsjax.smoothed_cross_entropy(logits, labels, smoothing=0.1, reduction="mean")

    assert _temp_bytes(dense) > ROWS * VOCAB * 4


def test_torch_autograd_saves_the_inputs_and_row_statistics_only():
    rows, features, vocab = 256, 32, 5000
    hidden = torch.randn(rows, features, requires_grad=True)
    weight = torch.randn(vocab, features, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lstorch.fused_linear_smoothed_cross_entropy(
            hidden, weight, labels, bias=bias, smoothing=0.1, chunk_size=512
        )
    inputs = {t.untyped_storage().data_ptr() for t in (hidden, weight, bias)}
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert len(saved) - len(extra) == 3  # hidden, weight, bias themselves
    assert sum(t.numel() * t.element_size() for t in extra) <= 64 * rows  # labels, masks, lse
    # The dense route, for contrast, saves rows x V logits-sized tensors.
    dense_saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: dense_saved.append(t) or t, lambda t: t
    ):
        F.cross_entropy(F.linear(hidden, weight, bias), labels, label_smoothing=0.1)
    assert max(t.numel() for t in dense_saved) >= rows * vocab


# --------------------------------------------------------------------------------------------
# Against the dense path


def _problem(seed, rows=48, features=16, vocab=700):
    rng = np.random.default_rng(seed)

    def bf16_grid(values):  # exact in bf16, float32 and float64 alike
        return np.asarray(np.asarray(values, ml_dtypes.bfloat16), np.float32)

    hidden = bf16_grid(rng.standard_normal((rows, features)))
    weight = bf16_grid(rng.standard_normal((vocab, features)) * 3 / np.sqrt(features))
    bias = bf16_grid(rng.standard_normal(vocab))
    labels = rng.integers(0, vocab, rows)
    labels[rng.random(rows) < 0.25] = -100
    cotangent = rng.uniform(0.5, 1.5, rows)
    return hidden, weight, bias, labels, cotangent


CASES = [
    ("uniform", None, "mean"),
    ("others", None, "none"),
    ("others_but_pad", 3, "sum"),
]
# (rtol, atol): as compare.DEFAULT_TOLERANCES. bf16: the fused bf16 result against the dense
# float32 result on the same (bf16-exact) inputs: the fused loss computes in float32 from bf16
# inputs, so what remains is the gradients' final rounding to bf16 (relative 2**-9), allowed
# 2**-7 as for the execution paths.
TOLERANCES = {"float32": (1e-5, 1e-6), "bfloat16": (2.0**-7, 2.0**-9)}


def _jax_side(fn, dtype, hidden, weight, bias, labels, cotangent, options):
    def loss(hidden, weight, bias):
        return fn(hidden, weight, bias, jnp.asarray(labels), options)

    arrays = [jnp.asarray(a, dtype) for a in (hidden, weight, bias)]
    value, vjp = jax.vjp(loss, *arrays)
    cot = jnp.asarray(cotangent if value.ndim else 1.0, value.dtype)
    grads = vjp(cot)
    return [np.asarray(a, np.float64) for a in (value, *grads)]


def _torch_side(fn, dtype, hidden, weight, bias, labels, cotangent, options):
    arrays = [torch.tensor(a).to(dtype).requires_grad_(True) for a in (hidden, weight, bias)]
    value = fn(*arrays, torch.tensor(labels), options)
    cot = torch.tensor(cotangent if value.ndim else 1.0, dtype=value.dtype)
    grads = torch.autograd.grad(value, arrays, cot)
    return [a.detach().to(torch.float64).numpy() for a in (value, *grads)]


def _jax_fused(hidden, weight, bias, labels, options):
    return lsjax.fused_linear_smoothed_cross_entropy(
        hidden, weight, labels, bias=bias, chunk_size=128, **options
    )


def _jax_dense(hidden, weight, bias, labels, options):
    logits = jnp.dot(hidden, weight.T, precision=jax.lax.Precision.HIGHEST) + bias
    return lsjax.smoothed_cross_entropy(logits, labels, **options)


def _torch_fused(hidden, weight, bias, labels, options):
    return lstorch.fused_linear_smoothed_cross_entropy(
        hidden, weight, labels, bias=bias, chunk_size=128, **options
    )


def _torch_dense(hidden, weight, bias, labels, options):
    return lstorch.smoothed_cross_entropy(F.linear(hidden, weight, bias), labels, **options)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("convention", "pad_index", "reduction"), CASES)
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_fused_equals_the_dense_path(framework, convention, pad_index, reduction, dtype):
    hidden, weight, bias, labels, cotangent = _problem(seed=len(convention) + len(reduction))
    options = dict(
        smoothing=0.1,
        convention=convention,
        pad_index=pad_index,
        ignore_index=-100,
        reduction=reduction,
    )
    problem = (hidden, weight, bias, labels, cotangent, options)
    if framework == "jax":
        dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
        got = _jax_side(_jax_fused, dtypes[dtype], *problem)
        expected = _jax_side(_jax_dense, jnp.float32, *problem)
    else:
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        got = _torch_side(_torch_fused, dtypes[dtype], *problem)
        expected = _torch_side(_torch_dense, torch.float32, *problem)
    rtol, atol = TOLERANCES[dtype]
    for name, left, right in zip(
        ["loss", "d hidden", "d weight", "d bias"], got, expected, strict=True
    ):
        np.testing.assert_allclose(left, right, rtol=rtol, atol=atol, err_msg=name)


# --------------------------------------------------------------------------------------------
# Every option of the dense loss, on the fused head: against torch's own F.cross_entropy on the
# materialised logits where it has the option (class weights), else the float64 dense oracle
# (parity_tests.oracles) on them. float64 inputs, so what is compared is the formula.

_VOCAB_SMALL = 50
_RNG = np.random.default_rng(11)
_CLASS_WEIGHT = _RNG.uniform(0.2, 2.0, _VOCAB_SMALL)
_CLASS_MASK = _RNG.random(_VOCAB_SMALL) < 0.7
_CLASS_MASK[:4] = True
OPTION_CASES = {
    "class_weight": dict(class_weight=_CLASS_WEIGHT, reduction="mean"),
    "class_weight-sum-others": dict(
        class_weight=_CLASS_WEIGHT, convention="others", reduction="sum"
    ),
    "where": dict(where=True, reduction="mean"),
    "normalizer": dict(normalizer=13.0, reduction="mean"),
    "kl": dict(kl=True, convention="others", reduction="none"),
    "class_mask": dict(class_mask=_CLASS_MASK, reduction="none"),
    "class_mask-others_but_pad": dict(
        class_mask=_CLASS_MASK, convention="others_but_pad", pad_index=3, reduction="mean"
    ),
    "z_loss": dict(z_loss=0.1, reduction="mean"),
    "softcap": dict(softcap=1.5, reduction="mean"),
    "logit_scale": dict(logit_scale=2.5, reduction="sum"),
    "softcap-logit_scale-z_loss-others": dict(
        softcap=2.0,
        logit_scale=0.6,
        z_loss=0.1,
        return_z_loss=True,
        convention="others",
        reduction="none",
    ),
    "softcap-class_weight-class_mask-others_but_pad": dict(
        softcap=1.5,
        class_weight=_CLASS_WEIGHT,
        class_mask=_CLASS_MASK,
        convention="others_but_pad",
        pad_index=3,
        reduction="mean",
    ),
    "return_z_loss": dict(z_loss=0.1, return_z_loss=True, reduction="none"),
    "everything": dict(
        class_weight=_CLASS_WEIGHT,
        where=True,
        normalizer=9.0,
        class_mask=_CLASS_MASK,
        z_loss=0.05,
        return_z_loss=True,
        reduction="mean",
    ),
}


def _option_problem(name):
    hidden, weight, bias, labels, cotangent = _problem(seed=7, rows=12, features=8, vocab=50)
    options = dict(smoothing=0.2, ignore_index=-100, **OPTION_CASES[name])
    rng = np.random.default_rng(len(name))
    if options.get("where") is True:
        options["where"] = rng.random(labels.shape) < 0.7
    if "class_mask" in options:  # every counted label allowed
        allowed = np.flatnonzero(options["class_mask"])
        labels = np.where(labels == -100, -100, rng.choice(allowed, labels.shape))
    return [a.astype(np.float64) for a in (hidden, weight, bias)], labels, cotangent, options


def _option_outputs(value):
    return list(value) if isinstance(value, tuple) else [value]


def _option_cotangents(outputs, cotangent):
    return [cotangent * (index + 1) if np.ndim(out) else 1.0 + index
            for index, out in enumerate(outputs)]  # fmt: skip


@pytest.mark.parametrize("name", sorted(OPTION_CASES))
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_each_option_equals_the_dense_loss_on_the_materialised_logits(framework, name):
    (hidden, weight, bias), labels, cotangent, options = _option_problem(name)
    if framework == "jax":
        with jax.enable_x64(True):
            arrays = [jnp.asarray(a) for a in (hidden, weight, bias)]
            kwargs = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v
                      for k, v in options.items()}  # fmt: skip

            def loss(hidden, weight, bias):
                return lsjax.fused_linear_smoothed_cross_entropy(
                    hidden, weight, jnp.asarray(labels), bias=bias, chunk_size=16, **kwargs
                )

            value, vjp = jax.vjp(loss, *arrays)
            outputs = _option_outputs(value)
            cots = _option_cotangents(outputs, cotangent)
            jax_cots = [jnp.asarray(c, jnp.float64) for c in cots]
            grads = vjp(tuple(jax_cots) if isinstance(value, tuple) else jax_cots[0])
            got = [np.asarray(a) for a in (*outputs, *grads)]
    else:
        tensors = [torch.tensor(a, requires_grad=True) for a in (hidden, weight, bias)]
        kwargs = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v
                  for k, v in options.items()}  # fmt: skip
        value = lstorch.fused_linear_smoothed_cross_entropy(
            *tensors[:2], torch.tensor(labels), bias=tensors[2], chunk_size=16, **kwargs
        )
        outputs = _option_outputs(value)
        cots = _option_cotangents(outputs, cotangent)
        torch_cots = [torch.as_tensor(c, dtype=torch.float64).expand(o.shape)
                      for c, o in zip(cots, outputs, strict=True)]  # fmt: skip
        grads = torch.autograd.grad(outputs, tensors, torch_cots)
        got = [a.detach().numpy() for a in (*outputs, *grads)]
    if set(options) <= {"smoothing", "ignore_index", "class_weight", "reduction"}:
        # torch's own F.cross_entropy has class weights (the "uniform" convention only).
        tensors = [torch.tensor(a, requires_grad=True) for a in (hidden, weight, bias)]
        if options.get("convention", "uniform") == "uniform":
            value = F.cross_entropy(
                F.linear(*tensors),
                torch.tensor(labels),
                weight=torch.tensor(options["class_weight"]),
                ignore_index=-100,
                reduction=options["reduction"],
                label_smoothing=options["smoothing"],
            )
            grads = torch.autograd.grad(value, tensors, torch.as_tensor(float(cots[0])))
            expected = [a.detach().numpy() for a in (value, *grads)]
            for left, right in zip(got, expected, strict=True):
                np.testing.assert_allclose(left, right, rtol=1e-10, atol=1e-12)
            return
    expected_outputs, grads = None, []
    for wrt in ("hidden", "weight", "bias"):
        expected_outputs, vjp = oracles.fused_linear_smoothed_cross_entropy(
            hidden, weight, labels, bias=bias, wrt=wrt, **options
        )
        grads.append(vjp(tuple(cots) if isinstance(expected_outputs, tuple) else cots[0]))
    expected = [*_option_outputs(expected_outputs), *grads]
    assert len(got) == len(expected)
    for left, right in zip(got, expected, strict=True):
        np.testing.assert_allclose(left, right, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["kl", "class_mask", "everything"])
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_smoothing_and_z_loss_are_differentiated_as_in_the_dense_loss(framework, name):
    (hidden, weight, bias), labels, _, options = _option_problem(name)
    options = {**options, "reduction": "mean", "z_loss": 0.1}
    options.pop("return_z_loss", None)
    smoothing, z_loss = options.pop("smoothing"), options.pop("z_loss")
    dense = {k: v for k, v in options.items() if k != "class_weight"}
    dense["weight"] = options.get("class_weight")
    expected = oracles.smoothed_cross_entropy_option_derivatives(
        hidden @ weight.T + bias, labels, smoothing=smoothing, z_loss=z_loss, **dense
    )
    if framework == "jax":
        with jax.enable_x64(True):
            kwargs = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v
                      for k, v in options.items()}  # fmt: skip

            def loss(eps, z):
                return lsjax.fused_linear_smoothed_cross_entropy(
                    hidden, weight, labels, bias=bias, smoothing=eps, z_loss=z, chunk_size=16,
                    **kwargs,
                )  # fmt: skip

            got = jax.grad(loss, argnums=(0, 1))(jnp.float64(smoothing), jnp.float64(z_loss))
    else:
        kwargs = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v
                  for k, v in options.items()}  # fmt: skip
        eps = torch.tensor(smoothing, dtype=torch.float64, requires_grad=True)
        z = torch.tensor(z_loss, dtype=torch.float64, requires_grad=True)
        value = lstorch.fused_linear_smoothed_cross_entropy(
            *(torch.tensor(a) for a in (hidden, weight)), torch.tensor(labels),
            bias=torch.tensor(bias), smoothing=eps, z_loss=z, chunk_size=16, **kwargs,
        )  # fmt: skip
        got = torch.autograd.grad(value, (eps, z))
    np.testing.assert_allclose([float(g) for g in got], np.asarray(expected, float), rtol=1e-10)


def _fused_stats(framework, hidden, weight, bias, labels, **options):
    """``(loss, RowStats)`` of the fused loss as float64 NumPy arrays (``correct`` as bool)."""
    if framework == "jax":
        with jax.enable_x64(True):
            arrays = [None if a is None else jnp.asarray(a) for a in (hidden, weight, bias)]
            kwargs = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v
                      for k, v in options.items()}  # fmt: skip
            loss, stats = lsjax.fused_linear_smoothed_cross_entropy(
                *arrays[:2], jnp.asarray(labels), bias=arrays[2], return_stats=True, **kwargs
            )
            assert isinstance(stats, lsjax.RowStats)
            return np.asarray(loss), [np.asarray(v) for v in stats]
    tensors = [None if a is None else torch.tensor(a) for a in (hidden, weight, bias)]
    kwargs = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    loss, stats = lstorch.fused_linear_smoothed_cross_entropy(
        *tensors[:2], torch.tensor(labels), bias=tensors[2], return_stats=True, **kwargs
    )
    assert isinstance(stats, lstorch.RowStats)
    return loss.numpy(), [v.numpy() for v in stats]


@pytest.mark.parametrize("name", ["plain", "softcap-class_mask"])
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_return_stats_equal_the_oracle_on_the_materialised_logits(framework, name):
    (hidden, weight, bias), labels, _, _ = _option_problem("class_mask")
    # Labels the model often predicts, so that both values of `correct` occur.
    logits = hidden @ weight.T + bias
    allowed = np.where(_CLASS_MASK, logits, -np.inf)
    labels = np.where(labels == -100, -100, np.where(np.arange(12) % 2, allowed.argmax(-1), labels))
    options = dict(smoothing=0.1, ignore_index=-100, reduction="none", chunk_size=16)
    if name == "softcap-class_mask":
        options.update(softcap=1.5, logit_scale=1.3, class_mask=_CLASS_MASK, z_loss=0.1)
    loss, stats = _fused_stats(framework, hidden, weight, bias, labels, **options)
    options.pop("chunk_size")
    (expected_loss, expected_stats), _ = oracles.smoothed_cross_entropy(
        logits, labels, return_stats=True, **options
    )
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-10, atol=1e-12)
    for got, expected in zip(stats[:2], expected_stats[:2], strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert stats[2].dtype == bool
    np.testing.assert_array_equal(stats[2], expected_stats[2])
    assert 0 < stats[2].sum() < (labels != -100).sum()


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_return_stats_argmax_takes_the_first_maximal_class_across_chunks(framework):
    # Classes 2 (chunk 0), 9 (chunk 1) and 21 (the shifted last chunk in JAX) have one weight
    # row and so equal logits (small integers: exact, whatever the order of the products), the
    # largest: torch.argmax picks class 2.
    rng = np.random.default_rng(3)
    vocab, features = 23, 4
    hidden = np.tile(rng.integers(1, 4, features).astype(np.float64), (6, 1))
    weight = rng.integers(-1, 2, (vocab, features)).astype(np.float64)
    weight[[2, 9, 21]] = 3.0
    labels = np.array([2, 9, 21, 2, 0, 9])
    logits = torch.tensor(hidden @ weight.T)
    expected = (torch.argmax(logits, dim=-1) == torch.tensor(labels)).numpy()
    np.testing.assert_array_equal(expected, labels == 2)
    for chunk_size in (8, 10, 64):
        _, stats = _fused_stats(framework, hidden, weight, None, labels, chunk_size=chunk_size)
        np.testing.assert_array_equal(stats[2], expected)


def test_the_torch_module_takes_softcap_and_return_stats():
    (hidden, weight, bias), labels, _, _ = _option_problem("softcap")
    module = lstorch.FusedLinearSmoothedCrossEntropyLoss(
        smoothing=0.2, softcap=1.5, logit_scale=1.3, return_stats=True, chunk_size=16
    )
    loss, stats = module(*(torch.tensor(a) for a in (hidden, weight)), torch.tensor(labels),
                         torch.tensor(bias))  # fmt: skip
    (expected, expected_stats), _ = oracles.smoothed_cross_entropy(
        hidden @ weight.T + bias, labels, smoothing=0.2, ignore_index=-100, reduction="mean",
        softcap=1.5, logit_scale=1.3, return_stats=True,
    )  # fmt: skip
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(stats.entropy.numpy(), expected_stats[1], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="FusedLinearSmoothedCrossEntropyLoss: `softcap`"):
        lstorch.FusedLinearSmoothedCrossEntropyLoss(softcap=0.0)


def test_all_rows_ignored_mean_is_zero_with_zero_gradients():
    hidden, weight, bias, labels, _ = _problem(seed=0, rows=5, vocab=40)
    labels[:] = -100
    options = dict(smoothing=0.1, ignore_index=-100, reduction="mean")
    for side, fn, dtype in (
        (_jax_side, _jax_fused, jnp.float32),
        (_torch_side, _torch_fused, torch.float32),
    ):
        value, *grads = side(fn, dtype, hidden, weight, bias, labels, None, options)
        assert value == 0.0
        assert all(not np.any(grad) for grad in grads)


def test_traced_labels_out_of_range_give_nan_under_jit():
    hidden, weight, bias, labels, _ = _problem(seed=1, rows=4, vocab=30)
    labels[:] = [1, 2, 99, 3]

    @jax.jit
    def rows(labels):
        return lsjax.fused_linear_smoothed_cross_entropy(
            hidden, weight, labels, bias=bias, smoothing=0.1, reduction="none"
        )

    out = np.asarray(rows(jnp.asarray(labels)))
    assert np.isnan(out[2]) and np.all(np.isfinite(out[[0, 1, 3]]))


# --------------------------------------------------------------------------------------------
# Bad input


def _both_raise(kind, **overrides):
    hidden, weight, bias, labels, _ = _problem(seed=2, rows=4, features=3, vocab=5)
    arrays = dict(hidden=hidden, weight=weight, bias=bias, labels=labels % 5)
    options = dict(smoothing=0.1)
    arrays.update({k: v for k, v in overrides.items() if k in arrays})
    options.update({k: v for k, v in overrides.items() if k not in arrays})
    messages = []
    for to_array in (jnp.asarray, torch.as_tensor):
        with pytest.raises(kind) as info:
            fn = (
                lsjax.fused_linear_smoothed_cross_entropy
                if to_array is jnp.asarray
                else lstorch.fused_linear_smoothed_cross_entropy
            )
            fn(
                to_array(arrays["hidden"]),
                to_array(arrays["weight"]),
                to_array(arrays["labels"]),
                bias=to_array(arrays["bias"]),
                **options,
            )
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    return messages[0]


def test_bad_input_gets_the_same_clear_error_in_both_frameworks():
    message = _both_raise(ValueError, chunk_size=0)
    assert "`chunk_size` must be a positive int; got 0" in message
    message = _both_raise(ValueError, weight=np.zeros((5, 4), np.float32))
    assert "`weight` must have shape (V, 3)" in message and "(5, 4)" in message
    message = _both_raise(ValueError, bias=np.zeros(6, np.float32))
    assert "`bias` must have shape (5,); got shape (6,)" in message
    message = _both_raise(ValueError, labels=np.zeros((4, 1), np.int32))
    assert "`labels` must have the hidden's shape without the last axis, (4,)" in message
    message = _both_raise(TypeError, weight=np.zeros((5, 3), np.float64))
    assert "`weight` must have the hidden's dtype float32; got dtype float64" in message
    message = _both_raise(ValueError, labels=np.array([0, 1, 7, 2]))
    assert "`labels` must lie in [0, 4]; got out-of-range values [7]" in message
    message = _both_raise(ValueError, convention="others_but_pad")
    assert "needs `pad_index`" in message


def test_the_lm_head_example_prints_the_memory_comparison():
    import pathlib
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [
            sys.executable,
            str(root / "examples" / "large_vocab_lm_head.py"),
            "--rows=256",
            "--features=32",
            "--vocab=8192",
            "--repeats=1",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = dict(
        ((framework, variant), float(mib))
        for framework, variant, mib in re.findall(
            r"^(jax|torch)\s+(dense|fused)\s+([0-9.]+)", done.stdout, re.M
        )
    )
    assert len(rows) == 4, done.stdout
    # XLA's numbers are deterministic: the fused temporaries are a fraction of the dense ones.
    assert rows["jax", "fused"] < 0.25 * rows["jax", "dense"], done.stdout
