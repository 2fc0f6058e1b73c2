"""Validation shared by train.py (each epoch) and test.py: the model's outputs -> :func:`~utils.ops.postprocess.
postprocess` (the Results detect.py also produces) -> one evaluator per task (:mod:`utils.eval.evaluators`)."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from models.model import Model
from utils.data.config import DataError, SplitSpec
from utils.data.dataset import CocoDataset, stall_guard
from utils.data.vocab import Vocabulary
from utils.eval.evaluators import (
    BoxEvaluator,
    CaptionEvaluator,
    EvalResult,
    Evaluator,
    InstanceTruth,
    MaskEvaluator,
    PanopticEvaluator,
    SemanticEvaluator,
)
from utils.ops.letterbox import to_float
from utils.ops.options import PredictOptions
from utils.ops.panoptic import PanopticSpec
from utils.ops.postprocess import head_outputs, postprocess
from utils.tasks import PANOPTIC_NEEDS

SEMANTIC_AT = ("original", "input")
# Caption beam width of the COCO evaluation: both anchors score COCO captions by beam search of 5 (GRIT's
# configs/caption/coco_config.yaml beam_size 5, at evaluation and for its self-critical samples; GeneralistYOLO's
# caption/val.py use_beam_search=True, beam_size=5), so test.py and training's validation do too (--beam 1: greedy).
COCO_BEAM = 5


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


def build_evaluators(model: Model, dataset: CocoDataset, owner: dict[int, SplitSpec], category_ids: list[int],
                     vocab: Vocabulary | None, num_semantic: int, semantic_at: str,
                     panoptic: PanopticSpec | None = None) -> list[Evaluator]:
    """The evaluators of the tasks ``model`` has, in ``ALL_TASKS`` order (the order of the metric keys);
    panoptic with ``panoptic`` given, a det + inst + sem model, maps at the original size and panoptic
    ground truth in some split."""
    evaluators: list[Evaluator] = []
    tasks = model.tasks
    truth = InstanceTruth(dataset, owner, category_ids)
    if "det" in tasks:
        evaluators.append(BoxEvaluator(truth, category_ids))
        if "inst" in tasks:  # masks are the kept boxes' masks
            evaluators.append(MaskEvaluator(truth, category_ids))
    if "sem" in tasks and num_semantic:
        evaluators.append(SemanticEvaluator(num_semantic, dataset, semantic_at))
    if "cap" in tasks and vocab is not None:
        evaluators.append(CaptionEvaluator())
    if (panoptic is not None and set(PANOPTIC_NEEDS) <= set(tasks) and num_semantic and semantic_at == "original"
            and any(s.has_panoptic for s in owner.values())):
        evaluators.append(PanopticEvaluator(dataset, owner, truth, panoptic))
    return evaluators


# Evaluation's thresholds: multi-label NMS at a low confidence, for the whole precision-recall curve (YOLOv5's val.py)
EVAL_OPTIONS = PredictOptions(conf_thres=0.001, iou_thres=0.7, max_det=300, multi_label=True)


@dataclass(frozen=True)
class LabelSpace:
    """What the evaluated labels mean, beside the dataset's images.

    Attributes:
        category_ids: contiguous class index -> original category id (the data's ``category_ids``).
        num_semantic: semantic classes scored (0: no semantic evaluation).
        semantic_ids: semantic index -> original id, for the panoptic merge (``None``: ``model.meta``'s).
        vocab: the caption vocabulary (``None``: captions are not scored).
    """

    category_ids: Sequence[int]
    num_semantic: int = 0
    semantic_ids: Sequence[int] | None = None
    vocab: Vocabulary | None = None


@dataclass(frozen=True)
class EvalSettings:
    """How an evaluation runs (not what it scores).

    Attributes:
        half: FP16 input (a half model).
        progress: a tqdm bar over the batches.
        beam: caption beam width (default :data:`COCO_BEAM`; 1 = greedy).
        semantic_at: ``"original"`` or ``"input"`` (see :func:`evaluate`).
    """

    half: bool = False
    progress: bool = True
    beam: int = COCO_BEAM
    semantic_at: str = "original"


@torch.no_grad()
def evaluate(model: Model, loader, dataset: CocoDataset, labels: LabelSpace, device: torch.device,
             options: PredictOptions = EVAL_OPTIONS, settings: EvalSettings = EvalSettings(),
             loss_fn=None) -> EvalResult:
    """Runs ``model`` over ``loader`` and scores every task it has (and the data labels).

    Each task is scored on the images that carry its labels, so ``dataset`` may join splits with
    different tasks (a ``val:`` list); image ids must be unique across them (:func:`image_splits`).
    ``labels`` (:class:`LabelSpace`) says what the labels mean. Predictions are :func:`~utils.ops.postprocess.
    postprocess` Results with ``options`` (default :data:`EVAL_OPTIONS`: multi-label NMS at ``conf_thres`` 0.001,
    ``iou_thres`` 0.7, ``max_det`` 300). Boxes and masks: COCOeval on original coordinates and ids, over the images
    of splits with ``instances``. Semantic: mIoU / pixel accuracy over images with a semantic map; with
    ``semantic_at`` ``"original"`` (the default, the COCO-Stuff / ADE20K / Cityscapes protocol) the logits
    are mapped back through the letterbox, resized bilinearly to the original image and compared with the
    original PNG; ``"input"`` is a faster approximation at network input resolution on the letterboxed map
    (padding ignored); both are ``settings.semantic_at``. Captions (with ``labels.vocab``): BLEU / ROUGE-L /
    CIDEr-D of beam-search (``settings.beam``, default :data:`COCO_BEAM`) or greedy (1) captions against all
    references of the images that have references.
    Panoptic (a det + inst + sem model with ``labels.semantic_ids``, default ``model.meta``'s, and ``semantic_at``
    ``"original"``): the Results' :func:`~utils.ops.panoptic.merge_panoptic` with ``options.panoptic`` (``None``:
    the default rule of those ids, stuff regions under 4096 pixels dropped) scored as PQ / SQ / RQ over the
    images of splits with panoptic ground truth (:class:`~utils.eval.evaluators.PanopticEvaluator`).
    ``loss_fn(outputs, batch) -> (loss, parts)`` adds validation losses as ``val/<part>`` keys when given.
    """
    semantic_at, beam, vocab = settings.semantic_at, settings.beam, labels.vocab
    if semantic_at not in SEMANTIC_AT:
        raise ValueError(f"semantic_at must be one of {SEMANTIC_AT}, got {semantic_at!r}")
    owner = image_splits(dataset)
    semantic_ids = labels.semantic_ids
    if semantic_ids is None:
        semantic_ids = (getattr(model, "meta", None) or {}).get("semantic_ids")
    spec = options.panoptic
    if spec is None and semantic_ids:
        spec = PanopticSpec.from_meta(labels.category_ids, semantic_ids)
    evaluators = build_evaluators(model, dataset, owner, list(labels.category_ids), vocab, labels.num_semantic,
                                  semantic_at, spec)
    sem_eval = next((e for e in evaluators if isinstance(e, SemanticEvaluator)), None)
    pan_eval = next((e for e in evaluators if isinstance(e, PanopticEvaluator)), None)
    batch_options = replace(options, panoptic=spec if pan_eval is not None else None)
    model.eval()
    result = EvalResult()
    seen: list[int] = []
    t_pre = t_inf = t_post = 0.0
    loss_sums: dict[str, float] = {}
    for batch in tqdm(stall_guard(loader), total=len(loader), desc="val", disable=not settings.progress,
                      leave=False):
        t0 = time.perf_counter()
        x = to_float(batch.images, device, settings.half)
        t1 = time.perf_counter()
        out = model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        if loss_fn is not None:
            _, parts = loss_fn(out, batch)
            for k, v in parts.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + v * len(batch)
        outputs = head_outputs(out)
        if beam > 1 and out.cap is not None:
            outputs["cap_tokens"] = model.head("cap").beam_search(out.cap.memory, beam=beam)
        wanted = [False] * len(batch)  # the semantic maps to make: scored ones and those panoptic merges use
        for e in (sem_eval, pan_eval):
            if e is not None:
                wanted = [a or b for a, b in zip(wanted, e.wanted(batch))]
        results = postprocess(outputs, batch.letterboxes, batch_options, vocab=vocab, semantic_at=semantic_at,
                              semantic_for=wanted)
        for e in evaluators:
            e.process(batch, results)
        t3 = time.perf_counter()
        seen += batch.image_ids
        t_pre, t_inf, t_post = t_pre + t1 - t0, t_inf + t2 - t1, t_post + t3 - t2
    n = max(len(seen), 1)
    result.images = len(seen)
    result.image_ids = [int(i) for i in seen]
    # "nms" is post-processing and the evaluators' bookkeeping (NMS, masks, maps, COCO conversion)
    result.speed_ms = {"pre": 1e3 * t_pre / n, "inference": 1e3 * t_inf / n, "nms": 1e3 * t_post / n}
    result.metrics.update({f"val/{k}": v / n for k, v in loss_sums.items()})
    for e in evaluators:
        result.metrics.update(e.evaluate())
        e.export(result)
    return result
