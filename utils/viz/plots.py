"""Pictures written into run folders: results.png, labels.jpg, batch mosaics, PR/F1 curves, confusion matrices.

Figures use matplotlib's object API (``matplotlib.figure.Figure`` with the Agg canvas), never ``pyplot``:
pyplot keeps global state and is not thread-safe, and the train-batch and label pictures are drawn in a
background thread while training runs. Batch mosaics are drawn with OpenCV (fast, no figure overhead) with
the colours of :mod:`utils.viz.draw`, so a class looks the same here, in ``detect.py`` output and in videos.
"""
from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np
import torch

from utils.ops.letterbox import to_float
from utils.ops.masks import rasterize_polygons
from utils.ops.postprocess import Result, head_outputs, postprocess
from utils.tasks import IGNORE_INDEX, TASKS, is_metric_key, task_of_key
from utils.viz.draw import SEMANTIC_PALETTE, box_color, draw_masks

if TYPE_CHECKING:  # imported for annotations only: keeps `import utils.viz.plots` light
    from matplotlib.figure import Figure

    from utils.data.dataset import Batch, CocoDataset
    from utils.data.vocab import Vocabulary
    from utils.eval.curves import Curves

FONT = cv2.FONT_HERSHEY_SIMPLEX


def _figure(w: float, h: float, rows: int = 1, cols: int = 1) -> tuple["Figure", np.ndarray]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _rgb(bgr: Sequence[int]) -> tuple[float, float, float]:
    return bgr[2] / 255, bgr[1] / 255, bgr[0] / 255


# --------------------------------------------------------------------------------------------------
# results.png
# --------------------------------------------------------------------------------------------------
def read_results(results_csv: Path) -> list[dict[str, float]]:
    """``results.csv`` rows as floats (empty cells are NaN, non-numbers dropped)."""
    rows = []
    with open(results_csv, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v) if v not in (None, "") else math.nan
                except ValueError:
                    pass
            rows.append(row)
    return rows


def results_layout(rows: list[dict[str, float]], balance: str | None = None
                   ) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """The panels of results.png: per task (then ``other``) a list of ``(title, columns drawn)``.

    Losses pair ``train/<x>`` with ``val/<x>`` in one panel; every metric gets its own panel; the task
    weights share one panel, shown for a dynamic ``balance`` (or, with ``balance=None``, if they changed).
    """
    keys = list(dict.fromkeys(k for r in rows for k in r))
    panels: dict[str, list[tuple[str, list[str]]]] = {t: [] for t in (*TASKS, "other")}
    for k in keys:  # losses: train/<x> with its val/<x>; val-only losses alone; then metrics
        t = task_of_key(k)
        if k.startswith("train/"):
            pair = [k] + ([f"val/{k[6:]}"] if f"val/{k[6:]}" in keys else [])
            panels[t or "other"].append((k[6:], pair))
        elif k.startswith("val/") and f"train/{k[4:]}" not in keys:
            panels[t or "other"].append((k, [k]))
    for k in keys:
        if is_metric_key(k):
            panels[task_of_key(k)].append((k, [k]))
    weights = [k for k in keys if k.startswith("weight/")]
    vals = [r[k] for r in rows for k in weights if k in r and not math.isnan(r[k])]
    if balance is not None:
        dynamic = balance != "fixed"
    else:
        dynamic = len(vals) > 0 and max(vals) - min(vals) > 1e-9
    if weights and dynamic:
        panels["other"].append((f"task weights ({balance or 'dynamic'})", weights))
    return [(t, p) for t, p in panels.items() if p]


def plot_results(results_csv: Path, balance: str | None = None) -> Path:
    """results.png: one row per task, one panel per loss (train and val in the same panel) and per metric,
    against epoch; plus a panel of the task weights (``weight/<task>``) when the balancing is dynamic.

    Args:
        results_csv: the run's ``results.csv``.
        balance: the ``--balance`` method; ``None`` draws the weights only if they changed over epochs.
    """
    from matplotlib.ticker import MaxNLocator

    rows = read_results(Path(results_csv))
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]

    def series(k: str) -> list[float]:
        return [r.get(k, math.nan) for r in rows]

    layout = results_layout(rows, balance)
    cols = max([len(p) for _, p in layout] + [1])
    fig, axes = _figure(2.7 * cols, 2.3 * max(len(layout), 1), max(len(layout), 1), cols)
    for r, (task, plist) in enumerate(layout):
        for c, (title, ks) in enumerate(plist):
            ax = axes[r, c]
            for k in ks:
                label = k.split("/")[0] if len(ks) > 1 and not k.startswith("weight/") else k.split("/")[-1]
                ax.plot(epochs, series(k), marker=".", markersize=4, linewidth=1.3, label=label)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            if len(ks) > 1:
                ax.legend(fontsize=7)
        for c in range(len(plist), cols):
            axes[r, c].axis("off")
    if not layout:
        axes[0, 0].axis("off")
    fig.tight_layout()
    out = Path(results_csv).with_suffix(".png")
    fig.savefig(out, dpi=100)
    return out


# --------------------------------------------------------------------------------------------------
# labels.jpg
# --------------------------------------------------------------------------------------------------
def plot_labels(dataset: "CocoDataset", names: list[str], semantic_names: list[str], vocab: "Vocabulary | None",
                path: Path, max_semantic_images: int = 200, max_caption_words: int | None = None) -> Path:
    """labels.jpg: what the training labels look like before any training.

    Panels: instances per class; box centres and box sizes (relative to the image); semantic class pixel
    frequency (from up to ``max_semantic_images`` evenly spaced maps: reading every map of COCO would take
    minutes); caption length histogram (``max_caption_words`` marks where training truncates captions);
    a summary with the vocabulary size and its coverage.
    """
    from utils.data.vocab import tokenize

    records = [rec for _, rec in dataset.items]
    classes = np.concatenate([r.classes for r in records]) if records else np.zeros(0, np.int64)
    rel = [r.boxes / np.array([r.width, r.height, r.width, r.height], np.float32)
           for r in records if len(r.boxes) and r.width and r.height]
    boxes = np.concatenate(rel) if rel else np.zeros((0, 4), np.float32)
    sem_counts = np.zeros(len(semantic_names), np.int64)
    sem_items = [(s, r) for s, r in dataset.items if s.semantic is not None]
    n_maps = 0
    if sem_items and len(semantic_names):
        step = max(1, len(sem_items) // max_semantic_images)
        for split, rec in sem_items[::step][:max_semantic_images]:
            m = dataset._load_semantic(split, rec, (rec.height, rec.width))  # the loader's own path rule + LUT
            if m is None:
                continue
            v = m[m != IGNORE_INDEX]
            sem_counts += np.bincount(v[v < len(semantic_names)], minlength=len(semantic_names))
            n_maps += 1
    word_counts: Counter = Counter()
    cap_lengths = []
    for r in records:
        for c in r.captions:
            words = tokenize(c)
            cap_lengths.append(len(words))
            word_counts.update(words)

    fig, axes = _figure(16, 9, 2, 3)
    ax = axes[0, 0]
    nc = max(len(names), int(classes.max()) + 1 if len(classes) else 0)
    counts = np.bincount(classes, minlength=nc) if nc else np.zeros(0)
    ax.bar(range(nc), counts, color=[_rgb(box_color(i)) for i in range(nc)])
    ax.set_title(f"instances per class ({int(counts.sum())} in {len(records)} images)", fontsize=10)
    if nc <= 30:
        ax.set_xticks(range(nc), [names[i] if i < len(names) else str(i) for i in range(nc)], rotation=90, fontsize=8)
    ax.set_ylabel("instances")

    ax = axes[0, 1]
    if len(boxes):
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        ax.hist2d(cx, cy, bins=40, range=[[0, 1], [0, 1]], cmap="Blues")
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)  # image coordinates: y grows downwards, so the plot reads like the image
    ax.set_aspect("equal")
    ax.set_title("box centres (x, y / image size)", fontsize=10)

    ax = axes[0, 2]
    if len(boxes):
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        lim = float(min(1.0, max(0.05, np.quantile(np.concatenate([bw, bh]), 0.995) * 1.1)))  # zoom to the data
        ax.hist2d(bw, bh, bins=40, range=[[0, lim], [0, lim]], cmap="Blues")
    ax.set_aspect("equal")
    ax.set_xlabel("width / image width")
    ax.set_ylabel("height / image height")
    ax.set_title("box sizes", fontsize=10)

    ax = axes[1, 0]
    if len(semantic_names) and sem_counts.sum():
        frac = sem_counts / sem_counts.sum()
        ax.bar(range(len(frac)), frac, color=[_rgb(SEMANTIC_PALETTE[i]) for i in range(len(frac))])
        if len(frac) <= 40:
            ax.set_xticks(range(len(frac)), semantic_names, rotation=90, fontsize=7)
        ax.set_ylabel("fraction of labelled pixels")
        ax.set_title(f"semantic class pixel frequency ({n_maps} maps sampled)", fontsize=10)
    else:
        ax.set_title("semantic: no maps", fontsize=10)

    ax = axes[1, 1]
    if cap_lengths:
        lengths = np.array(cap_lengths)
        ax.hist(lengths, bins=np.arange(0, lengths.max() + 2) - 0.5, color="tab:blue")
        ax.axvline(lengths.mean(), color="k", linestyle="--", linewidth=1, label=f"mean {lengths.mean():.1f}")
        if max_caption_words is not None:
            cut = float((lengths > max_caption_words).mean())
            ax.axvline(max_caption_words + 0.5, color="red", linewidth=1,
                       label=f"trained up to {max_caption_words} words ({100 * cut:.1f}% cut)")
        ax.legend(fontsize=8)
        n_cap_img = sum(1 for r in records if r.captions)
        ax.set_title(f"caption length (words): {len(lengths)} captions on {n_cap_img} images, "
                     f"mean {lengths.mean():.1f}", fontsize=10)
        ax.set_xlabel("words")
    else:
        ax.set_title("captions: none", fontsize=10)

    ax = axes[1, 2]
    ax.axis("off")
    lines = [f"images: {len(records)}", f"instances: {len(classes)} in {nc} classes",
             f"semantic classes: {len(semantic_names)}"]
    if word_counts:
        total = sum(word_counts.values())
        if vocab is not None:
            known = sum(n for w, n in word_counts.items() if w in vocab.stoi)
            lines += [f"vocabulary: {len(vocab)} tokens ({len(vocab) - 4} words + 4 specials)",
                      f"distinct caption words: {len(word_counts)}",
                      f"caption words covered by the vocabulary: {100 * known / max(total, 1):.1f}%"]
        else:
            lines += [f"distinct caption words: {len(word_counts)} (no caption head: no vocabulary)"]
        lines += ["most frequent: " + ", ".join(w for w, _ in word_counts.most_common(8))]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=11, family="monospace", wrap=True)
    vocab_txt = f" · vocabulary {len(vocab)} tokens" if vocab is not None else ""
    fig.suptitle(f"training labels: {len(records)} images · {len(classes)} instances{vocab_txt}", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=90, pil_kwargs={"quality": 90})
    return Path(path)


# --------------------------------------------------------------------------------------------------
# curves and confusion matrices
# --------------------------------------------------------------------------------------------------
def _save_unit_axes(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Common finish of the [0, 1] x [0, 1] curve plots: labels, limits, legend outside, save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_pr_curve(curves: "Curves", path: Path, kind: str = "box") -> Path:
    """Precision-recall at IoU 0.5 per class (COCOeval's interpolated curve) and their mean (bold)."""
    fig, axes = _figure(9, 6)
    ax = axes[0, 0]
    many = len(curves.names) > 20
    for k, name in enumerate(curves.names):
        if many:
            ax.plot(curves.recall, curves.precision[k], linewidth=0.5, color="grey")
        else:
            ax.plot(curves.recall, curves.precision[k], linewidth=1, label=f"{name} {curves.ap50[k]:.3f}")
    if len(curves.names):
        ax.plot(curves.recall, curves.precision.mean(0), linewidth=3, color="blue",
                label=f"all classes {curves.map50:.3f} mAP@0.5")
    return _save_unit_axes(fig, ax, "Recall", "Precision", f"{kind} precision-recall (IoU 0.5)", path)


def plot_f1_curve(curves: "Curves", path: Path, kind: str = "box") -> Path:
    """F1 against confidence threshold per class and their mean (bold), with the best threshold marked."""
    fig, axes = _figure(9, 6)
    ax = axes[0, 0]
    f1 = curves.f1
    many = len(curves.names) > 20
    for k, name in enumerate(curves.names):
        ax.plot(curves.conf, f1[k], linewidth=0.5 if many else 1, color="grey" if many else None,
                label=None if many else name)
    if len(curves.names):
        mean = f1.mean(0)
        i = int(mean.argmax())
        ax.plot(curves.conf, mean, linewidth=3, color="blue",
                label=f"all classes {mean[i]:.2f} at conf {curves.conf[i]:.3f}")
        ax.axvline(curves.conf[i], color="blue", linestyle=":", linewidth=1)
    return _save_unit_axes(fig, ax, "Confidence", "F1", f"{kind} F1-confidence (IoU 0.5)", path)


def plot_confusion_matrix(matrix: np.ndarray, names: list[str], path: Path, title: str,
                          drop_empty: bool = False) -> Path:
    """A row-normalized confusion matrix (rows = true, columns = predicted) as a heat map.

    Args:
        matrix: ``(n, n)`` counts; ``names`` labels its rows/columns (include ``background`` if it has one).
        drop_empty: hide classes with no count in their row and column (171 COCO-Stuff classes of which a
            validation set shows a few would otherwise be mostly blank).
    """
    from utils.eval.curves import normalize_rows

    m = np.asarray(matrix, np.float64)
    names = list(names)
    dropped = 0
    if drop_empty:
        keep = (m.sum(0) + m.sum(1)) > 0
        dropped = int((~keep).sum())
        m, names = m[keep][:, keep], [n for n, k in zip(names, keep) if k]
    norm = normalize_rows(m)
    n = len(names)
    size = min(max(6.0, 0.4 * n + 3), 24)
    fig, axes = _figure(size, size * 0.85)
    ax = axes[0, 0]
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= 60:
        ax.set_xticks(range(n), names, rotation=90, fontsize=8 if n <= 30 else 6)
        ax.set_yticks(range(n), names, fontsize=8 if n <= 30 else 6)
    if n <= 30:  # numbers stay legible up to ~30 classes
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    note = f" ({dropped} empty classes hidden)" if dropped else ""
    ax.set_title(f"{title}{note}\nrows normalized (each true class sums to 1)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# batch mosaics (train_batch*.jpg, val_batch*_labels.jpg, val_batch*_pred.jpg)
# --------------------------------------------------------------------------------------------------
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
    text: list[tuple[str, tuple[int, int, int]]] = field(default_factory=list)


WHITE, GREY, YELLOW = (255, 255, 255), (170, 170, 170), (80, 230, 255)  # BGR text colours


def _wrap_text(text: str, width_px: int, fs: float, ft: int = 1) -> list[str]:
    """Greedy word wrap to ``width_px`` at OpenCV font scale ``fs``; over-long words are cut."""
    lines, cur = [], ""
    for word in text.split():
        while cv2.getTextSize(word, FONT, fs, ft)[0][0] > width_px and len(word) > 1:  # a word wider than a line
            cut = max(1, int(len(word) * width_px / cv2.getTextSize(word, FONT, fs, ft)[0][0]) - 1)
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(word[:cut])
            word = word[cut:]
        trial = f"{cur} {word}".strip()
        if cur and cv2.getTextSize(trial, FONT, fs, ft)[0][0] > width_px:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + [cur] if cur else lines


def _clip_lines(lines: list[str], n: int, width_px: int, fs: float) -> list[str]:
    """At most ``n`` lines; a cut shows as a trailing ``...`` that still fits ``width_px``."""
    if len(lines) <= n:
        return lines
    last = lines[n - 1]
    while last and cv2.getTextSize(last + " ...", FONT, fs, 1)[0][0] > width_px:
        last = last[:-1]
    return lines[: n - 1] + [last.rstrip() + " ..."]


def overlay_semantic(image: np.ndarray, semantic: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blends each labelled pixel with its class's palette colour (in place); ``255`` pixels stay as they are
    (``utils.viz.draw.draw_semantic`` colours every pixel, which would tint letterbox padding and unlabelled areas)."""
    valid = semantic != IGNORE_INDEX
    if valid.any():
        px = image[valid].astype(np.float32)
        image[valid] = (px * (1 - alpha) + SEMANTIC_PALETTE[semantic[valid]].astype(np.float32) * alpha).round().astype(np.uint8)
    return image


def draw_labeled_boxes(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, names: list[str],
                       scores: np.ndarray | None = None, fs: float = 0.35, lw: int = 1) -> np.ndarray:
    """Boxes with a filled label tab (``name`` or ``name 0.87``), in place. ``utils.viz.draw.draw_boxes`` always
    prints a score and sizes its font for full frames; ground truth has no score and tiles are small."""
    h, w = image.shape[:2]
    for k, ((x1, y1, x2, y2), c) in enumerate(zip(np.asarray(boxes).round().astype(int), classes)):
        color = box_color(int(c))
        cv2.rectangle(image, (x1, y1), (x2, y2), color, lw, cv2.LINE_AA)
        label = names[int(c)] if int(c) < len(names) else str(int(c))
        if scores is not None:
            label += f" {float(scores[k]):.2f}"
        (tw, th), base = cv2.getTextSize(label, FONT, fs, 1)
        y_top = y1 - th - base if y1 - th - base >= 0 else max(y1, 0)
        x0 = int(np.clip(x1, 0, max(w - tw - 2, 0)))
        cv2.rectangle(image, (x0, y_top), (x0 + tw + 2, y_top + th + base), color, -1)
        text_color = (0, 0, 0) if sum(color) > 382 else (255, 255, 255)
        cv2.putText(image, label, (x0 + 1, y_top + th), FONT, fs, text_color, 1, cv2.LINE_AA)
    return image


def outline_masks(image: np.ndarray, masks: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Draws each mask's outline in its class colour (in place): with a light fill on top of the semantic
    overlay, the outline is what shows whether a mask sits on its object."""
    for m, c in zip(masks, classes):
        if m.any():
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(image, contours, -1, box_color(int(c)), 1, cv2.LINE_AA)
    return image


def render_tile(image_rgb: np.ndarray, labels: TileLabels, names: list[str], size: tuple[int, int],
                sem_alpha: float = 0.35, mask_alpha: float = 0.35) -> np.ndarray:
    """One ``(h, w)`` BGR tile: the image resized to ``size`` with the semantic map, masks, boxes drawn.

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
        overlay_semantic(tile, sem, sem_alpha)
    scale = np.array([sx, sy, sx, sy], np.float32)
    boxes = np.asarray(labels.boxes, np.float32).reshape(-1, 4) * scale
    classes = np.asarray(labels.classes, np.int64).reshape(-1)
    if labels.polygons is not None and len(labels.polygons):
        polys = [[np.asarray(p, np.float32).reshape(-1, 2) * np.array([sx, sy], np.float32) for p in obj]
                 for obj in labels.polygons]
        masks = rasterize_polygons(polys, (th, tw)).astype(bool)
        draw_masks(tile, masks, classes[: len(masks)], mask_alpha)
        outline_masks(tile, masks, classes[: len(masks)])
    if labels.masks is not None and len(labels.masks):
        m = np.asarray(labels.masks, np.uint8)
        masks = np.stack([cv2.resize(x, (tw, th), interpolation=cv2.INTER_NEAREST) for x in m]).astype(bool)
        draw_masks(tile, masks, classes[: len(masks)], mask_alpha)
        outline_masks(tile, masks, classes[: len(masks)])
    if len(boxes):
        draw_labeled_boxes(tile, boxes, classes, names, labels.scores, fs=0.35 if tw < 400 else 0.45,
                           lw=1 if tw < 400 else 2)
    return tile


def draw_mosaic(images: np.ndarray | torch.Tensor, tiles: list[TileLabels], names: list[str],
                semantic_names: Sequence[str] = (), max_images: int = 16, max_width: int = 1920,
                min_tile: int = 192, title: str = "", max_lines: int = 4) -> np.ndarray:
    """A grid of up to ``max_images`` labelled tiles with their text lines under each, and a legend of the
    semantic classes shown. Returns a BGR image.

    Args:
        images: ``(B, 3, H, W)`` uint8 RGB (a ``Batch``'s images).
        tiles: what to draw on each image (same order).
        min_tile: small inputs (tests use 64 px) are enlarged to this so labels and text stay readable.
        max_lines: lines per text item (a runaway predicted caption must not push the reference out).
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    n = min(len(images), len(tiles), max_images)
    H, W = images.shape[2:]
    cols = math.ceil(math.sqrt(n)) if n else 1
    rows = math.ceil(n / cols) if n else 1
    f = min(max(min_tile / max(H, W), 1.0), max_width / (cols * W))  # enlarge small inputs, cap the width
    tw, th = max(1, int(round(W * f))), max(1, int(round(H * f)))
    fs, line_h = 0.42, 16
    text_lines = [[(ln, col) for t, col in tl.text for ln in _clip_lines(_wrap_text(t, tw - 8, fs), max_lines, tw - 8, fs)]
                  for tl in tiles[:n]]
    text_h = (max([len(t) for t in text_lines] + [0]) * line_h + 6) if any(text_lines) else 0
    cell_h = th + text_h
    title_h = 24 if title else 0
    sem_shown: set[int] = set()
    for tl in tiles[:n]:
        if tl.semantic is not None:
            sem_shown |= {int(v) for v in np.unique(tl.semantic) if v != IGNORE_INDEX}
    legend = [(i, semantic_names[i] if i < len(semantic_names) else str(i)) for i in sorted(sem_shown)]
    canvas_w = cols * tw
    # legend entries laid out in rows of swatch + name
    legend_rows: list[list[tuple[int, str, int]]] = [[]]
    x = 6
    for i, name in legend:
        wpx = 16 + cv2.getTextSize(name, FONT, fs, 1)[0][0] + 14
        if x + wpx > canvas_w and legend_rows[-1]:
            legend_rows.append([])
            x = 6
        legend_rows[-1].append((i, name, x))
        x += wpx
    legend_h = (len(legend_rows) * line_h + 26) if legend else 0
    canvas = np.full((title_h + rows * cell_h + legend_h, canvas_w, 3), 24, np.uint8)
    if title:
        cv2.putText(canvas, title, (6, 17), FONT, 0.5, WHITE, 1, cv2.LINE_AA)
    for k in range(n):
        r, c = divmod(k, cols)
        y0, x0 = title_h + r * cell_h, c * tw
        canvas[y0:y0 + th, x0:x0 + tw] = render_tile(images[k].transpose(1, 2, 0), tiles[k], names, (th, tw))
        for j, (ln, col) in enumerate(text_lines[k]):
            cv2.putText(canvas, ln, (x0 + 4, y0 + th + 4 + (j + 1) * line_h - 4), FONT, fs, col, 1, cv2.LINE_AA)
        cv2.rectangle(canvas, (x0, y0), (x0 + tw - 1, y0 + cell_h - 1), (255, 255, 255), 1)  # cell border
    if legend:
        y = title_h + rows * cell_h + 6
        cv2.putText(canvas, "semantic classes:", (6, y + 12), FONT, fs, WHITE, 1, cv2.LINE_AA)
        for rr, entries in enumerate(legend_rows):
            yy = y + 20 + rr * line_h
            for i, name, xx in entries:
                color = tuple(int(v) for v in SEMANTIC_PALETTE[i])
                cv2.rectangle(canvas, (xx, yy), (xx + 12, yy + 11), color, -1)
                cv2.putText(canvas, name, (xx + 16, yy + 10), FONT, fs, WHITE, 1, cv2.LINE_AA)
    return canvas


def imwrite(path: Path | str, image: np.ndarray) -> None:
    """Writes a BGR picture (JPEG at quality 90: mosaics are photos, PNG would be ~5x larger)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if str(path).lower().endswith((".jpg", ".jpeg")) else []
    if not cv2.imwrite(str(path), image, params):
        raise OSError(f"cannot write {path}")


def _targets_of(batch: "Batch", b: int) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]:
    """Boxes, classes and polygons of image ``b`` of a batch (``segments`` is aligned with ``targets``)."""
    t = batch.targets.cpu().numpy() if isinstance(batch.targets, torch.Tensor) else np.asarray(batch.targets)
    sel = np.nonzero(t[:, 0].astype(int) == b)[0] if len(t) else np.zeros(0, int)
    polys = [batch.segments[i] if i < len(batch.segments) else [] for i in sel]
    return t[sel, 2:6], t[sel, 1].astype(np.int64), polys


def decode_with_unk(vocab: "Vocabulary", ids: Sequence[int]) -> str:
    """Token ids -> words as the model is trained on them: stops at ``<eos>``, skips ``<pad>``/``<bos>`` but
    shows ``<unk>`` (``Vocabulary.decode`` drops it, hiding words the vocabulary does not know)."""
    from utils.tasks import BOS, EOS, PAD

    words = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i in (PAD, BOS):
            continue
        words.append(vocab.itos[i] if 0 <= i < len(vocab.itos) else "<unk>")
    return " ".join(words)


def _mask_of(batch: "Batch", task: str) -> list[bool]:
    return [bool(v) for v in batch.task_present(task).tolist()]


def plot_train_batch(batch: "Batch", path: Path, names: list[str], semantic_names: Sequence[str] = (),
                     captions: Sequence[str | None] | None = None, title: str = "") -> Path:
    """train_batch*.jpg: the augmented batch as the network sees it, with every task's labels drawn.

    ``captions[i]`` is the caption image ``i`` is trained with (``None``: none, e.g. a strong-view image whose
    caption augmentation dropped); ``captions=None`` when the run trains no caption head.
    """
    tiles = []
    sem_ok = _mask_of(batch, "sem") if batch.semantic is not None else [False] * len(batch)
    inst_ok = _mask_of(batch, "inst")
    for b in range(len(batch)):
        boxes, classes, polys = _targets_of(batch, b)
        tl = TileLabels(boxes=boxes, classes=classes, polygons=polys if inst_ok[b] else None,
                        semantic=batch.semantic[b].numpy() if sem_ok[b] else None)
        tl.text.append((f"#{batch.image_ids[b]}" if b < len(batch.image_ids) else f"{b}", GREY))
        if captions is not None:
            cap = captions[b] if b < len(captions) else None
            tl.text.append((f"cap: {cap}", WHITE) if cap else ("no caption (strong view)", GREY))
        tiles.append(tl)
    imwrite(path, draw_mosaic(batch.images, tiles, names, semantic_names, title=title))
    return Path(path)


@dataclass
class BatchPredictions:
    """Display predictions of one batch: per image a :class:`~utils.ops.postprocess.Result` in input pixels (the
    letterboxed tile the mosaic shows), its best class score and the threshold the boxes passed."""

    results: list[Result]
    max_conf: list[float] = field(default_factory=list)  # best class score per image, kept or not
    conf: float = 0.25


@torch.no_grad()
def predict_batch(model, batch: "Batch", vocab: "Vocabulary | None" = None, conf: float = 0.25,
                  iou: float = 0.45, max_det: int = 100) -> BatchPredictions:
    """Runs ``model`` (eval mode) on a batch through the same :func:`~utils.ops.postprocess.postprocess` as
    evaluation and detect.py, kept in input pixels to draw on the letterboxed tiles: boxes above ``conf`` after
    NMS (one class per box, as detect.py), their masks, the semantic map (padding set to 255 so it is not
    coloured) and the greedy caption."""
    model.eval()
    device = next(model.parameters()).device
    out = model(to_float(batch.images, device))
    results = postprocess(head_outputs(out), batch.letterboxes, conf, iou, max_det, vocab=vocab, at="input")
    for r in results:
        if r.semantic is not None:
            r.semantic = r.letterbox.fill_padding(r.semantic, IGNORE_INDEX)
    max_conf = out.det.pred[..., 4:].float().amax((1, 2)).tolist() if out.det is not None else [0.0] * len(batch)
    return BatchPredictions(results=results, max_conf=max_conf, conf=conf)


def plot_val_batch(batch: "Batch", preds: BatchPredictions, labels_path: Path, pred_path: Path, names: list[str],
                   semantic_names: Sequence[str] = (), captions: bool = False, conf: float = 0.25
                   ) -> tuple[Path, Path]:
    """val_batch*_labels.jpg (ground truth: boxes, polygons, map, first reference caption) and
    val_batch*_pred.jpg (predictions with the predicted caption over the first reference) of one batch."""
    gt_tiles, pred_tiles = [], []
    sem_ok = _mask_of(batch, "sem") if batch.semantic is not None else [False] * len(batch)
    cap_ok = _mask_of(batch, "cap")
    for b in range(len(batch)):
        boxes, classes, polys = _targets_of(batch, b)
        ident = (f"#{batch.image_ids[b]}" if b < len(batch.image_ids) else str(b), GREY)
        ref = batch.captions[b][0] if cap_ok[b] and batch.captions[b] else None
        gt = TileLabels(boxes=boxes, classes=classes, polygons=polys,
                        semantic=batch.semantic[b].numpy() if sem_ok[b] else None, text=[ident])
        r = preds.results[b]
        # say how confident the model is at all: an empty tile of a young model is "nothing above conf"
        best = preds.max_conf[b] if b < len(preds.max_conf) else float("nan")
        count = (f"#{batch.image_ids[b]}  " if b < len(batch.image_ids) else "") + \
            f"{len(r)} boxes > {conf:g} (best score {best:.2f})"
        pr = TileLabels(boxes=r.boxes, classes=r.classes, scores=r.scores, masks=r.masks, semantic=r.semantic,
                        text=[(count, GREY)])
        if captions:
            gt.text.append((f"ref: {ref}" if ref else "ref: (none)", WHITE if ref else GREY))
            pred_cap = r.caption
            pr.text.append((f"pred: {pred_cap if pred_cap is not None else ''}", YELLOW))
            pr.text.append((f"ref: {ref}" if ref else "ref: (none)", WHITE if ref else GREY))
        gt_tiles.append(gt)
        pred_tiles.append(pr)
    imwrite(labels_path, draw_mosaic(batch.images, gt_tiles, names, semantic_names, title="labels"))
    imwrite(pred_path, draw_mosaic(batch.images, pred_tiles, names, semantic_names,
                                   title=f"predictions (final EMA model, conf > {conf:g})"))
    return Path(labels_path), Path(pred_path)
