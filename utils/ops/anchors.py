"""Anchors fitted to a dataset (YOLOv5 autoanchor): k-means on the training boxes' sizes, refined by a
short seeded evolution, and the best possible recall (BPR) of an anchor set.

Numbers are box sizes ``w h`` in pixels at the training image size, i.e. after the letterbox that scales
an image's longer side to ``img_size``.
"""
from __future__ import annotations

import numpy as np

MIN_WH = 2.0  # pixels: smaller boxes are label noise at this size and would drag anchors towards zero


def ratio_metric(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """``(N, K)``: for each box and anchor, the worse of the two side ratios (``min(r, 1/r)``, in 0..1).

    It is the quantity the anchor loss matches on: a box matches an anchor when this is above ``1 / anchor_t``.
    """
    r = wh[:, None] / anchors[None]
    return np.minimum(r, 1 / r).min(2)


def best_possible_recall(wh: np.ndarray, anchors: np.ndarray, anchor_t: float = 4.0) -> float:
    """Fraction of boxes ``(N, 2)`` that at least one of ``anchors (K, 2)`` can match (pixels, same scale)."""
    wh = np.asarray(wh, np.float64)
    if not len(wh):
        return float("nan")
    best = ratio_metric(wh, np.asarray(anchors, np.float64).reshape(-1, 2)).max(1)
    return float((best > 1 / anchor_t).mean())


def _fitness(wh: np.ndarray, anchors: np.ndarray, thr: float) -> float:
    """YOLOv5's anchor fitness: mean best ratio over boxes, counting only matchable boxes."""
    best = ratio_metric(wh, anchors).max(1)
    return float((best * (best > thr)).mean())


def _kmeans(x: np.ndarray, n: int, rng: np.random.Generator, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; ``x (N, D)`` -> ``(n, D)`` centres."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, n):
        d2 = ((x[:, None] - np.array(centres)[None]) ** 2).sum(-1).min(1)
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
    c = np.array(centres)
    for _ in range(iters):
        label = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[label == k].mean(0) if (label == k).any() else c[k] for k in range(n)])
        if np.allclose(new, c):
            break
        c = new
    return c


def kmeans_anchors(wh: np.ndarray, n: int = 9, img_size: int = 640, anchor_t: float = 4.0, gens: int = 1000,
                   seed: int = 0) -> np.ndarray:
    """Anchors for boxes of relative sizes ``wh``, as YOLOv5's ``kmean_anchors``.

    Args:
        wh: ``(N, 2)`` box widths and heights as fractions of their image's longer side (scaled by
            ``img_size`` here: the letterbox maps the longer side to ``img_size``).
        n: number of anchors (``na`` per level x levels). img_size: training image size (pixels).
        anchor_t: matching ratio of the loss (its fitness threshold). gens: evolution generations after
            k-means (0: k-means only). seed: seeds k-means++ and the evolution.
    Returns: ``(n, 2)`` anchors in pixels, smallest area first (finest level first when split in levels).
    """
    wh = np.asarray(wh, np.float64).reshape(-1, 2) * img_size
    wh = wh[(wh >= MIN_WH).all(1)]
    if len(wh) < n:
        raise ValueError(f"kmeans_anchors: {len(wh)} boxes of at least {MIN_WH:g} px at {img_size} px, need >= {n}")
    rng = np.random.default_rng(seed)
    s = wh.std(0)  # whiten: k-means on sizes in units of their spread, as scipy's kmeans after whiten()
    k = _kmeans(wh / s, n, rng) * s
    thr = 1 / anchor_t
    best = _fitness(wh, k, thr)
    for _ in range(gens):  # mutate sizes by a few percent; keep a mutation only if the fitness improves
        v = np.ones_like(k)
        while (v == 1).all():
            v = ((rng.random(k.shape) < 0.9) * rng.random() * rng.standard_normal(k.shape) * 0.1 + 1).clip(0.3, 3.0)
        kg = (k * v).clip(min=MIN_WH)
        f = _fitness(wh, kg, thr)
        if f > best:
            best, k = f, kg
    return k[np.argsort(k.prod(1))]


def anchors_per_level(anchors: np.ndarray, nl: int) -> list[list[float]]:
    """``(n, 2)`` anchors, smallest first -> the cfg form: per level a flat ``[w1, h1, ...]``, rounded to 0.1 px."""
    anchors = np.asarray(anchors).reshape(nl, -1, 2)
    return [[round(float(v), 1) for v in level.reshape(-1)] for level in anchors]
