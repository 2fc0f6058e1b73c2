"""Drawing predictions onto frames: semantic overlay, instance masks, boxes with labels, a caption banner.

All functions work on BGR uint8 images. Colours are fixed (class ``i`` always gets the same colour), so videos
do not flicker and images of a run are comparable.
"""
from __future__ import annotations

import colorsys

import cv2
import numpy as np

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


def box_color(cls: int) -> tuple[int, int, int]:
    """BGR colour of object class ``cls``."""
    c = BOX_COLORS[int(cls) % len(BOX_COLORS)]
    return int(c[0]), int(c[1]), int(c[2])


def _scale(image: np.ndarray) -> tuple[float, int]:
    """Font scale and line thickness that stay legible from 64 px thumbnails to 4K frames."""
    s = max(image.shape[:2]) / 640
    return max(0.3, 0.5 * s), max(1, int(round(2 * s)))


def draw_semantic(image: np.ndarray, semantic: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blends the palette colour of every pixel's semantic index into ``image`` (in place; 0 = off)."""
    if alpha <= 0:
        return image
    overlay = SEMANTIC_PALETTE[semantic]
    cv2.addWeighted(overlay, float(alpha), image, 1.0 - float(alpha), 0.0, dst=image)
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


def draw_boxes(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
               names: list[str]) -> np.ndarray:
    """Rectangles with a ``name score`` label on a filled tab above (or inside, at the top edge) each box."""
    fs, lw = _scale(image)
    ft = max(1, lw - 1)
    for (x1, y1, x2, y2), s, c in zip(boxes.round().astype(int), scores, classes):
        color = box_color(int(c))
        cv2.rectangle(image, (x1, y1), (x2, y2), color, lw, cv2.LINE_AA)
        label = f"{names[int(c)] if int(c) < len(names) else int(c)} {float(s):.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, fs, ft)
        outside = y1 - th - base >= 0
        y_top = y1 - th - base if outside else y1
        cv2.rectangle(image, (x1, y_top), (x1 + tw + 2, y_top + th + base), color, -1, cv2.LINE_AA)
        text_color = (0, 0, 0) if sum(color) > 382 else (255, 255, 255)
        cv2.putText(image, label, (x1 + 1, y_top + th), cv2.FONT_HERSHEY_SIMPLEX, fs, text_color, ft, cv2.LINE_AA)
    return image


def _wrap(text: str, width_px: int, fs: float, ft: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if cur and cv2.getTextSize(trial, cv2.FONT_HERSHEY_SIMPLEX, fs, ft)[0][0] > width_px:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + [cur] if cur else lines or [""]


def draw_caption(image: np.ndarray, caption: str) -> np.ndarray:
    """A dark banner across the top of the frame with the caption in white, wrapped to the frame width."""
    fs, lw = _scale(image)
    ft = max(1, lw - 1)
    w = image.shape[1]
    lines = _wrap(caption, w - 8, fs, ft)
    (_, th), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, fs, ft)
    line_h = th + base + 2
    h = min(image.shape[0], line_h * len(lines) + 4)
    banner = image[:h]
    banner[:] = (banner.astype(np.float32) * 0.35).astype(np.uint8)  # darken, keep a hint of the image
    for i, line in enumerate(lines):
        cv2.putText(image, line, (4, 2 + th + i * line_h), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), ft,
                    cv2.LINE_AA)
    return image


def annotate(image: np.ndarray, result, names: list[str], semantic_alpha: float = 0.4,
             mask_alpha: float = 0.45, boxes: bool = True) -> np.ndarray:
    """A copy of ``image`` with a :class:`utils.deploy.inference.FrameResult` drawn on it, back to front: semantic
    overlay, instance masks, boxes (``boxes=False`` to leave them out), caption banner."""
    out = image.copy()
    if result.semantic is not None:
        draw_semantic(out, result.semantic, semantic_alpha)
    if result.masks is not None and len(result.masks):
        draw_masks(out, result.masks, result.classes, mask_alpha)
    if boxes and len(result.boxes):
        draw_boxes(out, result.boxes, result.scores, result.classes, names)
    if result.caption is not None:
        draw_caption(out, result.caption)
    return out
