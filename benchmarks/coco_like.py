"""A synthetic dataset with COCO's label counts and density, for the benchmarks that measure cost at COCO scale
(``benchmarks/gpu.py``, ``benchmarks/profile_step.py --memory``): what a step costs depends on the number of
classes, the vocabulary and the labels per image, not on what the pixels show.

    python -m benchmarks.coco_like --out runs/bench/coco-like --images 256   # writes <out>/data.yaml

- 80 thing classes with COCO's ids and ~7.3 instances per image (COCO train2017's mean), each a 24-point polygon
  (:func:`benchmarks.loader.write_synthetic_labels`);
- 171 semantic classes (80 things + COCO-Stuff's 91 stuff ids 92-182) in ``stuffthingmaps`` PNGs (value = id - 1,
  COCO-Stuff's convention): horizontal bands of stuff with every instance's polygon painted over them;
- 5 captions per image of 10 words from a ``--vocab``-word vocabulary (default 10,000, COCO's at min count 5),
  every word used, so the caption head's output is COCO's width;
- JPEG images of COCO's typical 640x480, textured like the bands and shapes (JPEG decoding is part of the
  loader's cost, and flat colour would decode faster than a photograph).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import yaml

from benchmarks.loader import write_synthetic_labels

STUFF_IDS = list(range(92, 183))  # COCO-Stuff's 91 stuff ids (183 'other' is never a class)
CAPTIONS_PER_IMAGE = 5
INSTANCES_PER_IMAGE = 7.3


def _paint(rng: np.random.Generator, w: int, h: int, polygons: list[tuple[int, np.ndarray]]
           ) -> tuple[np.ndarray, np.ndarray]:
    """One image (BGR, uint8) and its stuffthing map (category id - 1) from its instances' polygons."""
    bands = np.sort(rng.integers(1, h, rng.integers(2, 6)))
    sem = np.zeros((h, w), np.uint8)
    img = np.zeros((h, w, 3), np.uint8)
    for top, bottom in zip(np.r_[0, bands], np.r_[bands, h]):
        sem[top:bottom] = rng.choice(STUFF_IDS) - 1
        img[top:bottom] = rng.integers(0, 256, 3)
    for category, poly in polygons:
        pts = [poly.round().astype(np.int32)]
        cv2.fillPoly(sem, pts, int(category) - 1)
        cv2.fillPoly(img, pts, rng.integers(0, 256, 3).tolist())
    noise = cv2.GaussianBlur(rng.normal(0, 24, (h, w, 3)).astype(np.float32), (0, 0), 1.5)  # texture
    return np.clip(img + noise, 0, 255).astype(np.uint8), sem


def write_coco_like(root: Path, n_images: int, size: tuple[int, int] = (640, 480), vocab: int = 10_000,
                    seed: int = 0) -> Path:
    """Writes the dataset (one split, used as train and val) under ``root``; returns its data yaml.

    Rewritten only when the yaml is missing or was written for other arguments (``root/args.json``)."""
    root = Path(root)
    data_yaml, stamp = root / "data.yaml", root / "args.json"
    args = {"images": n_images, "size": list(size), "vocab": vocab, "seed": seed}
    if data_yaml.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == args:
        return data_yaml
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "stuffthingmaps").mkdir(parents=True, exist_ok=True)
    split = write_synthetic_labels(root, n_images, INSTANCES_PER_IMAGE, 24, CAPTIONS_PER_IMAGE, seed, size, vocab)
    inst = json.loads(split.instances.read_text())
    by_image: dict[int, list[tuple[int, np.ndarray]]] = {im["id"]: [] for im in inst["images"]}
    for a in inst["annotations"]:
        by_image[a["image_id"]].append((a["category_id"], np.asarray(a["segmentation"][0]).reshape(-1, 2)))
    rng = np.random.default_rng([seed, 0xC0C0])
    for im in inst["images"]:
        img, sem = _paint(rng, im["width"], im["height"], by_image[im["id"]])
        cv2.imwrite(str(root / "images" / im["file_name"]), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(str(root / "stuffthingmaps" / im["file_name"].replace(".jpg", ".png")), sem)
    stuff = {"images": inst["images"], "annotations": [],
             "categories": [{"id": i, "name": f"stuff{i}", "supercategory": "stuff"} for i in STUFF_IDS]}
    (root / "stuff.json").write_text(json.dumps(stuff))
    split_yaml = {"images": "images", "instances": split.instances.name, "semantic": "stuffthingmaps",
                  "captions": split.captions.name}
    data_yaml.write_text(yaml.safe_dump({"path": str(root.resolve()), "train": split_yaml, "val": split_yaml,
                                         "semantic_categories": "stuff.json"}, sort_keys=False))
    stamp.write_text(json.dumps(args))
    return data_yaml


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/coco-like")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    p.add_argument("--vocab", type=int, default=10_000, help="caption vocabulary (COCO at min count 5: ~10k)")
    p.add_argument("--seed", type=int, default=0)
    opt = p.parse_args(argv)
    print(write_coco_like(Path(opt.out), opt.images, tuple(opt.size), opt.vocab, opt.seed))


if __name__ == "__main__":
    main()
