"""Instance segmentation head: per-anchor mask coefficients plus shared prototype masks (YOLACT / YOLOv8-seg).

Why prototypes rather than a per-RoI mask branch (Mask R-CNN): the coefficients live on exactly the
anchor points of :class:`~models.heads.detect.Detect`, so the detection assignment is reused as is and
inference stays one dense pass; a mask is ``sigmoid(coeffs @ protos)`` cropped to the detected box
(see :mod:`utils.ops.masks`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.common import Conv
from models.heads.base import RefinedConv, TaskInput, stem

__all__ = ["InstOutput", "InstanceHead"]

PROTO_STRIDE = 4  # prototype resolution the head aims for (YOLOv8-seg's mask ratio)


@dataclass
class InstOutput:
    """What the instance head returns (the same in training and eval mode).

    Attributes:
        coeffs: ``(B, A, nm)`` mask coefficients over all ``A`` anchor points, levels concatenated in the
            order of :class:`~models.heads.detect.Detect`'s ``pred`` (row ``a`` belongs to anchor ``a``).
        protos: ``(B, nm, H / 4, W / 4)`` prototype masks (stride ``InstanceHead.proto_stride``).
    """

    coeffs: torch.Tensor
    protos: torch.Tensor


class InstanceHead(nn.Module):
    """Mask coefficients per anchor point of every level and ``nm`` prototypes from the finest level.

    Args:
        nc: number of classes (unused: classes come from the detection head; kept for the parser's
            uniform head signature).
        ch: channels of the input levels, finest first. strides: their strides.
        nm: number of prototypes (= coefficients per anchor). npr: channels of the prototype branch.
        form: implicit form of this head's implicit representation (``vector`` | ``nn`` | ``mf``).
    """

    task = "inst"

    def __init__(self, nc: int, ch: list[int], strides: list[float], nm: int = 32, npr: int = 64,
                 form: str = "vector"):
        super().__init__()
        if len(ch) != len(strides) or not ch:
            raise ValueError(f"InstanceHead needs one stride per input level, got ch={ch} strides={strides}")
        self.nc, self.nm, self.npr, self.nl = nc, int(nm), int(npr), len(ch)
        self.strides = [int(s) for s in strides]
        c4 = max(ch[0] // 4, self.nm)
        self.task_in = nn.ModuleList(TaskInput(c, form) for c in ch)
        self.coef_stem = nn.ModuleList(stem(c, c4, n=2) for c in ch)
        self.coef_out = nn.ModuleList(RefinedConv(c4, self.nm, form) for _ in ch)
        # Upsample the finest level just enough to reach stride 4 (x2 for the usual P3/8); a level that
        # is already at stride <= 4 is used as is.
        up = max(1, int(round(self.strides[0] / PROTO_STRIDE)))
        self.proto_stride = self.strides[0] / up
        self.proto_in = TaskInput(ch[0], form)  # the prototypes' own view of the shared features
        self.proto = nn.Sequential(
            Conv(ch[0], self.npr, 3),
            nn.Upsample(scale_factor=up, mode="nearest") if up > 1 else nn.Identity(),
            Conv(self.npr, self.npr, 3),
            Conv(self.npr, self.nm, 1),
        )

    def forward(self, xs: list[torch.Tensor]) -> InstOutput:
        if len(xs) != self.nl:
            raise ValueError(f"InstanceHead expects {self.nl} input levels, got {len(xs)}")
        b = xs[0].shape[0]
        coeffs = []
        for i, x in enumerate(xs):
            c = self.coef_out[i](self.coef_stem[i](self.task_in[i](x)))
            coeffs.append(c.view(b, self.nm, -1))
        protos = self.proto(self.proto_in(xs[0]))
        return InstOutput(coeffs=torch.cat(coeffs, 2).transpose(1, 2), protos=protos)

    def fuse(self) -> None:
        """Folds the task-input multipliers into the first stem / prototype conv and the refinements into
        the coefficient convs. BatchNorms are folded by ``Conv.fuse()`` (``Model.fuse`` does both)."""
        for i in range(self.nl):
            self.task_in[i].fold_into([self.coef_stem[i][0]])
            self.coef_out[i].fuse()
        self.proto_in.fold_into([self.proto[0]])
