"""Label smoothing on an over-confident network: a wide MLP trained to near-zero training loss on
a reduced digits training set, with temperature scaling as the baseline (Müller et al. 2019).

Two parts, written to --out:

1. the regime search: which (width, training-set size, epochs) makes the unsmoothed MLP
   over-confident (mean confidence above accuracy on the test split);
2. in the over-confident regime: smoothing {0, 0.01, 0.02, 0.05, 0.1} x 5 seeds: test accuracy,
   mean confidence, NLL, ECE, ECE and NLL after temperature scaling, and the differences to the
   unsmoothed model paired by seed; a reliability diagram of seed 0.

    python examples/overconfidence_study.py --out docs/study
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

import digits_common as common
import flax_train

# (name, hidden width, training images (None: the whole 60% split, 1,078), epochs). The last one
# is the regime of part 2.
REGIMES = (
    ("the first study's MLP", 128, None, 60),
    ("4x wider, trained 100 epochs", 512, None, 100),
    ("200 training images, 300 epochs", 128, 200, 300),
    ("4x wider, 200 training images, 300 epochs", 512, 200, 300),
)
SMOOTHINGS = (0.0, 0.01, 0.02, 0.05, 0.1)
REGIME_SEEDS = (0, 1, 2)
SEEDS = (0, 1, 2, 3, 4)
RELIABILITY_SMOOTHINGS = (0.0, 0.02, 0.1)  # seed 0's reliability diagrams
COLUMNS = {
    "accuracy": "accuracy",
    "confidence": "confidence",
    "nll": "NLL",
    "ece": "ECE",
    "ece_after_temperature": "ECE after TS",
    "nll_after_temperature": "NLL after TS",
    "temperature": "T",
}
# Paired by seed: (name in the JSON, column header, key of a run, key of the unsmoothed run).
PAIRED = (
    ("accuracy", "Δ accuracy", "accuracy", "accuracy"),
    ("nll", "Δ NLL", "nll", "nll"),
    ("ece", "Δ ECE", "ece", "ece"),
    ("ece_vs_ts", "ECE - (no smoothing + TS) ECE", "ece", "ece_after_temperature"),
    ("nll_after_ts", "Δ NLL after TS", "nll_after_temperature", "nll_after_temperature"),
    ("ece_after_ts", "Δ ECE after TS", "ece_after_temperature", "ece_after_temperature"),
)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def confidence(logits) -> float:
    """Mean top-class probability."""
    return float(common.softmax(logits).max(axis=1).mean())


def run_one(config: flax_train.Config) -> tuple[dict, np.ndarray, common.Split]:
    metrics, _, test_logits, split = flax_train.run(config, progress=False)
    metrics["confidence"] = confidence(test_logits)
    metrics["train_size"] = len(split.train_y)
    return metrics, test_logits, split


def regime_search(regimes, seeds, max_steps) -> tuple[list[dict], list[dict]]:
    runs, rows = [], []
    for name, hidden, train_size, epochs in regimes:
        members = []
        for seed in seeds:
            config = flax_train.Config(
                smoothing=0.0,
                hidden=hidden,
                train_size=train_size,
                epochs=epochs,
                seed=seed,
                max_steps=max_steps,
            )
            metrics, _, _ = run_one(config)
            run = {"regime": name, "hidden": hidden, "epochs": epochs, "seed": seed, **metrics}
            run["gap"] = metrics["confidence"] - metrics["accuracy"]
            members.append(run)
        row = {"regime": name, "hidden": hidden, "train_size": members[0]["train_size"]}
        row.update(epochs=epochs, seeds=len(members))
        for key in ("final_train_loss", "accuracy", "confidence", "gap", "ece", "temperature"):
            row[key], row[key + "_std"] = mean_std([m[key] for m in members])
        runs += members
        rows.append(row)
    return runs, rows


def smoothing_sweep(base: flax_train.Config, smoothings, seeds):
    """Every (smoothing, seed) run, and seed 0's test logits for the reliability diagrams."""
    runs, logits = [], {}
    for smoothing in smoothings:
        for seed in seeds:
            config = dataclasses.replace(base, smoothing=smoothing, seed=seed)
            metrics, test_logits, split = run_one(config)
            runs.append({"smoothing": smoothing, "seed": seed, **metrics})
            if seed == seeds[0]:
                logits[smoothing] = (test_logits, split.test_y, metrics["temperature"])
    return runs, logits


def summarize(runs: list[dict], smoothings) -> list[dict]:
    """Per smoothing: mean ± std of each column, and mean ± std of the per-seed differences to
    the unsmoothed run of the same seed."""
    unsmoothed = {run["seed"]: run for run in runs if run["smoothing"] == 0.0}
    rows = []
    for smoothing in smoothings:
        members = [run for run in runs if run["smoothing"] == smoothing]
        row = {"smoothing": smoothing, "seeds": len(members)}
        for key in COLUMNS:
            row[key], row[key + "_std"] = mean_std([m[key] for m in members])
        for name, _, key, base_key in PAIRED:
            differences = [m[key] - unsmoothed[m["seed"]][base_key] for m in members]
            row["diff_" + name], row["diff_" + name + "_std"] = mean_std(differences)
            row["diff_" + name + "_seeds_below_zero"] = int(sum(d < 0 for d in differences))
        rows.append(row)
    return rows


def _cell(row, key, digits=3):
    return f"{row[key]:.{digits}f} ± {row[key + '_std']:.{digits}f}"


def regime_table(rows) -> str:
    lines = [
        "| regime | hidden | train images | epochs | final train loss | accuracy | confidence "
        "| confidence - accuracy | ECE | T |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{row['final_train_loss']:.1e} ± {row['final_train_loss_std']:.0e}"]
        cells += [_cell(row, key) for key in ("accuracy", "confidence", "gap", "ece")]
        cells.append(_cell(row, "temperature", 2))
        lines.append(
            f"| {row['regime']} | {row['hidden']} | {row['train_size']} | {row['epochs']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def sweep_tables(rows) -> str:
    header = "| smoothing | " + " | ".join(COLUMNS.values()) + " |"
    lines = [header, "|" + "---|" * (1 + len(COLUMNS))]
    for row in rows:
        lines.append(f"| {row['smoothing']} | " + " | ".join(_cell(row, k) for k in COLUMNS) + " |")
    lines += [
        "",
        "Paired by seed (each seed's run minus the unsmoothed run of that seed; "
        "n/N: seeds where the difference is negative):",
        "",
    ]
    lines.append("| smoothing | " + " | ".join(header for _, header, _, _ in PAIRED) + " |")
    lines.append("|" + "---|" * (1 + len(PAIRED)))
    for row in rows:
        cells = [
            f"{_cell(row, 'diff_' + name)} ({row['diff_' + name + '_seeds_below_zero']}/"
            f"{row['seeds']})"
            for name, _, _, _ in PAIRED
        ]
        lines.append(f"| {row['smoothing']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_reliability(logits: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lsjax import calibration

    panels = []
    for smoothing in RELIABILITY_SMOOTHINGS:
        if smoothing not in logits:
            continue
        test_logits, labels, temperature = logits[smoothing]
        panels.append((f"smoothing {smoothing}", common.softmax(test_logits), labels))
        if smoothing == 0.0:
            scaled = common.softmax(np.asarray(test_logits, np.float64) / temperature)
            panels.append(
                (f"smoothing 0, temperature-scaled (T = {temperature:.2f})", scaled, labels)
            )
    figure, axes = plt.subplots(
        1, len(panels), figsize=(4 * len(panels), 4), constrained_layout=True, squeeze=False
    )
    for ax, (name, probs, labels) in zip(axes[0], panels, strict=True):
        calibration.plot_reliability_diagram(
            probs, labels, num_bins=common.NUM_BINS, ax=ax, title=name
        )
        ax.set_title(
            f"{name}\naccuracy {np.mean(probs.argmax(1) == labels):.3f}, "
            f"confidence {probs.max(1).mean():.3f}",
            fontsize="small",
        )
    figure.suptitle(title)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="output folder")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 3 steps (tests)")
    args = parser.parse_args(argv)
    regimes, smoothings, regime_seeds, seeds = REGIMES, SMOOTHINGS, REGIME_SEEDS, SEEDS
    max_steps = None
    if args.smoke:
        regimes, smoothings, regime_seeds, seeds = REGIMES[-1:], (0.0, 0.1), (0,), (0, 1)
        max_steps = 3
    _, hidden, train_size, epochs = regimes[-1]
    base = flax_train.Config(
        hidden=hidden, train_size=train_size, epochs=epochs, max_steps=max_steps
    )

    start, cpu_start = time.perf_counter(), time.process_time()
    regime_runs, regime_rows = regime_search(regimes, regime_seeds, max_steps)
    regime_seconds = time.perf_counter() - start
    runs, logits = smoothing_sweep(base, smoothings, seeds)
    sweep_seconds = time.perf_counter() - start - regime_seconds
    # CPU seconds of this process (all its threads): on a shared machine, wall time also counts
    # the waiting for a core.
    cpu_seconds = time.process_time() - cpu_start
    rows = summarize(runs, smoothings)
    tables = regime_table(regime_rows) + "\n\n" + sweep_tables(rows)
    print(tables)
    print(
        f"regime search {regime_seconds:.0f} s, smoothing sweep {sweep_seconds:.0f} s "
        f"(wall); {cpu_seconds:.0f} CPU s"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    config = {
        **dataclasses.asdict(base),
        "smoothings": smoothings,
        "seeds": seeds,
        "regime_seeds": regime_seeds,
        "regimes": regimes,
        "num_bins": common.NUM_BINS,
    }
    summary = {
        "config": config,
        "seconds": {
            "regime_search": regime_seconds,
            "smoothing_sweep": sweep_seconds,
            "cpu": cpu_seconds,
        },
        "regime_rows": regime_rows,
        "rows": rows,
        "regime_runs": regime_runs,
        "runs": runs,
    }
    (args.out / "overconfident.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "overconfident.md").write_text(tables + "\n")
    title = (
        f"Digits MLP {hidden}-wide, {train_size} training images, {epochs} epochs, "
        f"seed {seeds[0]}: test split"
    )
    plot_reliability(logits, args.out / "overconfident_reliability.png", title)
    print(
        f"wrote overconfident.md, overconfident.json and overconfident_reliability.png "
        f"to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
