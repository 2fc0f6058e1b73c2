"""Converts a dataset between this repository's COCO layout and Ultralytics' YOLO format, either way.

    python -m utils.data.convert --to yolo --data data/shapes.yaml --out ../datasets/shapes-yolo
    python -m utils.data.convert --to coco --data ../datasets/coco8-seg.yaml --out ../datasets/coco8-seg-coco

COCO -> YOLO writes ``out/{images,labels,masks}/{train,val}`` (images linked, not copied; one polygon line per
instance, several polygons of one instance joined into one outline; semantic maps as PNGs of semantic indices,
255 ignored) and ``seg.yaml`` (+ ``sem.yaml`` with ``masks_dir`` when there are maps). The labels are the ones
our loader reads (same crowd handling and checks). YOLO -> COCO writes ``out/annotations/instances_<split>.json``
for each split of the data yaml (category ids ``i + 1``, ``file_name`` relative to the split's image folder)
and ``out/data.yaml`` in this repository's convention, pointing at the original images.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import yaml

from utils.data.config import DataConfig, DataError, load_data_config
from utils.data.dataset import CocoDataset
from utils.data.yolo import coco_dict

Merge = Callable[[list[np.ndarray]], np.ndarray]


def merge_polygons(polys: list[np.ndarray]) -> np.ndarray:
    """One outline through an instance's ``(K, 2)`` polygons (YOLO lines hold one each): every next polygon
    is joined at the pair of nearest vertices by a zero-width cut, there and back, so a filled outline covers
    the same pixels (plus the cut's line)."""
    outline = polys[0]
    for poly in polys[1:]:
        d = ((outline[:, None, :] - poly[None, :, :]) ** 2).sum(-1)
        a, b = np.unravel_index(int(d.argmin()), d.shape)
        loop = np.roll(poly, -b, 0)
        outline = np.concatenate([outline[:a + 1], loop, loop[:1], outline[a:]])
    return outline


def yolo_lines(classes: list[int], boxes: np.ndarray, segments: list[list[np.ndarray]], size: tuple[int, int],
               merge: Merge = merge_polygons) -> list[str]:
    """One ``class x1 y1 x2 y2 ...`` line per instance, normalized by ``size`` (h, w): its polygons merged into
    one, or its box as a 4-point polygon when it has none (a crowd region, a degenerate polygon)."""
    h, w = size
    lines = []
    for c, box, polys in zip(classes, boxes, segments):
        polys = [p for p in polys if len(p) >= 3]
        if not polys:
            x1, y1, x2, y2 = box.tolist()
            poly = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)
        else:
            poly = merge(polys) if len(polys) > 1 else polys[0]
        poly = np.clip(poly / np.array([w, h], np.float32), 0, 1)
        lines.append(" ".join([str(c)] + [f"{v:.6f}" for v in poly.reshape(-1)]))
    return lines


def coco_to_yolo(data: str | Path, out: Path, merge: Merge = merge_polygons) -> dict[str, Path]:
    """Writes ``data``'s train and val splits in YOLO format under ``out``; returns the yamls written
    (``seg``, and ``sem`` when the data has semantic maps)."""
    cfg = load_data_config(data)
    has_sem = False
    for split, specs in (("train", cfg.train), ("val", cfg.val)):
        ds = CocoDataset(cfg, specs, augment=False, use_cache=True)
        for d in ("images", "labels", "masks"):
            (out / d / split).mkdir(parents=True, exist_ok=True)
        for i in range(len(ds)):
            s = ds.load(i)
            if s is None:
                continue
            src = Path(s.path).resolve()
            stem = f"{s.image_id:012d}"
            link = out / "images" / split / f"{stem}{src.suffix}"
            if not link.exists():
                link.symlink_to(src)
            lines = yolo_lines(s.classes.tolist(), s.boxes, s.segments, s.orig_shape, merge)
            (out / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
            if s.semantic is not None:
                has_sem = True
                cv2.imwrite(str(out / "masks" / split / f"{stem}.png"), s.semantic)
    yamls = {"seg": out / "seg.yaml"}
    common = {"path": str(out.resolve()), "train": "images/train", "val": "images/val"}
    yamls["seg"].write_text(yaml.safe_dump(common | {"names": dict(enumerate(cfg.names))}))
    if has_sem:
        yamls["sem"] = out / "sem.yaml"
        yamls["sem"].write_text(yaml.safe_dump(common | {"masks_dir": "masks",
                                                         "names": dict(enumerate(cfg.semantic_names))}))
    return yamls


def _coco_split(cfg: DataConfig, name: str, out: Path) -> list[dict]:
    """Each of a data yaml's ``name`` splits as an instances JSON under ``out/annotations``; their split entries."""
    entries = []
    for k, spec in enumerate(getattr(cfg, name)):
        ds = CocoDataset(cfg, [spec], augment=False)
        records = [rec for _, rec in ds.items]
        images = spec.images
        if not images.is_dir():  # a list's records hold absolute paths: relative to the folder above them all
            images = Path(os.path.commonpath([Path(r.file).parent for r in records]))
            records = [dataclasses.replace(r, file=str(Path(r.file).relative_to(images))) for r in records]
        json_file = out / "annotations" / f"instances_{name}{k or ''}.json"
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(coco_dict(records, cfg.category_ids, cfg.names)))
        print(f"{name}: {len(ds)} images -> {json_file} ({ds.labels_summary()})")
        entries.append({"images": str(images.resolve()), "instances": str(json_file.resolve())})
    return entries


def yolo_to_coco(data: str | Path, out: Path) -> Path:
    """Writes the instances JSONs of a YOLO-format data yaml's splits and ``out/data.yaml`` over them."""
    cfg = load_data_config(data)
    if not any(s.yolo for s in cfg.train + cfg.val):
        raise ValueError(f"{cfg.file}: not a YOLO-format data yaml (no 'names' with image folders or lists)")
    d = {name: _coco_split(cfg, name, out) for name in ("train", "val", "test") if getattr(cfg, name)}
    yaml_file = out / "data.yaml"
    yaml_file.write_text(yaml.safe_dump({"path": str(out.resolve())} | {k: v[0] if len(v) == 1 else v
                                                                         for k, v in d.items()}, sort_keys=False))
    return yaml_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, choices=["yolo", "coco"], help="the format to write")
    p.add_argument("--data", required=True, help="data yaml of the dataset to convert")
    p.add_argument("--out", required=True, help="folder to write into")
    opt = p.parse_args(argv)
    out = Path(opt.out)
    try:
        written = coco_to_yolo(opt.data, out) if opt.to == "yolo" else {"coco": yolo_to_coco(opt.data, out)}
    except (DataError, ValueError, FileNotFoundError) as e:  # bad input: one line, as the entry scripts
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(v) for v in written.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
