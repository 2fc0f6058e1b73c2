"""Plots written into run folders (matplotlib, headless Agg backend)."""
from __future__ import annotations

import csv
import math
from pathlib import Path


def plot_results(results_csv: Path) -> Path:
    """results.png: one panel per logged loss and metric of every task, against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in rows[0] if k != "epoch" and not k.startswith(("lr/", "time/"))]
    epochs = [int(r["epoch"]) for r in rows]
    cols = min(5, max(len(keys), 1))
    nrows = math.ceil(len(keys) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        ys = [float(r[k]) if r.get(k) not in (None, "") else float("nan") for r in rows]
        ax.plot(epochs, ys, marker=".")
        ax.set_title(k, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out = results_csv.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
