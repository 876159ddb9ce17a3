"""The examples run (smoke mode): the quickstarts print a decreasing loss, the digits examples
write their files, and torch_train.py --compare exits 0 (and 1 on a mismatch)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    flags += ["--hidden", "16", "--train-size", "100"]
    assert flax_train.main([*flags, "--out", str(tmp_path / "flax")]) == 0
    assert torch_train.main([*flags, "--out", str(tmp_path / "torch")]) == 0
    flax_metrics = _check_training_outputs(tmp_path / "flax")
    torch_metrics = _check_training_outputs(tmp_path / "torch")
    assert flax_metrics["config"]["convention"] == "others"
    assert flax_metrics["config"]["label_noise"] == 0.2
    assert flax_metrics["config"]["hidden"] == torch_metrics["config"]["hidden"] == 16
    assert flax_metrics["config"]["train_size"] == 100
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


def test_overconfidence_study_smoke(examples_path, tmp_path):
    import overconfidence_study

    assert overconfidence_study.main(["--smoke", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "overconfident.json").read_text())
    assert [row["hidden"] for row in summary["regime_rows"]] == [512]
    assert [row["smoothing"] for row in summary["rows"]] == [0.0, 0.1]
    assert [run["steps"] for run in summary["runs"]] == [3] * 4  # 2 smoothings x 2 seeds
    unsmoothed, smoothed = summary["rows"]
    # The paired differences: the unsmoothed row against itself is 0; the smoothed one is the
    # mean of the per-seed differences, recomputed here from the runs.
    assert unsmoothed["diff_accuracy"] == 0 and unsmoothed["diff_ece"] == 0
    runs = {(run["smoothing"], run["seed"]): run for run in summary["runs"]}
    expected = np.mean([runs[0.1, seed]["ece"] - runs[0.0, seed]["ece"] for seed in (0, 1)])
    assert smoothed["diff_ece"] == pytest.approx(expected)
    assert 0 <= smoothed["confidence"] <= 1
    assert (tmp_path / "overconfident.md").read_text().startswith("| regime | hidden |")
    assert _is_png(tmp_path / "overconfident_reliability.png")


def test_distillation_study_smoke(examples_path, tmp_path):
    import distillation_study

    assert distillation_study.main(["--smoke", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "distillation.json").read_text())
    assert [row["teacher_smoothing"] for row in summary["teachers"]] == [0.0, 0.1]
    students = rows = summary["students"]
    keys = [(r["transfer"], r["teacher_smoothing"], r["distillation_temperature"]) for r in rows]
    assert keys == [
        ("teacher's 200", 0.0, 4.0),
        ("teacher's 200", 0.1, 4.0),
        ("all 1,077", 0.0, 4.0),
        ("all 1,077", 0.1, 4.0),
    ]
    assert all(0 <= r["accuracy"] <= 1 and math.isfinite(r["nll"]) for r in students)
    # Paired by seed (one seed here): the student of the smoothed teacher minus the student of
    # the unsmoothed one on the same transfer set, and minus the hard-label student.
    hard = summary["hard_label_student"]["accuracy"]
    for unsmoothed, smoothed in (students[:2], students[2:]):
        assert unsmoothed["diff_vs_unsmoothed_teacher"] == 0
        assert smoothed["diff_vs_unsmoothed_teacher"] == pytest.approx(
            smoothed["accuracy"] - unsmoothed["accuracy"]
        )
        assert smoothed["diff_vs_hard_labels"] == pytest.approx(smoothed["accuracy"] - hard)
    # Flax and PyTorch train the same teacher and student step by step (float64 in smoke mode).
    (comparison,) = summary["framework_comparison"]
    assert comparison["dtype"] == "float64"
    for role in ("teacher", "student"):
        assert comparison[role]["steps"] == 3 and comparison[role]["passed"]
        assert comparison[role]["max_relative_difference"] <= 1e-8
    assert len(summary["penultimate_spread"]) == 2 * 2 * 2  # triples x train/test x teachers
    assert _is_png(tmp_path / "penultimate.png")
    assert _is_png(tmp_path / "distillation_compare.png")


def test_torch_train_compare_exits_zero_in_float64(examples_path, tmp_path, capsys):
    import torch_train

    flags = ["--compare", "--steps", "20", "--dtypes", "float64", "--out", str(tmp_path)]
    assert torch_train.main(flags) == 0  # the script's exit status (main's return value)
    assert "float64: largest per-step relative difference" in capsys.readouterr().out
    report = json.loads((tmp_path / "compare.json").read_text())["float64"]
    assert report["steps"] == 20 and report["passed"]
    assert report["max_relative_difference"] <= 1e-8
    assert _is_png(tmp_path / "compare.png")


def test_torch_train_compare_fails_on_a_mismatch(examples_path, tmp_path):
    import torch_train

    flags = ["--compare", "--steps", "5", "--dtypes", "float64", "--torch-smoothing", "0.101"]
    assert torch_train.main([*flags, "--out", str(tmp_path)]) == 1
    assert not json.loads((tmp_path / "compare.json").read_text())["float64"]["passed"]


# The language-model examples at tiny sizes. The Flax one also runs on a simulated 2x2 mesh (in a
# subprocess: the device count is fixed when jax starts) and must give the one-device losses.
TINY_LM = [
    *("--steps", "3", "--batch", "4", "--context", "16"),
    *("--features", "16", "--heads", "2", "--layers", "1", "--text-bytes", "20000"),
    "--no-progress",
]
FLAX_EVAL = ["--eval-every", "2", "--eval-batch", "4"]


def test_flax_lm_smoke_and_its_mesh_run_agree(examples_path, tmp_path):
    import flax_lm

    # With a softcap, so the sharded loss's softcap is checked against the one-device loss's.
    flags = [*TINY_LM, *FLAX_EVAL, "--softcap", "0.5"]  # small: it bites
    assert flax_lm.main([*flags, "--out", str(tmp_path / "one")]) == 0
    metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and len(metrics["train_loss"]) == 3
    assert [row["step"] for row in metrics["eval"]] == [0, 2, 3]
    for row in metrics["eval"]:
        assert 0 <= row["accuracy"] <= 1
        assert row["perplexity"] == pytest.approx(math.exp(row["nll"]))
    assert metrics["config"]["z_loss"] > 0 and metrics["config"]["smoothing"] > 0
    assert metrics["config"]["softcap"] == 0.5
    assert _is_png(tmp_path / "one" / "curves.png")

    flags = [*flags, "--mesh", "2x2", "--out", str(tmp_path / "mesh")]
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "flax_lm.py"), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    mesh = json.loads((tmp_path / "mesh" / "metrics.json").read_text())
    assert mesh["devices"] == 4
    # Same data and initial weights: the vocabulary-sharded loss trains as the one-device loss.
    assert mesh["train_loss"] == pytest.approx(metrics["train_loss"], rel=1e-5)


@pytest.mark.parametrize("variant", [["--z-loss", "1e-4"], ["--fused"]])
def test_hf_trainer_smoke(examples_path, tmp_path, variant):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import hf_trainer

    flags = [*TINY_LM, "--accumulation", "2", *variant, "--out", str(tmp_path)]
    assert hf_trainer.main(flags) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert metrics["train_loss"] and all(
        math.isfinite(row["loss"]) for row in metrics["train_loss"]
    )
    assert math.isfinite(metrics["after"]["nll"])
    assert metrics["after"]["perplexity"] == pytest.approx(math.exp(metrics["after"]["nll"]))
