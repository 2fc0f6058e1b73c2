"""How far a nano model gets on the embedded dataset in a stated CPU budget.

    python -m benchmarks.train_budget --epochs 30 --img 256            # all four tasks
    python -m benchmarks.train_budget --epochs 30 --img 256 --tasks det

Prints per-epoch metrics and a final line with the budget (epochs, image size, minutes, machine threads).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from benchmarks.common import add_training_args, run_training, train_args
from utils.viz.plots import read_results

SHOWN = ["box_map", "box_map50", "mask_map", "mask_map50", "sem_miou", "sem_pixacc", "cap_bleu4", "cap_cider"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, epochs=30, img=256, project="runs/bench")
    p.add_argument("--tasks", default="")
    p.add_argument("--name", default="budget")
    opt = p.parse_args()
    args = train_args(opt, opt.tasks)
    run, minutes = run_training(args, Path(opt.project), opt.name)
    rows = read_results(run / "results.csv")
    cols = [c for c in SHOWN if c in rows[0]]
    print("\n" + " ".join(f"{c:>10}" for c in ["epoch"] + cols))
    for r in rows:
        print(" ".join(f"{r['epoch']:>10.0f}" if c == "epoch" else f"{r.get(c, float('nan')):>10.4f}" for c in ["epoch"] + cols))
    print(f"\nbudget: {opt.epochs} epochs at {opt.img} px, batch {opt.batch_size}, {minutes:.1f} min on "
          f"{os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), seed {opt.seed}; run: {run}")


if __name__ == "__main__":
    main()
