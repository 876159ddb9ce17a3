"""Train a tiny GPT-2 with the Hugging Face Trainer and lstorch's label-smoothed loss.

The model is built from a config with random weights (nothing is downloaded) and reads the
Python standard library's own source as bytes (256 tokens). The loss is
``lstorch.integrations.huggingface.compute_loss_func`` passed as ``Trainer(compute_loss_func=...)``;
with ``--fused``, a Trainer whose ``compute_loss`` calls ``fused_causal_lm_loss``, which never
builds the logits. Held-out NLL and perplexity before and after; metrics.json goes to --out.

    python examples/hf_trainer.py --out runs/hf_trainer
    python examples/hf_trainer.py --z-loss 1e-4 --accumulation 2 --out runs/hf_trainer
    python examples/hf_trainer.py --fused --out runs/hf_trainer_fused
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers starts: never the network

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from lstorch.integrations.huggingface import compute_loss_func, fused_causal_lm_loss

import lm_text


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 60
    batch: int = 8
    accumulation: int = 1
    context: int = 64
    features: int = 64
    heads: int = 4
    layers: int = 2
    learning_rate: float = 2e-3
    smoothing: float = 0.1
    z_loss: float = 0.0
    fused: bool = False
    text_bytes: int = 1_000_000
    seed: int = 0


class FusedLossTrainer(Trainer):
    """A Trainer whose training loss is the fused one: from the last hidden state and the
    output layer's weight, chunk by chunk over the vocabulary (no rows x V logits). Evaluation,
    which wants the logits, keeps the Trainer's path (the ``compute_loss_func`` it is given)."""

    def __init__(self, *args, loss_options: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_options = loss_options

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return fused_causal_lm_loss(
            model,
            inputs["input_ids"],
            inputs["labels"],
            attention_mask=inputs.get("attention_mask"),
            num_items_in_batch=num_items_in_batch,
            **self.loss_options,
        )


def tiny_gpt2(config: Config) -> GPT2LMHeadModel:
    torch.manual_seed(config.seed)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=lm_text.VOCAB,
            n_positions=config.context,
            n_embd=config.features,
            n_head=config.heads,
            n_layer=config.layers,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


@torch.no_grad()
def held_out(model, windows: np.ndarray) -> dict:
    """Next-byte NLL (no smoothing: the perplexity's) on held-out windows."""
    model.eval()
    ids = torch.as_tensor(windows, dtype=torch.long)
    logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    ).item()
    model.train()
    return {"nll": nll, "perplexity": math.exp(nll)}


def run(config: Config, out: Path, *, progress: bool = True) -> dict:
    text = lm_text.stdlib_bytes(config.text_bytes)
    train_text, eval_text = lm_text.train_eval_split(text)
    rng = np.random.default_rng(config.seed)
    rows = config.steps * config.batch * config.accumulation
    train = lm_text.windows(train_text, rows, config.context, rng)
    dataset = [{"input_ids": row, "labels": row} for row in torch.as_tensor(train).long()]
    eval_windows = lm_text.windows(eval_text, 32, config.context, rng)

    model = tiny_gpt2(config)
    before = held_out(model, eval_windows)
    loss_options = dict(smoothing=config.smoothing)
    if config.z_loss:
        loss_options["z_loss"] = config.z_loss
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        report_to=[],
        use_cpu=True,
        max_steps=config.steps,
        per_device_train_batch_size=config.batch,
        gradient_accumulation_steps=config.accumulation,
        learning_rate=config.learning_rate,
        warmup_steps=max(1, config.steps // 10),
        logging_steps=max(1, config.steps // 10),
        save_strategy="no",
        disable_tqdm=not progress,
        seed=config.seed,
    )
    trainer_options = dict(
        model=model,
        args=args,
        train_dataset=dataset,
        compute_loss_func=compute_loss_func(**loss_options),
    )
    if config.fused:
        trainer = FusedLossTrainer(**trainer_options, loss_options=loss_options)
    else:
        trainer = Trainer(**trainer_options)
    trainer.train()
    return {
        "steps": trainer.state.global_step,
        "train_loss": [
            {"step": log["step"], "loss": log["loss"]}
            for log in trainer.state.log_history
            if "loss" in log
        ],
        "before": before,
        "after": held_out(model, eval_windows),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        if field.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    parser.add_argument("--out", type=Path, default=Path("runs/hf_trainer"), help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    if config.fused and config.z_loss:
        parser.error("--fused: the fused loss takes no z_loss yet; leave --z-loss at 0")

    start = time.perf_counter()
    metrics = run(config, args.out, progress=not args.no_progress)
    metrics["seconds"] = time.perf_counter() - start
    before, after = metrics["before"], metrics["after"]
    print(
        f"held-out NLL {before['nll']:.3f} -> {after['nll']:.3f} nats/byte, perplexity "
        f"{before['perplexity']:.1f} -> {after['perplexity']:.1f} after {metrics['steps']} steps "
        f"({'fused' if config.fused else 'compute_loss_func'}, {metrics['seconds']:.0f} s)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(
        json.dumps({"config": dataclasses.asdict(config), **metrics}, indent=2) + "\n"
    )
    print(f"wrote {args.out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
