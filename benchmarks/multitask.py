"""Joint multi-task nano model vs the four single-task nano models at the same budget.

    python -m benchmarks.multitask --epochs 10 --img 224

Every model trains with the same data, epochs, image size, batch and seed. Single-task baselines come from
the same cfg with ``--tasks`` (the instance baseline keeps the detection head: masks are predicted for
detected boxes). Prints each task's metric, params, GFLOPs, train img/s, and
Δm = mean over tasks of (joint - single) / single, in percent (all metrics are higher-is-better).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from benchmarks.common import add_training_args, params_and_gflops, read_results, run_training, train_args
from utils.checkpoint import build_from_checkpoint, load_checkpoint

RUNS = {"joint": "det,inst,sem,cap", "det": "det", "inst": "det,inst", "sem": "sem", "cap": "cap"}
METRIC = {"det": "box_map", "inst": "mask_map", "sem": "sem_miou", "cap": "cap_cider"}


def best_metrics(run: Path) -> dict[str, float]:
    """Each metric's value at the last epoch (what a fixed budget buys)."""
    return read_results(run)[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, epochs=10, img=224, project="runs/bench/multitask")
    p.add_argument("--only", default="", help="comma list of runs to (re)train; others are read from --project")
    opt = p.parse_args()
    only = set(opt.only.split(",")) if opt.only else set(RUNS)
    rows = {}
    for name, tasks in RUNS.items():
        run = Path(opt.project) / name
        minutes = float("nan")
        if name in only or not (run / "results.csv").is_file():
            args = train_args(opt, tasks)
            run, minutes = run_training(args, Path(opt.project), name)
        results = read_results(run)
        model = build_from_checkpoint(load_checkpoint(run / "weights/last.pt"))
        n_params, gflops = params_and_gflops(model, opt.img)
        img_s = sum(r["time/img_per_s"] for r in results) / len(results)
        rows[name] = {"metrics": results[-1], "params": n_params, "gflops": gflops, "img_s": img_s, "min": minutes}

    print(f"\nbudget: {opt.epochs} epochs, {opt.img} px, batch {opt.batch_size}, seed {opt.seed}, "
          f"balance {opt.balance}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads)")
    header = ["model", *METRIC.values(), "params(M)", "GFLOPs", "img/s", "minutes"]
    print(" ".join(f"{h:>10}" for h in header))
    for name, r in rows.items():
        vals = [r["metrics"].get(m) if (name == "joint" or METRIC.get(name) == m) else None for m in METRIC.values()]
        cells = [f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in vals]
        print(f"{name:>10} " + " ".join(cells) + f" {r['params'] / 1e6:>10.3f} {r['gflops']:>10.3f} "
              f"{r['img_s']:>10.1f} {r['min']:>10.1f}")
    deltas = []
    for task, metric in METRIC.items():
        single, joint = rows[task]["metrics"].get(metric), rows["joint"]["metrics"].get(metric)
        if single and joint is not None:
            deltas.append((joint - single) / single)
            print(f"  {task}: joint {joint:.4f} vs single {single:.4f} ({100 * deltas[-1]:+.1f}%)")
    sum_single = sum(rows[t]["params"] for t in METRIC)
    print(f"Δm = {100 * sum(deltas) / max(len(deltas), 1):+.1f}%  (mean relative change, {len(deltas)} tasks); "
          f"joint params {rows['joint']['params'] / 1e6:.3f}M = {rows['joint']['params'] / sum_single:.2f} of the "
          f"single-task sum {sum_single / 1e6:.3f}M")


if __name__ == "__main__":
    main()
