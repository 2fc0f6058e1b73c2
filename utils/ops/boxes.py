"""Box math shared by heads, losses, metrics and drawing (pure tensor functions)."""
from __future__ import annotations

import numpy as np
import torch


def make_anchors(shapes: list[tuple[int, int]], strides: list[int], device: torch.device,
                 dtype: torch.dtype = torch.float32, offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points (cell centres, in grid units) and their strides for feature maps of ``shapes``.

    Returns ``points (A, 2)`` as ``x y`` and ``stride (A, 1)``, levels concatenated in order.
    """
    points, stride = [], []
    for (h, w), s in zip(shapes, strides):
        # arange in float32, cast after: the ONNX exporter cannot export an FP16 arange (export --half)
        sy = torch.arange(h, device=device, dtype=torch.float32) + offset
        sx = torch.arange(w, device=device, dtype=torch.float32) + offset
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((xx, yy), -1).view(-1, 2))
        stride.append(torch.full((h * w, 1), s, device=device, dtype=torch.float32))
    return torch.cat(points).to(dtype), torch.cat(stride).to(dtype)


def dist2bbox(distance: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(left, top, right, bottom) distances from ``points`` -> ``x1 y1 x2 y2`` (last dim)."""
    lt, rb = distance.chunk(2, -1)
    return torch.cat((points - lt, points + rb), -1)


def bbox2dist(points: torch.Tensor, boxes: torch.Tensor, reg_max: int) -> torch.Tensor:
    """``x1 y1 x2 y2`` -> distances from ``points``, clamped to the DFL range ``[0, reg_max - 1)``."""
    x1y1, x2y2 = boxes.chunk(2, -1)
    return torch.cat((points - x1y1, x2y2 - points), -1).clamp_(0, reg_max - 1 - 0.01)


def xyxy2xywh(boxes: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """``x1 y1 x2 y2`` -> ``x y w h`` with ``x y`` the top-left corner (COCO's bbox format)."""
    out = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, copy=True)
    out[..., 2] = boxes[..., 2] - boxes[..., 0]
    out[..., 3] = boxes[..., 3] - boxes[..., 1]
    return out


def scale_boxes(boxes: torch.Tensor, ratio: float, pad: tuple[float, float],
                orig_shape: tuple[int, int]) -> torch.Tensor:
    """Maps boxes from a letterboxed image back to the original image (in place) and clips them."""
    boxes[..., [0, 2]] -= pad[0]
    boxes[..., [1, 3]] -= pad[1]
    boxes[..., :4] /= ratio
    boxes[..., [0, 2]] = boxes[..., [0, 2]].clamp(0, orig_shape[1])
    boxes[..., [1, 3]] = boxes[..., [1, 3]].clamp(0, orig_shape[0])
    return boxes
