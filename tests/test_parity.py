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


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize(
    "twin", [t for t in TWINS if t.oracle], ids=[t.name for t in TWINS if t.oracle]
)
def test_twin_matches_numpy_oracle(twin, framework):
    fn = twin.jax_fn if framework == "jax" else twin.torch_fn
    report = compare_with_oracle(
        fn, twin.oracle, twin.make_inputs, framework=framework, cases=twin.cases, name=twin.name
    )
    assert report.passed, str(report)
