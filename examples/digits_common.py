"""What the digits examples share: data and split, label noise, batch order, the MLP (Flax NNX and
its PyTorch copy), and the evaluation metrics. torch is imported only by ``torch_mlp_from_flax``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import nnx

from lsjax import calibration

NUM_CLASSES = 10
NUM_FEATURES = 64
HIDDEN = 128
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
NUM_BINS = 15


@dataclasses.dataclass(frozen=True)
class Split:
    """Features in [0, 1] (pixel / 16) and integer labels, for train / validation / test."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_digits_split(seed: int, dtype: str = "float32", train_size: int | None = None) -> Split:
    """scikit-learn's bundled digits (1,797 8x8 images, no download), split 60/20/20, stratified.

    The split depends on ``seed``, so the seeds of a study also vary the data. Validation is
    held out for temperature scaling; test for the reported metrics. ``train_size`` keeps a
    stratified subset of that many training images (validation and test are unchanged).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    features = (data.data / 16.0).astype(dtype)
    labels = data.target.astype(np.int64)
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=0.2, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest, test_size=0.25, stratify=labels[rest], random_state=seed + 1
    )
    if train_size is not None and train_size < len(train):
        train, _ = train_test_split(
            train, train_size=train_size, stratify=labels[train], random_state=seed + 2
        )
    return Split(
        features[train], labels[train], features[val], labels[val], features[test], labels[test]
    )


def add_symmetric_label_noise(
    labels: np.ndarray, rate: float, num_classes: int, seed: int
) -> np.ndarray:
    """Symmetric label noise: each label, with probability ``rate``, is replaced by one of the
    other ``num_classes - 1`` classes drawn uniformly, so ``rate`` is the expected fraction of
    wrong labels. Apply to training labels only."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"`label_noise` must be in [0, 1]; got {rate!r}.")
    rng = np.random.default_rng([seed, 1])
    flip = rng.random(len(labels)) < rate
    shift = rng.integers(1, num_classes, size=len(labels))  # never 0: always a different class
    return np.where(flip, (labels + shift) % num_classes, labels)


def batch_order(seed: int, num_train: int, num_steps: int, batch_size: int = BATCH_SIZE):
    """The index array of each step: a fresh permutation per epoch, incomplete tail dropped
    (one batch shape, one compilation). Both frameworks read this list, so they see the same
    batches in the same order."""
    rng = np.random.default_rng([seed, 2])
    per_epoch = num_train // batch_size
    batches = []
    while len(batches) < num_steps:
        permutation = rng.permutation(num_train)
        batches.extend(permutation[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch))
    return batches[:num_steps]


def steps_for(epochs: int, num_train: int, batch_size: int = BATCH_SIZE) -> int:
    return epochs * (num_train // batch_size)


class MLP(nnx.Module):
    """64 -> hidden -> hidden -> 10, ReLU (hidden 128 unless given). Kernels are (in, out), as
    ``x @ kernel + bias``."""

    def __init__(self, *, rngs: nnx.Rngs, dtype: str = "float32", hidden: int = HIDDEN):
        def linear(size_in, size_out):
            return nnx.Linear(size_in, size_out, dtype=dtype, param_dtype=dtype, rngs=rngs)

        self.hidden1 = linear(NUM_FEATURES, hidden)
        self.hidden2 = linear(hidden, hidden)
        self.output = linear(hidden, NUM_CLASSES)

    def features(self, x):
        """The penultimate layer: the activations the output layer reads."""
        return nnx.relu(self.hidden2(nnx.relu(self.hidden1(x))))

    def __call__(self, x):
        return self.output(self.features(x))


def torch_mlp_from_flax(model: MLP):
    """The same MLP in PyTorch, holding a copy of ``model``'s current weights (torch's Linear
    stores ``weight`` as (out, in), the transpose of a Flax kernel)."""
    import torch

    layers = []
    for layer in (model.hidden1, model.hidden2, model.output):
        kernel = np.asarray(layer.kernel[...])
        linear = torch.nn.Linear(*kernel.shape, dtype=getattr(torch, str(kernel.dtype)))
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            linear.bias.copy_(torch.from_numpy(np.array(layer.bias[...])))
        layers += [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def evaluate(test_logits, test_y, val_logits, val_y) -> dict:
    """Test accuracy, NLL, ECE and MCE, then the same after temperature scaling fitted on the
    validation logits (accuracy does not change under a temperature)."""
    test_logits = np.asarray(test_logits, dtype=np.float64)
    temperature = calibration.fit_temperature(np.asarray(val_logits, np.float64), val_y)
    probs = softmax(test_logits)
    scaled_probs = softmax(test_logits / temperature)
    return {
        "accuracy": float(np.mean(probs.argmax(axis=1) == test_y)),
        "nll": calibration.negative_log_likelihood(test_logits, test_y),
        "ece": calibration.expected_calibration_error(probs, test_y, num_bins=NUM_BINS),
        "mce": calibration.maximum_calibration_error(probs, test_y, num_bins=NUM_BINS),
        "temperature": temperature,
        "nll_after_temperature": calibration.negative_log_likelihood(
            test_logits, test_y, temperature=temperature
        ),
        "ece_after_temperature": calibration.expected_calibration_error(
            scaled_probs, test_y, num_bins=NUM_BINS
        ),
    }


def save_outputs(out: Path, config: dict, metrics: dict, test_logits, test_y, title: str):
    """metrics.json (config, metrics) and reliability.png (before / after temperature scaling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"config": config, **metrics}, indent=2) + "\n")
    test_logits = np.asarray(test_logits, dtype=np.float64)
    figure, axes = plt.subplots(1, 2, figsize=(8, 4), constrained_layout=True)
    calibration.plot_reliability_diagram(
        softmax(test_logits), test_y, num_bins=NUM_BINS, ax=axes[0], title=title
    )
    calibration.plot_reliability_diagram(
        softmax(test_logits / metrics["temperature"]),
        test_y,
        num_bins=NUM_BINS,
        ax=axes[1],
        title=f"after temperature scaling (T = {metrics['temperature']:.2f})",
    )
    figure.savefig(out / "reliability.png", dpi=100)
    plt.close(figure)


def print_metrics(metrics: dict) -> None:
    print(
        f"test accuracy {metrics['accuracy']:.4f}  NLL {metrics['nll']:.4f}  "
        f"ECE {metrics['ece']:.4f}  ECE after temperature scaling "
        f"{metrics['ece_after_temperature']:.4f} (T = {metrics['temperature']:.3f})"
    )
