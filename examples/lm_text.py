"""Text that is on every machine, for the language-model examples: the Python standard library's
own source files, read as bytes (a vocabulary of 256 tokens, no tokenizer to download).

Shared by ``flax_lm.py`` (JAX) and ``hf_trainer.py`` (PyTorch); NumPy only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

VOCAB = 256  # one token per byte value


def stdlib_bytes(limit: int) -> np.ndarray:
    """Up to ``limit`` bytes of the standard library's top-level ``*.py`` files, in name order
    (the same text on every run of one Python version), as uint8."""
    chunks, size = [], 0
    for path in sorted(Path(os.path.dirname(os.__file__)).glob("*.py")):
        data = path.read_bytes()[: limit - size]
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def train_eval_split(data: np.ndarray, eval_fraction: float = 0.1):
    """The last ``eval_fraction`` of the text is held out (a contiguous tail: no window of it
    overlaps the training text)."""
    cut = int(len(data) * (1 - eval_fraction))
    return data[:cut], data[cut:]


def windows(data: np.ndarray, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random windows of ``length`` consecutive bytes, ``(count, length)`` int32."""
    starts = rng.integers(0, len(data) - length, size=count)
    return np.stack([data[start : start + length] for start in starts]).astype(np.int32)
