"""``benchmarks/bench_gpu.py`` checks every row's values before it times it: a GPU run is rare,
and a time of a wrong result is not a result. Here, without a GPU: the dry run (every part and
every value check at tiny shapes, the kernels in Triton's interpreter and Pallas's interpret
mode, the peers that need a GPU skipped with their reason); the float64 oracle against torch's
own label smoothing; a wrong smoothing refused; a wrong or missing row leaving the others timed;
the summary's verdicts; the shell scripts' syntax."""

import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.check_scripts import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_smoothed(x, labels, smoothing):
    """Per-row loss and the gradient of its mean, by ``F.cross_entropy`` in float64."""
    leaf = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(leaf, torch.tensor(labels), label_smoothing=smoothing, reduction="none")
    (grad,) = torch.autograd.grad(loss.mean(), leaf)
    return loss.detach().numpy(), grad.numpy()


def _boosted(rows=64, num_classes=1000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, num_classes))
    labels = rng.integers(0, num_classes, rows)
    x[np.arange(rows), labels] += 8.0  # as the benchmark's inputs (LABEL_BOOST)
    return x, labels


def test_the_oracle_is_torchs_label_smoothing():
    bench = _bench()
    x, labels = _boosted(rows=7, num_classes=11)
    loss, grad = bench.reference_rows(x, labels, 0.1, np.full(7, 1 / 7))
    want_loss, want_grad = _torch_smoothed(x, labels, 0.1)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("kind", ["exact", "rounded"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_row_that_ignores_the_smoothing_is_refused(kind, dtype):
    """The right values, rounded to the benchmark's dtype, pass; the values at smoothing 0 (a
    peer or option that ignored ``label_smoothing``) fail, by the loss and by the gradient."""
    bench = _bench()
    x, labels = _boosted()
    rows = len(labels)
    _, want_grad = bench.reference_rows(x, labels, 0.1, np.full(rows, 1 / rows))
    want_loss = float(np.mean(_torch_smoothed(x, labels, 0.1)[0]))
    rounding = getattr(torch, dtype)
    for smoothing, right in ((0.1, True), (0.0, False)):
        loss, grad = _torch_smoothed(x, labels, smoothing)
        grad = torch.tensor(grad).to(rounding).double().numpy()
        checks = {
            "loss": dict(loss=float(np.mean(loss)), want_loss=want_loss),
            "gradient": dict(grads=[("grad", grad, want_grad, 1 / rows)]),
        }
        for what, values in checks.items():
            if right:
                assert bench.check_values(f"right {what}", kind, dtype, **values)
            else:
                with pytest.raises(bench.WrongValue):
                    bench.check_values(f"smoothing ignored, {what}", kind, dtype, **values)


def test_a_wrong_missing_or_crashing_row_is_not_timed_and_the_others_are(capsys):
    bench = _bench()
    rows = bench.Rows()

    def raising(error):
        def make():
            raise error

        return make

    rows.add("right", lambda: ((lambda: 2.0), (lambda value: value), "value check right"), 3)
    rows.add("wrong", raising(bench.WrongValue("grad[0, 1] = 5, reference 1")), 3)
    rows.add("missing", raising(bench.Unavailable("cannot import it")), 3)
    rows.add("crashing", raising(RuntimeError("out of memory")), 3)
    rows.add("crashing when timed", lambda: ((lambda: 0.0), (lambda value: 1 / value), "ok"), 3)
    medians = rows.time(lambda call, argument: call(argument), reps=3)
    assert medians == {"right": 2.0}
    assert rows.wrong == {"wrong": "grad[0, 1] = 5, reference 1"}
    assert rows.unavailable == {"missing": "cannot import it"}
    assert rows.failed == {
        "crashing": "RuntimeError: out of memory",
        "crashing when timed": "while timing: ZeroDivisionError: float division by zero",
    }
    printed = capsys.readouterr().out
    assert "wrong: WRONG VALUES, not timed: grad[0, 1] = 5, reference 1" in printed
    assert "missing: not available: cannot import it" in printed
    assert "crashing: FAILED, not timed: RuntimeError: out of memory" in printed


def test_a_check_that_hangs_fails_its_row_only():
    """A compilation that hangs (torch.compile, a kernel) must not take the whole part, and
    its numbers, past the script's ``timeout``."""
    bench = _bench()
    rows = bench.Rows(limit=0.2)
    start = time.perf_counter()
    rows.add("hangs", lambda: time.sleep(30), 3)
    rows.add("right", lambda: ((lambda: 1.0), (lambda value: value), "value check right"), 3)
    assert time.perf_counter() - start < 10
    assert rows.failed == {"hangs": "TimeoutError: its check took over 0.2 s (compiling?)"}
    assert rows.time(lambda call, argument: call(argument), reps=1) == {"right": 1.0}


def test_the_summary_says_met_or_missed_and_by_how_much():
    bench = _bench()
    torch_part = {
        "part": "torch",
        "dtype": "bfloat16",
        "floor_ms": 1.0,
        "rows": {
            "lstorch (Triton, inplace_backward)": {"median_ms": 1.1, "passes": 3},
            bench.LIGER_CE: {"median_ms": 1.32, "passes": 3},
            bench.PER_CALL: {"median_ms": 0.3, "passes": None},
            bench.PER_CALL_TORCH: {"median_ms": 0.1, "passes": None},
        },
        "properties": {"sync-free": "yes"},
    }
    jax_part = {
        "part": "jax",
        "dtype": "bfloat16",
        "rows": {"lsjax (Pallas)": {"median_ms": 2.0, "passes": 3}},
        "wrong": {bench.OPTAX: "grad[3, 1] = 0.2, reference 0.1"},
    }
    lines = bench.summarize([torch_part, jax_part])
    assert (
        "[bfloat16] lstorch (Triton, inplace_backward): 90.9 % of floor (target >= 85 %): MET "
        "(+5.9 points)" in lines
    )
    assert (
        "[bfloat16] lstorch (Triton, inplace_backward) faster than Liger CE: 1.100 vs 1.320 ms: "
        "MET (1.20x)" in lines
    )
    assert "[bfloat16] lsjax (Pallas): 50.0 % of floor (target >= 85 %): MISSED (-35.0 points)" in (
        lines
    )
    assert (
        "[bfloat16] against optax route: NOT KNOWN (wrong: grad[3, 1] = 0.2, reference 0.1)"
        in lines
    )
    assert any(line.startswith("[bfloat16] per-call cost") and "3.00x" in line and
               line.endswith("MISSED") for line in lines)  # fmt: skip
    assert "[bfloat16] sync-free: yes" in lines


def test_gpu_benchmark_dry_run_checks_every_row_before_timing():
    """Every part and every value check of the GPU run, at tiny shapes, on the CPU."""
    pytest.importorskip("triton", reason="Triton is in the dev extras; CI installs it")
    bench = _bench()
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_gpu.py", "--dry-run"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    out = done.stdout
    checked = [
        "lstorch (Triton, inplace_backward)",
        "lstorch (Triton)",
        "lstorch (torch.compile)",
        "F.cross_entropy",
        "forward kernel",
        "backward kernel",
        "lstorch at K = 256",
        "F.cross_entropy at K = 256",
        "lsjax (XLA)",
        "lsjax (XLA, logits donated)",
        "lsjax (Pallas)",
        "lsjax (Pallas, logits donated)",
        bench.OPTAX,
        "lstorch fused",
        "dense + lstorch",
        "dense + F.cross_entropy",
        "lsjax fused",
        "dense + lsjax (XLA)",
        "dense + lsjax (Pallas)",
        "lstorch (Triton), large",
        "lstorch (Triton, inplace_backward), large",
        "lsjax (XLA), large",
        "lsjax (Pallas), large",
    ]
    for name in checked:
        assert f"value check {name}: " in out, name
    peers = [
        bench.LIGER_CE,
        "Liger LigerFusedLinearCrossEntropyLoss(label_smoothing=0.1)",
        "cut-cross-entropy linear_cross_entropy (smoothing 0: it has none)",
    ]
    for peer in peers:  # no GPU here: said, not silently dropped
        assert f"{peer}: not available: " in out, peer
    assert "WRONG VALUES" not in out and "FAILED" not in out
    assert out.rstrip().endswith("dry run: every value check passed")


@pytest.mark.parametrize("script", ["run_on_gpu.sh", "fetch_wheels.sh"])
def test_the_gpu_scripts_parse(script):
    done = subprocess.run(
        ["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
