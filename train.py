"""Train a yolor-mt model.

    python train.py                                   # nano model on the embedded synthetic dataset
    python train.py --cfg cfg/yolor-mt.yaml --data data/coco.yaml --img 640 --batch-size 64 --epochs 300
    python train.py --resume                          # continue the newest run from its last.pt
    torchrun --nproc_per_node 4 train.py --batch-size 64 --sync-bn   # one node, 4 GPUs (total batch 64)
"""
from __future__ import annotations

import argparse
import sys

from utils.data.dataset import LoaderStalledError
from utils.engine.trainer import NonFiniteLossError, Trainer
from utils.loss.balance import BALANCERS, DEFAULT_BALANCE
from utils.runtime.cli import run_cli


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="cfg/yolor-mt-n.yaml", help="model cfg yaml (yolor-mt-n.yaml = scale n)")
    p.add_argument("--data", default="data/shapes.yaml", help="data yaml (default: the embedded synthetic set)")
    p.add_argument("--hyp", default="data/hyps/hyp.scratch.yaml", help="hyperparameters yaml")
    p.add_argument("--weights", default="", help="initial weights (.pt); tensors matching --cfg are loaded")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", "--batch", type=int, default=16, help="images per batch")
    p.add_argument("--img", "--img-size", type=int, default=320, help="train/val image size (pixels)")
    p.add_argument("--device", default="", help="cuda device (0, 0,1) or cpu; default: CUDA if available")
    p.add_argument("--workers", type=int, default=2, help="dataloader worker processes")
    p.add_argument("--project", default="runs/train")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="resume newest run, or the given last.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cos-lr", action="store_true", help="cosine LR schedule")
    p.add_argument("--optimizer", default="auto", choices=["SGD", "Adam", "AdamW", "auto"])
    p.add_argument("--save-period", type=int, default=-1,
                   help="every N training iterations (batches), refresh weights/last.pt with a mid-epoch checkpoint "
                        "that --resume continues exactly (<1: off). Not YOLOv5's epochN.pt every N epochs")
    p.add_argument("--noval", action="store_true", help="validate only after the final epoch")
    p.add_argument("--val-period", type=int, default=1,
                   help="validate after every N-th epoch and the final one (1: every epoch; --noval: the final only)")
    p.add_argument("--patience", type=int, default=100, help="stop after this many epochs without improvement")
    p.add_argument("--close-mosaic", type=int, default=0,
                   help="no mosaic in the last N epochs (Ultralytics' close_mosaic; its default is 10, ours 0: off, "
                        "mosaic every epoch as before)")
    p.add_argument("--cache", nargs="?", const="ram", default=None, choices=["ram", "disk"],
                   help="read each image once: --cache / --cache ram keeps them decoded in memory (if they fit in "
                        "half the available RAM), --cache disk writes .npy files beside the images folder")
    p.add_argument("--rect", action="store_true",
                   help="rectangular batches (YOLOv5's): images sorted by aspect ratio, each batch letterboxed to "
                        "its own shape (training: not shuffled, no mosaic; validation too)")
    p.add_argument("--multi-scale", action="store_true",
                   help="vary img-size +/- 50%%: each training batch resized to a random multiple of 32 in "
                        "[0.5, 1.5] x --img, labels with it")
    p.add_argument("--freeze", default="",
                   help="freeze cfg rows: N = the first N rows (10 = the nano backbone), or a comma list of row "
                        "indices (0,1,2); their parameters get no gradient (YOLOv5's --freeze) and their BatchNorm "
                        "statistics are held (detectron2's FrozenBatchNorm)")
    p.add_argument("--single-cls", action="store_true",
                   help="train every object class as one class 'item' (YOLOv5's --single-cls)")
    p.add_argument("--tasks", default="", help="comma list of det,inst,sem,cap; default: all the data provides")
    p.add_argument("--balance", default=DEFAULT_BALANCE, choices=list(BALANCERS),
                   help="task loss balancing: dwa (default, measured best; see utils/loss/balance.py), fixed "
                        "(gains from the hyp file only), uncertainty, mtcp")
    p.add_argument("--no-amp", action="store_true",
                   help="train in fp32; by default mixed precision: fp16 on CUDA, bf16 on CPUs with native bf16 "
                        "(AVX512-BF16 / AMX; others train in fp32)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (torchrun, CUDA)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    p.add_argument("--plots", dest="plots", action="store_true", default=True,
                   help="write pictures and report.html into the run folder (default)")
    p.add_argument("--noplots", "--no-plots", dest="plots", action="store_false",
                   help="no pictures and no report.html (results.csv, weights and TensorBoard scalars only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda opt: Trainer(opt).run(), parse_opt(argv), extra=(NonFiniteLossError, LoaderStalledError))


if __name__ == "__main__":
    sys.exit(main())
