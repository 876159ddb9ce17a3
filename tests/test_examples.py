"""The examples run (smoke mode) and print a decreasing loss."""

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
