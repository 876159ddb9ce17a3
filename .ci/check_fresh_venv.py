"""Run by .ci/fresh_venvs inside a fresh venv holding the wheel with one extra: jax or torch.

``python -I .ci/check_fresh_venv.py jax`` (or ``torch``) asserts what a user of that one framework
meets: the installed packages (not a source tree) with their py.typed; the other framework is not
importable; its package and ``parity_tests`` raise an ImportError naming the extra to install (so
does ``lstorch.integrations.huggingface`` without transformers, naming ``[hf]``); this framework's
package computes a loss equal to a float64 NumPy formula; calibration works on this framework's
arrays and on NumPy; plotting without matplotlib names the ``[plot]`` extra.
"""

import importlib
import importlib.metadata
import importlib.util
import pathlib
import sys
import sysconfig

import numpy as np

FRAMEWORK = sys.argv[1]
OTHER = {"jax": "torch", "torch": "jax"}[FRAMEWORK]
PACKAGE = {"jax": "lsjax", "torch": "lstorch"}
INSTALL = "pip install 'label-smoothing-parity[{}]'"


def import_error(module: str) -> str:
    """The message of the ImportError that importing ``module`` raises."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        return str(error)
    raise AssertionError(f"`import {module}` worked in the [{FRAMEWORK}]-only venv")


# The wheel as installed: every package from site-packages, with py.typed, and the license.
site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
for package in ("lsspec", "lsjax", "lstorch", "parity_tests"):
    spec = importlib.util.find_spec(package)
    location = pathlib.Path(spec.origin).resolve().parent
    assert location == site / package, (package, location, site)
    assert (location / "py.typed").is_file(), f"{package} has no py.typed"
metadata = importlib.metadata.metadata("label-smoothing-parity")
assert metadata["License-Expression"] == "Apache-2.0", metadata["License-Expression"]
files = importlib.metadata.files("label-smoothing-parity")
license_files = [path for path in files if path.name == "LICENSE"]
assert license_files and "Apache License" in license_files[0].read_text(), license_files

# The other framework is absent; its package and parity_tests say which extra brings it.
assert importlib.util.find_spec(OTHER) is None, f"{OTHER} is importable in the [{FRAMEWORK}] venv"
assert importlib.util.find_spec("matplotlib") is None, "matplotlib came with the extra"
for module in (PACKAGE[OTHER], f"{PACKAGE[OTHER]}.calibration"):
    message = import_error(module)
    assert INSTALL.format(OTHER) in message, message
message = import_error("parity_tests")
assert INSTALL.format("parity") in message, message
if FRAMEWORK == "torch":  # the Hugging Face integration needs transformers, from the [hf] extra
    assert importlib.util.find_spec("transformers") is None, "transformers came with [torch]"
    message = import_error("lstorch.integrations.huggingface")
    assert INSTALL.format("hf") in message, message

# This framework's package: one loss against the float64 formula of the uniform convention,
# loss_i = logsumexp(x_i) - (1 - eps) x_{i,y_i} - (eps / K) sum_c x_ic.
rng = np.random.default_rng(0)
logits = rng.standard_normal((5, 4))
labels = rng.integers(0, 4, size=5)
eps = 0.1
shifted = logits - logits.max(axis=1, keepdims=True)
lse = np.log(np.exp(shifted).sum(axis=1)) + logits.max(axis=1)
expected = lse - (1 - eps) * logits[np.arange(5), labels] - eps / 4 * logits.sum(axis=1)
if FRAMEWORK == "jax":
    import jax.numpy as jnp

    import lsjax
    from lsjax import calibration

    loss = lsjax.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing=eps)
    as_framework = jnp.asarray
else:
    import torch

    import lstorch
    from lstorch import calibration

    loss = lstorch.smoothed_cross_entropy(
        torch.tensor(logits, requires_grad=True), torch.tensor(labels), smoothing=eps
    )
    loss = loss.detach()

    def as_framework(array):
        return torch.tensor(array, requires_grad=np.issubdtype(array.dtype, np.floating))


np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5)

# Calibration on this framework's arrays and on NumPy (lsspec.calibration, NumPy only).
# Two samples, two bins of (0, 0.5], (0.5, 1]: confidences 0.8 (right) and 0.7 (wrong) share the
# upper bin, accuracy 1/2 against mean confidence 3/4: ECE = MCE = 1/4.
import lsspec.calibration  # noqa: E402

probs = np.array([[0.8, 0.2], [0.3, 0.7]])
truth = np.array([0, 0])
for module, convert in ((calibration, as_framework), (lsspec.calibration, np.asarray)):
    ece = module.expected_calibration_error(convert(probs), convert(truth), num_bins=2)
    assert abs(ece - 0.25) < 1e-6, (module.__name__, ece)
    # NLL at T = 1 of logits (log 4, 0) and label 0 for both rows: log(5/4) and log(5).
    nll = module.negative_log_likelihood(
        convert(np.log([[4.0, 1.0], [4.0, 1.0]])), convert(np.array([0, 1]))
    )
    assert abs(nll - 0.5 * (np.log(1.25) + np.log(5.0))) < 1e-6, (module.__name__, nll)
assert calibration.expected_calibration_error is lsspec.calibration.expected_calibration_error
message = ""
try:
    calibration.plot_reliability_diagram(as_framework(probs), as_framework(truth))
except ImportError as error:
    message = str(error)
assert INSTALL.format("plot") in message, message
print(f"[{FRAMEWORK}] only: imports, missing-extra errors, loss and calibration as expected")
