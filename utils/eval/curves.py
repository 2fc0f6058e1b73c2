"""The numbers behind the validation plots: precision-recall / F1-confidence curves and confusion matrices.

Everything here works on what :func:`utils.eval.evaluate.evaluate` already produced (COCO result dicts in original
coordinates and category ids, and the semantic confusion matrix), so the plots cost no extra forward pass.

* PR curves come from pycocotools' own ``COCOeval.eval["precision"]`` at IoU 0.5, so the mAP@0.5 printed on
  ``PR_curve.png`` is exactly the ``box_map50`` / ``mask_map50`` of ``results.csv``.
* F1-confidence curves need per-detection matches, which ``COCOeval.evalImgs`` holds (``dtMatches`` at
  IoU 0.5); precision and recall at each confidence threshold are read off the ranked matches.
* The detection confusion matrix follows YOLOv5 (class-agnostic IoU matching at 0.45 of detections above
  conf 0.25, one detection per ground truth), with a background row (false positives) and column (missed).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy as np

REC_THRS = np.linspace(0.0, 1.0, 101)  # COCOeval's recall thresholds
CONF_GRID = np.linspace(0.0, 1.0, 1001)  # confidence thresholds of the F1 / P / R curves


# --------------------------------------------------------------------------------------------------
# ranked matches -> precision / recall / AP
# --------------------------------------------------------------------------------------------------
def pr_from_matches(tp: np.ndarray, conf: np.ndarray, n_gt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative recall and precision of detections ranked by confidence.

    Args:
        tp: ``(n,)`` 1 where the detection matched a ground truth, else 0.
        conf: ``(n,)`` detection confidences.
        n_gt: number of (non-ignored) ground truths of the class.
    Returns:
        ``(conf_sorted, recall, precision)``, each ``(n,)``, in descending confidence order.
    """
    order = np.argsort(-np.asarray(conf, np.float64), kind="mergesort")  # mergesort: stable, as COCOeval
    conf = np.asarray(conf, np.float64)[order]
    tp = np.asarray(tp, np.float64)[order]
    tpc, fpc = np.cumsum(tp), np.cumsum(1.0 - tp)
    recall = tpc / max(n_gt, 1) if n_gt else np.zeros_like(tpc)
    precision = tpc / np.maximum(tpc + fpc, np.spacing(1))
    return conf, recall, precision


def interpolated_precision(recall: np.ndarray, precision: np.ndarray,
                           rec_thrs: np.ndarray = REC_THRS) -> np.ndarray:
    """COCO's 101-point interpolated precision: the precision envelope (max to the right) sampled at each
    recall threshold; 0 beyond the highest recall reached. Same arithmetic as ``COCOeval.accumulate``."""
    if len(recall) == 0:
        return np.zeros(len(rec_thrs))
    env = np.maximum.accumulate(np.asarray(precision, np.float64)[::-1])[::-1]
    idx = np.searchsorted(recall, rec_thrs, side="left")
    out = np.zeros(len(rec_thrs))
    ok = idx < len(env)
    out[ok] = env[idx[ok]]
    return out


def pr_vs_conf(tp: np.ndarray, conf: np.ndarray, n_gt: int,
               grid: np.ndarray = CONF_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of the detections with confidence >= each threshold of ``grid``.

    Linear interpolation between ranked detections (as YOLOv5's ``ap_per_class``); above the highest
    confidence precision is 1 (nothing is kept, nothing is wrong) and recall 0.
    """
    if len(tp) == 0:  # nothing detected: nothing wrong, nothing found
        return np.ones(len(grid)), np.zeros(len(grid))
    if n_gt <= 0:
        return np.zeros(len(grid)), np.zeros(len(grid))
    c, r, p = pr_from_matches(tp, conf, n_gt)
    # np.interp needs increasing x: -conf increases along the ranking
    rc = np.interp(-grid, -c, r, left=0.0)
    pc = np.interp(-grid, -c, p, left=1.0)
    return pc, rc


def f1_score(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Harmonic mean of precision and recall (0 where both are 0)."""
    return 2 * p * r / np.maximum(p + r, 1e-16)


# --------------------------------------------------------------------------------------------------
# COCOeval -> per-class curves
# --------------------------------------------------------------------------------------------------
@dataclass
class Curves:
    """Per-class curves of one IoU type (``bbox`` or ``segm``) at IoU 0.5, for the classes with ground truth.

    Attributes:
        names: class names (rows of every array).
        recall: ``(101,)`` COCO recall thresholds.
        precision: ``(K, 101)`` interpolated precision at each recall threshold (COCOeval's).
        ap50: ``(K,)`` AP@0.5 per class; ``ap50.mean()`` is COCOeval's mAP@0.5.
        conf: ``(C,)`` confidence thresholds; p, r, f1: ``(K, C)`` at each threshold.
        n_gt: ``(K,)`` ground truths per class.
    """

    names: list[str]
    recall: np.ndarray
    precision: np.ndarray
    ap50: np.ndarray
    conf: np.ndarray = field(default_factory=lambda: CONF_GRID.copy())
    p: np.ndarray = field(default_factory=lambda: np.zeros((0, len(CONF_GRID))))
    r: np.ndarray = field(default_factory=lambda: np.zeros((0, len(CONF_GRID))))
    n_gt: np.ndarray = field(default_factory=lambda: np.zeros(0, int))

    @property
    def f1(self) -> np.ndarray:
        return f1_score(self.p, self.r)

    @property
    def map50(self) -> float:
        return float(self.ap50.mean()) if len(self.ap50) else 0.0


def coco_curves(gt, results: list[dict], image_ids: list[int], category_ids: list[int], names: list[str],
                iou_type: str = "bbox") -> Curves | None:
    """Runs COCOeval once and reads the IoU-0.5 PR curve and F1-confidence curves of every class.

    Args:
        gt: a ``pycocotools.coco.COCO`` with the ground truth (``utils.eval.metrics.detection.load_ground_truth``).
        results: COCO result dicts (``bbox`` or ``segmentation``) as :class:`utils.eval.evaluators.EvalResult` holds.
        image_ids: the evaluated images (images without detections still count their ground truth).
        category_ids, names: classes in contiguous order.
    Returns: the curves, or ``None`` when there is nothing to evaluate.
    """
    from pycocotools.cocoeval import COCOeval

    if not results or not image_ids:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results])  # loadRes adds keys in place: copy
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = sorted(set(int(i) for i in image_ids))
        ev.params.catIds = list(category_ids)
        ev.evaluate()
        ev.accumulate()
    t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    prec = ev.eval["precision"][t50, :, :, 0, -1].T  # (K, R): area "all", the largest maxDets
    keep = [k for k in range(len(category_ids)) if (prec[k] > -1).all()]  # -1: the class has no ground truth
    # matches at IoU 0.5 per class, from the per-image records of area range "all"
    area_all, max_det = ev.params.areaRng[0], ev.params.maxDets[-1]
    tps: dict[int, list[np.ndarray]] = {c: [] for c in category_ids}
    confs: dict[int, list[np.ndarray]] = {c: [] for c in category_ids}
    ngt = {c: 0 for c in category_ids}
    for e in ev.evalImgs:
        if e is None or e["aRng"] != area_all or e["maxDet"] != max_det:
            continue
        ign = np.asarray(e["dtIgnore"], bool).reshape(len(ev.params.iouThrs), -1)[t50]
        matched = np.asarray(e["dtMatches"]).reshape(len(ev.params.iouThrs), -1)[t50] > 0
        tps[e["category_id"]].append(matched[~ign].astype(np.float64))
        confs[e["category_id"]].append(np.asarray(e["dtScores"], np.float64)[~ign])
        ngt[e["category_id"]] += int((~np.asarray(e["gtIgnore"], bool)).sum())
    p_rows, r_rows, counts = [], [], []
    for k in keep:
        c = category_ids[k]
        tp = np.concatenate(tps[c]) if tps[c] else np.zeros(0)
        cf = np.concatenate(confs[c]) if confs[c] else np.zeros(0)
        p, r = pr_vs_conf(tp, cf, ngt[c])
        p_rows.append(p)
        r_rows.append(r)
        counts.append(ngt[c])
    precision = prec[keep] if keep else np.zeros((0, len(REC_THRS)))
    return Curves(names=[names[k] if k < len(names) else str(category_ids[k]) for k in keep],
                  recall=np.asarray(ev.params.recThrs), precision=precision, ap50=precision.mean(1),
                  p=np.array(p_rows).reshape(len(keep), -1), r=np.array(r_rows).reshape(len(keep), -1),
                  n_gt=np.array(counts, int))


# --------------------------------------------------------------------------------------------------
# detection confusion matrix
# --------------------------------------------------------------------------------------------------
def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(n, m)`` IoU of ``x1 y1 x2 y2`` boxes."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-12)


class DetConfusion:
    """``(nc + 1, nc + 1)`` counts, rows = true class, columns = predicted class; index ``nc`` = background.

    A row-``nc`` entry is a false positive (a detection matching no ground truth), a column-``nc`` entry a
    missed ground truth. Matching is class-agnostic, so a box found with the wrong class is a confusion
    between the two classes rather than one miss plus one false positive (YOLOv5's convention).
    """

    def __init__(self, nc: int, conf: float = 0.25, iou: float = 0.45):
        self.nc, self.conf, self.iou = nc, conf, iou
        self.matrix = np.zeros((nc + 1, nc + 1), np.int64)

    def update(self, det_boxes: np.ndarray, det_scores: np.ndarray, det_classes: np.ndarray,
               gt_boxes: np.ndarray, gt_classes: np.ndarray) -> None:
        """Adds one image: detections ``x1 y1 x2 y2`` with scores and class indices, ground truth boxes/classes."""
        det_boxes = np.asarray(det_boxes, np.float64).reshape(-1, 4)
        det_scores = np.asarray(det_scores, np.float64).reshape(-1)
        det_classes = np.asarray(det_classes, np.int64).reshape(-1)
        gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
        gt_classes = np.asarray(gt_classes, np.int64).reshape(-1)
        keep = det_scores > self.conf
        det_boxes, det_classes = det_boxes[keep], det_classes[keep]
        bg = self.nc
        if not len(gt_boxes):
            np.add.at(self.matrix, (bg, det_classes), 1)
            return
        if not len(det_boxes):
            np.add.at(self.matrix, (gt_classes, bg), 1)
            return
        iou = box_iou_np(gt_boxes, det_boxes)
        gi, di = np.nonzero(iou > self.iou)
        det_used = np.zeros(len(det_boxes), bool)
        gt_used = np.zeros(len(gt_boxes), bool)
        # greedy by IoU: each ground truth and each detection takes part in at most one match
        for k in np.argsort(-iou[gi, di], kind="mergesort"):
            g, d = gi[k], di[k]
            if gt_used[g] or det_used[d]:
                continue
            gt_used[g] = det_used[d] = True
            self.matrix[gt_classes[g], det_classes[d]] += 1
        np.add.at(self.matrix, (gt_classes[~gt_used], bg), 1)
        np.add.at(self.matrix, (bg, det_classes[~det_used]), 1)

    def normalized(self) -> np.ndarray:
        """Rows divided by their sums (each true class: where its boxes went); empty rows stay 0."""
        m = self.matrix.astype(np.float64)
        return m / np.maximum(m.sum(1, keepdims=True), 1)


def detection_confusion(gt, detections: list[dict], image_ids: list[int], category_ids: list[int],
                        conf: float = 0.25, iou: float = 0.45) -> DetConfusion:
    """:class:`DetConfusion` over COCO result dicts against a COCO ground truth (crowd boxes skipped)."""
    index = {c: k for k, c in enumerate(category_ids)}
    cm = DetConfusion(len(category_ids), conf, iou)
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        by_image.setdefault(int(d["image_id"]), []).append(d)
    for iid in sorted(set(int(i) for i in image_ids)):
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[iid])) if not a.get("iscrowd", 0)
                and a["category_id"] in index]
        dets = [d for d in by_image.get(iid, []) if d["category_id"] in index]
        cm.update(_xywh_to_xyxy([d["bbox"] for d in dets]), [d["score"] for d in dets],
                  [index[d["category_id"]] for d in dets],
                  _xywh_to_xyxy([a["bbox"] for a in anns]), [index[a["category_id"]] for a in anns])
    return cm


def _xywh_to_xyxy(boxes: list) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (rows with no count stay 0)."""
    m = np.asarray(matrix, np.float64)
    return m / np.maximum(m.sum(1, keepdims=True), 1e-12)
