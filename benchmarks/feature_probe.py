"""What a cfg row's features say about each object: a linear probe of its colour and kind at its centre.

    python -m benchmarks.feature_probe --weights runs/train/exp/weights/last.pt --rows 4,19,22,25 --img 192

For every instance of a shapes dataset (train and val, unaugmented), each row's feature vector at the centre of its
box (``torchvision.ops.roi_align``, one bilinear sample) is taken; a linear classifier is fitted on the train
instances and scored on the val ones, once for the instance's colour (the palette colour nearest the median of its
pixels, :func:`~utils.data.synthetic.nearest_colour`) and once for its category. It is how the caption memory's
levels were chosen (``cfg/yolor-mt.yaml``'s note): a level whose cells cannot tell a red shape from a blue one
cannot give a caption its colours.
"""
from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset, create_dataloader
from utils.data.synthetic import PALETTE, inner_median, nearest_colour
from utils.ops.letterbox import to_float
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint


def instance_colour(image: np.ndarray, polygons: list[np.ndarray]) -> int:
    """Index in PALETTE of the colour nearest the median of an instance's pixels (one pixel in from its edge), -1
    when it has none. ``image`` is ``H x W x 3`` RGB."""
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [p.astype(np.int32) for p in polygons], 1)
    median = inner_median(image, mask)
    return list(PALETTE).index(nearest_colour(median[::-1], PALETTE)) if median is not None else -1


@torch.no_grad()
def centre_features(model, data: str, split: str, img: int, rows: list[int]):
    """``({row: (N, C) features at each instance's box centre}, colours (N,), classes (N,))`` over ``split``."""
    cache: dict[int, torch.Tensor] = {}
    hooks = [model.layers[r].register_forward_hook(lambda m, i, o, r=r: cache.__setitem__(r, o)) for r in rows]
    cfg = load_data_config(data)
    feats: dict[int, list[torch.Tensor]] = {r: [] for r in rows}
    colours, classes = [], []
    for batch in create_dataloader(CocoDataset(cfg, getattr(cfg, split), img, augment=False), 32, False, 0):
        model(to_float(batch.images, torch.device("cpu"), False))
        rois = torch.cat((batch.targets[:, :1], batch.targets[:, 2:6]), 1).float()
        for r in rows:
            f = cache[r].float()
            feats[r].append(roi_align(f, rois, 1, f.shape[-1] / img, sampling_ratio=1, aligned=True).flatten(1))
        images = batch.images.permute(0, 2, 3, 1).numpy()
        colours += [instance_colour(images[int(t[0])], seg) for t, seg in zip(batch.targets, batch.segments)]
        classes += batch.targets[:, 1].long().tolist()
    for h in hooks:
        h.remove()
    return {r: torch.cat(v) for r, v in feats.items()}, torch.tensor(colours), torch.tensor(classes)


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                   steps: int = 300, seed: int = 0) -> float:
    """Val accuracy of a linear softmax classifier (Adam, standardized inputs) fitted on the train pairs; labels
    of -1 are left out."""
    torch.manual_seed(seed)
    keep_t, keep_v = train_y >= 0, val_y >= 0
    mu, sd = train_x[keep_t].mean(0), train_x[keep_t].std(0) + 1e-6
    a, b = (train_x[keep_t] - mu) / sd, (val_x[keep_v] - mu) / sd
    linear = torch.nn.Linear(a.shape[1], int(train_y.max()) + 1)
    opt = torch.optim.Adam(linear.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(linear(a), train_y[keep_t]).backward()
        opt.step()
    with torch.no_grad():
        return (linear(b).argmax(1) == val_y[keep_v]).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--rows", default="4,19,22,25", help="comma list of cfg rows to probe")
    p.add_argument("--img", type=int, default=192)
    opt = p.parse_args(argv)
    rows = [int(r) for r in opt.rows.split(",")]
    model = build_from_checkpoint(load_checkpoint(opt.weights)).eval()
    (fa, ca, ka), (fb, cb, kb) = (centre_features(model, opt.data, s, opt.img, rows) for s in ("train", "val"))
    print(f"{len(ca)} / {len(cb)} train / val instances; linear probe at each box centre, val accuracy")
    print(f"{'row':>4} {'module':<12} {'channels':>8} {'colour':>7} {'kind':>7}")
    for r in rows:
        print(f"{r:>4} {model.rows_meta[r][0]:<12} {fa[r].shape[1]:>8} {probe_accuracy(fa[r], ca, fb[r], cb):7.3f} "
              f"{probe_accuracy(fa[r], ka, fb[r], kb):7.3f}")


if __name__ == "__main__":
    main()
