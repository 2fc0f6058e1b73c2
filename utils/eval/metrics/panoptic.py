"""Panoptic quality (Kirillov et al. 2019) as COCO reports it: cocodataset/panopticapi ``pq_compute``.

Per image (:meth:`PQStat.update`): a ground-truth and a predicted segment of the same category match when
their IoU > 0.5, where the union leaves out the predicted pixels that are void in the ground truth
(matches are then unique). Crowd ground-truth segments are never matched and never false negatives; an
unmatched predicted segment is not a false positive when more than half of it lies on ground-truth void
or on a crowd region of its own category. Per category ``PQ = sum IoU / (TP + FP/2 + FN/2)``,
``SQ = sum IoU / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``; the averages are over the categories that occur
(TP + FP + FN > 0), over all, things or stuff.

One deviation, for robustness: segment areas are counted in the id maps, not read from the JSON (COCO's
JSON areas are those pixel counts; a hand-edited or rescaled file would otherwise score the wrong union).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PQStat", "pq_from_counts"]

VOID = 0
OFFSET = 1 << 32  # gt id * OFFSET + pred id is unique for 32-bit ids


@dataclass
class _Counts:
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0


def pq_from_counts(iou: float, tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """``(pq, sq, rq)`` of one category's sums (0 where a denominator is 0)."""
    den = tp + 0.5 * fp + 0.5 * fn
    sq = iou / tp if tp else 0.0
    rq = tp / den if den else 0.0
    return sq * rq, sq, rq


class PQStat:
    """Accumulates per-category IoU sums and TP / FP / FN counts over images."""

    def __init__(self):
        self.counts: dict[int, _Counts] = {}

    def _c(self, category_id: int) -> _Counts:
        return self.counts.setdefault(int(category_id), _Counts())

    def update(self, gt_ids: np.ndarray, gt_segments: dict[int, dict], pred_ids: np.ndarray,
               pred_segments: dict[int, dict]) -> None:
        """Adds one image.

        Args:
            gt_ids, pred_ids: ``(h, w)`` integer segment ids, 0 void (the same shape).
            gt_segments: id -> ``{"category_id", "iscrowd"}``; pixels whose id is not listed count as void.
            pred_segments: id -> ``{"category_id"}``; a listed segment without pixels is ignored and pixels
                of unlisted ids are void.
        """
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"panoptic maps differ in size: ground truth {gt_ids.shape}, prediction {pred_ids.shape}")
        gt_ids = np.where(np.isin(gt_ids, list(gt_segments)), gt_ids, VOID).astype(np.uint64)
        pred_ids = np.where(np.isin(pred_ids, list(pred_segments)), pred_ids, VOID).astype(np.uint64)
        gt_area = dict(zip(*(v.tolist() for v in np.unique(gt_ids, return_counts=True))))
        pred_area = dict(zip(*(v.tolist() for v in np.unique(pred_ids, return_counts=True))))
        joint, n = np.unique(gt_ids * OFFSET + pred_ids, return_counts=True)
        inter = {(int(j // OFFSET), int(j % OFFSET)): int(c) for j, c in zip(joint.tolist(), n.tolist())}
        gt_matched, pred_matched = set(), set()
        for (g, p), i in inter.items():
            if g == VOID or p == VOID or gt_segments[g].get("iscrowd", 0) == 1:
                continue
            if gt_segments[g]["category_id"] != pred_segments[p]["category_id"]:
                continue
            union = pred_area[p] + gt_area[g] - i - inter.get((VOID, p), 0)
            iou = i / union
            if iou > 0.5:
                c = self._c(gt_segments[g]["category_id"])
                c.tp, c.iou = c.tp + 1, c.iou + iou
                gt_matched.add(g)
                pred_matched.add(p)
        crowd: dict[int, int] = {}  # category -> its crowd segment (panopticapi keeps one per category)
        for g in gt_area:
            if g == VOID or g in gt_matched:
                continue
            if gt_segments[g].get("iscrowd", 0) == 1:
                crowd[gt_segments[g]["category_id"]] = g
                continue
            self._c(gt_segments[g]["category_id"]).fn += 1
        for p in pred_area:
            if p == VOID or p in pred_matched:
                continue
            cat = pred_segments[p]["category_id"]
            ignored = inter.get((VOID, p), 0) + (inter.get((crowd[cat], p), 0) if cat in crowd else 0)
            if ignored / pred_area[p] > 0.5:
                continue
            self._c(cat).fp += 1

    def summary(self, categories: dict[int, bool]) -> tuple[dict[str, float], dict[int, float]]:
        """Flat metrics ``pq pq_th pq_st sq rq`` (plus ``sq_th rq_th sq_st rq_st``) and per-category PQ.

        ``categories``: category id -> isthing, the categories that may be scored; an average over a group
        with no occurring category is 0.
        """
        out: dict[str, float] = {}
        per_class: dict[int, float] = {}
        for group, suffix in ((None, ""), (True, "_th"), (False, "_st")):
            rows = []
            for cid, isthing in categories.items():
                c = self.counts.get(cid)
                if c is None or c.tp + c.fp + c.fn == 0 or (group is not None and isthing != group):
                    continue
                rows.append(pq_from_counts(c.iou, c.tp, c.fp, c.fn))
                if group is None:
                    per_class[cid] = rows[-1][0]
            mean = np.mean(rows, 0).tolist() if rows else [0.0, 0.0, 0.0]
            out.update({f"pq{suffix}": mean[0], f"sq{suffix}": mean[1], f"rq{suffix}": mean[2]})
        return out, per_class
