"""The peers' own losses, in JAX, with their own signatures: thin bindings over the core.

``fairseq``, ``t5x`` (also the Flax WMT example), ``hf`` (the Hugging Face Trainer), ``keras``
and ``timm``. Each function has a PyTorch twin of the same name in ``lstorch.compat`` and is a
registered twin in ``parity_tests.registry``; SEMANTICS.md §6 gives each peer's formula.
"""

from lsjax.compat import fairseq, hf, keras, t5x, timm

__all__ = ["fairseq", "hf", "keras", "t5x", "timm"]
