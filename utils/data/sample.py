"""The unit of data that flows from the reader through augmentation to collate.

A :class:`Sample` carries every task's labels for one image. A task whose labels the dataset does not
provide is marked absent in ``present`` rather than special-cased, so losses can mask it per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from utils.tasks import TASKS


@dataclass
class Sample:
    """One image with all of its labels, in pixel coordinates of ``image``.

    Attributes:
        image: ``H x W x 3`` uint8 BGR image.
        boxes: ``(N, 4)`` float32 boxes, ``x1 y1 x2 y2`` in pixels.
        classes: ``(N,)`` int64 contiguous class indices (not COCO category ids).
        segments: per instance, a list of polygons, each ``(K, 2)`` float32 ``x y`` pixels.
            ``len(segments) == N``; an instance without a polygon has an empty list.
        semantic: ``H x W`` uint8 map of contiguous semantic indices, ``IGNORE_INDEX`` = unlabeled;
            ``None`` when the dataset has no semantic labels.
        captions: reference sentences for this image (may be empty).
        image_id: the dataset's image id (COCO ``id``), used to write results with original ids.
        path: image file path.
        orig_shape: ``(h, w)`` of the image as read from disk, before any resize.
        present: per task (``TASKS``), whether labels of that task exist for this image.
    """

    image: np.ndarray
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    segments: list[list[np.ndarray]] = field(default_factory=list)
    semantic: np.ndarray | None = None
    captions: list[str] = field(default_factory=list)
    image_id: int = -1
    path: str = ""
    orig_shape: tuple[int, int] = (0, 0)
    present: dict[str, bool] = field(default_factory=lambda: {t: False for t in TASKS})

    def __post_init__(self) -> None:
        if self.orig_shape == (0, 0):
            self.orig_shape = tuple(self.image.shape[:2])

    def __len__(self) -> int:
        return len(self.boxes)

    def select(self, keep: np.ndarray) -> Sample:
        """Keeps only the instances where the boolean/int index ``keep`` selects (in place)."""
        keep = np.asarray(keep)
        idx = np.nonzero(keep)[0] if keep.dtype == bool else keep
        self.boxes = self.boxes[idx]
        self.classes = self.classes[idx]
        self.segments = [self.segments[i] for i in idx] if self.segments else []
        return self
