"""The one way from raw head outputs back to an image: :func:`postprocess` -> one :class:`Result` per image.

Evaluation (``utils.eval``), ``detect.py`` (``utils.deploy.predictor.Predictor``) and the validation pictures
(``utils.viz.plots.predict_batch``) all call it, so a box, mask, semantic map or caption means the same thing
in metrics, in saved predictions and in pictures. Its input is the vision graph's named outputs as tensors
(:func:`head_outputs` names a ``Model``'s ``Outputs``; an ONNX backend's arrays go through ``torch.from_numpy``),
so eager models and exported graphs, with or without NMS inside, share every step after the network.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from utils.ops.boxes import xyxy2xywh
from utils.ops.letterbox import Letterbox, upsample_logits
from utils.ops.masks import encode_rle, process_masks
from utils.ops.nms import non_max_suppression
from utils.ops.options import PredictOptions
from utils.ops.panoptic import Panoptic, merge_panoptic
from utils.tasks import TASKS

if TYPE_CHECKING:  # annotations only: ops does not depend on data at run time
    from utils.data.vocab import Vocabulary

__all__ = ["Result", "head_outputs", "postprocess", "category_ids_of", "coco_boxes", "coco_masks", "SPACES"]

SPACES = ("original", "input")  # where a Result's coordinates live: the original image or the letterboxed input


@dataclass
class Result:
    """Everything predicted for one image, in the pixels of ``shape`` (the original image unless ``at="input"``).

    ``boxes`` ``(n, 4)`` float32 ``x1 y1 x2 y2``, ``scores`` ``(n,)`` float32, ``classes`` ``(n,)`` int64 contiguous
    indices; ``masks`` ``(n, h, w)`` bool or ``None``; ``semantic`` ``(h, w)`` semantic indices (uint8 when
    there are at most 256 classes) or ``None``; ``tokens`` the caption ids and ``caption`` their words, or ``None``;
    ``panoptic`` the merge of masks and semantic map (:class:`~utils.ops.panoptic.Panoptic`: int32 id map of
    ``shape`` + segments with original category ids) or ``None``.
    ``track_ids`` ``(n,)`` int64 video track ids of the detections (:mod:`utils.ops.track`), or ``None``.
    """

    letterbox: Letterbox
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    masks: np.ndarray | None = None
    semantic: np.ndarray | None = None
    tokens: np.ndarray | None = None
    caption: str | None = None
    at: str = "original"
    panoptic: Panoptic | None = None
    track_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def orig_shape(self) -> tuple[int, int]:
        """``(h, w)`` of the original image."""
        return self.letterbox.orig_shape

    @property
    def shape(self) -> tuple[int, int]:
        """``(h, w)`` of the image the coordinates refer to."""
        return self.letterbox.orig_shape if self.at == "original" else self.letterbox.input_shape


def head_outputs(out) -> dict[str, torch.Tensor]:
    """A ``Model``'s ``Outputs`` under the vision graph's output names (``det_pred``, ``inst_coeffs``,
    ``inst_protos``, ``sem_logits``, ``cap_memory``, and ``cap_tokens`` when the caption head decoded)."""
    named: dict[str, torch.Tensor] = {}
    if out.det is not None:
        named["det_pred"] = out.det.pred
    if out.inst is not None:
        named["inst_coeffs"], named["inst_protos"] = out.inst.coeffs, out.inst.protos
    if out.sem is not None:
        named["sem_logits"] = out.sem.logits
    if out.cap is not None:
        named["cap_memory"] = out.cap.memory
        if out.cap.tokens is not None:
            named["cap_tokens"] = out.cap.tokens
    return named


def _graph_detections(outputs: dict[str, torch.Tensor], conf_thres: float, max_det: int,
                      classes: Sequence[int] | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """An in-graph NMS result as per-image ``(n, 6)`` ``x1 y1 x2 y2 score class`` and anchor indices, filtered
    further by ``conf_thres`` and ``classes`` (the graph's own thresholds already applied)."""
    dets, idx = [], []
    for i in range(len(outputs["det_count"])):
        n = int(outputs["det_count"][i])
        d = torch.cat((outputs["det_boxes"][i, :n].float(), outputs["det_scores"][i, :n].float()[:, None],
                       outputs["det_classes"][i, :n].float()[:, None]), 1)
        k = outputs["det_anchor_index"][i, :n].long()
        keep = d[:, 4] > conf_thres
        if classes is not None:
            keep &= (d[:, 5:6] == torch.tensor(list(classes), dtype=d.dtype, device=d.device)).any(1)
        dets.append(d[keep][:max_det])
        idx.append(k[keep][:max_det])
    return dets, idx


def _semantic_indices(label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Class indices -> numpy, uint8 when they fit (what the pictures and PNGs take)."""
    return (label.to(torch.uint8) if num_classes <= 256 else label).cpu().numpy()


@torch.no_grad()
def postprocess(outputs: dict[str, torch.Tensor], letterboxes: Sequence[Letterbox],
                options: PredictOptions = PredictOptions(), *, tasks: Sequence[str] | None = None,
                vocab: Vocabulary | None = None, at: str = "original", semantic_at: str | None = None,
                semantic_for: Sequence[bool] | None = None) -> list[Result]:
    """Named head outputs of a batch (tensors, any device) + per-image letterboxes -> one :class:`Result` each.

    Args:
        outputs: graph output names -> tensors (:func:`head_outputs`, or a backend's arrays as tensors):
            raw ``det_pred`` goes through :func:`~utils.ops.nms.non_max_suppression` with ``options``;
            in-graph NMS outputs (``det_count`` ...) are filtered further by its ``conf_thres``, ``classes`` and
            ``max_det``. ``cap_tokens`` ``(B, L)``, when present, become ``Result.tokens`` (and words with ``vocab``).
        letterboxes: per image, how it became the input (all of one batch share ``input_shape``).
        options: thresholds and limits (:class:`~utils.ops.options.PredictOptions`); with ``options.panoptic``
            the masks and the semantic map are merged into ``Result.panoptic`` where they share a space
            (``None``: no merge).
        tasks: which results to produce (default: every output present); masks need ``det`` boxes and
            are produced when ``inst`` is asked for.
        at: ``"original"`` maps everything back to the original image; ``"input"`` leaves it in letterboxed
            input pixels (pictures of the network input).
        semantic_at: the semantic map's space when it differs from ``at`` (evaluation's fast approximation
            scores the letterboxed map while boxes are scored in original pixels).
        semantic_for: per image whether to produce its semantic map (default all): resizing ``K`` logit
            planes to the original size is the costly step, skipped for images that are not scored.
    Returns:
        One Result per letterbox. The semantic map is evaluation's protocol everywhere, detect.py included:
        logits resized bilinearly to the input, the padding cropped off, resized bilinearly to the original
        and only then the argmax, so saved maps and pictures are the maps the metrics score.
    """
    if at not in SPACES or (semantic_at or at) not in SPACES:
        raise ValueError(f"at / semantic_at must be one of {SPACES}, got {at!r} / {semantic_at!r}")
    semantic_at = semantic_at or at
    tasks = list(tasks) if tasks is not None else list(TASKS)
    n_img = len(letterboxes)
    dets: list[torch.Tensor] = []
    idx: list[torch.Tensor] = []
    if "det" in tasks or "inst" in tasks:  # masks need the boxes
        if "det_pred" in outputs:
            dets, idx = non_max_suppression(outputs["det_pred"].float(), options, return_indices=True)
        elif "det_count" in outputs:
            dets, idx = _graph_detections(outputs, options.conf_thres, options.max_det, options.classes)
    want_masks = "inst" in tasks and "inst_coeffs" in outputs and bool(dets)
    sem_logits = None
    sem_for = [True] * n_img if semantic_for is None else [bool(v) for v in semantic_for]
    if "sem" in tasks and "sem_logits" in outputs and any(sem_for):
        # one batched resize to the input size (the resize the loss uses), in the logits' own dtype
        sem_logits = upsample_logits(outputs["sem_logits"], letterboxes[0].input_shape)
    tokens = outputs.get("cap_tokens") if "cap" in tasks else None
    token_rows = tokens.tolist() if tokens is not None else None
    results = []
    for i, lb in enumerate(letterboxes):
        r = Result(lb, np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), at=at)
        if dets:
            det = dets[i]
            if want_masks:
                masks = process_masks(outputs["inst_protos"][i], outputs["inst_coeffs"][i][idx[i]], det[:, :4],
                                      lb.input_shape)
                r.masks = (lb.masks_to_original(masks) if at == "original" else masks).cpu().numpy()
            boxes = lb.boxes_to_original(det[:, :4]) if at == "original" else det[:, :4].float()
            r.boxes = boxes.cpu().numpy()
            r.scores = det[:, 4].cpu().numpy()
            r.classes = det[:, 5].long().cpu().numpy()
        if sem_logits is not None and sem_for[i]:
            logits = sem_logits[i]
            label = lb.labels_to_original(logits) if semantic_at == "original" else logits.argmax(0)
            r.semantic = _semantic_indices(label, logits.shape[0])
        if options.panoptic is not None and r.masks is not None and r.semantic is not None and semantic_at == at:
            r.panoptic = merge_panoptic(r.masks, r.scores, r.classes, r.semantic, options.panoptic)
        if token_rows is not None:
            r.tokens = np.asarray(token_rows[i], np.int64)
            r.caption = vocab.decode(token_rows[i]) if vocab is not None else None
        results.append(r)
    return results


def _category(cls: int, category_ids: Sequence[int]) -> int:
    """A contiguous class index -> its dataset category id (the index itself when the model lists no id)."""
    return int(category_ids[cls]) if cls < len(category_ids) else int(cls)


def category_ids_of(classes: np.ndarray, category_ids: Sequence[int]) -> np.ndarray:
    """Contiguous class indices -> ``(n,)`` int64 dataset category ids, the ids :func:`coco_boxes` writes."""
    return np.array([_category(int(c), category_ids) for c in classes], np.int64)


def coco_boxes(r: Result, image_id: int | str, category_ids: Sequence[int]) -> list[dict]:
    """COCO ``bbox`` results of one original-pixel Result: ``x y w h`` (float32 ``xyxy2xywh``) rounded to 3
    decimals, score to 5, dataset category ids."""
    return [{"image_id": image_id, "category_id": _category(c, category_ids), "bbox": [round(v, 3) for v in b],
             "score": round(float(s), 5)}
            for b, s, c in zip(xyxy2xywh(r.boxes).tolist(), r.scores.tolist(), r.classes.tolist())]


def coco_masks(r: Result, image_id: int | str, category_ids: Sequence[int]) -> list[dict]:
    """COCO ``segm`` results of one original-pixel Result: RLE at the original size, score rounded to 5
    decimals (no ``bbox`` key: ``loadRes`` would then take areas from the boxes)."""
    if r.masks is None or not len(r.masks):
        return []
    return [{"image_id": image_id, "category_id": _category(c, category_ids), "segmentation": rle,
             "score": round(float(s), 5)}
            for rle, s, c in zip(encode_rle(r.masks), r.scores.tolist(), r.classes.tolist())]
