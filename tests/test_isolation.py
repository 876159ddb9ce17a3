"""lsjax never imports torch and lstorch never imports jax, so each installs and imports alone."""

import subprocess
import sys

import pytest

BLOCK = (
    "import sys; sys.modules[{blocked!r}] = None; import {package}, {package}.compat\n"
    "print(sorted(name for name in {unloaded} if name in sys.modules) or 'ok')"
)


# lstorch imports neither torch.compile's tracer (torch._dynamo, about a second and a half) nor
# Triton: the first call that needs them imports them.
@pytest.mark.parametrize(
    ("package", "blocked", "unloaded"),
    [("lsjax", "torch", ()), ("lstorch", "jax", ("torch._dynamo", "triton"))],
)
def test_imports_without_the_other_framework(package, blocked, unloaded):
    # sys.modules[name] = None makes any import of that framework raise ImportError.
    code = BLOCK.format(package=package, blocked=blocked, unloaded=unloaded)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def _run_blocked(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``blocked`` fails, as it does
    where that package is not installed (``sys.modules[name] = None``)."""
    prologue = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    return subprocess.run(
        [sys.executable, "-c", prologue + code], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("lsjax", "jax", "jax"),
        ("lsjax.calibration", "jax", "jax"),
        ("lsjax.compat", "jax", "jax"),
        ("lstorch", "torch", "torch"),
        ("lstorch.calibration", "torch", "torch"),
        ("lstorch.compat", "torch", "torch"),
        ("lstorch.integrations.huggingface", "transformers", "hf"),
        ("parity_tests", "jax", "parity"),
        ("parity_tests", "optax", "parity"),
        ("parity_tests", "torch", "parity"),
    ],
)
def test_a_missing_framework_is_named_with_its_extra(module, blocked, extra):
    result = _run_blocked((blocked,), f"import {module}")
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: "), result.stderr
    assert f"{blocked!r} is not installed" in last_line, last_line
    assert f"pip install 'label-smoothing-parity[{extra}]'" in last_line, last_line


# Two samples, two bins (0, 0.5] and (0.5, 1]: confidences 0.8 (right) and 0.7 (wrong) share the
# upper bin, accuracy 1/2 against mean confidence 3/4, so ECE = 1/4.
HAND_ECE = (
    "assert abs(calibration.expected_calibration_error(\n"
    "    {array}([[0.8, 0.2], [0.3, 0.7]]), {array}([0, 0]), num_bins=2) - 0.25) < 1e-12\n"
)


def test_calibration_with_pytorch_alone():
    # lstorch.calibration on tensors (one with requires_grad), with JAX and matplotlib absent;
    # the plot helper then names the [plot] extra.
    code = (
        "import torch\n"
        "from lstorch import calibration\n"
        + HAND_ECE.format(array="torch.tensor")
        + "probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)\n"
        "probs.requires_grad_(True)\n"
        "assert calibration.maximum_calibration_error(probs, torch.tensor([0, 0]), num_bins=2)"
        " == 0.25\n"
        "assert not any(name.startswith(('jax', 'optax')) and sys.modules[name] is not None\n"
        "               for name in sys.modules)\n"
        "try:\n"
        "    calibration.plot_reliability_diagram(probs, torch.tensor([0, 0]))\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = _run_blocked(("jax", "matplotlib"), code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "plot_reliability_diagram needs matplotlib, and 'matplotlib' is not installed; install "
        "the [plot] extra: pip install 'label-smoothing-parity[plot]'"
    )


def test_calibration_with_numpy_alone():
    # The base install (numpy only): lsspec.calibration, the functions both frameworks re-export.
    code = (
        "import numpy as np\n"
        "from lsspec import calibration\n"
        + HAND_ECE.format(array="np.array")
        + "import lsspec.calibration\n"
        "assert calibration is lsspec.calibration\n"
        "assert not any(name.split('.')[0] in ('jax', 'torch') and sys.modules[name] is not None\n"
        "               for name in sys.modules)\n"
    )
    result = _run_blocked(("jax", "torch"), code)
    assert result.returncode == 0, result.stderr


def test_both_frameworks_reexport_every_calibration_name():
    import lsjax.calibration
    import lsspec.calibration
    import lstorch.calibration

    public = {
        name
        for name, value in vars(lsspec.calibration).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == "lsspec.calibration"
    } | {"DEFAULT_NUM_BINS", "DEFAULT_TEMPERATURE_BOUNDS"}
    for module in (lsjax.calibration, lstorch.calibration):
        assert set(module.__all__) == public, module.__name__
        for name in public:
            assert getattr(module, name) is getattr(lsspec.calibration, name), name


def test_the_packages_ship_py_typed_and_the_license():
    import pathlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = pathlib.Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())
    packages = ("lsjax", "lstorch", "lsspec", "parity_tests")
    assert all((root / package / "py.typed").is_file() for package in packages)
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["*"]
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    license_text = (root / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in license_text
    extras = project["project"]["optional-dependencies"]
    assert {"jax", "torch", "parity", "plot", "hf", "dev"} <= set(extras)
