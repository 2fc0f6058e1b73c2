"""Semantic segmentation metrics from an accumulated confusion matrix: mIoU, pixel accuracy."""
from __future__ import annotations

import numpy as np
import torch

from utils.tasks import IGNORE_INDEX


class SemanticMeter:
    """Accumulates a ``(K, K)`` confusion matrix (rows = ground truth, columns = prediction).

    Pixels whose target is ``IGNORE_INDEX`` (255) or whose ``valid`` mask is false are not counted. Pixels
    whose target is neither 255 nor in ``[0, K)`` are ignored too, but counted in ``unknown_pixels`` so a
    label-mapping mistake is visible instead of silently shrinking the evaluated area.
    """

    def __init__(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"SemanticMeter: num_classes must be an int >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        """Clears the accumulated counts."""
        self.confusion = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)
        self.unknown_pixels = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Adds one batch.

        Args:
            pred: ``(B, H, W)`` predicted class indices in ``[0, K)`` (e.g. the argmax of the logits).
            target: ``(B, H, W)`` ground truth indices (uint8 or integer), 255 = ignore.
            valid: optional ``(B, H, W)`` bool; false pixels are skipped (e.g. letterbox padding).
        """
        if pred.shape != target.shape:
            raise ValueError(f"SemanticMeter: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        k = self.num_classes
        pred = pred.long()
        target = target.to(pred.device).long()
        mask = target != IGNORE_INDEX
        if valid is not None:
            if valid.shape != target.shape:
                raise ValueError(f"SemanticMeter: valid {tuple(valid.shape)} and target {tuple(target.shape)} differ")
            mask &= valid.to(pred.device, torch.bool)
        known = (target >= 0) & (target < k)
        self.unknown_pixels += int((mask & ~known).sum())
        mask &= known
        p, t = pred[mask], target[mask]
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= k):
            raise ValueError(f"SemanticMeter: predictions must lie in [0, {k}), got [{int(p.min())}, {int(p.max())}]")
        # one bincount over flattened (target, pred) pairs builds the whole matrix
        counts = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        self.confusion += counts.cpu()

    def compute(self) -> dict:
        """Returns the metrics over everything accumulated so far.

        Returns a dict with:
            miou: mean IoU over the classes with a nonzero union, i.e. classes that appear in the ground truth
                or in the prediction (a class absent from both is undefined, not 0 or 1). 0.0 if no pixel
                was counted.
            pixel_acc: correctly labelled / counted pixels (0.0 if none).
            per_class_iou: list of ``K`` floats, ``NaN`` for classes absent from both.
            confusion: ``(K, K)`` int64 ``np.ndarray``, rows = ground truth, columns = prediction.
            pixels: number of counted pixels.
            unknown_pixels: pixels whose target was outside ``[0, K)`` and not 255 (not counted).
        """
        cm = self.confusion.numpy().astype(np.float64)
        tp = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
        total = cm.sum()
        defined = union > 0
        return {
            "miou": float(iou[defined].mean()) if defined.any() else 0.0,
            "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
            "per_class_iou": [float(v) for v in iou],
            "confusion": self.confusion.numpy().copy(),
            "pixels": int(total),
            "unknown_pixels": int(self.unknown_pixels),
        }

