"""Forward+backward time and memory of the label-smoothed losses, JAX and PyTorch, in ONE process.

Every candidate runs interleaved with the others (repetition r of each before repetition r+1 of
any), after warm-up, and the table reports medians and ratios measured in this one run: the
machines are shared and noisy, so only numbers taken side by side are compared.

Candidates, each computing the mean label-smoothed loss (eps = 0.1) and its gradient with
respect to the logits:

* ``lsjax[<convention>]``: ``jax.jit(jax.value_and_grad(lsjax.smoothed_cross_entropy))``.
* ``lsjax (eager)``: ``jax.value_and_grad(lsjax.smoothed_cross_entropy)`` (uniform), not jitted:
  the call as a notebook or an evaluation loop makes it, its checks on the host and then one
  compiled program each way. Its value and gradient are checked against ``lsjax[uniform]``'s.
* ``optax``: ``softmax_cross_entropy(x, smooth_labels(one_hot(y), eps))``, jitted the same way.
* ``lstorch``: ``lstorch.SmoothedCrossEntropyLoss`` forward + backward; also with
  ``inplace_backward=True`` (the gradient written into the logits' storage).
* ``F.cross_entropy``: ``torch.nn.functional.cross_entropy(x, y, label_smoothing=eps)``.
* ``naive (one-hot)``: the naive baseline, the algorithm of the forum's and OpenNMT's
  ``LabelSmoothingLoss``: build the full smoothed target, then ``sum(-q * log_softmax(x))``.
* ``copy floor``: copying the logits into a preallocated buffer (read once, write once).

Memory: XLA's ``memory_analysis().temp_size_in_bytes`` of each compiled JAX program, and for
PyTorch the peak of live CPU allocations during forward+backward from the profiler's memory
records (the inputs themselves excluded). It is a lower bound: the profiler nets allocations and
frees inside one op, so a temporary living only inside one kernel is not seen.

Usage: ``python benchmarks/bench_losses.py [--shapes 4096x32000 ...] [--dtypes float32 bfloat16]
[--reps 7] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

import lsjax
import lstorch

SMOOTHING = 0.1
DEFAULT_SHAPES = ("4096x32000", "1024x128000", "65536x1000")
CONVENTIONS = ("uniform", "others", "others_but_pad")
EAGER = "lsjax (eager)"


def _jax_candidates(logits: jax.Array, labels: jax.Array) -> dict[str, tuple[Callable, int]]:
    """name -> (zero-argument runner, XLA temporary bytes)."""
    num_classes = logits.shape[-1]
    candidates = {}

    def compile_value_and_grad(loss):
        compiled = jax.jit(jax.value_and_grad(loss)).lower(logits, labels).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        return (lambda: jax.block_until_ready(compiled(logits, labels))), temp

    for convention in CONVENTIONS:
        pad = {"pad_index": 0} if convention == "others_but_pad" else {}

        def loss(x, y, convention=convention, pad=pad):
            return lsjax.smoothed_cross_entropy(
                x, y, smoothing=SMOOTHING, convention=convention, reduction="mean", **pad
            )

        candidates[f"lsjax[{convention}]"] = compile_value_and_grad(loss)

    def eager_loss(x, y):
        return lsjax.smoothed_cross_entropy(x, y, smoothing=SMOOTHING, reduction="mean")

    eager = jax.value_and_grad(eager_loss)
    candidates[EAGER] = (lambda: jax.block_until_ready(eager(logits, labels))), None

    def optax_loss(x, y):
        targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes, dtype=x.dtype), SMOOTHING)
        return optax.softmax_cross_entropy(x, targets).mean()

    candidates["optax"] = compile_value_and_grad(optax_loss)
    return candidates


def _naive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """THE NAIVE BASELINE (the forum's and OpenNMT's algorithm): a full rows x K smoothed
    target."""
    log_probs = logits.log_softmax(dim=-1)
    with torch.no_grad():
        target = torch.full_like(log_probs, SMOOTHING / (logits.shape[-1] - 1))
        target.scatter_(1, labels.unsqueeze(1), 1.0 - SMOOTHING)
    return torch.mean(torch.sum(-target * log_probs, dim=-1))


def _torch_candidates(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Callable]:
    module = lstorch.SmoothedCrossEntropyLoss(smoothing=SMOOTHING, ignore_index=None)
    buffer = torch.empty_like(logits)

    def forward_backward(loss_fn):
        def run():
            x = logits.detach().requires_grad_(True)
            loss = loss_fn(x)
            loss.backward()
            return x.grad

        return run

    inplace_module = lstorch.SmoothedCrossEntropyLoss(
        smoothing=SMOOTHING, ignore_index=None, inplace_backward=True
    )
    source = logits.detach().requires_grad_(True)

    def inplace_run():
        """Self-timed: the logits are first copied (untimed), since backward overwrites them
        with their gradient; the copy, ``clone`` of a leaf, is computed by the graph, as
        ``inplace_backward`` needs (it refuses a leaf and a view of one)."""
        x = source.clone()
        start = time.perf_counter()
        torch.autograd.grad(inplace_module(x, labels), x)
        return time.perf_counter() - start

    return {
        "lstorch": forward_backward(lambda x: module(x, labels)),
        "lstorch (inplace_backward)": inplace_run,
        "F.cross_entropy": forward_backward(
            lambda x: F.cross_entropy(x, labels, label_smoothing=SMOOTHING)
        ),
        "naive (one-hot)": forward_backward(lambda x: _naive_loss(x, labels)),
        "copy floor": lambda: buffer.copy_(logits),
    }


def _torch_peak_bytes(run: Callable) -> int:
    """Peak of live CPU allocations during ``run``, from the profiler's memory accounting.

    Every allocation and free is attributed to exactly one innermost op (its
    ``self_cpu_memory_usage``) or to a bare ``[memory]`` record; summed in start order they give
    the live bytes over time (to the resolution of one op), and their maximum is the peak.
    """
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profile:
        run()
    live = peak = 0
    for event in sorted(profile.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def bench_shape(rows: int, num_classes: int, dtype: str, reps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((rows, num_classes), dtype=np.float32)
    labels_np = rng.integers(1, num_classes, size=rows)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    jax_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]

    jax_logits = jnp.asarray(values, jax_dtype)
    jax_labels = jnp.asarray(labels_np, jnp.int32)
    torch_logits = torch.from_numpy(values).to(torch_dtype)
    torch_labels = torch.from_numpy(labels_np)

    jax_runs = _jax_candidates(jax_logits, jax_labels)
    torch_runs = _torch_candidates(torch_logits, torch_labels)
    runners = {name: run for name, (run, _) in jax_runs.items()} | torch_runs
    outputs = {}
    for name, run in runners.items():  # warm-up (compilation happened above)
        run()
        outputs[name] = run()
    # The eager call computes what the jitted one computes (both accumulate in float32).
    for eager, jitted in zip(outputs[EAGER], outputs["lsjax[uniform]"], strict=True):
        np.testing.assert_allclose(
            np.asarray(eager, np.float32), np.asarray(jitted, np.float32), rtol=1e-5, atol=1e-7
        )
    samples = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            start = time.perf_counter()
            elapsed = run()
            total = time.perf_counter() - start
            # A float is a runner's own time of its timed part (see inplace_run).
            samples[name].append(elapsed if isinstance(elapsed, float) else total)

    medians = {name: _median_ms(times) for name, times in samples.items()}
    logits_bytes = rows * num_classes * torch_logits.element_size()
    results = []
    for name, median in medians.items():
        row = {
            "shape": f"{rows}x{num_classes}",
            "dtype": dtype,
            "candidate": name,
            "median_ms": median,
            "vs_floor": median / medians["copy floor"],
            "F.cross_entropy_over_this": medians["F.cross_entropy"] / median,
            "optax_over_this": medians["optax"] / median,
            "logits_bytes": logits_bytes,
        }
        if name in jax_runs:
            if jax_runs[name][1] is not None:  # None: no one program to analyse (eager)
                row["xla_temp_bytes"] = jax_runs[name][1]
        elif name != "copy floor":
            row["torch_peak_bytes"] = _torch_peak_bytes(torch_runs[name])
        results.append(row)
    return results


def _format(rows: list[dict]) -> str:
    header = (
        f"{'shape':<12} {'dtype':<9} {'candidate':<22} {'median ms':>10} {'x floor':>8} "
        f"{'F.ce/this':>9} {'optax/this':>10} {'temp/peak MB':>12} {'/logits':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        memory = row.get("xla_temp_bytes", row.get("torch_peak_bytes"))
        memory_text = "" if memory is None else f"{memory / 2**20:12.1f}"
        ratio = "" if memory is None else f"{memory / row['logits_bytes']:8.2f}"
        lines.append(
            f"{row['shape']:<12} {row['dtype']:<9} {row['candidate']:<22} "
            f"{row['median_ms']:>10.1f} {row['vs_floor']:>8.2f} "
            f"{row['F.cross_entropy_over_this']:>9.2f} {row['optax_over_this']:>10.2f} "
            f"{memory_text:>12} {ratio:>8}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(machine)
    rows = []
    for shape in args.shapes:
        num_rows, num_classes = (int(part) for part in shape.split("x"))
        for dtype in args.dtypes:
            rows.extend(bench_shape(num_rows, num_classes, dtype, args.reps))
            print(
                _format([row for row in rows if row["shape"] == shape and row["dtype"] == dtype]),
                flush=True,
            )
            print()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "reps": args.reps, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
