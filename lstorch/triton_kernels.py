"""Triton kernels for the core of ``lstorch.smoothed_cross_entropy`` on CUDA: two passes over the
logits in forward+backward and nothing else of rows x K size.

* Forward (:func:`row_statistics`): ONE read of the logits per row, giving the row's
  ``lse = log sum_c exp(x_c)`` (online: running max and rescaled sum, as in flash attention) and
  ``sum_c u_c x_c`` (``u`` the class weights times the class mask, or 1). Everything else the
  closed form needs is O(rows) and is done by the caller with torch ops.
* Backward (:func:`write_gradient`): ONE read of the logits and ONE write of the gradient,
  ``grad_c = a * exp(x_c - lse) - b * v_c + [c = y] cy + [c = pad] cp`` with per-row ``a, b, cy,
  cp`` and a per-class ``v`` computed by the caller (``lstorch.smoothed._row_loss_gradient``),
  accumulated in float32 and rounded once to the logits' dtype. Rows that do not count are
  written as exact zeros (whatever their logits hold: NaN and inf there do not leak), rows with an
  invalid label as NaN. The output may be the logits' own storage (``inplace_backward``): each
  element is read before it is written, by the same program.

Those three passes are the bandwidth floor of a label-smoothed cross-entropy that returns the
gradient of its logits (the issue's "read logits in forward, read again and write the gradient in
backward"); ``benchmarks/bench_gpu.py`` measures how close the kernels come to it.

The kernels are used only for CUDA tensors outside ``torch.compile`` and ``torch.func``
transforms (Inductor fuses the eager path itself there), and never for float64 or log-probability
inputs. This module is imported lazily, so lstorch works without Triton. On a machine without a
GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests them
(``tests/triton_checks.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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


@triton.jit
def _row_statistics_kernel(
    x_ptr,
    x_row_stride,
    weight_ptr,
    mask_ptr,
    lse_ptr,
    weighted_sum_ptr,
    num_classes: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * x_row_stride
    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.zeros([], tl.float32)
    weighted_sum = tl.zeros([], tl.float32)
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < num_classes
        x = tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        allowed = inside
        if HAS_MASK:
            allowed = allowed & (tl.load(mask_ptr + cols, mask=inside, other=0) != 0)
        x_lse = tl.where(allowed, x, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x_lse, 0))
        # A max of -inf (nothing allowed so far, or -inf logits) rescales by exp(-inf) = 0.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x_lse - shift), 0)
        running_max = new_max
        x_sum = tl.where(allowed, x, 0.0)  # a masked -inf logit adds 0, not NaN
        if HAS_WEIGHT:
            x_sum = x_sum * tl.load(weight_ptr + cols, mask=inside, other=0.0)
        weighted_sum += tl.sum(x_sum, 0)
    tl.store(lse_ptr + row, running_max + tl.log(running_sum))
    tl.store(weighted_sum_ptr + row, weighted_sum)


@triton.jit
def _gradient_kernel(
    x_ptr,
    x_row_stride,
    out_ptr,
    out_row_stride,
    lse_ptr,
    a_ptr,
    b_ptr,
    v_ptr,
    mask_ptr,
    label_ptr,
    cy_ptr,
    cp_ptr,
    state_ptr,
    pad_index,
    num_classes: tl.constexpr,
    HAS_VECTOR: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * out_row_stride
    lse = tl.load(lse_ptr + row)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    label = tl.load(label_ptr + row)
    cy = tl.load(cy_ptr + row)
    cp = 0.0
    if HAS_PAD:
        cp = tl.load(cp_ptr + row)
    state = tl.load(state_ptr + row)  # 0 counts, 1 does not count (zeros), 2 invalid (NaN)
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < num_classes
        x = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
        softmax = tl.exp(x - lse)
        if HAS_MASK:
            allowed = tl.load(mask_ptr + cols, mask=inside, other=0) != 0
            softmax = tl.where(allowed, softmax, 0.0)
        if HAS_VECTOR:
            grad = a * softmax - b * tl.load(v_ptr + cols, mask=inside, other=0.0)
        else:
            grad = a * softmax - b
        grad += tl.where(cols == label, cy, 0.0)
        if HAS_PAD:
            grad += tl.where(cols == pad_index, cp, 0.0)
        grad = tl.where(state == 1, 0.0, grad)
        grad = tl.where(state == 2, float("nan"), grad)
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=inside)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (rows, K) with unit column stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def row_statistics(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    class_mask: torch.Tensor | None,
    *,
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, sum_c u_c x_c)`` per row of ``x`` (..., K), float32, over the allowed classes.

    ``u_c = weight_c`` (1 without weights), 0 for classes ``class_mask`` excludes; ``lse`` is
    ``torch.logsumexp(x.float().masked_fill(~class_mask, -inf), -1)``.
    """
    num_classes = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    lse = torch.empty(rows, dtype=torch.float32, device=x.device)
    weighted_sum = torch.empty(rows, dtype=torch.float32, device=x.device)
    block, num_warps = config or _config(num_classes, "forward")
    if rows:
        _row_statistics_kernel[(rows,)](
            x2,
            x2.stride(0),
            weight.to(torch.float32).contiguous() if weight is not None else lse,
            class_mask.to(torch.int8).contiguous() if class_mask is not None else lse,
            lse,
            weighted_sum,
            num_classes,
            HAS_WEIGHT=weight is not None,
            HAS_MASK=class_mask is not None,
            BLOCK=block,
            num_warps=num_warps,
        )
    shape = x.shape[:-1]
    return lse.reshape(shape), weighted_sum.reshape(shape)


def write_gradient(
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    lse: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    v: torch.Tensor | None,
    class_mask: torch.Tensor | None,
    labels: torch.Tensor,
    cy: torch.Tensor,
    pad_index: int | None,
    cp: torch.Tensor | None,
    state: torch.Tensor,
    config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Write ``a * softmax(x) - b * v + [c = y] cy + [c = pad] cp`` into ``out`` (same shape as
    ``x``, contiguous; it may be ``x`` itself). Per-row tensors have ``x.shape[:-1]``; ``v`` is
    (K,) or None for ``v = 1``; ``state`` is int8: 0 counts, 1 zeros, 2 NaN."""
    num_classes = x.shape[-1]
    x2 = _rows(x)
    out2 = out.view(-1, num_classes)
    rows = x2.shape[0]
    block, num_warps = config or _config(num_classes, "backward")

    def per_row(t, dtype=torch.float32):
        return t.to(dtype).expand(x.shape[:-1]).reshape(-1).contiguous()

    lse_rows = per_row(lse)
    if rows:
        _gradient_kernel[(rows,)](
            x2,
            x2.stride(0),
            out2,
            out2.stride(0),
            lse_rows,
            per_row(a),
            per_row(b),
            v.to(torch.float32).expand(num_classes).contiguous() if v is not None else lse_rows,
            class_mask.to(torch.int8).contiguous() if class_mask is not None else lse_rows,
            per_row(labels, torch.int64),
            per_row(cy),
            per_row(cp) if cp is not None else lse_rows,
            per_row(state, torch.int8),
            -1 if pad_index is None else pad_index,
            num_classes,
            HAS_VECTOR=v is not None,
            HAS_MASK=class_mask is not None,
            HAS_PAD=cp is not None,
            BLOCK=block,
            num_warps=num_warps,
        )
    return out
