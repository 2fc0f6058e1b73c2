"""Real photographs: ours (the joint model and det + inst) beside Ultralytics YOLOv8n-seg on a COCO-layout data
yaml, at a named budget, every model scored by our evaluation.

    python -m benchmarks.real                                     # the CPU budget on ../shared/coco-val79
    python -m benchmarks.real --data path/to/data.yaml            # the same on other photographs
    python -m benchmarks.real --budget gpu --device 0             # the GPU budget (640 px, hundreds of epochs)

It is :mod:`benchmarks.peers` with other defaults: a budget fixes the image size, epochs, batch, nominal batch,
augmentation and the epochs reported, the same for every model (each is still a flag, so any can be changed).
On ``../shared/coco-val79`` (train = val) it is a memorisation check, as YOLOv5's coco128: from scratch, real
photographs take far more optimizer steps than the embedded shapes before a detector is above zero, so the CPU
budget trains small images without augmentation and takes an optimizer step every batch (nominal batch = batch).
The table gives box / mask mAP50-95 and mAP50, caption BLEU-4 and CIDEr-D at each reported epoch, params and
train img/s, and below it the constant-caption floor (the most frequent training caption given to every image).
"""
from __future__ import annotations

import argparse

from benchmarks import peers

# name -> the defaults it sets; the CPU one fits 30 minutes a model on 2 cores (measured in README's table)
BUDGETS = {
    "cpu": {"img": 128, "epochs": 100, "batch_size": 8, "nbs": 8, "aug": "off", "at": "25,50,100"},
    "gpu": {"img": 640, "epochs": 300, "batch_size": 16, "nbs": 16, "aug": "off", "at": "100,200,300",
            "device": "0", "workers": 8},
}
COMMON = {"data": "../shared/coco-val79/data.yaml", "peers": "yolov8n-seg", "ours": "joint,ours-det+inst",
          "latency": 0}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """:mod:`benchmarks.peers`' flags with the chosen ``--budget``'s defaults (runs in ``runs/bench/real-<budget>``)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--budget", choices=list(BUDGETS), default="cpu")
    budget = pre.parse_known_args(argv)[0].budget
    p = peers.parser(__doc__)
    p.add_argument("--budget", choices=list(BUDGETS), default="cpu", help="the named settings: " +
                   "; ".join(f"{k}: {v}" for k, v in BUDGETS.items()))
    p.set_defaults(**COMMON, **BUDGETS[budget], project=f"runs/bench/real-{budget}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    peers.run(parse(argv))


if __name__ == "__main__":
    main()
