"""A tiny dataset in Ultralytics' published layout (``coco8-seg``): ``datasets/coco8-seg/images/{train,val}``,
``labels/{train,val}`` with one normalized polygon a line, and a data yaml beside the ``datasets`` folder (as
Ultralytics' own ``coco8-seg.yaml``: ``path: ../datasets/coco8-seg``, ``names: {0: person, ...}``). Written by
the test, with known shapes: each object a filled polygon on a noise background."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml

NAMES = {0: "person", 1: "bicycle", 2: "car"}
FIRST_ID = 900001  # image file stems: ids apart from the synthetic COCO data's, so the two can be mixed


def _shape(rng: np.random.Generator, size: int) -> np.ndarray:
    """A convex polygon (pixels): a random 3-6-gon around a centre."""
    k = int(rng.integers(3, 7))
    centre = rng.uniform(0.3, 0.7, 2) * size
    radius = rng.uniform(0.12, 0.25) * size
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    return centre + radius * np.stack([np.cos(angles), np.sin(angles)], 1)


def write_coco8_seg(base: Path, n_train: int = 8, n_val: int = 4, size: tuple[int, int] = (96, 72),
                    seed: int = 0, polygons: bool = True) -> Path:
    """Writes ``base/datasets/coco8-seg`` and ``base/yolo/coco8-seg.yaml`` (returned). ``polygons`` False:
    box lines (``class cx cy w h``) instead, a detection dataset. Images are ``size`` (w, h) JPEGs."""
    rng = np.random.default_rng(seed)
    root = base / "datasets" / "coco8-seg"
    w, h = size
    iid = FIRST_ID
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                cls = int(rng.integers(0, len(NAMES)))
                poly = _shape(rng, min(w, h)).clip(0, [w - 1, h - 1])
                cv2.fillPoly(image, [poly.round().astype(np.int32)], (80 * (cls + 1), 255 - 60 * cls, 120))
                norm = poly / [w, h]
                if polygons:
                    lines.append(" ".join([str(cls)] + [f"{v:.6f}" for v in norm.reshape(-1)]))
                else:
                    (x1, y1), (x2, y2) = norm.min(0), norm.max(0)
                    lines.append(f"{cls} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}")
            stem = f"{iid:012d}"
            cv2.imwrite(str(root / "images" / split / f"{stem}.jpg"), image)
            (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
            iid += 1
    data = base / "yolo" / "coco8-seg.yaml"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(yaml.safe_dump({"path": "../datasets/coco8-seg", "train": "images/train", "val": "images/val",
                                    "test": None, "names": NAMES}, sort_keys=False))
    return data
