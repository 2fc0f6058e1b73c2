"""YOLOv5/YOLOv7-style augmentations that move the image and every task's labels together.

Coordinates are continuous pixel coordinates in which pixel ``(col i, row j)`` covers
``[i, i+1) x [j, j+1)`` (the COCO convention), so an ``H x W`` image spans ``[0, W] x [0, H]``.
In this convention a resize by ``s`` is exactly ``x -> s * x`` and a horizontal flip is exactly
``x -> W - x``. OpenCV's warps address pixel centres instead, so :func:`random_perspective` hands
OpenCV the matrix conjugated by a half-pixel shift: the labels get exactly the transform the pixels get.

Every function returns a new :class:`Sample` and leaves its input (arrays included) untouched, except
:func:`augment_hsv`, which edits an image in place. Randomness comes only from the
``np.random.Generator`` passed in, so a pipeline seeded with the same generator state is reproducible.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import cv2
import numpy as np

from utils.data.sample import Sample
from utils.ops.letterbox import FILL, RESIZE_NEAREST, Letterbox, letterbox_image
from utils.tasks import IGNORE_INDEX, TASKS

# Centre-aligned nearest neighbour for resizes; plain INTER_NEAREST samples with a half-pixel bias.
_MIN_POLY_AREA = 1e-3  # px^2; below this a clipped polygon is a sliver on the border


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _replace(sample: Sample, **changes) -> Sample:
    """A new Sample; ``present``/``captions`` are copied so the input never aliases the output."""
    changes.setdefault("present", dict(sample.present))
    changes.setdefault("captions", list(sample.captions))
    return dataclasses.replace(sample, **changes)


def _segments_of(sample: Sample) -> list[list[np.ndarray]]:
    """Per-instance polygon lists; an empty ``segments`` means no instance has polygons."""
    n = len(sample.boxes)
    if len(sample.segments) == n:
        return sample.segments
    if not sample.segments:
        return [[] for _ in range(n)]
    raise ValueError(f"Sample has {n} boxes but {len(sample.segments)} segment lists")


def _map_segments(segments: list[list[np.ndarray]],
                  fn: Callable[[np.ndarray], np.ndarray]) -> list[list[np.ndarray]]:
    """Applies ``fn`` to every polygon (as float64), returning float32 copies."""
    return [[fn(np.asarray(p, np.float64)).astype(np.float32) for p in polys] for polys in segments]


def _transform_points(points: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Applies the 3x3 homography ``M`` to ``(K, 2)`` points."""
    xy = np.asarray(points, np.float64) @ M[:2, :2].T + M[:2, 2]
    if M[2, 0] != 0 or M[2, 1] != 0 or M[2, 2] != 1:
        w = np.asarray(points, np.float64) @ M[2, :2] + M[2, 2]
        # Points behind the projection centre only occur with extreme perspective; keep them finite.
        w = np.where(np.abs(w) < 1e-6, 1e-6, w)
        xy = xy / w[:, None]
    return xy


def polygon_area(poly: np.ndarray) -> float:
    """Unsigned shoelace area of a ``(K, 2)`` polygon."""
    if len(poly) < 3:
        return 0.0
    x, y = np.asarray(poly, np.float64).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _clip_half_plane(poly: np.ndarray, axis: int, bound: float, keep_above: bool) -> np.ndarray:
    """One Sutherland-Hodgman pass: keeps the part of ``poly`` on one side of ``coord[axis] = bound``."""
    c = poly[:, axis]
    inside = c >= bound if keep_above else c <= bound
    if inside.all():
        return poly
    if not inside.any():
        return poly[:0]
    nxt = np.roll(poly, -1, axis=0)
    crossing = inside != np.roll(inside, -1)
    denom = nxt[:, axis] - c
    t = np.divide(bound - c, denom, out=np.zeros_like(c), where=crossing)
    inter = poly + t[:, None] * (nxt - poly)
    inter[crossing, axis] = bound  # exact, no round-off past the bound
    # Edge i -> i+1 emits vertex i if inside, then the crossing point if it crosses: cyclic order kept.
    pts = np.stack((poly, inter), 1)
    return pts[np.stack((inside, crossing), 1)]


def clip_polygon(poly: np.ndarray, width: float, height: float) -> np.ndarray:
    """Exactly clips a polygon (``(K, 2)``, any orientation, concave allowed) to ``[0, W] x [0, H]``.

    Sutherland-Hodgman against the four image edges; a concave polygon cut into several pieces comes
    back as one polygon joined by zero-width edges along the border, which rasterizes to the same area.
    Returns ``(M, 2)`` float32, ``M == 0`` when nothing is left.
    """
    p = np.asarray(poly, np.float64).reshape(-1, 2)
    for axis, bound, keep_above in ((0, 0.0, True), (0, float(width), False),
                                    (1, 0.0, True), (1, float(height), False)):
        if len(p) == 0:
            break
        p = _clip_half_plane(p, axis, bound, keep_above)
    if len(p):  # drop repeated consecutive vertices (a vertex exactly on an edge is emitted twice)
        p = p[np.any(np.abs(p - np.roll(p, -1, axis=0)) > 1e-9, axis=1)]
    return p.astype(np.float32)


def _clip_polygons(polys: list[np.ndarray], width: float, height: float) -> list[np.ndarray]:
    """Clips each polygon to the image and drops those that became empty (or a zero-area sliver)."""
    out = []
    for p in polys:
        c = clip_polygon(p, width, height)
        if len(c) >= 3 and polygon_area(c) > _MIN_POLY_AREA:
            out.append(c)
    return out


def _tight_box(polys: list[np.ndarray]) -> np.ndarray:
    """``x1 y1 x2 y2`` of all points of ``polys`` (zeros when empty, which the filters then drop)."""
    if not polys:
        return np.zeros(4, np.float32)
    pts = np.concatenate(polys, 0)
    return np.concatenate((pts.min(0), pts.max(0))).astype(np.float32)


def box_candidates(box1: np.ndarray, box2: np.ndarray, wh_thr: float = 2, ar_thr: float = 100,
                   area_thr: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """YOLOv5's filter: which augmented boxes ``box2`` to keep, given the pre-augment ``box1`` (scaled).

    Both are ``(N, 4)`` xyxy. Keeps boxes wider and taller than ``wh_thr`` px, with aspect ratio below
    ``ar_thr`` and at least ``area_thr`` of the reference area left. Returns an ``(N,)`` bool mask.
    """
    w1, h1 = box1[:, 2] - box1[:, 0], box1[:, 3] - box1[:, 1]
    w2, h2 = box2[:, 2] - box2[:, 0], box2[:, 3] - box2[:, 1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def _scale_translate(sample: Sample, image: np.ndarray, semantic: np.ndarray | None,
                     sx: float, sy: float, dx: float, dy: float) -> Sample:
    """New Sample with ``image``/``semantic`` and labels mapped by ``x -> sx*x + dx, y -> sy*y + dy``."""
    boxes = sample.boxes.reshape(-1, 4).astype(np.float64) * [sx, sy, sx, sy] + [dx, dy, dx, dy]
    segments = _map_segments(_segments_of(sample), lambda p: p * [sx, sy] + [dx, dy])
    return _replace(sample, image=image, semantic=semantic, boxes=boxes.astype(np.float32).reshape(-1, 4),
                    classes=sample.classes.copy(), segments=segments)


# --------------------------------------------------------------------------------------------------
# resizing
# --------------------------------------------------------------------------------------------------
def letterbox(sample: Sample, new_shape: int | tuple[int, int], color: tuple[int, int, int] = (FILL, FILL, FILL),
              scaleup: bool = True, auto: bool = False, stride: int = 32,
              long_side: int | None = None) -> tuple[Sample, Letterbox]:
    """:func:`~utils.ops.letterbox.letterbox_image` of a whole ``Sample``: its image and semantic map, and its
    boxes and polygons moved with the pixels.

    Returns ``(new_sample, Letterbox)``; ``orig_shape`` is the shape of ``sample.image``. The labels use the exact
    per-axis scale of the resized pixels (:meth:`Letterbox.scales`), which differs from ``ratio`` only by the
    rounding of the resized size (< 0.5 px of the resized image). The input is not modified.
    """
    image, semantic, lb = letterbox_image(sample.image, new_shape, color, scaleup, auto, stride, sample.semantic,
                                       long_side=long_side)
    sx, sy = lb.scales()
    return _scale_translate(sample, image, semantic, sx, sy, int(lb.pad[0]), int(lb.pad[1])), lb


def load_resized(sample: Sample, img_size: int) -> Sample:
    """Resizes so that the long side equals ``img_size`` (how YOLOv5 loads mosaic tiles).

    Image ``INTER_LINEAR``, semantic map nearest neighbour. Returns a new Sample with copied arrays
    (even when no resize is needed), so callers may edit it in place.
    """
    h, w = sample.image.shape[:2]
    r = img_size / max(h, w)
    new_w, new_h = max(1, int(round(w * r))), max(1, int(round(h * r)))
    if (new_w, new_h) == (w, h):
        sem = None if sample.semantic is None else sample.semantic.copy()
        return _scale_translate(sample, sample.image.copy(), sem, 1.0, 1.0, 0.0, 0.0)
    image = cv2.resize(sample.image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    sem = None if sample.semantic is None else cv2.resize(sample.semantic, (new_w, new_h),
                                                          interpolation=RESIZE_NEAREST)
    return _scale_translate(sample, image, sem, new_w / w, new_h / h, 0.0, 0.0)


# --------------------------------------------------------------------------------------------------
# mosaic
# --------------------------------------------------------------------------------------------------
def _has_sem(s: Sample) -> bool:
    return s.semantic is not None and bool(s.present.get("sem", False))


def mosaic4(samples: list[Sample], img_size: int, rng: np.random.Generator) -> Sample:
    """YOLOv5 4-image mosaic on a ``2*img_size`` square canvas around a random centre.

    Each tile is first brought to long side ``img_size`` with :func:`load_resized`. The centre is drawn
    from ``[0.5, 1.5] * img_size`` per axis; tiles go top-left, top-right, bottom-left, bottom-right of
    it, cropped at the canvas edge (the cropped parts of a tile all lie outside the canvas, so clipping
    labels to the canvas is exact). Image fill is 114, semantic fill ``IGNORE_INDEX``.

    Labels: boxes/polygons are shifted, clipped to the canvas and instances left without area dropped
    (no size filtering; :func:`random_perspective` does that). ``present``: ``det``/``inst`` only if every
    tile has them (unlabeled objects would otherwise be penalised as background); ``sem`` if any tile
    has a semantic map, the area of tiles without one being ``IGNORE_INDEX``; ``cap`` is False and
    ``captions`` empty, since a caption describes one whole image. ``image_id``/``path``/``orig_shape``
    are those of ``samples[0]``. Inputs are not modified.
    """
    if len(samples) != 4:
        raise ValueError(f"mosaic4 needs 4 samples, got {len(samples)}")
    s = int(img_size)
    tiles = [load_resized(t, s) for t in samples]
    yc, xc = (int(rng.uniform(0.5 * s, 1.5 * s)) for _ in range(2))

    any_sem = any(_has_sem(t) for t in samples)
    image = np.full((2 * s, 2 * s, 3), FILL, np.uint8)
    semantic = np.full((2 * s, 2 * s), IGNORE_INDEX, np.uint8) if any_sem else None
    boxes, classes, segments = [], [], []
    for i, (t, src) in enumerate(zip(tiles, samples)):
        h, w = t.image.shape[:2]
        if i == 0:  # top left
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
        elif i == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
            x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
        elif i == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
        else:  # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
        image[y1a:y2a, x1a:x2a] = t.image[y1b:y2b, x1b:x2b]
        if semantic is not None and _has_sem(src):
            semantic[y1a:y2a, x1a:x2a] = t.semantic[y1b:y2b, x1b:x2b]
        padw, padh = x1a - x1b, y1a - y1b
        boxes.append(t.boxes.reshape(-1, 4) + np.array([padw, padh, padw, padh], np.float32))
        classes.append(t.classes.reshape(-1))
        segments += [[p + np.array([padw, padh], np.float32) for p in polys] for polys in _segments_of(t)]

    present = {k: all(t.present.get(k, False) for t in samples) for k in TASKS}
    present["sem"] = any_sem
    present["cap"] = False
    first = samples[0]
    out = Sample(image=image, boxes=np.concatenate(boxes, 0).astype(np.float32),
                 classes=np.concatenate(classes, 0).astype(np.int64), segments=segments, semantic=semantic,
                 captions=[], image_id=first.image_id, path=first.path, orig_shape=first.orig_shape,
                 present=present)
    return _clip_and_filter(out, min_size=0.0, copy_pixels=False)


# --------------------------------------------------------------------------------------------------
# geometric
# --------------------------------------------------------------------------------------------------
def _pixel_matrix(M: np.ndarray) -> np.ndarray:
    """``M`` in COCO (pixel-corner) coordinates -> the matrix OpenCV needs (pixel-centre coordinates)."""
    to_corner = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    to_centre = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
    return to_centre @ M @ to_corner


def random_perspective(sample: Sample, rng: np.random.Generator, degrees: float = 0.0, translate: float = 0.1,
                       scale: float = 0.5, shear: float = 0.0, perspective: float = 0.0,
                       border: tuple[int, int] = (0, 0)) -> Sample:
    """YOLOv5 random affine / perspective warp of the image, semantic map, boxes and polygons.

    ``M = T @ S @ R @ P @ C`` exactly as YOLOv5 builds it (centre, perspective, rotation + scale, shear,
    translation; same order of random draws) and the output is ``(H + 2*border[0]) x (W + 2*border[1])``; after :func:`mosaic4` pass
    ``border=(-img_size // 2, -img_size // 2)`` to cut the ``2*img_size`` canvas back to ``img_size``.

    The image is warped with ``INTER_LINEAR`` and border 114, the semantic map with ``INTER_NEAREST``
    and border ``IGNORE_INDEX`` (no interpolated class values). Polygon vertices are mapped by ``M``
    (projective maps keep straight edges straight, so this is exact) and clipped exactly to the image;
    polygons that vanish are dropped. An instance's box is the tight box of its transformed polygons,
    or, without polygons, the box of its 4 transformed corners clipped to the image (as YOLOv5). Finally
    instances failing :func:`box_candidates` (``wh_thr=2, ar_thr=100, area_thr=0.1``) are removed.
    Returns a new Sample; the input is not modified.
    """
    img = sample.image
    height = img.shape[0] + border[0] * 2
    width = img.shape[1] + border[1] * 2

    C = np.eye(3)  # move the image centre to the origin
    C[0, 2] = -img.shape[1] / 2
    C[1, 2] = -img.shape[0] / 2
    P = np.eye(3)
    P[2, 0] = rng.uniform(-perspective, perspective)
    P[2, 1] = rng.uniform(-perspective, perspective)
    R = np.eye(3)
    a = rng.uniform(-degrees, degrees)
    s = rng.uniform(1 - scale, 1 + scale)
    R[:2] = cv2.getRotationMatrix2D(angle=a, center=(0, 0), scale=s)
    S = np.eye(3)
    S[0, 1] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)
    S[1, 0] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)
    T = np.eye(3)
    T[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * width
    T[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * height
    M = T @ S @ R @ P @ C

    semantic = sample.semantic
    if border[0] != 0 or border[1] != 0 or (M != np.eye(3)).any():
        Mp = _pixel_matrix(M)
        if perspective:
            img = cv2.warpPerspective(img, Mp, dsize=(width, height), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_CONSTANT, borderValue=(FILL, FILL, FILL))
            if semantic is not None:
                semantic = cv2.warpPerspective(semantic, Mp, dsize=(width, height), flags=cv2.INTER_NEAREST,
                                               borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE_INDEX)
        else:
            img = cv2.warpAffine(img, Mp[:2], dsize=(width, height), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=(FILL, FILL, FILL))
            if semantic is not None:
                semantic = cv2.warpAffine(semantic, Mp[:2], dsize=(width, height), flags=cv2.INTER_NEAREST,
                                          borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE_INDEX)
    else:
        img = img.copy()
        semantic = None if semantic is None else semantic.copy()

    n = len(sample.boxes)
    old_boxes = sample.boxes.reshape(-1, 4).astype(np.float64)
    new_boxes = np.zeros((n, 4), np.float32)
    new_segments = []
    for i, polys in enumerate(_segments_of(sample)):
        if polys:
            kept = _clip_polygons([_transform_points(p, M) for p in polys], width, height)
            new_segments.append(kept)
            new_boxes[i] = _tight_box(kept)
        else:
            x1, y1, x2, y2 = old_boxes[i]
            xy = _transform_points(np.array([[x1, y1], [x2, y2], [x1, y2], [x2, y1]]), M)
            box = np.concatenate((xy.min(0), xy.max(0)))
            new_boxes[i] = np.clip(box, 0, [width, height, width, height])
            new_segments.append([])

    keep = box_candidates(old_boxes * s, new_boxes.astype(np.float64), wh_thr=2, ar_thr=100, area_thr=0.1)
    out = _replace(sample, image=img, semantic=semantic, boxes=new_boxes, classes=sample.classes.copy(),
                   segments=new_segments)
    return out.select(keep)


def hflip(sample: Sample) -> Sample:
    """Left-right flip of image, semantic map, boxes (``x -> W - x``) and polygons. Returns a new Sample."""
    w = sample.image.shape[1]
    boxes = sample.boxes.reshape(-1, 4).astype(np.float32).copy()
    boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    sem = None if sample.semantic is None else np.ascontiguousarray(sample.semantic[:, ::-1])
    segments = _map_segments(_segments_of(sample), lambda p: np.stack((w - p[:, 0], p[:, 1]), 1))
    return _replace(sample, image=np.ascontiguousarray(sample.image[:, ::-1]), semantic=sem, boxes=boxes,
                    classes=sample.classes.copy(), segments=segments)


def vflip(sample: Sample) -> Sample:
    """Up-down flip of image, semantic map, boxes (``y -> H - y``) and polygons. Returns a new Sample."""
    h = sample.image.shape[0]
    boxes = sample.boxes.reshape(-1, 4).astype(np.float32).copy()
    boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
    sem = None if sample.semantic is None else np.ascontiguousarray(sample.semantic[::-1])
    segments = _map_segments(_segments_of(sample), lambda p: np.stack((p[:, 0], h - p[:, 1]), 1))
    return _replace(sample, image=np.ascontiguousarray(sample.image[::-1]), semantic=sem, boxes=boxes,
                    classes=sample.classes.copy(), segments=segments)


def clip_and_filter(sample: Sample, min_size: float = 2.0) -> Sample:
    """Clips boxes and polygons to the image and drops degenerate instances.

    Polygons are clipped exactly (:func:`clip_polygon`) and vanished ones removed; an instance with
    polygons gets the tight box of its clipped polygons, others their box clipped. Instances whose box
    is not wider and taller than ``min_size`` px are dropped (``min_size=0`` drops only empty ones).
    Returns a new Sample; the input is not modified.
    """
    return _clip_and_filter(sample, min_size, copy_pixels=True)


def _clip_and_filter(sample: Sample, min_size: float, copy_pixels: bool) -> Sample:
    h, w = sample.image.shape[:2]
    boxes = np.clip(sample.boxes.reshape(-1, 4).astype(np.float32), 0, [w, h, w, h]).astype(np.float32)
    segments = []
    for i, polys in enumerate(_segments_of(sample)):
        if polys:
            kept = _clip_polygons(polys, w, h)
            boxes[i] = _tight_box(kept)
            segments.append(kept)
        else:
            segments.append([])
    keep = (boxes[:, 2] - boxes[:, 0] > min_size) & (boxes[:, 3] - boxes[:, 1] > min_size)
    image, sem = sample.image, sample.semantic
    if copy_pixels:  # mosaic4 owns its fresh canvas; a public call must not alias its input
        image, sem = image.copy(), None if sem is None else sem.copy()
    out = _replace(sample, boxes=boxes, classes=sample.classes.copy(), segments=segments, image=image, semantic=sem)
    return out.select(keep)


# --------------------------------------------------------------------------------------------------
# photometric
# --------------------------------------------------------------------------------------------------
def augment_hsv(image: np.ndarray, rng: np.random.Generator, hgain: float = 0.015, sgain: float = 0.7,
                vgain: float = 0.4) -> None:
    """YOLOv5 HSV jitter of a BGR uint8 image, **in place**, via one lookup table per channel.

    Gains are multiplied by ``uniform(-1, 1)`` and added to 1; hue wraps at 180 (OpenCV's range).
    With all gains zero nothing happens and no random numbers are drawn.
    """
    if not (hgain or sgain or vgain):
        return
    r = rng.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    x = np.arange(0, 256, dtype=r.dtype)
    lut_hue = ((x * r[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * r[2], 0, 255).astype(np.uint8)
    im_hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    image[...] = cv2.cvtColor(im_hsv, cv2.COLOR_HSV2BGR)


__all__ = ["letterbox", "load_resized", "mosaic4", "random_perspective", "augment_hsv", "hflip", "vflip",
           "clip_and_filter", "clip_polygon", "polygon_area", "box_candidates"]
