"""GPU forward+backward time of the label-smoothed losses, their peers and the bandwidth floor.

Every row is checked against a reference BEFORE it is timed: a row whose loss or gradient is
wrong is not timed, and says why (``WRONG VALUES, not timed: ...``); a peer that is not installed
says ``not available: <reason>``; the other rows run either way. The reference is a float64
computation that is not the code under test: the closed form of uniform label smoothing
(``F.cross_entropy(label_smoothing=eps)``'s target, SEMANTICS.md §1) written in NumPy for the
sampled rows' loss and gradient, and in the framework's own float64 ops for the batch mean.
The inputs make the smoothing matter: each row's label logit is raised by ``LABEL_BOOST``, so a
row that ignored ``eps`` would be off by ~15% in the loss and 10% at the label's gradient.

The floor (benchmarks/RESULTS.md): forward+backward that returns the gradient of the logits
must read them in forward, read them again in backward and write the gradient: 3 x the logits'
bytes, at the bandwidth a device-to-device ``copy_`` reaches in the same run (counting bytes read
and written). "% of floor" is ``floor time / measured time``.

Parts (``--part``; each in its own process: JAX and PyTorch must not share the GPU's memory):

* ``torch``: ``copy_``; lstorch on its Triton kernels, in place (``inplace_backward=True``) and
  not, and under ``torch.compile(fullgraph=True)`` (the kernels are operators the compiled graph
  calls); each kernel alone; ``F.cross_entropy(label_smoothing=0.1)``; Liger-Kernel's
  ``LigerCrossEntropyLoss(label_smoothing=0.1)``; the per-call cost at K = 256 (lstorch and
  ``F.cross_entropy``); peak memory; whether a call with the default ``check_labels=None`` is
  free of host syncs (``torch.cuda.set_sync_debug_mode("error")``) and replays under CUDA-graph
  capture.
* ``jax``: ``jit(value_and_grad)`` of lsjax on XLA and on its Pallas kernels
  (``implementation="pallas"``), each also with the logits donated; the optax route
  (``softmax_cross_entropy(x, smooth_labels(one_hot(y), eps))``); XLA's ``x + 1``.
* ``fused-torch`` / ``fused-jax``: the LM head (hidden N x D, weight V x D, bf16): both
  frameworks' fused loss against the dense path (``F.linear`` then the loss), Liger's
  ``LigerFusedLinearCrossEntropyLoss(label_smoothing=...)`` and cut-cross-entropy's
  ``linear_cross_entropy`` (at smoothing 0: it has none); time and peak memory.
* ``large-torch`` / ``large-jax``: rows x K > 2^31 elements, to catch an int32 offset overflow:
  the per-row loss and the gradient of rows past element 2^31 against the float64 oracle.

Times are medians of ``--reps`` runs after warm-up, interleaved within each part: CUDA events
(torch, after a synchronize, so the host's per-call cost shows) or ``block_until_ready`` (JAX).
``--dry-run`` runs every part and every value check at tiny shapes in this process, on the CPU
(Triton's interpreter, Pallas's interpret mode) when there is no GPU, skipping the peers that
cannot run there; it is how CI tests this script. ``--summary FILE...`` reads the parts' JSON
and says, target by target, met or missed. Usage::

    python benchmarks/bench_gpu.py --part torch [--dtype bfloat16] [--reps 20] [--json FILE]
    python benchmarks/bench_gpu.py --dry-run
    python benchmarks/bench_gpu.py --summary out/*.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
import traceback

import numpy as np

SMOOTHING = 0.1
LABEL_BOOST = 8.0  # added to each row's label logit (see the module docstring)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The kernels' (BLOCK, num_warps) grid of ``--sweep`` (the defaults: lstorch.triton_kernels).
SWEEP = [(block, warps) for block in (2048, 4096, 8192, 16384, 32768) for warps in (4, 8, 16, 32)]
PARTS = ("torch", "jax", "fused-torch", "fused-jax", "large-torch", "large-jax")
# (full run, --dry-run) shapes. A dry run's kernels run in Triton's interpreter, one program per
# row in turn (about 20 ms a row there), so its Triton rows are few: 4, and 6 for "large".
MAIN_SHAPE = ((8192, 131072), (4, 300))
SMALL_CLASSES = 256  # the per-call cost: kernels with nothing to do
FUSED_SHAPE = ((8192, 4096, 128256), (16, 32, 300))
# 17408 x 131072 = 2^31 + 2^27 elements: the rows from 16384 on start past element 2^31.
LARGE_SHAPE = ((17408, 131072), (6, 300))
# The rows the targets compare (the summary reads them by name).
COPY = "copy (read + write the logits once)"
XLA_COPY = "XLA x + 1 (read + write once)"
LIGER_CE = "Liger LigerCrossEntropyLoss(label_smoothing=0.1)"
OPTAX = "optax route (one-hot, smooth_labels)"
PER_CALL = f"lstorch (Triton) at K = {SMALL_CLASSES}: per-call cost"
PER_CALL_TORCH = f"F.cross_entropy at K = {SMALL_CLASSES}"
# The GPU targets (benchmarks/RESULTS.md, "The targets it reports", under run 4).
TARGET_PCT_OF_FLOOR = 85.0
TARGET_PER_CALL_RATIO = 1.5

# Tolerances by how a row computes: "exact" accumulates in float32 from the given inputs and
# rounds its result once (lstorch, lsjax, the fused losses); "rounded" goes through logits or
# log-probabilities in the input's dtype (F.cross_entropy, optax, Liger, the dense bf16 head).
# "tf32": the fused head with TF32 matmuls on bf16 operands (exact in TF32), whose backward rounds
# its float32 coefficients to TF32's 10-bit mantissa before the products.
# (loss rtol, gradient rtol, gradient atol as a fraction of the terms' magnitude: see
# check_values).
TOLERANCES = {
    ("exact", "bfloat16"): (1e-4, 2.0**-7, 1e-6),
    ("tf32", "bfloat16"): (1e-4, 2.0**-7, 2.0**-10),
    ("exact", "float32"): (1e-5, 1e-4, 1e-7),
    ("rounded", "bfloat16"): (1e-2, 2.0**-4, 2.0**-6),
    ("rounded", "float32"): (1e-4, 1e-3, 1e-6),
}


class WrongValue(Exception):
    """A row's loss or gradient is not the reference's: the row is not timed."""


class Unavailable(Exception):
    """A row cannot run here (a peer not installed, no GPU): it is skipped, the rest runs."""


# --------------------------------------------------------------------------------------------
# The float64 oracle and the checks (framework-free)


def reference_rows(x, labels, smoothing, scale):
    """Per-row loss and gradient of uniform label-smoothed cross-entropy, in float64 NumPy:
    ``q = (1 - eps) onehot(y) + eps / K``, ``loss = lse - sum_c q_c x_c``,
    ``grad = scale * (softmax(x) - q)`` (``scale`` the upstream gradient per row)."""
    x = np.asarray(x, np.float64)
    index = np.arange(x.shape[0])
    peak = x.max(axis=-1, keepdims=True)
    lse = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=-1))
    loss = lse - (1 - smoothing) * x[index, labels] - smoothing * x.mean(axis=-1)
    target = np.full(x.shape, smoothing / x.shape[-1])
    target[index, labels] += 1 - smoothing
    grad = np.asarray(scale, np.float64).reshape(-1, 1) * (np.exp(x - lse[:, None]) - target)
    return loss, grad


def sample_rows(rows, num_classes, count=32, seed=1):
    """The rows whose gradient is checked: the first and last two, the first past element
    2^31 (and the one before it) when there is one, and random ones."""
    chosen = {0, 1, rows // 2, rows - 2, rows - 1}
    boundary = -(-(2**31) // num_classes)  # first row that starts past element 2^31 - 1
    if boundary < rows:
        chosen |= {boundary - 1, boundary, min(boundary + 1, rows - 1)}
    rng = np.random.default_rng(seed)
    chosen |= set(rng.integers(0, rows, max(count - len(chosen), 0)).tolist())
    return sorted(index for index in chosen if 0 <= index < rows)


def check_values(name, kind, dtype, *, loss=None, want_loss=None, grads=()):
    """Compare a row's scalar ``loss`` (relative) and each ``(what, got, want[, magnitude])``
    array (elementwise, ``|got - want| <= rtol |want| + atol``, atol a fraction of
    ``magnitude``: the size of the terms the entries are differences of, e.g. the upstream
    gradient ``g`` of ``g (softmax - q)``; by default the largest ``|want|``) with the
    reference; print one line; raise :class:`WrongValue` if any is off."""
    loss_rtol, grad_rtol, atol_fraction = TOLERANCES[kind, dtype]
    parts, failures = [], []
    if loss is not None:
        loss_error = abs(float(loss) - float(want_loss)) / abs(float(want_loss))
        parts.append(f"loss rel err {loss_error:.2g} (<= {loss_rtol:.2g})")
        if not loss_error <= loss_rtol:  # NaN fails too
            failures.append(f"loss {float(loss):.8g}, reference {float(want_loss):.8g}")
    for what, got, want, *magnitude in grads:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if got.shape != want.shape:
            failures.append(f"{what}: shape {got.shape}, reference {want.shape}")
            continue
        atol = atol_fraction * float(magnitude[0] if magnitude else np.max(np.abs(want)))
        error = np.abs(got - want)
        excess = error - (grad_rtol * np.abs(want) + atol)
        parts.append(f"{what} max |err| {float(np.max(error)):.3g} (atol {atol:.2g})")
        if not np.all(np.isfinite(got)) or np.any(~(excess <= 0)):
            worst = np.unravel_index(
                np.nanargmax(np.where(np.isfinite(excess), excess, np.inf)), excess.shape
            )
            failures.append(
                f"{what}[{', '.join(map(str, worst))}] = {got[worst]:.6g}, reference "
                f"{want[worst]:.6g} (rtol {grad_rtol:.2g}, atol {atol:.2g})"
            )
    line = f"value check {name}: " + "; ".join(parts)
    print(line, flush=True)
    if failures:
        raise WrongValue("; ".join(failures))
    return line


@contextlib.contextmanager
def _time_limit(seconds):
    """Raise ``TimeoutError`` in this (main) thread after ``seconds``: a row whose compilation
    hangs fails alone instead of taking its whole part past the script's ``timeout``."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"its check took over {seconds:g} s (compiling?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Rows:
    """The rows of one part: each is checked (and so warmed up) when added, and timed only if
    its check passed; every other outcome is recorded with its reason. A check that takes more
    than ``limit`` seconds fails its row."""

    def __init__(self, limit=None):
        self.limit = limit
        self.entries = {}  # name -> (prepare, call, passes)
        self.checks, self.wrong, self.failed, self.unavailable = {}, {}, {}, {}
        self.seconds = {}

    def add(self, name, make, passes=None):
        """``make()`` checks the row's values and returns ``(prepare, call)``: ``call(prepare())``
        is what is timed (``prepare``, e.g. a fresh copy of logits the call overwrites, is not).
        ``passes``: how many passes over the logits the row makes (for "% of floor")."""
        start = time.perf_counter()
        try:
            with _time_limit(self.limit):
                prepare, call, line = make()
        except Unavailable as error:
            print(f"{name}: not available: {error}", flush=True)
            self.unavailable[name] = str(error)
        except WrongValue as error:
            print(f"{name}: WRONG VALUES, not timed: {error}", flush=True)
            self.wrong[name] = str(error)
        except Exception as error:  # a row that crashes must not stop the others
            traceback.print_exc(limit=3)
            message = f"{type(error).__name__}: {str(error)[:500]}"
            print(f"{name}: FAILED, not timed: {message}", flush=True)
            self.failed[name] = message
        else:
            self.entries[name] = (prepare, call, passes)
            self.checks[name] = line
        self.seconds[name] = time.perf_counter() - start  # compilation and check

    def time(self, timed, reps, warmup=2):
        """Medians (ms) of ``reps`` interleaved runs, after ``warmup`` runs of each row (its
        value check ran it once already)."""
        samples = {name: [] for name in self.entries}
        for rep in range(-warmup, reps):
            for name, (prepare, call, _) in list(self.entries.items()):
                try:
                    argument = prepare()
                    elapsed = timed(call, argument)
                    del argument
                except Exception as error:  # e.g. out of memory: this row only
                    message = f"while timing: {type(error).__name__}: {str(error)[:500]}"
                    print(f"{name}: FAILED, not timed: {message}", flush=True)
                    self.failed[name] = message
                    del self.entries[name], samples[name]
                    continue
                if rep >= 0:
                    samples[name].append(elapsed)
        return {name: statistics.median(values) for name, values in samples.items() if values}

    def record(self, medians, logits_bytes=None, bandwidth=None):
        rows = {}
        for name, median in medians.items():
            passes = self.entries[name][2]
            row = {"median_ms": median, "passes": passes}
            if passes and bandwidth:
                row["pct_of_floor"] = 100 * passes * logits_bytes / bandwidth * 1e3 / median
            rows[name] = row
        return {
            "rows": rows,
            "checks": self.checks,
            "wrong": self.wrong,
            "failed": self.failed,
            "unavailable": self.unavailable,
            "check_seconds": self.seconds,
        }


def _peer(module, attribute):
    """``module.attribute`` of a peer library, or :class:`Unavailable` saying why not."""
    try:
        return getattr(__import__(module, fromlist=[attribute]), attribute)
    except Exception as error:  # ImportError, or whatever its import raises on this machine
        raise Unavailable(
            f"cannot import {attribute} from {module} ({type(error).__name__}: "
            f"{str(error)[:200]}); benchmarks/fetch_wheels.sh fetches it"
        ) from error


# --------------------------------------------------------------------------------------------
# PyTorch


def _torch_setup(args):
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # A dry run: the kernels in Triton's interpreter (TRITON_INTERPRET=1, set by main()).
        os.environ["LSTORCH_TRITON"] = "all"

    def timed(call, argument):
        if device.type != "cuda":
            start = time.perf_counter()
            call(argument)
            return 1e3 * (time.perf_counter() - start)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        call(argument)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return torch, device, timed


def _needs_cuda(device, what):
    if device.type != "cuda":
        raise Unavailable(
            f"{what} needs a CUDA GPU (its Triton kernels do not run in Triton's interpreter)"
        )


def _torch_logits(torch, rows, num_classes, dtype, device, seed):
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(0, num_classes, (rows,), device=device, generator=generator)
    logits = torch.randn(rows, num_classes, device=device, dtype=dtype, generator=generator)
    logits[torch.arange(rows, device=device), labels] += LABEL_BOOST
    return logits, labels


def _torch_mean_loss64(torch, logits, labels, smoothing, chunk=1024):
    """The batch-mean loss in float64 on the device, a chunk of rows at a time."""
    total = 0.0
    for start in range(0, logits.shape[0], chunk):
        x = logits[start : start + chunk].double()
        y = labels[start : start + chunk]
        lse = torch.logsumexp(x, dim=-1)
        x_y = x.gather(1, y[:, None])[:, 0]
        total += float((lse - (1 - smoothing) * x_y - smoothing * x.mean(dim=-1)).sum())
    return total / logits.shape[0]


@contextlib.contextmanager
def _counting_kernels():
    """Counts calls of ``lstorch.triton_kernels.forward``/``backward`` (which the operators
    ``torch.ops.lstorch.smoothed_rows*`` call, compiled graphs included)."""
    from lstorch import triton_kernels

    counter = {"calls": 0}
    originals = triton_kernels.forward, triton_kernels.backward

    def counted(original):
        def call(*args, **kwargs):
            counter["calls"] += 1
            return original(*args, **kwargs)

        return call

    triton_kernels.forward, triton_kernels.backward = map(counted, originals)
    try:
        yield counter
    finally:
        triton_kernels.forward, triton_kernels.backward = originals


class _TorchRowCase:
    """One logits shape of the torch part: inputs, the reference, and how a row is checked."""

    def __init__(self, torch, device, dtype_name, rows, num_classes, seed):
        self.torch = torch
        self.dtype_name = dtype_name
        self.logits, self.labels = _torch_logits(
            torch, rows, num_classes, getattr(torch, dtype_name), device, seed
        )
        self.rows = rows
        self.sample = sample_rows(rows, num_classes)
        index = torch.tensor(self.sample, device=device)
        self.index = index
        x_sample = self.logits[index].double().cpu().numpy()
        y_sample = self.labels[index].cpu().numpy()
        self.want_row_loss, self.want_grad = reference_rows(
            x_sample, y_sample, SMOOTHING, np.full(len(self.sample), 1.0 / rows)
        )
        self.want_loss = _torch_mean_loss64(torch, self.logits, self.labels, SMOOTHING)

    def leaf(self, fresh):
        """The logits as a tensor that requires grad: for a row that overwrites its input
        (Liger, ``inplace_backward``) a fresh copy, computed by the graph (``clone`` of a leaf:
        ``inplace_backward`` refuses a leaf and a view of one), else the same leaf every time."""
        if not hasattr(self, "_shared"):
            self._shared = self.logits.detach().requires_grad_(True)
        return self._shared.clone() if fresh else self._shared

    def row(self, name, loss_fn, kind="exact", fresh=False, inplace=False, kernels=False):
        """``make`` for :meth:`Rows.add`: mean loss and ``torch.autograd.grad`` of the logits
        (``inplace`` rows take ``fresh`` ones); ``kernels`` requires that lstorch's Triton
        kernels ran."""
        torch = self.torch
        if inplace and not fresh:
            raise ValueError(f"{name}: an inplace_backward row needs fresh=True")

        def call(x):
            loss = loss_fn(x)
            (grad,) = torch.autograd.grad(loss, x)
            return loss, grad

        def make():
            counting = _counting_kernels() if kernels else contextlib.nullcontext({"calls": 1})
            with counting as counter:
                loss, grad = call(self.leaf(fresh=True))
            if counter["calls"] == 0:
                raise WrongValue(
                    "lstorch's Triton kernels did not run (the call fell back to "
                    "plain torch ops), so this is not the row it says it is"
                )
            line = check_values(
                name,
                kind,
                self.dtype_name,
                loss=float(loss.detach()) if hasattr(loss, "detach") else float(loss),
                want_loss=self.want_loss,
                grads=[
                    ("grad", grad[self.index].double().cpu().numpy(), self.want_grad, 1 / self.rows)
                ],
            )
            return (lambda: self.leaf(fresh)), call, line

        return make


def torch_part(args) -> dict:
    import torch.nn.functional as F

    import lstorch

    torch, device, timed = _torch_setup(args)
    rows, num_classes = args.shape
    main = _TorchRowCase(torch, device, args.dtype, rows, num_classes, seed=0)
    small = _TorchRowCase(torch, device, args.dtype, rows, SMALL_CLASSES, seed=2)
    logits_bytes = main.logits.numel() * main.logits.element_size()
    result_rows = Rows(args.row_limit)

    def lstorch_loss(labels, inplace=False):
        # check_labels=None, the default, spelled out: on CUDA it reads nothing back (no label
        # check, no bool(tensor)), which the "sync-free" and "CUDA graph" properties test and
        # every timed row relies on; True would make each call wait for the stream.
        return lambda x: lstorch.smoothed_cross_entropy(
            x,
            labels,
            smoothing=SMOOTHING,
            reduction="mean",
            inplace_backward=inplace,
            check_labels=None,
        )

    copy_destination = torch.empty_like(main.logits)

    def copy_row():
        line = "value check copy: (a copy)"
        return (lambda: main.logits), (lambda x: copy_destination.copy_(x)), line

    result_rows.add(COPY, copy_row, passes=2)
    result_rows.add(
        "lstorch (Triton, inplace_backward)",
        main.row(
            "lstorch (Triton, inplace_backward)",
            lstorch_loss(main.labels, True),
            fresh=True,
            inplace=True,
            kernels=True,
        ),
        passes=3,
    )
    result_rows.add(
        "lstorch (Triton)",
        main.row("lstorch (Triton)", lstorch_loss(main.labels), kernels=True),
        passes=3,
    )

    def compiled_row():
        compiled = torch.compile(
            lstorch_loss(main.labels), fullgraph=True, backend=args.compile_backend
        )
        return main.row("lstorch (torch.compile)", compiled, kernels=True)()

    result_rows.add("lstorch (torch.compile, fullgraph)", compiled_row, passes=3)
    result_rows.add(
        "F.cross_entropy(label_smoothing=0.1)",
        main.row(
            "F.cross_entropy",
            lambda x: F.cross_entropy(x, main.labels, label_smoothing=SMOOTHING),
            kind="rounded",
        ),
        passes=3,
    )

    def liger_row():
        _needs_cuda(device, "Liger-Kernel")
        liger = _peer("liger_kernel.transformers", "LigerCrossEntropyLoss")
        loss = liger(label_smoothing=SMOOTHING, reduction="mean")
        # Liger writes the gradient into its input in forward: a fresh copy each time.
        return main.row("Liger CE", lambda x: loss(x, main.labels), kind="rounded", fresh=True)()

    result_rows.add(LIGER_CE, liger_row, passes=3)
    _kernel_rows(torch, main, result_rows, sweep=args.sweep)
    result_rows.add(
        PER_CALL,
        small.row("lstorch at K = 256", lstorch_loss(small.labels), kernels=True),
    )
    result_rows.add(
        PER_CALL_TORCH,
        small.row(
            "F.cross_entropy at K = 256",
            lambda x: F.cross_entropy(x, small.labels, label_smoothing=SMOOTHING),
            kind="rounded",
        ),
    )
    medians = result_rows.time(timed, args.reps, args.warmup)
    copy_ms = medians.get(COPY)
    bandwidth = 2 * logits_bytes / (copy_ms / 1e3) if copy_ms else None
    result = result_rows.record(medians, logits_bytes, bandwidth)
    result.update(
        part="torch",
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
        versions={"torch": torch.__version__, "triton": __import__("triton").__version__},
        shape=[rows, num_classes],
        dtype=args.dtype,
        logits_bytes=logits_bytes,
        copy_bandwidth_TBps=bandwidth / 1e12 if bandwidth else None,
        floor_ms=3 * logits_bytes / bandwidth * 1e3 if bandwidth else None,
        peak_memory_bytes=_torch_peaks(torch, device, result_rows),
        properties=_torch_properties(torch, device, small, lstorch_loss(small.labels)),
    )
    return result


def _kernel_rows(torch, case, result_rows, sweep=False):
    """Each Triton kernel alone (forward: 1 read; backward: 1 read + 1 write), called through
    ``lstorch.triton_kernels.forward``/``backward`` with the scalars in the layout that module
    documents, ``[eps, |S|, sum_c u_c, u_pad, z, KL constant]`` (uniform, no weight, no mask:
    ``[eps, K, K, 0, 0, 0]``). The rows are checked like the others (forward: the per-row loss;
    backward: the gradient), so a change of that layout shows as a wrong value, not a time.
    ``sweep``: also each (BLOCK, num_warps) of a grid, each configuration checked too."""
    try:
        from lstorch import triton_kernels
    except ImportError as error:
        result_rows.unavailable["kernels alone"] = str(error)
        print(f"kernels alone: not available: {error}")
        return
    x, labels, rows = case.logits, case.labels, case.rows
    num_classes = x.shape[-1]
    params = torch.tensor([SMOOTHING, num_classes, num_classes, 0.0, 0.0, 0.0], device=x.device)
    call = dict(
        labels=labels,
        counted=labels >= 0,
        params=params,
        weight=None,
        class_mask=None,
        convention="uniform",
        pad_index=None,
        with_z=False,
    )
    upstream = torch.full((rows,), 1.0 / rows, device=x.device)
    out = torch.empty_like(x)

    def forward_row(config=None):
        loss = triton_kernels.forward(x, **call, config=config)[0]
        line = check_values(
            f"forward kernel {config or ''}".strip(),
            "exact",
            case.dtype_name,
            grads=[("row loss", loss[case.index].double().cpu().numpy(), case.want_row_loss)],
        )
        return (lambda: x), (lambda x: triton_kernels.forward(x, **call, config=config)), line

    def backward_row(config=None):
        _, _, peak, log_sum, *_ = triton_kernels.forward(x, **call)

        def backward(x):
            return triton_kernels.backward(
                x,
                out,
                peak=peak,
                log_sum=log_sum,
                grad=upstream,
                grad_z=None,
                **call,
                config=config,
            )

        out.zero_()
        backward(x)
        line = check_values(
            f"backward kernel {config or ''}".strip(),
            "exact",
            case.dtype_name,
            grads=[("grad", out[case.index].double().cpu().numpy(), case.want_grad, 1 / rows)],
        )
        return (lambda: x), backward, line

    result_rows.add("forward kernel alone (1 read)", forward_row, passes=1)
    result_rows.add("backward kernel alone (1 read + 1 write)", backward_row, passes=2)
    for config in SWEEP if sweep else ():
        block, warps = config
        result_rows.add(
            f"sweep: forward BLOCK={block} warps={warps}",
            lambda config=config: forward_row(config),
            passes=1,
        )
        result_rows.add(
            f"sweep: backward BLOCK={block} warps={warps}",
            lambda config=config: backward_row(config),
            passes=2,
        )


def _torch_peaks(torch, device, result_rows):
    """Peak memory of one call of each lstorch/peer row above what was allocated before it
    (the input included in "before"), in bytes."""
    if device.type != "cuda":
        return {}
    peaks = {}
    for name, (prepare, call, passes) in result_rows.entries.items():
        if passes != 3:
            continue
        argument = prepare()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call(argument)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - before
        del argument
    return peaks


def _torch_properties(torch, device, case, loss_fn):
    """No host sync in forward+backward (``set_sync_debug_mode("error")``), and a CUDA graph of
    forward+backward replays with the eager values; each as "yes" or "no: <why>". Not timed,
    and a "no" does not stop the run: it is what the summary reports."""
    if device.type != "cuda":
        return {"sync-free": "not measured (no GPU)", "CUDA graph": "not measured (no GPU)"}
    properties = {}
    leaf = case.logits.clone().requires_grad_(True)

    def step(x):
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss, x)
        return loss, grad

    step(leaf)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        step(leaf)
        properties["sync-free"] = "yes"
    except Exception as error:
        properties["sync-free"] = f"no: {type(error).__name__}: {str(error)[:300]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step(leaf)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss, static_grad = step(leaf)
        other = torch.randn_like(case.logits)
        with torch.no_grad():
            leaf.copy_(other)
        graph.replay()
        torch.cuda.synchronize()
        want_loss, want_grad = step(other.clone().requires_grad_(True))
        same = torch.allclose(static_loss, want_loss) and torch.allclose(static_grad, want_grad)
        properties["CUDA graph"] = "yes" if same else "no: the replay's values differ from eager"
    except Exception as error:
        properties["CUDA graph"] = f"no: {type(error).__name__}: {str(error)[:300]}"
    for name, value in properties.items():
        print(f"{name}: {value}", flush=True)
    return properties


def fused_torch_part(args) -> dict:
    import torch.nn.functional as F

    import lstorch

    torch, device, timed = _torch_setup(args)
    rows, hidden_size, vocab = args.fused_shape
    dtype = getattr(torch, args.dtype)
    hidden, weight, labels = _torch_head(torch, rows, hidden_size, vocab, dtype, device)
    sample = sample_rows(rows, vocab, count=16)
    classes = sorted(set(labels[sample[:8]].tolist()) | set(range(0, vocab, vocab // 8)))
    reference = _torch_fused_reference(torch, hidden, weight, labels, sample, classes)
    row_index, class_index = (torch.tensor(i, device=device) for i in (sample, classes))
    result_rows = Rows(args.row_limit)

    def head_row(name, loss_fn, kind, smoothing=SMOOTHING, tf32=False):
        def call(leaves):
            h, w = leaves
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                loss = loss_fn(h, w)
                grads = torch.autograd.grad(loss, (h, w))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
            return loss, grads

        def prepare():
            return hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)

        def make():
            loss, (d_hidden, d_weight) = call(prepare())
            want_loss, want_d_hidden, want_d_weight = reference[smoothing]
            line = check_values(
                name,
                kind,
                args.dtype,
                loss=float(loss.detach()) if hasattr(loss, "detach") else float(loss),
                want_loss=want_loss,
                grads=[
                    ("d hidden", d_hidden[row_index].double().cpu().numpy(), want_d_hidden),
                    ("d weight", d_weight[class_index].double().cpu().numpy(), want_d_weight),
                ],
            )
            return prepare, call, line

        return make

    result_rows.add(
        "lstorch fused (chunk 2048)",
        head_row(
            "lstorch fused",
            lambda h, w: lstorch.fused_linear_smoothed_cross_entropy(
                h, w, labels, smoothing=SMOOTHING
            ),
            "exact",
        ),
    )
    if device.type == "cuda" and args.dtype == "bfloat16":  # bf16 operands are exact in TF32
        result_rows.add(
            "lstorch fused, matmul.allow_tf32",
            head_row(
                "lstorch fused (TF32)",
                lambda h, w: lstorch.fused_linear_smoothed_cross_entropy(
                    h, w, labels, smoothing=SMOOTHING
                ),
                "tf32",
                tf32=True,
            ),
        )
    result_rows.add(
        "dense: F.linear + lstorch (Triton, inplace_backward)",
        head_row(
            "dense + lstorch",
            lambda h, w: lstorch.smoothed_cross_entropy(
                F.linear(h, w), labels, smoothing=SMOOTHING, reduction="mean", inplace_backward=True
            ),
            "rounded",
        ),
    )
    result_rows.add(
        "dense: F.linear + F.cross_entropy",
        head_row(
            "dense + F.cross_entropy",
            lambda h, w: F.cross_entropy(F.linear(h, w), labels, label_smoothing=SMOOTHING),
            "rounded",
        ),
    )

    def liger_row():
        _needs_cuda(device, "Liger-Kernel")
        liger = _peer("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
        loss = liger(label_smoothing=SMOOTHING)
        return head_row("Liger FLCE", lambda h, w: loss(w, h, labels), "rounded")()

    def cce_row():
        _needs_cuda(device, "cut-cross-entropy")
        linear_cross_entropy = _peer("cut_cross_entropy", "linear_cross_entropy")
        return head_row(
            "cut-cross-entropy (eps 0)",
            lambda h, w: linear_cross_entropy(h, w, labels),
            "rounded",
            smoothing=0.0,
        )()

    result_rows.add("Liger LigerFusedLinearCrossEntropyLoss(label_smoothing=0.1)", liger_row)
    result_rows.add("cut-cross-entropy linear_cross_entropy (smoothing 0: it has none)", cce_row)
    medians = result_rows.time(timed, args.fused_reps, args.warmup)
    result = result_rows.record(medians)
    peaks = {}
    if device.type == "cuda":
        for name, (prepare, call, _) in result_rows.entries.items():
            argument = prepare()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call(argument)
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - before
    result.update(
        part="fused-torch",
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
        shape=[rows, hidden_size, vocab],
        dtype=args.dtype,
        dense_logits_bytes=rows * vocab * hidden.element_size(),
        peak_memory_bytes=peaks,
    )
    return result


def _torch_head(torch, rows, hidden_size, vocab, dtype, device, seed=0):
    """hidden (N, D), weight (V, D) ~ N(0, 1/D) and labels, with each row's label logit raised
    by about ``LABEL_BOOST`` (hidden moved along its label's weight row)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    weight = torch.randn(vocab, hidden_size, device=device, generator=generator)
    weight /= math.sqrt(hidden_size)
    hidden = torch.randn(rows, hidden_size, device=device, generator=generator)
    direction = weight[labels]
    hidden += LABEL_BOOST * direction / direction.square().sum(-1, keepdim=True)
    return hidden.to(dtype), weight.to(dtype), labels


def _torch_fused_reference(torch, hidden, weight, labels, sample, classes, chunk=1024):
    """For smoothing 0.1 and 0: the batch-mean loss, d hidden of the ``sample`` rows and
    d weight of the ``classes`` rows, in float64 on the device, from the closed form
    (upstream 1 / N: the mean)."""
    h64, w64 = hidden.double(), weight.double()
    rows, vocab = h64.shape[0], w64.shape[0]
    lse, x_y, x_mean = (torch.empty(rows, dtype=torch.float64, device=h64.device) for _ in range(3))
    for start in range(0, rows, chunk):
        logits = h64[start : start + chunk] @ w64.T
        lse[start : start + chunk] = torch.logsumexp(logits, -1)
        x_y[start : start + chunk] = logits.gather(1, labels[start : start + chunk, None])[:, 0]
        x_mean[start : start + chunk] = logits.mean(-1)
        del logits
    rows_index = torch.tensor(sample, device=h64.device)
    classes_index = torch.tensor(classes, device=h64.device)
    p_rows = torch.exp(h64[rows_index] @ w64.T - lse[rows_index, None])  # (S, V)
    p_classes = torch.exp(h64 @ w64[classes_index].T - lse[:, None])  # (N, C)
    is_label = labels[:, None] == classes_index[None, :]
    reference = {}
    for smoothing in (SMOOTHING, 0.0):
        loss = float((lse - (1 - smoothing) * x_y - smoothing * x_mean).mean())
        q_rows = torch.full_like(p_rows, smoothing / vocab)
        q_rows[torch.arange(len(sample)), labels[rows_index]] += 1 - smoothing
        d_hidden = ((p_rows - q_rows) / rows) @ w64
        q_classes = smoothing / vocab + (1 - smoothing) * is_label.double()
        d_weight = ((p_classes - q_classes) / rows).T @ h64
        reference[smoothing] = (loss, d_hidden.cpu().numpy(), d_weight.cpu().numpy())
    return reference


def large_torch_part(args) -> dict:
    import lstorch

    torch, device, timed = _torch_setup(args)
    rows, num_classes = args.large_shape
    logits, labels = _torch_logits(torch, rows, num_classes, getattr(torch, args.dtype), device, 3)
    sample = sample_rows(rows, num_classes, count=12)
    index = torch.tensor(sample, device=device)
    want_loss, want_grad = reference_rows(
        logits[index].double().cpu().numpy(),
        labels[index].cpu().numpy(),
        SMOOTHING,
        np.ones(len(sample)),
    )
    shared = logits.detach().requires_grad_(True)
    result_rows = Rows(args.row_limit)

    def lstorch_row(name, inplace):
        def call(x):
            per_row = lstorch.smoothed_cross_entropy(
                x, labels, smoothing=SMOOTHING, reduction="none", inplace_backward=inplace
            )
            (grad,) = torch.autograd.grad(per_row.sum(), x)
            return per_row, grad

        def prepare():  # in place: a fresh copy computed by the graph, the call overwrites it
            return shared.clone() if inplace else shared

        def make():
            with _counting_kernels() as counter:
                per_row, grad = call(prepare())
            if counter["calls"] == 0:
                raise WrongValue("lstorch's Triton kernels did not run")
            line = check_values(
                name,
                "exact",
                args.dtype,
                grads=[
                    ("row loss", per_row[index].detach().double().cpu().numpy(), want_loss),
                    ("grad", grad[index].double().cpu().numpy(), want_grad, 1.0),
                ],
            )
            return prepare, call, line

        return make

    result_rows.add("lstorch (Triton)", lstorch_row("lstorch (Triton), large", False), passes=3)
    result_rows.add(
        "lstorch (Triton, inplace_backward)",
        lstorch_row("lstorch (Triton, inplace_backward), large", True),
        passes=3,
    )
    result = result_rows.record(result_rows.time(timed, min(args.reps, 3), args.warmup))
    result.update(
        part="large-torch",
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
        shape=[rows, num_classes],
        dtype=args.dtype,
        elements=rows * num_classes,
        sampled_rows=sample,
    )
    return result


# --------------------------------------------------------------------------------------------
# JAX


def _jax_setup(args):
    import jax

    backend = jax.default_backend()
    if backend != "gpu" and not args.dry_run:
        raise Unavailable(
            f"JAX sees no GPU (default backend {backend!r}, devices {jax.devices()}): this "
            "machine's jaxlib has no CUDA plugin (benchmarks/fetch_wheels.sh --jax-cuda)"
        )

    def timed(call, argument):
        start = time.perf_counter()
        jax.block_until_ready(call(argument))
        return 1e3 * (time.perf_counter() - start)

    return jax, timed


def _x64(jax):
    """A context in which float64 arrays exist (``jax.enable_x64``, or its older home)."""
    enable = getattr(jax, "enable_x64", None)
    if enable is None:
        from jax.experimental import enable_x64 as enable
    return enable(True)


def _jax_logits(jax, rows, num_classes, dtype, seed):
    import jax.numpy as jnp

    @jax.jit  # one program, not one per operation
    def make(key):
        key_labels, key_logits = jax.random.split(key)
        labels = jax.random.randint(key_labels, (rows,), 0, num_classes, dtype=jnp.int32)
        logits = jax.random.normal(key_logits, (rows, num_classes), dtype=getattr(jnp, dtype))
        return logits.at[jnp.arange(rows), labels].add(LABEL_BOOST), labels

    return make(jax.random.PRNGKey(seed))


def _jax_mean_loss64(jax, logits, labels, smoothing, chunk=1024):
    import jax.numpy as jnp

    total = 0.0
    with _x64(jax):

        @jax.jit
        def summed(x, y):
            x = x.astype(jnp.float64)
            lse = jax.nn.logsumexp(x, axis=-1)
            x_y = jnp.take_along_axis(x, y[:, None], axis=-1)[:, 0]
            return jnp.sum(lse - (1 - smoothing) * x_y - smoothing * x.mean(axis=-1))

        for start in range(0, logits.shape[0], chunk):
            total += float(summed(logits[start : start + chunk], labels[start : start + chunk]))
    return total / logits.shape[0]


def _gather_rows(jax, array, sample):
    import jax.numpy as jnp

    return np.asarray(array[jnp.asarray(sample)].astype(jnp.float32), np.float64)


def _uses_pallas(jax, fn, *arguments) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*arguments))


def jax_part(args) -> dict:
    import jax.numpy as jnp
    import optax

    import lsjax

    jax, timed = _jax_setup(args)
    rows, num_classes = args.shape
    logits, labels = _jax_logits(jax, rows, num_classes, args.dtype, seed=0)
    logits_bytes = logits.size * logits.dtype.itemsize
    sample = sample_rows(rows, num_classes)
    _, want_grad = reference_rows(
        _gather_rows(jax, logits, sample),
        np.asarray(labels)[sample],
        SMOOTHING,
        np.full(len(sample), 1.0 / rows),
    )
    want_loss = _jax_mean_loss64(jax, logits, labels, SMOOTHING)
    result_rows = Rows(args.row_limit)

    def lsjax_loss(implementation):
        return lambda x, y: lsjax.smoothed_cross_entropy(
            x, y, smoothing=SMOOTHING, reduction="mean", implementation=implementation
        )

    def optax_loss(x, y):
        targets = optax.smooth_labels(jax.nn.one_hot(y, x.shape[-1], dtype=x.dtype), SMOOTHING)
        return optax.softmax_cross_entropy(x, targets).mean()

    temps = {}

    def row(name, loss_fn, kind="exact", donate=False, pallas=False):
        def prepare():
            if not donate:
                return logits
            fresh = jnp.copy(logits)  # a buffer to give away, made before the clock starts
            return fresh.block_until_ready()

        def make():
            if pallas and not _uses_pallas(jax, jax.value_and_grad(loss_fn), logits, labels):
                raise WrongValue("the program has no pallas_call: the kernels did not run")
            program = jax.jit(jax.value_and_grad(loss_fn), donate_argnums=(0,) if donate else ())
            compiled = program.lower(logits, labels).compile()
            temps[name] = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)

            def call(x):
                return compiled(x, labels)

            loss, grad = call(prepare())
            line = check_values(
                name,
                kind,
                args.dtype,
                loss=float(loss.detach()) if hasattr(loss, "detach") else float(loss),
                want_loss=want_loss,
                grads=[("grad", _gather_rows(jax, grad, sample), want_grad, 1 / rows)],
            )
            return prepare, call, line

        return make

    add = result_rows.add
    add(
        XLA_COPY,
        lambda: (lambda: logits, jax.jit(lambda x: x + 1), "value check x + 1: (a copy)"),
        passes=2,
    )
    add("lsjax (XLA)", row("lsjax (XLA)", lsjax_loss("xla")), passes=3)
    add(
        "lsjax (XLA, logits donated)",
        row("lsjax (XLA, logits donated)", lsjax_loss("xla"), donate=True),
        passes=3,
    )
    add("lsjax (Pallas)", row("lsjax (Pallas)", lsjax_loss("pallas"), pallas=True), passes=3)
    add(
        "lsjax (Pallas, logits donated)",
        row("lsjax (Pallas, logits donated)", lsjax_loss("pallas"), donate=True, pallas=True),
        passes=3,
    )
    add(
        OPTAX,
        row(OPTAX, optax_loss, kind="rounded"),
        passes=3,
    )
    result = result_rows.record(result_rows.time(timed, args.reps, args.warmup))
    result.update(
        part="jax",
        device=str(jax.devices()[0]),
        versions={"jax": jax.__version__, "optax": optax.__version__},
        shape=[rows, num_classes],
        dtype=args.dtype,
        logits_bytes=int(logits_bytes),
        xla_temp_bytes=temps,
    )
    return result


def fused_jax_part(args) -> dict:
    import jax.numpy as jnp

    import lsjax

    jax, timed = _jax_setup(args)
    rows, hidden_size, vocab = args.fused_shape
    dtype = getattr(jnp, args.dtype)

    @jax.jit
    def make(key):  # as _torch_head
        key_labels, key_weight, key_hidden = jax.random.split(key, 3)
        labels = jax.random.randint(key_labels, (rows,), 0, vocab, dtype=jnp.int32)
        weight = jax.random.normal(key_weight, (vocab, hidden_size)) / math.sqrt(hidden_size)
        direction = weight[labels]
        hidden = jax.random.normal(key_hidden, (rows, hidden_size))
        hidden = hidden + LABEL_BOOST * direction / jnp.sum(direction**2, -1, keepdims=True)
        return hidden.astype(dtype), weight.astype(dtype), labels

    hidden, weight, labels = make(jax.random.PRNGKey(0))
    sample = sample_rows(rows, vocab, count=16)
    classes = sorted(
        set(np.asarray(labels)[sample[:8]].tolist()) | set(range(0, vocab, vocab // 8))
    )
    want_loss, want_d_hidden, want_d_weight = _jax_fused_reference(
        jax, hidden, weight, labels, sample, classes
    )
    result_rows = Rows(args.row_limit)
    temps = {}

    def row(name, loss_fn, kind):
        def make():
            program = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
            compiled = program.lower(hidden, weight, labels).compile()
            temps[name] = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)

            def call(arguments):
                return compiled(*arguments, labels)

            loss, (d_hidden, d_weight) = call((hidden, weight))
            line = check_values(
                name,
                kind,
                args.dtype,
                loss=float(loss.detach()) if hasattr(loss, "detach") else float(loss),
                want_loss=want_loss,
                grads=[
                    ("d hidden", _gather_rows(jax, d_hidden, sample), want_d_hidden),
                    ("d weight", _gather_rows(jax, d_weight, classes), want_d_weight),
                ],
            )
            return (lambda: (hidden, weight)), call, line

        return make

    def dense(implementation):
        return lambda h, w, y: lsjax.smoothed_cross_entropy(
            h @ w.T, y, smoothing=SMOOTHING, reduction="mean", implementation=implementation
        )

    result_rows.add(
        "lsjax fused (chunk 2048)",
        row(
            "lsjax fused",
            lambda h, w, y: lsjax.fused_linear_smoothed_cross_entropy(h, w, y, smoothing=SMOOTHING),
            "exact",
        ),
    )
    result_rows.add(
        "dense: h @ w.T + lsjax (XLA)", row("dense + lsjax (XLA)", dense("xla"), "rounded")
    )
    result_rows.add(
        "dense: h @ w.T + lsjax (Pallas)", row("dense + lsjax (Pallas)", dense("pallas"), "rounded")
    )
    result = result_rows.record(result_rows.time(timed, args.fused_reps, args.warmup))
    result.update(
        part="fused-jax",
        device=str(jax.devices()[0]),
        shape=[rows, hidden_size, vocab],
        dtype=args.dtype,
        dense_logits_bytes=rows * vocab * hidden.dtype.itemsize,
        xla_temp_bytes=temps,
    )
    return result


def _jax_fused_reference(jax, hidden, weight, labels, sample, classes, chunk=1024):
    """As :func:`_torch_fused_reference`, in JAX float64 on the device, smoothing 0.1 only."""
    import jax.numpy as jnp

    highest = jax.lax.Precision.HIGHEST
    eps = SMOOTHING
    with _x64(jax):

        @jax.jit
        def statistics_of(h, y, w):  # w an argument: a closed-over array would be a constant
            logits = jnp.dot(h.astype(jnp.float64), w.astype(jnp.float64).T, precision=highest)
            x_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
            return jax.nn.logsumexp(logits, axis=-1), x_y, logits.mean(-1)

        @jax.jit
        def finish(lse, x_y, x_mean, h, w, y, rows_index, classes_index):
            h, w = h.astype(jnp.float64), w.astype(jnp.float64)
            rows, vocab = h.shape[0], w.shape[0]
            loss = jnp.mean(lse - (1 - eps) * x_y - eps * x_mean)
            p_rows = jnp.exp(jnp.dot(h[rows_index], w.T, precision=highest) - lse[rows_index, None])
            q_rows = jnp.full(p_rows.shape, eps / vocab)
            q_rows = q_rows.at[jnp.arange(rows_index.shape[0]), y[rows_index]].add(1 - eps)
            d_hidden = jnp.dot((p_rows - q_rows) / rows, w, precision=highest)
            p_classes = jnp.exp(jnp.dot(h, w[classes_index].T, precision=highest) - lse[:, None])
            q_classes = eps / vocab + (1 - eps) * (y[:, None] == classes_index[None, :])
            d_weight = jnp.dot(((p_classes - q_classes) / rows).T, h, precision=highest)
            return loss, d_hidden, d_weight

        parts = [
            statistics_of(hidden[s : s + chunk], labels[s : s + chunk], weight)
            for s in range(0, hidden.shape[0], chunk)
        ]
        lse, x_y, x_mean = (jnp.concatenate(values) for values in zip(*parts, strict=True))
        loss, d_hidden, d_weight = finish(
            lse, x_y, x_mean, hidden, weight, labels, jnp.asarray(sample), jnp.asarray(classes)
        )
        return float(loss), np.asarray(d_hidden), np.asarray(d_weight)


def large_jax_part(args) -> dict:
    import lsjax

    jax, timed = _jax_setup(args)
    rows, num_classes = args.large_shape
    logits, labels = _jax_logits(jax, rows, num_classes, args.dtype, seed=3)
    sample = sample_rows(rows, num_classes, count=12)
    want_loss, want_grad = reference_rows(
        _gather_rows(jax, logits, sample),
        np.asarray(labels)[sample],
        SMOOTHING,
        np.ones(len(sample)),
    )
    result_rows = Rows(args.row_limit)

    def row(name, implementation):
        def total(x, y):
            per_row = lsjax.smoothed_cross_entropy(
                x, y, smoothing=SMOOTHING, implementation=implementation
            )
            return per_row.sum(), per_row

        program = jax.jit(jax.value_and_grad(total, has_aux=True))

        def call(x):
            return program(x, labels)

        def make():
            (_, per_row), grad = call(logits)
            line = check_values(
                name,
                "exact",
                args.dtype,
                grads=[
                    ("row loss", _gather_rows(jax, per_row, sample), want_loss),
                    ("grad", _gather_rows(jax, grad, sample), want_grad, 1.0),
                ],
            )
            return (lambda: logits), call, line

        return make

    result_rows.add("lsjax (XLA)", row("lsjax (XLA), large", "xla"), passes=3)
    result_rows.add("lsjax (Pallas)", row("lsjax (Pallas), large", "pallas"), passes=3)
    result = result_rows.record(result_rows.time(timed, min(args.reps, 3), args.warmup))
    result.update(
        part="large-jax",
        device=str(jax.devices()[0]),
        shape=[rows, num_classes],
        dtype=args.dtype,
        elements=rows * num_classes,
        sampled_rows=sample,
    )
    return result


PART_FUNCTIONS = {
    "torch": torch_part,
    "jax": jax_part,
    "fused-torch": fused_torch_part,
    "fused-jax": fused_jax_part,
    "large-torch": large_torch_part,
    "large-jax": large_jax_part,
}


# --------------------------------------------------------------------------------------------
# The report and the targets


def _print_part(result: dict) -> None:
    shape = " x ".join(map(str, result.get("shape", [])))
    print(f"--- {result['part']}: {shape} {result.get('dtype', '')} on {result.get('device', '?')}")
    if result.get("copy_bandwidth_TBps"):
        print(
            f"copy bandwidth {result['copy_bandwidth_TBps']:.2f} TB/s (read + write); floor "
            f"(3 passes) {result['floor_ms']:.3f} ms"
        )
    peaks = result.get("peak_memory_bytes", {})
    temps = result.get("xla_temp_bytes", {})
    for name, row in result.get("rows", {}).items():
        share = f"{row['pct_of_floor']:6.1f} % of floor" if "pct_of_floor" in row else ""
        memory = ""
        if name in peaks:
            memory = f"  peak +{peaks[name] / 2**20:.0f} MiB"
        elif temps.get(name) is not None:
            memory = f"  XLA temporaries {temps[name] / 2**20:.1f} MiB"
        print(f"{name:<62} {row['median_ms']:>10.3f} ms {share}{memory}")
    for kind in ("wrong", "failed", "unavailable"):
        for name, reason in result.get(kind, {}).items():
            label = {
                "wrong": "WRONG VALUES, not timed",
                "failed": "FAILED, not timed",
                "unavailable": "not available",
            }[kind]
            print(f"{name}: {label}: {reason}")
    for name, value in result.get("properties", {}).items():
        print(f"{name}: {value}")


def _median(result, name):
    return (result or {}).get("rows", {}).get(name, {}).get("median_ms")


def _why_missing(result, name) -> str:
    """Why ``result`` has no time for the row ``name``."""
    if result is None:
        return "its part did not run or wrote nothing (timed out?)"
    for kind in ("unavailable", "wrong", "failed"):
        reasons = result.get(kind, {})
        if name in reasons or result["part"] in reasons:
            return f"{kind}: {reasons.get(name) or reasons[result['part']]}"
    return "not measured"


def summarize(results: list[dict]) -> list[str]:
    """The GPU targets (see ``TARGET_PCT_OF_FLOOR``), each met or missed and by how much, or why
    it is not known."""
    parts = {(result["part"], result.get("dtype")): result for result in results}
    lines = []

    def verdict(ok):
        return "MET" if ok else "MISSED"

    for dtype in ("bfloat16", "float32"):
        torch_result, jax_result = parts.get(("torch", dtype)), parts.get(("jax", dtype))
        if torch_result is None and jax_result is None:
            continue
        floor = (torch_result or {}).get("floor_ms")
        if not floor and _median(jax_result, XLA_COPY):  # XLA's x + 1 is slower than copy_
            floor = 1.5 * _median(jax_result, XLA_COPY)
            lines.append(f"[{dtype}] floor from XLA's x + 1 (no torch copy_ in this run)")
        peers = {"Liger CE": (torch_result, LIGER_CE), "optax route": (jax_result, OPTAX)}
        ours = [
            (name, row)
            for result in (torch_result, jax_result)
            for name, row in (result or {}).get("rows", {}).items()
            if row["passes"] == 3 and name.startswith(("lstorch", "lsjax"))
        ]
        for name, row in ours:
            ms = row["median_ms"]
            if floor:
                pct = 100 * floor / ms
                lines.append(
                    f"[{dtype}] {name}: {pct:.1f} % of floor (target >= "
                    f"{TARGET_PCT_OF_FLOOR:.0f} %): {verdict(pct >= TARGET_PCT_OF_FLOOR)} "
                    f"({pct - TARGET_PCT_OF_FLOOR:+.1f} points)"
                )
            for label, (result, peer) in peers.items():
                if peer_ms := _median(result, peer):
                    lines.append(
                        f"[{dtype}] {name} faster than {label}: {ms:.3f} vs {peer_ms:.3f} ms: "
                        f"{verdict(ms < peer_ms)} ({peer_ms / ms:.2f}x)"
                    )
        for label, (result, peer) in peers.items():
            if not _median(result, peer):
                lines.append(f"[{dtype}] against {label}: NOT KNOWN ({_why_missing(result, peer)})")
        ours_small, theirs_small = (
            _median(torch_result, PER_CALL),
            _median(torch_result, PER_CALL_TORCH),
        )
        if ours_small and theirs_small:
            ratio = ours_small / theirs_small
            lines.append(
                f"[{dtype}] per-call cost at K = {SMALL_CLASSES}: lstorch {ours_small:.3f} ms = "
                f"{ratio:.2f}x F.cross_entropy's {theirs_small:.3f} ms (target <= "
                f"{TARGET_PER_CALL_RATIO}x): {verdict(ratio <= TARGET_PER_CALL_RATIO)}"
            )
        elif torch_result is not None:
            lines.append(
                f"[{dtype}] per-call cost: NOT KNOWN ({_why_missing(torch_result, PER_CALL)})"
            )
        for name, value in (torch_result or {}).get("properties", {}).items():
            lines.append(f"[{dtype}] {name}: {value}")
    for part in ("large-torch", "large-jax"):
        for (name, _), result in parts.items():
            if name != part:
                continue
            if "shape" not in result:
                lines.append(f"{part}: NOT KNOWN ({_why_missing(result, part)})")
                continue
            checked = ", ".join(result.get("checks", {})) or "nothing"
            bad = {**result.get("wrong", {}), **result.get("failed", {})}
            lines.append(
                f"{part} {' x '.join(map(str, result['shape']))} ({result['elements']} elements, "
                f"past 2^31: {result['elements'] > 2**31}): right values for {checked}"
                + (f"; WRONG or FAILED: {bad}" if bad else "")
            )
    for part in ("fused-torch", "fused-jax"):
        for (name, _), result in parts.items():
            if name != part:
                continue
            for row_name, row in result.get("rows", {}).items():
                peak = result.get("peak_memory_bytes", {}).get(row_name)
                temp = result.get("xla_temp_bytes", {}).get(row_name)
                memory = (
                    f", peak +{peak / 2**30:.2f} GiB"
                    if peak is not None
                    else f", XLA temporaries {temp / 2**30:.2f} GiB"
                    if temp is not None
                    else ""
                )
                lines.append(f"{part}: {row_name}: {row['median_ms']:.1f} ms{memory}")
            for kind in ("unavailable", "wrong", "failed"):
                for row_name, reason in result.get(kind, {}).items():
                    lines.append(f"{part}: {row_name}: NOT KNOWN ({kind}: {reason})")
    return lines


# --------------------------------------------------------------------------------------------


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="every part at tiny shapes in this process (the CPU if no GPU)",
    )
    parser.add_argument(
        "--summary",
        nargs="+",
        metavar="JSON",
        help="read the parts' JSON files and report the targets",
    )
    parser.add_argument("--rows", type=int)
    parser.add_argument("--classes", type=int)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--fused-reps", type=int, default=5)
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; aot_eager in a dry run)",
    )
    parser.add_argument("--json", help="write the part's numbers to this file")
    parser.add_argument(
        "--row-limit",
        type=float,
        default=60.0,
        help="seconds a row's check (its compilation included) may take before the row fails",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="torch part: also time each kernel at each (BLOCK, num_warps)",
    )
    args = parser.parse_args(argv)
    which = 1 if args.dry_run else 0
    args.shape = (args.rows or MAIN_SHAPE[which][0], args.classes or MAIN_SHAPE[which][1])
    args.fused_shape = FUSED_SHAPE[which]
    args.large_shape = LARGE_SHAPE[which]
    args.warmup = 2
    if args.dry_run:
        args.reps, args.fused_reps, args.warmup = 1, 1, 0
    args.compile_backend = args.compile_backend or ("aot_eager" if args.dry_run else "inductor")
    return args


def _run_part(part, args) -> tuple[dict, bool]:
    """One part; returns its result and whether every row it tried was right."""
    try:
        result = PART_FUNCTIONS[part](args)
    except Unavailable as error:
        print(f"{part}: not available: {error}", flush=True)
        return {"part": part, "dtype": args.dtype, "unavailable": {part: str(error)}}, True
    _print_part(result)
    return result, not (result["wrong"] or result["failed"])


def main(argv=None) -> int:
    args = _parse(argv)
    if args.summary:
        results = []
        for path in args.summary:
            with open(path) as handle:
                loaded = json.load(handle)
            results += loaded if isinstance(loaded, list) else [loaded]
        for result in results:
            if "rows" in result:
                _print_part(result)
        print("--- targets")
        for line in summarize(results):
            print(line)
        return 0
    if not (args.part or args.dry_run):
        raise SystemExit("bench_gpu.py: give --part, --dry-run or --summary")
    if args.dry_run:
        import torch

        if not torch.cuda.is_available():  # before anything imports Triton
            os.environ.setdefault("TRITON_INTERPRET", "1")
    ok, results = True, []
    for part in [args.part] if args.part else PARTS:
        start = time.perf_counter()
        result, right = _run_part(part, args)
        print(f"({part}: {time.perf_counter() - start:.1f} s)", flush=True)
        results.append(result)
        if not right:
            print(f"{part}: some rows had wrong values or failed (see above); they are not results")
        ok &= right
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results[0] if len(results) == 1 else results, handle, indent=1)
    if args.dry_run:
        print("--- targets (a dry run: the numbers mean nothing)")
        for line in summarize(results):
            print(line)
        print("dry run: every value check passed" if ok else "dry run: FAILED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
