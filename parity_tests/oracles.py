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


def _allowed_log_softmax(x, allowed):
    """``(lse, log_softmax)`` over the last axis and the allowed classes (-inf on the others),
    as ``(x - max) - log_sum``: at ``|x| ~ 3e38`` even a float64 lse would drop ``log 2``."""
    allowed_x = np.where(allowed, x, -np.inf)
    peak = allowed_x.max(-1, keepdims=True)
    log_sum = np.log(np.exp(allowed_x - peak).sum(-1, keepdims=True))
    log_probs = np.where(allowed, (x - peak) - log_sum, -np.inf)
    return (peak + log_sum)[..., 0], log_probs


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
    class_mask=None,
    z_loss=0.0,
    return_z_loss=False,
    softcap=None,
    logit_scale=1.0,
    return_stats=False,
):
    """SEMANTICS §1-§5 with a dense target ``t_c = (1-eps) w_y [c=y] + eps w_c u_c``.

    A ``class_mask`` removes classes from the support and from the softmax (their log-prob is
    -inf and their target 0; SEMANTICS §7). ``z_loss`` adds ``z * lse**2`` per counted row, with
    gradient ``2 z lse softmax``; ``return_z_loss`` returns ``(loss, z_part)``.

    ``softcap``/``logit_scale``: the logits are first transformed, ``t = cap tanh(s x / cap)``
    (``s x`` without a cap), and everything above is taken on ``t``; the gradient is the chain
    rule, ``dt/dx = s (1 - tanh(s x / cap)**2)`` times the gradient for ``t``.
    ``return_stats`` appends per row ``(lse, entropy, correct)`` of ``t``: ``-sum p log p`` of
    its softmax and ``argmax(t) == label`` (NumPy's argmax: the first maximal index), 0, 0 and
    False on rows that do not count; they take no cotangent.
    """
    raw = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
    x, slope = raw, 1.0
    if logit_scale != 1.0 or softcap is not None:
        scaled = logit_scale * raw
        x, slope = scaled, np.full(raw.shape, float(logit_scale))
        if softcap is not None:
            x = softcap * np.tanh(scaled / softcap)
            slope = logit_scale * (1.0 - np.tanh(scaled / softcap) ** 2)
    labels = np.asarray(labels).astype(np.int64)  # the values, whatever their dtype
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
    allowed = np.ones(num_classes, bool) if class_mask is None else np.asarray(class_mask, bool)
    support = np.broadcast_to(allowed, x.shape).copy()
    if convention in ("others", "others_but_pad"):
        support &= ~onehot
    if convention == "others_but_pad":
        support[..., pad_index] = False
    uniform = support / support.sum(axis=-1, keepdims=True)  # u: uniform over the support
    q = (1 - eps) * onehot + eps * uniform  # the smoothed target distribution
    t = w[safe_labels][..., None] * (1 - eps) * onehot + eps * w * uniform  # weighted target

    safe_x = np.where(counted[..., None] & allowed, x, 0.0)
    if from_log_probs:
        log_probs = safe_x
    else:  # log-softmax over the allowed classes; -inf on the masked ones
        lse, log_probs = _allowed_log_softmax(safe_x, allowed)
    # 0 for the -inf of the classes t skips (a NaN stays: it is the row's loss)
    finite_log_probs = np.where(np.isneginf(log_probs), 0.0, log_probs)
    rows = -(t * finite_log_probs).sum(axis=-1)
    # -log 0 = inf: a class the target weighs, with a log-probability of -inf, makes the row inf
    rows = np.where(((t > 0) & np.isneginf(log_probs)).any(axis=-1), np.inf, rows)
    if kl:
        rows = rows + _xlogx(q).sum(axis=-1)
    if from_log_probs:
        grad_rows = -t
    else:
        grad_rows = t.sum(axis=-1, keepdims=True) * np.exp(log_probs) - t
    z_rows = np.zeros(rows.shape)
    z_grad_rows = np.zeros(grad_rows.shape)
    if z_loss or return_z_loss:
        z_rows = z_loss * lse**2
        z_grad_rows = 2 * z_loss * lse[..., None] * np.exp(log_probs)
        rows, grad_rows = rows + z_rows, grad_rows + z_grad_rows
    keep = counted[..., None]
    grad_rows = grad_rows * np.where(keep, slope, 0.0)  # the chain rule through the transform
    z_grad_rows = z_grad_rows * np.where(keep, slope, 0.0)
    denominators = np.where(counted, w[safe_labels], 0.0)
    reduced = [
        _reduce(
            np.where(counted, value, 0.0),
            np.where(keep, grad, 0.0),
            denominators,
            reduction,
            normalizer,
            axis % np.ndim(logits),
            np.ndim(logits),
        )
        for value, grad in ((rows, grad_rows), (z_rows, z_grad_rows))
    ]
    if return_stats:
        probs = np.exp(log_probs)
        entropy = -np.where(probs > 0, probs * finite_log_probs, 0.0).sum(axis=-1)
        correct = np.argmax(np.where(allowed, x, -np.inf), axis=-1) == safe_labels
        stats = (np.where(counted, lse, 0.0), np.where(counted, entropy, 0.0), counted & correct)
        (loss, loss_vjp), (z_part, z_vjp) = reduced
        if not return_z_loss:
            return (loss, stats), lambda cots: loss_vjp(cots[0])
        return (loss, z_part, stats), lambda cots: loss_vjp(cots[0]) + z_vjp(cots[1])
    if not return_z_loss:
        return reduced[0]
    (loss, loss_vjp), (z_part, z_vjp) = reduced
    return (loss, z_part), lambda cots: loss_vjp(cots[0]) + z_vjp(cots[1])


def smoothed_cross_entropy_option_derivatives(
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
    class_mask=None,
    z_loss=0.0,
):
    """``(d loss / d smoothing, d loss / d z_loss)`` of :func:`smoothed_cross_entropy`, reduced
    like the loss (per row for ``"none"``), from the same dense target.

    The weighted target ``t = (1 - eps) w_y onehot + eps w u`` is linear in ``eps``, so
    ``d row / d eps = -sum_c (w_c u_c - w_y onehot_c) log p_c``; the KL constant
    ``sum_c q_c log q_c`` adds ``sum_c (u_c - onehot_c) log q_c`` (the ``+1`` of ``d(q log q)``
    sums to 0), whose terms with ``q_c = 0`` are the one-sided limits: ``-inf`` at ``eps = 0``
    (the support's ``log 0``) and ``+inf`` at ``eps = 1`` when the target leaves the support
    (``"others"``, ``"others_but_pad"``). ``d row / d z = lse**2``. Rows that do not count: 0.
    """
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
    allowed = np.ones(num_classes, bool) if class_mask is None else np.asarray(class_mask, bool)
    support = np.broadcast_to(allowed, x.shape).copy()
    if convention in ("others", "others_but_pad"):
        support &= ~onehot
    if convention == "others_but_pad":
        support[..., pad_index] = False
    uniform = support / support.sum(axis=-1, keepdims=True)
    safe_x = np.where(counted[..., None] & allowed, x, 0.0)
    lse = np.zeros(labels.shape)
    if from_log_probs:
        log_probs = safe_x
    else:
        lse, log_probs = _allowed_log_softmax(safe_x, allowed)
    target_slope = w * uniform - w[safe_labels][..., None] * onehot  # d t / d eps
    # a class the slope skips adds 0 (its log-prob may be -inf); a -inf it weighs adds inf
    with np.errstate(invalid="ignore"):
        slope_terms = np.where(target_slope == 0, 0.0, target_slope * log_probs)
    eps_rows = -slope_terms.sum(axis=-1)
    if kl:
        q = (1 - eps) * onehot + eps * uniform
        q_slope = uniform - onehot  # d q / d eps
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(q_slope == 0, 0.0, q_slope * np.log(q))
        eps_rows = eps_rows + terms.sum(axis=-1)
    z_rows = lse**2
    denominators = np.where(counted, w[safe_labels], 0.0)
    no_gradient = np.zeros(x.shape)
    return tuple(
        _reduce(
            np.where(counted, rows, 0.0),
            no_gradient,
            denominators,
            reduction,
            normalizer,
            axis % np.ndim(logits),
            np.ndim(logits),
        )[0]
        for rows in (eps_rows, z_rows)
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


def forum_label_smoothing_loss(pred, target, *, classes, smoothing=0.0, dim=-1):
    """The forum's ``LabelSmoothingLoss(classes, smoothing, dim)``, read line by line.

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


def opennmt_kl_label_smoothing_loss(
    output, target, *, label_smoothing, tgt_vocab_size, ignore_index=-100
):
    """OpenNMT-py's KL ``LabelSmoothingLoss``, read line by line (class axis last, log-probs in).

    ``one_hot`` = ``eps / (V - 2)`` with 0 at the pad column; the target gets ``1 - eps``; pad
    rows are zeroed; ``F.kl_div(output, q, 'sum') = sum_{q > 0} q (log q - output)``. For a
    negative ``ignore_index`` the project's documented deviation applies (no column excluded,
    ``eps / (V - 1)``): OpenNMT's own value there is a bug (SEMANTICS §3).
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


def sigmoid_binary_cross_entropy(
    logits, labels, *, smoothing=0.0, pos_weight=None, reduction="none"
):
    """``-[pw y' log s + (1 - y') log(1 - s)]``, ``y' = y (1 - eps) + eps/2``, ``s = sigmoid(x)``.

    ``log s = -log(1 + exp(-x))`` and ``log(1 - s) = -log(1 + exp(x))`` via ``np.logaddexp``;
    the gradient is the textbook ``pw y' (s - 1) + (1 - y') s``.
    """
    x = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64) * (1 - smoothing) + smoothing / 2
    pw = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
    sig = 1.0 / (1.0 + np.exp(-x))
    loss = pw * y * np.logaddexp(0.0, -x) + (1 - y) * np.logaddexp(0.0, x)
    grad = pw * y * (sig - 1) + (1 - y) * sig
    if reduction == "none":
        return loss, lambda cot: np.asarray(cot) * grad
    scale = 1.0 if reduction == "sum" else 1.0 / loss.size
    return loss.sum() * scale, lambda cot: float(cot) * scale * grad


def fairseq_label_smoothed_nll_loss(
    lprobs, target, epsilon, ignore_index=None, reduce=True, *, pre_2021=False
):
    """fairseq's function read line by line (SEMANTICS §6), dense; returns (loss, nll_loss)."""
    lp = np.asarray(lprobs, np.float64)
    target = np.asarray(target)
    trailing = target.ndim == lp.ndim
    labels = target[..., 0] if trailing else target
    vocab = lp.shape[-1]
    ignored = np.zeros(labels.shape, bool) if ignore_index is None else labels == ignore_index
    safe = np.where(ignored, 0, labels)
    onehot = (np.arange(vocab) == safe[..., None]).astype(np.float64)
    nll = np.where(ignored, 0.0, -np.take_along_axis(lp, safe[..., None], -1)[..., 0])
    smooth = np.where(ignored, 0.0, -lp.sum(-1))
    if pre_2021:
        eps_i = epsilon / vocab
        loss = (1 - epsilon) * nll + eps_i * smooth
        d_loss = -((1 - epsilon) * onehot + eps_i)
    else:
        eps_i = epsilon / (vocab - 1)
        loss = (1 - epsilon - eps_i) * nll + eps_i * smooth
        d_loss = -((1 - epsilon - eps_i) * onehot + eps_i)
    keep = ~ignored[..., None]
    d_loss, d_nll = np.where(keep, d_loss, 0.0), np.where(keep, -onehot, 0.0)
    if reduce:
        outputs = (loss.sum(), nll.sum())
        return outputs, lambda cots: float(cots[0]) * d_loss + float(cots[1]) * d_nll
    if ignore_index is not None:  # fairseq keeps the gathered (..., 1) shape here
        loss, nll = loss[..., None], nll[..., None]
    return (
        (loss, nll),
        lambda cots: (
            np.reshape(cots[0], labels.shape)[..., None] * d_loss
            + np.reshape(cots[1], labels.shape)[..., None] * d_nll
        ),
    )


def t5x_cross_entropy_with_logits(logits, targets, z_loss):
    """T5X's function and its CUSTOM gradient (not the derivative when rows of ``targets`` do
    not sum to 1, and blind to the z-part's cotangent): ``g ((1 + 2 z lse) p - t)``."""
    x = np.asarray(logits, np.float64)
    t = np.asarray(targets, np.float64)
    log_probs = _log_softmax(x)
    lse = (x - log_probs)[..., 0]
    z_part = z_loss * lse**2
    loss = -(t * log_probs).sum(-1) + z_part
    deriv = (1 + 2 * z_loss * lse)[..., None] * np.exp(log_probs) - t
    return (loss, z_part), lambda cots: np.asarray(cots[0])[..., None] * deriv


def t5x_compute_weighted_cross_entropy(
    logits, targets, weights=None, label_smoothing=0.0, z_loss=0.0, loss_normalizing_factor=None
):
    """T5X's ``compute_weighted_cross_entropy`` read line by line, with a dense one-hot soft
    target and T5X's own ``normalizing_constant`` (``xlogy`` for ``c log c``, SEMANTICS §2)."""
    x = np.asarray(logits, np.float64)
    targets = np.asarray(targets)
    vocab = x.shape[-1]
    confidence = 1.0 - label_smoothing
    low = (1.0 - confidence) / (vocab - 1)
    normalizing_constant = -(_xlogx(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    soft = np.where(np.arange(vocab) == targets[..., None], confidence, low)
    (loss, z_part), vjp = t5x_cross_entropy_with_logits(x, soft, z_loss)
    loss = loss - normalizing_constant
    scale = np.ones(targets.shape)
    weight_sum = float(targets.size)
    if weights is not None:
        scale = np.asarray(weights, np.float64)
        weight_sum = scale.sum()
    if loss_normalizing_factor is not None:
        scale = scale / loss_normalizing_factor
    outputs = ((loss * scale).sum(), (z_part * scale).sum(), np.float64(weight_sum))
    return outputs, lambda cots: vjp([float(cots[0]) * scale, None])


def hf_label_smoother(logits, labels, *, epsilon=0.1, ignore_index=-100, shift_labels=False):
    """The Trainer's ``LabelSmoother`` read line by line (SEMANTICS §6), dense."""
    x = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if shift_labels:
        x, labels = x[..., :-1, :], labels[..., 1:]
    if labels.ndim == x.ndim:
        labels = labels[..., 0]
    vocab = x.shape[-1]
    padding = labels == ignore_index
    clamped = np.maximum(labels, 0)
    log_probs = _log_softmax(x)
    nll = np.where(padding, 0.0, -np.take_along_axis(log_probs, clamped[..., None], -1)[..., 0])
    smooth = np.where(padding, 0.0, -log_probs.sum(-1))
    active = padding.size - padding.sum()
    value = (1 - epsilon) * nll.sum() / active + epsilon * smooth.sum() / (active * vocab)
    q = (1 - epsilon) * (np.arange(vocab) == clamped[..., None]) + epsilon / vocab
    grad = np.where(padding[..., None], 0.0, np.exp(log_probs) - q) / active

    def vjp(cot):
        full = float(cot) * grad
        if shift_labels:  # the dropped last position gets no gradient
            pad = [(0, 0)] * (full.ndim - 2) + [(0, 1), (0, 0)]
            full = np.pad(full, pad)
        return full

    return value, vjp


def keras_categorical_crossentropy(
    y_pred, y_true, *, from_logits=False, label_smoothing=0.0, axis=-1
):
    """Keras 3's function (``y_pred`` first here, the differentiated input); dense.

    ``t = y_true (1 - eps) + eps / K``; ``-sum t log p`` with ``p`` the softmax of logits, or
    Keras's ``clip(y_pred / sum(y_pred), 1e-7, 1 - 1e-7)`` (the clip passes no gradient).
    """
    num_classes = np.shape(y_true)[-1]  # Keras's own choice, whatever ``axis`` is
    p_in = np.moveaxis(np.asarray(y_pred, np.float64), axis, -1)
    t = np.moveaxis(np.asarray(y_true, np.float64), axis, -1)
    t = t * (1 - label_smoothing) + label_smoothing / num_classes
    if from_logits:
        log_probs = _log_softmax(p_in)
        grad = t.sum(-1, keepdims=True) * np.exp(log_probs) - t
    else:
        total = p_in.sum(-1, keepdims=True)
        q = p_in / total
        clipped = np.clip(q, 1e-7, 1 - 1e-7)
        log_probs = np.log(clipped)
        free = (q > 1e-7) & (q < 1 - 1e-7)
        # d/dp_j of -sum_c t_c log q_c over unclipped c, with dq_c/dp_j = (δ_cj - q_c) / total
        grad = ((t * free).sum(-1, keepdims=True) - np.where(free, t / q, 0.0)) / total
    rows = -(t * log_probs).sum(-1)
    return rows, lambda cot: np.moveaxis(np.asarray(cot)[..., None] * grad, -1, axis)


def keras_binary_crossentropy(y_pred, y_true, *, from_logits=False, label_smoothing=0.0, axis=-1):
    """Keras 3's function (``y_pred`` first here): mean over ``axis`` of the elementwise
    ``-[y' log p + (1 - y') log(1 - p)]``, ``y' = y (1 - eps) + eps/2``."""
    z = np.asarray(y_pred, np.float64)
    y = np.asarray(y_true, np.float64) * (1 - label_smoothing) + label_smoothing / 2
    count = z.shape[axis]
    if from_logits:
        elementwise = y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z)
        grad = 1.0 / (1.0 + np.exp(-z)) - y
    else:
        p = np.clip(z, 1e-7, 1 - 1e-7)
        elementwise = -(y * np.log(p) + (1 - y) * np.log(1 - p))
        free = (z > 1e-7) & (z < 1 - 1e-7)
        grad = np.where(free, -y / p + (1 - y) / (1 - p), 0.0)
    value = elementwise.mean(axis=axis)
    return value, lambda cot: np.expand_dims(np.asarray(cot), axis) * grad / count


def megatron_cross_entropy(logits, target, label_smoothing=0.0):
    """Megatron-core's ``vocab_parallel_cross_entropy`` at tensor-parallel size 1, read from
    ``megatron/core/tensor_parallel/cross_entropy.py``: ``s = eps V / (V - 1)``, ``loss = (1 -
    s) nll - s mean_c lp_c`` per token, and its backward ``softmax - (1 - s) onehot(y) - s / V``;
    dense, on the whole vocabulary."""
    x = np.asarray(logits, np.float64)
    target = np.asarray(target)
    vocab = x.shape[-1]
    log_probs = _log_softmax(x)
    onehot = np.arange(vocab) == target[..., None]
    nll = -np.take_along_axis(log_probs, target[..., None], -1)[..., 0]
    smoothing = label_smoothing * vocab / (vocab - 1)
    rows = (1 - smoothing) * nll - smoothing * log_probs.mean(-1)
    grad = np.exp(log_probs) - (1 - smoothing) * onehot - smoothing / vocab
    return rows, lambda cot: np.asarray(cot)[..., None] * grad


def timm_label_smoothing_cross_entropy(x, target, *, smoothing=0.1):
    """timm: ``mean_rows((1 - s) nll + s * (-mean_c lp))``, dense."""
    x = np.asarray(x, np.float64)
    target = np.asarray(target)
    num_classes = x.shape[-1]
    log_probs = _log_softmax(x)
    nll = -np.take_along_axis(log_probs, target[..., None], -1)[..., 0]
    rows = (1 - smoothing) * nll + smoothing * -log_probs.mean(-1)
    q = (1 - smoothing) * (np.arange(num_classes) == target[..., None]) + smoothing / num_classes
    grad = (np.exp(log_probs) - q) / rows.size
    return rows.mean(), lambda cot: float(cot) * grad


def timm_soft_target_cross_entropy(x, target):
    """timm: ``mean_rows(-sum_c t_c log_softmax(x)_c)``, dense."""
    x = np.asarray(x, np.float64)
    t = np.asarray(target, np.float64)
    log_probs = _log_softmax(x)
    rows = -(t * log_probs).sum(-1)
    grad = (t.sum(-1, keepdims=True) * np.exp(log_probs) - t) / rows.size
    return rows.mean(), lambda cot: float(cot) * grad


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
    class_weight=None,
    where=None,
    normalizer=None,
    kl=False,
    class_mask=None,
    z_loss=0.0,
    return_z_loss=False,
    softcap=None,
    logit_scale=1.0,
    return_stats=False,
    chunk_size=None,
    wrt="hidden",
):
    """The dense route in float64: ``smoothed_cross_entropy(hidden @ weight.T + bias, ...)``,
    the class weights ``class_weight`` handed on as the dense loss's ``weight``.

    The logits' gradient ``G`` (rows x V, from the dense oracle above) is carried back through
    the linear layer by the chain rule: ``d hidden = G @ weight``, ``d weight = G.T @ hidden``,
    ``d bias = sum_rows G``; ``wrt`` names which one the vjp returns (a tuple of names: each
    of them, in that order). ``chunk_size`` is an
    implementation detail of the fused losses and changes nothing here. With
    ``return_z_loss=True`` the output is ``(loss, z_part)`` and the vjp takes a pair.
    ``softcap``/``logit_scale`` transform the materialised logits and ``return_stats`` appends
    the per-row ``(lse, entropy, correct)`` (the labels' shape), as the dense oracle does; the
    vjp then takes a tuple like the output and reads the cotangents before the statistics.
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
        weight=class_weight,
        where=None if where is None else np.asarray(where).reshape(-1),
        reduction=reduction,
        normalizer=normalizer,
        kl=kl,
        class_mask=class_mask,
        z_loss=z_loss,
        return_z_loss=return_z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        return_stats=return_stats,
    )
    stats = None
    if return_stats:  # the statistics take no cotangent
        *output, stats = output
        output = tuple(output) if return_z_loss else output[0]
        stats = tuple(value.reshape(np.shape(labels)) for value in stats)
        dense_vjp = logits_vjp

        def logits_vjp(cotangent):
            return dense_vjp(cotangent if return_z_loss else (cotangent,))

    if reduction == "none":
        output = (
            tuple(part.reshape(np.shape(labels)) for part in output)
            if return_z_loss
            else (output.reshape(np.shape(labels)))
        )

    def flat_cotangent(cotangent):
        if reduction != "none":
            return cotangent
        return np.asarray(cotangent).reshape(-1)

    def vjp(cotangent):
        if return_z_loss:
            cotangent = tuple(flat_cotangent(part) for part in cotangent)
        else:
            cotangent = flat_cotangent(cotangent)
        grad_logits = logits_vjp(cotangent)
        if isinstance(wrt, tuple):  # several at once, from one dense gradient
            return tuple(pull(grad_logits, name) for name in wrt)
        return pull(grad_logits, wrt)

    def pull(grad_logits, wrt):
        if wrt == "hidden":
            return (grad_logits @ weight).reshape(hidden.shape)
        if wrt == "weight":
            return grad_logits.T @ flat
        return grad_logits.sum(axis=0)

    if stats is not None:  # the vjp takes a tuple like the output's, as the dense oracle's
        outputs = (*(output if return_z_loss else (output,)), stats)
        return outputs, lambda cots: vjp(tuple(cots[:2]) if return_z_loss else cots[0])
    return output, vjp
