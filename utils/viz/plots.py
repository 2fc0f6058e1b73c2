"""Charts written into run folders: results.png, labels.jpg, PR/F1 curves, confusion matrices; and the batch
pictures (train_batch*.jpg, val_batch*_labels.jpg, val_batch*_pred.jpg), which turn a ``Batch`` and its
predictions into :class:`utils.viz.mosaic.TileLabels` for :func:`utils.viz.mosaic.draw_mosaic`.

Nothing is drawn here pixel by pixel: drawing lives in :mod:`utils.viz.draw` (primitives, detect.py's frames)
and :mod:`utils.viz.mosaic` (batch grids), so a class looks the same in every picture.

Figures use matplotlib's object API (``matplotlib.figure.Figure`` with the Agg canvas), never ``pyplot``:
pyplot keeps global state and is not thread-safe, and the train-batch and label pictures are drawn in a
background thread while training runs.
"""
from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from utils.data.vocab import Vocabulary, tokenize
from utils.eval.curves import Curves, normalize_rows
from utils.ops.letterbox import to_float
from utils.ops.options import PredictOptions
from utils.ops.postprocess import Result, head_outputs, postprocess
from utils.tasks import ALL_TASKS, IGNORE_INDEX, is_metric_key, task_of_key
from utils.viz.draw import GREY, SEMANTIC_PALETTE, WHITE, YELLOW, box_color
from utils.viz.mosaic import TileLabels, draw_mosaic, imwrite

if TYPE_CHECKING:  # imported for annotations only: keeps `import utils.viz.plots` light
    from matplotlib.figure import Figure

    from utils.data.dataset import Batch, CocoDataset


def _figure(w: float, h: float, rows: int = 1, cols: int = 1) -> tuple[Figure, np.ndarray]:
    """A ``w`` x ``h`` inch figure and its ``(rows, cols)`` axes.

    matplotlib is imported here, on the first chart, not with the module: the trainer imports this module
    in every run, and importing matplotlib costs about half a second, which a ``--noplots`` run, test.py and
    every training subprocess of the tests and benchmarks would otherwise pay for nothing.
    """
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
    panels: dict[str, list[tuple[str, list[str]]]] = {t: [] for t in (*ALL_TASKS, "other")}
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
    rows = read_results(Path(results_csv))
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]

    def series(k: str) -> list[float]:
        return [r.get(k, math.nan) for r in rows]

    layout = results_layout(rows, balance)
    cols = max([len(p) for _, p in layout] + [1])
    fig, axes = _figure(2.7 * cols, 2.3 * max(len(layout), 1), max(len(layout), 1), cols)
    for r, (_task, plist) in enumerate(layout):
        for c, (title, ks) in enumerate(plist):
            ax = axes[r, c]
            for k in ks:
                label = k.split("/")[0] if len(ks) > 1 and not k.startswith("weight/") else k.split("/")[-1]
                ax.plot(epochs, series(k), marker=".", markersize=4, linewidth=1.3, label=label)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.locator_params(axis="x", integer=True)  # epochs: no 1.5 ticks
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
def _semantic_pixel_counts(dataset: CocoDataset, n_classes: int, max_images: int) -> tuple[np.ndarray, int]:
    """Labelled pixels per semantic class over up to ``max_images`` evenly spaced maps of ``dataset``, read
    as training reads them (:meth:`CocoDataset.semantic_target`: the loader's path rule and id LUT); and how
    many maps were read. Only items of splits with semantic maps are sampled."""
    counts = np.zeros(n_classes, np.int64)
    with_maps = [i for i, (split, _) in enumerate(dataset.items) if split.semantic is not None]
    if not with_maps or not n_classes:
        return counts, 0
    n_maps = 0
    for i in with_maps[::max(1, len(with_maps) // max_images)][:max_images]:
        rec = dataset.items[i][1]
        m = dataset.semantic_target(i, (rec.height, rec.width))
        if m is None:  # no map for this image: not labelled, not an error
            continue
        v = m[m != IGNORE_INDEX]
        counts += np.bincount(v[v < n_classes], minlength=n_classes)
        n_maps += 1
    return counts, n_maps


def plot_labels(dataset: CocoDataset, names: list[str], semantic_names: list[str], vocab: Vocabulary | None,
                path: Path, max_semantic_images: int = 200, max_caption_words: int | None = None) -> Path:
    """labels.jpg: what the training labels look like before any training.

    Panels: instances per class; box centres and box sizes (relative to the image); semantic class pixel
    frequency (from up to ``max_semantic_images`` evenly spaced maps: reading every map of COCO would take
    minutes); caption length histogram (``max_caption_words`` marks where training truncates captions);
    a summary with the vocabulary size and its coverage.
    """
    records = [rec for _, rec in dataset.items]
    classes = np.concatenate([r.classes for r in records]) if records else np.zeros(0, np.int64)
    rel = [r.boxes / np.array([r.width, r.height, r.width, r.height], np.float32)
           for r in records if len(r.boxes) and r.width and r.height]
    boxes = np.concatenate(rel) if rel else np.zeros((0, 4), np.float32)
    sem_counts, n_maps = _semantic_pixel_counts(dataset, len(semantic_names), max_semantic_images)
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


def plot_pr_curve(curves: Curves, path: Path, kind: str = "box") -> Path:
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


def plot_f1_curve(curves: Curves, path: Path, kind: str = "box") -> Path:
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
def _targets_of(batch: Batch, b: int) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]:
    """Boxes, classes and polygons of image ``b`` of a batch (``segments`` is aligned with ``targets``)."""
    t = batch.targets.cpu().numpy() if isinstance(batch.targets, torch.Tensor) else np.asarray(batch.targets)
    sel = np.nonzero(t[:, 0].astype(int) == b)[0] if len(t) else np.zeros(0, int)
    polys = [batch.segments[i] if i < len(batch.segments) else [] for i in sel]
    return t[sel, 2:6], t[sel, 1].astype(np.int64), polys


def _mask_of(batch: Batch, task: str) -> list[bool]:
    return [bool(v) for v in batch.task_present(task).tolist()]


def plot_train_batch(batch: Batch, path: Path, names: list[str], semantic_names: Sequence[str] = (),
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


# the pictures' predictions: detect.py's thresholds, at most 100 boxes a tile
PREVIEW_OPTIONS = PredictOptions(conf_thres=0.25, iou_thres=0.45, max_det=100)


@dataclass
class BatchPredictions:
    """Display predictions of one batch: per image a :class:`~utils.ops.postprocess.Result` in input pixels (the
    letterboxed tile the mosaic shows), its best class score and the threshold the boxes passed."""

    results: list[Result]
    max_conf: list[float] = field(default_factory=list)  # best class score per image, kept or not
    conf: float = 0.25


@torch.no_grad()
def predict_batch(model, batch: Batch, vocab: Vocabulary | None = None,
                  options: PredictOptions = PREVIEW_OPTIONS) -> BatchPredictions:
    """Runs ``model`` (eval mode) on a batch through the same :func:`~utils.ops.postprocess.postprocess` as
    evaluation and detect.py, kept in input pixels to draw on the letterboxed tiles: boxes above
    ``options.conf_thres`` after NMS (one class per box, as detect.py; default :data:`PREVIEW_OPTIONS`), their
    masks, the semantic map (padding set to 255 so it is not coloured) and the greedy caption."""
    model.eval()
    device = next(model.parameters()).device
    out = model(to_float(batch.images, device))
    results = postprocess(head_outputs(out), batch.letterboxes, options, vocab=vocab, at="input")
    for r in results:
        if r.semantic is not None:
            r.semantic = r.letterbox.fill_padding(r.semantic, IGNORE_INDEX)
    max_conf = out.det.pred[..., 4:].float().amax((1, 2)).tolist() if out.det is not None else [0.0] * len(batch)
    return BatchPredictions(results=results, max_conf=max_conf, conf=options.conf_thres)


def plot_val_batch(batch: Batch, preds: BatchPredictions, labels_path: Path, pred_path: Path, names: list[str],
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
