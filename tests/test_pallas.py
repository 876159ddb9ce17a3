"""lsjax's Pallas kernels (``implementation="pallas"``) against the float64 oracle.

CI has no GPU or TPU, so the kernels run in Pallas's interpret mode here: the same kernel code,
run as a ``jax.jit`` of a loop over the grid. Every option of ``smoothed_cross_entropy`` that the
kernels take, float32 and bf16 logits, logits near the float32 maximum and offset by 1e5, ragged
class and row counts (blocks that do not divide them), under ``jit``, ``grad`` and ``vmap``; the
derivatives in ``smoothing`` and ``z_loss``; the choice between the kernels and XLA and its
errors; and the lowering to Triton (GPU) and Mosaic (TPU) IR, which is as far as a CPU goes.
The registry's twins run through the kernels too (the "jax: pallas" path, tests/test_paths.py).
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lsjax
from lsjax import pallas_kernels
from parity_tests import oracles
from parity_tests.compare import DEFAULT_TOLERANCES, round_to

K = 37  # not a power of two: the last block of classes overlaps the one before
IGNORE = -100


def _inputs(rng, rows, num_classes, scale=3.0):
    x = scale * rng.standard_normal((rows, num_classes))
    labels = rng.integers(0, num_classes, rows)
    return x, labels


def _mask_k(num_classes):
    return np.arange(num_classes) % 5 != 3  # classes 3, 8, 13, ... masked


# Every option the kernels take; labels are fixed per case by ``_labels``.
OPTIONS = {
    "plain": dict(),
    "uniform_weight_ignore": dict(smoothing=0.1, weight="w", ignore_index=IGNORE),
    "others_kl_smoothing_1": dict(smoothing=1.0, convention="others", kl=True),
    "others_but_pad_kl": dict(smoothing=0.5, convention="others_but_pad", pad_index=2, kl=True),
    "pad_weight_mask_where": dict(
        smoothing=0.3,
        convention="others_but_pad",
        pad_index=3,
        weight="w",
        class_mask="m",
        where="where",
    ),  # the pad (3) is a masked class here
    "mask_z_loss": dict(
        smoothing=0.2, class_mask="m", z_loss=1e-3, return_z_loss=True, ignore_index=IGNORE
    ),
    "others_weight_mean": dict(smoothing=0.1, convention="others", weight="w", reduction="mean"),
    "axis_1_sum": dict(smoothing=0.1, axis=1, reduction="sum"),
}


def _build(name, rng, rows=6, num_classes=K):
    """(logits, labels, options) of option set ``name`` as NumPy, class axis last unless the
    options move it."""
    options = dict(OPTIONS[name])
    x, labels = _inputs(rng, rows, num_classes)
    if "class_mask" in options:
        options["class_mask"] = _mask_k(num_classes)
        labels = np.where(options["class_mask"][labels], labels, (labels + 1) % num_classes)
        x[:, ~options["class_mask"]] = -np.inf  # masked logits may be -inf
        x[0, 8] = 1e30  # or far above every allowed one
    if "weight" in options:
        options["weight"] = rng.uniform(0.5, 2.0, num_classes)
    if "where" in options:
        options["where"] = np.arange(rows) % 3 != 1
    if options.get("ignore_index") is not None:
        labels[1] = IGNORE
        x[1, :] = np.nan  # a row that does not count leaks nothing, even NaN
    if options.get("pad_index") is not None:
        labels[2] = options["pad_index"]  # the pad row does not count
    if options.get("axis") == 1:
        x = np.stack([x, x[::-1] / 2], axis=-1)  # (rows, K, 2), classes on axis 1
        labels = np.stack([labels, labels[::-1]], axis=-1)
    return x, labels, options


def _loss(implementation, labels, options):
    arrays = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    labels = jnp.asarray(labels)

    def loss(x):
        return lsjax.smoothed_cross_entropy(x, labels, implementation=implementation, **arrays)

    return loss


def _leaves(value):
    return list(value) if isinstance(value, tuple) else [value]


def _assert_close(got, expected, dtype, what):
    rtol, atol = DEFAULT_TOLERANCES[dtype]
    np.testing.assert_allclose(
        np.asarray(got, np.float64), expected, rtol=rtol, atol=atol, err_msg=what
    )


def _check_against_oracle(x, labels, options, dtype, *, seed=0):
    """Loss and vjp (a random cotangent) under ``jit``, against the oracle on the same rounded
    inputs."""
    rounded = round_to(x, dtype)
    expected, vjp = oracles.smoothed_cross_entropy(rounded, labels, **options)
    expected = _leaves(expected)
    rng = np.random.default_rng(seed)
    cotangent = [rng.uniform(0.5, 1.5, np.shape(e)) for e in expected]
    loss = _loss("pallas", labels, options)

    @jax.jit
    def value_and_pull(x, cotangent):
        value, pull = jax.vjp(loss, x)
        leaves = _leaves(value)
        cot = [jnp.asarray(c, v.dtype) for c, v in zip(cotangent, leaves, strict=True)]
        return value, pull(tuple(cot) if isinstance(value, tuple) else cot[0])[0]

    value, grad = value_and_pull(jnp.asarray(rounded, dtype), cotangent)
    assert grad.dtype == jnp.dtype(dtype)  # rounded once, to the logits' dtype
    for got, want in zip(_leaves(value), expected, strict=True):
        _assert_close(got, want, "float32" if dtype == "bfloat16" else dtype, "loss")
    _assert_close(grad, vjp(cotangent if len(expected) > 1 else cotangent[0]), dtype, "grad")
    return value, grad


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_equals_the_oracle(name, dtype):
    x, labels, options = _build(name, np.random.default_rng(len(name)))
    _, grad = _check_against_oracle(x, labels, options, dtype)
    if options.get("ignore_index") is not None:  # the NaN row's gradient is exactly 0
        assert not np.asarray(grad[1]).any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("inputs", "convention"), [("near_max", "others_but_pad"), ("offset_1e5", "uniform")]
)
def test_extreme_logits(inputs, convention, dtype):
    rng = np.random.default_rng(7)
    if inputs == "near_max":  # finite losses of ~1e37, from sums that overflow float32
        x = rng.uniform(0.0, 3e38, (4, 300))
        x[0, :3] = [3e38, 3e38, 0.0]
    else:  # relative to the row max, the offset costs no precision
        x = 1e5 + rng.normal(size=(4, 50))
    labels = np.array([0, 5, 6, 7])
    extra = (
        {"pad_index": 1} if convention == "others_but_pad" else {"weight": rng.uniform(1, 2, 50)}
    )
    options = dict(smoothing=0.1, convention=convention, **extra)
    value, _ = _check_against_oracle(x, labels, options, dtype)
    assert np.isfinite(np.asarray(value)).all()


@pytest.mark.parametrize(
    ("num_classes", "block_classes", "rows", "block_rows"),
    [
        (1000, 128, 13, 8),  # 7 blocks and an overlapping eighth; a partial block of rows
        (1000, 8192, 5, 1),  # the GPU's configuration: a 512 block and an overlapping one
        (3, 8192, 9, 4),  # K < any real block: blocks of 2, the second overlapping
        (256, 64, 3, 8),  # K a multiple of the block, rows fewer than the block
        (1, 8192, 2, 1),  # one class: blocks of 1
    ],
)
def test_ragged_blocks(monkeypatch, num_classes, block_classes, rows, block_rows):
    config = pallas_kernels.Config(jax.default_backend(), block_rows, block_classes)
    monkeypatch.setattr(pallas_kernels, "default_config", lambda backend=None: config)
    rng = np.random.default_rng(num_classes)
    x, labels = _inputs(rng, rows, num_classes)
    smoothing = 0.0 if num_classes == 1 else 0.2
    options = dict(smoothing=smoothing, weight=rng.uniform(0.5, 2.0, num_classes), z_loss=1e-2)
    _check_against_oracle(x, labels, options, "float32")


def test_vmap_of_grad_and_of_jit():
    """``jax.vmap(jax.grad(...))``: per-example gradients, as per-sample-gradient code takes
    them; each example against the oracle."""
    rng = np.random.default_rng(3)
    x, labels, options = _build("mask_z_loss", rng, rows=4)
    options = {**options, "return_z_loss": False, "reduction": "mean"}
    batch = np.stack([x, x / 2 + 1])
    batch_labels = np.stack([labels, labels[::-1]])
    arrays = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}

    def example(x, labels):
        return lsjax.smoothed_cross_entropy(x, labels, implementation="pallas", **arrays)

    values = jax.jit(jax.vmap(example))(jnp.asarray(batch, jnp.float32), batch_labels)
    grads = jax.vmap(jax.grad(example))(jnp.asarray(batch, jnp.float32), batch_labels)
    for index in range(2):
        rounded = round_to(batch[index], "float32")
        expected, vjp = oracles.smoothed_cross_entropy(rounded, batch_labels[index], **options)
        _assert_close(values[index], expected, "float32", f"loss {index}")
        _assert_close(grads[index], vjp(np.ones(())), "float32", f"grad {index}")


def test_inside_shard_map_with_check_vma_off():
    """Per-device code, as the docstring says to run the kernels with several devices:
    ``jax.shard_map`` over the rows with ``check_vma=False`` (the kernels do not declare over
    which mesh axes their outputs vary), the loss and its gradient against the oracle."""
    if len(jax.devices()) < 2:
        pytest.skip("needs two JAX devices (tests/conftest.py gives the CPU two)")
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(5)
    x, labels = _inputs(rng, 8, K)
    x = round_to(x, "float32")
    mesh = Mesh(np.array(jax.devices()[:2]), ("rows",))

    def per_device(x, labels):
        loss = lsjax.smoothed_cross_entropy(
            x, labels, smoothing=0.1, reduction="sum", implementation="pallas"
        )
        return jax.lax.psum(loss, "rows")

    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P("rows"), P("rows")), out_specs=P(), check_vma=False
    )
    value, grad = jax.jit(jax.value_and_grad(sharded))(jnp.asarray(x, jnp.float32), labels)
    expected, vjp = oracles.smoothed_cross_entropy(x, labels, smoothing=0.1, reduction="sum")
    _assert_close(value, expected, "float32", "loss")
    _assert_close(grad, vjp(np.ones(())), "float32", "grad")


@pytest.mark.parametrize("kl", [False, True])
def test_derivatives_in_smoothing_and_z_loss(kl):
    rng = np.random.default_rng(11)
    x, labels = _inputs(rng, 5, K)
    options = dict(convention="others", class_mask=_mask_k(K), kl=kl, reduction="sum")
    labels = np.where(options["class_mask"][labels], labels, (labels + 1) % K)
    arrays = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    rounded = round_to(x, "float32")

    def total(smoothing, z_loss):
        return lsjax.smoothed_cross_entropy(
            jnp.asarray(rounded, jnp.float32),
            jnp.asarray(labels),
            smoothing=smoothing,
            z_loss=z_loss,
            implementation="pallas",
            **arrays,
        )

    d_eps, d_z = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.float32(0.3), jnp.float32(1e-3))
    expected = oracles.smoothed_cross_entropy_option_derivatives(
        rounded, labels, smoothing=0.3, z_loss=1e-3, **options
    )
    _assert_close(d_eps, expected[0], "float32", "d smoothing")
    _assert_close(d_z, expected[1], "float32", "d z_loss")


def test_traced_invalid_inputs_give_nan_rows():
    """Under ``jit`` a label out of range makes its row (loss and gradient) NaN, a smoothing
    outside [0, 1] every counted row; rows that do not count stay 0. As on XLA."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, K)), jnp.float32)
    labels = jnp.array([0, K + 4, IGNORE])

    def per_row(x, labels, smoothing, implementation):
        loss = lsjax.smoothed_cross_entropy(
            x, labels, smoothing=smoothing, ignore_index=IGNORE, implementation=implementation
        )
        return loss, jax.grad(
            lambda x: jnp.sum(
                lsjax.smoothed_cross_entropy(
                    x,
                    labels,
                    smoothing=smoothing,
                    ignore_index=IGNORE,
                    implementation=implementation,
                )
            )
        )(x)

    run = jax.jit(per_row, static_argnums=3)
    loss, grad = run(x, labels, 0.1, "pallas")
    assert np.isfinite(loss[0]) and np.isnan(loss[1]) and loss[2] == 0
    assert np.isfinite(grad[0]).all() and np.isnan(grad[1]).all() and not grad[2].any()
    loss, grad = run(x, jnp.array([0, 1, IGNORE]), 1.5, "pallas")
    xla_loss, _ = run(x, jnp.array([0, 1, IGNORE]), 1.5, "xla")
    np.testing.assert_array_equal(np.isnan(loss), [True, True, False])
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(xla_loss))


def test_float64_and_no_rows():
    x, labels, options = _build("uniform_weight_ignore", np.random.default_rng(2))
    _check_against_oracle(x, labels, options, "float64")
    empty = jnp.zeros((0, K), jnp.float32)
    loss, grad = jax.value_and_grad(
        lambda x: lsjax.smoothed_cross_entropy(
            x, jnp.zeros((0,), int), implementation="pallas", reduction="sum"
        )
    )(empty)
    assert loss == 0 and grad.shape == (0, K)


# --------------------------------------------------------------------------------------------
# Which implementation runs


def _pallas_calls(implementation, dtype=jnp.float32, **options):
    x = jnp.zeros((2, K), dtype)

    def grad(x):
        return jax.grad(
            lambda x: lsjax.smoothed_cross_entropy(
                x, jnp.array([0, 1]), implementation=implementation, reduction="sum", **options
            )
        )(x)

    return str(jax.make_jaxpr(grad)(x)).count("pallas_call")


def test_the_implementation_chosen(monkeypatch):
    monkeypatch.delenv(pallas_kernels.ENVIRONMENT_VARIABLE, raising=False)
    assert _pallas_calls("pallas") == 2  # forward and backward
    assert _pallas_calls("xla") == 0
    if jax.default_backend() == "cpu":
        assert _pallas_calls("auto") == 0  # XLA on a CPU
    # log-probabilities: "auto" stays on XLA, "pallas" says why it cannot
    assert _pallas_calls("auto", from_log_probs=True) == 0
    with pytest.raises(
        ValueError,
        match=r"smoothed_cross_entropy: `implementation='pallas'` "
        r"takes logits.*`from_log_probs=True`",
    ):
        _pallas_calls("pallas", from_log_probs=True)
    # The environment variable decides for "auto" only; log-probabilities stay on XLA.
    monkeypatch.setenv(pallas_kernels.ENVIRONMENT_VARIABLE, "pallas")
    assert _pallas_calls("auto") == 2
    assert _pallas_calls("auto", from_log_probs=True) == 0
    assert _pallas_calls("xla") == 0
    monkeypatch.setenv(pallas_kernels.ENVIRONMENT_VARIABLE, "xla")
    assert _pallas_calls("auto") == 0
    assert _pallas_calls("pallas") == 2


def test_auto_takes_the_kernels_on_a_single_gpu_only(monkeypatch):
    monkeypatch.delenv(pallas_kernels.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(pallas_kernels, "_device_count", lambda: 1)
    f32, f64 = jnp.zeros(2, jnp.float32), jnp.zeros(2, jnp.float64)
    for backend, expected in [("gpu", True), ("tpu", False), ("cpu", False)]:
        monkeypatch.setattr(pallas_kernels, "_backend", lambda backend=backend: backend)
        assert pallas_kernels.chosen("f", "auto", f32, from_log_probs=False) is expected
        assert not pallas_kernels.chosen("f", "auto", f64, from_log_probs=False)
        assert not pallas_kernels.chosen("f", "auto", f32, from_log_probs=True)
    # Several devices: the logits may be sharded, which a custom call would gather whole.
    monkeypatch.setattr(pallas_kernels, "_backend", lambda: "gpu")
    monkeypatch.setattr(pallas_kernels, "_device_count", lambda: 2)
    assert not pallas_kernels.chosen("f", "auto", f32, from_log_probs=False)
    assert pallas_kernels.chosen("f", "pallas", f32, from_log_probs=False)


def test_auto_leaves_forward_mode_and_second_derivatives_to_xla(monkeypatch):
    """The kernels are a ``custom_vjp``: reverse mode once. On a GPU, ``"auto"`` took them
    under ``jax.jvp``, ``jacfwd`` and ``hessian`` too, which then failed inside JAX ("can't
    apply forward-mode autodiff (jvp) to a custom_vjp function"). It now reads the tracers and
    leaves forward mode and second derivatives (of the logits or the smoothing) to XLA. The
    decision is what is checked here: XLA runs every call (this machine has no GPU to compile
    the kernels for)."""
    monkeypatch.delenv(pallas_kernels.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(pallas_kernels, "_backend", lambda: "gpu")
    monkeypatch.setattr(pallas_kernels, "_device_count", lambda: 1)
    decisions, decide = [], pallas_kernels.chosen

    def recorded(*args, **kwargs):
        decisions.append(decide(*args, **kwargs))
        return False

    monkeypatch.setattr(pallas_kernels, "chosen", recorded)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)
    labels = jnp.array([0, 4, 2])

    def loss(x, eps=0.1):
        return lsjax.smoothed_cross_entropy(x, labels, smoothing=eps, reduction="sum")

    def grad_of_grad(x):
        return jax.grad(lambda y: jnp.sum(jax.grad(loss)(y) ** 2))(x)

    runs = {  # name: (call, whether the kernels are the choice)
        "grad": (lambda: jax.grad(loss)(x), True),
        "jit(grad)": (lambda: jax.jit(jax.grad(loss))(x), True),
        "vmap(grad)": (lambda: jax.vmap(jax.grad(loss))(jnp.stack([x, x])), True),
        "grad in the smoothing": (lambda: jax.grad(lambda e: loss(x, e))(0.1), True),
        "jvp": (lambda: jax.jvp(loss, (x,), (x,)), False),
        "jacfwd": (lambda: jax.jacfwd(loss)(x), False),
        "hessian": (lambda: jax.hessian(loss)(x), False),
        "grad of grad": (lambda: grad_of_grad(x), False),
        "jvp in the smoothing": (lambda: jax.jvp(lambda e: loss(x, e), (0.1,), (1.0,)), False),
    }
    for name, (run, kernels) in runs.items():
        decisions.clear()
        run()
        assert decisions and all(d is kernels for d in decisions), (name, decisions)


@pytest.mark.parametrize("forced", [False, True], ids=["argument", "environment"])
def test_pallas_under_forward_mode_or_twice_is_named(monkeypatch, forced):
    """The kernels take reverse mode once. Asked for them (``implementation="pallas"``, or
    ``LSJAX_IMPLEMENTATION=pallas``) under ``jvp``, ``hessian`` or grad of grad, JAX's own
    error named nothing of ours ("can't apply forward-mode autodiff (jvp) to a custom_vjp
    function", "Linearization failed"); now one error names the function and the way out.
    ``jax.grad`` still runs the kernels."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)
    labels = jnp.array([0, 4, 2])
    options = {"implementation": "auto"} if forced else {"implementation": "pallas"}
    if forced:
        monkeypatch.setenv(pallas_kernels.ENVIRONMENT_VARIABLE, "pallas")

    def loss(x, eps=0.1):
        return lsjax.smoothed_cross_entropy(x, labels, smoothing=eps, reduction="sum", **options)

    asked = "LSJAX_IMPLEMENTATION=pallas" if forced else "implementation='pallas'"
    message = rf"^smoothed_cross_entropy: the Pallas kernels \({asked}\) take reverse-mode"
    for run in (
        lambda: jax.jvp(loss, (x,), (x,)),
        lambda: jax.hessian(loss)(x),
        lambda: jax.grad(lambda y: jnp.sum(jax.grad(loss)(y) ** 2))(x),
        lambda: jax.jvp(lambda e: loss(x, e), (0.1,), (1.0,)),
    ):
        with pytest.raises(NotImplementedError, match=message):
            run()
    assert np.isfinite(np.asarray(jax.grad(loss)(x))).all()


def test_bad_implementation_names_function_argument_value_and_choices(monkeypatch):
    x, labels = jnp.zeros((2, 3)), jnp.array([0, 1])
    with pytest.raises(
        ValueError,
        match=r"^smoothed_cross_entropy: `implementation` must be one of "
        r"\['auto', 'xla', 'pallas'\]; got 'triton'\.$",
    ):
        lsjax.smoothed_cross_entropy(x, labels, implementation="triton")
    monkeypatch.setenv(pallas_kernels.ENVIRONMENT_VARIABLE, "fast")
    with pytest.raises(
        ValueError,
        match=r"LSJAX_IMPLEMENTATION \(environment variable\)` must "
        r"be one of \['auto', 'xla', 'pallas'\]; got 'fast'",
    ):
        lsjax.smoothed_cross_entropy(x, labels)
    lsjax.smoothed_cross_entropy(x, labels, implementation="xla")  # not read for "xla"


@pytest.mark.parametrize(
    ("backend", "platform", "marker"),
    [("gpu", "cuda", "xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")],
)
def test_the_kernels_lower_for_gpu_and_tpu(monkeypatch, backend, platform, marker):
    """As far as a CPU can check: forward and backward lower to Triton IR (GPU) and Mosaic IR
    (TPU) with every option on. Neither was compiled by the GPU or TPU compiler, nor run."""
    config = pallas_kernels.default_config(backend)
    monkeypatch.setattr(pallas_kernels, "default_config", lambda backend=None: config)
    x, labels = jnp.zeros((13, 1000), jnp.bfloat16), jnp.zeros((13,), jnp.int32)
    options = dict(
        smoothing=0.1,
        convention="others_but_pad",
        pad_index=5,
        weight=jnp.ones(1000),
        class_mask=jnp.arange(1000) != 7,
        z_loss=1e-4,
    )

    def grad(x):
        return jax.grad(
            lambda x: lsjax.smoothed_cross_entropy(
                x, labels, implementation="pallas", reduction="mean", **options
            )
        )(x)

    text = jax.jit(grad).trace(x).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) >= 2, text[:2000]


def test_pallas_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import jax, jax.numpy as jnp, lsjax\n"
        "x = jnp.array([[1.0, 2.0, 3.0]])\n"
        "g = jax.grad(lambda x: lsjax.smoothed_cross_entropy(x, jnp.array([0]), smoothing=0.1,\n"
        "    implementation='pallas').sum())(x)\n"
        "assert abs(float(g.sum())) < 1e-6, g\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_stats_across_blocks_take_the_first_maximum(monkeypatch):
    """Blocks of 16 columns over K = 50 (the last overlapping the third), so the running argmax
    meets a maximum in the last block and ties across blocks (the first maximum wins, as
    ``torch.argmax``). Oracle: float64 NumPy (``tests.helpers.stats_across_blocks_case``)."""
    from tests.helpers import stats_across_blocks_case

    config = pallas_kernels.Config(jax.default_backend(), 8, 16)
    monkeypatch.setattr(pallas_kernels, "default_config", lambda backend=None: config)
    logits, labels, expected = stats_across_blocks_case()
    *_, stats = lsjax.smoothed_cross_entropy(
        jnp.asarray(logits), jnp.asarray(labels), smoothing=0.1, return_stats=True,
        implementation="pallas",
    )  # fmt: skip
    assert np.asarray(stats.correct).tolist() == expected["correct"].tolist()
    np.testing.assert_allclose(np.asarray(stats.lse), expected["lse"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats.entropy), expected["entropy"], rtol=1e-5)
