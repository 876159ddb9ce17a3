"""Pallas kernels for the core of ``lsjax.smoothed_cross_entropy``: two passes over the logits in
forward+backward and nothing else of rows x K size. The JAX twin of ``lstorch.triton_kernels``.

* Forward (:func:`forward`): ONE read of the logits per row block. For each block of classes,
  in order: the online ``(max, sum exp(x - max))`` over the allowed classes (kept as
  ``peak + log_sum``, rescaled as the running max moves, as in flash attention), the support sum
  ``sum_c u_c (x_c - peak)`` times ``lsspec.sum_scale(K)`` (``u`` the class weights times the
  class mask, or 1, and 0 on the pad; rescaled with the max), and the label's logit. Then, per row,
  the closed form of ``lsjax._closed_form.row_loss`` (the same terms in the same order):
  ``(1 - eps) w_y (lse - x_y) + eps (W lse - sum_{c in S} u_c x_c) / |S|`` + the KL constant +
  ``z lse^2``, written relative to the peak so that logits near the float32 maximum give the
  finite loss they have. It also writes the row's ``d loss / d eps``, so that a differentiated
  smoothing costs no further read of the logits.
* Backward (:func:`backward`): ONE read of the logits and ONE write of the gradient,
  ``grad_c = a exp((x_c - peak) - log_sum) - b u_c + [c = y] cy + [c = pad] cp``, with the
  per-row ``a, b, cy, cp`` of ``lstorch.triton_kernels``' backward (O(rows) work in XLA before
  the kernel), accumulated in float32 (float64 for float64 logits) and rounded once to the
  logits' dtype.

In both, rows that do not count are written as exact zeros (whatever their logits hold: NaN and
inf there do not leak), and counted rows with a label out of range or masked, or any row under a
smoothing outside [0, 1], as NaN. The scalars (eps, |S|, sum_c u_c, u_pad, z, the KL constant and
its slope) travel as one small array, so a new smoothing value is data, not a recompilation.

Blocks: each program takes ``block_rows`` rows whole (a ``pl.BlockSpec`` of ``(block_rows, K)``)
and walks their classes in ``block_classes`` columns, a power of two no larger than K. A ragged
K is covered without masked loads: the last block starts at ``K - block_classes`` and ignores
the columns the previous block already read (the backward writes them again, with the same
values). So every load and store is in bounds and of a power-of-two size (the Triton lowering
wants that; Mosaic wants no out-of-bounds access either). The price is the overlap, read twice:
2% more at K = 128256 (blocks of 8192), 64% more at K = 5000 (two blocks of 4096).

Where it runs: :func:`row_loss` is a ``jax.custom_vjp``, so ``jax.grad`` and ``jax.vjp`` (under
``jit`` and ``vmap`` too; a vmapped ``pallas_call`` gains a grid axis) run the two kernels.
Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) and derivatives of
order two are not available on this path: use ``implementation="xla"`` for them. On a GPU the
kernels are compiled by Pallas's Triton lowering (one row per program, 4 warps forward and 16
backward at 8192-column blocks, the configuration ``lstorch.triton_kernels`` measured fastest on
an H200); on a TPU by Mosaic (8 rows per program); anywhere else they run in Pallas's interpret
mode (``interpret=True``: the same kernels as a ``jax.jit`` of a loop over the grid; slow), which
is how CI tests them (tests/test_pallas.py, the registry's "jax: pallas" path).

Where it has run: CI tests it on CPUs, in interpret mode, and lowers it to Triton IR and to
Mosaic IR there (tests/test_pallas.py checks both). On a GPU it ran once, on an H200, in the GPU
benchmark's run 4 (benchmarks/RESULTS.md): bf16 and float32 at 8192 x 131072 and bf16 rows past
element 2^31, each value checked against the float64 oracle before it was timed. It has NEVER
RUN ON A TPU: Mosaic may refuse what its Python lowering accepted (the last block's column
offset ``K - block_classes`` is dynamic and not a multiple of 128 when K is not, and
``(block_rows, K)`` blocks of a large vocabulary may exceed VMEM). So ``implementation="auto"``
chooses the kernels on a single GPU only; on a TPU ``"auto"`` stays on XLA.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

import lsspec
from lsjax._closed_form import (
    kl_slope,
    kl_terms,
    label_rows,
    support_size,
    transform_slope,
    transformed,
)

IMPLEMENTATIONS = ("auto", "xla", "pallas")
ENVIRONMENT_VARIABLE = "LSJAX_IMPLEMENTATION"
CONVENTIONS = {"uniform": 0, "others": 1, "others_but_pad": 2}

# Layout of the ``params`` array, (1, len) in the compute dtype.
EPS, SIZE, TOTAL_WEIGHT, PAD_WEIGHT, Z, KL_CONSTANT, KL_SLOPE = range(7)
NUM_PARAMS = 7
# Per-row inputs: ``rows`` (R, 2) int32 of [safe label, state], ``state`` 0 for a counted row,
# 1 for a row that does not count (written as 0), 2 for an invalid counted row (NaN).
COUNTED, NOT_COUNTED, INVALID = 0, 1, 2
# The backward's per-row coefficients, (R, 6) in the compute dtype.
PEAK, LOG_SUM, A, B, CY, CP = range(6)
NUM_COEFFICIENTS = 6


class Config(NamedTuple):
    """Where and how the kernels run: ``backend`` (``"gpu"``: compiled by Pallas's Triton
    lowering, ``"tpu"``: by Mosaic, anything else: interpret mode), ``block_rows`` rows per
    program, ``block_classes`` columns per step (rounded down to a power of two no larger than
    K), and the GPU's warps."""

    backend: str
    block_rows: int = 1
    block_classes: int = 8192
    forward_warps: int = 4
    backward_warps: int = 16


def _backend() -> str:
    return jax.default_backend()


def _device_count() -> int:
    return jax.device_count()


def default_config(backend: str | None = None) -> Config:
    """One row per program on a GPU (as the Triton kernels), 8 (a sublane tile) on a TPU; the
    interpreter takes 8 too (fewer, larger steps)."""
    backend = backend or _backend()
    return Config(backend, block_rows=1 if backend == "gpu" else 8)


def chosen(
    fn: Any, implementation: Any, x: jax.Array, *, from_log_probs: bool, options: tuple = ()
) -> bool:
    """Whether ``smoothed_cross_entropy`` (called as ``fn``) runs its core on these kernels.

    ``"xla"``: never. ``"pallas"``: always (interpret mode without a GPU or TPU); the kernels
    take logits, so ``from_log_probs=True`` raises. ``"auto"``: the environment variable
    ``LSJAX_IMPLEMENTATION`` (``"auto"`` when unset) decides: its ``"xla"`` and ``"pallas"``
    force that implementation wherever the kernels take the call (log-probabilities stay on XLA);
    its ``"auto"`` takes the kernels for float32/bf16/fp16 logits when JAX's default backend is a
    GPU and JAX sees one device, and XLA elsewhere (TPU included: the Mosaic lowering was never
    run on one), and XLA wherever the logits or the differentiable ``options`` (smoothing,
    z-loss) are being differentiated in forward mode or twice (:func:`_needs_forward_mode`: the
    kernels' ``custom_vjp`` takes neither, so ``jax.hessian`` of an ``"auto"`` loss works on a
    GPU too). That check reads the tracers the call is given: an inner ``jax.jit`` or
    ``jax.checkpoint`` between the loss and an outer ``jvp``/``hessian``/grad-of-grad hides
    them, and the kernels then refuse it with JAX's own error; pass ``"xla"`` there. With
    several devices the logits may be sharded under ``jit``, and a ``pallas_call`` is a custom
    call that XLA's SPMD partitioner does not split: it would gather the logits whole onto
    every device. Inside ``shard_map`` (per-device code) the kernels are safe: pass
    ``implementation="pallas"`` there, with ``check_vma=False`` (the kernels do not declare
    over which mesh axes their outputs vary; ``shard_map``'s default check refuses them).
    """
    implementation = lsspec.check_choice(fn, "implementation", implementation, IMPLEMENTATIONS)
    if implementation == "pallas":
        if from_log_probs:
            name, arg = lsspec.names(fn)
            raise ValueError(
                f"{name}: `{arg('implementation')}='pallas'` takes logits, not log-probabilities; "
                f"got `{arg('from_log_probs')}=True`. Use implementation='xla' (or 'auto', which "
                "falls back to XLA there)."
            )
        return _reverse_mode_only(fn, None, x, options)
    if implementation == "xla" or from_log_probs:
        return False
    forced = lsspec.check_choice(
        fn,
        f"{ENVIRONMENT_VARIABLE} (environment variable)",
        os.environ.get(ENVIRONMENT_VARIABLE, "auto"),
        IMPLEMENTATIONS,
    )
    if forced != "auto":
        forced_by = f"{ENVIRONMENT_VARIABLE}=pallas"
        return forced == "pallas" and _reverse_mode_only(fn, forced_by, x, options)
    return (
        _backend() == "gpu"
        and _device_count() == 1
        and x.dtype != jnp.float64
        and not _needs_forward_mode(x, *options)
    )


def _reverse_mode_only(fn, forced_by: str | None, x, options) -> bool:
    """True, or a named error where the kernels are asked for and the call is differentiated
    in forward mode or twice (:func:`_needs_forward_mode`): their ``custom_vjp`` takes neither,
    and JAX's own error ("can't apply forward-mode autodiff (jvp) to a custom_vjp function",
    "Linearization failed") names no function of ours."""
    if _needs_forward_mode(x, *options):
        name, arg = lsspec.names(fn)
        asked = forced_by or f"{arg('implementation')}='pallas'"
        raise NotImplementedError(
            f"{name}: the Pallas kernels ({asked}) take reverse-mode derivatives once "
            "(jax.grad, jax.vjp); got a call differentiated in forward mode or twice (jax.jvp, "
            "jax.jacfwd, jax.hessian, grad of grad). Use implementation='xla' (or 'auto', "
            "which leaves such calls to XLA)."
        )
    return True


def _needs_forward_mode(*values: Any) -> bool:
    """Whether any of ``values`` is being differentiated in forward mode (``jax.jvp``,
    ``jacfwd``, ``hessian``) or twice (``grad`` of ``grad``), read from its tracers' nesting:
    ``jax.grad`` traces with a ``LinearizeTracer``, forward mode with a ``JVPTracer``; ``vmap``'s
    and ``jit``'s tracers are looked through. Best effort: a tracer of another kind ends the
    walk (the kernels are then taken, as before)."""
    for value in values:
        linearized = 0
        while isinstance(value, jax.core.Tracer):
            kind = type(value).__name__
            if kind == "JVPTracer":
                return True
            if kind == "LinearizeTracer":
                linearized += 1
                if linearized > 1:
                    return True
            value = getattr(value, "primal", getattr(value, "val", None))
    return False


# --------------------------------------------------------------------------------------------
# The kernels


def _column_block(num_classes: int, block_classes: int) -> int:
    """The largest power of two <= min(K, block_classes)."""
    return 1 << (min(num_classes, block_classes).bit_length() - 1)


def _steps(num_classes: int, block: int):
    """The bounds of the loop over blocks of classes, int32 (also under ``jax_enable_x64``: the
    kernels' index arithmetic is int32)."""
    return jnp.int32(0), jnp.int32(-(-num_classes // block))


def _columns(step, block: int, num_classes: int):
    """Step ``step``'s first column and, as a (1, block) array, its columns and whether each is
    new (the last step starts at ``K - block`` and skips what the previous one read)."""
    start = jnp.minimum(step * block, num_classes - block)
    cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
    return start, cols, cols >= step * block


def _forward_kernel(params_ref, rows_ref, w_y_ref, *refs, num_classes, block, convention, pad,
                    has_weight, has_mask, with_z, sum_scale, dtype, transform,
                    with_stats):  # fmt: skip
    refs = list(refs)
    u_ref = refs.pop(0) if has_weight else None
    mask_ref = refs.pop(0) if has_mask else None
    x_ref, loss_ref, z_part_ref, peak_ref, log_sum_ref, slope_ref, *stats_refs = refs
    labels = rows_ref[:, 0:1]  # (block_rows, 1)
    shape = labels.shape

    # 1. One pass over the row's classes. Online, as in flash attention: the running max, the
    # sum of exp(x - shift) and the support sum of u (x - shift), each rescaled when the shift
    # moves (the shift is the running max, 0 while it is not finite: lsjax.smoothed's peak).
    # The logits are transformed (softcap, logit scale) as each block is read, in registers.
    # With the statistics: also the sum of exp(x - shift) (x - shift) (rescaled the same way,
    # for the entropy) and the first maximal raw logit's column (the argmax).
    def step(index, carry):
        running_max, shift, running_sum, support_sum, support_seen, x_y, *argmax = carry
        start, cols, new = _columns(index, block, num_classes)
        raw = x_ref[:, pl.ds(start, block)].astype(dtype)
        x = transformed(raw, transform)
        allowed = new
        if has_mask:
            allowed = allowed & (mask_ref[:, pl.ds(start, block)] != 0)
        x_lse = jnp.where(allowed, x, -jnp.inf)
        running_max = jnp.maximum(running_max, jnp.max(x_lse, axis=1, keepdims=True))
        finite = (running_max > -jnp.inf) & (running_max < jnp.inf)
        new_shift = jnp.where(finite, running_max, 0.0)
        # The old sum's factor exp(shift - new_shift) is at most 1 once a max is seen; before,
        # the sum is 0 and the shift a placeholder 0, so the clamp only avoids 0 * inf.
        rescale = jnp.exp(jnp.minimum(shift - new_shift, 0.0))
        if with_stats:
            # sum e^(x - s') (x - s') = e^(s - s') (sum e^(x - s) (x - s) + (s - s') sum e^(x - s))
            entropy_sum, best, best_col = argmax
            centred = x_lse - new_shift
            terms = jnp.where(x_lse > -jnp.inf, jnp.exp(centred) * centred, 0.0)
            entropy_sum = rescale * (entropy_sum + (shift - new_shift) * running_sum) + jnp.sum(
                terms, axis=1, keepdims=True
            )
            raw_allowed = jnp.where(allowed, raw, -jnp.inf)
            block_max = jnp.max(raw_allowed, axis=1, keepdims=True)
            block_col = jnp.min(
                jnp.where(raw_allowed == block_max, cols, num_classes), axis=1, keepdims=True
            )
            later = block_max > best  # ties keep the earlier column (torch.argmax's rule)
            argmax = [entropy_sum, jnp.where(later, block_max, best),
                      jnp.where(later, block_col, best_col)]  # fmt: skip
        running_sum = running_sum * rescale + jnp.sum(
            jnp.exp(x_lse - new_shift), axis=1, keepdims=True
        )
        # The label ("others", "others_but_pad") and the pad never enter the sum (see
        # lsjax.smoothed._row_terms): summed and subtracted after, the label's term would cancel
        # against the others', a pad logit of -1e9 would swamp them, and a -inf one make it NaN.
        summed = new
        if convention >= 1:
            summed = summed & (cols != labels)
        if convention == 2:
            summed = summed & (cols != pad)
        u = (allowed & summed).astype(dtype)
        if has_weight:  # u_ref holds the weights times the class mask
            u = jnp.where(summed, u_ref[:, pl.ds(start, block)], 0.0)
        # A masked logit (even -inf) adds exactly 0: a select, not u * x. Each term is scaled by
        # lsspec.sum_scale(K) (a power of two: exact) before it is added, so the sum cannot
        # overflow; the shift's move too.
        x_sum = jnp.where(u != 0, u * ((x - new_shift) * sum_scale), 0.0)
        moved = new_shift * sum_scale - shift * sum_scale
        support_sum = support_sum + jnp.sum(x_sum, axis=1, keepdims=True) - support_seen * moved
        support_seen = support_seen + jnp.sum(u, axis=1, keepdims=True)
        x_y = x_y + jnp.sum(jnp.where(new & (cols == labels), x, 0.0), axis=1, keepdims=True)
        return running_max, new_shift, running_sum, support_sum, support_seen, x_y, *argmax

    zeros = jnp.zeros(shape, dtype)
    start = (jnp.full(shape, -jnp.inf, dtype), zeros, zeros, zeros, zeros, zeros)
    if with_stats:
        start = (*start, zeros, jnp.full(shape, -jnp.inf, dtype), jnp.zeros(shape, jnp.int32))
    _, peak, running_sum, support_sum, _, x_y, *argmax = jax.lax.fori_loop(
        *_steps(num_classes, block), step, start
    )
    log_sum = jnp.log(running_sum)
    lse = peak + log_sum

    # 2. The row's closed form (lsjax._closed_form.row_loss, in the same order).
    state = rows_ref[:, 1:2]
    w_y = w_y_ref[...]
    eps = params_ref[0, EPS]
    size = params_ref[0, SIZE]
    support_weight = params_ref[0, TOTAL_WEIGHT]
    if convention >= 1:  # y is not in the support (left out of support_sum as it was read)
        support_weight = support_weight - w_y
    if convention == 2:  # nor is the pad (left out of support_sum too)
        support_weight = support_weight - params_ref[0, PAD_WEIGHT]
    confidence = 1.0 - eps
    true_term = w_y * ((peak - x_y) + log_sum)
    mean_offset = (support_sum / size) * (1.0 / sum_scale)  # exact scaling
    smooth_term = support_weight * log_sum / size - mean_offset
    # A scale of exactly 0 gives exactly 0, even where its term is infinite.
    loss = jnp.where(confidence == 0, 0.0, confidence * true_term)
    loss = loss + jnp.where(eps == 0, 0.0, eps * smooth_term)
    loss = loss + params_ref[0, KL_CONSTANT]
    slope = smooth_term - true_term + params_ref[0, KL_SLOPE]

    def rows_only(value):  # 0 where the row does not count, NaN where it is invalid
        return jnp.where(state == INVALID, jnp.nan, jnp.where(state == NOT_COUNTED, 0.0, value))

    z_part = zeros
    if with_z:
        z = params_ref[0, Z]
        z_part = rows_only(jnp.where(z == 0, 0.0, z * lse * lse))
        loss = loss + z_part
    loss_ref[...] = rows_only(loss)
    z_part_ref[...] = z_part
    peak_ref[...] = peak
    log_sum_ref[...] = log_sum
    slope_ref[...] = rows_only(slope)
    if with_stats:
        entropy_sum, _, best_col = argmax
        lse_ref, entropy_ref, correct_ref = stats_refs
        counted = state == COUNTED
        lse_ref[...] = jnp.where(state == NOT_COUNTED, 0.0, lse)
        entropy_ref[...] = jnp.where(state == NOT_COUNTED, 0.0, log_sum - entropy_sum / running_sum)
        correct_ref[...] = (counted & (best_col == labels)).astype(dtype)


def _backward_kernel(rows_ref, coefficients_ref, *refs, num_classes, block, convention, pad,
                     has_weight, has_mask, dtype, transform):  # fmt: skip
    refs = list(refs)
    u_ref = refs.pop(0) if has_weight else None
    mask_ref = refs.pop(0) if has_mask else None
    x_ref, out_ref = refs
    labels, state = rows_ref[:, 0:1], rows_ref[:, 1:2]
    peak = coefficients_ref[:, PEAK : PEAK + 1]
    log_sum = coefficients_ref[:, LOG_SUM : LOG_SUM + 1]
    a = coefficients_ref[:, A : A + 1]
    b = coefficients_ref[:, B : B + 1]
    cy = coefficients_ref[:, CY : CY + 1]
    cp = coefficients_ref[:, CP : CP + 1]

    def step(index, carry):
        # Every column of the last (overlapping) step is written again with the same value.
        start, cols, _ = _columns(index, block, num_classes)
        raw = x_ref[:, pl.ds(start, block)].astype(dtype)
        x = transformed(raw, transform)  # in registers, as the forward
        softmax = jnp.exp((x - peak) - log_sum)  # exact where a rounded lse would not be
        u = jnp.ones((1, block), dtype)
        if has_weight:
            u = u_ref[:, pl.ds(start, block)]
        if has_mask:
            allowed = mask_ref[:, pl.ds(start, block)] != 0
            softmax = jnp.where(allowed, softmax, 0.0)
            u = jnp.where(allowed, u, 0.0)
        grad = a * softmax - b * u
        grad = grad + jnp.where(cols == labels, cy, 0.0)
        if convention == 2:
            grad = grad + jnp.where(cols == pad, cp, 0.0)
        if transform.active:  # the chain rule through the transform
            grad = grad * transform_slope(raw, transform)
        grad = jnp.where(state == NOT_COUNTED, 0.0, grad)
        grad = jnp.where(state == INVALID, jnp.nan, grad)
        out_ref[:, pl.ds(start, block)] = grad.astype(out_ref.dtype)
        return carry

    jax.lax.fori_loop(*_steps(num_classes, block), step, 0)


# --------------------------------------------------------------------------------------------
# The calls


class _Inputs(NamedTuple):
    """What both kernels read besides the logits and the per-row statistics."""

    params: jax.Array  # (1, NUM_PARAMS), compute dtype
    rows: jax.Array  # (R, 2) int32: [safe label, state]
    w_y: jax.Array  # (R, 1), compute dtype
    u: jax.Array | None  # (1, K) weights times the class mask, compute dtype
    mask: jax.Array | None  # (1, K) int32


class Statistics(NamedTuple):
    """The forward kernel's per-row outputs, each (R,) in the compute dtype."""

    loss: jax.Array  # the row's loss (z-part included), 0 / NaN as the row's state says
    z_part: jax.Array  # z lse^2 (0 without the z-loss)
    peak: jax.Array  # the max over the allowed classes (0 where not finite)
    log_sum: jax.Array  # log sum_c exp(x_c - peak); lse = peak + log_sum
    slope: jax.Array  # d loss / d eps
    lse: jax.Array | None = None  # with the statistics: lse, entropy, correct (0/1)
    entropy: jax.Array | None = None
    correct: jax.Array | None = None


def _kl_params(options, eps, size):
    """The KL constant ``sum_c q_c log q_c`` and its derivative in eps (the one-sided limits at
    the ends), as ``lsjax._closed_form`` has them; 0 without ``kl``."""
    if not options.kl:
        return 0.0, 0.0
    on_target_term, off_target_term = kl_terms(options.convention, eps, size)
    return on_target_term + off_target_term, kl_slope(options.convention, eps, size)


def _inputs(options, num_classes, labels, counted, eps, weight, class_mask, z) -> _Inputs:
    """The per-row prologue (O(rows), in XLA) and the scalars, in the kernels' layout."""
    dtype = eps.dtype
    labels = labels.reshape(-1)
    counted = counted.reshape(-1)
    safe, bad = label_rows(labels, counted, eps, num_classes, class_mask)
    state = jnp.where(counted, jnp.where(bad, INVALID, COUNTED), NOT_COUNTED)
    u = weight
    if class_mask is not None:
        mask_values = class_mask.astype(dtype)
        u = mask_values if u is None else u * mask_values
    w_y = jnp.ones(labels.shape, dtype) if weight is None else weight[safe]
    size = support_size(options.convention, num_classes, options.pad_index, class_mask, dtype)
    total = jnp.asarray(num_classes, dtype) if u is None else jnp.sum(u)
    pad_weight = jnp.asarray(0.0, dtype)
    if options.pad_index is not None:
        pad_weight = jnp.asarray(1.0, dtype) if u is None else u[options.pad_index]
    kl_constant, kl_slope = _kl_params(options, eps, size)
    values = [eps, size, total, pad_weight, 0.0 if z is None else z, kl_constant, kl_slope]
    params = jnp.stack([jnp.asarray(v, dtype) for v in values]).reshape(1, NUM_PARAMS)
    return _Inputs(
        params,
        jnp.stack([safe, state], axis=-1).astype(jnp.int32),
        w_y.astype(dtype).reshape(-1, 1),
        None if weight is None else u.astype(dtype).reshape(1, -1),
        None if class_mask is None else class_mask.astype(jnp.int32).reshape(1, -1),
    )


def _class_specs(inputs: _Inputs, num_classes: int) -> tuple[list, list]:
    """The (1, K) per-class inputs present (weights, mask) and their whole-array BlockSpecs."""
    arrays = [a for a in (inputs.u, inputs.mask) if a is not None]
    return arrays, [pl.BlockSpec((1, num_classes), lambda i: (0, 0)) for _ in arrays]


def _interpret(config: Config) -> bool:
    """Compiled on a GPU (Triton) or TPU (Mosaic); interpreted everywhere else."""
    return config.backend not in ("gpu", "tpu")


def _compiler_params(config: Config, warps: int):
    if config.backend == "gpu":
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=warps)
    return None


def _static_arguments(options, inputs: _Inputs, num_classes: int, block: int) -> dict:
    """The static arguments both kernels take: the shape of a row, the convention and which
    optional per-class inputs are there."""
    return dict(
        num_classes=num_classes,
        block=block,
        convention=CONVENTIONS[options.convention],
        pad=options.pad_index or 0,
        has_weight=inputs.u is not None,
        has_mask=inputs.mask is not None,
        transform=options.transform,
    )


def forward(options, config: Config, x2, inputs: _Inputs) -> Statistics:
    """Per-row :class:`Statistics` of logits ``x2`` (R, K) (R > 0)."""
    rows, num_classes = x2.shape
    dtype = inputs.params.dtype
    block = _column_block(num_classes, config.block_classes)
    block_rows = min(config.block_rows, rows)
    class_arrays, class_specs = _class_specs(inputs, num_classes)
    kernel = functools.partial(
        _forward_kernel,
        **_static_arguments(options, inputs, num_classes, block),
        with_z=options.with_z,
        sum_scale=lsspec.sum_scale(num_classes),
        dtype=dtype,
        with_stats=options.with_stats,
    )
    row_spec = pl.BlockSpec((block_rows, 1), lambda i: (i, 0))
    num_outputs = 8 if options.with_stats else 5
    outputs = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((rows, 1), dtype)] * num_outputs,
        grid=(pl.cdiv(rows, block_rows),),
        in_specs=[
            pl.BlockSpec((1, NUM_PARAMS), lambda i: (0, 0)),
            pl.BlockSpec((block_rows, 2), lambda i: (i, 0)),
            row_spec,
            *class_specs,
            pl.BlockSpec((block_rows, num_classes), lambda i: (i, 0)),
        ],
        out_specs=[row_spec] * num_outputs,
        interpret=_interpret(config),
        compiler_params=_compiler_params(config, config.forward_warps),
        name="lsjax_smoothed_cross_entropy_forward",
    )(inputs.params, inputs.rows, inputs.w_y, *class_arrays, x2)
    return Statistics(*(out.reshape(-1) for out in outputs))


def backward(options, config: Config, x2, inputs: _Inputs, coefficients) -> jax.Array:
    """The gradient with respect to ``x2`` (R, K), in its dtype, from the per-row
    ``coefficients`` (R, NUM_COEFFICIENTS) [peak, log_sum, a, b, cy, cp]."""
    rows, num_classes = x2.shape
    block = _column_block(num_classes, config.block_classes)
    block_rows = min(config.block_rows, rows)
    class_arrays, class_specs = _class_specs(inputs, num_classes)
    kernel = functools.partial(
        _backward_kernel,
        **_static_arguments(options, inputs, num_classes, block),
        dtype=inputs.params.dtype,
    )
    row_block = pl.BlockSpec((block_rows, num_classes), lambda i: (i, 0))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype),
        grid=(pl.cdiv(rows, block_rows),),
        in_specs=[
            pl.BlockSpec((block_rows, 2), lambda i: (i, 0)),
            pl.BlockSpec((block_rows, NUM_COEFFICIENTS), lambda i: (i, 0)),
            *class_specs,
            row_block,
        ],
        out_specs=row_block,
        interpret=_interpret(config),
        compiler_params=_compiler_params(config, config.backward_warps),
        name="lsjax_smoothed_cross_entropy_backward",
    )(inputs.rows, coefficients, *class_arrays, x2)


def _coefficients(options, inputs: _Inputs, stats: Statistics, g, g_z):
    """The backward's per-row ``[peak, log_sum, a, b, cy, cp]`` (``lstorch.smoothed.
    _row_loss_gradient``'s): ``a = g A + 2 z lse (g + g_z)`` with ``A = (1 - eps) w_y +
    (eps / |S|) W_row``, ``b = g eps / |S|``, ``cy`` the label's correction, ``cp`` the pad's."""
    params = inputs.params[0]
    eps, size = params[EPS], params[SIZE]
    w_y = inputs.w_y[:, 0]
    counted = inputs.rows[:, 1] != NOT_COUNTED
    per_class = eps / size
    support_weight = params[TOTAL_WEIGHT]
    on_true = (1.0 - eps) * w_y
    correction = -on_true
    if options.convention != "uniform":
        support_weight = support_weight - w_y
        u_y = w_y
        if inputs.mask is not None:
            u_y = u_y * inputs.mask[0, inputs.rows[:, 0]].astype(w_y.dtype)
        correction = correction + per_class * u_y  # y is not in the support
    pad_mass = jnp.zeros_like(w_y)
    if options.convention == "others_but_pad":
        support_weight = support_weight - params[PAD_WEIGHT]
        pad_mass = g * per_class * params[PAD_WEIGHT]
    peak = jnp.where(counted, stats.peak, 0.0)
    log_sum = jnp.where(counted, stats.log_sum, 0.0)
    scale = g * (on_true + per_class * support_weight)
    if options.with_z:
        scale = scale + 2.0 * params[Z] * (peak + log_sum) * (g + g_z)
    columns = [peak, log_sum, scale, g * per_class, g * correction, pad_mass]
    return jnp.stack([c.astype(w_y.dtype) for c in columns], axis=-1)


def _as_rows(x):
    return x.reshape(-1, x.shape[-1])


def _statistics(options, config, x, labels, counted, eps, weight, class_mask, z):
    inputs = _inputs(options, x.shape[-1], labels, counted, eps, weight, class_mask, z)
    if math.prod(labels.shape) == 0:  # no rows: no program to run
        empty = jnp.zeros((0,), eps.dtype)
        return inputs, Statistics(*[empty] * (8 if options.with_stats else 5))
    return inputs, forward(options, config, _as_rows(x), inputs)


def _outputs(options, stats: Statistics, shape):
    """``lsjax.smoothed._row_loss``'s result: the loss, (loss, z_part) with ``with_z``, and the
    (lse, entropy, correct) rows last with ``with_stats``."""
    loss = (stats.loss.reshape(shape),)
    if options.with_z:
        loss = (*loss, stats.z_part.reshape(shape))
    if options.with_stats:
        row_stats = (stats.lse, stats.entropy, stats.correct)
        return (*loss, tuple(value.reshape(shape) for value in row_stats))
    return loss if options.with_z else loss[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _row_loss(options, config, x, labels, counted, eps, weight, class_mask, z):
    _, stats = _statistics(options, config, x, labels, counted, eps, weight, class_mask, z)
    return _outputs(options, stats, labels.shape)


def _row_loss_forward(options, config, x, labels, counted, eps, weight, class_mask, z):
    _, stats = _statistics(options, config, x, labels, counted, eps, weight, class_mask, z)
    saved = (x, labels, counted, eps, weight, class_mask, z, stats.peak, stats.log_sum, stats.slope)
    return _outputs(options, stats, labels.shape), saved


def _row_loss_backward(options, config, saved, cotangents):
    """``(d x, d eps, d z)``: the backward kernel; ``sum_rows g slope_row`` and
    ``sum_rows (g + g_z) lse_row**2`` (0 on rows that do not count, NaN from invalid ones).
    Labels, masks and class weights are constants (no cotangent)."""
    x, labels, counted, eps, weight, class_mask, z, peak, log_sum, slope = saved
    if options.with_stats:  # the statistics are constants: their cotangents are dropped
        cotangents = cotangents[:-1] if options.with_z else cotangents[0]
    g, g_z = cotangents if options.with_z else (cotangents, None)
    g = g.reshape(-1).astype(eps.dtype)
    g_z = None if g_z is None else g_z.reshape(-1).astype(eps.dtype)
    inputs = _inputs(options, x.shape[-1], labels, counted, eps, weight, class_mask, z)
    state = inputs.rows[:, 1]

    def total(per_row):  # a select, not a product: g may be anything on rows that do not count
        per_row = jnp.where(state == INVALID, jnp.nan, per_row)
        return jnp.sum(jnp.where(state == NOT_COUNTED, 0.0, per_row))

    d_eps = total(g * slope).reshape(eps.shape)
    d_z = None
    if z is not None:
        lse = peak + log_sum
        d_z = total((g if g_z is None else g + g_z) * lse * lse).astype(z.dtype).reshape(z.shape)
    if math.prod(labels.shape) == 0:
        d_x = jnp.zeros_like(x)
    else:
        stats = Statistics(None, None, peak, log_sum, slope)
        coefficients = _coefficients(options, inputs, stats, g, g_z)
        d_x = backward(options, config, _as_rows(x), inputs, coefficients).reshape(x.shape)
    return d_x, None, None, d_eps, None, None, d_z


_row_loss.defvjp(_row_loss_forward, _row_loss_backward)


# One compiled program per (options, config, shapes), as lsjax.smoothed's _row_loss_jit: inside a
# user's jit it is inlined.
_row_loss_jit = jax.jit(_row_loss, static_argnums=(0, 1))


def row_loss(options, x, labels, counted, eps, weight, class_mask, z, *, config=None):
    """The core of ``lsjax.smoothed_cross_entropy`` on the kernels: ``lsjax.smoothed._row_loss``'s
    arguments and result (the per-row loss, with ``options.with_z`` also the z-part), ``x``
    (..., K) with the classes last. Differentiable in ``x``, ``eps`` and ``z`` (reverse mode).
    ``config``: a :class:`Config` (default: :func:`default_config`, read at each call)."""
    config = config or default_config()
    return _row_loss_jit(options, config, x, labels, counted, eps, weight, class_mask, z)
