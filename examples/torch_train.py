"""The digits MLP trained in PyTorch with lstorch: same split, same initial weights (exported from
the Flax model), same batch order, same Adam as examples/flax_train.py.

    python examples/torch_train.py --smoothing 0.1 --out /tmp/torch_run   # train, evaluate
    python examples/torch_train.py --compare                            # JAX vs PyTorch

``--compare`` trains both for ``--steps`` steps in float64 and float32 and checks that every
per-step training loss agrees within the tolerance below; it plots both curves and exits 1 if any
step disagrees.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import torch
from tqdm import tqdm

import lstorch

import digits_common as common
import flax_train

# Largest allowed per-step |loss_jax - loss_torch| / |loss_torch|.
# float64: the parity bound (rtol 1e-10). The two frameworks add and multiply in different orders
#   (matmul blocking, Adam's formula), so they differ by roundings of 2^-53 ~ 1.1e-16 that training
#   carries forward; measured over 200 steps: 5e-16.
# float32: the same roundings at 2^-24 ~ 6e-8, and they grow: the loss at identical weights
#   already differs by a few roundings of a sum over 64 x 10 terms (~1e-7), and each step's weights
#   inherit the previous steps' differences. Measured over 200 steps: 1.1e-6. 1e-4 is ~100x that
#   margin for other machines and BLAS builds, and still ~10x below what a real mismatch gives:
#   a PyTorch smoothing of 0.101 instead of 0.1 (--torch-smoothing 0.101) moves the per-step loss
#   by up to 1e-3 within 30 steps, in float64 and float32 alike.
TOLERANCES = {"float64": 1e-8, "float32": 1e-4}
ZERO_FLOOR = 1e-18


def train_torch(model, config, split, *, torch_smoothing=None, progress=True) -> list[float]:
    """Train the PyTorch ``model`` in place on the same batches as Flax; return per-step losses.

    ``torch_smoothing`` overrides the smoothing on this side only, to show that ``--compare``
    catches a mismatch.
    """
    smoothing = config.smoothing if torch_smoothing is None else torch_smoothing
    train_y = common.add_symmetric_label_noise(
        split.train_y, config.label_noise, common.NUM_CLASSES, config.seed
    )
    loss_fn = lstorch.SmoothedCrossEntropyLoss(
        smoothing=smoothing, convention=config.convention, ignore_index=None
    )
    # torch's Adam defaults (betas 0.9, 0.999; eps 1e-8) are optax.adam's.
    optimizer = torch.optim.Adam(model.parameters(), lr=common.LEARNING_RATE)
    images, labels = torch.from_numpy(split.train_x), torch.from_numpy(train_y)
    batches = common.batch_order(config.seed, len(train_y), flax_train.num_steps(config, split))
    losses = []
    bar = tqdm(batches, desc="torch", unit="step", disable=not progress, mininterval=0.5)
    for step, batch in enumerate(bar):
        batch = torch.from_numpy(batch)
        optimizer.zero_grad()
        loss = loss_fn(model(images[batch]), labels[batch])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def predict(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def compare(config, dtype: str, steps: int, *, torch_smoothing=None, progress=True):
    """Train Flax and PyTorch from the same initial weights for ``steps`` steps in ``dtype``;
    return both per-step loss lists."""
    per_epoch = len(flax_train.load_split(config).train_y) // common.BATCH_SIZE
    config = dataclasses.replace(
        config, dtype=dtype, epochs=-(-steps // per_epoch), max_steps=steps
    )
    split = flax_train.load_split(config, dtype)
    flax_model = flax_train.init_model(config)
    torch_model = common.torch_mlp_from_flax(flax_model)  # before Flax trains it
    jax_losses = flax_train.train(flax_model, config, split, progress=progress)
    torch_losses = train_torch(
        torch_model, config, split, torch_smoothing=torch_smoothing, progress=progress
    )
    return np.asarray(jax_losses), np.asarray(torch_losses)


def run_compare(args, config) -> int:
    results, curves = {}, {}
    for dtype in args.dtypes.split(","):
        jax_losses, torch_losses = compare(
            config, dtype, args.steps, torch_smoothing=args.torch_smoothing
        )
        relative = np.abs(jax_losses - torch_losses) / np.abs(torch_losses)
        worst = int(np.argmax(relative))
        passed = bool(np.all(relative <= TOLERANCES[dtype]))
        results[dtype] = {
            "steps": len(relative),
            "max_relative_difference": float(relative[worst]),
            "at_step": worst,
            "tolerance": TOLERANCES[dtype],
            "passed": passed,
        }
        curves[dtype] = (jax_losses, torch_losses, relative)
        print(
            f"{dtype}: largest per-step relative difference {relative[worst]:.3e} at step "
            f"{worst} of {len(relative)} (tolerance {TOLERANCES[dtype]:.0e}): "
            + ("agree" if passed else "DISAGREE")
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_compare(args.out / "compare.png", curves)
    print(f"wrote {args.out / 'compare.json'} and {args.out / 'compare.png'}")
    return 0 if all(result["passed"] for result in results.values()) else 1


def plot_compare(path: Path, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for dtype, (jax_losses, torch_losses, relative) in curves.items():
        left.plot(jax_losses, label=f"Flax + lsjax ({dtype})", linewidth=2.5, alpha=0.6)
        left.plot(torch_losses, "--", label=f"PyTorch + lstorch ({dtype})", linewidth=1)
        # An exact 0 has no place on a log axis: draw it at ZERO_FLOOR, below float64's 2^-53.
        right.semilogy(np.maximum(relative, ZERO_FLOOR), ".", markersize=3, label=dtype)
        right.axhline(TOLERANCES[dtype], linestyle=":", color="gray")
    right.set_ylim(ZERO_FLOOR / 2, 1e-2)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.legend(fontsize="small")
    right.set_xlabel("step")
    right.set_ylabel("|loss_jax - loss_torch| / |loss_torch|")
    right.set_title(f"relative difference (dotted: tolerances; 0 drawn at {ZERO_FLOOR:.0e})")
    right.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv=None):
    parser = flax_train.build_parser(__doc__.split("\n\n")[0], default_out=Path("runs/torch"))
    parser.add_argument("--compare", action="store_true", help="train Flax and PyTorch, compare")
    parser.add_argument("--steps", type=int, default=200, help="steps of --compare")
    parser.add_argument("--dtypes", default="float64,float32", help="dtypes of --compare")
    parser.add_argument(
        "--torch-smoothing",
        type=float,
        default=None,
        help="smoothing of the PyTorch side only (shows that --compare catches a mismatch)",
    )
    args = parser.parse_args(argv)
    for dtype in args.dtypes.split(","):
        if dtype not in TOLERANCES:
            parser.error(
                f"--dtypes must be a comma-separated subset of float64,float32; got {dtype!r}"
            )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # float64 runs need x64; every array of the examples names its dtype, so float32 runs are
    # unchanged by it.
    jax.config.update("jax_enable_x64", True)
    # The matrices are tiny (64 x 128): one thread is faster than two that wait on each other,
    # several times faster on a shared 2-core machine.
    torch.set_num_threads(1)
    config = flax_train.config_from_args(args)
    if args.compare:
        return run_compare(args, config)
    start = time.perf_counter()
    split = flax_train.load_split(config)
    model = common.torch_mlp_from_flax(flax_train.init_model(config))
    losses = train_torch(model, config, split, torch_smoothing=args.torch_smoothing)
    test_logits = predict(model, split.test_x)
    metrics = common.evaluate(test_logits, split.test_y, predict(model, split.val_x), split.val_y)
    metrics.update(steps=len(losses), final_train_loss=losses[-1])
    metrics["seconds"] = time.perf_counter() - start
    common.print_metrics(metrics)
    title = f"PyTorch, smoothing {config.smoothing}, noise {config.label_noise}"
    common.save_outputs(
        args.out, dataclasses.asdict(config), metrics, test_logits, split.test_y, title
    )
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'reliability.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
