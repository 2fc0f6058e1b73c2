"""Anchor-based detection head (YOLOR / YOLOv7 ``IDetect`` style): ``na`` anchor boxes per cell and level.

Each level is one implicit-refined 1x1 conv predicting ``na * (5 + nc)`` maps: for every anchor the box
``x y w h`` offsets, an objectness logit and the class logits, decoded with the YOLOv5/v7 box coding
(:func:`decode_boxes`). Its loss is :class:`utils.loss.detection_anchor.AnchorDetectionLoss`. The eval-mode
output is the same ``DetOutput`` as the anchor-free :class:`~models.heads.detect.Detect`, so NMS, test.py,
detect.py and export.py read either head unchanged. Which head is the default and why: see ``detect.py``.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import box_convert

from models.heads.base import RefinedConv, TaskInput
from models.heads.detect import DetOutput
from utils.ops.boxes import make_anchors

# YOLOv5's COCO anchors (pixels at 640) for P3/8, P4/16, P5/32: one flat ``[w1, h1, w2, h2, ...]`` per level
COCO_ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def decode_boxes(raw: torch.Tensor, cells: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """YOLOv5/v7 box coding: ``(..., 4)`` logits -> ``(..., 4)`` centre ``x y`` and ``w h``.

    ``xy = 2 * sigmoid - 0.5 + cell``: a centre may lie up to half a cell outside its own cell, which is what
    lets the loss also train the two neighbouring cells. ``wh = (2 * sigmoid)^2 * anchor``: at most 4x the
    anchor, hence the loss's ``anchor_t = 4`` matching limit. ``cells`` (top-left corners) and ``anchors``
    broadcast against ``raw[..., :2]``; the result is in their unit (grid cells in the loss).
    """
    y = raw.sigmoid()
    return torch.cat((y[..., :2] * 2 - 0.5 + cells, (y[..., 2:4] * 2) ** 2 * anchors), -1)


def parse_anchors(anchors: list[list[float]] | None, nl: int) -> torch.Tensor:
    """Cfg anchors (one flat ``[w1, h1, w2, h2, ...]`` list of pixels per level) -> ``(nl, na, 2)``."""
    anchors = COCO_ANCHORS if anchors is None else anchors
    if not isinstance(anchors, (list, tuple)) or len(anchors) != nl:
        raise ValueError(f"anchors: need one list per input level ({nl}), got {anchors!r}")
    sizes = {len(a) if isinstance(a, (list, tuple)) else -1 for a in anchors}
    if len(sizes) != 1 or (n := sizes.pop()) < 2 or n % 2:
        raise ValueError(f"anchors: every level needs the same number of (w, h) pairs, got {anchors!r}")
    t = torch.tensor(anchors, dtype=torch.float32).view(nl, -1, 2)
    if not (t > 0).all():
        raise ValueError(f"anchors: sizes must be positive pixels, got {anchors!r}")
    return t


class DetectAnchor(nn.Module):
    """Anchor-based detection head over several pyramid levels (YOLOR implicit knowledge, YOLOv5 coding).

    Args:
        nc: number of classes. ch: channels of the input levels, finest first. strides: their strides.
        anchors: per level a flat ``[w1, h1, w2, h2, ...]`` list of anchor sizes in input pixels
            (default: YOLOv5's COCO anchors for P3-P5 at 640; fit them to the data with
            :func:`utils.ops.anchors.kmeans_anchors`).
        form: implicit form of the head's implicit layers (``vector`` | ``nn`` | ``mf``).
    """

    task = "det"
    anchor_free = False  # pred rows are anchors, not anchor points: the instance head cannot pair with it

    def __init__(self, nc: int, ch: list[int], strides: list[float], anchors: list[list[float]] | None = None,
                 form: str = "vector"):
        super().__init__()
        if len(ch) != len(strides) or not ch:
            raise ValueError(f"DetectAnchor needs one stride per input level, got ch={ch} strides={strides}")
        self.nc, self.nl, self.no = nc, len(ch), 5 + nc
        self.strides = [int(s) for s in strides]
        # from the cfg, not the state dict: --weights transfer must not overwrite the anchors a cfg asks for
        self.register_buffer("anchors", parse_anchors(anchors, self.nl), persistent=False)  # (nl, na, 2) pixels
        self.na = self.anchors.shape[1]
        self.task_in = nn.ModuleList(TaskInput(c, form) for c in ch)
        self.out = nn.ModuleList(RefinedConv(c, self.na * self.no, form) for c in ch)
        self.init_biases()

    def init_biases(self) -> None:
        """YOLOv5's priors: ~8 objects per 640 image spread over a level's cells, classes near uniform."""
        with torch.no_grad():
            for out, s in zip(self.out, self.strides):
                b = out.conv.bias.view(self.na, self.no)
                b[:, 4] += math.log(8 / (640 / s) ** 2)
                b[:, 5:] += math.log(0.6 / (self.nc - 0.99999))

    def forward(self, xs: list[torch.Tensor]) -> DetOutput:
        feats = [self.out[i](self.task_in[i](x)) for i, x in enumerate(xs)]
        if self.training:
            return DetOutput(feats)
        return DetOutput(feats, self.decode(feats))

    def level_view(self, f: torch.Tensor) -> torch.Tensor:
        """``(B, na * (5 + nc), H, W)`` map -> ``(B, na, H, W, 5 + nc)`` (how the loss indexes it)."""
        b, _, h, w = f.shape
        return f.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2)

    def class_maps(self, out: DetOutput) -> list[torch.Tensor]:
        """Per level ``(B, nc, H, W)`` class probabilities of ``out`` (objectness x class, the likeliest anchor of
        each cell; what the caption head reads), no gradient."""
        maps = []
        for f in out.feats:
            b, _, h, w = f.shape
            x = f.detach().view(b, self.na, self.no, h, w)
            maps.append((x[:, :, 4:5].sigmoid() * x[:, :, 5:].sigmoid()).amax(1))
        return maps

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Raw maps -> ``(B, A, 4 + nc)``: ``x1 y1 x2 y2`` in input pixels, then ``objectness * class``.

        ``A = na * sum(H * W)``, ordered level, anchor, row, column.
        """
        out = []
        for f, s, anchors in zip(feats, self.strides, self.anchors):
            b = f.shape[0]
            x = f.view(b, self.na, self.no, -1).transpose(2, 3)  # (B, na, HW, no); -1 keeps ONNX shapes dynamic
            cells, _ = make_anchors([f.shape[2:]], [s], f.device, f.dtype, offset=0.0)  # (HW, 2) x y
            xywh = decode_boxes(x[..., :4], cells, (anchors / s).to(f.dtype)[:, None]) * s
            y = x[..., 4:].sigmoid()
            pred = torch.cat((box_convert(xywh, "cxcywh", "xyxy"), y[..., :1] * y[..., 1:]), -1)
            out.append(pred.reshape(b, -1, 4 + self.nc))
        return torch.cat(out, 1)

    def fuse(self) -> None:
        """Folds each level's refinement, then its input multiplier, into the prediction conv.

        Order matters: the forward pass is ``im(conv(m * x + a))``. Folding the refinement first moves ``a``
        into the conv's bias, so the multiplier folded next scales the input only, as in the forward pass.
        """
        for task_in, out in zip(self.task_in, self.out):
            out.fuse()
            task_in.fold_into([out])
