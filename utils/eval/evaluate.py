"""Validation shared by train.py (each epoch) and test.py: predictions in original coordinates -> metrics."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from models.model import Model
from utils.data.config import DataError, SplitSpec
from utils.data.dataset import Batch, CocoDataset, stall_guard
from utils.data.vocab import Vocabulary
from utils.eval.metrics.caption import caption_scores
from utils.eval.metrics.detection import coco_map, load_ground_truth
from utils.eval.metrics.semantic import SemanticMeter, logits_to_original
from utils.ops.boxes import scale_boxes, xyxy2xywh
from utils.ops.masks import encode_rle, masks_to_original, process_masks
from utils.ops.nms import non_max_suppression


@dataclass
class EvalResult:
    """Flat metrics (the keys of ``metrics.json``), COCO-format predictions and timing."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, dict[int, float]] = field(default_factory=dict)
    # COCO results on the images whose split has instance labels (all of them when no split has any,
    # e.g. an unlabelled test split written out with --save-json)
    detections: list[dict] = field(default_factory=list)
    masks: list[dict] = field(default_factory=list)
    captions: list[tuple[int, str, list[str]]] = field(default_factory=list)  # (image id, predicted, references)
    semantic_confusion: object = None
    speed_ms: dict[str, float] = field(default_factory=dict)
    images: int = 0
    image_ids: list[int] = field(default_factory=list)  # every evaluated image, with or without detections
    scored_images: dict[str, int] = field(default_factory=dict)  # "box" / "sem" / "cap" -> images scored
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


SEMANTIC_AT = ("original", "input")


def image_splits(dataset: CocoDataset) -> dict[int, SplitSpec]:
    """Image id -> the split it belongs to, over the splits ``dataset`` evaluates.

    Raises :class:`DataError` when two splits hold the same image id: COCOeval, the caption scorers and
    the predictions key everything by image id, so one of the two images would be scored against the
    other's labels.
    """
    owner: dict[int, SplitSpec] = {}
    for split, rec in dataset.items:
        first = owner.setdefault(int(rec.image_id), split)
        if first is not split:
            raise DataError(f"image id {rec.image_id} is in two evaluated splits, {first.images} and {split.images}: "
                            "image ids must be unique across the splits evaluated together (renumber one split, "
                            "or evaluate the splits separately)")
    return owner


@torch.no_grad()
def evaluate(model: Model, loader, dataset: CocoDataset, category_ids: list[int], device: torch.device,
             conf_thres: float = 0.001, iou_thres: float = 0.7, max_det: int = 300, half: bool = False,
             loss_fn=None, progress: bool = True, vocab: Vocabulary | None = None, beam: int = 1,
             num_semantic: int = 0, semantic_at: str = "original") -> EvalResult:
    """Runs ``model`` over ``loader`` and scores every task it has (and the data labels).

    Each task is scored on the images that carry its labels, so ``dataset`` may join splits with
    different tasks (a ``val:`` list); image ids must be unique across them (:func:`image_splits`).
    Boxes and masks: COCOeval on original coordinates and ids, over the images of splits with
    ``instances``. Semantic: mIoU / pixel accuracy over images with a semantic map; with ``semantic_at``
    ``"original"`` (the default, the COCO-Stuff / ADE20K / Cityscapes protocol) the logits are mapped back
    through the letterbox, resized bilinearly to the original image and compared with the original PNG;
    ``"input"`` is a faster approximation at network input resolution on the letterboxed map (padding
    ignored). Captions: BLEU / ROUGE-L / CIDEr-D of greedy (``beam`` 1) or beam-search captions against
    all references of the images that have references.
    ``loss_fn(outputs, batch) -> (loss, parts)`` adds validation losses as ``val/<part>`` keys when given.
    """
    if semantic_at not in SEMANTIC_AT:
        raise ValueError(f"semantic_at must be one of {SEMANTIC_AT}, got {semantic_at!r}")
    owner = image_splits(dataset)
    # batches carry paths, not dataset indices: the original semantic map is found by path
    index_of = {str(split.images / rec.file): i for i, (split, rec) in enumerate(dataset.items)}
    model.eval()
    result = EvalResult()
    seen: list[int] = []
    t_pre = t_inf = t_nms = 0.0
    loss_sums: dict[str, float] = {}
    sem_meter = SemanticMeter(num_semantic) if "sem" in model.tasks and num_semantic else None
    cap_pred: dict[int, str] = {}
    cap_refs: dict[int, list[str]] = {}
    sem_images = 0
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
            sem_images += int(batch.task_present("sem").sum())
            update_semantic(sem_meter, out.sem.upsample(batch.images.shape[2:]), batch, dataset, index_of,
                            semantic_at)
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
        # only images with instance labels are scored, and only their predictions may reach loadRes (it
        # refuses results on images its ground truth does not have)
        box_ids = sorted({i for i in result.image_ids if owner[i].instances})
        keep = set(box_ids)
        result.detections = [d for d in result.detections if d["image_id"] in keep]
        result.masks = [m for m in result.masks if m["image_id"] in keep]
        result.scored_images["box"] = len(box_ids)
        gt = load_ground_truth(inst_files)
        result.ground_truth = gt
        box = coco_map(gt, result.detections, box_ids, category_ids, "bbox")
        result.metrics.update({"box_map": box["map"], "box_map50": box["map50"], "box_map75": box["map75"]})
        result.per_class["box"] = box["per_class"]
        if "inst" in model.tasks:
            mask = coco_map(gt, result.masks, box_ids, category_ids, "segm")
            result.metrics.update({"mask_map": mask["map"], "mask_map50": mask["map50"]})
            result.per_class["mask"] = mask["per_class"]
    if sem_meter is not None and sem_meter.confusion.sum() > 0:
        sem = sem_meter.compute()
        result.scored_images["sem"] = sem_images
        result.metrics.update({"sem_miou": sem["miou"], "sem_pixacc": sem["pixel_acc"]})
        result.per_class["sem_iou"] = dict(enumerate(sem["per_class_iou"]))
        result.semantic_confusion = sem["confusion"]
    if cap_refs:
        result.scored_images["cap"] = len(cap_refs)
        scores = caption_scores({k: v for k, v in cap_pred.items() if k in cap_refs}, cap_refs)
        result.metrics.update({f"cap_{k}": v for k, v in scores.items()})
    result.captions = [(k, cap_pred[k], cap_refs.get(k, [])) for k in list(cap_pred)[:8]]
    return result


def update_semantic(meter: SemanticMeter, logits: torch.Tensor, batch: Batch, dataset: CocoDataset,
                    index_of: dict[str, int], at: str = "original") -> None:
    """Adds one batch's semantic predictions to ``meter``, counting only images with a semantic map.

    ``logits``: ``(B, K, H, W)`` at network input resolution. ``at="original"`` maps each image's logits
    back to its original size (:func:`logits_to_original`) and compares the argmax with the original map
    (``dataset.semantic_target``, found through ``index_of``: path -> dataset index); ``"input"`` compares
    with the letterboxed map of ``batch``.
    """
    present = batch.task_present("sem")
    if at == "input":
        pred = logits.argmax(1).cpu()
        meter.update(pred, batch.semantic.long(), present[:, None, None].expand_as(pred))
        return
    for b in present.nonzero()[:, 0].tolist():
        target = dataset.semantic_target(index_of[batch.paths[b]], batch.orig_shapes[b])
        if target is None:
            continue
        ratio, pad = batch.ratio_pad[b]
        pred = logits_to_original(logits[b], ratio, pad, batch.orig_shapes[b]).argmax(0).cpu()
        meter.update(pred[None], torch.from_numpy(target)[None].long())
