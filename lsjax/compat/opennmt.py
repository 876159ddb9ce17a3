"""OpenNMT-py's KL ``LabelSmoothingLoss`` in JAX (twin: ``lstorch.compat.opennmt``)."""

from __future__ import annotations

import jax

import lsspec
from lsjax import _common
from lsjax._common import ArrayLike, as_array
from lsjax.smoothed import smoothed_cross_entropy


def kl_label_smoothing_loss(
    output: ArrayLike,
    target: ArrayLike,
    *,
    label_smoothing: float,
    tgt_vocab_size: int,
    ignore_index: int = -100,
    check_labels: bool | None = None,
    _caller: lsspec.Caller | None = None,
) -> jax.Array:
    """OpenNMT-py's ``LabelSmoothingLoss(label_smoothing, tgt_vocab_size, ignore_index)``.

    Log-probabilities in (class axis last), ``F.kl_div(output, q, reduction='sum')``: the KL form
    summed over all rows, where ``q`` puts ``1 - eps`` on the target, no mass on the pad column
    ``ignore_index`` and ``eps/(K-2)`` on every other class, and rows whose target is the pad are
    zeroed. That is ``smoothed_cross_entropy(output, target, smoothing=eps,
    convention="others_but_pad", pad_index=ignore_index, kl=True, from_log_probs=True,
    reduction="sum")``.

    Deviation, on purpose: OpenNMT writes ``one_hot[ignore_index] = 0``, which with the default
    ``-100`` zeroes column ``K - 100`` (or raises IndexError when K < 100) while still dividing
    ``eps`` by ``K - 2``. Here a negative ``ignore_index`` excludes no column: ``eps`` is spread
    over the ``K - 1`` other classes (``convention="others"``) and rows whose target equals
    ``ignore_index`` are zeroed. For ``0 <= ignore_index < K`` OpenNMT is reproduced exactly.
    As OpenNMT asserts, ``label_smoothing`` must lie in (0, 1] (checked when concrete; traced, only
    [0, 1] is enforced, by NaN). ``_caller`` is internal (who errors name).
    ``check_labels`` is :func:`lsjax.smoothed_cross_entropy`'s: ``False`` reads no concrete
    value to check it (a target out of range gives a NaN row, and ``label_smoothing`` as an
    array is held to [0, 1] only, by NaN, as under ``jit``).
    """
    fn = lsspec.caller("kl_label_smoothing_loss", _caller)
    output = as_array(fn, "output", output)
    lsspec.check_check_labels(fn, check_labels)
    value = _common.concrete_scalar(
        fn, "label_smoothing", label_smoothing, check_labels=check_labels
    )
    options = lsspec.opennmt_kl_options(fn, value, ignore_index, tgt_vocab_size)
    if output.ndim:
        lsspec.check_declared_classes(fn, "tgt_vocab_size", tgt_vocab_size, output.shape[-1])
    inner = lsspec.caller(
        "kl_label_smoothing_loss",
        _caller,
        logits="output",
        labels="target",
        smoothing="label_smoothing",
        pad_index="ignore_index",
    )
    return smoothed_cross_entropy(
        output,
        target,
        smoothing=label_smoothing,
        kl=True,
        from_log_probs=True,
        reduction="sum",
        axis=-1,
        check_labels=check_labels,
        _caller=inner,
        **options,
    )
