"""Reads a COCO-layout split into compact per-image label records, with a cache keyed on its inputs.

Parsing instances_train2017.json (450 MB) takes tens of seconds and scanning 118k semantic maps minutes;
the parsed labels are cached next to the images folder (``<images>.cache``) and reused while everything
they were built from is unchanged: the JSON files' contents, the image and semantic-map folders' listings
(names, sizes, mtimes) and the category ids.
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

import cv2
import numpy as np

from utils.data.augment import polygon_area
from utils.data.config import IMAGE_SUFFIXES, DataError, SplitSpec, read_json, semantic_lut
from utils.tasks import IGNORE_INDEX

# 4: image/map headers checked (sizes, EXIF orientation), non-UTF-8 captions; 5: semantic-map values scanned,
# key covers the folders' listings and the semantic ids
CACHE_VERSION = 5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8, CC are not frames
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


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
    # sorted uint8 PNG values present in the semantic map; None when the split has none or it is unreadable
    semantic_values: np.ndarray | None = None


@dataclass
class LabelReport:
    """Everything skipped or repaired while reading labels, by file name, for one summary."""

    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, name: str) -> None:
        self.problems.setdefault(kind, []).append(name)

    def merge(self, other: LabelReport) -> None:
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


def cache_key(split: SplitSpec, category_ids: list[int], semantic_ids: list[int] | None) -> str:
    """The label cache's key: a hash of everything :func:`load_split` stores.

    The annotation JSONs by content (an edit that keeps size and mtime still counts); the image and
    semantic-map folders by listing (name, size, mtime of every file), which decides the missing/corrupt
    images, the map checks and the map values without reading 118k files; and the ids, which decide the
    class indices and which map values have no category.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(str(CACHE_VERSION).encode())
    for f in (split.instances, split.captions):
        h.update(str(f).encode())
        if f is not None and f.is_file():
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    for folder in (split.images, split.semantic):
        h.update(f"\0{folder}\0".encode())
        if folder is not None:
            _hash_listing(h, folder, "")
    h.update(repr((list(category_ids), semantic_ids)).encode())
    return h.hexdigest()


def _hash_listing(h: hashlib.blake2b, folder: Path, prefix: str) -> None:
    """Adds ``folder``'s files (recursively, sorted) with sizes and mtimes to ``h``; a missing one is empty."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                _hash_listing(h, Path(e.path), prefix + e.name + "/")
                continue
            st = e.stat()  # follows a symlinked image: its target's size and mtime are what matter
            h.update(f"{prefix}{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # a dangling link: listed, so that fixing it changes the key
            h.update(f"{prefix}{e.name}\0?\n".encode())


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's first bytes say: stored size and EXIF orientation (1 = display as stored)."""

    width: int
    height: int
    orientation: int = 1


def inspect_image(path: Path) -> tuple[str | None, ImageHeader | None]:
    """``(problem, header)`` from the file's first and last bytes, without decoding pixels.

    ``problem`` is ``None`` for a plausible file; ``header`` is ``None`` for formats whose size is not read
    here (BMP, TIFF, WebP) or a JPEG whose frame header is not found before the scan data.
    """
    try:
        size = path.stat().st_size
    except OSError:
        return "missing image", None
    if size == 0:
        return "empty image file", None
    try:
        with open(path, "rb") as f:
            head = f.read(26)
            if head[:3] == b"\xff\xd8\xff":
                f.seek(-2, os.SEEK_END)
                if f.read(2) != b"\xff\xd9":
                    return "truncated JPEG", None
                return None, _jpeg_header(f)
            if head[:8] == PNG_SIGNATURE:
                # IEND is the last chunk; look in the tail so bytes appended after it are tolerated
                f.seek(-min(size, 4096), os.SEEK_END)
                if b"IEND" not in f.read() or head[12:16] != b"IHDR":
                    return "truncated PNG", None
                return None, ImageHeader(int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))
            if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*") or head[8:12] == b"WEBP":
                return None, None
    except OSError:  # a folder named like an image, a permission problem
        return "unreadable image", None
    return "unknown image format", None


def _jpeg_header(f) -> ImageHeader | None:
    """Walks the JPEG marker segments up to the frame header: stored size and EXIF orientation."""
    f.seek(2)
    orientation = 1
    for _ in range(512):  # real files have a few dozen segments before the frame; bounded for garbage
        if f.read(1) != b"\xff":
            return None
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker or marker[0] in (0xD9, 0xDA):  # end of image / start of scan before any frame
            return None
        m = marker[0]
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # standalone markers carry no length
            continue
        length = int.from_bytes(f.read(2), "big")
        if length < 2:
            return None
        if m in _SOF:
            seg = f.read(5)
            if len(seg) < 5:
                return None
            return ImageHeader(int.from_bytes(seg[3:5], "big"), int.from_bytes(seg[1:3], "big"), orientation)
        if m == 0xE1:
            seg = f.read(length - 2)
            if seg[:6] == b"Exif\x00\x00":
                orientation = _exif_orientation(seg[6:])
        else:
            f.seek(length - 2, os.SEEK_CUR)
    return None


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 of an EXIF TIFF block; 1 when absent or unreadable."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        e = ifd + 2 + 12 * k
        if e + 12 > len(tiff):
            break
        if int.from_bytes(tiff[e:e + 2], order) == 0x0112:
            value = int.from_bytes(tiff[e + 8:e + 10], order)  # a SHORT sits left-justified in the value field
            return value if 1 <= value <= 8 else 1
    return 1


def image_frame(rec: ImageRecord, header: ImageHeader) -> tuple[int, int]:
    """``(width, height)`` of the pixels :meth:`CocoDataset.load` returns for this image.

    The stored pixels, EXIF orientation ignored, unless the JSON gives the rotated size of a non-square
    image: COCO's width/height (and so its boxes) describe the stored pixels, which is what pycocotools
    and PIL without ``exif_transpose`` see, while OpenCV would rotate by default.
    """
    w, h = header.width, header.height
    if header.orientation >= 5 and w != h and (rec.width, rec.height) == (h, w):
        return h, w
    return w, h


def semantic_path(split: SplitSpec, rec: ImageRecord) -> Path:
    """The semantic map of ``rec``: the image's name with ``.png``, in the split's semantic folder."""
    return split.semantic / (rec.file.rsplit(".", 1)[0] + ".png")


def read_semantic_map(png: Path) -> np.ndarray | None:
    """A semantic map as one uint8 channel of PNG values; ``None`` if it cannot be read.

    A colour map keeps its first channel and a 16-bit one is clipped to 0..255 (values above 254 mean
    unlabeled either way), so a map saved with the wrong options still lines up with the category ids.
    """
    m = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    if m is None:
        return None
    if m.ndim == 3:
        m = m[..., 0]
    if m.dtype != np.uint8:
        m = m.clip(0, 255).astype(np.uint8)
    return m


def check_geometry(split: SplitSpec, rec: ImageRecord, header: ImageHeader | None, report: LabelReport) -> None:
    """Counts what :meth:`CocoDataset.load` will repair for this image, and scans its semantic map.

    Done while the label cache is built so that load-time repairs, which happen in DataLoader worker
    processes, still appear in the one summary printed before training. The image is checked from its
    header only; the semantic map is decoded once, to store the values it holds in ``rec.semantic_values``
    (which classes have pixels at all, and which values have no category: see :func:`load_split`).
    """
    if header is not None:
        frame: tuple[int, int] | None = image_frame(rec, header)
        if rec.width and header.orientation != 1 and frame == (header.width, header.height):
            report.add("EXIF-oriented images (tag ignored, stored pixels match the JSON)", rec.file)
        if rec.width and frame != (rec.width, rec.height):
            report.add("images of another size than the JSON's (labels rescaled)", rec.file)
    else:  # a format whose header is not read here: trust the JSON
        frame = (rec.width, rec.height) if rec.width else None
    if split.semantic is None or frame is None:
        return
    png = semantic_path(split, rec)
    problem, _ = inspect_image(png)
    if problem == "missing image":
        report.add("missing semantic maps (no semantic labels)", png.name)
        return
    m = read_semantic_map(png) if problem is None else None
    if m is None:  # a bad header, or one that passed but whose data does not decode
        report.add("unreadable semantic maps (no semantic labels)", png.name)
        return
    if (m.shape[1], m.shape[0]) != frame:
        report.add("semantic maps of the wrong size (resized)", png.name)
    rec.semantic_values = np.flatnonzero(np.bincount(m.ravel(), minlength=256)).astype(np.uint8)


def check_semantic_values(split: SplitSpec, records: list[ImageRecord], semantic_ids: list[int],
                          report: LabelReport) -> None:
    """Counts the maps holding values that map to no semantic class (the loader's LUT sends them to 255).

    Each is named with its values, ``file.png:200,201``: a map written with another id convention (index
    instead of ``category_id - 1``, say) shows here instead of silently training on nothing.
    """
    unknown = semantic_lut(semantic_ids) == IGNORE_INDEX
    unknown[IGNORE_INDEX] = False  # 255 is unlabeled by convention, not a fault
    for rec in records:
        if rec.semantic_values is not None:
            bad = rec.semantic_values[unknown[rec.semantic_values]]
            if len(bad):
                name = semantic_path(split, rec).name
                report.add("semantic maps with values of no category (ignored)", f"{name}:{','.join(map(str, bad))}")


def _load_json_coco(path: Path, report: LabelReport):
    """``(COCO, repaired)`` for ``path``, quietly; a clear error naming the file on bad JSON.

    ``repaired``: the file was not valid UTF-8 and its bad bytes were replaced by U+FFFD. Entries that
    pycocotools' index cannot take (not a mapping, no ``id``/``image_id``) are dropped and counted.
    """
    from pycocotools.coco import COCO

    dataset, repaired = read_json(path)
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images", []), list) \
            or not isinstance(dataset.get("annotations", []), list):
        raise DataError(f"{path}: not a COCO annotation file (no 'images' list)")
    need = ("id", "image_id", "category_id") if "categories" in dataset else ("id", "image_id")
    for key, keys, kind in (("annotations", need, "malformed annotation entries"), ("images", ("id",), "malformed image entries")):
        if key not in dataset:
            continue
        ok = [isinstance(e, dict) and all(isinstance(e.get(k), (int, str)) for k in keys) for e in dataset[key]]
        if not all(ok):  # createIndex would raise a bare KeyError (or TypeError: an unhashable id) on these
            for i, good in enumerate(ok):
                if not good:
                    report.add(kind, f"{path.name}:{key}[{i}]")
            dataset[key] = [e for e, good in zip(dataset[key], ok) if good]
    if not isinstance(dataset.get("categories", []), list) or \
            not all(isinstance(c, dict) and "id" in c for c in dataset.get("categories", [])):
        raise DataError(f"{path}: malformed 'categories' (each needs an 'id')")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, repaired


def clean_polygons(seg, w: int, h: int) -> list[np.ndarray] | None:
    """COCO polygon segmentation -> list of (K, 2) arrays; ``None`` if unusable (RLE or degenerate)."""
    if not isinstance(seg, list):
        return None  # RLE (crowd) annotations carry no polygon
    polys = []
    for p in seg:
        try:
            a = np.asarray(p, dtype=np.float32)
        except (TypeError, ValueError):  # nested wrongly or not numbers
            continue
        if a.ndim != 1 or a.size < 6 or a.size % 2 or not np.isfinite(a).all():
            continue
        a = a.reshape(-1, 2)
        a[:, 0] = a[:, 0].clip(0, w)
        a[:, 1] = a[:, 1].clip(0, h)
        if polygon_area(a) > 1.0:
            polys.append(a)
    return polys or None


def parse_split(split: SplitSpec, category_ids: list[int], report: LabelReport) -> list[ImageRecord]:
    """Reads one split's annotation JSONs into records (no cache)."""
    cat_index = {cid: i for i, cid in enumerate(category_ids)}
    records: dict[int, ImageRecord] = {}
    inst, inst_repaired = _load_json_coco(split.instances, report) if split.instances else (None, False)
    caps, caps_repaired = _load_json_coco(split.captions, report) if split.captions else (None, False)
    if inst_repaired:  # which strings held the bad bytes is unknown; a mangled file_name shows as missing
        report.add("non-UTF-8 JSON files (bytes replaced)", split.instances.name)
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
            polys = clean_polygons(ann.get("segmentation"), rec.width, rec.height)
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
        mangled = 0
        for ann in caps.dataset.get("annotations", []):
            rec = records.get(ann.get("image_id"))
            text = ann.get("caption")
            if rec is None:
                report.add("captions of unknown images", str(ann.get("id")))
            elif not isinstance(text, str) or not text.strip():
                report.add("empty captions", rec.file)
            elif caps_repaired and "\ufffd" in text:
                # skipped, not kept with a hole: the tokenizer would split the mangled word into false
                # fragments, which the head would learn and a metric would score against
                report.add("non-UTF-8 captions (skipped)", rec.file)
                mangled += 1
            else:
                rec.captions.append(" ".join(text.strip().split()))
        if caps_repaired and not mangled:
            report.add("non-UTF-8 JSON files (bytes replaced)", split.captions.name)
    return list(records.values())


def load_split(split: SplitSpec, category_ids: list[int], report: LabelReport, use_cache: bool = True,
               semantic_ids: list[int] | None = None, parse=None, key_of=None) -> list[ImageRecord]:
    """Records of one split, images and semantic maps checked; from the cache when its key is unchanged.

    ``semantic_ids`` (the data's semantic classes) also counts map values of no class; ``None`` skips that.
    ``parse`` / ``key_of``: the split's reader and cache key, :func:`parse_split` and :func:`cache_key` (COCO)
    unless given (``utils.data.yolo`` passes its own, so both formats share the cache and the image checks).
    """
    cache = Path(str(split.images).rstrip("/") + ".cache")
    key = (key_of or cache_key)(split, category_ids, semantic_ids)
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
    records = (parse or parse_split)(split, category_ids, local)
    good = []
    for rec in records:
        problem, header = inspect_image(split.images / rec.file)
        if problem:
            local.add(problem + "s", rec.file)
            continue
        check_geometry(split, rec, header, local)
        good.append(rec)
    if semantic_ids is not None:
        check_semantic_values(split, good, semantic_ids, local)
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
