"""Exponential moving average of model weights (YOLOv5's ModelEMA), with a warm-up ramp."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """Keeps ``ema = d * ema + (1 - d) * model`` with ``d`` ramping to ``decay`` over ``tau`` updates."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = copy.deepcopy(unwrap(model)).eval()
        self.updates, self.decay, self.tau = updates, decay, tau
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def d(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.d()
        msd = unwrap(model).state_dict()
        seen: set[int] = set()
        for k, v in self.ema.state_dict().items():
            # a tied weight (the caption head's embedding = output projection) is one tensor under two names:
            # averaging it once per name would apply the decay twice
            if v.numel() and v.data_ptr() in seen:
                continue
            seen.add(v.data_ptr())
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model
