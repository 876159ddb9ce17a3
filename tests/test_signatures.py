"""The keyword signatures, pinned to one another.

Every public loss spells its keywords out (so ``help()``, an editor and the docs site show
them), which writes the same options in several places: a JAX function and its PyTorch twin,
the dense loss and the losses that take its options (fused, sharded, vocabulary-parallel), a
function and its module (``tests/test_modules.py``). These tests make the copies agree: the same
names, in the same order, with the same defaults, apart from the differences listed here, each
a decision the docstrings explain.
"""

import inspect

import pytest
import torch.nn.functional as F

import lsjax
import lsjax.compat
import lsjax.sharded
import lstorch
import lstorch.compat
import lstorch.distributed

# Keywords one framework has and the other cannot: the core's implementation (XLA or Pallas)
# in JAX, the overwrite of the logits by their gradient in PyTorch.
FRAMEWORK_ONLY = {"implementation", "inplace_backward"}
# The class axis of the library's own losses: JAX's layout puts it last; torch's (N, C, d1,
# ...) puts it at 1, so lstorch asks for it when the logits have more than two dimensions.
TWIN_DEFAULTS = {
    ("smoothed_cross_entropy", "axis"): (-1, None),
    ("soft_target_cross_entropy", "axis"): (-1, None),
}
# A JAX function whose PyTorch twin has another name (Megatron's own), or is torch's own.
TWIN_NAMES = {"megatron.cross_entropy": "megatron.vocab_parallel_cross_entropy"}
# Twins whose PyTorch side keeps its library's argument names (Megatron's
# ``vocab_parallel_logits``, ``tp_group``): their shared keywords are compared.
OWN_NAMES = {"megatron.cross_entropy"}
TORCH_ITSELF = {"cross_entropy": F.cross_entropy, "pytorch.cross_entropy": F.cross_entropy}


def _parameters(function) -> dict[str, inspect.Parameter]:
    return {
        name: parameter
        for name, parameter in inspect.signature(function).parameters.items()
        if not name.startswith("_") and name != "self"
    }


def _public_functions(namespace, names=None):
    """The functions ``names`` lists (default: the public ones the module itself defines)."""
    if names is None:
        names = [
            name for name, value in vars(namespace).items()
            if not name.startswith("_") and getattr(value, "__module__", "") == namespace.__name__
        ]  # fmt: skip
    return {
        name: getattr(namespace, name)
        for name in names
        if inspect.isfunction(getattr(namespace, name))
    }


def _twins():
    pairs = {
        name: (function, TORCH_ITSELF.get(name) or getattr(lstorch, name))
        for name, function in _public_functions(lsjax, lsjax.__all__).items()
    }
    for module in lsjax.compat.__all__:
        jax_module = getattr(lsjax.compat, module)
        for name, function in _public_functions(jax_module).items():
            key = f"{module}.{name}"
            if key in TORCH_ITSELF:
                pairs[key] = (function, TORCH_ITSELF[key])
                continue
            torch_module, torch_name = TWIN_NAMES.get(key, key).split(".")
            pairs[key] = (function, getattr(getattr(lstorch.compat, torch_module), torch_name))
    return pairs


TWINS = _twins()


def test_the_twins_cover_lsjax():
    assert len(TWINS) >= 15 and "smoothed_cross_entropy" in TWINS
    assert "fairseq.label_smoothed_nll_loss" in TWINS


@pytest.mark.parametrize("name", sorted(TWINS))
def test_a_jax_function_and_its_pytorch_twin_take_the_same_keywords(name):
    jax_function, torch_function = TWINS[name]
    jax_params, torch_params = _parameters(jax_function), _parameters(torch_function)
    if name in TORCH_ITSELF:  # torch's own function: lsjax takes its names and defaults
        assert set(jax_params) - FRAMEWORK_ONLY - {"check_labels"} <= set(torch_params)
    elif name in OWN_NAMES:
        assert {"label_smoothing", "check_labels"} <= set(jax_params) & set(torch_params)
    else:
        shared = [key for key in jax_params if key not in FRAMEWORK_ONLY]
        assert shared == [key for key in torch_params if key not in FRAMEWORK_ONLY]
    for key in set(jax_params) & set(torch_params):
        default = jax_params[key].default
        jax_default, torch_default = TWIN_DEFAULTS.get((name, key), (default, default))
        assert jax_params[key].default == jax_default, key
        assert torch_params[key].default == torch_default, key
        if name not in {*TORCH_ITSELF, *OWN_NAMES}:
            assert jax_params[key].kind == torch_params[key].kind, key


# The losses that take the dense loss's options, with the defaults that differ on purpose: a
# fused head or a module is a training objective, so it reduces by "mean" (as
# torch.nn.CrossEntropyLoss); the modules ignore -100 (the Hugging Face / torch convention).
# ``weight`` is the output layer's weight in a fused head (its class weights: ``class_weight``).
RESTATED = {
    "lsjax": (
        lsjax.smoothed_cross_entropy,
        {
            lsjax.fused_linear_smoothed_cross_entropy: {"reduction": "mean"},
            lsjax.sharded.sharded_fused_linear_smoothed_cross_entropy: {"reduction": "mean"},
        },
    ),
    "lstorch": (
        lstorch.smoothed_cross_entropy,
        {
            lstorch.fused_linear_smoothed_cross_entropy: {"reduction": "mean"},
            lstorch.distributed.vocab_parallel_smoothed_cross_entropy: {},
            lstorch.distributed.vocab_parallel_fused_linear_smoothed_cross_entropy: {
                "reduction": "mean"
            },
            lstorch.SmoothedCrossEntropyLoss.__init__: {"reduction": "mean", "ignore_index": -100},
            lstorch.FusedLinearSmoothedCrossEntropyLoss.__init__: {
                "reduction": "mean",
                "ignore_index": -100,
            },
        },
    ),
}
CASES = [(package, function) for package, (_, others) in RESTATED.items() for function in others]


@pytest.mark.parametrize(
    ("package", "function"), CASES, ids=[f"{p}.{f.__qualname__}" for p, f in CASES]
)
def test_a_loss_that_takes_the_dense_options_takes_them_as_the_dense_loss(package, function):
    dense_loss, others = RESTATED[package]
    dense, restated = _parameters(dense_loss), _parameters(function)
    different = others[function]
    shared = [key for key in restated if key in dense and key != "weight"]
    assert len(shared) >= 12, shared  # the label, smoothing, reduction and LM options
    for key in shared:
        expected = different.get(key, dense[key].default)
        assert restated[key].default == expected, key
        assert restated[key].kind == dense[key].kind, key
