"""Sums the loss of every head the model has, each masked to the images that carry that task's labels."""
from __future__ import annotations

import torch

from models.model import Model, Outputs
from utils.data.dataset import Batch
from utils.loss.detection import DetectionLoss


class MultiTaskLoss:
    """``loss(outputs, batch) -> (total, parts)``; ``parts`` are floats keyed ``<task>_<part>``.

    ``task_weights`` scale each task's total (fixed gains; dynamic balancing updates them per epoch).
    """

    def __init__(self, model: Model, hyp: dict):
        self.tasks = model.tasks
        self.det = DetectionLoss(model.head("det"), hyp) if "det" in self.tasks else None
        self.task_weights = {t: 1.0 for t in self.tasks}

    def task_losses(self, out: Outputs, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Unweighted loss per task plus the logged parts."""
        losses, parts = {}, {}
        if self.det is not None:
            loss, p = self.det(out.det.feats, batch.targets, batch.task_present("det"))
            losses["det"] = loss
            parts.update({f"det_{k}": v for k, v in p.items()})
        return losses, parts

    def __call__(self, out: Outputs, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        losses, parts = self.task_losses(out, batch)
        total = sum(self.task_weights[t] * v for t, v in losses.items())
        return total, parts
