"""Every registered twin, JAX against PyTorch, in float64, float32 and bfloat16: loss and
gradient (pulled back with a random upstream cotangent). The same code path as the report.

The ``ci`` profile runs a pairwise cover of each twin's grid with the dtype as one more option
(``parity_tests.paths.twin_cover``): every option value in every dtype, and every pair of values
of two options in some dtype (how many case runs that is: ``docs/testing.md``). In float64
the JAX side is also checked against the twin's float64 NumPy oracle, on the same cases (every
option value). ``--nightly`` and ``python -m parity_tests`` run every case.
"""

import pytest

from parity_tests.compare import DTYPES, Report, compare, compare_with_oracle
from parity_tests.paths import twin_cover
from parity_tests.registry import TWINS
from tests.helpers import profile

IDS = [twin.name for twin in TWINS]


def _indices(twin, dtype):
    """The grid cases the twin runs in ``dtype``."""
    if profile() == "nightly":
        return list(range(len(twin.cases)))
    return [index for index, case_dtype in twin_cover(twin) if case_dtype == dtype]


def _each_case(run, twin, indices):
    """``run(cases, seed)`` on each case, with the seed the report gives that case (its index in
    the grid), so a case fails here as it does in ``python -m parity_tests``."""
    results = []
    for index in indices:
        results.extend(run([twin.cases[index]], index).results)
    return Report(twin.name, results)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_twin_matches(twin, dtype):
    """JAX against PyTorch in ``dtype``; in float64, also the JAX side against the float64 NumPy
    oracle on the same cases (:func:`_jax_equals_the_oracle`)."""

    def run(cases, seed):
        return compare(
            twin.jax_fn,
            twin.torch_fn,
            twin.make_inputs,
            cases=cases,
            dtypes=(dtype,),
            tolerances=twin.tolerances,
            seed=seed,
            name=twin.name,
        )

    indices = _indices(twin, dtype)
    report = _each_case(run, twin, indices)
    assert indices and len(report.results) == len(indices)
    assert report.passed, str(report)
    if dtype == "float64" and twin.oracle:
        _jax_equals_the_oracle(twin, indices)


def _jax_equals_the_oracle(twin, indices):
    """The JAX side against the float64 NumPy oracle, loss and gradient, on the cases just run
    in float64. In the same test, so in the same process: the compiled programs are those of
    the float64 run (as a test of its own, an xdist worker that had not run the float64 case
    lowered and read them again, about 15 s of the suite's time).

    The PyTorch side is pinned to the JAX side at rtol 1e-10 in float64 by the comparison above,
    so it equals the oracle to 2e-10 as well; ``python -m parity_tests`` also runs the PyTorch
    side against the oracle directly. Running it here too would add a minute to CI for no new
    fact.
    """

    def run(cases, seed):
        return compare_with_oracle(
            twin.jax_fn,
            twin.oracle,
            twin.make_inputs,
            framework="jax",
            cases=cases,
            seed=seed,
            name=twin.name,
        )

    report = _each_case(run, twin, indices)
    assert len(report.results) == len(indices)
    assert report.passed, "against the float64 NumPy oracle:\n" + str(report)


def test_the_smoothed_grid_meets_every_pair_of_option_values():
    """In ``smoothed_cross_entropy``'s grid every value of each option meets every value of
    each other option in some case (but where the loss refuses the pair: ``"others_but_pad"``
    with 2 classes, the KL form with class weights). The options the grid rotates (class axis,
    ``where``, KL, log-probabilities) once followed the grid's own options: the class axis was
    1 exactly when weighted, and no unweighted ``"mean"`` case had a ``where`` mask."""
    import itertools

    (twin,) = [twin for twin in TWINS if twin.name == "smoothed_cross_entropy"]
    keys = ("convention", "smoothing", "num_classes", "reduction", "ignored", "weighted",
            "axis", "masked", "kl", "from_log_probs")  # fmt: skip
    from parity_tests.registry import SMOOTHINGS  # the grid's (beside its cases near 0 and 1)

    grid = [c for c in twin.cases if set(c) == set(keys) and c["smoothing"] in SMOOTHINGS]
    refused = {("convention", "others_but_pad", "num_classes", 2), ("weighted", True, "kl", True)}
    missing = []
    for first, second in itertools.combinations(keys, 2):
        met = {(case[first], case[second]) for case in grid}
        for a, b in itertools.product({c[first] for c in grid}, {c[second] for c in grid}):
            if (a, b) not in met and (first, a, second, b) not in refused:
                missing.append((first, a, second, b))
    assert len(grid) > 300 and not missing, missing
