"""Semantic segmentation head: a light FPN-style decoder (Semantic FPN, Kirillov et al. 2019) to stride 4 or 8.

Every input level is gated by this head's own implicit representation (``TaskInput``), projected to a
common ``width`` by a 1x1 conv and resized to the finest level, where the levels are summed. The sum is
then upsampled by x2 steps (each followed by 3x3 convs) until the output stride is at most ``out_stride``
(4 by default), and an implicit-refined 1x1 conv (``RefinedConv``) predicts the class logits.

Why stride 4 and not full resolution: stuff classes are large, smooth regions; stride-4 logits upsampled
bilinearly lose almost nothing in mIoU while costing 1/16 of the memory of full-resolution maps. The loss
and evaluation upsample the logits with :func:`utils.ops.letterbox.upsample_logits`. ``out_stride`` 8 keeps
the decoder at the finest input level (P3/8): its two 3x3 convs then cost a quarter, which at the nano width
is most of the head's training time (see ``cfg/yolor-mt.yaml`` for what was measured).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Conv
from models.heads.base import RefinedConv, TaskInput
from utils.ops.letterbox import upsample_logits

MAX_OUT_STRIDE = 4  # default: the logits are produced at this stride or finer


@dataclass
class SemOutput:
    """What the semantic head returns.

    Attributes:
        logits: ``(B, K, H / s, W / s)`` raw class scores at output stride ``s`` (4 for inputs at
            strides 8, 16, 32), ``K`` = number of semantic classes.
        stride: the output stride ``s`` of ``logits`` relative to the input image.
    """

    logits: torch.Tensor
    stride: float = MAX_OUT_STRIDE

    def upsample(self, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """``logits`` bilinearly resized to ``size = (H, W)``, e.g. the input image size."""
        return upsample_logits(self.logits, size)


class SemanticHead(nn.Module):
    """FPN-style semantic segmentation decoder over several pyramid levels.

    Args:
        nc: number of object classes (unused; every head receives it from the parser).
        ch: channels of each input level.
        strides: stride of each input level relative to the image (same order as ``ch``).
        width: channels of the decoder (cfg args ``[width, out_stride]``).
        out_stride: the logits' stride is at most this (x2 upsampling steps from the finest level until it is).
        num_classes: number of semantic classes ``K`` (given via ``head_kwargs["sem"]``); must be >= 1.
        form: implicit knowledge form of the task input and prediction refinement (see models.implicit).
    """

    task = "sem"

    def __init__(self, nc: int, ch: list[int], strides: list[float], width: int = 64,
                 out_stride: float = MAX_OUT_STRIDE, num_classes: int = 0, form: str = "vector"):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"SemanticHead: num_classes must be an int >= 1 (the number of semantic classes), got "
                f"{num_classes!r}; pass it as head_kwargs={{'sem': {{'num_classes': K}}}}"
            )
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"SemanticHead: width must be a positive int, got {width!r}")
        if isinstance(out_stride, bool) or not isinstance(out_stride, (int, float)) or out_stride < 1:
            raise ValueError(f"SemanticHead: out_stride must be a number >= 1, got {out_stride!r}")
        if len(ch) == 0 or len(ch) != len(strides):
            raise ValueError(f"SemanticHead: need one stride per input level, got ch={ch} strides={strides}")
        self.nc, self.num_classes, self.width, self.nl = nc, num_classes, width, len(ch)
        self.strides = [float(s) for s in strides]
        self.finest = min(range(self.nl), key=lambda i: self.strides[i])
        s0 = self.strides[self.finest]
        # x2 steps needed to bring the finest level to stride <= out_stride (none if it already is)
        self.n_up = max(0, math.ceil(math.log2(s0 / out_stride) - 1e-9))
        self.out_stride = s0 / 2 ** self.n_up

        self.task_in = nn.ModuleList(TaskInput(c, form) for c in ch)
        self.lateral = nn.ModuleList(Conv(c, width, 1) for c in ch)
        # each x2 step is followed by two 3x3 convs that smooth the upsampled sum; with no step the two
        # convs still run, so the decoder depth does not depend on the input strides
        self.up = nn.ModuleList(nn.Sequential(Conv(width, width, 3), Conv(width, width, 3))
                                for _ in range(max(1, self.n_up)))
        self.pred = RefinedConv(width, num_classes, form)

    def forward(self, xs: list[torch.Tensor]) -> SemOutput:
        """``xs``: the input levels, ``(B, ch[i], H / strides[i], W / strides[i])``."""
        if len(xs) != self.nl:
            raise ValueError(f"SemanticHead expects {self.nl} input levels, got {len(xs)}")
        size = xs[self.finest].shape[-2:]
        y = None
        for i, x in enumerate(xs):
            x = self.lateral[i](self.task_in[i](x))
            if x.shape[-2:] != size:  # sizes, not factors: odd image sizes round differently per level
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = x if y is None else y + x
        for i, block in enumerate(self.up):
            if i < self.n_up:
                y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
            y = block(y)
        return SemOutput(self.pred(y), self.out_stride)

    def fuse(self) -> None:
        """Folds the per-task input multipliers into the lateral convs and the refinement into ``pred``.

        Exact in any mode; call after (or before) ``Conv.fuse()`` on the convs. Afterwards the head holds
        no implicit layer.
        """
        for ti, lat in zip(self.task_in, self.lateral):
            ti.fold_into([lat])
        self.pred.fuse()
