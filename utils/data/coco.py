"""Reads a COCO-layout split into compact per-image label records, with a cache keyed by file hashes.

Parsing instances_train2017.json (450 MB) takes tens of seconds; the parsed labels are cached next to
the images folder (``<images>.cache``) and reused while the JSON files hash the same.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.data.config import DataError, SplitSpec

CACHE_VERSION = 3
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class ImageRecord:
    """Labels of one image, kept compact (no pixels) so COCO-sized label sets fit in memory."""

    image_id: int
    file: str                      # path relative to the split's images folder
    width: int
    height: int
    boxes: np.ndarray              # (N, 4) float32 x1 y1 x2 y2 in original pixels
    classes: np.ndarray            # (N,) int64 contiguous indices
    segments: list[list[np.ndarray]]  # per instance, polygons (K, 2) float32
    captions: list[str] = field(default_factory=list)


@dataclass
class LabelReport:
    """Everything skipped or repaired while reading labels, by file name, for one summary."""

    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, name: str) -> None:
        self.problems.setdefault(kind, []).append(name)

    def merge(self, other: "LabelReport") -> None:
        for k, v in other.problems.items():
            self.problems.setdefault(k, []).extend(v)

    def summary(self) -> str:
        if not self.problems:
            return "no label problems"
        parts = []
        for kind, names in sorted(self.problems.items()):
            shown = ", ".join(names[:5]) + (f", ... (+{len(names) - 5})" if len(names) > 5 else "")
            parts.append(f"{len(names)} {kind}: {shown}")
        return "; ".join(parts)


def file_hash(files: list[Path | None]) -> str:
    """Content hash of the annotation files (and their names), the cache key."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(CACHE_VERSION).encode())
    for f in files:
        h.update(str(f).encode())
        if f is not None and f.is_file():
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


def image_ok(path: Path) -> str | None:
    """Cheap header check without decoding: ``None`` if plausible, else why not."""
    try:
        size = path.stat().st_size
    except OSError:
        return "missing image"
    if size == 0:
        return "empty image file"
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:3] == b"\xff\xd8\xff":
            f.seek(-2, os.SEEK_END)
            if f.read(2) != b"\xff\xd9":
                return "truncated JPEG"
        elif not (head[:8] == b"\x89PNG\r\n\x1a\n" or head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*")
                  or head[8:12] == b"WEBP"):
            return "unknown image format"
    return None


def _load_json_coco(path: Path):
    """pycocotools COCO for ``path``, quietly, with a clear error naming the file on bad JSON."""
    import json

    from pycocotools.coco import COCO

    try:
        with open(path, "rb") as f:
            dataset = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images", []), list):
        raise DataError(f"{path}: not a COCO annotation file (no 'images' list)")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _polygons(seg, w: int, h: int) -> list[np.ndarray] | None:
    """COCO polygon segmentation -> list of (K, 2) arrays; ``None`` if unusable (RLE or degenerate)."""
    if not isinstance(seg, list):
        return None  # RLE (crowd) annotations carry no polygon
    polys = []
    for p in seg:
        a = np.asarray(p, dtype=np.float32).reshape(-1, 2) if len(p) >= 6 and len(p) % 2 == 0 else None
        if a is None or not np.isfinite(a).all():
            continue
        a[:, 0] = a[:, 0].clip(0, w)
        a[:, 1] = a[:, 1].clip(0, h)
        if _area(a) > 1.0:
            polys.append(a)
    return polys or None


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def parse_split(split: SplitSpec, category_ids: list[int], report: LabelReport) -> list[ImageRecord]:
    """Reads one split's annotation JSONs into records (no cache)."""
    cat_index = {cid: i for i, cid in enumerate(category_ids)}
    records: dict[int, ImageRecord] = {}
    inst = _load_json_coco(split.instances) if split.instances else None
    caps = _load_json_coco(split.captions) if split.captions else None
    source = inst or caps
    if source is not None:
        for img in source.dataset.get("images", []):
            try:
                iid, w, h = int(img["id"]), int(img["width"]), int(img["height"])
                records[iid] = ImageRecord(iid, str(img["file_name"]), w, h, np.zeros((0, 4), np.float32),
                                           np.zeros((0,), np.int64), [])
            except (KeyError, TypeError, ValueError):
                report.add("malformed image entries", str(img)[:60])
    else:  # an images folder with no labels at all
        files = sorted(p for p in split.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for k, p in enumerate(files):
            records[k] = ImageRecord(k, p.name, 0, 0, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), [])
    if inst is not None:
        per_image: dict[int, tuple[list, list, list]] = {}
        for ann in inst.dataset.get("annotations", []):
            rec = records.get(ann.get("image_id"))
            if rec is None:
                report.add("annotations of unknown images", str(ann.get("id")))
                continue
            if ann.get("iscrowd", 0):
                continue  # crowd regions are RLE blobs, not instances (COCOeval ignores them too)
            cid = ann.get("category_id")
            if cid not in cat_index:
                report.add("unknown category ids", f"{rec.file}:{cid}")
                continue
            try:
                x, y, bw, bh = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                report.add("malformed boxes", f"{rec.file}:{ann.get('id')}")
                continue
            x1, y1 = max(x, 0.0), max(y, 0.0)
            x2, y2 = min(x + bw, rec.width), min(y + bh, rec.height)
            if not np.isfinite([x1, y1, x2, y2]).all() or x2 - x1 < 1 or y2 - y1 < 1:
                report.add("boxes outside the image or degenerate", f"{rec.file}:{ann.get('id')}")
                continue
            polys = _polygons(ann.get("segmentation"), rec.width, rec.height)
            if ann.get("segmentation") and polys is None:
                report.add("degenerate polygons (box kept)", f"{rec.file}:{ann.get('id')}")
            b, c, s = per_image.setdefault(rec.image_id, ([], [], []))
            b.append((x1, y1, x2, y2))
            c.append(cat_index[cid])
            s.append(polys or [])
        for iid, (b, c, s) in per_image.items():
            rec = records[iid]
            rec.boxes = np.asarray(b, np.float32).reshape(-1, 4)
            rec.classes = np.asarray(c, np.int64)
            rec.segments = s
    if caps is not None:
        for ann in caps.dataset.get("annotations", []):
            rec = records.get(ann.get("image_id"))
            text = ann.get("caption")
            if rec is None:
                report.add("captions of unknown images", str(ann.get("id")))
            elif not isinstance(text, str) or not text.strip():
                report.add("empty captions", rec.file)
            else:
                rec.captions.append(" ".join(text.strip().split()))
    return list(records.values())


def load_split(split: SplitSpec, category_ids: list[int], report: LabelReport, use_cache: bool = True) -> list[ImageRecord]:
    """Records of one split, from the cache when the annotation files hash the same, images checked."""
    cache = Path(str(split.images).rstrip("/") + ".cache")
    key = file_hash([split.instances, split.captions]) + str(category_ids)
    if use_cache and cache.is_file():
        try:
            with open(cache, "rb") as f:
                cached = pickle.load(f)
            if cached.get("key") == key:
                report.merge(cached["report"])
                return cached["records"]
        except Exception:  # a stale or foreign cache is rebuilt, never trusted
            pass
    local = LabelReport()
    records = parse_split(split, category_ids, local)
    good = []
    for rec in records:
        problem = image_ok(split.images / rec.file)
        if problem:
            local.add(problem + "s", rec.file)
        else:
            good.append(rec)
    report.merge(local)
    if use_cache:
        tmp = cache.with_suffix(".cache.tmp")
        try:
            with open(tmp, "wb") as f:
                pickle.dump({"key": key, "records": good, "report": local}, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, cache)
        except OSError as e:
            warnings.warn(f"label cache not written ({cache}): {e}", stacklevel=2)
    return good
