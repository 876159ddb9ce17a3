"""Deprecated: ``lsjax.compat.pytorch_forum.label_smoothing_loss`` and
``lsjax.compat.opennmt.kl_label_smoothing_loss`` (also ``lsjax.label_smoothing_loss`` and
``lsjax.kl_label_smoothing_loss``). Importing this module warns; it will be removed.
"""

import warnings

from lsjax.compat.opennmt import kl_label_smoothing_loss
from lsjax.compat.pytorch_forum import label_smoothing_loss

__all__ = ["kl_label_smoothing_loss", "label_smoothing_loss"]

warnings.warn(
    "lsjax.seed_modules is deprecated: import label_smoothing_loss and kl_label_smoothing_loss "
    "from lsjax (or lsjax.compat.pytorch_forum and lsjax.compat.opennmt).",
    DeprecationWarning,
    stacklevel=2,
)
