"""Calibration metrics and temperature scaling: ECE, MCE, reliability diagrams, NLL and
temperature fitting, on concrete arrays (evaluation, not training).

The functions live in :mod:`lsspec.calibration`, which needs NumPy only; this module and
``lsjax.calibration`` re-export the same functions, so they take NumPy, JAX and PyTorch arrays
alike. A tensor is read as its values (any device, with or without ``requires_grad``); inside
a ``torch.func`` transform it is refused with a clear error. ``plot_reliability_diagram`` needs
matplotlib (the ``[plot]`` extra).
"""

from lsspec.calibration import (
    DEFAULT_NUM_BINS,
    DEFAULT_TEMPERATURE_BOUNDS,
    ReliabilityDiagram,
    expected_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    negative_log_likelihood,
    plot_reliability_diagram,
    reliability_diagram,
)

__all__ = [
    "DEFAULT_NUM_BINS",
    "DEFAULT_TEMPERATURE_BOUNDS",
    "ReliabilityDiagram",
    "expected_calibration_error",
    "fit_temperature",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "plot_reliability_diagram",
    "reliability_diagram",
]
