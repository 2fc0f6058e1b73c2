"""Square against rectangular (``--rect``) validation: the same checkpoint scored by test.py both ways.

    python -m benchmarks.rect --weights runs/bench/real-cpu/joint/weights/best.pt \
        --data ../shared/coco-val79/data.yaml --img 128 --rounds 3

Prints, per mode, the metrics (which should agree within noise: only the padding differs), the network input
pixels per image and test.py's wall time (the median of ``--rounds`` runs, the modes alternating so that a busy
machine slows both alike). Real photographs have real aspect ratios; on square synthetic images the two modes are
the same.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import test as test_script
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset
from utils.runtime.checkpoint import load_checkpoint

METRICS = ("box_map", "box_map50", "mask_map", "mask_map50", "cap_bleu4", "cap_cider")


def input_pixels(data_file: str, img: int, batch_size: int, stride: int, rect: bool) -> float:
    """Mean network input pixels per validation image: ``img``² square, or the ``--rect`` batch shapes'."""
    data = load_data_config(data_file)
    dataset = CocoDataset(data, data.val, img, augment=False)
    if not rect:
        return float(img * img)
    dataset.rect(batch_size, stride, 0.5)
    return float(np.mean([np.prod(dataset.input_shape(i)) for i in range(len(dataset))]))


def run(opt: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Scores ``--weights`` square and rectangular, alternating, and prints the table; returns it per mode."""
    ckpt = load_checkpoint(opt.weights)
    data_file = opt.data or ckpt["opt"]["data"]
    img = opt.img or int(ckpt["meta"].get("img_size", 640))
    stride = max(int(ckpt["meta"].get("stride", 32)), 32)
    rows: dict[str, dict[str, float]] = {}
    times: dict[str, list[float]] = {"square": [], "rect": []}
    for _ in range(opt.rounds):
        for mode in times:
            argv = ["--weights", opt.weights, "--data", data_file, "--img", str(img), "--batch-size",
                    str(opt.batch_size), "--workers", str(opt.workers), "--device", opt.device,
                    "--conf-thres", str(opt.conf_thres), "--max-det", str(opt.max_det),
                    "--project", opt.project, "--name", mode, "--exist-ok"] + (["--rect"] if mode == "rect" else [])
            t0 = time.perf_counter()
            metrics = test_script.run(test_script.parse_opt(argv))
            times[mode].append(time.perf_counter() - t0)
            rows[mode] = {k: metrics[k] for k in METRICS if k in metrics}
    for mode in times:
        rows[mode]["pixels"] = input_pixels(data_file, img, opt.batch_size, stride, mode == "rect")
        rows[mode]["seconds"] = statistics.median(times[mode])
    keys = [k for k in METRICS if k in rows["square"]]
    print(f"\n{opt.weights} on {data_file}, {img} px, batch {opt.batch_size}, median of {opt.rounds} rounds")
    print(f"{'mode':>8} " + " ".join(f"{k:>10}" for k in keys) + f" {'px/image':>10} {'val s':>7}")
    for mode, row in rows.items():
        print(f"{mode:>8} " + " ".join(f"{row[k]:10.4f}" for k in keys) + f" {row['pixels']:10.0f} {row['seconds']:7.2f}")
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--data", default="", help="data yaml (default: the checkpoint's)")
    p.add_argument("--img", type=int, default=0, help="image size (default: the training size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--conf-thres", type=float, default=0.001, help="as test.py's")
    p.add_argument("--max-det", type=int, default=300, help="as test.py's")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--project", default="runs/bench/rect")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse())
