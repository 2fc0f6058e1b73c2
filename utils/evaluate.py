"""Validation shared by train.py (each epoch) and test.py: predictions in original coordinates -> metrics."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from models.model import Model
from utils.boxes import scale_boxes, xyxy2xywh
from utils.data.dataset import Batch, CocoDataset
from utils.metrics.detection import coco_map, load_ground_truth
from utils.nms import non_max_suppression


@dataclass
class EvalResult:
    """Flat metrics (the keys of ``metrics.json``), COCO-format predictions and timing."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, dict[int, float]] = field(default_factory=dict)
    detections: list[dict] = field(default_factory=list)
    speed_ms: dict[str, float] = field(default_factory=dict)
    images: int = 0


def to_float(images: torch.Tensor, device: torch.device, half: bool = False) -> torch.Tensor:
    """uint8 RGB batch -> float in [0, 1] on ``device`` (half precision only where asked, i.e. CUDA)."""
    x = images.to(device, non_blocking=True)
    return (x.half() if half else x.float()) / 255.0


def detections_to_coco(dets: list[torch.Tensor], batch: Batch, category_ids: list[int]) -> list[dict]:
    """Per-image ``(n, 6)`` detections in input pixels -> COCO result dicts in original pixels and ids."""
    out = []
    for det, iid, shape, (ratio, pad) in zip(dets, batch.image_ids, batch.orig_shapes, batch.ratio_pad):
        if not len(det):
            continue
        boxes = scale_boxes(det[:, :4].clone().float(), ratio, pad, shape)
        xywh = xyxy2xywh(boxes).cpu().tolist()
        for b, score, cls in zip(xywh, det[:, 4].tolist(), det[:, 5].long().tolist()):
            out.append({"image_id": int(iid), "category_id": int(category_ids[cls]),
                        "bbox": [round(v, 3) for v in b], "score": round(float(score), 5)})
    return out


@torch.no_grad()
def evaluate(model: Model, loader, dataset: CocoDataset, category_ids: list[int], device: torch.device,
             conf_thres: float = 0.001, iou_thres: float = 0.7, max_det: int = 300, half: bool = False,
             loss_fn=None, progress: bool = True) -> EvalResult:
    """Runs ``model`` over ``loader`` and scores every task it has.

    ``loss_fn(outputs, batch) -> (loss, parts)`` adds validation losses as ``val/<part>`` keys when given.
    """
    model.eval()
    result = EvalResult()
    seen: list[int] = []
    t_pre = t_inf = t_nms = 0.0
    loss_sums: dict[str, float] = {}
    for batch in tqdm(loader, desc="val", disable=not progress, leave=False):
        t0 = time.perf_counter()
        x = to_float(batch.images, device, half)
        t1 = time.perf_counter()
        out = model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        if loss_fn is not None:
            _, parts = loss_fn(out, batch)
            for k, v in parts.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + v * len(batch)
        if out.det is not None:
            dets = non_max_suppression(out.det.pred.float(), conf_thres, iou_thres, max_det=max_det, multi_label=True)
            result.detections += detections_to_coco(dets, batch, category_ids)
        t3 = time.perf_counter()
        seen += batch.image_ids
        t_pre, t_inf, t_nms = t_pre + t1 - t0, t_inf + t2 - t1, t_nms + t3 - t2
    n = max(len(seen), 1)
    result.images = len(seen)
    result.speed_ms = {"pre": 1e3 * t_pre / n, "inference": 1e3 * t_inf / n, "nms": 1e3 * t_nms / n}
    result.metrics.update({f"val/{k}": v / n for k, v in loss_sums.items()})
    inst_files = [s.instances for s in {id(s): s for s, _ in dataset.items}.values() if s.instances]
    if "det" in model.tasks and inst_files:
        gt = load_ground_truth(inst_files)
        box = coco_map(gt, result.detections, seen, category_ids, "bbox")
        result.metrics.update({"box_map": box["map"], "box_map50": box["map50"], "box_map75": box["map75"]})
        result.per_class["box"] = box["per_class"]
    return result


def fitness(metrics: dict[str, float]) -> float:
    """Model selection score for ``best.pt``: YOLOv5's 0.1 * mAP50 + 0.9 * mAP50-95 on boxes."""
    return 0.1 * metrics.get("box_map50", 0.0) + 0.9 * metrics.get("box_map", 0.0)
