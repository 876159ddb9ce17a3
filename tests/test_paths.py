"""Every twin on every execution path it reaches, against its plain path and the float64
oracle, with every kind of upstream gradient (``parity_tests.paths``; the report runs the same).

CI's CPU runs the ``ci`` sample (``parity_tests.paths.ci_sample``): for each twin and path, a
few cases of the twin rows' pairwise cover holding every reduction of the twin's grid, every
special class and every dtype, each with all five upstream gradients (a random cotangent,
``sum``, ``mean``, a GradScaler-scaled loss, a 0-d ``grad_outputs``); one case in one dtype
on ``torch.compile``. ``--nightly`` runs every case of the grid on every path. lstorch's Triton
paths run in Triton's interpreter (``TRITON_INTERPRET=1``, set in ``conftest.py`` before Triton
is imported). The sharded path runs on the two CPU devices ``conftest.py`` gives JAX.
"""

import json
import subprocess
import sys

import jax
import pytest

from parity_tests import paths
from parity_tests.registry import TWINS
from tests.check_scripts import ROOT
from tests.helpers import profile

# Twin by twin, so a worker tends to run a twin's paths together and computes its plain calls
# once (``paths`` keeps them per process).
IN_PROCESS = [
    (path, twin) for twin in TWINS for path in paths.PATHS if paths.reaches(twin, path) is True
]


def _reductions(twin, indices):
    return {
        (key, twin.cases[i][key]) for i in indices for key in ("reduction", "reduce")
        if key in twin.cases[i]
    }  # fmt: skip


def _check_rows(twin, path, results):
    assert any(result.checks for result in results), f"{twin.name} ran nothing on {path.name}"
    for result in results:
        assert not result.failures, f"{result.dtype}: " + "\n".join(result.failures[:10])
    # Every upstream gradient went through this path; and, unless the path takes some cases
    # only (sharded: where an axis divides) or one case in ci (compile), every dtype and every
    # reduction of the twin's grid did too.
    assert {kind for r in results for kind in r.upstream} == set(paths.UPSTREAM)
    if path.check is None and (profile() == "nightly" or path.name not in paths.SAMPLES["ci"]):
        assert all(result.checks for result in results), [r.dtype for r in results]
        ran = {index for r in results for index in r.cases}
        assert _reductions(twin, ran) == _reductions(twin, range(len(twin.cases)))


@pytest.mark.parametrize(
    ("path", "twin"), IN_PROCESS, ids=[f"{p.name} | {t.name}" for p, t in IN_PROCESS]
)
def test_twin_on_path_equals_plain_path_and_oracle(path, twin):
    if "kernels" in path.needs:
        pytest.importorskip("triton", reason="Triton is in the dev extras; CI installs it")
    if path.devices > len(jax.devices()):
        pytest.skip(f"the path needs {path.devices} JAX devices")
    sample = "all" if profile() == "nightly" else "ci"
    _check_rows(twin, path, paths.run_twin_path(twin, path, profile=sample))


def test_the_report_runs_the_sharded_path_in_a_two_device_subprocess(tmp_path):
    """``python -m parity_tests`` as users run it, on one JAX device: it runs the sharded path
    in a subprocess with two host devices and writes the rows to its JSON file (one twin)."""
    out = tmp_path / "report.json"
    twin = "timm.label_smoothing_cross_entropy"
    command = [sys.executable, "-m", "parity_tests", "--paths-only", "--path", "jax: sharded"]
    done = subprocess.run(
        [*command, "--twin", twin, "--sample", "ci", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())["paths"]
    assert rows and {row["twin"] for row in rows} == {twin}
    assert all(row["path"] == "jax: sharded" for row in rows), rows
    assert all(row["passed"] or row["checks"] == 0 for row in rows), rows
    assert sum(row["checks"] for row in rows) > 0, rows


def test_the_report_refuses_unknown_names_and_counts_a_crashed_subprocess(monkeypatch, capsys):
    """``python -m parity_tests``: an unknown twin or path is a usage error naming it (not an
    empty report), and a sharded-path subprocess that dies without a result is a failure (a
    non-zero exit), not a path left out."""
    from parity_tests import __main__ as report

    for flags, named in ((["--twin", "smoothed_cross_entropi"], "smoothed_cross_entropy"),
                         (["--path", "jax: jitt"], "jax: jit")):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            report.main(flags)
        assert exited.value.code == 2
        error = capsys.readouterr().err
        assert f"unknown {flags[0][2:]} {flags[1]!r}" in error
        assert repr(named) in error  # the closest twin names, or every path's name

    def crashed(command, **kwargs):  # the child died (a segfault): no JSON written
        return subprocess.CompletedProcess(command, -11)

    monkeypatch.setattr(report.subprocess, "run", crashed)
    import jax

    monkeypatch.setattr(jax, "devices", lambda *backend: [None])  # one device: a subprocess
    flags = ["--paths-only", "--path", "jax: sharded", "--sample", "ci"]
    assert report.main([*flags, "--twin", "timm.label_smoothing_cross_entropy"]) == 1
    printed = capsys.readouterr().out
    assert "FAIL [jax: sharded] the subprocess exited with code -11" in printed
    assert "0 path rows, 0 path checks; 1 failed" in printed


def test_every_path_is_reached_by_the_twins_it_should_be():
    """The Triton and inplace paths run every twin that declares them; every twin of ours
    takes every other path (a path it could not take yet would be listed with its reason, and
    the report would print it)."""
    by_path = {path.name: [t.name for p, t in IN_PROCESS if p is path] for path in paths.PATHS}
    assert "smoothed_cross_entropy" in by_path["torch: triton"]
    assert "smoothed_cross_entropy" in by_path["torch: triton + inplace_backward"]
    assert "SmoothedCrossEntropyLoss (module)" in by_path["torch: inplace_backward"]
    assert "smoothed_cross_entropy (class_mask, z_loss)" in by_path["jax: pallas"]
    assert "t5x.compute_weighted_cross_entropy" in by_path["jax: pallas"]
    assert len(by_path["torch: compile"]) == sum("torch" in t.ours for t in TWINS)
    unreachable = [
        (twin.name, path.name, paths.reaches(twin, path))
        for twin in TWINS
        for path in paths.PATHS
        if isinstance(paths.reaches(twin, path), str)
    ]
    assert unreachable == []
    fused = (
        "fused_linear_smoothed_cross_entropy [d hidden, weight, bias]",
        "FusedLinearSmoothedCrossEntropyLoss (module)",
    )
    for path in ("torch: func.grad", "torch: func.vmap"):
        assert set(fused) <= set(by_path[path])
    # every PyTorch twin runs under autocast; the fused head (which rounds its operands as
    # F.linear's autocast would) in the dtypes where that rounding changes nothing
    # (eager; compiled, in the one dtype where autocast reaching the loss's ops would show)
    taken = {
        "torch: autocast": (("float64", "bfloat16"), ("float64", "float32", "bfloat16")),
        "torch: compile + autocast": (("bfloat16",), ("float32",)),
    }
    for name, (packed, unpacked) in taken.items():
        autocast = next(path for path in paths.PATHS if path.name == name)
        assert len(by_path[name]) == sum("torch" in t.ours for t in TWINS), name
        for twin in TWINS:
            expected = packed if twin.packed else unpacked
            assert autocast.dtypes_of(twin) == expected, (name, twin.name)


def test_the_sample_keeps_every_reduction():
    cases = [{"reduction": r, "k": k} for k in range(20) for r in ("none", "sum", "mean")]
    chosen = paths.sample(cases, 2)
    assert {cases[i]["reduction"] for i in chosen} == {"none", "sum", "mean"}
    assert paths.sample(cases, None) == list(range(60))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_gradient_after_a_reduced_loss_equals_the_plain_path(dtype, monkeypatch):
    """The call every GPU user makes: a mean (or sum, or summed, or scaled) loss, whose upstream
    gradient reaches the backward kernel as a 0-d value expanded to the rows (stride 0)."""
    pytest.importorskip("triton", reason="Triton is in the dev extras; CI installs it")
    import torch

    import lstorch

    torch.manual_seed(0)
    logits = torch.randn(8, 300).to(getattr(torch, dtype))
    labels = torch.randint(0, 300, (8,))

    def loss(x, reduction="mean"):
        return lstorch.smoothed_cross_entropy(x, labels, smoothing=0.1, reduction=reduction)

    calls = {
        "mean": loss,
        "sum": lambda x: loss(x, "sum"),
        "loss.sum()": lambda x: loss(x, "none").sum(),
        "scaled": lambda x: loss(x) * torch.tensor(2.0**16),  # as GradScaler scales it
    }
    for name, call in calls.items():
        grads = {}
        for mode in ("off", "all"):
            monkeypatch.setenv("LSTORCH_TRITON", mode)
            x = logits.clone().requires_grad_(True)
            (grads[mode],) = torch.autograd.grad(call(x), x)
        # The registry's tolerances (parity_tests.DEFAULT_TOLERANCES), with atol taken relative
        # to the gradient's scale (a mean divides it by the rows, a GradScaler multiplies it):
        # bf16, the same float32 value rounded once on each side (<= one bf16 ulp apart);
        # float32, summation order only.
        rtol, atol = (2.0**-7, 2.0**-9) if dtype == "bfloat16" else (1e-5, 1e-6)
        scale = float(grads["off"].abs().max())
        torch.testing.assert_close(
            grads["all"], grads["off"], rtol=rtol, atol=atol * scale, msg=name
        )
