"""Pieces every head shares: its per-task implicit representation and implicit-refined output convs.

YOLOR gives each task its own implicit knowledge. Here a head's input is gated per channel by a
task-specific ``ImplicitM`` (the canonical representation is shared, the multiplier is the task's view
of it) and each prediction conv is refined YOLOR-style: ``ImplicitA`` before, ``ImplicitM`` after.
Both placements fold exactly: a multiplier into the next conv even when it is a padded 3x3, an add
only into a 1x1 conv.
"""
from __future__ import annotations

import torch
from torch import nn

from models.common import Conv
from models.implicit import (
    ImplicitA,
    ImplicitM,
    fold_into_next_conv,
    fold_into_prev_conv,
)


class TaskInput(nn.Module):
    """A head's own implicit representation of one input level, applied before its stem convs."""

    def __init__(self, channels: int, form: str = "vector"):
        super().__init__()
        self.implicit: nn.Module = ImplicitM(channels, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit(x)

    def fold_into(self, consumers: list[Conv | RefinedConv]) -> None:
        """Folds the multiplier into every conv that reads this input, then removes it.

        A consumer is anything whose ``.conv`` (an ``nn.Conv2d``) reads this input first: a stem ``Conv``, or a
        ``RefinedConv`` whose own refinement was fused already (its ``ImplicitA`` would otherwise sit between).
        """
        if isinstance(self.implicit, ImplicitM):
            for conv in consumers:
                conv.conv = fold_into_next_conv(self.implicit, conv.conv)
            self.implicit = nn.Identity()


class RefinedConv(nn.Module):
    """A 1x1 prediction conv with YOLOR's prediction refinement: ``im(conv(ia(x)))``."""

    def __init__(self, c1: int, c2: int, form: str = "vector"):
        super().__init__()
        self.ia: nn.Module = ImplicitA(c1, form)
        self.conv = nn.Conv2d(c1, c2, 1)
        self.im: nn.Module = ImplicitM(c2, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.im(self.conv(self.ia(x)))

    def fuse(self) -> None:
        if isinstance(self.ia, ImplicitA):
            self.conv = fold_into_next_conv(self.ia, self.conv)
            self.conv = fold_into_prev_conv(self.conv, self.im)
            self.ia, self.im = nn.Identity(), nn.Identity()


def stem(c1: int, c2: int, n: int = 2) -> nn.Sequential:
    """``n`` 3x3 Conv-BN-SiLU layers: the per-level tower in front of a prediction conv."""
    return nn.Sequential(*(Conv(c1 if i == 0 else c2, c2, 3) for i in range(n)))
