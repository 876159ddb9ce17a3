"""Float64 NumPy oracles written straight from SEMANTICS.md, independent of lsjax and lstorch.

Unlike the libraries, an oracle builds the smoothed target ``q`` (or ``t``) as a dense rows x K
array, exactly as the definitions read, and takes ``-sum_c t_c * log_softmax(x)_c``. Each oracle
returns ``(output, vjp)``: the output and a function mapping an upstream cotangent of the output
to the gradient with respect to the first input. The per-row gradient is the dense
``A * softmax(x) - t`` (``-t`` for log-probability inputs); ``tests/test_oracles.py`` checks it
against central finite differences, so it is not taken on faith either.
"""

from __future__ import annotations

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _xlogx(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    return np.where(value > 0, value * np.log(np.where(value > 0, value, 1.0)), 0.0)


def _reduce(
    rows: np.ndarray,
    grad_rows: np.ndarray,
    denominators: np.ndarray,
    reduction: str,
    normalizer,
    axis: int,
    ndim: int,
):
    """Apply a reduction to per-row losses and return (output, vjp)."""

    def unmove(grad):  # (..., K) with the class axis last -> the input's layout.
        return np.moveaxis(grad, -1, axis)

    if reduction == "none":
        return rows, lambda cot: unmove(np.asarray(cot)[..., None] * grad_rows)
    total = rows.sum()
    if reduction == "sum":
        return total, lambda cot: unmove(float(cot) * grad_rows)
    denominator = denominators.sum() if normalizer is None else float(normalizer)
    if denominator == 0:  # The project's documented choice: 0 and a zero gradient.
        return np.float64(0.0), lambda cot: unmove(np.zeros_like(grad_rows))
    return total / denominator, lambda cot: unmove(float(cot) / denominator * grad_rows)


def smoothed_cross_entropy(
    logits,
    labels,
    *,
    smoothing=0.0,
    convention="uniform",
    ignore_index=None,
    pad_index=None,
    weight=None,
    where=None,
    axis=-1,
    reduction="none",
    normalizer=None,
    kl=False,
    from_log_probs=False,
):
    """SEMANTICS §1-§5 with a dense target ``t_c = (1-eps) w_y [c=y] + eps w_c u_c``."""
    x = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
    labels = np.asarray(labels)
    num_classes = x.shape[-1]
    eps = float(smoothing)
    w = np.ones(num_classes) if weight is None else np.asarray(weight, np.float64)

    counted = np.ones(labels.shape, bool)
    if ignore_index is not None:
        counted &= labels != ignore_index
    if pad_index is not None:
        counted &= labels != pad_index
    if where is not None:
        counted &= np.asarray(where, bool)
    safe_labels = np.where(counted, labels, 0)

    onehot = np.arange(num_classes) == safe_labels[..., None]
    support = np.ones(x.shape, bool)
    if convention in ("others", "others_but_pad"):
        support &= ~onehot
    if convention == "others_but_pad":
        support[..., pad_index] = False
    uniform = support / support.sum(axis=-1, keepdims=True)  # u: uniform over the support
    q = (1 - eps) * onehot + eps * uniform  # the smoothed target distribution
    t = w[safe_labels][..., None] * (1 - eps) * onehot + eps * w * uniform  # weighted target

    safe_x = np.where(counted[..., None], x, 0.0)
    log_probs = safe_x if from_log_probs else _log_softmax(safe_x)
    rows = -(t * log_probs).sum(axis=-1)
    if kl:
        rows = rows + _xlogx(q).sum(axis=-1)
    if from_log_probs:
        grad_rows = -t
    else:
        grad_rows = t.sum(axis=-1, keepdims=True) * np.exp(log_probs) - t
    rows = np.where(counted, rows, 0.0)
    grad_rows = np.where(counted[..., None], grad_rows, 0.0)
    denominators = np.where(counted, w[safe_labels], 0.0)
    return _reduce(
        rows,
        grad_rows,
        denominators,
        reduction,
        normalizer,
        axis % np.ndim(logits),
        np.ndim(logits),
    )


def soft_target_cross_entropy(
    logits, targets, *, smoothing=0.0, weight=None, where=None, axis=-1, reduction="none"
):
    """``-sum_c w_c t'_c log_softmax(x)_c`` with ``t' = (1 - eps) t + eps / K`` (dense)."""
    x = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
    targets = np.moveaxis(np.asarray(targets, np.float64), axis, -1)
    num_classes = x.shape[-1]
    w = np.ones(num_classes) if weight is None else np.asarray(weight, np.float64)
    counted = np.ones(x.shape[:-1], bool) if where is None else np.asarray(where, bool)
    t = w * ((1 - smoothing) * targets + smoothing / num_classes)
    safe_x = np.where(counted[..., None], x, 0.0)
    log_probs = _log_softmax(safe_x)
    rows = np.where(counted, -(t * log_probs).sum(axis=-1), 0.0)
    grad_rows = t.sum(axis=-1, keepdims=True) * np.exp(log_probs) - t
    grad_rows = np.where(counted[..., None], grad_rows, 0.0)
    return _reduce(
        rows,
        grad_rows,
        counted.astype(np.float64),
        reduction,
        None,
        axis % np.ndim(logits),
        np.ndim(logits),
    )


def torch_cross_entropy(
    input,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
):
    """``torch.nn.functional.cross_entropy`` as SEMANTICS §4 states it (class axis 1)."""
    class_axis = 0 if np.ndim(input) == 1 else 1
    if np.issubdtype(np.asarray(target).dtype, np.floating):
        return soft_target_cross_entropy(
            input,
            target,
            smoothing=label_smoothing,
            weight=weight,
            axis=class_axis,
            reduction=reduction,
        )
    return smoothed_cross_entropy(
        input,
        target,
        smoothing=label_smoothing,
        ignore_index=ignore_index,
        weight=weight,
        axis=class_axis,
        reduction=reduction,
    )


def seed_label_smoothing_loss(pred, target, *, classes, smoothing=0.0, dim=-1):
    """The seed's ``LabelSmoothingLoss(classes, smoothing, dim)``, read line by line.

    ``true_dist`` = ``smoothing / (classes - 1)`` everywhere, ``1 - smoothing`` at the target;
    ``mean(sum(-true_dist * log_softmax(pred), dim))``.
    """
    x = np.moveaxis(np.asarray(pred, np.float64), dim, -1)
    target = np.asarray(target)
    true_dist = np.full(x.shape, smoothing / (classes - 1))
    np.put_along_axis(true_dist, target[..., None], 1.0 - smoothing, axis=-1)
    log_probs = _log_softmax(x)
    rows = -(true_dist * log_probs).sum(axis=-1)
    grad_rows = np.exp(log_probs) - true_dist
    count = rows.size
    return rows.mean(), lambda cot: np.moveaxis(float(cot) / count * grad_rows, -1, dim)


def seed_kl_label_smoothing_loss(
    output, target, *, label_smoothing, tgt_vocab_size, ignore_index=-100
):
    """The seed's OpenNMT-style module, read line by line (class axis last, log-probs in).

    ``one_hot`` = ``eps / (V - 2)`` with 0 at the pad column; the target gets ``1 - eps``; pad
    rows are zeroed; ``F.kl_div(output, q, 'sum') = sum_{q > 0} q (log q - output)``. For a
    negative ``ignore_index`` the project's documented deviation applies (no column excluded,
    ``eps / (V - 1)``): the seed's own value there is a bug (SEMANTICS §3).
    """
    x = np.asarray(output, np.float64)
    target = np.asarray(target)
    if ignore_index >= 0:
        one_hot = np.full(tgt_vocab_size, label_smoothing / (tgt_vocab_size - 2))
        one_hot[ignore_index] = 0.0
    else:
        one_hot = np.full(tgt_vocab_size, label_smoothing / (tgt_vocab_size - 1))
    q = np.broadcast_to(one_hot, x.shape).copy()
    np.put_along_axis(
        q, np.where(target == ignore_index, 0, target)[..., None], 1.0 - label_smoothing, axis=-1
    )
    q[target == ignore_index] = 0.0
    total = (_xlogx(q) - np.where(q > 0, q * x, 0.0)).sum()
    return total, lambda cot: float(cot) * -q


def fused_linear_smoothed_cross_entropy(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    smoothing=0.0,
    convention="uniform",
    ignore_index=None,
    pad_index=None,
    reduction="mean",
    chunk_size=None,
    wrt="hidden",
):
    """The dense route in float64: ``smoothed_cross_entropy(hidden @ weight.T + bias, ...)``.

    The logits' gradient ``G`` (rows x V, from the dense oracle above) is carried back through
    the linear layer by the chain rule: ``d hidden = G @ weight``, ``d weight = G.T @ hidden``,
    ``d bias = sum_rows G``; ``wrt`` names which one the vjp returns. ``chunk_size`` is an
    implementation detail of the fused losses and changes nothing here.
    """
    del chunk_size
    hidden = np.asarray(hidden, np.float64)
    weight = np.asarray(weight, np.float64)
    flat = hidden.reshape(-1, hidden.shape[-1])
    bias_values = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, np.float64)
    logits = flat @ weight.T + bias_values
    output, logits_vjp = smoothed_cross_entropy(
        logits,
        np.asarray(labels).reshape(-1),
        smoothing=smoothing,
        convention=convention,
        ignore_index=ignore_index,
        pad_index=pad_index,
        reduction=reduction,
    )
    if reduction == "none":
        output = output.reshape(np.shape(labels))

    def vjp(cotangent):
        grad_logits = logits_vjp(
            np.asarray(cotangent).reshape(np.shape(output.reshape(-1)))
            if reduction == "none"
            else cotangent
        )
        if wrt == "hidden":
            return (grad_logits @ weight).reshape(hidden.shape)
        if wrt == "weight":
            return grad_logits.T @ flat
        return grad_logits.sum(axis=0)

    return output, vjp
