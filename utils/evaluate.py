"""Validation shared by train.py (each epoch) and test.py: predictions in original coordinates -> metrics."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from models.model import Model
from utils.boxes import scale_boxes, xyxy2xywh
from utils.data.dataset import Batch, CocoDataset, stall_guard
from utils.masks import encode_rle, masks_to_original, process_masks
from utils.metrics.caption import caption_scores
from utils.metrics.detection import coco_map, load_ground_truth
from utils.metrics.semantic import SemanticMeter
from utils.nms import non_max_suppression
from utils.vocab import Vocabulary


@dataclass
class EvalResult:
    """Flat metrics (the keys of ``metrics.json``), COCO-format predictions and timing."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, dict[int, float]] = field(default_factory=dict)
    detections: list[dict] = field(default_factory=list)
    masks: list[dict] = field(default_factory=list)
    captions: list[tuple[int, str, list[str]]] = field(default_factory=list)  # (image id, predicted, references)
    semantic_confusion: object = None
    speed_ms: dict[str, float] = field(default_factory=dict)
    images: int = 0
    image_ids: list[int] = field(default_factory=list)  # every evaluated image, with or without detections
    ground_truth: object = None  # the pycocotools COCO of the boxes/masks scored (reused by the PR curves)


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


def masks_to_coco(dets: list[torch.Tensor], idx: list[torch.Tensor], inst, batch: Batch,
                  category_ids: list[int]) -> list[dict]:
    """Instance masks of the kept detections -> COCO ``segm`` results (RLE at original resolution)."""
    out = []
    h, w = batch.images.shape[2:]
    for b, (det, i) in enumerate(zip(dets, idx)):
        if not len(det):
            continue
        masks = process_masks(inst.protos[b], inst.coeffs[b, i], det[:, :4], (h, w))
        ratio, pad = batch.ratio_pad[b]
        rles = encode_rle(masks_to_original(masks, ratio, pad, batch.orig_shapes[b]).cpu())
        for rle, score, cls in zip(rles, det[:, 4].tolist(), det[:, 5].long().tolist()):
            out.append({"image_id": int(batch.image_ids[b]), "category_id": int(category_ids[cls]),
                        "segmentation": rle, "score": round(float(score), 5)})
    return out


@torch.no_grad()
def evaluate(model: Model, loader, dataset: CocoDataset, category_ids: list[int], device: torch.device,
             conf_thres: float = 0.001, iou_thres: float = 0.7, max_det: int = 300, half: bool = False,
             loss_fn=None, progress: bool = True, vocab: Vocabulary | None = None, beam: int = 1,
             num_semantic: int = 0) -> EvalResult:
    """Runs ``model`` over ``loader`` and scores every task it has (and the data labels).

    Boxes and masks: COCOeval on original coordinates and ids. Semantic: mIoU / pixel accuracy at network
    input resolution over the letterboxed map (padding is ignore). Captions: BLEU / ROUGE-L / CIDEr-D of
    greedy (``beam`` 1) or beam-search captions against all references.
    ``loss_fn(outputs, batch) -> (loss, parts)`` adds validation losses as ``val/<part>`` keys when given.
    """
    model.eval()
    result = EvalResult()
    seen: list[int] = []
    t_pre = t_inf = t_nms = 0.0
    loss_sums: dict[str, float] = {}
    sem_meter = SemanticMeter(num_semantic) if "sem" in model.tasks and num_semantic else None
    cap_pred: dict[int, str] = {}
    cap_refs: dict[int, list[str]] = {}
    for batch in tqdm(stall_guard(loader), total=len(loader), desc="val", disable=not progress, leave=False):
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
            dets, idx = non_max_suppression(out.det.pred.float(), conf_thres, iou_thres, max_det=max_det,
                                            multi_label=True, return_indices=True)
            result.detections += detections_to_coco(dets, batch, category_ids)
            if out.inst is not None:
                result.masks += masks_to_coco(dets, idx, out.inst, batch, category_ids)
        t3 = time.perf_counter()
        if sem_meter is not None and batch.semantic is not None:
            pred = out.sem.upsample(batch.images.shape[2:]).argmax(1).cpu()
            valid = batch.task_present("sem")[:, None, None].expand_as(pred)
            sem_meter.update(pred, batch.semantic.long(), valid)
        if out.cap is not None and vocab is not None:
            head = model.head("cap")
            tokens = out.cap.tokens if beam <= 1 else head.beam_search(out.cap.memory, beam=beam)
            for iid, words, refs, has in zip(batch.image_ids, vocab.decode_batch(tokens), batch.captions,
                                             batch.task_present("cap").tolist()):
                cap_pred[int(iid)] = words
                if has:
                    cap_refs[int(iid)] = refs
        seen += batch.image_ids
        t_pre, t_inf, t_nms = t_pre + t1 - t0, t_inf + t2 - t1, t_nms + t3 - t2
    n = max(len(seen), 1)
    result.images = len(seen)
    result.image_ids = [int(i) for i in seen]
    result.speed_ms = {"pre": 1e3 * t_pre / n, "inference": 1e3 * t_inf / n, "nms": 1e3 * t_nms / n}
    result.metrics.update({f"val/{k}": v / n for k, v in loss_sums.items()})
    inst_files = [s.instances for s in {id(s): s for s, _ in dataset.items}.values() if s.instances]
    if "det" in model.tasks and inst_files:
        gt = load_ground_truth(inst_files)
        result.ground_truth = gt
        box = coco_map(gt, result.detections, seen, category_ids, "bbox")
        result.metrics.update({"box_map": box["map"], "box_map50": box["map50"], "box_map75": box["map75"]})
        result.per_class["box"] = box["per_class"]
        if "inst" in model.tasks:
            mask = coco_map(gt, result.masks, seen, category_ids, "segm")
            result.metrics.update({"mask_map": mask["map"], "mask_map50": mask["map50"]})
            result.per_class["mask"] = mask["per_class"]
    if sem_meter is not None and sem_meter.confusion.sum() > 0:
        sem = sem_meter.compute()
        result.metrics.update({"sem_miou": sem["miou"], "sem_pixacc": sem["pixel_acc"]})
        result.per_class["sem_iou"] = dict(enumerate(sem["per_class_iou"]))
        result.semantic_confusion = sem["confusion"]
    if cap_refs:
        scores = caption_scores({k: v for k, v in cap_pred.items() if k in cap_refs}, cap_refs)
        result.metrics.update({f"cap_{k}": v for k, v in scores.items()})
    result.captions = [(k, cap_pred[k], cap_refs.get(k, [])) for k in list(cap_pred)[:8]]
    return result


FITNESS_TERMS = {  # metric -> weight inside its task's score (each task scores in [0, 1])
    "det": {"box_map": 0.9, "box_map50": 0.1},
    "inst": {"mask_map": 0.9, "mask_map50": 0.1},
    "sem": {"sem_miou": 1.0},
    "cap": {"cap_bleu4": 0.5, "cap_cider": 0.05},  # CIDEr-D is ~0..10: 0.05 puts it on BLEU-4's scale
}


def fitness(metrics: dict[str, float]) -> float:
    """Multi-task model selection score for ``best.pt``: the mean over tasks that have metrics of each
    task's score (detection and masks as YOLOv5: 0.9 mAP50-95 + 0.1 mAP50; semantic: mIoU; captions:
    0.5 BLEU-4 + 0.05 CIDEr-D), so no task can win ``best.pt`` by itself."""
    scores = [sum(w * metrics[k] for k, w in terms.items()) for terms in FITNESS_TERMS.values()
              if all(k in metrics for k in terms)]
    return sum(scores) / len(scores) if scores else 0.0
