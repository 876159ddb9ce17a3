"""lsjax.calibration (and lstorch.calibration, the same functions) against hand-computed cases, a
plain-loop oracle of Guo et al.'s formulas, scipy's minimiser for temperature scaling, and its edge
cases and errors."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp, softmax

from lsjax import calibration
from lstorch import calibration as torch_calibration

# Hand case, K = 3 classes, M = 3 bins (0, 1/3], (1/3, 2/3], (2/3, 1]:
#   sample  probs               y  conf  pred  correct  bin
#   0       [0.9, 0.05, 0.05]   0  0.9   0     1        2
#   1       [0.2, 0.7, 0.1]     0  0.7   1     0        2
#   2       [0.4, 0.35, 0.25]   0  0.4   0     1        1
#   3       [0.3, 0.5, 0.2]     2  0.5   1     0        1
#   4       [0.6, 0.3, 0.1]     0  0.6   0     1        1
# bin 0: empty. bin 1: conf (0.4+0.5+0.6)/3 = 0.5, acc 2/3, gap 1/6, weight 3/5 -> 0.1.
# bin 2: conf (0.9+0.7)/2 = 0.8, acc 1/2, gap 0.3, weight 2/5 -> 0.12.
# ECE = 0.22, MCE = 0.3.
HAND_PROBS = np.array(
    [
        [0.9, 0.05, 0.05],
        [0.2, 0.7, 0.1],
        [0.4, 0.35, 0.25],
        [0.3, 0.5, 0.2],
        [0.6, 0.3, 0.1],
    ]
)
HAND_LABELS = np.array([0, 0, 0, 2, 0])


def test_hand_case_diagram_ece_mce():
    diagram = calibration.reliability_diagram(HAND_PROBS, HAND_LABELS, num_bins=3)
    np.testing.assert_allclose(diagram.edges, [0, 1 / 3, 2 / 3, 1], rtol=1e-15)
    np.testing.assert_array_equal(diagram.count, [0, 3, 2])
    assert np.isnan(diagram.confidence[0]) and np.isnan(diagram.accuracy[0])
    np.testing.assert_allclose(diagram.confidence[1:], [0.5, 0.8], rtol=1e-14)
    np.testing.assert_allclose(diagram.accuracy[1:], [2 / 3, 1 / 2], rtol=1e-14)
    ece = calibration.expected_calibration_error(HAND_PROBS, HAND_LABELS, num_bins=3)
    mce = calibration.maximum_calibration_error(HAND_PROBS, HAND_LABELS, num_bins=3)
    assert isinstance(ece, float) and isinstance(mce, float)
    assert ece == pytest.approx(0.22, abs=1e-14)
    assert mce == pytest.approx(0.3, abs=1e-14)


def test_hand_case_one_bin_is_accuracy_minus_mean_confidence():
    # accuracy 3/5, mean confidence (0.9+0.7+0.4+0.5+0.6)/5 = 0.62 -> |0.6 - 0.62| = 0.02.
    ece = calibration.expected_calibration_error(HAND_PROBS, HAND_LABELS, num_bins=1)
    assert ece == pytest.approx(0.02, abs=1e-14)


def test_hand_case_jax_arrays_and_float32_in():
    probs = jnp.asarray(HAND_PROBS, dtype=jnp.float32)
    ece = calibration.expected_calibration_error(probs, jnp.asarray(HAND_LABELS), num_bins=3)
    # float32 rounding of the inputs (relative 6e-8) moves no sample across a bin edge.
    assert ece == pytest.approx(0.22, abs=1e-6)


def test_confidence_on_an_edge_goes_to_the_lower_bin():
    # Right-closed bins: conf 0.5 with M = 2 lies in (0, 0.5], conf 1.0 in (0.5, 1].
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    diagram = calibration.reliability_diagram(probs, np.array([1, 0]), num_bins=2)
    np.testing.assert_array_equal(diagram.count, [1, 1])
    # ties take the first maximum: sample 0 predicts class 0, label 1 -> wrong.
    np.testing.assert_array_equal(diagram.accuracy, [0.0, 1.0])


def test_a_confidence_of_exactly_m_over_M_lies_in_bin_m_for_every_M():
    """Every edge is the float nearest ``m / M``, as the loop oracle compares: a confidence
    ``m / M`` goes to bin ``m - 1`` (0-based) for M = 1..100 (np.linspace's edges do not, at
    M = 49 and 98)."""
    for num_bins in range(1, 101):
        confidence = np.arange(1, num_bins + 1) / num_bins
        # the rest spread over M classes, each below m / M: the confidence is the row's max
        rest = np.repeat(((1 - confidence) / num_bins)[:, None], num_bins, axis=1)
        probs = np.concatenate([confidence[:, None], rest], axis=1)
        diagram = calibration.reliability_diagram(probs, np.zeros(num_bins, int), num_bins=num_bins)
        np.testing.assert_array_equal(diagram.count, np.ones(num_bins), err_msg=f"M={num_bins}")


def test_one_sample():
    # One sample: ECE = MCE = |correct - conf|.
    probs = np.array([[0.1, 0.7, 0.2]])
    assert calibration.expected_calibration_error(probs, np.array([1])) == pytest.approx(0.3)
    assert calibration.expected_calibration_error(probs, np.array([0])) == pytest.approx(0.7)
    assert calibration.maximum_calibration_error(probs, np.array([0])) == pytest.approx(0.7)
    diagram = calibration.reliability_diagram(probs, np.array([0]))
    assert diagram.count.sum() == 1 and np.isnan(diagram.accuracy).sum() == 14


def test_all_correct_ece_is_mean_underconfidence():
    # Every bin's accuracy is 1 >= its confidence, so ECE = mean(1 - conf_i).
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4)) * 2
    probs = softmax(logits, axis=1)
    labels = probs.argmax(axis=1)
    ece = calibration.expected_calibration_error(probs, labels)
    assert ece == pytest.approx(np.mean(1 - probs.max(axis=1)), rel=1e-12)


def test_all_correct_and_certain_is_zero():
    probs = np.eye(4)[[0, 1, 2, 3, 3]]
    labels = np.array([0, 1, 2, 3, 3])
    assert calibration.expected_calibration_error(probs, labels) == 0.0
    assert calibration.maximum_calibration_error(probs, labels) == 0.0


def _loop_oracle(probs, labels, num_bins):
    """Guo et al. 2017 eqs. 3 and 5, written as plain loops over samples and bins."""
    bins = [[] for _ in range(num_bins)]
    for row, label in zip(probs.tolist(), labels.tolist(), strict=True):
        conf = max(row)
        pred = row.index(conf)
        m = 0
        while not conf <= (m + 1) / num_bins:
            m += 1
        bins[m].append((conf, float(pred == label)))
    ece, mce = 0.0, 0.0
    for members in bins:
        if members:
            gap = abs(sum(c for _, c in members) - sum(c for c, _ in members)) / len(members)
            ece += len(members) / len(labels) * gap
            mce = max(mce, gap)
    return ece, mce


@pytest.mark.parametrize("num_bins", [1, 2, 7, 15, 40])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_cases_match_loop_oracle(num_bins, seed):
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(size=(200, 10)) * 3, axis=1)
    labels = rng.integers(0, 10, size=200)
    ece, mce = _loop_oracle(probs, labels, num_bins)
    assert calibration.expected_calibration_error(
        probs, labels, num_bins=num_bins
    ) == pytest.approx(ece, rel=1e-12)
    assert calibration.maximum_calibration_error(probs, labels, num_bins=num_bins) == pytest.approx(
        mce, rel=1e-12
    )


def test_negative_log_likelihood_matches_sklearn_log_loss():
    # Imported here: scikit-learn takes a second to import, which every pytest worker would
    # pay when it collects this file.
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(30, 5)) * 4
    labels = rng.integers(0, 5, size=30)
    for temperature in (0.5, 1.0, 3.0):
        expected = log_loss(labels, softmax(logits / temperature, axis=1), labels=range(5))
        got = calibration.negative_log_likelihood(logits, labels, temperature=temperature)
        assert got == pytest.approx(expected, rel=1e-10)


def test_temperature_hand_case():
    # Two classes, every logit row [a, 0]; a fraction r of rows labelled 0. With beta = 1/T,
    # p(0) = sigmoid(beta a) and the NLL is minimal where sigmoid(beta a) = r, so
    # T = a / log(r / (1 - r)). a = 2, r = 3/4: T = 2 / log 3.
    logits = np.array([[2.0, 0.0]] * 4)
    labels = np.array([0, 0, 0, 1])
    assert calibration.fit_temperature(logits, labels) == pytest.approx(2 / math.log(3), rel=1e-10)


@pytest.mark.parametrize(
    "seed,scale", [(seed, scale) for seed in range(4) for scale in (0.2, 0.5, 1.0, 2.0, 5.0)]
)
def test_temperature_matches_scipy_minimiser(seed, scale):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=300)
    # Informative but miscalibrated logits: the label's logit is raised, then all scaled.
    logits = (rng.normal(size=(300, 10)) + 2.0 * np.eye(10)[labels]) * scale

    def nll(temperature):
        scaled = logits / temperature
        return np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(300), labels])

    # The minimiser's xatol limits its precision; the NLL is smooth there, so 1e-6 relative.
    expected = minimize_scalar(nll, bounds=(0.01, 100), method="bounded", options={"xatol": 1e-10})
    got = calibration.fit_temperature(logits, labels)
    assert got == pytest.approx(expected.x, rel=1e-6)
    # Scaling by T changes no prediction, and the NLL does not go up.
    assert (np.argmax(logits / got, axis=1) == np.argmax(logits, axis=1)).all()
    assert calibration.negative_log_likelihood(logits, labels, temperature=got) <= nll(1.0)
    # The fitted NLL is the minimum: -log_softmax is what it should be at T.
    manual = -np.mean(log_softmax(logits / got, axis=1)[np.arange(300), labels])
    assert calibration.negative_log_likelihood(logits, labels, temperature=got) == pytest.approx(
        manual, rel=1e-12
    )


def test_temperature_hits_the_bounds():
    # All correct with a margin: NLL keeps falling as T -> 0, so T_min comes back.
    logits = np.array([[10.0, 0.0], [0.0, 10.0]])
    assert calibration.fit_temperature(logits, np.array([0, 1])) == 0.01
    assert calibration.fit_temperature(logits, np.array([0, 1]), bounds=(0.5, 2.0)) == 0.5
    # All wrong: NLL keeps falling as T -> inf, so T_max comes back.
    assert calibration.fit_temperature(logits, np.array([1, 0])) == 100.0


def test_temperature_of_logits_that_say_nothing_is_one():
    """Every row's logits equal (or one class): the NLL is log K (or 0) at every T, so the
    data say nothing about a temperature, and 1 (no scaling) comes back, or the bound nearest
    to it; the slope test alone returned T_max, 100, a confident-looking answer."""
    flat = np.full((4, 3), 2.5)
    labels = np.array([0, 1, 2, 0])
    assert calibration.fit_temperature(flat, labels) == 1.0
    assert calibration.fit_temperature(flat[:, :1], np.zeros(4, int)) == 1.0
    assert calibration.fit_temperature(flat, labels, bounds=np.array([2.0, 5.0])) == 2.0
    # the NLL really is flat: the same at T = 0.5 and 50 (the oracle: log K)
    for temperature in (0.5, 50.0):
        assert calibration.negative_log_likelihood(
            flat, labels, temperature=temperature
        ) == pytest.approx(np.log(3), rel=1e-12)


def test_temperature_one_sample_and_jax_input():
    # One sample, two classes, the model wrong: T_max is the best it can do.
    assert calibration.fit_temperature(jnp.asarray([[1.0, 0.0]]), jnp.asarray([1])) == 100.0


def test_plot_reliability_diagram_draws_the_bin_accuracies(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    ax = calibration.plot_reliability_diagram(HAND_PROBS, HAND_LABELS, num_bins=3, title="hand")
    # Two non-empty bins: two accuracy bars, then two gap bars from min(acc, conf) to max.
    heights = [patch.get_height() for patch in ax.patches]
    bottoms = [patch.get_y() for patch in ax.patches]
    np.testing.assert_allclose(heights, [2 / 3, 1 / 2, 2 / 3 - 0.5, 0.8 - 1 / 2], rtol=1e-12)
    np.testing.assert_allclose(bottoms, [0, 0, 0.5, 1 / 2], rtol=1e-12)
    np.testing.assert_allclose([patch.get_x() for patch in ax.patches[:2]], [1 / 3, 2 / 3])
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "gap to confidence (ECE 0.220)" in legend, legend
    ax.figure.savefig(tmp_path / "diagram.png")
    with pytest.raises(TypeError, match=r"^plot_reliability_diagram: `ax` must be a matplotlib "
                       r"Axes or None; got 'x' \(str\)\.$"):  # fmt: skip
        calibration.plot_reliability_diagram(HAND_PROBS, HAND_LABELS, ax="x")
    assert (tmp_path / "diagram.png").stat().st_size > 0


def test_lsjax_imports_without_matplotlib_and_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['torch'] = None\n"
        "import lsjax.calibration\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# (function, keywords, exception, regex) for bad input
GOOD = {"probs": HAND_PROBS, "labels": HAND_LABELS}
BAD_INPUTS = [
    ({"num_bins": 0}, ValueError, r"`num_bins` must be an int >= 1; got 0"),
    ({"num_bins": 2.5}, ValueError, r"`num_bins` must be an int >= 1; got 2\.5"),
    ({"num_bins": True}, ValueError, r"`num_bins` must be an int >= 1; got True"),
    ({"probs": np.zeros((0, 3))}, ValueError, r"`probs` must have shape \(n, K\) with n >= 1"),
    ({"probs": HAND_PROBS[0]}, ValueError, r"`probs` must have shape \(n, K\).*got shape \(3,\)"),
    ({"probs": HAND_PROBS.astype(int)}, TypeError, r"`probs` must have a floating dtype"),
    ({"probs": HAND_PROBS * 3}, ValueError, r"`probs` must be probabilities in \[0, 1\]"),
    ({"probs": HAND_PROBS * 0.5}, ValueError, r"every row of `probs` must sum to 1.*got row sums"),
    (
        {"probs": np.full((5, 3), np.nan)},
        ValueError,
        r"`probs` must be finite; got non-finite values",
    ),
    ({"labels": HAND_LABELS[:4]}, ValueError, r"`labels` must have shape \(5,\); got shape \(4,"),
    ({"labels": HAND_LABELS * 1.0}, TypeError, r"`labels` must have an integer dtype"),
    ({"labels": HAND_LABELS + 1}, ValueError, r"`labels` must lie in \[0, 2\].*got.*\[3\]"),
]


@pytest.mark.parametrize("change,error,message", BAD_INPUTS)
@pytest.mark.parametrize(
    "function",
    [
        calibration.expected_calibration_error,
        calibration.maximum_calibration_error,
        calibration.reliability_diagram,
    ],
)
def test_bad_input_errors(function, change, error, message):
    arguments = {**GOOD, **change}
    num_bins = arguments.pop("num_bins", 15)
    with pytest.raises(error, match=function.__name__ + ": " + message):
        function(arguments["probs"], arguments["labels"], num_bins=num_bins)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"bounds": (0.0, 10.0)}, r"`bounds\[0\]` must be a finite number > 0; got 0\.0"),
        ({"bounds": (1.0, np.inf)}, r"`bounds\[1\]` must be a finite number > 0; got inf"),
        ({"bounds": (2.0, 1.0)}, r"`bounds` must satisfy T_min < T_max; got \(2\.0, 1\.0\)"),
        ({"bounds": 3.0}, r"`bounds` must be a pair \(T_min, T_max\); got 3\.0"),
    ],
)
def test_fit_temperature_bad_bounds(kwargs, message):
    with pytest.raises(ValueError, match="fit_temperature: " + message):
        calibration.fit_temperature(np.log(HAND_PROBS), HAND_LABELS, **kwargs)


def test_bad_temperature_and_logits():
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0; got -1"):
        calibration.negative_log_likelihood(np.zeros((2, 3)), np.array([0, 1]), temperature=-1)
    with pytest.raises(ValueError, match=r"fit_temperature: `logits` must be finite.*-inf"):
        calibration.fit_temperature(np.array([[0.0, -np.inf]]), np.array([0]))
    # a ragged list: named, with NumPy's reason (it raised NumPy's ValueError alone)
    with pytest.raises(
        TypeError,
        match=r"^fit_temperature: `logits` must be an array, a tensor "
        r"or a \(non-ragged\) nested list of numbers; got list \(setting",
    ):
        calibration.fit_temperature([[0.5, 0.5], [1.0]], [0, 1])


def test_traced_input_is_refused():
    @jax.jit
    def inside(probs):
        return calibration.expected_calibration_error(probs, HAND_LABELS)

    with pytest.raises(TypeError, match=r"`probs` must be a concrete array.*traced value"):
        inside(jnp.asarray(HAND_PROBS))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_pytorch_tensors_match_loop_oracle_and_scipy(dtype):
    # lstorch.calibration reads tensors as lsjax.calibration reads JAX arrays, requires_grad too.
    rng = np.random.default_rng(3)
    logits = torch.tensor(rng.normal(size=(200, 50)) * 3, dtype=dtype)
    probs = torch.softmax(logits, dim=1).requires_grad_(True)  # the softmax rounded to `dtype`
    labels = torch.tensor(rng.integers(0, 50, size=200))
    values = probs.detach().double().numpy()  # exact: every dtype here widens to float64 exactly
    if dtype == torch.bfloat16:
        # Rows sum to 1 only within bfloat16 rounding, farther off than the 1e-3 + K eps a
        # float32 input is allowed: the check must use the tensor's own dtype.
        assert np.abs(values.sum(axis=1) - 1).max() > 1e-3 + 50 * np.finfo(np.float32).eps
    ece, mce = _loop_oracle(values, labels.numpy(), 15)
    got_ece = torch_calibration.expected_calibration_error(probs, labels)
    assert got_ece == pytest.approx(ece, rel=1e-12)
    assert torch_calibration.maximum_calibration_error(probs, labels) == pytest.approx(
        mce, rel=1e-12
    )
    diagram = torch_calibration.reliability_diagram(probs, labels, num_bins=5)
    assert diagram.count.sum() == 200
    x = logits.double().numpy()
    y = labels.numpy()
    nll = np.mean(logsumexp(x / 2, axis=1) - x[np.arange(200), y] / 2)
    got_nll = torch_calibration.negative_log_likelihood(
        logits.requires_grad_(True), labels, temperature=2.0
    )
    assert got_nll == pytest.approx(nll, rel=1e-12)


def test_pytorch_tensors_inside_torch_func_are_refused():
    probs = torch.tensor(HAND_PROBS)
    labels = torch.tensor(HAND_LABELS)

    def inside(probs):
        torch_calibration.expected_calibration_error(probs, labels)
        return probs.sum()

    with pytest.raises(
        TypeError,
        match=r"expected_calibration_error: `probs` must be a concrete tensor .*torch\.func",
    ):
        torch.func.grad(inside)(probs)


def test_pytorch_integer_probs_name_their_dtype():
    with pytest.raises(
        TypeError, match=r"`probs` must have a floating dtype; got dtype torch\.int64"
    ):
        torch_calibration.expected_calibration_error(torch.ones(2, 3, dtype=torch.int64), [0, 1])


@pytest.mark.parametrize("module", [calibration, torch_calibration], ids=["lsjax", "lstorch"])
def test_plot_without_matplotlib_names_the_plot_extra(module, monkeypatch):
    # sys.modules[name] = None: importing it fails as where matplotlib is not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(
        ImportError,
        match=r"^plot_reliability_diagram needs matplotlib, and 'matplotlib' is not installed; "
        r"install the \[plot\] extra: pip install 'label-smoothing-parity\[plot\]'$",
    ):
        module.plot_reliability_diagram(HAND_PROBS, HAND_LABELS)
