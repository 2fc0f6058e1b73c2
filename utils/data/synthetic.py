"""Deterministic synthetic "shapes" dataset in the real COCO 2017 on-disk layout.

Every image is a two-region scene (a sky-like region above a horizon, a ground region below) with one
to four coloured shapes on it. All four tasks get labels that agree exactly with the pixels:

* ``annotations/instances_<split>.json``: COCO instances (boxes, polygons) with non-contiguous thing ids;
* ``stuffthingmaps/<split>/<id>.png``: COCO-Stuff style semantic maps (``category_id - 1``, 255 unlabeled);
* ``annotations/stuff_<split>.json``: COCO-Stuff style stuff categories (ids in 92..182) and RLEs;
* ``annotations/captions_<split>.json``: five true captions per image (colours, counts, positions);
* ``annotations/panoptic_<split>.json`` + ``annotations/panoptic_<split>/<id>.png``: COCO panoptic (segment
  ids RGB-encoded ``R + 256 G + 256^2 B``): each shape a thing segment, each stuff class one stuff segment,
  the unlabeled horizon void. Written from the same pixels without drawing a random number, so adding them
  left every other file byte-identical.

Shapes are drawn with ``cv2.fillPoly`` (``LINE_8``, no antialiasing) into the image and the semantic map.
The polygon written to the JSON is the exact pixel outline of that drawn region (a polygon along pixel
edges), because ``cv2.fillPoly`` and pycocotools rasterize the same polygon differently (OpenCV fills
pixel centres on the boundary, pycocotools does not): with the outline, ``annToMask`` reproduces the
drawn pixels exactly and ``area``/``bbox`` equal the mask's pixel area and extent. ``polygons="shape"``
writes the drawing polygon itself instead (32-point circles, 10-point stars, ...).

Usage::

    python -m utils.data.synthetic --root ../datasets/shapes --train 800 --val 200 --img-size 320 --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from pycocotools import mask as mask_utils

from utils.tasks import IGNORE_INDEX

# Thing categories: non-contiguous ids like COCO's, so code that confuses ids and indices breaks here too.
THING_CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 6, "name": "triangle", "supercategory": "shape"},
    {"id": 9, "name": "star", "supercategory": "shape"},
    {"id": 12, "name": "ellipse", "supercategory": "shape"},
)
# Stuff categories with their real COCO-Stuff ids and names (stuff range 92..182).
STUFF_CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 106, "name": "clouds", "supercategory": "sky"},
    {"id": 111, "name": "dirt", "supercategory": "ground"},
    {"id": 124, "name": "grass", "supercategory": "plant"},
    {"id": 149, "name": "road", "supercategory": "ground"},
    {"id": 154, "name": "sand", "supercategory": "ground"},
    {"id": 157, "name": "sky-other", "supercategory": "sky"},
    {"id": 173, "name": "wall-other", "supercategory": "wall"},
    {"id": 178, "name": "water-other", "supercategory": "water"},
)
UPPER_STUFF: tuple[str, ...] = ("sky-other", "clouds", "wall-other")  # region above the horizon
LOWER_STUFF: tuple[str, ...] = ("grass", "sand", "road", "water-other", "dirt")  # region below it
# Per stuff class: BGR base colour, pixel-noise std, caption phrase. Phrases avoid colour words so that
# every colour word in a caption refers to a shape.
STUFF_LOOK: dict[str, tuple[tuple[int, int, int], float, str]] = {
    "sky-other": ((230, 195, 140), 3.0, "under a clear sky"),
    "clouds": ((185, 180, 175), 6.0, "under a cloudy sky"),
    "wall-other": ((150, 175, 195), 5.0, "in front of a wall"),
    "grass": ((50, 135, 95), 12.0, "grass"),
    "sand": ((135, 190, 220), 8.0, "sand"),
    "road": ((95, 95, 95), 7.0, "a road"),
    "water-other": ((125, 90, 35), 6.0, "water"),
    "dirt": ((55, 85, 125), 10.0, "dirt"),
}
# Shape colours (BGR), chosen to stay distinguishable from every background above.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (30, 30, 220),
    "green": (20, 215, 20),
    "blue": (215, 40, 20),
    "yellow": (20, 225, 240),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
POSITIONS: tuple[str, ...] = ("on the left", "in the middle", "on the right")  # thirds of the width
MAX_SHAPES = 4
SHAPE_SIZE = (0.12, 0.40)  # shape diameter as a fraction of the image's short side
MIN_SHAPE_PX = 6  # below this a rasterized star or triangle is no longer recognizable
SHAPE_GAP_PX = 2  # minimum distance between shapes, so no polygon touches or hides another
JPEG_QUALITY = 90
FIRST_IMAGE_ID = 1000  # COCO ids never equal list indices; neither do ours
FIRST_STUFF_ANN_ID = 10_000_000
INFO: dict[str, Any] = {
    "description": "yolor-mt synthetic shapes (COCO 2017 layout)",
    "version": "1.0",
    "year": 2017,
    "contributor": "utils.data.synthetic",
    "date_created": "2017/01/01",  # fixed: a timestamp would break byte-identical regeneration
}
LICENSES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"},
)


@dataclass
class _Shape:
    """One drawn shape: its category, colour, exact JSON polygon and pixel statistics."""

    category_id: int
    name: str
    colour: str
    polygon: list[float]  # flat x1, y1, x2, y2, ...
    bbox: list[float]  # x, y, w, h tight around ``polygon``
    area: float  # polygon area


def _position(shape: _Shape, width: int) -> int:
    """Which third of the image width (0 left, 1 middle, 2 right) holds the shape's bbox centre."""
    cx = shape.bbox[0] + shape.bbox[2] / 2
    return min(int(cx * 3 / width), 2)


# ----------------------------------------------------------------------------------------------- geometry
def _shape_vertices(rng: np.random.Generator, name: str, cx: float, cy: float, size: float) -> np.ndarray:
    """Integer ``(K, 2)`` drawing polygon of a shape of diameter ``size`` centred at ``(cx, cy)``."""
    r = size / 2
    rot = rng.uniform(0, 2 * np.pi)
    if name in ("circle", "ellipse"):
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        ry = r if name == "circle" else r * rng.uniform(0.4, 0.65)
        x, y = r * np.cos(t), ry * np.sin(t)
    else:
        n, inner = {"square": (4, 1.0), "triangle": (3, 1.0), "star": (10, rng.uniform(0.4, 0.5))}[name]
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        rr = np.where(np.arange(n) % 2 == 1, r * inner, r) if name == "star" else np.full(n, r)
        x, y = rr * np.cos(t), rr * np.sin(t)
    c, s = np.cos(rot), np.sin(rot)
    pts = np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)
    return np.round(pts).astype(np.int32)


def _pixel_outline(mask: np.ndarray) -> np.ndarray | None:
    """The polygon along pixel edges enclosing a binary mask's pixels, ``(K, 2)`` int corner coordinates.

    Pixel ``(x, y)`` spans ``[x, x+1) x [y, y+1)``, the convention pycocotools rasterizes with, so
    ``annToMask`` of this polygon gives back ``mask``. Traced on a 2x upsampled mask, where the boundary
    pixel centres ``u`` map onto pixel corners as ``ceil(u / 2)``. Returns None when the mask is not a
    single region without holes (then one polygon cannot describe it).
    """
    ys, xs = np.nonzero(mask)
    x0, y0 = xs.min() - 1, ys.min() - 1  # one pixel of margin so the contour never touches the crop edge
    crop = mask[y0 : ys.max() + 2, x0 : xs.max() + 2]
    up = np.repeat(np.repeat(crop, 2, 0), 2, 1)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if len(contours) != 1:  # several regions, or a hole (a child contour)
        return None
    u = contours[0][:, 0, :].astype(np.int64)
    corners = (u + 1) // 2 + np.array([x0, y0])
    keep = np.any(corners != np.roll(corners, 1, 0), axis=1)  # consecutive duplicates
    corners = corners[keep]
    # Drop vertices in the middle of straight runs: the outline only needs its turning points.
    prev, nxt = np.roll(corners, 1, 0), np.roll(corners, -1, 0)
    d1, d2 = corners - prev, nxt - corners
    turning = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0] != 0
    return corners[turning]


def _polygon_area(pts: np.ndarray) -> float:
    """Shoelace area of a ``(K, 2)`` polygon."""
    x, y = pts[:, 0].astype(np.float64), pts[:, 1].astype(np.float64)
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _place_shapes(rng: np.random.Generator, w: int, h: int, exact_polygons: bool) -> list[tuple[_Shape, np.ndarray]]:
    """Samples 1..MAX_SHAPES non-overlapping shapes; returns each with its drawing polygon."""
    short = min(w, h)
    occupied = np.zeros((h, w), np.uint8)
    gap = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * SHAPE_GAP_PX + 1, 2 * SHAPE_GAP_PX + 1))
    shapes: list[tuple[_Shape, np.ndarray]] = []
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        cat = THING_CATEGORIES[int(rng.integers(len(THING_CATEGORIES)))]
        colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
        for _attempt in range(50):  # rejection sampling; a shape that never fits is simply left out
            size = max(rng.uniform(*SHAPE_SIZE) * short, MIN_SHAPE_PX)
            cx, cy = rng.uniform(size / 2 + 1, w - size / 2 - 2), rng.uniform(size / 2 + 1, h - size / 2 - 2)
            pts = _shape_vertices(rng, cat["name"], cx, cy, size)
            if pts.min() < 1 or pts[:, 0].max() > w - 2 or pts[:, 1].max() > h - 2:
                continue  # keep shapes off the image border
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [pts], 1, cv2.LINE_8)
            if (mask & occupied).any():
                continue
            if exact_polygons:
                outline = _pixel_outline(mask)
                if outline is None:
                    continue
                poly = outline
                # What pycocotools will rebuild from the JSON must be exactly the drawn pixels.
                rle = mask_utils.frPyObjects([poly.ravel().astype(np.float64).tolist()], h, w)
                if not np.array_equal(mask_utils.decode(rle)[:, :, 0], mask):
                    continue
            else:
                poly = pts
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            shape = _Shape(
                category_id=cat["id"],
                name=cat["name"],
                colour=colour,
                polygon=[int(v) for v in poly.ravel()],
                bbox=[int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
                area=_polygon_area(poly),
            )
            shapes.append((shape, pts))
            occupied |= cv2.dilate(mask, gap)
            break
    return shapes


# ----------------------------------------------------------------------------------------------- drawing
def _texture(rng: np.random.Generator, w: int, h: int, bgr: Sequence[int], noise: float) -> np.ndarray:
    """``h x w x 3`` float32 texture: jittered base colour, low-frequency shading and pixel noise."""
    base = np.asarray(bgr, np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
    # Shading varies mostly in brightness (shared by the channels) and only a little in hue.
    grid = rng.normal(0, 10, (4, 4, 1)) + rng.normal(0, 3, (4, 4, 3))
    low = cv2.resize(grid.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return base + low + rng.standard_normal((h, w, 3), dtype=np.float32) * noise


def _render(
    rng: np.random.Generator, w: int, h: int, exact_polygons: bool
) -> tuple[np.ndarray, np.ndarray, list[_Shape], str, str, np.ndarray]:
    """Draws one scene; returns ``(image BGR uint8, semantic uint8, shapes, upper stuff, lower stuff,
    instance map)``: the instance map is int32, ``k + 1`` on the pixels of ``shapes[k]``, 0 elsewhere."""
    upper = UPPER_STUFF[int(rng.integers(len(UPPER_STUFF)))]
    lower = LOWER_STUFF[int(rng.integers(len(LOWER_STUFF)))]
    stuff_id = {c["name"]: c["id"] for c in STUFF_CATEGORIES}
    # Horizon: a slightly tilted line between 25% and 65% of the height.
    yl = int(rng.uniform(0.25, 0.65) * h)
    yr = int(np.clip(yl + rng.uniform(-0.15, 0.15) * h, 0.2 * h, 0.7 * h))
    sem = np.full((h, w), stuff_id[lower] - 1, np.uint8)
    cv2.fillPoly(sem, [np.array([[0, 0], [w - 1, 0], [w - 1, yr], [0, yl]], np.int32)], stuff_id[upper] - 1, cv2.LINE_8)
    cv2.line(sem, (0, yl), (w - 1, yr), IGNORE_INDEX, 1, cv2.LINE_8)  # the horizon itself is unlabeled

    up_tex = _texture(rng, w, h, STUFF_LOOK[upper][0], STUFF_LOOK[upper][1])
    low_tex = _texture(rng, w, h, STUFF_LOOK[lower][0], STUFF_LOOK[lower][1])
    img = np.where((sem == stuff_id[upper] - 1)[..., None], up_tex, low_tex)
    horizon = sem == IGNORE_INDEX
    img[horizon] = (up_tex[horizon] + low_tex[horizon]) / 2  # a blurred seam, as a camera would see it

    placed = _place_shapes(rng, w, h, exact_polygons)
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * 4
    instance_map = np.zeros((h, w), np.int32)
    for k, (shape, pts) in enumerate(placed):
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [pts], 1, cv2.LINE_8)  # the same rasterization that produced the polygon
        m = mask.astype(bool)
        colour = np.asarray(PALETTE[shape.colour], np.float32) + rng.uniform(-15, 15, 3).astype(np.float32)
        img[m] = colour + noise[m]
        cv2.fillPoly(sem, [pts], shape.category_id - 1, cv2.LINE_8)
        instance_map[m] = k + 1
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return img, sem, [s for s, _ in placed], upper, lower, instance_map


# ----------------------------------------------------------------------------------------------- captions
def _a(word: str) -> str:
    """Indefinite article for ``word``."""
    return "an" if word[0] in "aeiou" else "a"


def _count(n: int, noun: str, article: bool = True) -> str:
    """``a red circle`` / ``one star`` / ``two red circles``; counts are spelled out."""
    if n == 1:
        return f"{_a(noun) if article else 'one'} {noun}"
    return f"{NUMBER_WORDS[n]} {noun}s"


def _join(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _grouped(rng: np.random.Generator, keys: list[tuple]) -> list[tuple[tuple, int]]:
    """Counts equal keys; groups in a random order so captions vary."""
    counts: dict[tuple, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    items = list(counts.items())
    return [items[i] for i in rng.permutation(len(items))]


def _captions(rng: np.random.Generator, shapes: list[_Shape], upper: str, lower: str, width: int) -> list[str]:
    """Five different captions, each true for the scene.

    In order: (1) colour/shape inventory, (2) inventory by position (left/middle/right third by bbox
    centre), (3) total count ("<n> shape(s)"), (4) shape counts without colours, (5) a relation:
    the largest shape, one shape above another, or the colours present.
    """
    sky, ground = STUFF_LOOK[upper][2], STUFF_LOOK[lower][2]
    n = len(shapes)
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731

    inv = _join([_count(k, f"{c} {t}") for (c, t), k in _grouped(rng, [(s.colour, s.name) for s in shapes])])
    cap1 = pick([f"{inv} on {ground} {sky}", f"{inv} on {ground}", f"a picture of {inv} on {ground}"])

    pos = [(s.colour, s.name, _position(s, width)) for s in shapes]
    pinv = _join([f"{_count(k, f'{c} {t}')} {POSITIONS[p]}" for (c, t, p), k in _grouped(rng, pos)])
    cap2 = pick([pinv, f"on {ground}, {pinv}", f"{pinv} {sky}"])

    total = _count(n, "shape", article=False)
    there = f"there {'is' if n == 1 else 'are'} {total} in the picture"
    cap3 = pick([f"{total} on {ground}", there, f"{total} on {ground} {sky}"])

    tinv = _join([_count(k, t, article=False) for (t,), k in _grouped(rng, [(s.name,) for s in shapes])])
    cap4 = pick([f"{tinv} on {ground}", f"an image with {tinv} {sky}"])

    options: list[str] = []
    areas = sorted((s.area for s in shapes), reverse=True)
    if n == 1:
        s = shapes[0]
        options.append(f"a single {s.colour} {s.name} {POSITIONS[_position(s, width)]}")
    elif areas[0] > areas[1]:
        s = max(shapes, key=lambda s: s.area)
        options.append(f"the largest shape is {_a(s.colour)} {s.colour} {s.name}")
    for a in shapes:  # "above": a's box ends before b's starts, so it holds for any reading
        for b in shapes:
            if a.bbox[1] + a.bbox[3] < b.bbox[1]:
                options.append(f"{_a(a.colour)} {a.colour} {a.name} above {_a(b.colour)} {b.colour} {b.name}")
    colours = sorted({s.colour for s in shapes}, key=list(PALETTE).index)
    if n == 1:
        options.append(f"{_a(colours[0])} {colours[0]} shape on {ground}")
    else:
        options.append(f"{_join(colours)} shapes on {ground}")
    cap5 = pick(options)
    return [cap1, cap2, cap3, cap4, cap5]


# ----------------------------------------------------------------------------------------------- writing
def _write_bytes(path: Path, data: bytes) -> None:
    """Writes via a temporary file and a rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    """Compact, key-order-preserving JSON (byte-identical for identical content)."""
    _write_bytes(path, json.dumps(obj, separators=(",", ":")).encode())


def _stuff_annotations(sem: np.ndarray, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """COCO-Stuff style RLE annotations, one per stuff class present in ``sem``."""
    anns = []
    for cat in STUFF_CATEGORIES:
        m = np.asfortranarray((sem == cat["id"] - 1).astype(np.uint8))
        if not m.any():
            continue
        rle = mask_utils.encode(m)
        anns.append(
            {
                "id": first_id + len(anns),
                "image_id": image_id,
                "category_id": cat["id"],
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    return anns


PANOPTIC_ID_STRIDE = 1000  # segment id = category_id * 1000 + instance number: ids above 255 use two bytes


def _panoptic(sem: np.ndarray, instance_map: np.ndarray, shapes: list[_Shape]) -> tuple[np.ndarray, list[dict]]:
    """One image's COCO panoptic ``(RGB PNG pixels, segments_info)``: the shapes as thing segments, each stuff
    class of ``sem`` as one stuff segment, the unlabeled pixels (255) void (id 0)."""
    ids = np.zeros(sem.shape, np.int64)
    info = []
    regions = [(PANOPTIC_ID_STRIDE * s.category_id + k + 1, s.category_id, instance_map == k + 1)
               for k, s in enumerate(shapes)]
    regions += [(PANOPTIC_ID_STRIDE * c["id"], c["id"], sem == c["id"] - 1) for c in STUFF_CATEGORIES]
    for seg_id, cat_id, m in regions:
        if not m.any():
            continue
        ids[m] = seg_id
        ys, xs = np.nonzero(m)
        info.append({"id": seg_id, "category_id": cat_id, "iscrowd": 0,
                     "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                     "area": int(m.sum())})
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    return rgb, info


# ----------------------------------------------------------------------------------------------- ground truth
# Colour words beyond PALETTE that a caption of another shapes dataset may use (BGR), so its objects can be
# named from their pixels too; each is far from every PALETTE colour, so ours are never read as one of them.
OTHER_COLOURS: dict[str, tuple[int, int, int]] = {
    "orange": (0, 140, 255), "purple": (128, 0, 128), "pink": (180, 105, 255), "brown": (40, 60, 130),
    "gray": (128, 128, 128), "cyan": (255, 255, 0),
}


def nearest_colour(bgr: Sequence[float], palette: dict[str, tuple[int, int, int]] | None = None) -> str:
    """The name of the ``palette`` colour (default: PALETTE and OTHER_COLOURS) nearest ``bgr`` in BGR space."""
    palette = palette or (PALETTE | OTHER_COLOURS)
    x = np.asarray(bgr, np.float64)
    return min(palette, key=lambda name: float(np.sum((np.asarray(palette[name], np.float64) - x) ** 2)))


def inner_median(img: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The median pixel of ``img`` inside ``mask`` one pixel in from its edge (where JPEG blends a shape with the
    background); ``None`` when the shape is too thin to keep any pixel."""
    pixels = img[cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0]
    return np.median(pixels, 0) if len(pixels) else None


def _instance_colour(img: np.ndarray, ann: dict[str, Any]) -> str:
    """An instance's colour word: the annotation's own ``colour`` / ``color`` when it has one, else the palette
    colour nearest the median of its pixels (one pixel in from its edge, where JPEG blends it with the
    background; all of them when the shape is too thin for that)."""
    named = ann.get("colour") or ann.get("color")
    if isinstance(named, str):
        return named
    h, w = img.shape[:2]
    seg = ann["segmentation"]
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else (
        mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg)
    mask = mask_utils.decode(rle).astype(bool)
    median = inner_median(img, mask)
    if median is None and mask.any():  # too thin to erode: all of its pixels
        median = np.median(img[mask], 0)
    return nearest_colour(median) if median is not None else "unknown"


def scene_truths(images: str | Path, instances: str | Path) -> dict[int, tuple[tuple[str, str], ...]]:
    """Every image's objects as ``(colour, category name)`` pairs, read from a split's instances JSON and images.

    The ground truth of the caption-content measure (:mod:`utils.eval.metrics.caption_content`): the names come
    from the annotations' categories, the colours from an annotation's ``colour`` field when it has one, else
    from the instance's pixels (:func:`nearest_colour`), so it needs neither the generator's random state nor the
    captions. Crowd annotations are skipped; an image without annotations has no objects.
    """
    data = json.loads(Path(instances).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    anns: dict[int, list[dict[str, Any]]] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            anns.setdefault(a["image_id"], []).append(a)
    out = {}
    for im in data["images"]:
        img = cv2.imread(str(Path(images) / im["file_name"]), cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(Path(images) / im["file_name"])
        out[int(im["id"])] = tuple((_instance_colour(img, a), names[a["category_id"]]) for a in anns.get(im["id"], []))
    return out


def generate(
    root: str | Path,
    splits: dict[str, int] = {"train2017": 800, "val2017": 200},  # noqa: B006 - read only
    img_size: int = 320,
    seed: int = 0,
    polygons: str = "pixel",
) -> Path:
    """Writes the synthetic dataset under ``root`` and returns ``root`` as a Path.

    Args:
        root: dataset directory; ``images/``, ``annotations/`` (with ``panoptic_<split>/``) and
            ``stuffthingmaps/`` are created in it.
        splits: split name -> number of images, e.g. ``{"train2017": 800, "val2017": 200}``.
        img_size: long side of every image; the short side is random in ``[0.6, 1.0] * img_size`` and
            the orientation random, so images differ in size and aspect ratio.
        seed: same seed and arguments -> byte-identical JSON and PNG files (JPEG too for the same OpenCV).
            Each image has its own generator seeded by ``(seed, split name, index)``, so a split's content
            does not depend on the other splits; only the ids are numbered across splits.
        polygons: ``"pixel"`` (default) writes each instance as the exact pixel outline of the drawn shape,
            so pycocotools' ``annToMask`` equals the drawn pixels and ``area`` the pixel count;
            ``"shape"`` writes the drawing polygon itself (fewer vertices, but pycocotools then
            rasterizes about half a boundary pixel less than was drawn).
    """
    if polygons not in ("pixel", "shape"):
        raise ValueError(f"polygons must be 'pixel' or 'shape', not {polygons!r}")
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    id_rng = np.random.default_rng([seed, 0x1D5])  # gaps between image ids, as in COCO
    image_id, ann_id, cap_id, stuff_ann_id = FIRST_IMAGE_ID, 1, 1, FIRST_STUFF_ANN_ID
    for split, n in splits.items():
        img_dir, sem_dir = root / "images" / split, root / "stuffthingmaps" / split
        pan_dir = root / "annotations" / f"panoptic_{split}"
        for d in (img_dir, sem_dir, pan_dir):
            d.mkdir(parents=True, exist_ok=True)
        split_key = zlib.crc32(split.encode())  # stable across runs, unlike hash()
        images, instances, captions, stuff, panoptic = [], [], [], [], []
        for i in range(n):
            rng = np.random.default_rng([seed, split_key, i])
            long, short = img_size, int(round(img_size * rng.uniform(0.6, 1.0)))
            w, h = (long, short) if rng.random() < 0.5 else (short, long)
            img, sem, shapes, upper, lower, instance_map = _render(rng, w, h, polygons == "pixel")
            name = f"{image_id:012d}"
            jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
            _write_bytes(img_dir / f"{name}.jpg", jpg.tobytes())
            _write_bytes(sem_dir / f"{name}.png", cv2.imencode(".png", sem)[1].tobytes())
            pan_rgb, segments_info = _panoptic(sem, instance_map, shapes)
            _write_bytes(pan_dir / f"{name}.png", cv2.imencode(".png", pan_rgb[..., ::-1])[1].tobytes())
            panoptic.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments_info})
            images.append({"id": image_id, "file_name": f"{name}.jpg", "width": w, "height": h, "license": 1})
            for s in shapes:
                instances.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": s.category_id,
                        "segmentation": [s.polygon],
                        "area": s.area,
                        "bbox": s.bbox,
                        "iscrowd": 0,
                    }
                )
                ann_id += 1
            for c in _captions(rng, shapes, upper, lower, w):
                captions.append({"id": cap_id, "image_id": image_id, "caption": c})
                cap_id += 1
            anns = _stuff_annotations(sem, image_id, stuff_ann_id)
            stuff += anns
            stuff_ann_id += len(anns)
            image_id += 1 + int(id_rng.integers(0, 3))
        common = {"info": INFO, "licenses": list(LICENSES), "images": images}
        ann_dir = root / "annotations"
        _write_json(ann_dir / f"captions_{split}.json", {**common, "annotations": captions})
        _write_json(ann_dir / f"stuff_{split}.json", {**common, "annotations": stuff, "categories": list(STUFF_CATEGORIES)})
        pan_cats = [{**c, "isthing": 1} for c in THING_CATEGORIES] + [{**c, "isthing": 0} for c in STUFF_CATEGORIES]
        _write_json(ann_dir / f"panoptic_{split}.json", {**common, "annotations": panoptic, "categories": pan_cats})
        # Instances last: its presence marks the split as complete.
        instances_json = {**common, "annotations": instances, "categories": list(THING_CATEGORIES)}
        _write_json(ann_dir / f"instances_{split}.json", instances_json)
    return root


def write_data_yaml(root: str | Path, yaml_path: str | Path, splits: Sequence[str] = ("train2017", "val2017")) -> None:
    """Writes a data yaml (project convention) pointing at a dataset made by :func:`generate`.

    Each split gets a key without its year (``train2017`` -> ``train``); ``semantic_categories`` points at
    the stuff JSON of the ``val`` split (the last split if there is none).
    """
    root, yaml_path = Path(root), Path(yaml_path)
    data: dict[str, Any] = {"path": str(root.resolve())}
    keys = {}
    for split in splits:
        key = re.sub(r"\d+$", "", split) or split
        keys[key] = split
        data[key] = {
            "images": f"images/{split}",
            "instances": f"annotations/instances_{split}.json",
            "semantic": f"stuffthingmaps/{split}",
            "captions": f"annotations/captions_{split}.json",
            "panoptic": f"annotations/panoptic_{split}.json",
        }
    data["semantic_categories"] = f"annotations/stuff_{keys.get('val', splits[-1])}.json"
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    # default_flow_style=None: the per-split mappings are written inline, as in the project's yamls.
    _write_bytes(yaml_path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=1 << 16).encode())


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: generate the dataset and optionally its data yaml."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="../datasets/shapes", help="dataset directory")
    ap.add_argument("--train", type=int, default=800, help="images in train2017")
    ap.add_argument("--val", type=int, default=200, help="images in val2017")
    ap.add_argument("--img-size", type=int, default=320, help="long side of the images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--polygons", choices=("pixel", "shape"), default="pixel", help="see generate()")
    ap.add_argument("--yaml", default=None, help="also write a data yaml here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    root = generate(args.root, {"train2017": args.train, "val2017": args.val}, args.img_size, args.seed, args.polygons)
    if args.yaml:
        write_data_yaml(root, Path(args.yaml))
    print(f"wrote {args.train + args.val} images to {root} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
