"""One evaluator per task, as detectron2's ``DatasetEvaluator``: ``reset()``, ``process(batch, results)`` per
batch of :class:`~utils.ops.postprocess.Result` (original pixels), ``evaluate() -> metrics``, then ``export``
adds what the task keeps besides metrics (COCO predictions, per-class scores, confusion) to the ``EvalResult``.

Each evaluator owns its metric keys and its share of the model-selection fitness (``task`` is its key in
:data:`utils.tasks.FITNESS_TERMS`, and ``evaluate`` reports those terms whenever it scores anything), so a new
task (panoptic next) is one new evaluator composed by :func:`utils.eval.evaluate.evaluate`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import torch

from utils.data.coco import read_semantic_map, semantic_path
from utils.data.config import SplitSpec
from utils.data.dataset import Batch, CocoDataset
from utils.data.panoptic import (
    PanopticTarget,
    derive_panoptic,
    load_panoptic_json,
    read_panoptic_png,
)
from utils.data.yolo import coco_dict
from utils.eval.metrics.caption import caption_scores
from utils.eval.metrics.detection import coco_map, load_ground_truth
from utils.eval.metrics.panoptic import PQStat
from utils.eval.metrics.semantic import SemanticMeter
from utils.ops.panoptic import PanopticSpec
from utils.ops.postprocess import Result, coco_boxes, coco_masks

__all__ = ["EvalResult", "Evaluator", "InstanceTruth", "BoxEvaluator", "MaskEvaluator", "SemanticEvaluator",
           "CaptionEvaluator", "PanopticEvaluator"]


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
    scored_images: dict[str, int] = field(default_factory=dict)  # "box" / "sem" / "cap" / "pan" -> images scored
    ground_truth: object = None  # the pycocotools COCO of the boxes/masks scored (reused by the PR curves)


class Evaluator:
    """Base of the per-task evaluators; ``task`` names the fitness share (``FITNESS_TERMS[task]``) it reports."""

    task: str = ""

    def reset(self) -> None:
        """Forgets everything processed."""
        raise NotImplementedError

    def process(self, batch: Batch, results: list[Result]) -> None:
        """Adds one batch: its labels and one Result per image, in original pixels."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Metrics over everything processed (flat ``metrics.json`` keys); empty when nothing was scored."""
        raise NotImplementedError

    def export(self, result: EvalResult) -> None:
        """Adds this task's predictions, per-class scores and scored-image count to ``result`` (after evaluate)."""


class InstanceTruth:
    """The instance ground truth boxes and masks are scored on, loaded once for both: the images of splits
    with ``instances`` or YOLO labels (only their predictions may reach ``loadRes``, which refuses unknown images)."""

    def __init__(self, dataset: CocoDataset, owner: dict[int, SplitSpec], category_ids: Sequence[int]):
        self.owner = owner
        splits = {id(s): s for s, _ in dataset.items}.values()
        self.files = [s.instances for s in splits if s.instances]
        self.single_class_id = dataset.single_class_id
        # YOLO splits have no JSON: their ground truth is made from the records (classes already collapsed
        # under --single-cls)
        yolo = [rec for s, rec in dataset.items if s.yolo]
        self.records = coco_dict(yolo, list(category_ids), [str(c) for c in category_ids]) if yolo else None
        self._gt = None

    @property
    def has_truth(self) -> bool:
        """Whether any split has object labels to score against."""
        return bool(self.files or self.records)

    @property
    def gt(self):
        """The pycocotools COCO of every instance file and YOLO split (loaded on first use)."""
        if self._gt is None:
            self._gt = load_ground_truth(self.files, self.single_class_id, self.records)
        return self._gt

    def scored(self, image_ids: Sequence[int], task: str = "det") -> list[int]:
        """The ids among ``image_ids`` that have labels of ``task`` (det or inst), sorted."""
        return sorted({i for i in image_ids if task in self.owner[i].tasks})


class _CocoEvaluator(Evaluator):
    """COCOeval of one iou type over the images with instance labels (all predictions kept when none has)."""

    iou_type = ""
    per_class_key = ""  # EvalResult.per_class key of the per-class AP
    keys: dict[str, str] = {}  # coco_map key -> metric key

    def __init__(self, truth: InstanceTruth, category_ids: Sequence[int]):
        self.truth, self.category_ids = truth, list(category_ids)
        self.reset()

    def reset(self) -> None:
        self.predictions: list[dict] = []
        self.image_ids: list[int] = []
        self.scored_ids: list[int] = []
        self.stats: dict | None = None

    def convert(self, r: Result, image_id: int) -> list[dict]:
        raise NotImplementedError

    def process(self, batch: Batch, results: list[Result]) -> None:
        for iid, r in zip(batch.image_ids, results):
            self.image_ids.append(int(iid))
            if len(r):
                self.predictions += self.convert(r, iid)

    def evaluate(self) -> dict[str, float]:
        if not self.truth.has_truth:
            return {}
        self.scored_ids = self.truth.scored(self.image_ids, self.task)
        keep = set(self.scored_ids)
        self.predictions = [d for d in self.predictions if d["image_id"] in keep]
        self.stats = coco_map(self.truth.gt, self.predictions, self.scored_ids, self.category_ids, self.iou_type)
        return {v: self.stats[k] for k, v in self.keys.items()}

    def export(self, result: EvalResult) -> None:
        if self.stats is not None:
            result.per_class[self.per_class_key] = self.stats["per_class"]


class BoxEvaluator(_CocoEvaluator):
    """Box mAP (COCOeval ``bbox``) in original pixels and category ids."""

    task, iou_type, per_class_key = "det", "bbox", "box"
    keys = {"map": "box_map", "map50": "box_map50", "map75": "box_map75"}

    def convert(self, r: Result, image_id: int) -> list[dict]:
        return coco_boxes(r, int(image_id), self.category_ids)

    def export(self, result: EvalResult) -> None:
        super().export(result)
        result.detections = self.predictions
        if self.stats is not None:
            result.scored_images["box"] = len(self.scored_ids)
            result.ground_truth = self.truth.gt


class MaskEvaluator(_CocoEvaluator):
    """Mask mAP (COCOeval ``segm``) of RLEs at the original resolution."""

    task, iou_type, per_class_key = "inst", "segm", "mask"
    keys = {"map": "mask_map", "map50": "mask_map50"}

    def convert(self, r: Result, image_id: int) -> list[dict]:
        return coco_masks(r, int(image_id), self.category_ids)

    def export(self, result: EvalResult) -> None:
        super().export(result)
        result.masks = self.predictions


class SemanticEvaluator(Evaluator):
    """mIoU / pixel accuracy over the images with a semantic map.

    ``at="original"`` (COCO-Stuff / ADE20K / Cityscapes) compares each Result's map at the original size
    with the original map (``dataset.semantic_target``, found by path); ``"input"`` compares the letterboxed
    map (Results made with ``semantic_at="input"``) with the batch's letterboxed labels (padding is ignored).
    """

    task = "sem"

    def __init__(self, num_classes: int, dataset: CocoDataset, at: str = "original"):
        self.meter = SemanticMeter(num_classes)
        self.dataset, self.at = dataset, at
        # batches carry paths, not dataset indices: the original semantic map is found by path
        self.index_of = {str(split.images / rec.file): i for i, (split, rec) in enumerate(dataset.items)}
        self.reset()

    def reset(self) -> None:
        self.meter.reset()
        self.images = 0
        self.stats: dict | None = None

    @staticmethod
    def wanted(batch: Batch) -> list[bool]:
        """Per image whether its semantic map is scored (``postprocess(semantic_for=...)``)."""
        if batch.semantic is None:
            return [False] * len(batch)
        return [bool(v) for v in batch.task_present("sem").tolist()]

    def process(self, batch: Batch, results: list[Result]) -> None:
        if batch.semantic is None:
            return
        present = batch.task_present("sem")
        self.images += int(present.sum())
        for b in present.nonzero()[:, 0].tolist():
            if self.at == "input":
                target = batch.semantic[b].numpy()
            else:
                target = self.dataset.semantic_target(self.index_of[batch.paths[b]], batch.orig_shapes[b])
                if target is None:
                    continue
            self.meter.update(torch.from_numpy(results[b].semantic)[None], torch.from_numpy(target)[None].long())

    def evaluate(self) -> dict[str, float]:
        if self.meter.confusion.sum() == 0:
            return {}
        self.stats = self.meter.compute()
        return {"sem_miou": self.stats["miou"], "sem_pixacc": self.stats["pixel_acc"]}

    def export(self, result: EvalResult) -> None:
        if self.stats is not None:
            result.scored_images["sem"] = self.images
            result.per_class["sem_iou"] = dict(enumerate(self.stats["per_class_iou"]))
            result.semantic_confusion = self.stats["confusion"]


class CaptionEvaluator(Evaluator):
    """BLEU / ROUGE-L / CIDEr-D of each Result's caption against every reference of images that have them."""

    task = "cap"

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.predicted: dict[int, str] = {}
        self.references: dict[int, list[str]] = {}

    def process(self, batch: Batch, results: list[Result]) -> None:
        for iid, r, refs, has in zip(batch.image_ids, results, batch.captions, batch.task_present("cap").tolist()):
            if r.caption is None:
                continue
            self.predicted[int(iid)] = r.caption
            if has:
                self.references[int(iid)] = refs

    def evaluate(self) -> dict[str, float]:
        if not self.references:
            return {}
        scores = caption_scores({k: v for k, v in self.predicted.items() if k in self.references}, self.references)
        return {f"cap_{k}": v for k, v in scores.items()}

    def export(self, result: EvalResult) -> None:
        if self.references:
            result.scored_images["cap"] = len(self.references)
        result.captions = [(k, self.predicted[k], self.references.get(k, [])) for k in list(self.predicted)[:8]]


class PanopticEvaluator(Evaluator):
    """PQ / SQ / RQ (overall, things, stuff; :mod:`utils.eval.metrics.panoptic`) of each Result's ``panoptic``
    against the split's panoptic ground truth: its ``panoptic`` files, or derived from its instances +
    stuffthingmaps (:func:`~utils.data.panoptic.derive_panoptic`) where it has no panoptic files.

    Scored over ``spec``'s categories (thing ids, then the stuff semantic ids) in original pixels.
    """

    task = "pan"

    def __init__(self, dataset: CocoDataset, owner: dict[int, SplitSpec], truth: InstanceTruth, spec: PanopticSpec):
        self.owner, self.truth, self.spec = owner, truth, spec
        self.records = {int(rec.image_id): (split, rec) for split, rec in dataset.items}
        self.categories = {c: True for c in spec.category_ids} | {
            spec.semantic_ids[i]: False for i in spec.stuff_indices.tolist()}
        self._json: dict[Path, dict[int, dict]] = {}  # panoptic JSON -> image id -> annotation, read once
        self.reset()

    def reset(self) -> None:
        self.stat = PQStat()
        self.images = 0
        self.per_class: dict[int, float] = {}

    def wanted(self, batch: Batch) -> list[bool]:
        """Per image whether it has panoptic ground truth (its semantic map is then needed for the merge)."""
        return [self.owner[int(i)].has_panoptic for i in batch.image_ids]

    def ground_truth(self, image_id: int, shape: tuple[int, int]) -> PanopticTarget | None:
        """``(ids, segments)`` of one image at ``shape``; ``None`` when its split has none for it."""
        split, rec = self.records[image_id]
        if split.panoptic is not None:
            anns = self._json.get(split.panoptic)
            if anns is None:
                anns = self._json[split.panoptic] = load_panoptic_json(split.panoptic)
            ann = anns.get(image_id)
            ids = read_panoptic_png(split.panoptic_pngs / ann["file_name"]) if ann is not None else None
            if ids is None:
                return None
            if ids.shape != shape:  # a PNG of another size than the image: nearest keeps ids whole
                ids = cv2.resize(ids, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
            return ids, {int(s["id"]): s for s in ann["segments_info"]}
        if split.instances is None or split.semantic is None:
            return None
        anns = self.truth.gt.imgToAnns.get(image_id, [])
        # COCO polygons are in the JSON's image size; a differently stored image is rare, rescaled as a map
        h, w = (rec.height, rec.width) if rec.width else shape
        ids, segments = derive_panoptic(anns, read_semantic_map(semantic_path(split, rec)), self.spec.category_ids,
                                        (h, w))
        if ids.shape != shape:
            ids = cv2.resize(ids, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        return ids, segments

    def process(self, batch: Batch, results: list[Result]) -> None:
        for iid, r in zip(batch.image_ids, results):
            if r.panoptic is None or not self.owner[int(iid)].has_panoptic:
                continue
            gt = self.ground_truth(int(iid), r.orig_shape)
            if gt is None:
                continue
            pred = {s["id"]: s for s in r.panoptic.segments}
            self.stat.update(gt[0], gt[1], r.panoptic.ids, pred)
            self.images += 1

    def evaluate(self) -> dict[str, float]:
        if not self.images:
            return {}
        metrics, self.per_class = self.stat.summary(self.categories)
        return metrics

    def export(self, result: EvalResult) -> None:
        if self.images:
            result.scored_images["pan"] = self.images
            result.per_class["pq"] = self.per_class
