"""What the run pictures cost: the same short training with ``--plots`` (default) and ``--noplots``.

    python -m benchmarks.plots_cost                       # 1 epoch, 128 px, nano model, embedded dataset
    python -m benchmarks.plots_cost --epochs 2 --img 256 --repeat 2

Prints the training-loop time (``time/train_s`` of results.csv summed over epochs: what the background
train-batch / label pictures could slow down) and the whole run's wall time (which also holds validation
and the pictures drawn once after training), for each setting, and their differences.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from benchmarks.common import add_training_args, run_training, train_args
from utils.viz.plots import read_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, epochs=1, img=128, project="runs/bench")
    p.add_argument("--repeat", type=int, default=1, help="alternate the two settings this many times")
    opt = p.parse_args()
    base = train_args(opt)
    results: dict[str, list[tuple[float, float]]] = {"noplots": [], "plots": []}
    for _r in range(opt.repeat):
        for name in ("noplots", "plots"):  # alternate, so drift in machine load hits both settings
            args = base + (["--noplots"] if name == "noplots" else [])
            run, minutes = run_training(args, Path(opt.project), f"plots_cost_{name}")
            loop = sum(row.get("time/train_s", 0.0) for row in read_results(run / "results.csv"))
            results[name].append((loop, minutes * 60))
    print(f"\n{'setting':>8} {'train loop s':>13} {'wall s':>8}")
    mean = {}
    for name, vals in results.items():
        loop = sum(v[0] for v in vals) / len(vals)
        wall = sum(v[1] for v in vals) / len(vals)
        mean[name] = (loop, wall)
        print(f"{name:>8} {loop:>13.1f} {wall:>8.1f}")
    dl, dw = mean["plots"][0] - mean["noplots"][0], mean["plots"][1] - mean["noplots"][1]
    print(f"\nplots cost: train loop {dl:+.1f} s ({100 * dl / max(mean['noplots'][0], 1e-9):+.1f}%), "
          f"whole run {dw:+.1f} s; {opt.epochs} epoch(s) at {opt.img} px, batch {opt.batch_size}, "
          f"{opt.repeat} repeat(s), {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
