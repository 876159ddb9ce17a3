"""The peers' own losses, in PyTorch, with their own signatures: thin bindings over the core.

``fairseq``, ``t5x`` (also the Flax WMT example), ``hf`` (the Hugging Face Trainer), ``keras``,
``timm``, ``opennmt`` (OpenNMT-py's KL loss) and ``pytorch_forum`` (the ``LabelSmoothingLoss``
of PyTorch's forums). Each function has a JAX twin of the same name in ``lsjax.compat`` and is a
registered twin in ``parity_tests.registry``; SEMANTICS.md §6 gives each peer's formula.
"""

from lstorch.compat import fairseq, hf, keras, opennmt, pytorch_forum, t5x, timm

__all__ = ["fairseq", "hf", "keras", "opennmt", "pytorch_forum", "t5x", "timm"]
