"""Triton kernels for the core of ``lstorch.smoothed_cross_entropy`` on CUDA: two passes over the
logits in forward+backward and nothing else of rows x K size.

* Forward (:func:`forward`): ONE read of the logits per row, giving the row's
  ``lse = peak + log sum_c exp(x_c - peak)`` (online: running max and rescaled sum, as in flash
  attention) and ``sum_c u_c (x_c - peak)`` (``u`` the class weights times the class mask, or
  1; rescaled as the running max moves); then, per row, the closed form of
  ``lstorch.smoothed._row_loss_forward`` (the same terms in the same order):
  ``(1 - eps) w_y (lse - x_y) + eps (W lse - sum_{c in S} u_c x_c) / |S|`` + the KL constant +
  ``z lse^2``, written relative to the peak so that logits near the float32 maximum give the
  finite loss they have.
* Backward (:func:`backward`): ONE read of the logits and ONE write of the gradient,
  ``grad_c = a exp((x_c - peak) - log_sum) - b u_c + [c = y] cy + [c = pad] cp``, the
  per-row ``a, b, cy, cp`` of ``lstorch.smoothed._row_loss_gradient`` computed in the kernel's
  prologue, accumulated in float32 and rounded once to the logits' dtype. The output may be the
  logits' own storage (``inplace_backward``): each element is read before it is written, by
  the same program.

In both, rows that do not count are written as exact zeros (whatever their logits hold: NaN and
inf there do not leak), and counted rows with a label out of range or masked, or any row under a
smoothing outside [0, 1], as NaN. The per-row work is in the kernels rather than in torch ops
because on a GPU each of the ~150 small torch ops costs a launch: they made a ~4 ms floor per call
at 8192 rows, more than the kernels' own time (benchmarks/RESULTS.md). The scalars (eps, |S|,
sum_c u_c, u_pad, z, the KL constant) come in one small device tensor, so nothing is read back to
the host.

Those three passes are the bandwidth floor of a label-smoothed cross-entropy that returns the
gradient of its logits (read the logits in forward, read them again and write the gradient in
backward); ``benchmarks/bench_gpu.py`` measures how close the kernels come to it.

The kernels are used for CUDA tensors, in eager mode and inside ``torch.compile`` (where the
compiled graph calls them as the operators ``torch.ops.lstorch.smoothed_rows*`` defined at the
end of this module), outside ``torch.func`` transforms, and never for float64 or log-probability
inputs. This module is imported lazily, so lstorch works without Triton. On a machine without a
GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests them
(``tests/triton_checks.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import lsspec


def _config(num_classes: int, kernel: str) -> tuple[int, int]:
    """(BLOCK, num_warps) of ``kernel`` ("forward" or "backward"): blocks of at most 8192
    columns, so a 128k-class row takes 16 steps while small-K rows are not padded out to a huge
    block; 4 warps for the reduction, 16 for the elementwise gradient. On an H200 at
    8192 x 131072 bf16 these were the fastest, or within 10% of it, of BLOCK 2048-32768 x 4-32
    warps (``benchmarks/bench_gpu.py --sweep``; benchmarks/RESULTS.md)."""
    block = min(8192, triton.next_power_of_2(max(num_classes, 16)))
    if kernel == "forward":
        return block, 4
    return block, 16 if block >= 8192 else (8 if block >= 2048 else 4)


# Layout of the ``params`` vector (float32, on the device).
EPS, SIZE, TOTAL_WEIGHT, PAD_WEIGHT, Z, KL_CONSTANT = (tl.constexpr(i) for i in range(6))
CONVENTIONS = {"uniform": 0, "others": 1, "others_but_pad": 2}


@triton.jit
def _tanh(v):
    """tanh in float32 from ``exp`` (Triton's interpreter has no libdevice): ``(1 - e) / (1 +
    e)`` with ``e = exp(-2|v|)``, whose ``1 - e`` cancels near 0, so below 0.125 its Taylor
    series to ``v**9`` (the next term is 1e-11 of the value there)."""
    a = tl.abs(v)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    s = v * v
    series = -17.0 / 315.0 + s * (62.0 / 2835.0)
    near = a * (1.0 + s * (-1.0 / 3.0 + s * (2.0 / 15.0 + s * series)))
    magnitude = tl.where(a < 0.125, near, far)
    return tl.where(v < 0, -magnitude, magnitude)


@triton.jit
def _transformed(x, scale, cap, HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr):
    """``t = cap * tanh(scale * x / cap)`` (softcap, logit scale), in registers."""
    if HAS_SCALE:
        x = x * scale
    if HAS_CAP:
        x = cap * _tanh(x / cap)
    return x


@triton.jit
def _row_setup(label_ptr, counted_ptr, params_ptr, weight_ptr, mask_ptr, row, num_classes,
               HAS_WEIGHT: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
    """The row's safe label, w_y, and state: 0 counts, 1 does not count, 2 invalid (NaN)."""
    label = tl.load(label_ptr + row)
    counted = tl.load(counted_ptr + row) != 0
    eps = tl.load(params_ptr + EPS)
    in_range = (label >= 0) & (label < num_classes)
    safe = tl.where(counted & in_range, label, 0)
    valid = in_range & (eps >= 0) & (eps <= 1)
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + safe) != 0)
    w_y = 1.0
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + safe)
    state = tl.where(counted, tl.where(valid, 0, 2), 1)
    return safe, w_y, state


@triton.jit
def _forward_kernel(
    x_ptr, x_row_stride, label_ptr, counted_ptr, params_ptr, weight_ptr, mask_ptr,
    loss_ptr, z_part_ptr, peak_ptr, log_sum_ptr, entropy_ptr, correct_ptr, logit_scale, cap,
    num_classes: tl.constexpr, CONVENTION: tl.constexpr,
    PAD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_MASK: tl.constexpr, WITH_Z: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr, WITH_STATS: tl.constexpr,
    SUM_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * x_row_stride
    # Online, as in flash attention: the running max, the sum of exp(x - shift) and the support
    # sum of u (x - shift), each rescaled when the shift moves (the shift is the running max,
    # 0 while it is not finite, as lstorch.smoothed._peak).
    safe, w_y, state = _row_setup(label_ptr, counted_ptr, params_ptr, weight_ptr, mask_ptr, row,
                                  num_classes, HAS_WEIGHT, HAS_MASK)  # fmt: skip
    running_max = tl.full([], float("-inf"), tl.float32)
    shift = tl.zeros([], tl.float32)
    running_sum = tl.zeros([], tl.float32)
    support_sum = tl.zeros([], tl.float32)  # sum_c u_c (x_c - shift), times SUM_SCALE
    support_seen = tl.zeros([], tl.float32)  # sum_c u_c so far
    # With the statistics: sum exp(x - shift) (x - shift), rescaled the same way (the entropy),
    # and the first column of the largest raw logit seen (the argmax).
    entropy_sum = tl.zeros([], tl.float32)
    best = tl.full([], float("-inf"), tl.float32)
    best_col = tl.zeros([], tl.int32)
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < num_classes
        raw = tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        # The transform (softcap, logit scale), in registers as the block is read.
        x = _transformed(raw, logit_scale, cap, HAS_SCALE, HAS_CAP)
        allowed = inside
        if HAS_MASK:
            allowed = allowed & (tl.load(mask_ptr + cols, mask=inside, other=0) != 0)
        x_lse = tl.where(allowed, x, float("-inf"))
        running_max = tl.maximum(running_max, tl.max(x_lse, 0))
        finite = (running_max > float("-inf")) & (running_max < float("inf"))
        new_shift = tl.where(finite, running_max, 0.0)
        # The shift only moves up, except from its start at 0 (nothing allowed seen yet, the sum
        # still 0): the clamp keeps exp from overflowing there (0 * inf would be NaN) when the
        # first block's logits are all below -88.
        rescale = tl.exp(tl.minimum(shift - new_shift, 0.0))
        if WITH_STATS:
            # sum e^(x-s')(x-s') = e^(s-s') (sum e^(x-s)(x-s) + (s-s') sum e^(x-s))
            centred = x_lse - new_shift
            terms = tl.where(x_lse > float("-inf"), tl.exp(centred) * centred, 0.0)
            moved_sum = (shift - new_shift) * running_sum
            entropy_sum = rescale * (entropy_sum + moved_sum) + tl.sum(terms, 0)
            raw_allowed = tl.where(allowed, raw, float("-inf"))
            block_max = tl.max(raw_allowed, 0)
            block_col = tl.min(tl.where(raw_allowed == block_max, cols, num_classes), 0)
            later = block_max > best  # ties keep the earlier column (torch.argmax's rule)
            best_col = tl.where(later, block_col, best_col)
            best = tl.where(later, block_max, best)
        running_sum = running_sum * rescale + tl.sum(tl.exp(x_lse - new_shift), 0)
        in_support = allowed
        # The label ("others", "others_but_pad") and the pad never enter the sum (see
        # lstorch.smoothed._row_terms): summed and subtracted after, the label's term would
        # cancel against the others', a pad logit of -1e9 would swamp them, a -inf one give NaN.
        if CONVENTION >= 1:
            in_support = in_support & (cols != safe)
        if CONVENTION == 2:
            in_support = in_support & (cols != PAD)
        u = tl.where(in_support, 1.0, 0.0)
        if HAS_WEIGHT:
            u = u * tl.load(weight_ptr + cols, mask=inside, other=0.0)
        # A masked logit (even -inf) adds exactly 0: a select, not u * x. Each term is scaled
        # by lsspec.sum_scale(K) (a power of two: exact) before it is added, so the sum cannot
        # overflow; the shift's move too (the scaled shifts' difference cannot overflow).
        x_sum = tl.where(u != 0, u * ((x - new_shift) * SUM_SCALE), 0.0)
        moved = new_shift * SUM_SCALE - shift * SUM_SCALE
        support_sum += tl.sum(x_sum, 0) - support_seen * moved
        support_seen += tl.sum(u, 0)
        shift = new_shift
    peak = shift
    log_sum = tl.log(running_sum)
    lse = peak + log_sum

    eps = tl.load(params_ptr + EPS)
    size = tl.load(params_ptr + SIZE)
    support_weight = tl.load(params_ptr + TOTAL_WEIGHT)
    x_y = _transformed(tl.load(row_ptr + safe).to(tl.float32), logit_scale, cap, HAS_SCALE, HAS_CAP)
    if CONVENTION >= 1:  # y is not in the support (left out of support_sum as it was read)
        support_weight -= w_y
    if CONVENTION == 2:  # nor is the pad (left out of support_sum too)
        support_weight -= tl.load(params_ptr + PAD_WEIGHT)
    confidence = 1.0 - eps
    true_term = w_y * ((peak - x_y) + log_sum)
    mean_offset = (support_sum / size) * (1.0 / SUM_SCALE)  # exact scaling
    smooth_term = support_weight * log_sum / size - mean_offset
    # A scale of exactly 0 gives exactly 0, even where its term is infinite.
    loss = tl.where(confidence == 0, 0.0, confidence * true_term)
    loss += tl.where(eps == 0, 0.0, eps * smooth_term)
    loss += tl.load(params_ptr + KL_CONSTANT)
    if WITH_Z:
        z = tl.load(params_ptr + Z)
        z_part = tl.where(z == 0, 0.0, z * lse * lse)
        z_part = tl.where(state == 2, float("nan"), tl.where(state == 1, 0.0, z_part))
        loss += z_part
        tl.store(z_part_ptr + row, z_part)
    loss = tl.where(state == 2, float("nan"), tl.where(state == 1, 0.0, loss))
    tl.store(loss_ptr + row, loss)
    tl.store(peak_ptr + row, peak)
    tl.store(log_sum_ptr + row, log_sum)
    if WITH_STATS:
        entropy = tl.where(state == 1, 0.0, log_sum - entropy_sum / running_sum)
        tl.store(entropy_ptr + row, entropy)
        tl.store(correct_ptr + row, tl.where((state == 0) & (best_col == safe), 1.0, 0.0))


@triton.jit
def _backward_kernel(
    x_ptr, x_row_stride, out_ptr, out_row_stride, label_ptr, counted_ptr, params_ptr,
    weight_ptr, mask_ptr, peak_ptr, log_sum_ptr, grad_ptr, grad_z_ptr, logit_scale, cap,
    num_classes: tl.constexpr, CONVENTION: tl.constexpr, PAD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_MASK: tl.constexpr, WITH_Z: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * out_row_stride
    safe, w_y, state = _row_setup(label_ptr, counted_ptr, params_ptr, weight_ptr, mask_ptr, row,
                                  num_classes, HAS_WEIGHT, HAS_MASK)  # fmt: skip
    eps = tl.load(params_ptr + EPS)
    per_class = eps / tl.load(params_ptr + SIZE)
    support_weight = tl.load(params_ptr + TOTAL_WEIGHT)
    g = tl.load(grad_ptr + row)
    peak = tl.where(state == 1, 0.0, tl.load(peak_ptr + row))
    log_sum = tl.where(state == 1, 0.0, tl.load(log_sum_ptr + row))
    on_true = (1.0 - eps) * w_y
    correction = -on_true
    if CONVENTION >= 1:
        support_weight -= w_y
        u_y = w_y
        if HAS_MASK:
            u_y = u_y * (tl.load(mask_ptr + safe) != 0).to(tl.float32)
        correction += per_class * u_y  # y is not in the support
    pad_mass = 0.0
    if CONVENTION == 2:
        pad_weight = tl.load(params_ptr + PAD_WEIGHT)
        support_weight -= pad_weight
        pad_mass = g * per_class * pad_weight
    scale = g * (on_true + per_class * support_weight)
    if WITH_Z:
        lse = peak + log_sum
        scale += 2.0 * tl.load(params_ptr + Z) * lse * (g + tl.load(grad_z_ptr + row))
    correction = g * correction
    mass = g * per_class
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < num_classes
        raw = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
        x = _transformed(raw, logit_scale, cap, HAS_SCALE, HAS_CAP)  # in registers, as the forward
        softmax = tl.exp((x - peak) - log_sum)  # exact where a rounded lse would not be
        u = tl.full([BLOCK], 1.0, tl.float32)
        if HAS_WEIGHT:
            u = tl.load(weight_ptr + cols, mask=inside, other=0.0)
        if HAS_MASK:
            allowed = tl.load(mask_ptr + cols, mask=inside, other=0) != 0
            softmax = tl.where(allowed, softmax, 0.0)
            u = tl.where(allowed, u, 0.0)
        grad = scale * softmax - mass * u
        grad += tl.where(cols == safe, correction, 0.0)
        if CONVENTION == 2:
            grad += tl.where(cols == PAD, pad_mass, 0.0)
        if HAS_CAP:  # the chain rule: dt/dx = scale (1 - tanh(scale x / cap)^2)
            tanh = _tanh(raw * (logit_scale / cap))
            grad = grad * (logit_scale * (1.0 - tanh * tanh))
        elif HAS_SCALE:
            grad = grad * logit_scale
        grad = tl.where(state == 1, 0.0, grad)
        grad = tl.where(state == 2, float("nan"), grad)
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=inside)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (rows, K) with unit column stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _dense(values: torch.Tensor) -> torch.Tensor:
    """``values`` flattened with unit stride: a kernel reads element ``i`` at ``pointer + i``.

    The kernels take no strides for their per-row and per-class inputs, so every one of them
    goes through here. Upstream gradients are often NOT dense: after ``reduction="mean"`` or
    ``"sum"``, or ``loss.sum()``, autograd hands backward a 0-d gradient expanded to the rows'
    shape (stride 0), and reading it as ``grad_ptr + row`` read memory the tensor does not own
    (lstorch 0.1.0 gave garbage gradients for every row but the first). A dense tensor is
    returned as it is; anything else is copied (O(rows) or O(classes) values)."""
    return values.reshape(-1).contiguous()


def _launch(kernel, x, labels, counted, params, weight, class_mask, convention, pad_index,
            with_z, logit_scale, softcap, config):  # fmt: skip
    """``(x2, keywords)``: the logits as (rows, K), and the keywords both kernels take (the
    options' pointers and constants, and ``kernel``'s block and warps: ``config`` or
    :func:`_config`'s)."""
    block, num_warps = config or _config(x.shape[-1], kernel)
    return _rows(x), dict(
        logit_scale=float(logit_scale),
        cap=1.0 if softcap is None else float(softcap),
        label_ptr=_dense(labels),
        counted_ptr=_dense(counted),
        params_ptr=_dense(params),
        weight_ptr=_dense(weight) if weight is not None else params,
        mask_ptr=_dense(class_mask) if class_mask is not None else params,
        num_classes=x.shape[-1],
        CONVENTION=CONVENTIONS[convention],
        PAD=0 if pad_index is None else pad_index,
        HAS_WEIGHT=weight is not None,
        HAS_MASK=class_mask is not None,
        WITH_Z=with_z,
        HAS_SCALE=logit_scale != 1.0,
        HAS_CAP=softcap is not None,
        BLOCK=block,
        num_warps=num_warps,
    )


def forward(x, labels, counted, params, weight, class_mask, *, convention, pad_index, with_z,
            logit_scale=1.0, softcap=None, with_stats=False, config=None):  # fmt: skip
    """Per-row ``(loss, z_part, peak, log_sum, entropy, correct)`` (float32, shape
    ``labels.shape``; the lse is ``peak + log_sum``; ``entropy`` and ``correct``, 0/1, are 0
    without ``with_stats``) of logits ``x`` (..., K), transformed to ``softcap * tanh(
    logit_scale * x / softcap)`` as they are read; ``labels`` int64 and ``counted`` bool of the
    rows' shape; ``params`` as above; ``weight`` float32 (K,) or None; ``class_mask`` bool (K,)
    or None. Any strides: the kernels read dense copies where they are not dense already."""
    loss, z_part, peak, log_sum, entropy, correct = (
        torch.zeros(labels.shape, dtype=torch.float32, device=x.device) for _ in range(6)
    )
    x2, shared = _launch("forward", x, labels, counted, params, weight, class_mask, convention,
                         pad_index, with_z, logit_scale, softcap, config)  # fmt: skip
    if x2.shape[0]:
        _forward_kernel[(x2.shape[0],)](
            x2, x2.stride(0), loss_ptr=loss, z_part_ptr=z_part, peak_ptr=peak,
            log_sum_ptr=log_sum, entropy_ptr=entropy, correct_ptr=correct,
            WITH_STATS=with_stats, SUM_SCALE=lsspec.sum_scale(x.shape[-1]), **shared,
        )  # fmt: skip
    return loss, z_part, peak, log_sum, entropy, correct


def backward(x, out, labels, counted, params, weight, class_mask, peak, log_sum, grad, grad_z, *,
             convention, pad_index, with_z, logit_scale=1.0, softcap=None,
             config=None):  # fmt: skip
    """Write the gradient with respect to ``x`` into ``out`` (contiguous, ``x``'s shape; may be
    ``x`` itself), given the saved ``peak`` and ``log_sum`` and the upstream ``grad`` (and
    ``grad_z`` of the z-part) per row, float32, of any strides (an expanded, stride-0 gradient
    is made dense)."""
    if not out.is_contiguous():
        raise ValueError("lstorch.triton_kernels.backward: `out` must be contiguous")
    out2 = out.view(-1, x.shape[-1])
    x2, shared = _launch("backward", x, labels, counted, params, weight, class_mask, convention,
                         pad_index, with_z, logit_scale, softcap, config)  # fmt: skip
    if x2.shape[0]:
        _backward_kernel[(x2.shape[0],)](
            x2, x2.stride(0), out2, out2.stride(0), peak_ptr=_dense(peak),
            log_sum_ptr=_dense(log_sum), grad_ptr=_dense(grad),
            grad_z_ptr=_dense(grad_z) if with_z else peak, **shared,
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# The kernels as PyTorch operators. ``torch.compile`` traces a call to an operator without
# looking inside (its fake implementation gives the output shapes), so a compiled model keeps
# the kernels with no graph break, and ``torch.library.opcheck`` can test the registration.
# The operators return fresh tensors, except ``smoothed_rows_backward_``, which overwrites the
# logits with their gradient (``inplace_backward``) and says so (``mutates_args``).


@torch.library.custom_op("lstorch::smoothed_rows", mutates_args=())
def smoothed_rows(
    x: torch.Tensor,
    labels: torch.Tensor,
    counted: torch.Tensor,
    params: torch.Tensor,
    weight: torch.Tensor | None,
    class_mask: torch.Tensor | None,
    convention: str,
    pad_index: int | None,
    with_z: bool,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    with_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward` as an operator: per-row ``(loss, z_part, peak, log_sum, entropy,
    correct)``."""
    return forward(x, labels, counted, params, weight, class_mask, convention=convention,
                   pad_index=pad_index, with_z=with_z, logit_scale=logit_scale,
                   softcap=softcap, with_stats=with_stats)  # fmt: skip


@smoothed_rows.register_fake
def _smoothed_rows_fake(x, labels, counted, params, weight, class_mask, convention, pad_index,
                        with_z, logit_scale=1.0, softcap=None, with_stats=False):  # fmt: skip
    return tuple(labels.new_empty(labels.shape, dtype=torch.float32) for _ in range(6))


# The two backward operators take the same arguments, declared once here: ``x`` (the logits),
# the forward's operands and statistics, the upstream gradients and the static options. One
# writes the gradient into a new tensor, the other over ``x`` (``Tensor(a!)``: it mutates it).
_BACKWARD_SCHEMA = (
    "(Tensor{alias} x, Tensor labels, Tensor counted, Tensor params, Tensor? weight, "
    "Tensor? class_mask, Tensor peak, Tensor log_sum, Tensor grad, Tensor? grad_z, "
    "str convention, SymInt? pad_index, bool with_z, float logit_scale=1.0, "
    "float? softcap=None) -> {returns}"
)


def _backward_into(out, x, labels, counted, params, weight, class_mask, peak, log_sum, grad,
                   grad_z, convention, pad_index, with_z, logit_scale=1.0,
                   softcap=None):  # fmt: skip
    backward(x, out, labels, counted, params, weight, class_mask, peak, log_sum, grad, grad_z,
             convention=convention, pad_index=pad_index, with_z=with_z,
             logit_scale=logit_scale, softcap=softcap)  # fmt: skip


def _backward_new(x, *arguments):
    """:func:`backward` as an operator, into a new contiguous tensor of ``x``'s shape."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _backward_into(out, x, *arguments)
    return out


def _backward_over_x(x, *arguments):
    """:func:`backward` as an operator that overwrites ``x`` (contiguous) with its gradient:
    each element is read before the same program writes it."""
    _backward_into(x, x, *arguments)


smoothed_rows_backward = torch.library.custom_op(
    "lstorch::smoothed_rows_backward",
    _backward_new,
    mutates_args=(),
    schema=_BACKWARD_SCHEMA.format(alias="", returns="Tensor"),
)
smoothed_rows_backward_ = torch.library.custom_op(
    "lstorch::smoothed_rows_backward_",
    _backward_over_x,
    mutates_args=("x",),
    schema=_BACKWARD_SCHEMA.format(alias="(a!)", returns="()"),
)


@smoothed_rows_backward.register_fake
def _smoothed_rows_backward_fake(x, *args):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@smoothed_rows_backward_.register_fake
def _smoothed_rows_backward_inplace_fake(x, *args):
    return None
