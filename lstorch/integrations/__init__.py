"""lstorch's losses inside other libraries' training loops.

``huggingface``: the loss of a ``transformers.Trainer`` (``compute_loss_func``) and a fused
causal-LM loss that never builds the logits. Each submodule needs its own extra (``[hf]`` for
``huggingface``) and is imported on its own, ``from lstorch.integrations import huggingface``:
this package imports none of them, so ``import lstorch`` never needs transformers.
"""
