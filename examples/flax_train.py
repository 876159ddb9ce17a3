"""Train a Flax NNX MLP on scikit-learn's digits with lsjax's label-smoothed loss, then report
test accuracy, NLL, ECE and ECE after temperature scaling; write metrics.json and
reliability.png to --out.

    python examples/flax_train.py --smoothing 0.1 --label-noise 0.2 --out /tmp/flax_run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import lsjax

import digits_common as common


@dataclasses.dataclass(frozen=True)
class Config:
    smoothing: float = 0.1
    convention: str = "uniform"
    label_noise: float = 0.0
    epochs: int = 60
    seed: int = 0
    dtype: str = "float32"
    max_steps: int | None = None  # cut training short (smoke tests)
    hidden: int = common.HIDDEN  # width of both hidden layers
    train_size: int | None = None  # a stratified subset of the training split (None: all of it)


@functools.partial(nnx.jit, static_argnames="convention")
def train_step(model, optimizer, images, labels, smoothing, convention):
    def loss_fn(model):
        logits = model(images)
        loss = lsjax.smoothed_cross_entropy(
            logits, labels, smoothing=smoothing, convention=convention, reduction="mean"
        )
        return loss, logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == labels)}


@nnx.jit
def predict(model, images):
    return model(images)


def init_model(config: Config) -> common.MLP:
    return common.MLP(rngs=nnx.Rngs(config.seed), dtype=config.dtype, hidden=config.hidden)


def load_split(config: Config, dtype: str | None = None) -> common.Split:
    return common.load_digits_split(config.seed, dtype or config.dtype, config.train_size)


def num_steps(config: Config, split: common.Split) -> int:
    steps = common.steps_for(config.epochs, len(split.train_y))
    return steps if config.max_steps is None else min(steps, config.max_steps)


def train(model, config: Config, split: common.Split, *, progress: bool = True) -> list[float]:
    """Train ``model`` in place; return the training loss of every step."""
    train_y = common.add_symmetric_label_noise(
        split.train_y, config.label_noise, common.NUM_CLASSES, config.seed
    )
    optimizer = nnx.Optimizer(model, optax.adam(common.LEARNING_RATE), wrt=nnx.Param)
    # cached_partial walks the model's graph once, not at every call (Flax's advice for loops).
    step_fn = nnx.cached_partial(train_step, model, optimizer)
    smoothing = jnp.asarray(config.smoothing, dtype=config.dtype)  # traced: one compilation
    batches = common.batch_order(config.seed, len(train_y), num_steps(config, split))
    losses = []
    bar = tqdm(batches, desc="flax", unit="step", disable=not progress, mininterval=0.5)
    for step, batch in enumerate(bar):
        metrics = step_fn(split.train_x[batch], train_y[batch], smoothing, config.convention)
        losses.append(metrics["loss"])
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    return [float(loss) for loss in losses]


def run(config: Config, *, progress: bool = True):
    """Train, evaluate; return (metrics, per-step losses, test logits, split)."""
    split = load_split(config)
    model = init_model(config)
    losses = train(model, config, split, progress=progress)
    test_logits = np.asarray(predict(model, jnp.asarray(split.test_x)))
    val_logits = np.asarray(predict(model, jnp.asarray(split.val_x)))
    metrics = common.evaluate(test_logits, split.test_y, val_logits, split.val_y)
    metrics["steps"] = len(losses)
    metrics["final_train_loss"] = losses[-1]
    return metrics, losses, test_logits, split


def build_parser(description: str, default_out: Path) -> argparse.ArgumentParser:
    """The flags both training scripts take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoothing", type=float, default=Config.smoothing)
    parser.add_argument("--convention", default=Config.convention, choices=["uniform", "others"])
    parser.add_argument(
        "--label-noise",
        type=float,
        default=Config.label_noise,
        help="symmetric noise rate on the training labels",
    )
    parser.add_argument("--epochs", type=int, default=Config.epochs)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--dtype", default=Config.dtype, choices=["float32", "float64"])
    parser.add_argument("--hidden", type=int, default=Config.hidden, help="hidden layer width")
    parser.add_argument(
        "--train-size",
        type=int,
        default=Config.train_size,
        help="train on a stratified subset of this many images (default: the whole split)",
    )
    parser.add_argument("--out", type=Path, default=default_out, help="output folder")
    parser.add_argument("--smoke", action="store_true", help="train 3 steps only (tests)")
    return parser


def config_from_args(args) -> Config:
    return Config(
        smoothing=args.smoothing,
        convention=args.convention,
        label_noise=args.label_noise,
        epochs=args.epochs,
        seed=args.seed,
        dtype=args.dtype,
        max_steps=3 if args.smoke else None,
        hidden=args.hidden,
        train_size=args.train_size,
    )


def main(argv=None) -> int:
    args = build_parser(__doc__.split("\n\n")[0], default_out=Path("runs/flax")).parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    config = config_from_args(args)
    start = time.perf_counter()
    metrics, _, test_logits, split = run(config)
    metrics["seconds"] = time.perf_counter() - start
    common.print_metrics(metrics)
    title = f"Flax, smoothing {config.smoothing}, noise {config.label_noise}"
    common.save_outputs(
        args.out, dataclasses.asdict(config), metrics, test_logits, split.test_y, title
    )
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'reliability.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
