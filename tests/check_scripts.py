"""Run one of the check scripts of ``tests/`` in a fresh interpreter.

For what must be set before an import: XLA's host device count (``sharded_checks.py``), Triton's
interpreter (``triton_checks.py``), the ranks of torch.distributed (``distributed_checks.py``,
``vocab_parallel_checks.py``).

A script runs once per pytest run: under pytest-xdist both workers may hold tests of the same
module, and each would start the module's fixture (a script of tens of seconds). The first
worker to ask runs it, under a file lock; the other waits and reads what it printed. The key is
the run (``PYTEST_XDIST_TESTRUNUID``, the same in every worker of one run), the script, its
arguments and the environment the test adds; without xdist every call runs the script.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(name: str, args: tuple[str, ...], environment: dict, timeout: int) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / name), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        check=False,
    )
    return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def _once_per_run(
    name: str, args: tuple[str, ...], env: dict, environment: dict, timeout: int
) -> dict:
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run_id:
        return _run(name, args, environment, timeout)
    # The workers of one run share their environment but for their own names.
    key = json.dumps([run_id, name, args, sorted(env.items())])
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    folder = pathlib.Path(tempfile.gettempdir()) / "label-smoothing-parity-checks"
    folder.mkdir(exist_ok=True)
    result_file = folder / f"{digest}.json"
    with open(folder / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits here while the script runs
        if result_file.exists():
            return json.loads(result_file.read_text())
        result = _run(name, args, environment, timeout)
        result_file.write_text(json.dumps(result))
        return result


def run_check_script(name: str, *args: str, env: dict | None = None, timeout: int = 300) -> str:
    """Run ``tests/<name> args`` with the repository importable; fail the calling test, with
    the script's output, unless it exits 0. Returns its standard output."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
    done = _once_per_run(name, tuple(args), env or {}, environment, timeout)
    assert done["returncode"] == 0, done["stdout"][-3000:] + done["stderr"][-3000:]
    return done["stdout"]
