"""Box and mask mAP through pycocotools' COCOeval, on original image coordinates and category ids."""
from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def load_ground_truth(json_files: list[Path], single_class_id: int | None = None, extra: dict | None = None) -> COCO:
    """One COCO object over one or more instances JSON files (image ids are unique across COCO splits).

    ``single_class_id`` (train.py's ``--single-cls``): every annotation of the files becomes that one category.
    ``extra``: a COCO dict added to the files' (the ground truth of YOLO-format splits), not cached.

    Read once per process while the files are unchanged (keyed by path, size and mtime): training validates
    every epoch, and parsing COCO's val JSON again each time costs about a second. COCOeval only adds
    idempotent fields to the ground truth (RLE of polygons, ignore flags), so sharing it is safe.
    """
    key = tuple((str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in json_files)
    if extra is None:
        return _load_ground_truth(key, single_class_id)
    base = _load_ground_truth(key, single_class_id).dataset if key else {"images": [], "annotations": []}
    first = max((a["id"] for a in base["annotations"]), default=0)  # annotation ids stay unique
    merged = {"images": base["images"] + extra["images"],
              "annotations": base["annotations"] + [a | {"id": first + k + 1} for k, a in enumerate(extra["annotations"])],
              "categories": base.get("categories") or extra["categories"]}
    return _index(merged)


def _index(dataset: dict) -> COCO:
    """A pycocotools COCO over an in-memory dataset dict, quietly."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@functools.lru_cache(maxsize=4)
def _load_ground_truth(key: tuple[tuple[str, int, int], ...], single_class_id: int | None) -> COCO:
    import json

    json_files = [Path(k[0]) for k in key]
    merged: dict = {"images": [], "annotations": [], "categories": []}
    for f in json_files:
        with open(f, "rb") as fh:
            d = json.load(fh)
        merged["images"] += d.get("images", [])
        merged["annotations"] += [a for a in d.get("annotations", []) if "bbox" in a]
        merged["categories"] = merged["categories"] or d.get("categories", [])
    for k, a in enumerate(merged["annotations"]):
        a.setdefault("id", k + 1)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
        if single_class_id is not None:
            a["category_id"] = single_class_id
    if single_class_id is not None:
        merged["categories"] = [{"id": single_class_id, "name": "item"}]
    return _index(merged)


def coco_map(gt: COCO, results: list[dict], image_ids: list[int], category_ids: list[int],
             iou_type: str = "bbox") -> dict:
    """COCOeval over ``image_ids``. Returns ``map`` (0.5:0.95), ``map50``, ``map75`` and per-class AP.

    ``results`` are COCO result dicts (``image_id, category_id, bbox`` xywh or ``segmentation`` RLE, ``score``).
    No results at all is a score of 0, not an error.
    """
    empty = {"map": 0.0, "map50": 0.0, "map75": 0.0, "per_class": {c: 0.0 for c in category_ids}, "stats": [0.0] * 12}
    if not results or not image_ids:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results])  # loadRes adds keys (area, numpy ids) in place
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = sorted(set(image_ids))
        ev.params.catIds = list(category_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # (T iou, R recall, K class, A area, M maxdets)
    per_class = {}
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_class[cid] = float(np.mean(p[p > -1])) if (p > -1).any() else 0.0
    stats = [max(float(s), 0.0) for s in ev.stats]
    return {"map": stats[0], "map50": stats[1], "map75": stats[2], "per_class": per_class, "stats": stats}
