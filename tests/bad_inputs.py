"""The catalogue of bad inputs shown in the docs, and the table generated from it.

``python -m tests.bad_inputs`` prints the table; ``--write`` puts it into docs/errors.md between
the ``<!-- bad-inputs:start -->`` and ``<!-- bad-inputs:end -->`` markers. ``tests/test_readme.py``
fails when that table differs from what the code raises today, so it cannot drift.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

ERRORS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
START, END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"


def _data(num_classes=5):
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, num_classes)).astype(np.float32), rng.integers(0, num_classes, 4)


def _call(options=None, num_classes=5, logits=None, labels=None):
    def run(module, array):
        x, y = _data(num_classes)
        x = x if logits is None else logits
        y = y if labels is None else labels
        extra = {
            k: array(v) if isinstance(v, np.ndarray) else v for k, v in (options or {}).items()
        }
        return module.smoothed_cross_entropy(array(x), array(y), **extra)

    return run


def _log_probs_call(function, **options):
    """``function(log_softmax(logits), labels, **options)`` for a function that takes
    log-probabilities (``"compat.fairseq.label_smoothed_nll_loss"``), to show that errors name
    it."""

    def run(module, array):
        x, y = _data()
        log_probs = x - np.log(np.exp(x).sum(-1, keepdims=True))
        target = module
        for name in function.split("."):
            target = getattr(target, name)
        return target(array(log_probs), array(y), **options)

    return run


# (what the user did, the call with logits of shape (4, 5) unless said otherwise)
CASES = [
    ("`smoothing` outside [0, 1]", _call({"smoothing": 1.5})),
    ("`smoothing` a 0-d array/tensor outside [0, 1]", _call({"smoothing": np.array(1.5)})),
    ("`smoothing` not a number (None, '0.1', (0.1,), True)", _call({"smoothing": None})),
    (
        "`normalizer` not > 0 (a number or a 0-d array/tensor)",
        _call({"normalizer": np.array(-2.0), "reduction": "mean"}),
    ),
    ("`z_loss` negative", _call({"z_loss": -1.0})),
    ("`smoothing` an array of shape (1,), not 0-d", _call({"smoothing": np.array([0.1])})),
    ('a flag not True or False (`kl="False"` would read as True)', _call({"kl": "False"})),
    (
        "`pad_index=True` (a bool is no class index)",
        _call({"convention": "others_but_pad", "pad_index": True}),
    ),
    (
        "fairseq's `epsilon` outside [0, 1] (errors name the function called, in its words)",
        _log_probs_call("compat.fairseq.label_smoothed_nll_loss", epsilon=2.0),
    ),
    (
        "the OpenNMT-style KL loss: a pad column and `tgt_vocab_size=2`",
        _log_probs_call(
            "kl_label_smoothing_loss", label_smoothing=0.1, tgt_vocab_size=2, ignore_index=0
        ),
    ),
    ("unknown `convention`", _call({"convention": "eps/K"})),
    ("unknown `reduction`", _call({"reduction": "avg"})),
    ("`check_labels` not None, True or False", _call({"check_labels": "yes"})),
    ("labels out of range (concrete)", _call(labels=np.array([0, 1, 7, 2]))),
    ("`labels` shape not the logits' minus the class axis", _call(labels=np.zeros((4, 1), int))),
    ("`weight` of the wrong length", _call({"weight": np.ones(4, np.float32)})),
    (
        "a complex `weight` (its imaginary part would be dropped)",
        _call({"weight": np.ones(5, np.complex64)}),
    ),
    ("`where` of the wrong shape", _call({"where": np.ones(3, bool)})),
    ("`where` not boolean", _call({"where": np.ones(4, np.float32)})),
    ("integer logits", _call(logits=np.zeros((4, 5), np.int32))),
    ("float labels", _call(labels=np.zeros(4, np.float32))),
    ("K < 2 with `others`", _call({"convention": "others"}, num_classes=1)),
    ("K < 3 with `others_but_pad`", _call({"convention": "others_but_pad", "pad_index": 0}, 2)),
    ("`others_but_pad` without `pad_index`", _call({"convention": "others_but_pad"})),
    ("`pad_index` with another convention", _call({"pad_index": 0})),
    ("`normalizer` without reduction='mean'", _call({"normalizer": 8.0})),
    ("`kl=True` with class weights", _call({"kl": True, "weight": np.ones(5, np.float32)})),
    ("`axis` out of range", _call({"axis": 2})),
]


def raised(run, module, array) -> tuple[str, str]:
    """(exception type name, message) that ``run`` raises; AssertionError if it raises none."""
    try:
        run(module, array)
    except (ValueError, TypeError) as error:
        return type(error).__name__, str(error)
    raise AssertionError("no error was raised")


def normalise(message: str) -> str:
    """Framework-neutral wording: torch prints dtypes as ``torch.float32`` and says what a
    tensor argument must be; JAX prints ``float32``."""
    for aside in (" (a float torch.Tensor)", " (an int torch.Tensor)"):
        message = message.replace(aside, "")
    return re.sub(r"\btorch\.", "", message)


def table() -> str:
    import jax.numpy as jnp

    import lsjax

    lines = ["| bad input | error | message (both frameworks) |", "|---|---|---|"]
    for description, run in CASES:
        kind, message = raised(run, lsjax, jnp.asarray)
        lines.append(f"| {description} | `{kind}` | {normalise(message)} |")
    return "\n".join(lines)


def page_block() -> str:
    """The table in docs/errors.md, between the markers."""
    text = ERRORS_PAGE.read_text()
    return text[text.index(START) + len(START) : text.index(END)].strip()


def main() -> None:
    generated = table()
    if "--write" in sys.argv:
        text = ERRORS_PAGE.read_text()
        head, tail = text[: text.index(START) + len(START)], text[text.index(END) :]
        ERRORS_PAGE.write_text(f"{head}\n{generated}\n{tail}")
    print(generated)


if __name__ == "__main__":
    main()
