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

from benchmarks.common import read_results, run_training

SHOWN = ["box_map", "box_map50", "mask_map", "mask_map50", "sem_miou", "sem_pixacc", "cap_bleu4", "cap_cider"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--img", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tasks", default="")
    p.add_argument("--cfg", default="cfg/yolor-mt-n.yaml")
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--balance", default="fixed")
    p.add_argument("--hyp", default="data/hyps/hyp.scratch.yaml")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--project", default="runs/bench")
    p.add_argument("--name", default="budget")
    opt = p.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    args = ["--cfg", opt.cfg, "--data", opt.data, "--epochs", str(opt.epochs), "--img", str(opt.img),
            "--batch-size", str(opt.batch_size), "--seed", str(opt.seed), "--workers", str(opt.workers),
            "--balance", opt.balance, "--device", "cpu", "--hyp", opt.hyp] + (["--tasks", opt.tasks] if opt.tasks else [])
    run, minutes = run_training(args, Path(opt.project), opt.name)
    rows = read_results(run)
    cols = [c for c in SHOWN if c in rows[0]]
    print("\n" + " ".join(f"{c:>10}" for c in ["epoch"] + cols))
    for r in rows:
        print(" ".join(f"{r['epoch']:>10.0f}" if c == "epoch" else f"{r.get(c, float('nan')):>10.4f}" for c in ["epoch"] + cols))
    print(f"\nbudget: {opt.epochs} epochs at {opt.img} px, batch {opt.batch_size}, {minutes:.1f} min on "
          f"{os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), seed {opt.seed}; run: {run}")


if __name__ == "__main__":
    main()
