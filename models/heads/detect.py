"""Detection head: anchor-free, decoupled box/class branches, distribution focal loss box coding.

Why anchor-free (DFL + task-aligned assignment) is the default rather than YOLOR's anchor boxes
(:class:`~models.heads.detect_anchor.DetectAnchor` with the YOLOv5/v7 loss), measured: the det-only nano
model, both heads trained alike (embedded shapes set, 8 epochs at 192 px, batch 16, seed 0,
hyp.short.yaml, 1 CPU thread), the anchors k-means-fitted to the training boxes (best possible recall 1.0):

    python -m benchmarks.det_head --epochs 8 --img 192 --hyp data/hyps/hyp.short.yaml --threads 1 --workers 0

    head          box mAP50-95  mAP50   params  GFLOPs (192 px)  train img/s
    Detect        0.206         0.313   1.97M   0.49             21.6
    DetectAnchor  0.118         0.232   1.63M   0.36             24.9

The anchor-based head is lighter (one 1x1 conv per level instead of two 3x3 towers) and 15% faster to
train, but reaches 57% of the mAP50-95 at the same budget, with anchors that fit the data, so the gap is
not a wrong-anchor effect; its objectness has to learn background on every cell first (mAP 0.01 after 4
of 8 epochs, against 0.09). The measurement is one short budget and also compares head capacity;
YOLOv5's gains were tuned for long SGD runs. Besides accuracy: anchors are dataset statistics that a user's
own data needs re-clustered (utils/ops/anchors.py), and the instance head pairs its mask coefficients with
anchor points, which only this head has.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.heads.base import RefinedConv, TaskInput, stem
from utils.ops.boxes import dist2bbox, make_anchors


@dataclass
class DetOutput:
    """What the detection head returns.

    Attributes:
        feats: per level the head's raw maps (what its loss reads): ``(B, 4 * reg_max + nc, H, W)`` for
            :class:`Detect`, ``(B, na * (5 + nc), H, W)`` for :class:`~models.heads.detect_anchor.DetectAnchor`.
        pred: ``(B, A, 4 + nc)`` decoded boxes ``x1 y1 x2 y2`` in input pixels followed by class
            probabilities, over all ``A`` anchor points (anchor boxes for ``DetectAnchor``); ``None`` in
            training mode.
    """

    feats: list[torch.Tensor]
    pred: torch.Tensor | None = None


class Detect(nn.Module):
    """Decoupled anchor-free detection head over several pyramid levels."""

    task = "det"
    anchor_free = True  # one pred row per anchor point: what the instance head's coefficients pair with

    def __init__(self, nc: int, ch: list[int], strides: list[int], reg_max: int = 16, form: str = "vector"):
        super().__init__()
        self.nc, self.reg_max, self.nl = nc, reg_max, len(ch)
        self.strides = [int(s) for s in strides]
        c_box = max(16, ch[0] // 4, reg_max * 4)
        c_cls = max(ch[0], min(nc, 100))
        self.task_in = nn.ModuleList(TaskInput(c, form) for c in ch)
        self.box_stem = nn.ModuleList(stem(c, c_box) for c in ch)
        self.cls_stem = nn.ModuleList(stem(c, c_cls) for c in ch)
        self.box_out = nn.ModuleList(RefinedConv(c_box, 4 * reg_max, form) for _ in ch)
        self.cls_out = nn.ModuleList(RefinedConv(c_cls, nc, form) for _ in ch)
        self.register_buffer("proj", torch.arange(reg_max, dtype=torch.float32), persistent=False)
        self.init_biases()

    def init_biases(self) -> None:
        """Class priors so early training is not swamped by background (RetinaNet / YOLOv8 init)."""
        for box, cls, s in zip(self.box_out, self.cls_out, self.strides):
            nn.init.constant_(box.conv.bias, 1.0)
            nn.init.constant_(cls.conv.bias, math.log(5 / self.nc / (640 / s) ** 2))

    def forward(self, xs: list[torch.Tensor]) -> DetOutput:
        feats = []
        for i, x in enumerate(xs):
            x = self.task_in[i](x)
            feats.append(torch.cat((self.box_out[i](self.box_stem[i](x)), self.cls_out[i](self.cls_stem[i](x))), 1))
        if self.training:
            return DetOutput(feats)
        return DetOutput(feats, self.decode(feats))

    def class_maps(self, out: DetOutput) -> list[torch.Tensor]:
        """Per level ``(B, nc, H, W)`` class probabilities of ``out`` (what the caption head reads), no gradient."""
        return [f[:, 4 * self.reg_max:].detach().sigmoid() for f in out.feats]

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Raw maps -> ``(B, A, 4 + nc)`` boxes in input pixels and class probabilities."""
        b = feats[0].shape[0]
        points, stride = make_anchors([f.shape[2:] for f in feats], self.strides, feats[0].device, feats[0].dtype)
        x = torch.cat([f.view(b, 4 * self.reg_max + self.nc, -1) for f in feats], 2).transpose(1, 2)
        box, cls = x.split((4 * self.reg_max, self.nc), 2)
        dist = self.dfl_decode(box)
        boxes = dist2bbox(dist, points.unsqueeze(0)) * stride.unsqueeze(0)
        return torch.cat((boxes, cls.sigmoid()), 2)

    def dfl_decode(self, box: torch.Tensor) -> torch.Tensor:
        """``(..., 4 * reg_max)`` logits -> ``(..., 4)`` expected distances in grid units."""
        shape = box.shape[:-1]
        prob = box.view(*shape, 4, self.reg_max).softmax(-1)
        return (prob * self.proj.to(prob.dtype)).sum(-1)

    def fuse(self) -> None:
        """Folds the per-task input multipliers and the prediction refinements into their convs."""
        for i in range(self.nl):
            self.task_in[i].fold_into([self.box_stem[i][0], self.cls_stem[i][0]])
            self.box_out[i].fuse()
            self.cls_out[i].fuse()
