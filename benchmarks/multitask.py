"""Joint multi-task nano model vs the four single-task nano models at the same budget.

    python -m benchmarks.multitask --epochs 10 --img 224
    python -m benchmarks.multitask --balance fixed,uncertainty,dwa,mtcp --jobs 8 --device 0   # on a GPU

Every model trains with the same data, epochs, image size, batch and seed. Single-task baselines come from
the same cfg with ``--tasks`` (the instance baseline keeps the detection head: masks are predicted for
detected boxes) and use fixed gains (balancing needs two tasks). With several ``--balance`` rules, one
joint model trains per rule. Prints each task's metric at the last epoch, params, GFLOPs, train img/s,
and for each joint model Δm = mean over tasks of (joint - single) / single, in percent (all metrics are
higher-is-better).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from benchmarks.common import (
    add_training_args,
    params_and_gflops,
    run_trainings,
    train_args,
)
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint
from utils.viz.plots import read_results

SINGLE = {"det": "det", "inst": "det,inst", "sem": "sem", "cap": "cap"}
METRIC = {"det": "box_map", "inst": "mask_map", "sem": "sem_miou", "cap": "cap_cider"}


def delta_m(joint: dict[str, float], singles: dict[str, dict[str, float]]) -> tuple[float, dict[str, float]]:
    """Δm in percent and each task's relative change (percent) of a joint model's metrics vs the singles'."""
    changes = {}
    for task, metric in METRIC.items():
        single, value = singles.get(task, {}).get(metric), joint.get(metric)
        if single and value is not None and math.isfinite(single) and math.isfinite(value):  # nan: not scored
            changes[task] = 100 * (value - single) / single
    return sum(changes.values()) / max(len(changes), 1), changes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, epochs=10, img=224, project="runs/bench/multitask")
    p.add_argument("--only", default="", help="comma list of runs to (re)train; others are read from --project")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once, each in its own process")
    opt = p.parse_args()
    rules = [r.strip() for r in opt.balance.split(",") if r.strip()]
    runs = {("joint" if len(rules) == 1 else f"joint-{r}"): ("det,inst,sem,cap", r) for r in rules}
    runs |= {name: (tasks, "fixed") for name, tasks in SINGLE.items()}
    only = set(opt.only.split(",")) if opt.only else set(runs)
    todo = {}
    for name, (tasks, rule) in runs.items():
        if name in only or not (Path(opt.project) / name / "results.csv").is_file():
            todo[name] = train_args(argparse.Namespace(**(vars(opt) | {"balance": rule})), tasks)
    minutes = run_trainings(todo, Path(opt.project), opt.jobs, opt.threads)

    rows = {}
    for name in runs:
        run = Path(opt.project) / name
        results = read_results(run / "results.csv")
        model = build_from_checkpoint(load_checkpoint(run / "weights/last.pt"))
        n_params, gflops = params_and_gflops(model, opt.img)
        img_s = sum(r["time/img_per_s"] for r in results) / len(results)
        rows[name] = {"metrics": results[-1], "params": n_params, "gflops": gflops, "img_s": img_s,
                      "min": minutes.get(name, float("nan"))}

    print(f"\nbudget: {opt.epochs} epochs, {opt.img} px, batch {opt.batch_size}, seed {opt.seed}, device {opt.device}, "
          f"{opt.jobs} job(s) at once, {os.cpu_count()} CPU cores ({opt.threads or torch.get_num_threads()} torch threads)")
    header = ["model", *METRIC.values(), "params(M)", "GFLOPs", "img/s", "minutes", "Δm(%)"]
    print(" ".join(f"{h:>16}" if i == 0 else f"{h:>10}" for i, h in enumerate(header)))
    singles = {task: rows[task]["metrics"] for task in SINGLE}
    for name, r in rows.items():
        joint = name.startswith("joint")
        vals = [r["metrics"].get(m) if (joint or METRIC.get(name) == m) else None for m in METRIC.values()]
        cells = [f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in vals]
        dm = f"{delta_m(r['metrics'], singles)[0]:>+10.1f}" if joint else f"{'-':>10}"
        print(f"{name:>16} " + " ".join(cells) + f" {r['params'] / 1e6:>10.3f} {r['gflops']:>10.3f} "
              f"{r['img_s']:>10.1f} {r['min']:>10.1f} {dm}")
    sum_single = sum(rows[t]["params"] for t in SINGLE)
    for name, r in rows.items():
        if name.startswith("joint"):
            dm, changes = delta_m(r["metrics"], singles)
            print(f"{name}: Δm = {dm:+.1f}% (" + ", ".join(f"{t} {c:+.1f}%" for t, c in changes.items())
                  + f"); params {r['params'] / 1e6:.3f}M = {r['params'] / sum_single:.2f} of the single-task sum "
                  f"{sum_single / 1e6:.3f}M")


if __name__ == "__main__":
    main()
