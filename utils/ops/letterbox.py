"""The network-input transform of one image and its inverse: :class:`Letterbox` records how an original image
became the network input (``utils.data.augment.letterbox`` makes it, the loader and inference preprocessing
carry it) and maps boxes, masks and logits back; :func:`to_float` is the device-side half of the input.

The crop of the letterbox padding is written once here (:meth:`Letterbox.inner`): letterbox pads by whole
pixels around a ``round(size * ratio)`` image, and every map that goes back to original pixels crops exactly
that region before resizing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from utils.ops.boxes import scale_boxes
from utils.ops.masks import resize_masks_windowed

__all__ = ["Letterbox", "to_float"]


def to_float(images: torch.Tensor, device: torch.device, half: bool = False) -> torch.Tensor:
    """uint8 RGB batch -> float in [0, 1] on ``device`` (half precision only where asked, i.e. CUDA)."""
    x = images.to(device, non_blocking=True)
    return (x.half() if half else x.float()) / 255.0


@dataclass(frozen=True)
class Letterbox:
    """How an original image of ``orig_shape`` ``(h, w)`` became a network input of ``input_shape``: a point
    maps as ``x' = x * ratio + pad_w``, ``y' = y * ratio + pad_h`` (see ``utils.data.augment.letterbox``)."""

    ratio: float
    pad: tuple[float, float]
    orig_shape: tuple[int, int]
    input_shape: tuple[int, int]

    @classmethod
    def identity(cls, shape: tuple[int, int]) -> Letterbox:
        """An input that is its own original (an augmented training image: there is nothing to map back to)."""
        shape = (int(shape[0]), int(shape[1]))
        return cls(1.0, (0.0, 0.0), shape, shape)

    def inner(self, shape: tuple[int, int] | torch.Size | None = None) -> tuple[slice, slice]:
        """``(rows, cols)`` slices of the image inside the padding, in a map of ``shape`` (default the input).

        The size is clipped to the map so a map a pixel smaller than the input (rounding) still crops."""
        H, W = (int(shape[-2]), int(shape[-1])) if shape is not None else self.input_shape
        h0, w0 = int(self.orig_shape[0]), int(self.orig_shape[1])
        left, top = int(round(self.pad[0])), int(round(self.pad[1]))
        uw = min(max(1, int(round(w0 * self.ratio))), W - left)
        uh = min(max(1, int(round(h0 * self.ratio))), H - top)
        return slice(top, top + uh), slice(left, left + uw)

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(n, 4)`` ``x1 y1 x2 y2`` in input pixels -> float32 boxes in original pixels, clipped (a copy)."""
        return scale_boxes(boxes.clone().float(), self.ratio, self.pad, self.orig_shape)

    def masks_to_original(self, masks: torch.Tensor) -> torch.Tensor:
        """``(n, H, W)`` bool masks at input resolution -> ``(n, h0, w0)`` bool at the original size.

        The padding is cropped off and the rest resized bilinearly and thresholded at 0.5, which keeps edges
        smoother than a nearest-neighbour resize when upscaling; each mask only over the window its pixels
        reach (:func:`~utils.ops.masks.resize_masks_windowed`), so ``n`` float maps at the original size never
        exist.
        """
        rows, cols = self.inner(masks.shape)
        return resize_masks_windowed(masks[:, rows, cols], (int(self.orig_shape[0]), int(self.orig_shape[1])))

    def labels_to_original(self, logits: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """``(K, H, W)`` class scores at input resolution -> ``(h0, w0)`` int64 argmax at the original size.

        The logits are resized bilinearly (not the argmax), so class boundaries land between original pixels
        as the COCO-Stuff / ADE20K / Cityscapes evaluations resize them. ``chunk`` classes are resized at a
        time with a running maximum: the same labels as resizing all K planes at once (bilinear works per
        plane; ties keep the first class, as ``argmax``), without holding K full-size planes (171 classes of
        a 1080p frame would be 1.4 GB).
        """
        rows, cols = self.inner(logits.shape)
        inner = logits[None, :, rows, cols].float()
        size = (int(self.orig_shape[0]), int(self.orig_shape[1]))
        best = label = None
        for start in range(0, inner.shape[1], chunk):
            value, index = F.interpolate(inner[:, start:start + chunk], size=size, mode="bilinear",
                                         align_corners=False)[0].max(0)
            if best is None:
                best, label = value, index
            else:
                better = value > best  # strictly: an equal score keeps the earlier class
                best, label = torch.where(better, value, best), torch.where(better, index + start, label)
        return label

    def fill_padding(self, label_map: np.ndarray, value: int) -> np.ndarray:
        """A copy of an input-resolution ``(H, W)`` map with ``value`` outside the letterboxed image."""
        out = np.full_like(label_map, value)
        rows, cols = self.inner(label_map.shape)
        out[rows, cols] = label_map[rows, cols]
        return out


def upsample_logits(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinearly resizes ``(B, K, h, w)`` logits to ``size = (H, W)`` (``align_corners=False``).

    Logits (not probabilities or labels) are interpolated so the argmax boundaries fall between pixels
    smoothly; this is the same resize the loss uses, so training and evaluation agree.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
