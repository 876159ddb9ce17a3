"""A smoothing value that is only rounding outside [0, 1] counts as the interval's end.

A schedule that ends at 0 (``optax.linear_schedule(0.2, 0.0, 10)(10)`` is -2.98e-9 in float32)
or Python's ``0.3 - 0.1 * 3`` (-5.6e-17) must give the loss and gradient of smoothing 0, not NaN
and not an error; the same just above 1. Within ``lsspec.UNIT_INTERVAL_ULPS`` ulps of 1.0 in the
option's own dtype a value is clamped; farther out it is an error when concrete and NaN when
traced. Every function that takes a smoothing, in both frameworks: the expected value is the
same call at exactly 0 (or 1), whose own correctness the registry proves against the oracles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.distributed as dist
from jax.sharding import Mesh

import lsjax
import lsjax.compat
import lstorch
import lstorch.compat
import lstorch.distributed
from lsjax.sharded import sharded_fused_linear_smoothed_cross_entropy

K = 7
RNG = np.random.default_rng(0)
LOGITS = 3 * RNG.standard_normal((5, K))
LABELS = RNG.integers(0, K, 5)
TARGETS = RNG.dirichlet(np.ones(K), 5)
BINARY = RNG.integers(0, 2, (5, K)).astype(np.float64)
HIDDEN = RNG.standard_normal((5, 4))
WEIGHT = RNG.standard_normal((K, 4))


def _mesh():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("batch", "vocab"))


# name -> fn(x, eps) for x the differentiated float input of that function, per framework.
JAX_CALLS = {
    "smoothed_cross_entropy": lambda x, e: lsjax.smoothed_cross_entropy(
        x, LABELS, smoothing=e, convention="others"
    ),
    "soft_target_cross_entropy": lambda x, e: lsjax.soft_target_cross_entropy(
        x, TARGETS, smoothing=e
    ),
    "sigmoid_binary_cross_entropy": lambda x, e: lsjax.sigmoid_binary_cross_entropy(
        x, BINARY, smoothing=e
    ),
    "fused_linear_smoothed_cross_entropy": lambda w, e: lsjax.fused_linear_smoothed_cross_entropy(
        jnp.asarray(HIDDEN, w.dtype), w, LABELS, smoothing=e, chunk_size=3
    ),
    "sharded_fused_linear_smoothed_cross_entropy": lambda w, e: (
        sharded_fused_linear_smoothed_cross_entropy(
            jnp.asarray(HIDDEN, w.dtype), w, LABELS, mesh=_mesh(), smoothing=e
        )
    ),
    "label_smoothing_loss": lambda x, e: lsjax.label_smoothing_loss(
        x, LABELS, classes=K, smoothing=e
    ),
    "compat.fairseq": lambda x, e: lsjax.compat.fairseq.label_smoothed_nll_loss(
        jax.nn.log_softmax(x), LABELS, e
    )[0],
    "compat.hf": lambda x, e: lsjax.compat.hf.label_smoother(x[None], LABELS[None], epsilon=e),
    "compat.t5x": lambda x, e: lsjax.compat.t5x.compute_weighted_cross_entropy(
        x, LABELS, label_smoothing=e
    )[0],
    "compat.keras.categorical": lambda x, e: lsjax.compat.keras.categorical_crossentropy(
        TARGETS, x, from_logits=True, label_smoothing=e
    ),
    "compat.keras.binary": lambda x, e: lsjax.compat.keras.binary_crossentropy(
        BINARY, x, from_logits=True, label_smoothing=e
    ),
}
FUSED_INPUT = {"fused_linear_smoothed_cross_entropy", "sharded_fused_linear_smoothed_cross_entropy"}


def _t(array):
    return torch.as_tensor(np.asarray(array))


TORCH_CALLS = {
    "smoothed_cross_entropy": lambda x, e: lstorch.smoothed_cross_entropy(
        x, _t(LABELS), smoothing=e, convention="others"
    ),
    "SmoothedCrossEntropyLoss": lambda x, e: lstorch.SmoothedCrossEntropyLoss(
        smoothing=e, reduction="none"
    )(x, _t(LABELS)),
    "soft_target_cross_entropy": lambda x, e: lstorch.soft_target_cross_entropy(
        x, _t(TARGETS).to(x.dtype), smoothing=e
    ),
    "sigmoid_binary_cross_entropy": lambda x, e: lstorch.sigmoid_binary_cross_entropy(
        x, _t(BINARY).to(x.dtype), smoothing=e
    ),
    "fused_linear_smoothed_cross_entropy": lambda w, e: lstorch.fused_linear_smoothed_cross_entropy(
        _t(HIDDEN).to(w.dtype), w, _t(LABELS), smoothing=e, chunk_size=3
    ),
    "vocab_parallel_smoothed_cross_entropy": lambda x, e: (
        lstorch.distributed.vocab_parallel_smoothed_cross_entropy(x, _t(LABELS), smoothing=e)
    ),
    "label_smoothing_loss": lambda x, e: lstorch.label_smoothing_loss(
        x, _t(LABELS), classes=K, smoothing=e
    ),
    "compat.fairseq": lambda x, e: lstorch.compat.fairseq.label_smoothed_nll_loss(
        x.log_softmax(-1), _t(LABELS), e
    )[0],
    "compat.hf": lambda x, e: lstorch.compat.hf.label_smoother(
        x[None], _t(LABELS)[None], epsilon=e
    ),
    "compat.t5x": lambda x, e: lstorch.compat.t5x.compute_weighted_cross_entropy(
        x, _t(LABELS), label_smoothing=e
    )[0],
    "compat.keras.categorical": lambda x, e: lstorch.compat.keras.categorical_crossentropy(
        _t(TARGETS).to(x.dtype), x, from_logits=True, label_smoothing=e
    ),
    "compat.keras.binary": lambda x, e: lstorch.compat.keras.binary_crossentropy(
        _t(BINARY).to(x.dtype), x, from_logits=True, label_smoothing=e
    ),
}

# (the value as the user's code produces it, the interval's end it stands for)
with jax.enable_x64(False):  # as a user's float32 train step computes it: -2.98e-9
    SCHEDULE_END = jax.jit(optax.linear_schedule(0.2, 0.0, 10))(10)
NEAR_ENDS = {
    "python 0.3 - 0.1 * 3": (0.3 - 0.1 * 3, 0.0),
    "python 1 + 2**-52": (1.0 + 2.0**-52, 1.0),
    "float32 schedule at its end": (np.float32(SCHEDULE_END), 0.0),
    "float32 1 + 2 ulps": (np.float32(1.0) + np.float32(2 * 2.0**-23), 1.0),
}


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    """The vocabulary-parallel loss needs a process group: one gloo rank, this process."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_schedule_example_is_what_the_users_saw():
    assert SCHEDULE_END.dtype == jnp.float32 and -1e-8 < float(SCHEDULE_END) < 0


def _jax_value_and_grad(name, eps, jit):
    x = jnp.asarray(WEIGHT if name in FUSED_INPUT else LOGITS, jnp.float32)
    eps = jnp.asarray(eps) if isinstance(eps, np.floating) else eps

    def total(x, eps):
        return jnp.sum(JAX_CALLS[name](x, eps))

    if jit:  # the smoothing traced, as a schedule inside a jitted train step gives it
        return jax.jit(jax.value_and_grad(total))(x, eps)
    return jax.value_and_grad(total)(x, eps)


@pytest.mark.parametrize("jit", [False, True], ids=["concrete", "traced"])
@pytest.mark.parametrize("value", NEAR_ENDS, ids=list(NEAR_ENDS))
@pytest.mark.parametrize("name", JAX_CALLS)
def test_lsjax_rounding_outside_the_interval_is_its_end(name, value, jit):
    given, end = NEAR_ENDS[value]
    if name == "sharded_fused_linear_smoothed_cross_entropy" and not jit:
        pytest.skip("the sharded loss runs under jit only")
    loss, grad = _jax_value_and_grad(name, given, jit)
    expected_loss, expected_grad = _jax_value_and_grad(name, end, jit)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", JAX_CALLS)
def test_lsjax_a_value_truly_outside_is_an_error_or_nan(name):
    if name != "sharded_fused_linear_smoothed_cross_entropy":
        with pytest.raises(ValueError, match="must be in"):
            _jax_value_and_grad(name, -1e-3, jit=False)
    loss, _ = _jax_value_and_grad(name, jnp.float32(-1e-3), jit=True)
    assert np.isnan(loss)


def _torch_value_and_grad(name, eps):
    x = torch.tensor(WEIGHT if name in ("fused_linear_smoothed_cross_entropy",) else LOGITS)
    x = x.float().requires_grad_(True)
    loss = TORCH_CALLS[name](x, eps).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize("value", NEAR_ENDS, ids=list(NEAR_ENDS))
@pytest.mark.parametrize("name", TORCH_CALLS)
def test_lstorch_rounding_outside_the_interval_is_its_end(name, value):
    given, end = NEAR_ENDS[value]
    # A float32 value arrives as the 0-d tensor a schedule produces; a Python one as a float.
    given = torch.tensor(given) if isinstance(given, np.floating) else given
    loss, grad = _torch_value_and_grad(name, given)
    expected_loss, expected_grad = _torch_value_and_grad(name, end)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", TORCH_CALLS)
def test_lstorch_a_value_truly_outside_is_an_error_or_nan(name):
    with pytest.raises(ValueError, match="must be in"):
        _torch_value_and_grad(name, -1e-3)
    with pytest.raises(ValueError, match="must be in"):  # a CPU tensor is read and checked
        _torch_value_and_grad(name, torch.tensor(-1e-3))
    # A value that is not read (inside torch.compile here; on an accelerator, or batched by
    # torch.func.vmap) gives NaN.
    x = torch.tensor(WEIGHT if name in ("fused_linear_smoothed_cross_entropy",) else LOGITS)
    torch.compiler.reset()  # a fresh cache: past its size limit Dynamo would run eagerly
    compiled = torch.compile(lambda eps: TORCH_CALLS[name](x.float(), eps).sum(), backend="eager")
    assert torch.isnan(compiled(torch.tensor(-1e-3)))
    assert torch.isfinite(compiled(torch.tensor(0.1)))
