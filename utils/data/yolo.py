"""Ultralytics YOLO-format splits read into the same :class:`~utils.data.coco.ImageRecord` s as COCO ones.

A split is an image folder or a ``.txt`` list of images (:func:`~utils.data.config.yolo_images`); each image's
labels are in the ``.txt`` that :func:`~utils.data.config.yolo_label_path` names, one object a line, normalized
to 0-1: ``class cx cy w h`` (a box: det) or ``class x1 y1 x2 y2 ...`` (a polygon: det + inst, its box the
polygon's extent). An image without a label file has no objects. Bad lines, class ids outside ``names``,
coordinates outside 0-1 and degenerate boxes or polygons are skipped (or clipped) and counted by file, as COCO
input is; the records go through the same label cache and image checks (:func:`~utils.data.coco.load_split`).
Class ``i`` is category id ``category_ids[i]`` (``i + 1`` for a YOLO-only yaml) in metrics and JSON.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from utils.data.coco import (
    CACHE_VERSION,
    ImageRecord,
    LabelReport,
    clean_polygons,
    inspect_image,
    load_split,
)
from utils.data.config import SplitSpec, yolo_images, yolo_label_path

EDGE_TOL = 0.01  # coordinates this far outside 0-1 are rounding (clipped quietly); beyond, counted


def _stat_line(h: hashlib.blake2b, path: Path) -> None:
    try:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        h.update(f"{path}\0-\n".encode())


def yolo_cache_key(split: SplitSpec, category_ids: list[int], semantic_ids: list[int] | None) -> str:
    """The label cache's key of a YOLO split: every image and label file by path, size and mtime, and the ids."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"yolo {CACHE_VERSION} {category_ids}\n".encode())
    for image in yolo_images(split.images):
        _stat_line(h, image)
        _stat_line(h, yolo_label_path(image))
    return h.hexdigest()


def _image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` of the stored pixels, from the header (JPEG, PNG) or by decoding (other formats)."""
    problem, header = inspect_image(path)
    if problem:
        return None
    if header is not None:
        return header.width, header.height
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if image is None else (image.shape[1], image.shape[0])


def _parse_line(values: list[str], nc: int) -> tuple[int, np.ndarray] | str:
    """``(class, points)`` of one label line (points ``(K, 2)`` normalized: 2 corners of a box, or the
    polygon), or the name of what is wrong with it."""
    try:
        numbers = np.asarray([float(v) for v in values], np.float64)
    except ValueError:
        return "bad label lines"
    if len(numbers) < 5 or (len(numbers) > 5 and len(numbers) % 2 == 0) or not np.isfinite(numbers).all():
        return "bad label lines"
    cls = numbers[0]
    if cls != int(cls) or not 0 <= cls < nc:
        return "class ids outside 'names'"
    if len(numbers) == 5:
        cx, cy, w, h = numbers[1:]
        return int(cls), np.array([[cx - w / 2, cy - h / 2], [cx + w / 2, cy + h / 2]])
    if len(numbers) < 7:
        return "bad label lines"
    return int(cls), numbers[1:].reshape(-1, 2)


def read_labels(label: Path, width: int, height: int, nc: int, report: LabelReport, name: str
                ) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]:
    """Boxes (pixels, x1 y1 x2 y2), class indices and polygons (pixels) of one label file; its problems
    counted in ``report`` under ``name:line``. A missing file is an image without objects."""
    boxes, classes, segments, seen = [], [], [], set()
    try:
        lines = label.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    scale = np.array([width, height], np.float64)
    for n, line in enumerate(lines, 1):
        values = line.split()
        if not values:
            continue
        parsed = _parse_line(values, nc)
        if isinstance(parsed, str):
            report.add(parsed, f"{name}:{n}")
            continue
        if line.strip() in seen:  # Ultralytics drops repeated lines too
            report.add("duplicate label lines (dropped)", f"{name}:{n}")
            continue
        seen.add(line.strip())
        cls, points = parsed
        if (points < -EDGE_TOL).any() or (points > 1 + EDGE_TOL).any():
            report.add("label coordinates outside 0-1 (clipped)", f"{name}:{n}")
        pixels = points.clip(0, 1) * scale
        polys = clean_polygons([pixels.reshape(-1).tolist()], width, height) if len(points) > 2 else []
        if len(points) > 2 and polys is None:
            report.add("degenerate polygons (box kept)", f"{name}:{n}")
        (x1, y1), (x2, y2) = pixels.min(0), pixels.max(0)
        if x2 - x1 < 1 or y2 - y1 < 1:
            report.add("boxes outside the image or degenerate", f"{name}:{n}")
            continue
        boxes.append((x1, y1, x2, y2))
        classes.append(cls)
        segments.append(polys or [])
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64), segments


def image_ids(images: list[Path]) -> list[int]:
    """Each image's id: its numeric file stem (``000000000009.jpg`` -> 9, as Ultralytics' COCO JSON), when every
    stem is a distinct number; else 1, 2, ... in listing order."""
    stems = [p.stem for p in images]
    if all(s.isdigit() for s in stems) and len(set(map(int, stems))) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(images) + 1))


def parse_yolo_split(split: SplitSpec, category_ids: list[int], report: LabelReport) -> list[ImageRecord]:
    """Reads one YOLO split's label files into records (no cache). ``rec.file`` is relative to an images folder,
    absolute for a list's images. An unreadable image is left to :func:`load_split`'s checks (no size: no labels)."""
    images = yolo_images(split.images)
    records = []
    for iid, image in zip(image_ids(images), images):
        file = str(image.relative_to(split.images)) if split.images.is_dir() else str(image)
        rec = ImageRecord(iid, file, 0, 0, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), [])
        size = _image_size(image)
        label = yolo_label_path(image)
        if size is not None:
            rec.width, rec.height = size
            if not label.is_file():
                report.add("images without a label file (no objects)", image.name)
            rec.boxes, rec.classes, rec.segments = read_labels(label, *size, len(category_ids), report, label.name)
        records.append(rec)
    return records


def load_yolo_split(split: SplitSpec, category_ids: list[int], report: LabelReport, use_cache: bool = True,
                    semantic_ids: list[int] | None = None) -> list[ImageRecord]:
    """:func:`~utils.data.coco.load_split` of a YOLO split: the same cache and image checks."""
    return load_split(split, category_ids, report, use_cache, semantic_ids, parse=parse_yolo_split,
                      key_of=yolo_cache_key)


def coco_dict(records: list[ImageRecord], category_ids: list[int], names: list[str]) -> dict:
    """A COCO instances dict of ``records`` (evaluation's ground truth of a YOLO split, and the YOLO -> COCO
    converter's JSON): each object's box, its polygons (the box as one when it has none) and their area."""
    images, annotations = [], []
    for rec in records:
        images.append({"id": int(rec.image_id), "file_name": rec.file, "width": rec.width, "height": rec.height})
        for box, cls, polys in zip(rec.boxes.tolist(), rec.classes.tolist(), rec.segments):
            x1, y1, x2, y2 = box
            if not polys:
                polys = [np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)]
            area = sum(float(cv2.contourArea(p.astype(np.float32))) for p in polys)
            annotations.append({"id": len(annotations) + 1, "image_id": int(rec.image_id),
                                "category_id": int(category_ids[cls]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": area, "iscrowd": 0,
                                "segmentation": [[round(float(v), 2) for v in p.reshape(-1)] for p in polys]})
    categories = [{"id": int(c), "name": n} for c, n in zip(category_ids, names)]
    return {"images": images, "annotations": annotations, "categories": categories}
