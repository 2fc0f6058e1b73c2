"""Panoptic ground truth: COCO's panoptic files, or derived from a split's instances + stuffthingmaps.

A split with ``panoptic: annotations/panoptic_val2017.json`` is read as COCO ships it: the JSON's
``annotations[]`` give each image's PNG ``file_name`` (in ``annotations/panoptic_val2017/``) and its
``segments_info`` (``id``, ``category_id``, ``iscrowd``); the PNG holds ``id = R + 256 G + 256^2 B``.

A split with ``instances`` and ``semantic`` but no panoptic files gets its ground truth derived
(:func:`derive_panoptic`), the way COCO's panoptic annotations were built from the same sources:

* things: every instance mask, non-crowd ones first in annotation order, then crowd ones (``iscrowd``
  kept); a pixel already taken keeps its owner, so overlapping masks never share a pixel;
* stuff: each stuff class of the stuffthingmap (PNG value ``category_id - 1``, the id not a thing id) on the
  pixels no instance took becomes one segment;
* void: unlabeled pixels (255) and thing pixels of the map that no instance covers (no identity to give).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from utils.data.config import read_json
from utils.ops.panoptic import rgb2id
from utils.tasks import IGNORE_INDEX

__all__ = ["PanopticTarget", "load_panoptic_json", "read_panoptic_png", "annotation_mask", "derive_panoptic"]

PanopticTarget = tuple[np.ndarray, dict[int, dict]]  # (int32 ids (h, w), id -> {category_id, iscrowd, ...})


def load_panoptic_json(json_file: Path) -> dict[int, dict]:
    """image id -> its ``annotations[]`` entry (``file_name``, ``segments_info``) of a COCO panoptic JSON."""
    d, _ = read_json(json_file)
    return {int(a["image_id"]): a for a in d.get("annotations", [])}


def read_panoptic_png(png: Path) -> np.ndarray | None:
    """A COCO panoptic PNG as int32 segment ids; ``None`` if it cannot be read."""
    bgr = cv2.imread(str(png), cv2.IMREAD_COLOR)
    return None if bgr is None else rgb2id(bgr[..., ::-1])


def annotation_mask(segmentation, h: int, w: int) -> np.ndarray:
    """``(h, w)`` bool mask of a COCO ``segmentation`` (polygons, uncompressed or compressed RLE)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, h, w)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def derive_panoptic(instances: Iterable[dict], stuff_map: np.ndarray | None, thing_ids: Sequence[int],
                    shape: tuple[int, int]) -> PanopticTarget:
    """Panoptic ground truth of one image from its COCO instance annotations and its stuffthingmap (PNG
    values ``category_id - 1``, 255 unlabeled; ``None`` without one), at ``shape`` ``(h, w)``, by the rules of
    the module docstring. Segment ids are ``1..n``: instances in that order, then stuff by category id."""
    h, w = shape
    ids = np.zeros((h, w), np.int32)
    segments: dict[int, dict] = {}
    anns = sorted(instances, key=lambda a: int(a.get("iscrowd", 0)))  # stable: annotation order within each
    for a in anns:
        free = annotation_mask(a["segmentation"], h, w) & (ids == 0)
        if not free.any():
            continue
        sid = len(segments) + 1
        ids[free] = sid
        segments[sid] = {"category_id": int(a["category_id"]), "iscrowd": int(a.get("iscrowd", 0)), "isthing": 1}
    if stuff_map is not None:
        if stuff_map.shape != (h, w):
            stuff_map = cv2.resize(stuff_map, (w, h), interpolation=cv2.INTER_NEAREST)
        things = set(int(t) for t in thing_ids)
        for v in np.unique(stuff_map[ids == 0]).tolist():
            if v == IGNORE_INDEX or v + 1 in things:
                continue
            region = (stuff_map == v) & (ids == 0)
            sid = len(segments) + 1
            ids[region] = sid
            segments[sid] = {"category_id": v + 1, "iscrowd": 0, "isthing": 0}
    return ids, segments
