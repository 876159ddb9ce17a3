"""Deprecated: ``lstorch.compat.pytorch_forum.label_smoothing_loss`` and
``lstorch.compat.opennmt.kl_label_smoothing_loss`` (also ``lstorch.label_smoothing_loss`` and
``lstorch.kl_label_smoothing_loss``). Importing this module warns; it will be removed.
"""

import warnings

from lstorch.compat.opennmt import kl_label_smoothing_loss
from lstorch.compat.pytorch_forum import label_smoothing_loss

__all__ = ["kl_label_smoothing_loss", "label_smoothing_loss"]

warnings.warn(
    "lstorch.seed_modules is deprecated: import label_smoothing_loss and "
    "kl_label_smoothing_loss from lstorch (or lstorch.compat.pytorch_forum and "
    "lstorch.compat.opennmt).",
    DeprecationWarning,
    stacklevel=2,
)
