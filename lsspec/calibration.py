"""Calibration metrics and temperature scaling, on concrete NumPy, JAX or PyTorch arrays.

Everything here runs in float64 NumPy on values already computed (evaluation, not training):
arrays come in, plain Python floats or NumPy arrays go out. This module imports NumPy only, so it
works with either framework or neither; users reach it as ``lsjax.calibration`` or
``lstorch.calibration`` (the same functions). JAX arrays and PyTorch tensors (any device, with or
without ``requires_grad``) are read as their values. Nothing here is jittable, and a traced value
(``jax.jit``, a ``torch.func`` transform) is refused with a clear error. matplotlib is imported
only inside :func:`plot_reliability_diagram` (the ``[plot]`` extra).

Notation: ``n`` samples, ``K`` classes, ``p_i`` the predicted distribution of sample ``i``,
``conf_i = max_c p_ic`` its confidence, ``pred_i = argmax_c p_ic`` (the first maximum on ties),
``M`` equal-width bins ``B_m = {i : conf_i in ((m-1)/M, m/M]}`` (a confidence of exactly 0 goes
to the first bin), ``acc(B) = mean_{i in B} [pred_i == y_i]``, ``conf(B) = mean_{i in B} conf_i``.

References:
  Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern Neural Networks" (ECE, MCE,
  reliability diagrams, temperature scaling); Naeini, Cooper & Hauskrecht 2015 (ECE, MCE).
"""

from __future__ import annotations

import numbers
import sys
from typing import Any, NamedTuple

import numpy as np

import lsspec

ArrayLike = Any

DEFAULT_NUM_BINS = 15
DEFAULT_TEMPERATURE_BOUNDS = (0.01, 100.0)


class ReliabilityDiagram(NamedTuple):
    """Per-bin data of a reliability diagram (``M`` equal-width confidence bins).

    Attributes:
      edges: ``(M + 1,)`` bin edges ``0, 1/M, ..., 1``; bin ``m`` is ``(edges[m], edges[m+1]]``.
      confidence: ``(M,)`` mean confidence ``conf(B_m)``; NaN where the bin is empty.
      accuracy: ``(M,)`` accuracy ``acc(B_m)``; NaN where the bin is empty.
      count: ``(M,)`` number of samples ``|B_m|`` (int64).
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


class _Concrete(NamedTuple):
    """An input's values as NumPy, with its original dtype and, when floating, that dtype's eps."""

    array: np.ndarray
    dtype: Any
    eps: float | None


def _float_eps(dtype: np.dtype) -> float | None:
    """Machine epsilon of a floating NumPy dtype, None for any other dtype.

    bfloat16 and the float8 types (from ml_dtypes, which JAX brings) are floating too; NumPy's own
    ``issubdtype`` does not know them. An array of such a dtype exists only once ml_dtypes is
    imported, so it is looked up in ``sys.modules`` and never imported here."""
    if np.issubdtype(dtype, np.floating):
        return float(np.finfo(dtype).eps)
    if np.dtype(dtype).kind != "V":  # NumPy's own non-floats (ml_dtypes' finfo takes complex)
        return None
    ml_dtypes = sys.modules.get("ml_dtypes")
    if ml_dtypes is not None:
        try:
            return float(ml_dtypes.finfo(dtype).eps)
        except ValueError:  # not inexact (integers, int4, ...)
            return None
    return None


def _concrete(fn: str, name: str, value: Any) -> _Concrete:
    """``value`` as a NumPy array; a traced JAX or PyTorch value is refused.

    A framework that is not imported cannot have made ``value``, so each is looked up in
    ``sys.modules`` and never imported here."""
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{fn}: `{name}` must be a concrete array (calibration metrics run on values, "
            f"outside jax.jit); got a traced value {value!r}."
        )
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        dtype = value.dtype
        eps = float(torch.finfo(dtype).eps) if dtype.is_floating_point else None
        try:
            tensor = value.detach().cpu()
            # NumPy has no bfloat16/float8: their values are exact in float32.
            if dtype.is_floating_point and dtype not in (torch.float16, torch.float64):
                tensor = tensor.float()
            array = tensor.numpy()
        except RuntimeError as error:
            raise TypeError(
                f"{fn}: `{name}` must be a concrete tensor (calibration metrics run on values, "
                f"outside torch.func transforms); got a tensor whose values cannot be read "
                f"({error})."
            ) from error
        return _Concrete(array, dtype, eps)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:  # a ragged list: NumPy's own words say why
        raise TypeError(
            f"{fn}: `{name}` must be an array, a tensor or a (non-ragged) nested list of "
            f"numbers; got {type(value).__name__} ({error})."
        ) from None
    return _Concrete(array, array.dtype, _float_eps(array.dtype))


def _check_num_bins(fn: str, num_bins: Any) -> int:
    if not isinstance(num_bins, numbers.Integral) or isinstance(num_bins, bool) or num_bins < 1:
        raise ValueError(f"{fn}: `num_bins` must be an int >= 1; got {num_bins!r}.")
    return int(num_bins)


def _check_scores(fn: str, name: str, value: Any) -> tuple[np.ndarray, float]:
    """A finite (n, K) float array with n >= 1, K >= 1, returned as float64, with the eps of the
    input's dtype."""
    array, dtype, eps = _concrete(fn, name, value)
    if eps is None:
        raise lsspec.dtype_error(fn, name, dtype, "a floating dtype")
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise lsspec.shape_error(
            fn, name, array.shape, "shape (n, K) with n >= 1 samples and K >= 1 classes"
        )
    array64 = array.astype(np.float64)
    if not np.isfinite(array64).all():
        bad = array64[~np.isfinite(array64)]
        raise ValueError(f"{fn}: `{name}` must be finite; got non-finite values {bad[:5]}.")
    return array64, eps


def _check_probs(fn: str, probs: Any) -> np.ndarray:
    probs, eps = _check_scores(fn, "probs", probs)
    if (probs < 0).any() or (probs > 1).any():
        outside = probs[(probs < 0) | (probs > 1)]
        raise ValueError(
            f"{fn}: `probs` must be probabilities in [0, 1] (pass softmax(logits), not logits); "
            f"got values {outside[:5]}."
        )
    # A softmax computed in the input's dtype sums to 1 up to about K roundings of that dtype;
    # 1e-3 on top leaves room for float16/bfloat16 inputs while still catching unnormalised rows.
    num_classes = probs.shape[1]
    tolerance = 1e-3 + num_classes * eps
    row_sums = probs.sum(axis=1)
    off = np.abs(row_sums - 1.0) > tolerance
    if off.any():
        raise ValueError(
            f"{fn}: every row of `probs` must sum to 1 (within {tolerance:.3g}); got row sums "
            f"{row_sums[off][:5]}."
        )
    return probs


def _check_labels(fn: str, labels: Any, num_samples: int, num_classes: int) -> np.ndarray:
    labels, dtype, _ = _concrete(fn, "labels", labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise lsspec.dtype_error(fn, "labels", dtype, "an integer dtype")
    if labels.shape != (num_samples,):
        raise lsspec.shape_error(fn, "labels", labels.shape, f"shape ({num_samples},)")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise lsspec.label_range_error(fn, labels[bad].tolist(), num_classes, None)
    return labels.astype(np.int64)


def _check_temperature(fn: str, name: str, value: Any) -> float:
    """A finite number > 0: a Python number or a concrete 0-d array (NumPy, JAX or PyTorch) of
    a real dtype."""
    if hasattr(value, "dtype") and not lsspec.is_number(value):
        array, _, eps = _concrete(fn, name, value)
        real = eps is not None or np.issubdtype(array.dtype, np.integer)
        if array.ndim == 0 and real:
            value = float(array)
    if not lsspec.is_number(value) or not (0 < float(value) < np.inf):
        raise ValueError(f"{fn}: `{name}` must be a finite number > 0; got {value!r}.")
    return float(value)


def _bin_index(confidence: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of the right-closed bin ``(edges[m], edges[m+1]]`` holding each confidence.

    Each edge is ``m / M`` as Python and NumPy divide it, the float nearest the fraction: a
    confidence computed as ``m / M`` lies on the edge and goes to the lower bin. (``linspace``
    builds ``m * (1 / M)``, one float step off at some M, 49 and 98 among them, which would put
    such a confidence one bin up.)"""
    edges = np.arange(num_bins + 1) / num_bins
    # side="left" gives the first edge >= conf, so conf == edges[m+1] lands in bin m.
    index = np.searchsorted(edges, confidence, side="left") - 1
    return np.clip(index, 0, num_bins - 1), edges


def reliability_diagram(
    probs: ArrayLike, labels: ArrayLike, *, num_bins: int = DEFAULT_NUM_BINS
) -> ReliabilityDiagram:
    """Per-bin mean confidence, accuracy and count over ``M`` equal-width confidence bins.

    ``conf_i = max_c p_ic``, ``correct_i = [argmax_c p_ic == y_i]``; bin ``m`` holds the samples
    with ``conf_i in ((m-1)/M, m/M]`` and reports ``conf(B_m) = mean conf_i``,
    ``acc(B_m) = mean correct_i`` (both NaN for an empty bin) and ``|B_m|`` (Guo et al. 2017,
    §2). A perfectly calibrated model has ``acc(B_m) = conf(B_m)`` in every bin.

    Args:
      probs: ``(n, K)`` predicted probabilities (rows sum to 1), NumPy, JAX or PyTorch, any
        float dtype.
      labels: ``(n,)`` integer true classes in ``[0, K)``.
      num_bins: ``M >= 1``, the number of equal-width bins on [0, 1] (Guo et al. use 15).

    Returns:
      A :class:`ReliabilityDiagram` of NumPy arrays (float64, counts int64).
    """
    return _diagram("reliability_diagram", probs, labels, num_bins)


def _diagram(fn: str, probs: Any, labels: Any, num_bins: Any) -> ReliabilityDiagram:
    num_bins = _check_num_bins(fn, num_bins)
    probs = _check_probs(fn, probs)
    labels = _check_labels(fn, labels, *probs.shape)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    index, edges = _bin_index(confidence, num_bins)
    count = np.bincount(index, minlength=num_bins).astype(np.int64)
    confidence_sum = np.bincount(index, weights=confidence, minlength=num_bins)
    correct_sum = np.bincount(index, weights=correct, minlength=num_bins)
    filled = count > 0
    mean_confidence = np.full(num_bins, np.nan)
    accuracy = np.full(num_bins, np.nan)
    mean_confidence[filled] = confidence_sum[filled] / count[filled]
    accuracy[filled] = correct_sum[filled] / count[filled]
    return ReliabilityDiagram(edges, mean_confidence, accuracy, count)


def expected_calibration_error(
    probs: ArrayLike, labels: ArrayLike, *, num_bins: int = DEFAULT_NUM_BINS
) -> float:
    """Expected calibration error over equal-width confidence bins (Guo et al. 2017, eq. 3)::

        ECE = sum_m (|B_m| / n) * |acc(B_m) - conf(B_m)|

    Empty bins contribute 0. ECE is in [0, 1]; 0 means every bin's accuracy equals its mean
    confidence. With one bin it is ``|accuracy - mean confidence|``.

    Args:
      probs: ``(n, K)`` predicted probabilities (rows sum to 1), NumPy, JAX or PyTorch.
      labels: ``(n,)`` integer true classes in ``[0, K)``.
      num_bins: ``M >= 1`` equal-width bins on [0, 1], right-closed; default 15 as Guo et al.

    Returns:
      ECE as a Python float.
    """
    return _ece(_diagram("expected_calibration_error", probs, labels, num_bins))


def _ece(diagram: ReliabilityDiagram) -> float:
    filled = diagram.count > 0
    weights = diagram.count[filled] / diagram.count.sum()
    gaps = np.abs(diagram.accuracy[filled] - diagram.confidence[filled])
    return float(np.sum(weights * gaps))


def maximum_calibration_error(
    probs: ArrayLike, labels: ArrayLike, *, num_bins: int = DEFAULT_NUM_BINS
) -> float:
    """Maximum calibration error over the non-empty bins (Guo et al. 2017, eq. 5)::

        MCE = max_{m : |B_m| > 0} |acc(B_m) - conf(B_m)|

    Args and bins as :func:`expected_calibration_error`.

    Returns:
      MCE as a Python float in [0, 1].
    """
    diagram = _diagram("maximum_calibration_error", probs, labels, num_bins)
    filled = diagram.count > 0
    return float(np.max(np.abs(diagram.accuracy[filled] - diagram.confidence[filled])))


def _shifted(logits: np.ndarray) -> np.ndarray:
    """Logits minus each row's max: softmax, NLL and its derivatives are unchanged."""
    return logits - logits.max(axis=1, keepdims=True)


def negative_log_likelihood(
    logits: ArrayLike, labels: ArrayLike, *, temperature: float = 1.0
) -> float:
    """Mean negative log-likelihood of temperature-scaled logits::

        NLL(T) = (1/n) sum_i [ logsumexp_c(x_ic / T) - x_{i,y_i} / T ]

    computed in float64 from logits (never ``log(softmax)``).

    Args:
      logits: ``(n, K)`` finite logits, NumPy, JAX or PyTorch.
      labels: ``(n,)`` integer true classes in ``[0, K)``.
      temperature: ``T > 0``, a Python number or a concrete 0-d array (NumPy, JAX or PyTorch).

    Returns:
      The mean NLL (nats) as a Python float.
    """
    fn = "negative_log_likelihood"
    logits, _ = _check_scores(fn, "logits", logits)
    labels = _check_labels(fn, labels, *logits.shape)
    temperature = _check_temperature(fn, "temperature", temperature)
    scaled = _shifted(logits) / temperature
    lse = np.log(np.sum(np.exp(scaled), axis=1))
    return float(np.mean(lse - scaled[np.arange(len(labels)), labels]))


def fit_temperature(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    bounds: tuple[float, float] = DEFAULT_TEMPERATURE_BOUNDS,
) -> float:
    """Temperature scaling: the ``T`` minimising the NLL of ``softmax(logits / T)`` (Guo et al.).

    Fit on held-out logits (a validation split), then apply ``softmax(test_logits / T)``. ``T > 0``
    never changes the argmax, so accuracy is unchanged; ``T > 1`` softens an over-confident model.

    With ``beta = 1/T`` the NLL is convex in ``beta`` (a log-sum-exp of linear functions), with::

        dNLL/dbeta   = (1/n) sum_i ( E_{p_i}[x_i] - x_{i,y_i} ),   p_i = softmax(beta x_i)
        d2NLL/dbeta2 = (1/n) sum_i Var_{p_i}[x_i] >= 0

    so the first derivative is non-decreasing and its root is found by Newton's method safeguarded
    by bisection on ``beta in [1/T_max, 1/T_min]``, in float64.

    Args:
      logits: ``(n, K)`` finite held-out logits, NumPy, JAX or PyTorch.
      labels: ``(n,)`` integer true classes in ``[0, K)``.
      bounds: ``(T_min, T_max)`` with ``0 < T_min < T_max < inf`` (a tuple, list or NumPy
        array). When the NLL keeps decreasing past a bound (e.g. every held-out sample correct
        with a margin: ``T -> 0``; logits worse than chance: ``T -> inf``), that bound is
        returned. When it does not depend on ``T`` at all (every row's logits equal, or one
        class), the logits say nothing about a temperature: 1 (no scaling) is returned, or the
        bound nearest to it.

    Returns:
      The fitted temperature as a Python float.
    """
    fn = "fit_temperature"
    logits, _ = _check_scores(fn, "logits", logits)
    labels = _check_labels(fn, labels, *logits.shape)
    if not isinstance(bounds, tuple | list | np.ndarray) or np.shape(bounds) != (2,):
        raise ValueError(f"{fn}: `bounds` must be a pair (T_min, T_max); got {bounds!r}.")
    t_min = _check_temperature(fn, "bounds[0]", bounds[0])
    t_max = _check_temperature(fn, "bounds[1]", bounds[1])
    if not t_min < t_max:
        raise ValueError(f"{fn}: `bounds` must satisfy T_min < T_max; got {bounds!r}.")

    x = _shifted(logits)
    x_y = x[np.arange(len(labels)), labels]

    def slope_and_curvature(beta: float) -> tuple[float, float]:
        scaled = beta * x
        p = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        mean_x = np.sum(p * x, axis=1)
        var_x = np.sum(p * (x - mean_x[:, None]) ** 2, axis=1)
        return float(np.mean(mean_x - x_y)), float(np.mean(var_x))

    beta_lo, beta_hi = 1.0 / t_max, 1.0 / t_min
    slope_lo, curvature_lo = slope_and_curvature(beta_lo)
    if curvature_lo == 0:  # every row's logits equal (or K = 1): the NLL does not depend on T
        return min(max(1.0, t_min), t_max)
    if slope_lo >= 0:  # NLL non-decreasing in beta over the whole range: smallest beta wins.
        return t_max
    slope_hi, _ = slope_and_curvature(beta_hi)
    if slope_hi <= 0:  # NLL non-increasing over the whole range: largest beta wins.
        return t_min
    beta = min(max(1.0, beta_lo), beta_hi)  # start from T = 1 (no scaling)
    tolerance = 1e-13 * (1.0 + np.abs(x_y).mean())
    for _ in range(200):
        slope, curvature = slope_and_curvature(beta)
        if abs(slope) <= tolerance:
            break
        # The root stays inside [beta_lo, beta_hi]: slope(beta_lo) < 0 < slope(beta_hi).
        if slope > 0:
            beta_hi = beta
        else:
            beta_lo = beta
        if beta_hi - beta_lo <= 1e-12 * beta_hi:
            beta = 0.5 * (beta_lo + beta_hi)
            break
        newton = beta - slope / curvature if curvature > 0 else np.nan
        beta = newton if beta_lo < newton < beta_hi else 0.5 * (beta_lo + beta_hi)
    return float(1.0 / beta)


def plot_reliability_diagram(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    num_bins: int = DEFAULT_NUM_BINS,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Draw a reliability diagram (Guo et al. 2017, Fig. 1) and return the matplotlib Axes.

    Bars show ``acc(B_m)`` over each bin ``((m-1)/M, m/M]``; a hatched bar spans the gap between
    ``acc(B_m)`` and ``conf(B_m)``; the diagonal is perfect calibration; the legend gives the ECE.
    Empty bins draw nothing. matplotlib is imported here only, from the ``[plot]`` extra
    (``pip install 'label-smoothing-parity[plot]'``); nothing else in the library needs it.

    Args:
      probs: as :func:`reliability_diagram`.
      labels: as :func:`reliability_diagram`.
      num_bins: as :func:`reliability_diagram`.
      ax: a matplotlib Axes to draw into; a new figure is made when None.
      title: the Axes title.

    Returns:
      The Axes.

    Raises:
      ImportError: naming the ``[plot]`` extra, when matplotlib is not installed.
    """
    try:
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as error:
        if not lsspec.is_missing(error, ("matplotlib",)):
            raise
        raise ImportError(
            lsspec.install_hint("plot_reliability_diagram", "matplotlib", "plot", error)
        ) from error

    diagram = _diagram("plot_reliability_diagram", probs, labels, num_bins)
    ece = _ece(diagram)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    elif not all(hasattr(ax, method) for method in ("bar", "plot", "legend")):
        raise TypeError(
            f"plot_reliability_diagram: `ax` must be a matplotlib Axes or None; got {ax!r} "
            f"({type(ax).__name__})."
        )
    filled = diagram.count > 0
    left = diagram.edges[:-1][filled]
    width = np.diff(diagram.edges)[filled]
    accuracy = diagram.accuracy[filled]
    confidence = diagram.confidence[filled]
    ax.bar(left, accuracy, width=width, align="edge", edgecolor="black", label="accuracy")
    ax.bar(
        left,
        np.abs(confidence - accuracy),
        bottom=np.minimum(accuracy, confidence),
        width=width,
        align="edge",
        facecolor="none",
        hatch="//",
        edgecolor="tab:red",
        label=f"gap to confidence (ECE {ece:.3f})",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    if title is not None:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    return ax
