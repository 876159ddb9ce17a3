"""``python -m parity_tests``: the verification report.

Runs every registered twin (JAX against PyTorch) in float64, float32 and bfloat16, and every
twin's float64 NumPy oracle against both frameworks; prints one table; exits 1 on any failure.
``--json FILE`` also writes the rows; ``--twin NAME`` runs one twin.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

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
                f"{report.name} {failure.dtype} {failure.case}: |Δloss|={failure.loss_diff:.3g} "
                f"|Δgrad|={failure.grad_diff:.3g} {failure.error}"
                for failure in report.failures()
            )
    return rows, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity_tests", description=__doc__)
    parser.add_argument("--json", help="also write the table's rows to this file")
    parser.add_argument("--twin", action="append", help="run only this twin (repeatable)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows, failures = run(args.twin)
    print(format_table(rows))
    print()
    for line in failures[:50]:
        print("FAIL", line)
    total = sum(row["cases"] for row in rows)
    print(
        f"{len(rows)} rows, {total} case-dtype checks, {len(failures)} failed, "
        f"{time.perf_counter() - start:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "failures": failures}, handle, indent=1)
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
