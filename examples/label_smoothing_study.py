"""Label smoothing x symmetric label noise on digits (the Flax example, many runs).

Smoothing {0, 0.05, 0.1, 0.2} x training-label noise {0, 0.2, 0.4} x seeds {0, 1, 2}. Prints a
table of test accuracy, NLL, ECE and ECE after temperature scaling (mean ± sample std over the
seeds) and saves it with one figure to --out:

    python examples/label_smoothing_study.py --out docs/study
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import flax_train

SMOOTHINGS = (0.0, 0.05, 0.1, 0.2)
NOISES = (0.0, 0.2, 0.4)
SEEDS = (0, 1, 2)
COLUMNS = {
    "accuracy": "accuracy",
    "nll": "NLL",
    "ece": "ECE",
    "ece_after_temperature": "ECE after TS",
    "temperature": "T",
}


def run_study(smoothings, noises, seeds, base: flax_train.Config) -> list[dict]:
    runs = [(s, n, seed) for n in noises for s in smoothings for seed in seeds]
    results = []
    for smoothing, noise, seed in tqdm(runs, desc="study", unit="run"):
        config = dataclasses.replace(base, smoothing=smoothing, label_noise=noise, seed=seed)
        metrics, *_ = flax_train.run(config, progress=False)
        results.append({"smoothing": smoothing, "label_noise": noise, "seed": seed, **metrics})
    return results


def summarize(results: list[dict]) -> list[dict]:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) per (noise, smoothing)."""
    groups = {}
    for result in results:
        groups.setdefault((result["label_noise"], result["smoothing"]), []).append(result)
    rows = []
    for (noise, smoothing), members in groups.items():
        row = {"label_noise": noise, "smoothing": smoothing, "seeds": len(members)}
        for key in COLUMNS:
            values = np.array([member[key] for member in members])
            row[key] = float(values.mean())
            row[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    header = "| label noise | smoothing | " + " | ".join(COLUMNS.values()) + " |"
    lines = [header, "|" + "---|" * (2 + len(COLUMNS))]
    for row in rows:
        cells = [f"{row[key]:.3f} ± {row[key + '_std']:.3f}" for key in COLUMNS]
        lines.append(f"| {row['label_noise']} | {row['smoothing']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy", "test accuracy"), ("nll", "test NLL"), ("ece", "test ECE (15 bins)")]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    noises = sorted({row["label_noise"] for row in rows})
    for color, noise in zip(plt.cm.viridis(np.linspace(0, 0.85, len(noises))), noises, strict=True):
        members = sorted(
            (r for r in rows if r["label_noise"] == noise), key=lambda r: r["smoothing"]
        )
        smoothing = [r["smoothing"] for r in members]
        for ax, (key, _) in zip(axes, panels, strict=True):
            mean = [r[key] for r in members]
            std = [r[key + "_std"] for r in members]
            ax.errorbar(
                smoothing,
                mean,
                yerr=std,
                marker="o",
                capsize=3,
                color=color,
                label=f"noise {noise}",
            )
        after = [r["ece_after_temperature"] for r in members]
        after_std = [r["ece_after_temperature_std"] for r in members]
        axes[2].errorbar(
            smoothing,
            after,
            yerr=after_std,
            marker="s",
            linestyle="--",
            capsize=3,
            color=color,
            alpha=0.6,
        )
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.set_xlabel("label smoothing")
        ax.set_ylabel(label)
        ax.legend(fontsize="small")
    axes[2].set_title("solid: raw, dashed: after temperature scaling", fontsize="small")
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=flax_train.Config.epochs)
    parser.add_argument("--convention", default="uniform", choices=["uniform", "others"])
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="output folder")
    parser.add_argument(
        "--smoke", action="store_true", help="2 smoothings x 1 noise x 1 seed, 3 steps (tests)"
    )
    args = parser.parse_args(argv)
    base = flax_train.Config(convention=args.convention, epochs=args.epochs)
    smoothings, noises, seeds = SMOOTHINGS, NOISES, SEEDS
    if args.smoke:
        smoothings, noises, seeds = (0.0, 0.1), (0.2,), (0,)
        base = dataclasses.replace(base, max_steps=3)

    start = time.perf_counter()
    results = run_study(smoothings, noises, seeds, base)
    seconds = time.perf_counter() - start
    rows = summarize(results)
    table = markdown_table(rows)
    print(table)
    print(f"{len(results)} runs in {seconds:.0f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    config = {
        **dataclasses.asdict(base),
        "smoothings": smoothings,
        "noises": noises,
        "seeds": seeds,
    }
    summary = {"config": config, "seconds": seconds, "rows": rows, "runs": results}
    (args.out / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "study.md").write_text(table + "\n")
    title = (
        f"Digits MLP, {args.epochs} epochs, {args.convention} smoothing, "
        f"mean ± std over {len(seeds)} seed(s)"
    )
    plot(rows, args.out / "study.png", title)
    print(f"wrote {args.out / 'study.md'}, {args.out / 'study.json'} and {args.out / 'study.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
