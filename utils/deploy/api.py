"""The Python API: one object that loads any deployable format and turns images, folders, globs, videos and
streams into :class:`~utils.deploy.predictor.Results`, the way YOLOv5's ``torch.hub`` models and Ultralytics'
``YOLO()`` are used::

    from utils.deploy.api import YOLOR
    model = YOLOR("best.pt")                       # or best.onnx: every format load_backend knows
    for r in model("images/", conf=0.3, tasks=("det", "inst")):
        print(r.class_names, r.boxes, r.caption)
        r.save(f"out/{r.image_id}.jpg")            # r.plot() is the same picture as a BGR array
    for r in model("video.mp4", stream=True):      # a generator: one frame in memory at a time
        ...

It runs :class:`~utils.deploy.predictor.Predictor`, so results are detect.py's, frame for frame.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from utils.data.sources import LoadSource
from utils.deploy.backends import load_backend
from utils.deploy.interface import ModelInfo
from utils.deploy.predictor import Predictor, Results
from utils.ops.options import PredictOptions
from utils.ops.track import ByteTracker

__all__ = ["YOLOR", "Source", "PredictOptions"]  # PredictOptions: for options= of a call

Source = str | Path | int | np.ndarray | Sequence[str | Path | np.ndarray]
# (path or None, BGR image, index in its video or None); what Predictor needs to name each result
_Item = tuple[str | None, np.ndarray, int | None]
# the keywords of calling a model: Ultralytics' names of PredictOptions fields, and the rest of a run
_OPTION_KEYWORDS = {"conf": "conf_thres", "iou": "iou_thres", "max_det": "max_det", "classes": "classes",
                    "agnostic": "agnostic"}
_RUN_KEYWORDS = ("imgsz", "tasks", "beam", "vid_stride", "tracker")


class YOLOR:
    """A yolor-mt model from a ``.pt`` checkpoint, an exported ``.onnx`` or any other format
    :func:`~utils.deploy.backends.load_backend` reads. Nothing is ever downloaded.

    Args:
        weights: the model file (or export folder, for formats stored as one).
        device: ``""`` (CUDA when available), ``"cpu"``, ``"0"``, ...
        half: FP16 inference (CUDA ``.pt`` models; an exported graph keeps its precision).
    Raises:
        FileNotFoundError: ``weights`` does not exist.
    """

    def __init__(self, weights: str | Path, device: str = "", half: bool = False):
        weights = Path(weights)
        if not str(weights) or not weights.exists():  # before load_backend: the message says nothing is fetched
            raise FileNotFoundError(f"weights not found: '{weights}' (yolor-mt never downloads weights: give the "
                                    "path of a trained .pt checkpoint or an exported model)")
        self.weights = weights
        self.backend = load_backend(weights, device, half)

    @property
    def info(self) -> ModelInfo:
        """What the model knows of its data: class names, category ids, tasks, stride, vocabulary."""
        return self.backend.info

    @property
    def names(self) -> list[str]:
        """Class names by contiguous class index."""
        return self.info.names

    @property
    def tasks(self) -> list[str]:
        """The model's heads (``det``, ``inst``, ``sem``, ``cap``)."""
        return list(self.info.tasks)

    def __repr__(self) -> str:
        return f"YOLOR({self.weights}, {self.backend.name}, tasks={','.join(self.tasks)}, {len(self.names)} classes)"

    def predictor(self, imgsz: int | Sequence[int] = 640, options: PredictOptions = PredictOptions(),
                  tasks: Sequence[str] | None = None, beam: int = 1, tracker: ByteTracker | None = None) -> Predictor:
        """The :class:`~utils.deploy.predictor.Predictor` for these options (cheap: the backend is shared)."""
        return Predictor(self.backend, imgsz if isinstance(imgsz, int) else list(imgsz), options,
                         list(tasks) if tasks is not None else None, beam, tracker)

    def __call__(self, source: Source, stream: bool = False, options: PredictOptions | None = None,
                 **kwargs) -> list[Results] | Iterator[Results]:
        """One :class:`~utils.deploy.predictor.Results` per image or video frame of ``source``.

        Args:
            source: a path (image, folder, glob, video, ``.txt`` list), a webcam index or stream URL, a BGR
                ``np.ndarray`` frame, or a list of any of these but indices and URLs.
            stream: return a generator (frames are read and predicted as it is iterated: videos and streams
                of any length in constant memory) instead of a list.
            options: the thresholds and limits as one :class:`~utils.ops.options.PredictOptions` (default: its
                defaults); the keywords below change single fields of it.
        Keyword Args:
            conf, iou, max_det, classes, agnostic: Ultralytics' names of the options' ``conf_thres``,
                ``iou_thres``, ``max_det``, ``classes`` (contiguous indices to keep) and ``agnostic``; they win
                over ``options``.
            imgsz: inference size, one value or ``(h, w)`` (default 640, rounded up to the stride; a fixed-size
                export uses its own).
            tasks: the heads to run post-processing for, e.g. ``("det", "inst")`` (default: all); the others'
                fields stay ``None`` in the results.
            beam: caption beam width (default 1 = greedy).
            vid_stride: use every ``vid_stride``-th frame of videos and streams (default 1).
            tracker: track ids across video frames with this tracker (what :meth:`track` passes).
        Raises:
            TypeError: a keyword not listed above.
            utils.data.sources.SourceError: an input that cannot be read (checked before any frame runs).
            ValueError: a task the model has no head for.
        """
        unknown = sorted(set(kwargs) - set(_OPTION_KEYWORDS) - set(_RUN_KEYWORDS))
        if unknown:
            raise TypeError(f"YOLOR() got unexpected keyword argument(s) {', '.join(unknown)} (it takes "
                            f"{', '.join((*_OPTION_KEYWORDS, *_RUN_KEYWORDS))} and options=)")
        changes = {_OPTION_KEYWORDS[k]: v for k, v in kwargs.items() if k in _OPTION_KEYWORDS}
        options = replace(options if options is not None else PredictOptions(), **changes)
        run = {k: v for k, v in kwargs.items() if k in _RUN_KEYWORDS}
        predictor = self.predictor(run.get("imgsz", 640), options, run.get("tasks"), run.get("beam", 1),
                                   run.get("tracker"))
        items = self._items(source, run.get("vid_stride", 1))  # sources are opened now, so bad input fails at the call
        results = self._predict(predictor, items)
        return results if stream else list(results)

    predict = __call__  # Ultralytics' spelling

    def track(self, source: Source, stream: bool = False, conf: float = 0.1, track_thresh: float = 0.5,
              track_buffer: int = 30, **kwargs) -> list[Results] | Iterator[Results]:
        """Like calling the model, with ByteTrack ids across the frames of each video or stream
        (``Results.track_ids``; detections without a confirmed track are dropped, with their masks), as
        ``detect.py --track``. ``conf`` defaults to 0.1 so low-score detections reach ByteTrack's second
        association stage; ``track_thresh`` splits high from low scores; lost tracks are kept
        ``track_buffer`` frames. Every video starts its own ids; still images are returned untracked."""
        return self(source, stream, conf=conf, tracker=ByteTracker(track_thresh, track_buffer), **kwargs)

    @staticmethod
    def _items(source: Source, vid_stride: int) -> Iterable[_Item]:
        """``source`` as frames, lazily decoded; every path is resolved and every video probed here."""
        if isinstance(source, np.ndarray):
            source = [source]
        if isinstance(source, (str, Path, int)):
            return _frames(LoadSource(source, vid_stride))
        parts: list[np.ndarray | LoadSource] = [s if isinstance(s, np.ndarray) else LoadSource(s, vid_stride)
                                               for s in source]
        for s in parts:
            if isinstance(s, np.ndarray) and (s.ndim != 3 or s.shape[2] != 3 or s.dtype != np.uint8):
                raise ValueError(f"an array source must be an (h, w, 3) uint8 BGR image, got {s.dtype} {s.shape}")
        # arrays are named image0, image1, ... by their place in the list (Ultralytics' names), so their COCO
        # image ids differ
        return (item for i, s in enumerate(parts)
                for item in ([(f"image{i}", s, None)] if isinstance(s, np.ndarray) else _frames(s)))

    @staticmethod
    def _predict(predictor: Predictor, items: Iterable[_Item]) -> Iterator[Results]:
        """One frame per batch, as detect.py runs, so both give the same numbers."""
        for path, image, index in items:
            yield predictor([image], [path], [index])[0][0]


def _frames(source: LoadSource) -> Iterator[_Item]:
    """A source's frames as items: videos and streams keep their frame index, images get ``None``."""
    for f in source:
        yield f.path, f.image, (f.index if f.video is not None else None)
