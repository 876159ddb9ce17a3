"""The examples run (smoke mode): the quickstarts print a decreasing loss, the digits examples
write their files, and torch_train.py --compare exits 0 (and 1 on a mismatch)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["quickstart_jax.py", "quickstart_torch.py"])
def test_quickstart_runs_and_learns(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 5 and losses[-1] < losses[0], result.stdout


# The digits examples. Smoke runs call each script's main() in this process (jax, torch and
# matplotlib are imported once, so each test takes a few seconds); the --compare contract is also
# checked through the command line, as users run it.
EXAMPLES = ROOT / "examples"
METRIC_KEYS = {
    "config",
    "accuracy",
    "nll",
    "ece",
    "mce",
    "temperature",
    "nll_after_temperature",
    "ece_after_temperature",
    "steps",
    "final_train_loss",
    "seconds",
}


@pytest.fixture
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # torch_train.main() sets 1


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_training_outputs(out):
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    assert metrics["steps"] == 3
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["ece"] <= 1
    assert 0 <= metrics["ece_after_temperature"] <= 1
    assert math.isfinite(metrics["nll"]) and metrics["temperature"] > 0
    assert _is_png(out / "reliability.png")
    return metrics


def test_flax_and_torch_train_smoke(examples_path, tmp_path):
    import flax_train
    import torch_train

    flags = ["--smoke", "--smoothing", "0.1", "--label-noise", "0.2", "--convention", "others"]
    assert flax_train.main([*flags, "--out", str(tmp_path / "flax")]) == 0
    assert torch_train.main([*flags, "--out", str(tmp_path / "torch")]) == 0
    flax_metrics = _check_training_outputs(tmp_path / "flax")
    torch_metrics = _check_training_outputs(tmp_path / "torch")
    assert flax_metrics["config"]["convention"] == "others"
    assert flax_metrics["config"]["label_noise"] == 0.2
    # Same split, initial weights, batches and optimizer: the float32 losses agree within the
    # float32 tolerance of --compare (torch_train.TOLERANCES explains it).
    assert torch_metrics["final_train_loss"] == pytest.approx(
        flax_metrics["final_train_loss"], rel=torch_train.TOLERANCES["float32"]
    )


def test_study_smoke(examples_path, tmp_path):
    import label_smoothing_study

    assert label_smoothing_study.main(["--smoke", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "study.json").read_text())
    assert [(row["label_noise"], row["smoothing"]) for row in summary["rows"]] == [
        (0.2, 0.0),
        (0.2, 0.1),
    ]
    assert {"accuracy", "nll", "ece", "ece_after_temperature", "accuracy_std"} <= set(
        summary["rows"][0]
    )
    assert (tmp_path / "study.md").read_text().startswith("| label noise | smoothing |")
    assert _is_png(tmp_path / "study.png")


def test_torch_train_compare_exits_zero_in_float64(tmp_path):
    flags = ["--compare", "--steps", "20", "--dtypes", "float64", "--out", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "torch_train.py"), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "float64: largest per-step relative difference" in result.stdout
    report = json.loads((tmp_path / "compare.json").read_text())["float64"]
    assert report["steps"] == 20 and report["passed"]
    assert report["max_relative_difference"] <= 1e-8
    assert _is_png(tmp_path / "compare.png")


def test_torch_train_compare_fails_on_a_mismatch(examples_path, tmp_path):
    import torch_train

    flags = ["--compare", "--steps", "5", "--dtypes", "float64", "--torch-smoothing", "0.101"]
    assert torch_train.main([*flags, "--out", str(tmp_path)]) == 1
    assert not json.loads((tmp_path / "compare.json").read_text())["float64"]["passed"]
