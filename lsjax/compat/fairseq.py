"""fairseq's ``label_smoothed_nll_loss`` in JAX (twin: ``lstorch.compat.fairseq``)."""

from __future__ import annotations

import jax

import lsspec
from lsjax._common import ArrayLike, as_array
from lsjax.smoothed import smoothed_cross_entropy


def label_smoothed_nll_loss(
    lprobs: ArrayLike,
    target: ArrayLike,
    epsilon: float,
    ignore_index: int | None = None,
    reduce: bool = True,
    *,
    pre_2021: bool = False,
    check_labels: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""fairseq's ``label_smoothed_nll_loss(lprobs, target, epsilon, ignore_index, reduce)``.

    Log-probabilities in (vocabulary axis last), SEMANTICS.md §6::

        nll    = -lprobs[y]
        smooth = -sum_c lprobs_c
        eps_i  = epsilon / (V - 1)
        loss   = (1 - epsilon - eps_i) * nll + eps_i * smooth

    rows with ``target == ignore_index`` zeroed in both, summed when ``reduce``. That is
    ``smoothed_cross_entropy(lprobs, target, smoothing=epsilon, convention="others",
    from_log_probs=True, ignore_index=ignore_index, reduction="sum" if reduce else "none")``,
    and ``nll`` the same call with ``smoothing=0``; the gradient is ``-q``.

    ``pre_2021=True``: fairseq before February 2021, ``eps_i = epsilon / V`` and
    ``loss = (1 - epsilon) * nll + eps_i * smooth``: ``convention="uniform"``.

    Returns ``(loss, nll_loss)`` like fairseq: scalars when ``reduce``; otherwise per row, with
    a trailing axis of 1 when ``ignore_index`` is given (fairseq keeps the gathered
    ``(..., 1)`` shape then and squeezes it otherwise). ``target`` may carry that trailing 1.
    Differences: an ``epsilon`` outside [0, 1] or a (non-ignored) target out of range raises
    instead of computing a number. ``check_labels`` is
    :func:`lsjax.smoothed_cross_entropy`'s: ``False`` reads no concrete value to check it (a
    target out of range gives a NaN row, as under ``jit``).
    """
    fn = "label_smoothed_nll_loss"
    lsspec.check_flags(fn, reduce=reduce, pre_2021=pre_2021)
    lprobs = as_array(fn, "lprobs", lprobs)
    target = as_array(fn, "target", target)
    trailing = lsspec.fairseq_labels_shape(fn, target.shape, lprobs.shape)
    labels = target[..., 0] if trailing else target
    options = dict(
        from_log_probs=True,
        ignore_index=ignore_index,
        reduction="sum" if reduce else "none",
        check_labels=check_labels,
    )
    convention = "uniform" if pre_2021 else "others"
    # Errors below name this function and its arguments; the class axis is the last.
    options.update(
        axis=-1, _caller=lsspec.caller(fn, logits="lprobs", labels="target", smoothing="epsilon")
    )
    loss = smoothed_cross_entropy(
        lprobs, labels, smoothing=epsilon, convention=convention, **options
    )
    nll_loss = smoothed_cross_entropy(lprobs, labels, smoothing=0.0, **options)
    if not reduce and ignore_index is not None:
        return loss[..., None], nll_loss[..., None]
    return loss, nll_loss
