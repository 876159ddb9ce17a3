"""``python -m parity_tests``: the verification report.

Runs every registered twin (JAX against PyTorch) in float64, float32 and bfloat16, and every twin's
float64 NumPy oracle against both frameworks; then every twin on every execution path it reaches
(``parity_tests.paths``: lstorch's Triton kernels, ``inplace_backward``, ``torch.compile``,
``torch.autocast``, ``torch.func``; ``jax.jit``, ``vmap``, sharded, lsjax's Pallas kernels),
each against its plain path and the oracle, with every kind of upstream gradient. Prints the
tables; exits 1 on any failure.

``--twin NAME`` runs one twin, ``--path NAME`` one path (``--path none``: the twins only),
``--sample ci|report|all`` how many cases per twin and path (default ``report``; ``all`` runs every
case), ``--json FILE`` also writes the rows. On a machine without a GPU the Triton paths run in
Triton's interpreter and the Pallas path in Pallas's interpret mode; with CUDA they run on the GPU.
The sharded path needs two or more JAX devices: on a single-device machine it runs in a subprocess
with two host devices.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import subprocess
import sys
import tempfile
import time

from parity_tests import paths
from parity_tests.compare import compare, compare_with_oracle, format_table
from parity_tests.registry import TWINS


def run(names: list[str] | None = None) -> tuple[list[dict], list[str]]:
    rows, failures = [], []
    for twin in TWINS:
        if names and twin.name not in names:
            continue
        reports = [
            compare(
                twin.jax_fn,
                twin.torch_fn,
                twin.make_inputs,
                cases=twin.cases,
                tolerances=twin.tolerances,
                name=twin.name,
            )
        ]
        if twin.oracle is not None:
            for framework, fn in (("jax", twin.jax_fn), ("torch", twin.torch_fn)):
                reports.append(
                    compare_with_oracle(
                        fn,
                        twin.oracle,
                        twin.make_inputs,
                        framework=framework,
                        cases=twin.cases,
                        name=f"{twin.name} [{framework} vs NumPy oracle]",
                    )
                )
        for report in reports:
            rows.extend(report.summary())
            failures.extend(
                f"{report.name} {failure.dtype} {failure.case}: {failure.error}"
                for failure in report.failures()
            )
    return rows, failures


def _sharded_in_subprocess(names, path_names, sample) -> tuple[list[dict], list, list[str]]:
    """The sharded paths on two host devices, in a fresh interpreter (XLA's device count is set
    before jax is imported): their rows, their unreachable entries, and a failure if it crashed
    (wrote no result: its traceback is on stderr)."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "sharded.json")
        command = [sys.executable, "-m", "parity_tests"]
        for name in path_names:
            command += ["--path", name]
        command += ["--sample", sample, "--json", out, "--paths-only"]
        for name in names or ():
            command += ["--twin", name]
        flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
        done = subprocess.run(command, env={**os.environ, "XLA_FLAGS": flags}, check=False,
                              stdout=subprocess.DEVNULL)  # fmt: skip
        if not os.path.exists(out):  # a crash: a failure, never a path left out
            label = ", ".join(path_names)
            return [], [], [f"[{label}] the subprocess exited with code {done.returncode} "
                            "and wrote no result (its error is above)"]  # fmt: skip
        with open(out) as handle:
            result = json.load(handle)
    return result["paths"], [tuple(entry) for entry in result["unreachable"]], []


def run_paths(names, path_names, sample) -> tuple[list[dict], list, list[str]]:
    import jax

    twins = [twin for twin in TWINS if not names or twin.name in names]
    selected = [path for path in paths.PATHS if not path_names or path.name in path_names]
    # The sharded paths need two devices: with one, they run in a subprocess that has two.
    elsewhere = [p.name for p in selected if p.devices > len(jax.devices())]
    local = [p for p in selected if p.name not in elsewhere]
    results, unreachable = paths.run_paths(twins, local, profile=sample)
    rows, crashed = [result.row() for result in results], []
    if elsewhere:
        more_rows, more_unreachable, crashed = _sharded_in_subprocess(names, elsewhere, sample)
        rows += more_rows
        unreachable += more_unreachable
    return rows, unreachable, crashed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity_tests", description=__doc__)
    parser.add_argument("--json", help="also write the table's rows to this file")
    parser.add_argument("--twin", action="append", help="run only this twin (repeatable)")
    parser.add_argument(
        "--path", action="append", help="run only this execution path (repeatable; 'none': no path)"
    )
    parser.add_argument("--sample", choices=sorted(paths.SAMPLES), default="report")
    parser.add_argument("--paths-only", action="store_true", help="skip the twins' plain rows")
    args = parser.parse_args(argv)
    # An unknown name is an error, not an empty report.
    known_paths = [path.name for path in paths.PATHS]
    for name in args.path or ():
        if name != "none" and name not in known_paths:
            parser.error(f"--path: unknown path {name!r}; the paths: {known_paths} or 'none'")
    known_twins = [twin.name for twin in TWINS]
    for name in args.twin or ():
        if name not in known_twins:
            close = difflib.get_close_matches(name, known_twins, n=3, cutoff=0.4)
            parser.error(
                f"--twin: unknown twin {name!r}; the closest names: {close} (every name is in "
                "the first column of the report)"
            )
    start = time.perf_counter()
    rows, failures = ([], []) if args.paths_only else run(args.twin)
    path_rows, unreachable = [], []
    if args.path != ["none"]:
        path_rows, unreachable, crashed = run_paths(args.twin, args.path, args.sample)
        failures += crashed
    if rows:
        print(format_table(rows))
        print()
    if path_rows or unreachable:
        results = [paths.PathResult(**{k: v for k, v in r.items() if k != "passed"})
                   for r in path_rows]  # fmt: skip
        print(f"Execution paths (sample: {args.sample}; checks = cases x upstream gradients)")
        print(paths.format_paths(results, unreachable))
        print()
        failures += [
            f"{r.twin} [{r.path}] {r.dtype}: {line}" for r in results for line in r.failures
        ]
    for line in failures[:50]:
        print("FAIL", line)
    total = sum(row["cases"] for row in rows)
    checks = sum(row["checks"] for row in path_rows)
    print(
        f"{len(rows)} twin rows, {total} case-dtype checks; {len(path_rows)} path rows, "
        f"{checks} path checks; {len(failures)} failed, {time.perf_counter() - start:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"rows": rows, "paths": path_rows, "unreachable": unreachable,
                 "failures": failures},
                handle,
                indent=1,
            )  # fmt: skip
    return 1 if failures or not (rows or path_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
