"""Panoptic quality of the joint model as it trains: PQ / SQ / RQ (overall, things, stuff) of the untrained
network, then after every epoch (the training run's own validation), on the embedded dataset's val split.

The panoptic output is the merge of the instance masks and the semantic map (``utils/ops/panoptic.py``), so
the model trains det + inst + sem (captions add nothing to it and are left out to save time).

    python -m benchmarks.panoptic                                   # 8 epochs, 192 px, hyp.short, CPU
    python -m benchmarks.panoptic --epochs 20 --img 320 --device 0  # longer, on a GPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import add_training_args, run_training, train_args
from models.model import Model
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset, create_dataloader
from utils.eval.evaluate import EvalSettings, LabelSpace, evaluate
from utils.runtime.device import select_device, set_seed
from utils.viz.plots import read_results

TASKS = "det,inst,sem"
KEYS = ("pq", "pq_th", "pq_st", "sq", "rq")


def untrained(opt: argparse.Namespace) -> dict[str, float]:
    """The PQ figures of the network before its first step (same cfg, seed and validation as the run)."""
    set_seed(opt.seed)
    data = load_data_config(opt.data)
    device = select_device(str(opt.device))
    model = Model(opt.cfg, nc=data.nc, tasks=TASKS.split(","),
                  head_kwargs={"sem": {"num_classes": len(data.semantic_ids)}}).to(device)
    val = CocoDataset(data, data.val, opt.img, augment=False)
    labels = LabelSpace(data.category_ids, len(data.semantic_ids), data.semantic_ids)
    res = evaluate(model, create_dataloader(val, opt.batch_size, False, opt.workers), val, labels, device,
                   settings=EvalSettings(progress=False))
    return {k: res.metrics.get(k, float("nan")) for k in KEYS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, epochs=8, img=192, project="runs/bench/panoptic")
    p.set_defaults(hyp="data/hyps/hyp.short.yaml")
    opt = p.parse_args(argv)
    args = train_args(opt, TASKS)
    before = untrained(opt)
    run, minutes = run_training(args, Path(opt.project), "joint")
    rows = read_results(run / "results.csv")
    print(f"\nPQ on {opt.data} val, {opt.cfg} at {opt.img} px, {opt.epochs} epochs ({minutes:.1f} min), seed {opt.seed}")
    print("| epoch | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    print("| untrained | " + " | ".join(f"{before[k]:.4f}" for k in KEYS) + " |")
    for r in rows:
        if "pq" in r:
            print(f"| {int(r['epoch'])} | " + " | ".join(f"{r.get(k, float('nan')):.4f}" for k in KEYS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
