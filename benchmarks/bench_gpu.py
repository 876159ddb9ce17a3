"""GPU forward+backward time of the label-smoothed losses against the bandwidth floor.

The floor: a label-smoothed cross-entropy that returns the gradient of its logits must
read the logits in forward, read them again in backward and write the gradient: 3 x the logits'
bytes. Its time is those bytes over the bandwidth a plain device-to-device copy reaches on the
same GPU in the same run (``copy_``, counting bytes read and written), so "% of floor" is
``floor time / measured time``.

Parts, each in its own process (JAX and PyTorch must not share the GPU's memory pool):

* ``--part torch``: the copy; ``lstorch.smoothed_cross_entropy`` on its Triton kernels (also
  with ``inplace_backward=True``), on plain torch ops (``LSTORCH_TRITON=off``) and
  ``F.cross_entropy(label_smoothing=...)``, all via ``torch.autograd.grad`` of the mean loss;
  each kernel alone; a sweep of the kernels' (BLOCK, num_warps); peak memory above the inputs.
* ``--part jax``: ``jax.jit(jax.value_and_grad(...))`` of ``lsjax.smoothed_cross_entropy`` (with
  and without donation of the logits) and of the optax route, and XLA's temporary bytes.

Times are medians of ``--reps`` runs after warm-up, timed with CUDA events (torch) or
``block_until_ready`` (JAX), interleaved within each part. Also checks the numbers on the GPU:
``tests/triton_checks.py`` covers the kernels; here lsjax on the GPU is compared with lsjax in
float64 on the CPU. Usage::

    python benchmarks/bench_gpu.py [--rows 8192] [--classes 131072] [--dtype bfloat16]
        [--reps 20] [--sweep] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SMOOTHING = 0.1
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(rows, num_classes, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, num_classes), dtype=np.float32), rng.integers(
        0, num_classes, rows
    )


def check_values_before_timing(lstorch, base, labels, forced) -> None:
    """A benchmark of a wrong gradient is not a result: at the benchmark's own shape and call
    (``reduction="mean"``, the upstream gradient autograd hands the kernels expanded from a 0-d
    one), the kernel path's loss and gradient, out of place and ``inplace_backward``, must equal
    the plain torch ops' (``LSTORCH_TRITON=off``) on the same device. Exits non-zero if not."""
    import torch

    def loss_and_grad(mode, inplace=False):
        os.environ["LSTORCH_TRITON"] = mode
        leaf = base.clone().requires_grad_(True)
        x = leaf.view_as(leaf) if inplace else leaf
        loss = lstorch.smoothed_cross_entropy(
            x, labels, smoothing=SMOOTHING, reduction="mean", inplace_backward=inplace
        )
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach().float(), grad.float()

    plain_loss, plain_grad = loss_and_grad("off")
    # bf16: both paths accumulate in float32 and round the gradient once (one bf16 ulp apart at
    # most); float32: summation order only. atol is relative to the largest entry, since a mean
    # gradient's entries are ~1/rows.
    rtol = 2.0**-7 if base.dtype == torch.bfloat16 else 1e-5
    atol = rtol * float(plain_grad.abs().max())
    for inplace in (False, True):
        loss, grad = loss_and_grad(forced, inplace)
        name = "lstorch (Triton" + (", inplace_backward)" if inplace else ")")
        loss_ok = torch.allclose(loss, plain_loss, rtol=1e-5, atol=0)
        grad_ok = torch.allclose(grad, plain_grad, rtol=rtol, atol=atol)
        worst = float((grad - plain_grad).abs().max())
        print(f"value check {name}: |dloss| {float((loss - plain_loss).abs()):.3g}, "
              f"max |dgrad| {worst:.3g} (atol {atol:.3g})", flush=True)  # fmt: skip
        if not (loss_ok and grad_ok):
            raise SystemExit(f"{name} differs from the plain path: not timing a wrong gradient")
    del plain_grad
    os.environ["LSTORCH_TRITON"] = "auto"


def torch_part(args) -> dict:
    import torch
    import torch.nn.functional as F

    import lstorch
    from lstorch import smoothed, triton_kernels

    # Without CUDA (a smoke run of this script): the CPU, the kernels in Triton's interpreter.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    forced = "auto" if device.type == "cuda" else "all"
    dtype = getattr(torch, args.dtype)
    rows, num_classes = args.rows, args.classes
    base = torch.randn(rows, num_classes, device=device, dtype=torch.float32).to(dtype)
    labels = torch.randint(0, num_classes, (rows,), device=device)
    logits_bytes = base.numel() * base.element_size()

    def timed_ms(fn):
        if device.type != "cuda":
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def median_ms(fn, reps):
        fn()  # warm-up (and compilation)
        return statistics.median(timed_ms(fn) for _ in range(reps))

    copy_dst = torch.empty_like(base)

    def copy():
        copy_dst.copy_(base)

    def forward_backward(loss_fn, env=forced, inplace=False):
        leaf = base.clone().requires_grad_(True)

        def run():
            os.environ["LSTORCH_TRITON"] = env
            x = leaf.view_as(leaf) if inplace else leaf  # inplace_backward needs a non-leaf
            loss = loss_fn(x)
            torch.autograd.grad(loss, x)

        return run

    def lstorch_loss(inplace=False):
        return lambda x: lstorch.smoothed_cross_entropy(
            x, labels, smoothing=SMOOTHING, reduction="mean", inplace_backward=inplace
        )

    check_values_before_timing(lstorch, base, labels, forced)

    candidates = {
        "copy (read + write the logits once)": copy,
        "lstorch (Triton kernels)": forward_backward(lstorch_loss()),
        "lstorch (Triton, inplace_backward)": forward_backward(
            lstorch_loss(inplace=True), inplace=True
        ),
        "lstorch (plain torch ops)": forward_backward(lstorch_loss(), env="off"),
        "F.cross_entropy(label_smoothing)": forward_backward(
            lambda x: F.cross_entropy(x, labels, label_smoothing=SMOOTHING)
        ),
    }
    # The kernels alone: forward (1 read), backward (1 read + 1 write), as lstorch calls them.
    options = smoothed._Options("uniform", None, False, False)
    eps = torch.tensor(SMOOTHING, device=device)
    params = smoothed._kernel_params(options, num_classes, eps, None, None, eps * 0)
    call = smoothed._kernel_call(options, base, labels, labels >= 0, None, None)
    _, _, peak, log_sum = triton_kernels.forward(base, params=params, **call)
    grad_out = torch.empty_like(base)
    upstream = torch.full((rows,), 1.0 / rows, device=device)

    def forward_kernel(config=None):
        return lambda: triton_kernels.forward(base, params=params, config=config, **call)

    def backward_kernel(config=None):
        return lambda: triton_kernels.backward(
            base, grad_out, peak=peak, log_sum=log_sum, grad=upstream, grad_z=None,
            params=params, config=config, **call,
        )  # fmt: skip

    # The same call with 256 classes: kernels of no size, so its time is the per-call cost of
    # the O(rows) torch ops around the kernels (launch-bound), which the big shape also pays.
    small, small_labels = base[:, :256].contiguous(), labels % 256

    def small_call():
        leaf = small.detach().requires_grad_(True)
        os.environ["LSTORCH_TRITON"] = forced
        loss = lstorch.smoothed_cross_entropy(
            leaf, small_labels, smoothing=SMOOTHING, reduction="mean"
        )
        torch.autograd.grad(loss, leaf)

    candidates["forward kernel alone (1 read)"] = forward_kernel()
    candidates["backward kernel alone (1 read + 1 write)"] = backward_kernel()

    def small_torch_call():
        leaf = small.detach().requires_grad_(True)
        loss = F.cross_entropy(leaf, small_labels, label_smoothing=SMOOTHING)
        torch.autograd.grad(loss, leaf)

    candidates[f"lstorch (Triton) at {rows} x 256: per-call overhead"] = small_call
    candidates[f"F.cross_entropy at {rows} x 256, for comparison"] = small_torch_call
    samples = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up (and compilation)
        fn()
        fn()
    for _ in range(args.reps):  # interleaved
        for name, fn in candidates.items():
            samples[name].append(timed_ms(fn))
    os.environ["LSTORCH_TRITON"] = "auto"
    medians = {name: statistics.median(times) for name, times in samples.items()}
    copy_ms = medians["copy (read + write the logits once)"]
    bandwidth = 2 * logits_bytes / (copy_ms / 1e3)  # bytes per second, read + write
    floor_ms = 3 * logits_bytes / bandwidth * 1e3
    table = []
    for name, median in medians.items():
        passes = {"copy": 2, "forward kernel": 1, "backward kernel": 2, "lstorch (Triton) at": 0}
        passes["F.cross_entropy at"] = 0
        moved = next((p for key, p in passes.items() if name.startswith(key)), 3)
        table.append(
            {
                "candidate": name,
                "median_ms": median,
                "passes_of_logits": moved,
                "achieved_TBps": moved * logits_bytes / (median / 1e3) / 1e12,
                "pct_of_floor": 100 * (moved * logits_bytes / bandwidth * 1e3) / median,
            }
        )

    peaks = {}
    for name in list(candidates)[1:5] if device.type == "cuda" else []:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        candidates[name]()
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - before) / logits_bytes

    # Where the per-call time goes: the profiler over three small calls, by host time.
    profile_table = ""
    if device.type == "cuda":
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            for _ in range(3):
                small_call()
            torch.cuda.synchronize()
        profile_table = profile.key_averages().table(sort_by="cpu_time_total", row_limit=25)

    sweep = []
    if args.sweep:
        for block in (2048, 4096, 8192, 16384, 32768):
            for warps in (4, 8, 16, 32):
                config = (block, warps)
                sweep.append(
                    {
                        "block": block,
                        "num_warps": warps,
                        "forward_ms": median_ms(forward_kernel(config), 5),
                        "backward_ms": median_ms(backward_kernel(config), 5),
                    }
                )
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "shape": [rows, num_classes],
        "dtype": args.dtype,
        "logits_bytes": logits_bytes,
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "floor_ms": floor_ms,
        "default_config": {
            kernel: list(triton_kernels._config(num_classes, kernel))
            for kernel in ("forward", "backward")
        },
        "rows": table,
        "peak_memory_over_inputs_in_logits": peaks,
        "sweep": sweep,
        "profile_of_three_small_calls": profile_table,
    }


def jax_part(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import lsjax

    values, labels_np = _inputs(args.rows, args.classes)
    dtype = getattr(jnp, args.dtype)
    logits = jnp.asarray(values, dtype)
    labels = jnp.asarray(labels_np, jnp.int32)
    logits_bytes = logits.size * logits.dtype.itemsize

    def mean_loss(x, y):
        return lsjax.smoothed_cross_entropy(x, y, smoothing=SMOOTHING, reduction="mean")

    def optax_loss(x, y):
        targets = optax.smooth_labels(jax.nn.one_hot(y, x.shape[-1], dtype=x.dtype), SMOOTHING)
        return optax.softmax_cross_entropy(x, targets).mean()

    def plain_closed_form(x, y):
        """Reference point, not a library loss: the closed form in four jnp lines, to show what
        XLA alone makes of it on this GPU."""
        x32 = x.astype(jnp.float32)
        lse = jax.nn.logsumexp(x32, axis=-1)
        x_y = jnp.take_along_axis(x32, y[:, None], axis=-1)[:, 0]
        return jnp.mean((1 - SMOOTHING) * (lse - x_y) + SMOOTHING * (lse - x32.mean(-1)))

    compiled = {}
    temps = {}
    for name, loss, donate in (
        ("lsjax", mean_loss, ()),
        ("lsjax (donate the logits)", mean_loss, (0,)),
        ("optax route", optax_loss, ()),
        ("plain closed form in jnp (reference)", plain_closed_form, ()),
    ):
        program = jax.jit(jax.value_and_grad(loss), donate_argnums=donate)
        compiled[name] = (program.lower(logits, labels).compile(), bool(donate))
        temps[name] = compiled[name][0].memory_analysis().temp_size_in_bytes
    copy_program = jax.jit(lambda x: x + 1).lower(logits).compile()

    def runner(name):
        program, donate = compiled[name]

        def run():
            x = jnp.copy(logits) if donate else logits  # a fresh buffer to give away
            if donate:
                x.block_until_ready()
            start = time.perf_counter()
            jax.block_until_ready(program(x, labels))
            return time.perf_counter() - start

        return run

    def copy_run():
        start = time.perf_counter()
        copy_program(logits).block_until_ready()
        return time.perf_counter() - start

    runs = {name: runner(name) for name in compiled} | {"XLA x + 1 (read + write)": copy_run}
    for run in runs.values():
        run()
        run()
    samples = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, run in runs.items():
            samples[name].append(run())
    medians = {name: 1e3 * statistics.median(times) for name, times in samples.items()}

    # The numbers on the GPU against lsjax in float64 on the CPU (checked against the oracle by
    # the test suite), on a slice of the same inputs.
    jax.config.update("jax_enable_x64", True)
    cpu = jax.devices("cpu")[0]
    small_x, small_y = logits[:64], labels[:64]
    value, grad = jax.jit(jax.value_and_grad(mean_loss))(small_x, small_y)
    with jax.default_device(cpu):
        x64 = jnp.asarray(np.asarray(small_x.astype(jnp.float32)), jnp.float64)
        value64, grad64 = jax.value_and_grad(mean_loss)(x64, jnp.asarray(np.asarray(small_y)))
    grad_error = np.max(np.abs(np.asarray(grad.astype(jnp.float32), np.float64) - grad64))
    return {
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "medians_ms": medians,
        "xla_temp_bytes": temps,
        "logits_bytes": int(logits_bytes),
        "check_vs_float64_cpu": {
            "loss_rel_error": float(abs(float(value) - float(value64)) / abs(float(value64))),
            "grad_max_abs_error": float(grad_error),
            "grad_max_abs": float(np.max(np.abs(grad64))),
        },
    }


def _print_report(result: dict) -> None:
    torch_result, jax_result = result.get("torch"), result.get("jax")
    if torch_result:
        print(
            f"{torch_result['device']}, torch {torch_result['torch']}, triton "
            f"{torch_result['triton']}; logits {torch_result['shape']} {torch_result['dtype']} "
            f"({torch_result['logits_bytes'] / 1e9:.2f} GB)"
        )
        print(
            f"copy bandwidth {torch_result['copy_bandwidth_TBps']:.2f} TB/s (read + write); "
            f"floor (3 passes) {torch_result['floor_ms']:.3f} ms; kernel config "
            f"{torch_result['default_config']}"
        )
        print(f"{'candidate':<42} {'median ms':>10} {'passes':>6} {'TB/s':>6} {'% of floor':>10}")
        for row in torch_result["rows"]:
            print(
                f"{row['candidate']:<42} {row['median_ms']:>10.3f} {row['passes_of_logits']:>6} "
                f"{row['achieved_TBps']:>6.2f} {row['pct_of_floor']:>10.1f}"
            )
        for name, peak in torch_result["peak_memory_over_inputs_in_logits"].items():
            print(f"peak memory above the inputs, {name}: {peak:.2f} x logits")
        print(torch_result.get("profile_of_three_small_calls", ""))
        for row in torch_result["sweep"]:
            print(
                f"sweep BLOCK={row['block']:<6} warps={row['num_warps']:<3} forward "
                f"{row['forward_ms']:.3f} ms  backward {row['backward_ms']:.3f} ms"
            )
    if jax_result:
        print(f"{jax_result['device']}, jax {jax_result['jax']}")
        floor = torch_result["floor_ms"] if torch_result else None
        for name, median in jax_result["medians_ms"].items():
            temp = jax_result["xla_temp_bytes"].get(name)
            extra = "" if temp is None else f"  XLA temporaries {temp / 2**20:.1f} MiB"
            share = (
                ""
                if floor is None or name.startswith("XLA")
                else f"  {100 * floor / median:.1f} % of floor"
            )
            print(f"{name:<42} {median:>10.3f} ms{share}{extra}")
        print(f"lsjax on the GPU vs float64 on the CPU: {jax_result['check_vs_float64_cpu']}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["torch", "jax", "both"], default="both")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--classes", type=int, default=131072)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", help="write the numbers to this file")
    args = parser.parse_args()
    failed = []
    if args.part == "both":
        result = {}
        for part in ("torch", "jax"):
            out = os.path.join(tempfile.gettempdir(), f"bench_gpu.{part}.json")
            command = [sys.executable, __file__, "--part", part, "--json", out]
            command += ["--rows", str(args.rows), "--classes", str(args.classes)]
            command += ["--dtype", args.dtype, "--reps", str(args.reps)]
            command += ["--sweep"] if args.sweep and part == "torch" else []
            env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
            if part == "torch" and not _has_cuda():
                env["TRITON_INTERPRET"] = "1"
            env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
            done = subprocess.run(command, env=env)
            if done.returncode == 0:
                with open(out) as handle:
                    result[part] = json.load(handle)[part]
            else:
                failed.append(part)
        _print_report(result)
    else:
        result = {args.part: (torch_part if args.part == "torch" else jax_part)(args)}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    if failed:
        print(f"FAILED: the {' and '.join(failed)} part (see above); its numbers are not a result")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
