"""Batch mosaics (train_batch*.jpg, val_batch*_labels.jpg, val_batch*_pred.jpg): a grid of network-input images,
each with its labels or predictions drawn, text lines under it and a legend of the semantic classes shown.

Drawn with OpenCV (fast, no figure overhead) by the primitives of :mod:`utils.viz.draw`, the ones detect.py
draws frames with, so a class has one look everywhere. What a batch holds is turned into :class:`TileLabels` by
:mod:`utils.viz.plots`; this module knows images, boxes, masks and maps, not batches or models.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.ops.masks import rasterize_polygons
from utils.tasks import IGNORE_INDEX
from utils.viz.draw import (
    WHITE,
    Color,
    clip_lines,
    draw_boxes,
    draw_masks,
    draw_semantic,
    outline_masks,
    put_text,
    semantic_color,
    text_width,
    wrap_text,
)

TEXT_SCALE, LINE_H = 0.42, 16  # the mosaic's text: font scale and line pitch in pixels
BACKGROUND = 24  # grey level of the canvas around tiles (dark: the tiles' colours stand out)


@dataclass
class TileLabels:
    """What to draw on one image of a mosaic, in pixels of the network input image.

    Attributes:
        boxes, classes: ``(n, 4)`` ``x1 y1 x2 y2`` and ``(n,)`` class indices.
        scores: ``(n,)`` confidences (predictions) or ``None`` (ground truth: the label is the name only).
        polygons: per box, its polygons (ground truth instance masks), or ``None``.
        masks: ``(n, H, W)`` bool predicted masks, or ``None``.
        semantic: ``(H, W)`` semantic indices, ``255`` = nothing drawn, or ``None``.
        text: lines under the image as ``(text, BGR colour)``, e.g. captions.
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray | None = None
    polygons: list[list[np.ndarray]] | None = None
    masks: np.ndarray | None = None
    semantic: np.ndarray | None = None
    text: list[tuple[str, Color]] = field(default_factory=list)


def _tile_masks(labels: TileLabels, size: tuple[int, int], sx: float, sy: float) -> list[np.ndarray]:
    """The tile's ``(n, h, w)`` bool instance masks at tile ``size``: polygons rasterized at tile resolution
    (sharp edges), predicted masks resized with nearest neighbour."""
    out = []
    if labels.polygons is not None and len(labels.polygons):
        xy = np.array([sx, sy], np.float32)
        polys = [[np.asarray(p, np.float32).reshape(-1, 2) * xy for p in obj] for obj in labels.polygons]
        out.append(rasterize_polygons(polys, size).astype(bool))
    if labels.masks is not None and len(labels.masks):
        th, tw = size
        m = np.asarray(labels.masks, np.uint8)
        out.append(np.stack([cv2.resize(x, (tw, th), interpolation=cv2.INTER_NEAREST) for x in m]).astype(bool))
    return out


def render_tile(image_rgb: np.ndarray, labels: TileLabels, names: Sequence[str], size: tuple[int, int],
                sem_alpha: float = 0.35, mask_alpha: float = 0.35) -> np.ndarray:
    """One ``(h, w)`` BGR tile: the image resized to ``size`` with the semantic map, masks (filled lightly and
    outlined: they sit on top of the map) and boxes drawn.

    Drawing happens after the resize (labels scaled along), so thin outlines and text stay sharp on
    small network inputs.
    """
    th, tw = size
    H, W = image_rgb.shape[:2]
    sx, sy = tw / W, th / H
    tile = cv2.resize(np.ascontiguousarray(image_rgb[..., ::-1]), (tw, th),
                      interpolation=cv2.INTER_AREA if tw < W else cv2.INTER_LINEAR)
    if labels.semantic is not None:
        sem = cv2.resize(np.asarray(labels.semantic, np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
        draw_semantic(tile, sem, sem_alpha, ignore=IGNORE_INDEX)
    classes = np.asarray(labels.classes, np.int64).reshape(-1)
    for masks in _tile_masks(labels, size, sx, sy):
        draw_masks(tile, masks, classes[: len(masks)], mask_alpha)
        outline_masks(tile, masks, classes[: len(masks)])
    boxes = np.asarray(labels.boxes, np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32)
    if len(boxes):
        small = tw < 400
        draw_boxes(tile, boxes, classes, names, labels.scores, font_scale=0.35 if small else 0.45,
                   thickness=1 if small else 2)
    return tile


def _legend_rows(entries: list[tuple[int, str]], width: int) -> list[list[tuple[int, str, int]]]:
    """Semantic legend entries ``(index, name)`` laid out in rows of swatch + name: ``(index, name, x)``."""
    rows: list[list[tuple[int, str, int]]] = [[]]
    x = 6
    for i, name in entries:
        wpx = 16 + text_width(name, TEXT_SCALE) + 14
        if x + wpx > width and rows[-1]:
            rows.append([])
            x = 6
        rows[-1].append((i, name, x))
        x += wpx
    return rows


@dataclass(frozen=True)
class MosaicLayout:
    """The size limits of a :func:`draw_mosaic` grid.

    Attributes:
        max_images: tiles drawn at most.
        max_width: the grid's width cap in pixels (tiles shrink to fit).
        min_tile: small inputs (tests use 64 px) are enlarged to this so labels and text stay readable.
        max_lines: lines per text item (a runaway predicted caption must not push the reference out).
    """

    max_images: int = 16
    max_width: int = 1920
    min_tile: int = 192
    max_lines: int = 4


def draw_mosaic(images: np.ndarray | torch.Tensor, tiles: list[TileLabels], names: Sequence[str],
                semantic_names: Sequence[str] = (), title: str = "",
                layout: MosaicLayout = MosaicLayout()) -> np.ndarray:
    """A grid of up to ``layout.max_images`` labelled tiles with their text lines under each, and a legend of the
    semantic classes shown. Returns a BGR image.

    Args:
        images: ``(B, 3, H, W)`` uint8 RGB (a ``Batch``'s images).
        tiles: what to draw on each image (same order).
        layout: the grid's size limits (:class:`MosaicLayout`).
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    n = min(len(images), len(tiles), layout.max_images)
    H, W = images.shape[2:]
    cols = math.ceil(math.sqrt(n)) if n else 1
    rows = math.ceil(n / cols) if n else 1
    f = min(max(layout.min_tile / max(H, W), 1.0), layout.max_width / (cols * W))  # enlarge small inputs, cap the width
    tw, th = max(1, int(round(W * f))), max(1, int(round(H * f)))
    text_lines = [[(ln, col) for t, col in tl.text
                   for ln in clip_lines(wrap_text(t, tw - 8, TEXT_SCALE), layout.max_lines, tw - 8, TEXT_SCALE)]
                  for tl in tiles[:n]]
    text_h = (max([len(t) for t in text_lines] + [0]) * LINE_H + 6) if any(text_lines) else 0
    cell_h = th + text_h
    title_h = 24 if title else 0
    sem_shown: set[int] = set()
    for tl in tiles[:n]:
        if tl.semantic is not None:
            sem_shown |= {int(v) for v in np.unique(tl.semantic) if v != IGNORE_INDEX}
    legend = [(i, semantic_names[i] if i < len(semantic_names) else str(i)) for i in sorted(sem_shown)]
    canvas_w = cols * tw
    legend_rows = _legend_rows(legend, canvas_w)
    legend_h = (len(legend_rows) * LINE_H + 26) if legend else 0
    canvas = np.full((title_h + rows * cell_h + legend_h, canvas_w, 3), BACKGROUND, np.uint8)
    if title:
        put_text(canvas, title, (6, 17), 0.5)
    for k in range(n):
        r, c = divmod(k, cols)
        y0, x0 = title_h + r * cell_h, c * tw
        canvas[y0:y0 + th, x0:x0 + tw] = render_tile(images[k].transpose(1, 2, 0), tiles[k], names, (th, tw))
        for j, (ln, col) in enumerate(text_lines[k]):
            put_text(canvas, ln, (x0 + 4, y0 + th + (j + 1) * LINE_H), TEXT_SCALE, col)
        cv2.rectangle(canvas, (x0, y0), (x0 + tw - 1, y0 + cell_h - 1), WHITE, 1)  # cell border
    if legend:
        y = title_h + rows * cell_h + 6
        put_text(canvas, "semantic classes:", (6, y + 12), TEXT_SCALE)
        for rr, entries in enumerate(legend_rows):
            yy = y + 20 + rr * LINE_H
            for i, name, xx in entries:
                cv2.rectangle(canvas, (xx, yy), (xx + 12, yy + 11), semantic_color(i), -1)
                put_text(canvas, name, (xx + 16, yy + 10), TEXT_SCALE)
    return canvas


def imwrite(path: Path | str, image: np.ndarray) -> None:
    """Writes a BGR picture (JPEG at quality 90: mosaics are photos, PNG would be ~5x larger)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if str(path).lower().endswith((".jpg", ".jpeg")) else []
    if not cv2.imwrite(str(path), image, params):
        raise OSError(f"cannot write {path}")
