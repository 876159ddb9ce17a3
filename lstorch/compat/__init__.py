"""The peers' own losses, in PyTorch, with their own signatures: thin bindings over the core.

``fairseq``, ``t5x`` (also the Flax WMT example), ``hf`` (the Hugging Face Trainer), ``keras``,
``timm``, ``opennmt`` (OpenNMT-py's KL loss) and ``pytorch_forum`` (the ``LabelSmoothingLoss``
of PyTorch's forums). Each function has a JAX twin of the same name in ``lsjax.compat`` and is a
registered twin in ``parity_tests.registry``; SEMANTICS.md §6 gives each peer's formula.
``megatron``: Megatron-core's ``vocab_parallel_cross_entropy`` (logits split over the vocabulary
across a process group), whose JAX twin on full logits is ``lsjax.compat.megatron.cross_entropy``.
"""

from lstorch.compat import fairseq, hf, keras, megatron, opennmt, pytorch_forum, t5x, timm

__all__ = ["fairseq", "hf", "keras", "megatron", "opennmt", "pytorch_forum", "t5x", "timm"]
