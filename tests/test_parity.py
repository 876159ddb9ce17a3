"""Every registered twin, JAX against PyTorch, in float64, float32 and bfloat16: loss and
gradient (pulled back with a random upstream cotangent). The same code path as the report."""

import pytest

from parity_tests.compare import compare, compare_with_oracle
from parity_tests.registry import TWINS

IDS = [twin.name for twin in TWINS]


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_twin_matches(twin, dtype):
    report = compare(
        twin.jax_fn,
        twin.torch_fn,
        twin.make_inputs,
        cases=twin.cases,
        dtypes=(dtype,),
        tolerances=twin.tolerances,
        name=twin.name,
    )
    assert len(report.results) == len(twin.cases)
    assert report.passed, str(report)


@pytest.mark.parametrize(
    "twin", [t for t in TWINS if t.oracle], ids=[t.name for t in TWINS if t.oracle]
)
def test_twin_matches_numpy_oracle(twin):
    """The JAX side against the float64 NumPy oracle, loss and gradient, every case.

    The PyTorch side is pinned to the JAX side at rtol 1e-10 in float64 by test_twin_matches, so
    it equals the oracle to 2e-10 as well; ``python -m parity_tests`` also runs the PyTorch side
    against the oracle directly. Running it here too would add a minute to CI for no new fact.
    """
    report = compare_with_oracle(
        twin.jax_fn,
        twin.oracle,
        twin.make_inputs,
        framework="jax",
        cases=twin.cases,
        name=twin.name,
    )
    assert report.passed, str(report)
