"""T5X's (and the Flax WMT example's) cross-entropy in PyTorch (twins: ``lsjax.compat.t5x``)."""

from __future__ import annotations

import torch

import lsspec
from lstorch import _common
from lstorch.smoothed import smoothed_cross_entropy
from lstorch.soft import soft_target_cross_entropy


def cross_entropy_with_logits(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``t5x.losses.cross_entropy_with_logits(logits, targets, z_loss)``, with T5X's gradient.

    ``loss = -sum_c targets_c (x_c - lse) + z_loss lse**2``, ``z_part = z_loss lse**2``; returns
    ``(loss, z_part)``. Backward is T5X's custom rule: ``g ((1 + 2 z_loss lse) softmax -
    targets)`` for the logits, ``-g log_softmax`` for the targets, the z-part's cotangent
    ignored. Forward mode (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``) is
    the transpose of that rule, so ``jacfwd`` equals ``jacrev`` and the z-part's tangent is 0.
    The value is ``lstorch.soft_target_cross_entropy(logits, targets, z_loss=z_loss,
    return_z_loss=True)`` (the vocabulary on the last axis); the ``1`` in the rule assumes that
    each row of ``targets`` sums to 1 (for other targets it is not the derivative of the loss;
    T5X does the same). ``z_loss`` gets no derivative, as in T5X's rule (a tensor that requires
    grad keeps ``.grad`` None, ``torch.func.grad`` gives 0; ``compute_weighted_cross_entropy``,
    which T5X differentiates by autodiff, gives ``sum lse**2``).
    """
    fn = "cross_entropy_with_logits"
    # Checked here (inside the autograd.Function the value is a tensor on the logits' device).
    z_value = _common.concrete_scalar(fn, "z_loss", z_loss)
    lsspec.check_z_loss(fn, z_value, from_log_probs=False, return_z_loss=True)
    z = _common.device_scalar(z_loss, _common.compute_dtype(logits.dtype), logits.device)
    function = _common.with_forward_mode(
        _CrossEntropyWithLogits, _CrossEntropyWithLogitsForwardMode
    )
    return function.apply(logits, targets, z)


class _CrossEntropyWithLogits(torch.autograd.Function):
    """T5X's custom gradient; ``setup_context`` and the generated vmap rule make it work under
    ``torch.func`` (grad, vjp, vmap) as well as plain autograd. The subclass
    ``_CrossEntropyWithLogitsForwardMode`` adds forward mode (``jvp``, ``jacfwd``, ``hessian``,
    ``torch.autograd.forward_ad``).

    Forward mode is the TRANSPOSE of T5X's backward rule, not the derivative of the
    forward's formula: ``d loss = sum_c ((1 + 2 z_loss lse) softmax_c - targets_c) d logits_c
    - sum_c log_softmax_c d targets_c`` and ``d z_part = 0`` (backward drops the z-part's
    cotangent). So ``jacfwd`` equals ``jacrev`` and every order of derivative is that of one rule.
    Where the targets of a row sum to 1 this is also the true derivative of the loss (the rule
    writes ``1`` for ``sum_c targets_c``); the z-part's true derivative, which T5X drops, is not.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, targets, z_loss):
        loss, z_part = soft_target_cross_entropy(
            logits,
            targets,
            z_loss=z_loss,
            return_z_loss=True,
            axis=-1,
            _caller=lsspec.caller("cross_entropy_with_logits"),
        )
        if _common.traced_functorch():  # Dynamo differentiates these ops, not ``backward``
            return _with_the_rule(logits, targets, z_loss, loss, z_part)
        return loss, z_part

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def _rule(ctx):
        """``(deriv, log_softmax)``: T5X's derivatives of the loss with respect to the logits
        and to the targets, in the compute dtype."""
        logits, targets, z_loss = ctx.saved_tensors
        x = logits.to(z_loss.dtype)
        log_softmax = torch.log_softmax(x, dim=-1)
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        deriv = (1.0 + 2.0 * z_loss * lse) * log_softmax.exp() - targets.to(z_loss.dtype)
        return deriv, log_softmax

    @staticmethod
    def backward(ctx, grad_loss, grad_z_part):
        del grad_z_part  # T5X drops the z-part's cotangent ("only used for logging").
        logits, targets, _ = ctx.saved_tensors
        deriv, log_softmax = _CrossEntropyWithLogits._rule(ctx)
        g = grad_loss.unsqueeze(-1)
        return (g * deriv).to(logits.dtype), (-g * log_softmax).to(targets.dtype), None


def _with_the_rule(logits, targets, z_loss, loss, z_part):
    """``(loss, z_part)`` of the same values, built so that differentiating their ops gives
    T5X's rule: where ``torch.compile`` traces a ``torch.func`` transform, Dynamo inlines the
    Function's ``forward`` and differentiates it by its ops, skipping ``backward``
    (``lstorch._common.traced_functorch``), which would give the true derivative instead.
    ``loss + (r - r.detach())`` with ``r = sum_c deriv_c logits_c - sum_c log_softmax_c
    targets_c`` (``deriv`` and ``log_softmax`` constants) has the loss's value and the rule's
    derivative; ``z_part`` is detached (the rule gives its cotangent nothing)."""
    x, t = logits.to(z_loss.dtype), targets.to(z_loss.dtype)
    log_softmax = torch.log_softmax(x.detach(), dim=-1)
    lse = torch.logsumexp(x.detach(), dim=-1, keepdim=True)
    deriv = (1.0 + 2.0 * z_loss.detach() * lse) * log_softmax.exp() - t.detach()
    rule = (deriv * x).sum(-1) - (log_softmax * t).sum(-1)
    zero = rule - rule.detach()  # 0 in value, the rule in derivative
    zero = torch.where(torch.isfinite(rule), zero, 0.0)  # an infinite row keeps its value
    return loss.detach() + zero, z_part.detach()


class _CrossEntropyWithLogitsForwardMode(_CrossEntropyWithLogits):
    """``_CrossEntropyWithLogits`` with ``jvp``, the transpose of its backward rule; Dynamo traces
    the class without it (see ``lstorch._common.with_forward_mode``)."""

    @staticmethod
    def jvp(ctx, logits_tangent, targets_tangent, z_loss_tangent):
        del z_loss_tangent  # backward gives z_loss no gradient; its transpose, no tangent
        deriv, log_softmax = _CrossEntropyWithLogits._rule(ctx)
        d_loss = torch.zeros_like(deriv[..., 0])
        if logits_tangent is not None:
            d_loss = d_loss + (deriv * logits_tangent.to(deriv.dtype)).sum(-1)
        if targets_tangent is not None:
            d_loss = d_loss - (log_softmax * targets_tangent.to(deriv.dtype)).sum(-1)
        return d_loss, torch.zeros_like(d_loss)


def compute_weighted_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    loss_normalizing_factor: float | None = None,
    *,
    check_labels: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``t5x.losses.compute_weighted_cross_entropy`` (the Flax WMT example's without z_loss).

    Per token ``smoothed_cross_entropy(logits, targets, smoothing=label_smoothing,
    convention="others", kl=True, z_loss=z_loss, return_z_loss=True)``; loss and z-loss times
    ``weights``, divided by ``loss_normalizing_factor``, summed. Returns ``(loss, z_loss,
    weight_sum)`` (``weight_sum = sum(weights)``, or the number of targets); the z-loss output
    carries no gradient (T5X ignores its cotangent). Differences: the targets' entropy (the
    normalizing constant of the KL form) is exact (``xlogy``), where T5X writes ``low * log(low +
    1e-20)`` (a shift below 1e-19 per token) and ``c * log(c)``, which is NaN at
    ``label_smoothing = 1``; here that case is finite. ``weights`` must have the targets' shape,
    and a concrete ``loss_normalizing_factor`` must be a finite number > 0 (T5X broadcasts
    weights of another shape and divides by any factor). Outputs are float32 for bf16 logits.
    ``check_labels`` is :func:`lstorch.smoothed_cross_entropy`'s: ``None`` checks the targets
    on the CPU only (on an accelerator, no host read-back: a target out of range gives a NaN
    row), ``True`` on any device, ``False`` never.
    """
    fn = "compute_weighted_cross_entropy"
    _common.tensors(fn, logits=logits, targets=targets)
    weights = _common.tensor_option(fn, "weights", weights, logits.device)
    factor = _common.concrete_scalar(
        fn, "loss_normalizing_factor", loss_normalizing_factor, optional=True,
        check_labels=check_labels,
    )  # fmt: skip
    lsspec.check_t5x_inputs(
        fn, tuple(logits.shape), tuple(targets.shape),
        None if weights is None else tuple(weights.shape), factor,
    )  # fmt: skip
    loss, z_part = smoothed_cross_entropy(
        logits,
        targets,
        smoothing=label_smoothing,
        convention="others",
        kl=True,
        z_loss=z_loss,
        return_z_loss=True,
        axis=-1,
        check_labels=check_labels,
        _caller=lsspec.caller(fn, labels="targets", smoothing="label_smoothing"),
    )
    z_part = z_part.detach()  # T5X's custom gradient ignores the z-loss output.
    # Filled on the device: torch.tensor(number, device="cuda") would copy it from pageable
    # host memory, making the host wait for the stream.
    weight_sum = torch.full((), float(targets.numel()), dtype=loss.dtype, device=loss.device)
    if weights is not None:
        weights = weights.to(loss.dtype)
        loss, z_part = loss * weights, z_part * weights
        weight_sum = weights.sum()
    if loss_normalizing_factor is not None:
        loss, z_part = loss / loss_normalizing_factor, z_part / loss_normalizing_factor
    return loss.sum(), z_part.sum(), weight_sum
