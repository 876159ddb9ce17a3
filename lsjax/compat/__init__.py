"""The peers' own losses, in JAX, with their own signatures: thin bindings over the core.

``fairseq``, ``t5x`` (also the Flax WMT example), ``hf`` (the Hugging Face Trainer), ``keras``,
``timm``, ``opennmt`` (OpenNMT-py's KL loss) and ``pytorch_forum`` (the ``LabelSmoothingLoss``
of PyTorch's forums): each function has a PyTorch twin of the same name in ``lstorch.compat``.
``megatron``: Megatron-core's vocabulary-parallel loss on full logits, ``cross_entropy``, whose
twin is ``lstorch.compat.megatron.vocab_parallel_cross_entropy`` (Megatron's own name).
``pytorch``: ``torch.nn.functional.cross_entropy`` itself, whose twin is torch's own function.
Each is a registered twin in ``parity_tests.registry``; SEMANTICS.md §6 gives each peer's
formula.
"""

from lsjax.compat import fairseq, hf, keras, megatron, opennmt, pytorch, pytorch_forum, t5x, timm

__all__ = [
    "fairseq",
    "hf",
    "keras",
    "megatron",
    "opennmt",
    "pytorch",
    "pytorch_forum",
    "t5x",
    "timm",
]
