"""A toy LM head: dense vs fused label-smoothed cross-entropy, memory and time, JAX and PyTorch.

    python examples/large_vocab_lm_head.py                 # rows=2048, D=256, V=32768 (seconds)
    python examples/large_vocab_lm_head.py --full          # rows=8192, D=512, V=131072
    python examples/large_vocab_lm_head.py --rows 4096 --vocab 65536 --repeats 5

JAX memory is XLA's own accounting of the compiled forward + backward
(``memory_analysis().temp_size_in_bytes``, exact and allocation-free). PyTorch on CPU has no
allocator statistics, so its number is the rise of the process's peak resident memory
(``ru_maxrss``) during one forward + backward, each variant in a fresh subprocess (coarse:
includes allocator slack). Times are the median of ``--repeats`` steps after one warm-up, on
whatever the machine is doing meanwhile (noisy on a shared box). ``--full`` (rows=8192, D=512,
V=131072) needs about 9 GiB for JAX's dense route and more for torch's; the fused routes need
~0.1 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _arrays(rows, features, vocab, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((rows, features), dtype=np.float32)
    weight = (rng.standard_normal((vocab, features)) / np.sqrt(features)).astype(np.float32)
    bias = np.zeros(vocab, np.float32)
    labels = rng.integers(0, vocab, rows).astype(np.int32)
    return hidden, weight, bias, labels


def run_jax(variant, rows, features, vocab, smoothing, repeats):
    import jax
    import jax.numpy as jnp

    import lsjax

    def loss(hidden, weight, bias, labels):
        if variant == "fused":
            return lsjax.fused_linear_smoothed_cross_entropy(
                hidden, weight, labels, bias=bias, smoothing=smoothing
            )
        logits = hidden @ weight.T + bias
        return lsjax.smoothed_cross_entropy(logits, labels, smoothing=smoothing, reduction="mean")

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    shapes = (
        jax.ShapeDtypeStruct((rows, features), jnp.float32),
        jax.ShapeDtypeStruct((vocab, features), jnp.float32),
        jax.ShapeDtypeStruct((vocab,), jnp.float32),
        jax.ShapeDtypeStruct((rows,), jnp.int32),
    )
    compiled = step.lower(*shapes).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    arrays = [jnp.asarray(a) for a in _arrays(rows, features, vocab)]
    jax.block_until_ready(compiled(*arrays))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value, _ = jax.block_until_ready(compiled(*arrays))
        times.append(time.perf_counter() - start)
    return dict(bytes=temp, seconds=statistics.median(times), loss=float(value))


def run_torch(variant, rows, features, vocab, smoothing, repeats):
    import torch
    import torch.nn.functional as F

    import lstorch

    hidden, weight, bias, labels = (torch.from_numpy(a) for a in _arrays(rows, features, vocab))
    labels = labels.long()
    params = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]

    def step():
        if variant == "fused":
            value = lstorch.fused_linear_smoothed_cross_entropy(
                params[0], params[1], labels, bias=params[2], smoothing=smoothing
            )
        else:
            logits = F.linear(params[0], params[1], params[2])
            value = lstorch.smoothed_cross_entropy(
                logits, labels, smoothing=smoothing, reduction="mean"
            )
        grads = torch.autograd.grad(value, params)
        return value, grads

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    value, grads = step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    del grads
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(bytes=peak, seconds=statistics.median(times), loss=float(value))


def _child(args) -> None:
    fn = run_jax if args.child_framework == "jax" else run_torch
    result = fn(
        args.child_variant, args.rows, args.features, args.vocab, args.smoothing, args.repeats
    )
    print(json.dumps(result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--full", action="store_true", help="rows=8192, D=512, V=131072")
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frameworks", default="jax,torch")
    parser.add_argument("--child-framework", help=argparse.SUPPRESS)
    parser.add_argument("--child-variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.full:
        args.rows, args.features, args.vocab = 8192, 512, 131072
    if args.child_framework:
        _child(args)
        return 0
    logits_bytes = args.rows * args.vocab * 4
    print(
        f"rows={args.rows} D={args.features} V={args.vocab} float32, smoothing={args.smoothing}; "
        f"dense logits = {logits_bytes / 2**20:.0f} MiB"
    )
    print(f"{'framework':<9} {'variant':<6} {'memory MiB':>11} {'% logits':>9} {'step s':>8} loss")
    results = {}
    for framework in args.frameworks.split(","):
        for variant in ("dense", "fused"):
            command = [
                sys.executable,
                __file__,
                f"--rows={args.rows}",
                f"--features={args.features}",
                f"--vocab={args.vocab}",
                f"--smoothing={args.smoothing}",
                f"--repeats={args.repeats}",
                f"--child-framework={framework}",
                f"--child-variant={variant}",
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                print(f"{framework:<9} {variant:<6} failed: {done.stderr.strip()[-300:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[framework, variant] = result
            print(
                f"{framework:<9} {variant:<6} {result['bytes'] / 2**20:>11.1f} "
                f"{100 * result['bytes'] / logits_bytes:>8.1f}% {result['seconds']:>8.3f} "
                f"{result['loss']:.6f}"
            )
    print(
        "memory: jax = XLA temporaries of the compiled forward+backward; torch = rise of peak RSS"
    )
    for framework in args.frameworks.split(","):
        if (framework, "dense") in results and (framework, "fused") in results:
            dense, fused = results[framework, "dense"], results[framework, "fused"]
            print(
                f"{framework}: fused/dense time {fused['seconds'] / dense['seconds']:.2f}x, "
                f"memory {fused['bytes'] / max(dense['bytes'], 1):.3f}x, "
                f"|loss difference| {abs(fused['loss'] - dense['loss']):.2e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
