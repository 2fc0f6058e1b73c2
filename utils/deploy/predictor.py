"""What detect.py runs: frames -> letterboxed batch -> backend -> :func:`~utils.ops.postprocess.postprocess` ->
one :class:`~utils.ops.postprocess.Result` per frame in the frame's own pixels, and the files made from them."""
from __future__ import annotations

import time

import numpy as np
import torch

from utils.data.augment import letterbox
from utils.data.sample import Sample
from utils.data.vocab import Vocabulary
from utils.deploy.backends import Backend
from utils.ops.letterbox import Letterbox
from utils.ops.postprocess import Result, coco_boxes, coco_masks, postprocess
from utils.tasks import IGNORE_INDEX

__all__ = ["Predictor", "check_img_size", "preprocess", "semantic_png", "coco_results", "yolo_lines", "summarize"]


def check_img_size(img: int | tuple[int, int] | list[int], stride: float) -> tuple[int, int]:
    """``(h, w)`` from ``img`` (one size = square, or ``[h, w]``), rounded up to multiples of ``stride`` so
    every pyramid level has whole cells."""
    if isinstance(img, int):
        hw = (img, img)
    else:
        img = [int(v) for v in img]
        hw = (img[0], img[0]) if len(img) == 1 else (img[0], img[1])
    s = int(stride)
    out = (int(np.ceil(hw[0] / s) * s), int(np.ceil(hw[1] / s) * s))
    if out != hw:
        print(f"note: image size {hw[0]}x{hw[1]} is not a multiple of the stride {s}; using {out[0]}x{out[1]}")
    return out


def preprocess(frames: list[np.ndarray], img_hw: tuple[int, int]) -> tuple[np.ndarray, list[Letterbox]]:
    """BGR frames -> ``(B, 3, H, W)`` float32 RGB in 0..1, letterboxed exactly as the validation loader does."""
    batch, boxes = [], []
    for f in frames:
        s, lb = letterbox(Sample(image=f), tuple(img_hw))
        batch.append(s.image[..., ::-1].transpose(2, 0, 1))
        boxes.append(lb)
    return np.ascontiguousarray(np.stack(batch)).astype(np.float32) / 255.0, boxes


def semantic_png(semantic: np.ndarray, semantic_ids: list[int]) -> np.ndarray:
    """Semantic indices -> COCO-Stuff PNG values: ``category_id - 1``, 255 where unlabeled / not representable."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for i, cid in enumerate(semantic_ids[:256]):
        if 0 <= cid - 1 < IGNORE_INDEX:
            lut[i] = cid - 1
    return lut[semantic]


class Predictor:
    """Frames in, :class:`~utils.ops.postprocess.Result` out (original pixels): preprocess, backend, captions and
    the same :func:`~utils.ops.postprocess.postprocess` as evaluation (single-label NMS at the CLI thresholds),
    with timings.

    ``tasks``: which heads' results to produce (default: every head of the model); instance masks need the
    detections, so they are computed whenever ``inst`` is asked for.
    """

    def __init__(self, backend: Backend, img_size: int | tuple[int, int] | list[int] = 640, conf_thres: float = 0.25,
                 iou_thres: float = 0.45, max_det: int = 300, classes: list[int] | None = None,
                 agnostic: bool = False, tasks: list[str] | None = None, beam: int = 1):
        self.backend, self.info = backend, backend.info
        self.conf_thres, self.iou_thres, self.max_det = conf_thres, iou_thres, max_det
        self.classes, self.agnostic, self.beam = classes, agnostic, beam
        self.tasks = list(tasks) if tasks else list(self.info.tasks)
        missing = [t for t in self.tasks if t not in self.info.tasks]
        if missing:
            raise ValueError(f"--tasks {','.join(missing)}: the model has no such head (it has {','.join(self.info.tasks)})")
        self.vocab = Vocabulary.from_list(self.info.vocab) if "cap" in self.tasks and self.info.vocab else None
        if "cap" in self.tasks and self.vocab is None:
            raise ValueError("the model has a caption head but no vocabulary in its metadata")
        if backend.fixed_hw is not None:
            hw = check_img_size(img_size, self.info.stride) if img_size else backend.fixed_hw
            if tuple(hw) != tuple(backend.fixed_hw):
                print(f"note: this exported model has a fixed input size {backend.fixed_hw[0]}x{backend.fixed_hw[1]}; "
                      f"using it instead of {hw[0]}x{hw[1]} (export with --dynamic for any size)")
            self.img_hw = tuple(backend.fixed_hw)
        else:
            self.img_hw = check_img_size(img_size or 640, self.info.stride)
        self.notes = self._nms_notes()

    def _nms_notes(self) -> list[str]:
        """Why results may differ from the CLI thresholds when NMS is baked into the graph."""
        nms = self.backend.nms
        if not nms:
            return []
        notes = []
        if self.conf_thres < nms["conf_thres"]:
            notes.append(f"--conf-thres {self.conf_thres} is below the exported {nms['conf_thres']}, which applies")
        if abs(self.iou_thres - nms["iou_thres"]) > 1e-9:
            notes.append(f"--iou-thres is fixed to the exported {nms['iou_thres']}")
        if self.agnostic != nms["agnostic"]:
            notes.append(f"--agnostic-nms is fixed to the exported {nms['agnostic']}")
        if self.max_det > nms["max_det"]:
            notes.append(f"--max-det is capped by the exported {nms['max_det']}")
        return notes

    def __call__(self, frames: list[np.ndarray]) -> tuple[list[Result], dict[str, float]]:
        """Results for a batch of BGR frames and the ``pre`` / ``infer`` / ``post`` times in ms (whole batch)."""
        t0 = time.perf_counter()
        x, boxes = preprocess(frames, self.img_hw)
        t1 = time.perf_counter()
        outputs = self._run(x)
        if "cap" in self.tasks:
            outputs["cap_tokens"] = self.backend.caption_tokens(outputs["cap_memory"], self.beam)
        t2 = time.perf_counter()
        results = postprocess({k: torch.from_numpy(v) for k, v in outputs.items()}, boxes, self.conf_thres,
                              self.iou_thres, self.max_det, self.classes, self.agnostic, tasks=self.tasks,
                              vocab=self.vocab)
        t3 = time.perf_counter()
        return results, {"pre": 1e3 * (t1 - t0), "infer": 1e3 * (t2 - t1), "post": 1e3 * (t3 - t2)}

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Backend call; a graph exported for a fixed batch gets the batch padded (and the outputs cut)."""
        fb = self.backend.fixed_batch
        if fb is None or fb == len(x):
            return self.backend(x)
        outs: dict[str, list[np.ndarray]] = {}
        for s in range(0, len(x), fb):
            chunk = x[s:s + fb]
            n = len(chunk)
            if n < fb:
                chunk = np.concatenate((chunk, np.zeros((fb - n, *chunk.shape[1:]), chunk.dtype)))
            for k, v in self.backend(chunk).items():
                outs.setdefault(k, []).append(v[:n])
        return {k: np.concatenate(v) for k, v in outs.items()}


# --------------------------------------------------------------------------------------------------
# result formats
# --------------------------------------------------------------------------------------------------
def coco_results(result: Result, image_id: int | str, category_ids: list[int]) -> list[dict]:
    """COCO result dicts of one frame (the conversion evaluation uses): original category ids, ``bbox`` ``x y w h``
    in frame pixels, ``score``, and an RLE ``segmentation`` when the frame has instance masks."""
    out = coco_boxes(result, image_id, category_ids)
    for d, m in zip(out, coco_masks(result, image_id, category_ids)):
        d["segmentation"] = m["segmentation"]
    return out


def yolo_lines(result: Result, with_conf: bool = False) -> list[str]:
    """YOLO label lines ``class xc yc w h [conf]``, coordinates normalized by the frame size."""
    h, w = result.shape
    lines = []
    for (x1, y1, x2, y2), s, c in zip(result.boxes.tolist(), result.scores.tolist(), result.classes.tolist()):
        line = f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
        lines.append(line + (f" {s:.6f}" if with_conf else ""))
    return lines


def summarize(result: Result, names: list[str]) -> str:
    """``2 circles, 1 square`` (or ``no detections``) for the per-frame log line."""
    if not len(result):
        return "no detections"
    cls, n = np.unique(result.classes, return_counts=True)
    return ", ".join(f"{k} {names[c] if c < len(names) else c}{'s' * (k > 1)}" for c, k in zip(cls.tolist(), n.tolist()))
