"""Memory is O(rows), never O(rows x K): measured deterministically, not timed.

* JAX: XLA's own accounting of the compiled ``value_and_grad`` of the mean loss
  (``memory_analysis().temp_size_in_bytes``) at rows=4096, K=32000 is under 1% of the logits'
  bytes, for every convention and option that changes the program (the optax one-hot route
  needs about 2x the logits); differentiating ``smoothing`` and ``z_loss`` as well (or alone)
  keeps it there.
* PyTorch: the tensors the autograd graph saves for backward are the input itself and O(rows)
  statistics (``F.cross_entropy`` saves a rows x K log-softmax), also when ``smoothing`` and
  ``z_loss`` require grad.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
import torch
import torch.nn.functional as F

import lsjax
import lstorch
from tests.helpers import compiled_temp_bytes

ROWS, CLASSES = 4096, 32000
VARIANTS = [
    ("uniform", {}),
    ("uniform", {"ignore_index": -100, "weight": True}),
    ("others", {}),
    ("others", {"where": True, "kl": True}),
    ("others_but_pad", {"pad_index": 0}),
    ("others_but_pad", {"pad_index": 0, "from_log_probs": True, "ignore_index": -100}),
    ("uniform", {"class_mask": True, "z_loss": True}),
    ("others_but_pad", {"pad_index": 0, "class_mask": True, "weight": True, "z_loss": True}),
    # softcap and logit scale inside the closed form, and the per-row statistics
    ("others", {"class_mask": True, "z_loss": True, "lm": True}),
]


def _mask_and_z(options, classes, module):
    """Pop the class_mask / z_loss / lm flags into real options (a mask over every 7th class;
    softcap, logit scale and the statistics)."""
    extra = {}
    if options.pop("lm", False):  # with the z-loss flag: (loss, z_part, stats)
        extra.update(softcap=30.0, logit_scale=0.5, return_stats=True)
    if options.pop("class_mask", False):
        extra["class_mask"] = module.arange(classes) % 7 != 3
    if options.pop("z_loss", False):
        extra["z_loss"] = 1e-4
        extra["return_z_loss"] = True
    return extra


def _temp_bytes(loss, dtype):
    logits = jax.ShapeDtypeStruct((ROWS, CLASSES), dtype)
    return compiled_temp_bytes(loss, logits, jax.ShapeDtypeStruct((ROWS,), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("convention", "options"), VARIANTS, ids=[f"{c}-{sorted(o)}" for c, o in VARIANTS]
)
def test_jax_value_and_grad_temporaries_are_o_rows(convention, options, dtype):
    options = dict(options)
    weight = jnp.linspace(0.5, 2.0, CLASSES) if options.pop("weight", False) else None
    use_where = options.pop("where", False)
    extra = _mask_and_z(options, CLASSES, jnp)

    def loss(logits, labels):
        where = (labels % 3 != 0) if use_where else None
        value = lsjax.smoothed_cross_entropy(
            logits,
            labels,
            smoothing=0.1,
            convention=convention,
            weight=weight,
            where=where,
            reduction="mean",
            **options,
            **extra,
        )
        return value[0] + value[1] if extra.get("return_z_loss") else value

    temp = _temp_bytes(loss, dtype)
    logits_bytes = ROWS * CLASSES * 4  # the float32 logits' bytes
    assert temp < 0.01 * logits_bytes, f"{temp} bytes of temporaries ({temp / logits_bytes:.2%})"


def test_the_optax_route_is_what_the_bound_rules_out():
    # The measurement can fail: the one-hot route materialises rows x K temporaries.
    def loss(logits, labels):
        targets = optax.smooth_labels(jax.nn.one_hot(labels, CLASSES), 0.1)
        return optax.softmax_cross_entropy(logits, targets).mean()

    assert _temp_bytes(loss, jnp.float32) > ROWS * CLASSES * 4


def _saved_tensor_bytes(loss_fn, logits):
    """Bytes of every tensor autograd saves for backward, except the input logits itself."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(logits)
    extra = [
        t for t in saved if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()
    ]
    return sum(t.numel() * t.element_size() for t in extra), len(saved) - len(extra)


@pytest.mark.parametrize(
    ("convention", "options"), VARIANTS, ids=[f"{c}-{sorted(o)}" for c, o in VARIANTS]
)
def test_torch_autograd_saves_only_the_input_and_row_statistics(convention, options):
    options = dict(options)
    rows, classes = 512, 4000
    weight = torch.linspace(0.5, 2.0, classes) if options.pop("weight", False) else None
    use_where = options.pop("where", False)
    mask_and_z = _mask_and_z(options, classes, torch)
    logits = torch.randn(rows, classes, requires_grad=True)
    labels = torch.randint(1, classes, (rows,))
    if "class_mask" in mask_and_z:
        labels = torch.where(labels % 7 == 3, 1, labels)  # labels of allowed classes
    where = (labels % 3 != 0) if use_where else None
    extra, input_saves = _saved_tensor_bytes(
        lambda x: lstorch.smoothed_cross_entropy(
            x,
            labels,
            smoothing=0.1,
            convention=convention,
            weight=weight,
            where=where,
            reduction="mean",
            **options,
            **mask_and_z,
        ),
        logits,
    )
    assert input_saves >= 1  # backward recomputes from the input...
    # ...and otherwise keeps O(rows) values (labels, masks, lse) and the (K,) weight.
    assert extra <= 64 * rows + 8 * classes, extra
    # F.cross_entropy, for contrast, keeps a rows x K log-softmax.
    theirs, _ = _saved_tensor_bytes(
        lambda x: F.cross_entropy(x, labels, label_smoothing=0.1), logits
    )
    assert theirs >= rows * classes * 4


OPTION_VARIANTS = [
    ("others", {"kl": True}),
    ("others_but_pad", {"pad_index": 0, "class_mask": True, "weight": True}),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("convention", "options"), OPTION_VARIANTS, ids=[f"{c}-{sorted(o)}" for c, o in OPTION_VARIANTS]
)
def test_jax_derivatives_for_smoothing_and_z_loss_too_keep_temporaries_o_rows(
    convention, options, dtype
):
    options = dict(options)
    weight = jnp.linspace(0.5, 2.0, CLASSES) if options.pop("weight", False) else None
    class_mask = jnp.arange(CLASSES) % 7 != 3 if options.pop("class_mask", False) else None

    def loss(logits, labels, smoothing, z_loss):
        value, z_part = lsjax.smoothed_cross_entropy(
            logits,
            labels,
            smoothing=smoothing,
            convention=convention,
            weight=weight,
            class_mask=class_mask,
            z_loss=z_loss,
            return_z_loss=True,
            reduction="mean",
            **options,
        )
        return value + z_part

    args = (
        jax.ShapeDtypeStruct((ROWS, CLASSES), dtype),
        jax.ShapeDtypeStruct((ROWS,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float32),
    )
    logits_bytes = ROWS * CLASSES * 4
    for argnums in ((0, 2, 3), (2, 3)):  # with the logits' gradient, and the options' alone
        compiled = jax.jit(jax.value_and_grad(loss, argnums=argnums)).lower(*args).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < 0.01 * logits_bytes, f"{argnums}: {temp} bytes ({temp / logits_bytes:.2%})"


@pytest.mark.parametrize(
    ("convention", "options"), OPTION_VARIANTS, ids=[f"{c}-{sorted(o)}" for c, o in OPTION_VARIANTS]
)
def test_torch_saves_only_row_statistics_when_smoothing_and_z_loss_require_grad(
    convention, options
):
    options = dict(options)
    rows, classes = 512, 4000
    weight = torch.linspace(0.5, 2.0, classes) if options.pop("weight", False) else None
    class_mask = torch.arange(classes) % 7 != 3 if options.pop("class_mask", False) else None
    logits = torch.randn(rows, classes, requires_grad=True)
    labels = torch.randint(1, classes, (rows,))
    labels = torch.where(labels % 7 == 3, 1, labels)  # labels of allowed classes
    smoothing = torch.tensor(0.1, requires_grad=True)
    z_loss = torch.tensor(1e-4, requires_grad=True)
    extra, input_saves = _saved_tensor_bytes(
        lambda x: lstorch.smoothed_cross_entropy(
            x,
            labels,
            smoothing=smoothing,
            z_loss=z_loss,
            convention=convention,
            weight=weight,
            class_mask=class_mask,
            reduction="mean",
            **options,
        ),
        logits,
    )
    assert input_saves >= 1
    assert extra <= 64 * rows + 8 * classes, extra
