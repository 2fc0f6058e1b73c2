"""Drawing primitives, the only ones in the project: colours, text, boxes with labels, masks and their outlines,
semantic overlays, a caption banner, and :func:`annotate` (detect.py's frame overlay) built from them.

The batch mosaics of a run (:mod:`utils.viz.mosaic`) draw with the same functions, so a class looks the same in
``train_batch*.jpg``, in ``detect.py`` output and in videos. All functions work in place on BGR uint8 images.
Colours are fixed (class ``i`` always gets the same colour), so videos do not flicker and images of a run are
comparable.
"""
from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # annotations only: drawing needs numpy and cv2, not torch
    from utils.ops.panoptic import Panoptic
    from utils.ops.postprocess import Result

Color = tuple[int, int, int]  # BGR

FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE, GREY, YELLOW, BLACK = (255, 255, 255), (170, 170, 170), (80, 230, 255), (0, 0, 0)  # BGR text colours

# Ultralytics' 20-colour box palette (hex RGB), widely recognisable and distinct on natural images.
_BOX_HEX = ("FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
            "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7")
BOX_COLORS = np.array([[int(h[i:i + 2], 16) for i in (4, 2, 0)] for h in _BOX_HEX], np.uint8)  # BGR


def _semantic_palette(n: int = 256) -> np.ndarray:
    """``(n, 3)`` BGR: hues spaced by the golden ratio (neighbouring indices look different), fixed
    saturation/value bands; deterministic, so a class keeps its colour across images and runs."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        s = 0.55 + 0.35 * ((i // 7) % 2)
        v = 0.95 - 0.25 * ((i // 3) % 2)
        r, g, b = colorsys.hsv_to_rgb(h, s, v)
        out[i] = (int(b * 255), int(g * 255), int(r * 255))
    return out


SEMANTIC_PALETTE = _semantic_palette()


def box_color(cls: int) -> Color:
    """BGR colour of object class ``cls``."""
    c = BOX_COLORS[int(cls) % len(BOX_COLORS)]
    return int(c[0]), int(c[1]), int(c[2])


def semantic_color(index: int) -> Color:
    """BGR colour of semantic class ``index`` (the overlay's colour, for legends)."""
    c = SEMANTIC_PALETTE[int(index)]
    return int(c[0]), int(c[1]), int(c[2])


def text_color_on(background: Sequence[int]) -> Color:
    """Black text on a light background, white on a dark one (mean channel above half of 255)."""
    return BLACK if sum(int(v) for v in background) > 382 else WHITE


# --------------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------------
def frame_style(image: np.ndarray) -> tuple[float, int]:
    """Font scale and line thickness that stay legible from 64 px thumbnails to 4K frames."""
    s = max(image.shape[:2]) / 640
    return max(0.3, 0.5 * s), max(1, int(round(2 * s)))


def text_width(text: str, font_scale: float, thickness: int = 1) -> int:
    """Width in pixels of ``text`` drawn with :func:`put_text`."""
    return cv2.getTextSize(text, FONT, font_scale, thickness)[0][0]


def put_text(image: np.ndarray, text: str, origin: tuple[int, int], font_scale: float, color: Color = WHITE,
             thickness: int = 1) -> None:
    """``text`` with its baseline-left corner at ``origin`` (anti-aliased, the one font of all pictures)."""
    cv2.putText(image, text, origin, FONT, font_scale, color, thickness, cv2.LINE_AA)


def wrap_text(text: str, width_px: int, font_scale: float, thickness: int = 1) -> list[str]:
    """Greedy word wrap to ``width_px``; a word wider than a line is cut over several lines. ``[]`` for no words."""
    lines, cur = [], ""
    for word in text.split():
        while len(word) > 1 and text_width(word, font_scale, thickness) > width_px:
            cut = max(1, int(len(word) * width_px / text_width(word, font_scale, thickness)) - 1)
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(word[:cut])
            word = word[cut:]
        trial = f"{cur} {word}".strip()
        if cur and text_width(trial, font_scale, thickness) > width_px:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + [cur] if cur else lines


def clip_lines(lines: list[str], n: int, width_px: int, font_scale: float, thickness: int = 1) -> list[str]:
    """At most ``n`` lines; a cut shows as a trailing ``...`` that still fits ``width_px``."""
    if len(lines) <= n:
        return lines
    last = lines[n - 1]
    while last and text_width(last + " ...", font_scale, thickness) > width_px:
        last = last[:-1]
    return lines[: n - 1] + [last.rstrip() + " ..."]


# --------------------------------------------------------------------------------------------------
# overlays
# --------------------------------------------------------------------------------------------------
def draw_semantic(image: np.ndarray, semantic: np.ndarray, alpha: float = 0.4, ignore: int | None = None
                  ) -> np.ndarray:
    """Blends each pixel with the palette colour of its semantic index (in place; ``alpha`` 0 = off).

    ``ignore``: an index whose pixels stay as they are (255 for ground truth and letterboxed predictions,
    or padding and unlabelled areas would be tinted); ``None`` colours every pixel (a network's argmax).
    """
    if alpha <= 0:
        return image
    blended = cv2.addWeighted(SEMANTIC_PALETTE[semantic], float(alpha), image, 1.0 - float(alpha), 0.0)
    if ignore is None:
        image[:] = blended
    else:
        np.copyto(image, blended, where=(semantic != ignore)[..., None])
    return image


def panoptic_colors(panoptic: Panoptic) -> np.ndarray:
    """``(max id + 1, 3)`` BGR per segment id: stuff in its semantic class colour (as :func:`draw_semantic`),
    each thing in its class's box colour shifted in brightness by its rank among that class's instances, so
    two touching instances of one class stay apart; void (0) black."""
    top = max([s["id"] for s in panoptic.segments], default=0)
    colors = np.zeros((top + 1, 3), np.uint8)
    seen: dict[int, int] = {}
    for s in panoptic.segments:
        if s["isthing"]:
            k = seen[s["label"]] = seen.get(s["label"], -1) + 1
            shift = (k % 5 - 2) * 24  # -48 .. +48: five distinct shades before one repeats
            colors[s["id"]] = np.clip(np.array(box_color(s["label"]), np.int32) + shift, 0, 255)
        else:
            colors[s["id"]] = SEMANTIC_PALETTE[s["label"]]
    return colors


def draw_panoptic(image: np.ndarray, panoptic: Panoptic, alpha: float = 0.5) -> np.ndarray:
    """Fills every panoptic segment translucently in its colour (:func:`panoptic_colors`) and outlines the
    segments (in place); void pixels stay as they are."""
    if alpha <= 0 or not panoptic.segments:
        return image
    ids = panoptic.ids
    blended = cv2.addWeighted(panoptic_colors(panoptic)[ids], float(alpha), image, 1.0 - float(alpha), 0.0)
    np.copyto(image, blended, where=(ids > 0)[..., None])
    edge = np.zeros(ids.shape, bool)  # a pixel whose right or lower neighbour is another segment
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1] |= ids[:-1] != ids[1:]
    image[edge] = WHITE
    return image


def draw_masks(image: np.ndarray, masks: np.ndarray, classes: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Fills each ``(h, w)`` bool mask translucently in its class's box colour (in place)."""
    for m, c in zip(masks, classes):
        if not m.any():
            continue
        color = np.array(box_color(int(c)), np.float32)
        px = image[m].astype(np.float32)
        image[m] = (px * (1 - alpha) + color * alpha).round().clip(0, 255).astype(np.uint8)
    return image


def outline_masks(image: np.ndarray, masks: np.ndarray, classes: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Draws each bool mask's outline in its class colour (in place): with a light fill on top of a semantic
    overlay, the outline is what shows whether a mask sits on its object."""
    for m, c in zip(masks, classes):
        if m.any():
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(image, contours, -1, box_color(int(c)), thickness, cv2.LINE_AA)
    return image


def draw_boxes(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, names: Sequence[str],
               scores: np.ndarray | None = None, font_scale: float | None = None,
               thickness: int | None = None, ids: np.ndarray | None = None) -> np.ndarray:
    """Rectangles in their class colour with a filled label tab (in place).

    The tab reads ``name`` (ground truth, ``scores=None``) or ``name 0.87``, after ``id:7`` when track ``ids``
    are given (``id:7 person 0.91``); it sits above the box, or inside
    at its top edge when there is no room, and is shifted left to stay inside the image.

    Args:
        boxes: ``(n, 4)`` ``x1 y1 x2 y2`` pixels; ``classes``: ``(n,)`` indices into ``names`` (a class
            without a name is shown by its index).
        font_scale, thickness: label font scale and box line width; ``None`` sizes them for the image
            (:func:`frame_style`). Small mosaic tiles pass their own.
    """
    fs, lw = frame_style(image)
    fs = fs if font_scale is None else font_scale
    lw = lw if thickness is None else thickness
    ft = max(1, lw - 1)  # thinner text than lines: a thick font closes the letters of small labels
    w = image.shape[1]
    for k, ((x1, y1, x2, y2), c) in enumerate(zip(np.asarray(boxes).round().astype(int), classes)):
        color = box_color(int(c))
        cv2.rectangle(image, (x1, y1), (x2, y2), color, lw, cv2.LINE_AA)
        label = names[int(c)] if int(c) < len(names) else str(int(c))
        if ids is not None:
            label = f"id:{int(ids[k])} {label}"
        if scores is not None:
            label += f" {float(scores[k]):.2f}"
        (tw, th), base = cv2.getTextSize(label, FONT, fs, ft)
        y_top = y1 - th - base if y1 - th - base >= 0 else max(y1, 0)
        x0 = int(np.clip(x1, 0, max(w - tw - 2, 0)))
        cv2.rectangle(image, (x0, y_top), (x0 + tw + 2, y_top + th + base), color, -1)
        put_text(image, label, (x0 + 1, y_top + th), fs, text_color_on(color), ft)
    return image


def draw_caption(image: np.ndarray, caption: str) -> np.ndarray:
    """A dark banner across the top of the frame with the caption in white, wrapped to the frame width
    (an empty caption still gets its one-line banner: the model said nothing)."""
    fs, lw = frame_style(image)
    ft = max(1, lw - 1)
    lines = wrap_text(caption, image.shape[1] - 8, fs, ft) or [""]
    (_, th), base = cv2.getTextSize("Ag", FONT, fs, ft)
    line_h = th + base + 2
    h = min(image.shape[0], line_h * len(lines) + 4)
    banner = image[:h]
    banner[:] = (banner.astype(np.float32) * 0.35).astype(np.uint8)  # darken, keep a hint of the image
    for i, line in enumerate(lines):
        put_text(image, line, (4, 2 + th + i * line_h), fs, WHITE, ft)
    return image


def annotate(image: np.ndarray, result: Result, names: Sequence[str], semantic_alpha: float = 0.4,
             mask_alpha: float = 0.45, boxes: bool = True, panoptic: bool = False) -> np.ndarray:
    """A copy of ``image`` with a :class:`utils.ops.postprocess.Result` drawn on it, back to front: semantic
    overlay, instance masks, boxes with scores (``boxes=False`` to leave them out), caption banner.
    ``panoptic=True`` draws the panoptic segments (:func:`draw_panoptic`) in place of the semantic overlay
    and the masks, when the Result has them."""
    out = image.copy()
    if panoptic and result.panoptic is not None:
        draw_panoptic(out, result.panoptic, max(semantic_alpha, mask_alpha))
    else:
        if result.semantic is not None:
            draw_semantic(out, result.semantic, semantic_alpha)
        if result.masks is not None and len(result.masks):
            draw_masks(out, result.masks, result.classes, mask_alpha)
    if boxes and len(result.boxes):
        draw_boxes(out, result.boxes, result.classes, names, result.scores, ids=result.track_ids)
    if result.caption is not None:
        draw_caption(out, result.caption)
    return out
