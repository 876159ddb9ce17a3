"""Train a small Flax NNX transformer language model with lsjax's fused label-smoothed loss.

The text is the Python standard library's own source, read as bytes (256 tokens). The output
layer is the token embedding (tied, ``(V, D)``), and the training loss is
``lsjax.fused_linear_smoothed_cross_entropy`` on the last hidden state: the training batch's
logits are never built. Label smoothing and a z-loss; held-out loss, accuracy and perplexity
every ``--eval-every`` steps. Writes metrics.json and curves.png to --out.

    python examples/flax_lm.py --out runs/flax_lm          # about a minute on a 2-core CPU
    python examples/flax_lm.py --mesh 2x2 --out runs/flax_lm_mesh

``--mesh BxV`` runs on ``B * V`` devices (simulated CPU devices, as XLA makes them when
``XLA_FLAGS=--xla_force_host_platform_device_count`` is set before jax is imported, which this
script does when run with ``--mesh``): the batch is split over ``B``, and the loss is
``lsjax.sharded.sharded_fused_linear_smoothed_cross_entropy`` with the output layer split over
the vocabulary across ``V`` devices.
"""

from __future__ import annotations

import os
import sys


def _mesh_devices(argv: list[str]) -> int:
    """The number of devices ``--mesh BxV`` in ``argv`` asks for (1 without it)."""
    for index, arg in enumerate(argv):
        if arg.startswith("--mesh"):
            value = arg.partition("=")[2] or (argv[index + 1] if index + 1 < len(argv) else "")
            batch, _, vocab = value.partition("x")
            if batch.isdigit() and vocab.isdigit():
                return int(batch) * int(vocab)
    return 1


if __name__ == "__main__" and _mesh_devices(sys.argv[1:]) > 1:
    # Before jax is imported: XLA reads the flag once, when it starts.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_mesh_devices(sys.argv[1:])}"
    )

import argparse  # noqa: E402  (after XLA_FLAGS, above)
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lsjax  # noqa: E402
from lsjax.sharded import sharded_fused_linear_smoothed_cross_entropy  # noqa: E402

import lm_text  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 600
    batch: int = 16
    context: int = 64
    features: int = 64
    heads: int = 4
    layers: int = 2
    learning_rate: float = 3e-3
    smoothing: float = 0.1
    z_loss: float = 1e-4
    softcap: float | None = None  # Gemma 2/3's cap * tanh(x / cap) on the logits, in the loss
    chunk_size: int = 128  # two vocabulary chunks of the 256 bytes
    eval_every: int = 50
    eval_batch: int = 32
    text_bytes: int = 2_000_000
    mesh: tuple[int, int] | None = None  # (batch devices, vocabulary devices)
    seed: int = 0


class Block(nnx.Module):
    """Pre-norm causal self-attention and MLP, each added to the residual stream."""

    def __init__(self, features: int, heads: int, *, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(features, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(heads, features, decode=False, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(features, rngs=rngs)
        self.up = nnx.Linear(features, 4 * features, rngs=rngs)
        self.down = nnx.Linear(4 * features, features, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attention(self.attention_norm(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.mlp_norm(x))))


class ByteLM(nnx.Module):
    """Token and learned position embeddings, transformer blocks, a final norm. The output layer
    is the token embedding itself, ``(V, D)``: the layout the fused loss takes."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(lm_text.VOCAB, config.features, rngs=rngs)
        shape = (config.context, config.features)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), shape, jnp.float32))
        self.blocks = nnx.List(
            [Block(config.features, config.heads, rngs=rngs) for _ in range(config.layers)]
        )
        self.norm = nnx.LayerNorm(config.features, rngs=rngs)

    def hidden(self, tokens):
        """The last hidden state ``(batch, time, D)`` of ``tokens`` ``(batch, time)``."""
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    @property
    def output_weight(self):
        return self.embed.embedding[...]


def fused_loss(hidden, weight, labels, *, mesh, **options):
    """The fused loss, on one device or with ``weight`` split over the mesh's vocabulary axis."""
    if mesh is None:
        return lsjax.fused_linear_smoothed_cross_entropy(hidden, weight, labels, **options)
    return sharded_fused_linear_smoothed_cross_entropy(
        hidden, weight, labels, mesh=mesh, batch_axis="batch", vocab_axis="vocab", **options
    )


def make_train_step(config: Config, mesh: Mesh | None):
    def loss_fn(model, inputs, targets):
        hidden = model.hidden(inputs).reshape(-1, config.features)
        labels = targets.reshape(-1)
        weight = model.output_weight
        # The z-loss (z * lse**2 per token) in the same pass over the vocabulary chunks.
        return fused_loss(
            hidden,
            weight,
            labels,
            mesh=mesh,
            smoothing=config.smoothing,
            z_loss=config.z_loss,
            softcap=config.softcap,
            chunk_size=config.chunk_size,
        )

    @nnx.jit
    def train_step(model, optimizer, inputs, targets):
        loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
        optimizer.update(model, grads)
        return loss

    return train_step


@functools.partial(nnx.jit, static_argnames="softcap")
def eval_step(model, inputs, targets, softcap=None):
    """Held-out NLL (no smoothing: the perplexity's) and token accuracy of a small evaluation
    batch: the accuracy is the mean of ``return_stats``'s per-token ``correct`` (argmax equals
    the label), from the same pass as the loss."""
    logits = model.hidden(inputs) @ model.output_weight.T
    losses, stats = lsjax.smoothed_cross_entropy(
        logits, targets, softcap=softcap, return_stats=True
    )
    return jnp.mean(losses), jnp.mean(stats.correct)


def make_mesh(shape: tuple[int, int] | None) -> Mesh | None:
    if shape is None:
        return None
    needed = shape[0] * shape[1]
    if jax.device_count() < needed:
        raise SystemExit(
            f"--mesh {shape[0]}x{shape[1]} needs {needed} devices, and jax has "
            f"{jax.device_count()}: run the script itself (python examples/flax_lm.py --mesh "
            "...), which simulates CPU devices before jax starts."
        )
    devices = np.array(jax.devices()[:needed]).reshape(shape)
    return Mesh(devices, ("batch", "vocab"))


def run(config: Config, *, progress: bool = True) -> dict:
    """Train and evaluate; return the metrics (per-step training loss, evaluation history)."""
    text = lm_text.stdlib_bytes(config.text_bytes)
    train_text, eval_text = lm_text.train_eval_split(text)
    rng = np.random.default_rng(config.seed)
    eval_windows = lm_text.windows(eval_text, config.eval_batch, config.context + 1, rng)
    mesh = make_mesh(config.mesh)

    model = ByteLM(config, rngs=nnx.Rngs(config.seed))
    if mesh is not None:  # parameters on every device; each batch split over the batch axis
        nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, PartitionSpec())))
        batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.learning_rate,
        max(1, config.steps // 10),
        max(2, config.steps),
        0.1 * config.learning_rate,
    )
    optimizer = nnx.Optimizer(
        model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule)), wrt=nnx.Param
    )
    train_step = nnx.cached_partial(make_train_step(config, mesh), model, optimizer)

    def evaluate(step):
        nll, accuracy = eval_step(
            model, eval_windows[:, :-1], eval_windows[:, 1:], softcap=config.softcap
        )
        nll = float(nll)
        return {"step": step, "nll": nll, "perplexity": math.exp(nll), "accuracy": float(accuracy)}

    history, losses = [evaluate(0)], []
    bar = tqdm(range(1, config.steps + 1), desc="flax_lm", unit="step", disable=not progress)
    for step in bar:
        tokens = lm_text.windows(train_text, config.batch, config.context + 1, rng)
        if mesh is not None:
            tokens = jax.device_put(tokens, batch_sharding)
        losses.append(train_step(tokens[:, :-1], tokens[:, 1:]))
        if step % config.eval_every == 0 or step == config.steps:
            history.append(evaluate(step))
            bar.set_postfix(loss=f"{float(losses[-1]):.3f}", acc=f"{history[-1]['accuracy']:.3f}")
    return {
        "steps": config.steps,
        "devices": 1 if mesh is None else mesh.size,
        "train_loss": [float(loss) for loss in losses],
        "eval": history,
        "final": history[-1],
    }


def save_curves(path: Path, metrics: dict, title: str) -> None:
    """curves.png: training loss and held-out NLL, accuracy, perplexity against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in metrics["eval"]]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6), constrained_layout=True)
    train_steps = range(1, len(metrics["train_loss"]) + 1)
    axes[0].plot(train_steps, metrics["train_loss"], lw=0.8, label="training loss (smoothed + z)")
    axes[0].plot(steps, [row["nll"] for row in metrics["eval"]], "o-", label="held-out NLL")
    axes[0].set(xlabel="step", ylabel="nats per byte", title="loss")
    axes[0].legend()
    axes[1].plot(steps, [row["accuracy"] for row in metrics["eval"]], "o-")
    axes[1].set(xlabel="step", ylabel="next-byte accuracy", title="held-out accuracy")
    axes[2].plot(steps, [row["perplexity"] for row in metrics["eval"]], "o-")
    axes[2].set(xlabel="step", ylabel="perplexity", yscale="log", title="held-out perplexity")
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _mesh_shape(value: str) -> tuple[int, int]:
    batch, _, vocab = value.partition("x")
    if not (batch.isdigit() and vocab.isdigit() and int(batch) > 0 and int(vocab) > 0):
        raise argparse.ArgumentTypeError(f"expected BxV, e.g. 2x2; got {value!r}")
    return int(batch), int(vocab)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(Config):
        if field.name in ("mesh", "softcap"):
            continue
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(field.default), default=field.default)
    parser.add_argument(
        "--mesh",
        type=_mesh_shape,
        default=None,
        metavar="BxV",
        help="run on B*V simulated CPU devices with the vocabulary-sharded loss",
    )
    parser.add_argument(
        "--softcap",
        type=float,
        default=None,
        help="soft-cap the logits in the loss, cap * tanh(x / cap) (Gemma 2/3; e.g. 30)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/flax_lm"), help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    config = Config(**options)

    start = time.perf_counter()
    metrics = run(config, progress=not args.no_progress)
    metrics["seconds"] = time.perf_counter() - start
    final = metrics["final"]
    print(
        f"step {final['step']}: held-out NLL {final['nll']:.3f} nats/byte, perplexity "
        f"{final['perplexity']:.2f}, accuracy {final['accuracy']:.3f} "
        f"({metrics['seconds']:.0f} s on {metrics['devices']} device(s))"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(
        json.dumps({"config": dataclasses.asdict(config), **metrics}, indent=2) + "\n"
    )
    mesh = "" if config.mesh is None else f", mesh {config.mesh[0]}x{config.mesh[1]}"
    title = f"byte LM on the standard library, smoothing {config.smoothing}{mesh}"
    save_curves(args.out / "curves.png", metrics, title)
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
