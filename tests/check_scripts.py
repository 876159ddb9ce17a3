"""Run one of the check scripts of ``tests/`` in a fresh interpreter.

For what must be set before an import: XLA's host device count (``sharded_checks.py``), Triton's
interpreter (``triton_checks.py``), the ranks of torch.distributed (``distributed_checks.py``).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_check_script(name: str, *args: str, env: dict | None = None, timeout: int = 300) -> str:
    """Run ``tests/<name> args`` with the repository importable; fail the calling test, with
    the script's output, unless it exits 0. Returns its standard output."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / name), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout
