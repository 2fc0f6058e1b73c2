"""Panoptic segmentation from the instance and semantic results, and the COCO panoptic format.

:func:`merge_panoptic` is the Panoptic FPN heuristic (Kirillov et al. 2019; detectron2's
``combine_semantic_and_instance_outputs``):

1. instances with ``score >= score_thres`` are visited by decreasing score; each pixel goes to the first
   instance whose mask covers it, and an instance is dropped when more than ``overlap_thres`` of its mask is
   already taken (a duplicate of a better-scored instance), else it keeps the pixels still free;
2. the pixels left get the *stuff* class of the semantic map; a stuff region smaller than ``stuff_area``
   pixels is dropped to void (id 0). Thing classes in the semantic map never become segments: things are
   owned by the instances (a thing pixel no instance claims has no instance identity to give it), so such
   pixels stay void, as in detectron2.

Segment ids are ``1..n`` in that order; 0 is void. The COCO panoptic PNG stores an id as
``R + 256 G + 256^2 B`` (:func:`id2rgb` / :func:`rgb2id`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PanopticSpec", "Panoptic", "merge_panoptic", "segment_bbox", "id2rgb", "rgb2id", "coco_panoptic"]

VOID = 0  # the id of pixels that belong to no segment


@dataclass(frozen=True)
class PanopticSpec:
    """How to merge: the model's class ids (from its metadata) and the three thresholds.

    ``category_ids``: thing index -> original category id; ``semantic_ids``: semantic index -> original id.
    A semantic index is *stuff* when its id is not a thing id. ``stuff_area`` is in pixels of the image the
    merge runs on (4096 is detectron2's value for COCO's ~640x480 images; scale it for other sizes).
    """

    category_ids: tuple[int, ...]
    semantic_ids: tuple[int, ...]
    score_thres: float = 0.5
    overlap_thres: float = 0.5
    stuff_area: int = 4096

    @classmethod
    def from_meta(cls, category_ids: Sequence[int], semantic_ids: Sequence[int], **kw) -> PanopticSpec:
        """From a model's metadata lists (``ModelInfo`` / ``model.meta``); ``kw`` sets the thresholds."""
        return cls(tuple(int(i) for i in category_ids), tuple(int(i) for i in semantic_ids), **kw)

    @property
    def stuff_indices(self) -> np.ndarray:
        """Semantic indices whose category is stuff (not one of the thing ids)."""
        things = set(self.category_ids)
        return np.array([i for i, c in enumerate(self.semantic_ids) if c not in things], np.int64)

    def categories(self, thing_names: Sequence[str] = (), semantic_names: Sequence[str] = ()) -> list[dict]:
        """COCO panoptic ``categories``: every thing, then every stuff class, with ``isthing``."""
        things = [{"id": c, "name": thing_names[i] if i < len(thing_names) else str(c), "isthing": 1}
                  for i, c in enumerate(self.category_ids)]
        stuff = [{"id": self.semantic_ids[i], "isthing": 0,
                  "name": semantic_names[i] if i < len(semantic_names) else str(self.semantic_ids[i])}
                 for i in self.stuff_indices.tolist()]
        return things + stuff


@dataclass
class Panoptic:
    """One image's panoptic segmentation: ``ids`` ``(h, w)`` int32 segment ids (0 void) and one dict per
    segment: ``id``, ``category_id`` (original id), ``isthing``, ``score`` (the instance's; 1.0 for stuff),
    ``area`` (pixels), ``bbox`` ``[x, y, w, h]`` and ``label`` (thing index or semantic index, for colours)."""

    ids: np.ndarray
    segments: list[dict] = field(default_factory=list)


def segment_bbox(mask: np.ndarray) -> list[int]:
    """``[x, y, w, h]`` of a non-empty bool mask, in whole pixels (COCO panoptic's ``bbox``)."""
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


def merge_panoptic(masks: np.ndarray | None, scores: np.ndarray, classes: np.ndarray, semantic: np.ndarray,
                   spec: PanopticSpec) -> Panoptic:
    """Instance masks + semantic map (same pixels) -> :class:`Panoptic` by the rule in the module docstring.

    Args:
        masks: ``(n, h, w)`` bool, or ``None`` (no instances); ``scores`` ``(n,)``; ``classes`` ``(n,)`` thing indices.
        semantic: ``(h, w)`` semantic indices (the argmax map).
        spec: class ids and thresholds.
    """
    h, w = semantic.shape
    ids = np.zeros((h, w), np.int32)
    segments: list[dict] = []
    if masks is not None and len(masks):
        for k in np.argsort(-np.asarray(scores, np.float64), kind="stable").tolist():
            score = float(scores[k])
            if score < spec.score_thres:
                break  # sorted: every later instance is below the threshold too
            mask = masks[k].astype(bool, copy=False)
            area = int(mask.sum())
            if area == 0:
                continue
            free = mask & (ids == VOID)
            kept = int(free.sum())
            if (area - kept) / area > spec.overlap_thres:
                continue
            cls = int(classes[k])
            ids[free] = len(segments) + 1
            segments.append({"id": len(segments) + 1, "category_id": spec.category_ids[cls], "isthing": True,
                             "score": score, "area": kept, "bbox": segment_bbox(free), "label": cls})
    free = ids == VOID
    for s in spec.stuff_indices.tolist():
        region = free & (semantic == s)
        area = int(region.sum())
        if area == 0 or area < spec.stuff_area:
            continue
        ids[region] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "category_id": spec.semantic_ids[s], "isthing": False,
                         "score": 1.0, "area": area, "bbox": segment_bbox(region), "label": s})
    return Panoptic(ids, segments)


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids ``(h, w)`` -> ``(h, w, 3)`` uint8 RGB with ``id = R + 256 G + 256^2 B`` (COCO panoptic PNG)."""
    ids = np.asarray(ids, np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` RGB of a COCO panoptic PNG -> int32 segment ids (the inverse of :func:`id2rgb`)."""
    rgb = np.asarray(rgb, np.int64)
    return (rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]).astype(np.int32)


def coco_panoptic(pan: Panoptic, image_id: int | str, file_name: str) -> dict:
    """One COCO panoptic ``annotations[]`` entry: ``image_id``, the PNG's ``file_name`` and ``segments_info``
    (``id``, original ``category_id``, ``iscrowd`` 0, ``bbox``, ``area``; the ``score`` kept as an extra)."""
    return {"image_id": image_id, "file_name": file_name,
            "segments_info": [{"id": s["id"], "category_id": s["category_id"], "iscrowd": 0, "bbox": s["bbox"],
                               "area": s["area"], "score": round(float(s["score"]), 5)} for s in pan.segments]}
