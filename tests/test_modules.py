"""lstorch's ``nn.Module`` s against their functions, and the class axis of ``(N, C, d1, ...)``.

Each module takes every keyword of its function: read from the signatures, so a keyword added to
a function and not to its module fails here. ``repr`` shows every option; ``weight`` and
``class_mask`` are buffers. Logits with 3 or more dimensions need an explicit ``axis`` in lstorch
(torch's layout puts the classes on axis 1, JAX's on the last one); the expected values come
from ``torch.nn.CrossEntropyLoss`` itself and from the float64 NumPy oracle.
"""

import inspect
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import lsjax
import lstorch
import lstorch.distributed
from parity_tests import oracles

# Every nn.Module lstorch exports, with the function it is the module form of.
MODULES = {
    lstorch.SmoothedCrossEntropyLoss: lstorch.smoothed_cross_entropy,
    lstorch.FusedLinearSmoothedCrossEntropyLoss: lstorch.fused_linear_smoothed_cross_entropy,
    lstorch.LabelSmoothingLoss: lstorch.label_smoothing_loss,
    lstorch.KLLabelSmoothingLoss: lstorch.kl_label_smoothing_loss,
}
# The module defaults that differ from the function's, on purpose (a training objective, as
# torch.nn.CrossEntropyLoss): documented in the modules' docstrings.
DIFFERENT_DEFAULTS = {
    lstorch.SmoothedCrossEntropyLoss: {"reduction": "mean", "ignore_index": -100},
    lstorch.FusedLinearSmoothedCrossEntropyLoss: {"ignore_index": -100},
}
# Arguments the forum's and OpenNMT's modules require, to build one.
REQUIRED = {
    lstorch.LabelSmoothingLoss: {"classes": 5},
    lstorch.KLLabelSmoothingLoss: {"label_smoothing": 0.1, "tgt_vocab_size": 5},
}


def _parameters(function) -> dict[str, inspect.Parameter]:
    """The public parameters (``self`` and internal ``_`` ones left out)."""
    return {
        name: parameter
        for name, parameter in inspect.signature(function).parameters.items()
        if name != "self" and not name.startswith("_")
    }


def _exported_modules():
    namespaces = [lstorch] + [getattr(lstorch.compat, name) for name in lstorch.compat.__all__]
    return {
        value
        for namespace in namespaces
        for value in vars(namespace).values()
        if isinstance(value, type) and issubclass(value, nn.Module) and value.__module__
        .startswith("lstorch")
    }  # fmt: skip


def test_every_exported_module_is_checked_here():
    assert _exported_modules() == set(MODULES)


@pytest.mark.parametrize("module_class", list(MODULES), ids=lambda c: c.__name__)
def test_module_takes_every_keyword_of_its_function(module_class):
    function = _parameters(MODULES[module_class])
    init, forward = _parameters(module_class.__init__), _parameters(module_class.forward)
    missing = set(function) - set(init) - set(forward)
    assert not missing, f"{module_class.__name__} lacks {sorted(missing)}"
    assert set(init) <= set(function), "a constructor argument the function does not have"
    assert not set(init) & set(forward)
    for name in init:
        expected = DIFFERENT_DEFAULTS.get(module_class, {}).get(name, function[name].default)
        assert init[name].default == expected, name


@pytest.mark.parametrize("module_class", list(MODULES), ids=lambda c: c.__name__)
def test_repr_shows_every_option(module_class):
    text = repr(module_class(**REQUIRED.get(module_class, {})))
    for name in _parameters(module_class.__init__):
        assert f"{name}=" in text, name


def _args_entry(doc: str, name: str) -> str:
    """The text of ``name``'s entry in a docstring's ``Args:`` section (whitespace collapsed)."""
    lines = inspect.cleandoc(doc).splitlines()
    start = lines.index("Args:") + 1
    entry = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break
        if line.startswith("  ") and not line.startswith("    "):
            if entry:
                break
            if line.strip().startswith(f"{name}:"):
                entry.append(line)
        elif entry and line:
            entry.append(line)
    return " ".join(" ".join(entry).split())


@pytest.mark.parametrize("module_class", list(MODULES), ids=lambda c: c.__name__)
def test_module_documents_its_arguments_in_its_functions_words(module_class):
    # One source: each constructor argument's entry is the function's, word for word.
    for name in _parameters(module_class.__init__):
        expected = _args_entry(MODULES[module_class].__doc__, name)
        assert expected, f"{MODULES[module_class].__name__} does not document {name}"
        assert _args_entry(module_class.__doc__, name) == expected, name


@pytest.mark.parametrize("module_class", list(MODULES), ids=lambda c: c.__name__)
def test_module_docstring_has_a_shape_section(module_class):
    # As torch.nn's losses: the shapes forward takes and returns, after the arguments.
    lines = [line.strip() for line in module_class.__doc__.splitlines()]
    assert "Shape:" in lines and lines.index("Args:") < lines.index("Shape:")
    for name in _parameters(module_class.forward):
        assert any(line.startswith(f"- {name}") for line in lines), name


def _public_lstorch_objects():
    namespaces = [lstorch] + [getattr(lstorch.compat, name) for name in lstorch.compat.__all__]
    namespaces.append(lstorch.distributed)
    for namespace in namespaces:
        for name in getattr(namespace, "__all__", None) or dir(namespace):
            value = getattr(namespace, name)
            public = not name.startswith("_")
            if public and callable(value) and value.__module__.startswith("lstorch"):
                yield f"{namespace.__name__}.{name}", value


def test_lstorch_docstrings_stand_on_their_own():
    # A PyTorch user reads lstorch's docs: they name the JAX twin, but never defer to it.
    deferring = re.compile(r"\b(see|as|whose docstring)\s+``lsjax|whose docstring carries")
    for name, value in _public_lstorch_objects():
        assert value.__doc__, name
        assert not deferring.search(" ".join(value.__doc__.split())), name


def test_weight_and_class_mask_are_buffers():
    weight = [0.5, 1.0, 2.0, 1.0, 3.0]  # a list, as lsjax takes one
    class_mask = [True, True, False, True, True]
    module = lstorch.SmoothedCrossEntropyLoss(weight=weight, class_mask=class_mask)
    assert set(dict(module.named_buffers())) == {"weight", "class_mask"}
    assert set(module.state_dict()) == {"weight", "class_mask"}
    module.to(torch.float64)
    assert module.weight.dtype == torch.float64 and module.class_mask.dtype == torch.bool
    moved = module.to("meta")  # .to(device) carries both
    assert moved.weight.device.type == "meta" and moved.class_mask.device.type == "meta"
    restored = lstorch.SmoothedCrossEntropyLoss(
        weight=torch.ones(5, dtype=torch.float64), class_mask=torch.ones(5, dtype=torch.bool)
    )
    restored.load_state_dict(lstorch.SmoothedCrossEntropyLoss(
        weight=weight, class_mask=class_mask
    ).to(torch.float64).state_dict())  # fmt: skip
    torch.testing.assert_close(restored.weight, torch.tensor(weight, dtype=torch.float64))
    assert restored.class_mask.tolist() == class_mask


def test_module_forwards_class_mask_z_loss_and_return_z_loss():
    """Every option at a non-default value, (N, C, T) logits with axis=1, against the oracle."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 6, 4))
    labels = rng.choice([1, 2, 4, 5], size=(3, 4))  # class 3 is masked, 0 is the pad
    labels[0, 0] = 0
    where = rng.random((3, 4)) < 0.8
    options = dict(
        smoothing=0.2,
        convention="others_but_pad",
        pad_index=0,
        ignore_index=None,
        weight=np.array([1.0, 0.5, 2.0, 1.0, 1.5, 0.7]),
        axis=1,
        reduction="mean",
        normalizer=7.0,
        class_mask=np.array([True, True, True, False, True, True]),
        z_loss=0.01,
        return_z_loss=True,
    )
    (loss, z_part), _ = oracles.smoothed_cross_entropy(logits, labels, where=where, **options)
    module = lstorch.SmoothedCrossEntropyLoss(
        **{k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    )
    got_loss, got_z = module(
        torch.as_tensor(logits), torch.as_tensor(labels), torch.as_tensor(where)
    )
    np.testing.assert_allclose(got_loss.item(), loss, rtol=1e-12)
    np.testing.assert_allclose(got_z.item(), z_part, rtol=1e-12)
    log_probs = torch.log_softmax(torch.as_tensor(logits), 1)
    kl = lstorch.SmoothedCrossEntropyLoss(smoothing=0.1, kl=True, from_log_probs=True, axis=1)
    expected, _ = oracles.smoothed_cross_entropy(
        log_probs.numpy(), labels, smoothing=0.1, kl=True, from_log_probs=True, axis=1,
        ignore_index=-100, reduction="mean",
    )  # fmt: skip
    np.testing.assert_allclose(kl(log_probs, torch.as_tensor(labels)).item(), expected, rtol=1e-12)


# --- The class axis of inputs with 3 or more dimensions --------------------------------------


def _nct(classes=5, positions=5, seed=0):
    """(N, C, T) logits in torch's layout; with C == T a wrong class axis still has the shape."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((4, classes, positions)).astype(np.float32)
    return logits, rng.integers(0, classes, size=(4, positions))


def _torch_ce(logits, labels, smoothing=0.1):
    loss = nn.CrossEntropyLoss(label_smoothing=smoothing)
    return loss(torch.as_tensor(logits), torch.as_tensor(labels)).item()


NO_AXIS = {
    "SmoothedCrossEntropyLoss": lambda x, y: lstorch.SmoothedCrossEntropyLoss(smoothing=0.1)(x, y),
    "smoothed_cross_entropy": lambda x, y: lstorch.smoothed_cross_entropy(x, y, smoothing=0.1),
    "soft_target_cross_entropy": lambda x, y: lstorch.soft_target_cross_entropy(
        x, torch.softmax(x, 1), smoothing=0.1
    ),
}


@pytest.mark.parametrize("call", NO_AXIS.values(), ids=list(NO_AXIS))
@pytest.mark.parametrize("positions", [5, 3], ids=["C == T", "C != T"])
def test_logits_with_three_dimensions_need_an_explicit_axis(call, positions):
    logits, labels = _nct(classes=5, positions=positions)
    with pytest.raises(ValueError, match=r"`axis` must be given.*axis=1 for torch's.*axis=-1"):
        call(torch.as_tensor(logits), torch.as_tensor(labels))


def test_nct_with_axis_1_is_torchs_cross_entropy_loss():
    """The drop-in: nn.CrossEntropyLoss(label_smoothing=eps) on (N, C, T), C == T."""
    logits, labels = _nct()
    x, y = torch.as_tensor(logits), torch.as_tensor(labels)
    expected = _torch_ce(logits, labels)
    module = lstorch.SmoothedCrossEntropyLoss(smoothing=0.1, axis=1)
    assert module(x, y).item() == pytest.approx(expected, rel=1e-6)
    function = lstorch.smoothed_cross_entropy(x, y, smoothing=0.1, axis=1, reduction="mean")
    assert function.item() == pytest.approx(expected, rel=1e-6)
    # The classes last (a language model's (batch, time, vocab)) is axis=-1.
    last = lstorch.SmoothedCrossEntropyLoss(smoothing=0.1, axis=-1)(x.movedim(1, -1), y)
    assert last.item() == pytest.approx(expected, rel=1e-6)


def test_the_twins_agree_under_an_explicit_axis_and_lsjax_defaults_to_the_last():
    logits, labels = _nct()
    expected = _torch_ce(logits, labels)
    for axis, x in ((1, logits), (-1, np.moveaxis(logits, 1, -1))):
        jax_loss = lsjax.smoothed_cross_entropy(
            jnp.asarray(x), jnp.asarray(labels), smoothing=0.1, axis=axis, reduction="mean"
        )
        torch_loss = lstorch.smoothed_cross_entropy(
            torch.as_tensor(x), torch.as_tensor(labels), smoothing=0.1, axis=axis,
            reduction="mean",
        )  # fmt: skip
        assert float(jax_loss) == pytest.approx(expected, rel=1e-6)
        assert torch_loss.item() == pytest.approx(expected, rel=1e-6)
    # lsjax keeps optax's layout: without axis the classes are the last axis (documented).
    default = lsjax.smoothed_cross_entropy(
        jnp.asarray(np.moveaxis(logits, 1, -1)), jnp.asarray(labels), smoothing=0.1,
        reduction="mean",
    )  # fmt: skip
    assert float(default) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("shape", [(5,), (4, 5)], ids=["(C,)", "(N, C)"])
def test_one_and_two_dimensions_need_no_axis(shape):
    """There the last axis is torch's class axis too."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(shape).astype(np.float32)
    labels = rng.integers(0, 5, size=shape[:-1])
    got = lstorch.SmoothedCrossEntropyLoss(smoothing=0.1)(
        torch.as_tensor(logits), torch.as_tensor(labels)
    )
    assert got.item() == pytest.approx(_torch_ce(logits, labels), rel=1e-6)


def test_list_class_weights_keep_float64_precision():
    """A list of Python floats is float64; rounding it to float32 (torch.as_tensor's default)
    moved float64 losses by about 1e-9."""
    rng = np.random.default_rng(12)
    logits = torch.tensor(rng.standard_normal((6, 4)))
    labels = torch.tensor(rng.integers(0, 4, size=6))
    weight = [0.1, 0.7, 1.3, 2.9]
    expected = nn.functional.cross_entropy(
        logits, labels, weight=torch.tensor(weight, dtype=torch.float64), label_smoothing=0.2
    )
    function = lstorch.smoothed_cross_entropy(
        logits, labels, smoothing=0.2, weight=weight, reduction="mean"
    )
    module = lstorch.SmoothedCrossEntropyLoss(smoothing=0.2, weight=weight)(logits, labels)
    for got in (function, module):
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


def _opennmt_one_hot(label_smoothing, tgt_vocab_size, ignore_index, dtype=torch.float32):
    """OpenNMT-py's ``LabelSmoothingLoss.__init__``, line by line: the buffer it registers."""
    one_hot = torch.full((tgt_vocab_size,), label_smoothing / (tgt_vocab_size - 2), dtype=dtype)
    one_hot[ignore_index] = 0
    return one_hot.unsqueeze(0)


class _WithLoss(nn.Module):
    """A model that holds its loss as a submodule (as a Lightning module does)."""

    def __init__(self, criterion):
        super().__init__()
        self.head, self.criterion = nn.Linear(3, 4), criterion


@pytest.mark.parametrize("ignore_index", [-100, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: after model.double()
def test_kl_module_loads_a_checkpoint_saved_with_opennmts_module(ignore_index, dtype):
    """A checkpoint of a model whose loss was OpenNMT-py's module carries its ``one_hot``
    buffer; the drop-in loads it with strict=True, and refuses one of another configuration."""
    saved = {
        "head.weight": torch.randn(4, 3),
        "head.bias": torch.randn(4),
        "criterion.one_hot": _opennmt_one_hot(0.1, 120, ignore_index, dtype),
    }
    model = _WithLoss(lstorch.KLLabelSmoothingLoss(0.1, 120, ignore_index=ignore_index))
    model.load_state_dict(saved, strict=True)
    torch.testing.assert_close(model.head.weight, saved["head.weight"], rtol=0, atol=0)
    assert "criterion.one_hot" in saved  # the caller's dict is left as it was
    assert list(model.state_dict()) == ["head.weight", "head.bias"]
    model.load_state_dict({"head.weight": saved["head.weight"], "head.bias": saved["head.bias"]})
    for other in (_opennmt_one_hot(0.2, 120, ignore_index), _opennmt_one_hot(0.1, 121, 1)):
        message = (
            r"KLLabelSmoothingLoss: the saved buffer criterion.one_hot \(OpenNMT-py's smoothed "
            rf"target row\) is not the one OpenNMT builds from label_smoothing=0.1, "
            rf"tgt_vocab_size=120, ignore_index={ignore_index}: the checkpoint is of another "
            r"configuration"
        )
        with pytest.raises(RuntimeError, match=message):
            model.load_state_dict({**saved, "criterion.one_hot": other})


@pytest.mark.parametrize(
    "module_class", [lstorch.SmoothedCrossEntropyLoss, lstorch.FusedLinearSmoothedCrossEntropyLoss]
)
def test_a_negative_pad_index_raises_at_construction(module_class):
    """No class count is needed to know that -5 is no column: it raises when the module is
    built, as the function raises when called (where it also names the range)."""
    message = (
        rf"{module_class.__name__}: convention='others_but_pad' needs `pad_index`, an int >= 0 "
        r"\(the pad column\); got -5\."
    )
    with pytest.raises(ValueError, match=message):
        module_class(smoothing=0.1, convention="others_but_pad", pad_index=-5)
