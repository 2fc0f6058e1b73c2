"""Anchor-free ``Detect`` vs anchor-based ``DetectAnchor`` on the det-only model at the same budget.

    python -m benchmarks.det_head --epochs 8 --img 192 --hyp data/hyps/hyp.short.yaml --threads 1

Both runs train ``--cfg`` with ``--tasks det`` on the same data, epochs, image size, batch and seed. The
anchor-based run's cfg is ``--cfg`` with its ``Detect`` row swapped for ``DetectAnchor`` and anchors
k-means-fitted to the training boxes at ``--img`` (:mod:`utils.ops.anchors`), so neither head starts from
another dataset's statistics; it is written into its run folder as ``cfg.yaml``. Prints box mAP50-95 and
mAP50 after the last epoch, params, GFLOPs, train img/s, minutes and the anchors' best possible recall.

The figures quoted in ``models/heads/detect.py`` were run with ``--workers 0``: with a worker process, the
DataLoader forks while the run's background plot threads read images, and the child can hang in
``cv2.imread`` (seen twice here). Augmentation is seeded per image, so the metrics do not depend on it.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.common import (
    add_training_args,
    params_and_gflops,
    run_training,
    train_args,
)
from models.heads.detect_anchor import COCO_ANCHORS
from models.parser import load_cfg
from utils.data.config import load_data_config
from utils.data.dataset import dataset_wh
from utils.ops.anchors import anchors_per_level, best_possible_recall, kmeans_anchors
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint
from utils.viz.plots import read_results


def anchor_cfg(cfg: str | Path, anchors: list[list[float]]) -> dict:
    """``cfg`` (at its scale) with every ``Detect`` row replaced by a ``DetectAnchor`` row with ``anchors``."""
    d = {k: v for k, v in load_cfg(cfg).items() if k != "_file"}
    rows = [r for r in d["heads"] if r[2] == "Detect"]
    if not rows:
        raise SystemExit(f"{cfg}: no Detect row to swap")
    for r in rows:
        r[2], r[3] = "DetectAnchor", [anchors]
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, epochs=8, img=192, project="runs/bench/det_head")
    p.add_argument("--na", type=int, default=3, help="anchors per level of the anchor-based head")
    p.add_argument("--only", default="", help="comma list of runs to (re)train (free, anchor); others are read "
                   "from --project")
    opt = p.parse_args()
    only = set(opt.only.split(",")) if opt.only else {"free", "anchor"}
    project = Path(opt.project)

    wh = dataset_wh(load_data_config(opt.data))
    nl = len(next(r for r in load_cfg(opt.cfg)["heads"] if r[2] == "Detect")[0])
    fitted = kmeans_anchors(wh, opt.na * nl, opt.img, seed=opt.seed)
    anchors = anchors_per_level(fitted, nl)
    bpr = {"free": None, "anchor": best_possible_recall(wh * opt.img, fitted)}
    coco_bpr = best_possible_recall(wh * opt.img, np.array(COCO_ANCHORS, np.float64).reshape(-1, 2))

    rows = {}
    for name in ("free", "anchor"):
        run = project / name
        minutes = float("nan")
        if name in only or not (run / "results.csv").is_file():
            args = train_args(opt, "det")
            if name == "anchor":
                run.mkdir(parents=True, exist_ok=True)
                cfg = yaml.safe_dump(anchor_cfg(opt.cfg, anchors), sort_keys=False, default_flow_style=None)
                (run / "cfg.yaml").write_text(cfg)
                args[args.index("--cfg") + 1] = str(run / "cfg.yaml")
            run, minutes = run_training(args, project, name)
        results = read_results(run / "results.csv")
        model = build_from_checkpoint(load_checkpoint(run / "weights/last.pt"))
        n_params, gflops = params_and_gflops(model, opt.img)
        img_s = sum(r["time/img_per_s"] for r in results) / len(results)
        rows[name] = {"metrics": results[-1], "params": n_params, "gflops": gflops, "img_s": img_s, "min": minutes}

    print(f"\nbudget: {opt.epochs} epochs, {opt.img} px, batch {opt.batch_size}, seed {opt.seed}, hyp {opt.hyp}, "
          f"{os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads); {len(wh)} training boxes")
    print(f"k-means anchors (px at {opt.img}): {anchors}; BPR {bpr['anchor']:.4f} "
          f"(YOLOv5 COCO anchors: {coco_bpr:.4f})")
    header = ["head", "mAP50-95", "mAP50", "params(M)", "GFLOPs", "img/s", "minutes", "BPR"]
    print(" ".join(f"{h:>12}" for h in header))
    for name, r in rows.items():
        label = {"free": "Detect", "anchor": "DetectAnchor"}[name]
        m = r["metrics"]
        cells = [m.get("box_map", float("nan")), m.get("box_map50", float("nan")), r["params"] / 1e6, r["gflops"]]
        bpr_cell = f"{bpr[name]:>12.4f}" if bpr[name] is not None else f"{'-':>12}"
        print(f"{label:>12} " + " ".join(f"{v:>12.4f}" if i < 2 else f"{v:>12.3f}" for i, v in enumerate(cells))
              + f" {r['img_s']:>12.1f} {r['min']:>12.1f} {bpr_cell}")


if __name__ == "__main__":
    main()
