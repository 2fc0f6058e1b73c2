"""What detect.py and the Python API run: frames -> letterboxed batch -> backend ->
:func:`~utils.ops.postprocess.postprocess` -> one :class:`Results` per frame in the frame's own pixels (a
:class:`~utils.ops.postprocess.Result`, as evaluation sees it, plus the model's names and the frame), and the
files made from them."""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from utils.data.vocab import Vocabulary
from utils.deploy.backends import Backend
from utils.deploy.interface import ModelInfo
from utils.ops.letterbox import Letterbox, letterbox_image
from utils.ops.options import PredictOptions
from utils.ops.panoptic import PanopticSpec, coco_panoptic, id2rgb
from utils.ops.postprocess import (
    Result,
    category_ids_of,
    coco_boxes,
    coco_masks,
    postprocess,
)
from utils.ops.track import ByteTracker, track_result
from utils.tasks import IGNORE_INDEX, PANOPTIC_NEEDS
from utils.viz.draw import annotate

__all__ = ["Predictor", "Results", "check_img_size", "preprocess", "semantic_png", "coco_results", "yolo_lines",
           "summarize", "panoptic_png", "PanopticWriter", "VideoSaver", "ResultWriter"]


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
        image, _, lb = letterbox_image(f, tuple(img_hw))
        batch.append(image[..., ::-1].transpose(2, 0, 1))
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
    """Frames in, :class:`Results` out (original pixels): preprocess, backend, captions and the same
    :func:`~utils.ops.postprocess.postprocess` as evaluation (single-label NMS at the CLI thresholds), with timings.

    ``tasks``: which heads' results to produce (default: every head of the model); instance masks need the
    detections, so they are computed whenever ``inst`` is asked for. ``pan`` asks for the panoptic merge
    (its det, inst and sem results are then computed too).
    ``options``: the thresholds and limits (:class:`~utils.ops.options.PredictOptions`, ``multi_label`` off as
    detect.py's); ``options.panoptic`` is the merge rule, ``None`` the default rule of the model's metadata. The
    merge runs whenever det, inst and sem are all produced (or ``pan`` is asked for) on a model that has them.
    ``tracker``: a :class:`~utils.ops.track.ByteTracker` gives the frames of videos and streams (those called
    with an index) track ids (:func:`~utils.ops.track.track_result`; reset at each video's frame 0); still
    images stay untracked.
    """

    def __init__(self, backend: Backend, img_size: int | tuple[int, int] | list[int] = 640,
                 options: PredictOptions = PredictOptions(), tasks: Sequence[str] | None = None, beam: int = 1,
                 tracker: ByteTracker | None = None):
        self.backend, self.info = backend, backend.info
        self.tracker = tracker
        self.beam = beam
        self.tasks = list(tasks) if tasks else list(self.info.tasks)
        can_merge = all(t in self.info.tasks for t in PANOPTIC_NEEDS)
        missing = [t for t in self.tasks if t not in self.info.tasks and not (t == "pan" and can_merge)]
        if missing:
            raise ValueError(f"--tasks {','.join(missing)}: the model has no such head (it has "
                             f"{','.join(self.info.tasks)}; pan needs {','.join(PANOPTIC_NEEDS)})")
        # what postprocess computes: the asked tasks, and what the merge needs when it is asked for
        self.post_tasks = list(dict.fromkeys(self.tasks + (list(PANOPTIC_NEEDS) if "pan" in self.tasks else [])))
        self.panoptic: PanopticSpec | None = None  # the merge rule in use (None: no merge)
        if can_merge and all(t in self.post_tasks for t in PANOPTIC_NEEDS):
            self.panoptic = (options.panoptic if options.panoptic is not None
                             else PanopticSpec.from_meta(self.info.category_ids, self.info.semantic_ids))
        self.options = replace(options, panoptic=self.panoptic)
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
        o = self.options
        if o.conf_thres < nms["conf_thres"]:
            notes.append(f"--conf-thres {o.conf_thres} is below the exported {nms['conf_thres']}, which applies")
        if abs(o.iou_thres - nms["iou_thres"]) > 1e-9:
            notes.append(f"--iou-thres is fixed to the exported {nms['iou_thres']}")
        if o.agnostic != nms["agnostic"]:
            notes.append(f"--agnostic-nms is fixed to the exported {nms['agnostic']}")
        if o.max_det > nms["max_det"]:
            notes.append(f"--max-det is capped by the exported {nms['max_det']}")
        return notes

    def __call__(self, frames: list[np.ndarray], paths: Sequence[str | None] | None = None,
                 indices: Sequence[int | None] | None = None) -> tuple[list[Results], dict[str, float]]:
        """:class:`Results` for a batch of BGR frames and the ``pre`` / ``infer`` / ``post`` times in ms (whole
        batch). ``paths`` / ``indices``: per frame, where it came from and its index in its video (``None`` for
        images); they name the frame in :meth:`Results.to_json` and are not otherwise used."""
        t0 = time.perf_counter()
        x, boxes = preprocess(frames, self.img_hw)
        t1 = time.perf_counter()
        outputs = self._run(x)
        if "cap" in self.tasks:
            outputs["cap_tokens"] = self.backend.caption_tokens(outputs["cap_memory"], self.beam)
        t2 = time.perf_counter()
        results = postprocess({k: torch.from_numpy(v) for k, v in outputs.items()}, boxes, self.options,
                              tasks=self.post_tasks, vocab=self.vocab)
        paths = list(paths) if paths is not None else [None] * len(frames)
        indices = list(indices) if indices is not None else [None] * len(frames)
        if self.tracker is not None:
            results = [self._track(r, i) for r, i in zip(results, indices)]
        t3 = time.perf_counter()
        speed = {"pre": 1e3 * (t1 - t0), "infer": 1e3 * (t2 - t1), "post": 1e3 * (t3 - t2)}
        return [Results.of(r, self.info, self.tasks, f, p, i, speed)
                for r, f, p, i in zip(results, frames, paths, indices)], speed

    def _track(self, result: Result, index: int | None) -> Result:
        """A video frame's result with track ids (every video starts its own ids); a still image's as it is.
        The panoptic merge is redone with this predictor's rule from the detections that keep a track."""
        if index is None:  # a still image: nothing to carry an identity across
            return result
        if index == 0:
            self.tracker.reset()
        return track_result(result, self.tracker, self.panoptic)

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
    in frame pixels, ``score``, an RLE ``segmentation`` when the frame has instance masks, and ``track_id`` when
    it was tracked."""
    out = coco_boxes(result, image_id, category_ids)
    for d, m in zip(out, coco_masks(result, image_id, category_ids)):
        d["segmentation"] = m["segmentation"]
    if result.track_ids is not None:
        for d, i in zip(out, result.track_ids.tolist()):
            d["track_id"] = i
    return out


def yolo_lines(result: Result, with_conf: bool = False) -> list[str]:
    """YOLO label lines ``class xc yc w h [conf]``, coordinates normalized by the frame size, and the track id last
    when the frame was tracked (``class xc yc w h [conf] id``, Ultralytics' MOT-style lines)."""
    h, w = result.shape
    ids = result.track_ids.tolist() if result.track_ids is not None else [None] * len(result)
    lines = []
    for (x1, y1, x2, y2), s, c, i in zip(result.boxes.tolist(), result.scores.tolist(), result.classes.tolist(), ids):
        line = f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
        lines.append(line + (f" {s:.6f}" if with_conf else "") + (f" {i}" if i is not None else ""))
    return lines


def summarize(result: Result, names: list[str]) -> str:
    """``2 circles, 1 square`` (or ``no detections``) for the per-frame log line."""
    if not len(result):
        return "no detections"
    cls, n = np.unique(result.classes, return_counts=True)
    return ", ".join(f"{k} {names[c] if c < len(names) else c}{'s' * (k > 1)}" for c, k in zip(cls.tolist(), n.tolist()))


# --------------------------------------------------------------------------------------------------
# the user-facing result
# --------------------------------------------------------------------------------------------------
@dataclass(repr=False)
class Results(Result):
    """One frame's :class:`~utils.ops.postprocess.Result` (the same arrays, in the frame's pixels) with what a user
    needs next to it: the model's :class:`~utils.deploy.interface.ModelInfo` (class names, dataset category ids),
    the tasks asked for, the frame itself and where it came from. :class:`Predictor` makes them, so detect.py, the
    Python API (:mod:`utils.deploy.api`) and anything written from them see one object.

    Data (numpy, CPU): ``boxes`` ``(n, 4)`` xyxy, ``scores``, ``classes`` (contiguous indices), :attr:`class_names`,
    :attr:`category_ids` (the dataset's), ``masks`` ``(n, h, w)`` bool, ``semantic`` ``(h, w)``, ``panoptic``
    (``None`` without the merge), ``tokens`` / ``caption``; ``orig_img`` (BGR), ``path``,
    ``frame`` (index in its video, ``None`` for images), ``speed`` (ms of the batch it ran in).
    A task switched off (``tasks``) leaves its field ``None`` (``boxes`` empty without ``det`` and ``inst``).
    """

    info: ModelInfo = field(default_factory=ModelInfo)
    tasks: tuple[str, ...] = ()
    orig_img: np.ndarray | None = None
    path: str | None = None
    frame: int | None = None
    speed: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, result: Result, info: ModelInfo, tasks: Sequence[str], orig_img: np.ndarray | None = None,
           path: str | None = None, frame: int | None = None, speed: dict[str, float] | None = None) -> Results:
        """``result`` enriched; every field of ``result`` is carried over as it is (fields added to ``Result``
        later, such as ``panoptic``, included)."""
        return cls(**{f.name: getattr(result, f.name) for f in fields(result) if f.init and hasattr(result, f.name)},
                   info=info, tasks=tuple(tasks), orig_img=orig_img, path=None if path is None else str(path),
                   frame=frame, speed=dict(speed or {}))

    @property
    def names(self) -> list[str]:
        """The model's class names, by contiguous class index."""
        return self.info.names

    @property
    def class_names(self) -> list[str]:
        """Per detection, its class name (the index as text when the model names fewer classes)."""
        return [self.names[c] if c < len(self.names) else str(c) for c in self.classes.tolist()]

    @property
    def category_ids(self) -> np.ndarray:
        """Per detection, the dataset's category id (what COCO results carry)."""
        return category_ids_of(self.classes, self.info.category_ids)

    @property
    def image_id(self) -> int | str:
        """detect.py's name for this frame in COCO results: the file stem (an int when numeric, as COCO's own
        file names are), ``stem_frame`` for a video frame, the frame index (or 0) when there is no path."""
        if not self.path:
            return int(self.frame or 0)
        stem = Path(self.path).stem
        if self.frame is not None:
            return f"{stem}_{self.frame}"
        return int(stem) if stem.isnumeric() else stem

    def summary(self) -> str:
        """``2 circles, 1 square`` (detect.py's log line)."""
        return summarize(self, self.names)

    def plot(self, img: np.ndarray | None = None, semantic_alpha: float = 0.4, mask_alpha: float = 0.45,
             boxes: bool | None = None) -> np.ndarray:
        """A BGR copy of ``img`` (default: the frame) with everything drawn (:func:`utils.viz.draw.annotate`):
        semantic overlay, masks, boxes (``boxes=None``: when ``det`` was asked for), caption banner."""
        img = self.orig_img if img is None else img
        if img is None:
            raise ValueError("Results.plot: no image to draw on (this result carries no frame; pass img=...)")
        return annotate(img, self, self.names, semantic_alpha, mask_alpha,
                        boxes="det" in self.tasks if boxes is None else boxes)

    def save(self, path: str | Path, **plot_kw: Any) -> Path:
        """Writes :meth:`plot` (``plot_kw`` passed on) to ``path`` (any format cv2 writes); returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), self.plot(**plot_kw)):
            raise ValueError(f"cannot write image {path} (unknown image suffix?)")
        return path

    def to_json(self, image_id: int | str | None = None) -> dict[str, Any]:
        """A JSON-ready dict: ``image_id`` (default :attr:`image_id`), ``path``, ``shape`` ``[h, w]``,
        ``detections`` (:func:`coco_results`: the dicts evaluation and ``predictions.json`` hold, dataset
        category ids, RLE masks) and ``caption`` (``None`` without one)."""
        image_id = self.image_id if image_id is None else image_id
        return {"image_id": image_id, "path": self.path, "shape": [int(v) for v in self.shape],
                "detections": coco_results(self, image_id, self.info.category_ids), "caption": self.caption}

    def cpu(self) -> Results:
        """``self``: the arrays are numpy on the CPU already (kept for torch / Ultralytics habits)."""
        return self

    def numpy(self) -> Results:
        """``self``: the arrays are numpy already (kept for torch / Ultralytics habits)."""
        return self

    def __repr__(self) -> str:
        cap = f", caption={self.caption!r}" if self.caption is not None else ""
        h, w = self.shape
        return f"Results({self.path or 'array'}{'' if self.frame is None else f'#{self.frame}'}, {h}x{w}, " \
               f"{self.summary()}{cap})"


def panoptic_png(ids: np.ndarray) -> np.ndarray:
    """Segment ids -> the COCO panoptic PNG's pixels as OpenCV writes them (BGR of ``id = R + 256 G + 256^2 B``)."""
    return np.ascontiguousarray(id2rgb(ids)[..., ::-1])


class PanopticWriter:
    """Collects COCO panoptic output: one PNG per frame in ``folder`` and, at :meth:`json`, the
    ``panoptic.json`` dict (``images`` with the original sizes, ``annotations`` with ``segments_info`` in
    original category ids, ``categories`` with ``isthing``)."""

    def __init__(self, folder: Path, spec: PanopticSpec, thing_names: list[str], semantic_names: list[str]):
        self.folder, self.spec = folder, spec
        self.categories = spec.categories(thing_names, semantic_names)
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, result: Result, image_id: int | str, stem: str) -> None:
        """Writes ``stem.png`` of ``result.panoptic`` and records its annotation (nothing without a merge)."""
        if result.panoptic is None:
            return
        name = f"{stem}.png"
        cv2.imwrite(str(self.folder / name), panoptic_png(result.panoptic.ids))
        h, w = result.orig_shape
        self.images.append({"id": image_id, "file_name": stem, "height": int(h), "width": int(w)})
        self.annotations.append(coco_panoptic(result.panoptic, image_id, name))

    def json(self) -> dict:
        """The COCO panoptic JSON of everything added."""
        return {"images": self.images, "annotations": self.annotations, "categories": self.categories}


class VideoSaver:
    """One cv2.VideoWriter per source video/stream, opened at its first frame with the source's fps and size."""

    def __init__(self):
        self.key: str | None = None
        self.writer = None
        self.path: Path | None = None

    def write(self, key: str, path: Path, frame: np.ndarray, fps: float) -> None:
        """Appends ``frame`` to the video of ``key`` (a new ``key`` closes the previous video and opens ``path``)."""
        if key != self.key:
            self.close()
            h, w = frame.shape[:2]
            self.writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            if not self.writer.isOpened():
                raise ValueError(f"cannot write video {path} (OpenCV has no mp4v encoder?)")
            self.key, self.path = key, path
        self.writer.write(frame)

    def close(self) -> None:
        """Finishes the open video, if any."""
        if self.writer is not None:
            self.writer.release()
        self.key, self.writer = None, None


@dataclass
class ResultWriter:
    """detect.py's files made from each frame's :class:`Results`, each kind only when asked: YOLO labels
    (``labels/*.txt``), COCO results (``predictions.json``) and captions (``captions.json``), semantic maps
    (``masks/*.png``, category_id - 1), COCO panoptic (``panoptic/*.png`` + ``panoptic.json``) and the annotated
    images and videos. Frames are named by ``stem`` (the file stem, ``<video>_<frame>`` for video frames); the COCO
    image id is the stem, as an int when numeric (as COCO's own file names are)."""

    save_dir: Path
    info: ModelInfo
    txt: bool = False
    conf: bool = False
    coco_json: bool = False
    masks: bool = False
    panoptic: PanopticSpec | None = None
    coco: list[dict] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)
    videos: VideoSaver = field(default_factory=VideoSaver)

    def __post_init__(self):
        self.save_dir.mkdir(parents=True, exist_ok=True)
        for kind, on in (("labels", self.txt), ("masks", self.masks)):
            if on:
                (self.save_dir / kind).mkdir(exist_ok=True)
        self.panoptic_writer = (PanopticWriter(self.save_dir / "panoptic", self.panoptic, self.info.names,
                                               self.info.semantic_names) if self.panoptic is not None else None)

    def add(self, result: Result, stem: str, key: str) -> None:
        """Adds one frame's labels, JSON entries, semantic PNG and panoptic PNG (``key``: its captions.json key)."""
        image_id = int(stem) if stem.isnumeric() else stem
        if self.txt:
            lines = yolo_lines(result, self.conf)
            (self.save_dir / "labels" / f"{stem}.txt").write_text("".join(f"{ln}\n" for ln in lines))
        if self.coco_json:
            self.coco += coco_results(result, image_id, self.info.category_ids)
            if result.caption is not None:
                self.captions[key] = result.caption
        if self.masks:
            cv2.imwrite(str(self.save_dir / "masks" / f"{stem}.png"), semantic_png(result.semantic,
                                                                                  self.info.semantic_ids))
        if self.panoptic_writer is not None:
            self.panoptic_writer.add(result, image_id, stem)

    def add_media(self, annotated: np.ndarray, name: str, video: str | None = None, fps: float = 30.0) -> None:
        """Saves an annotated image as ``name``, or appends it to ``name``.mp4 when it is a frame of ``video``."""
        if video is None:
            cv2.imwrite(str(self.save_dir / name), annotated)
        else:
            self.videos.write(video, self.save_dir / f"{name}.mp4", annotated, fps)

    def close(self) -> None:
        """Finishes the open video and writes the JSON files collected."""
        self.videos.close()
        if self.coco_json:
            (self.save_dir / "predictions.json").write_text(json.dumps(self.coco))
            if self.captions:
                (self.save_dir / "captions.json").write_text(json.dumps(self.captions, indent=1))
        if self.panoptic_writer is not None:
            (self.save_dir / "panoptic.json").write_text(json.dumps(self.panoptic_writer.json()))

