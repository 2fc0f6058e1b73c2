"""The network-input transform of one image, both ways: :func:`letterbox_image` resizes and pads an image (and
its semantic map) into the network input and returns the :class:`Letterbox` record of it, which the loader and
inference preprocessing carry and which maps boxes, masks and logits back; :func:`to_float` is the device-side
half of the input. ``utils.data.augment.letterbox`` moves a training ``Sample``'s labels along with the pixels.

The crop of the letterbox padding is written once here (:meth:`Letterbox.inner`): letterbox pads by whole
pixels around a ``round(size * ratio)`` image, and every map that goes back to original pixels crops exactly
that region before resizing.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from utils.ops.boxes import scale_boxes
from utils.ops.masks import resize_masks_windowed
from utils.tasks import IGNORE_INDEX

__all__ = ["FILL", "RESIZE_NEAREST", "Letterbox", "letterbox_image", "to_float"]

FILL = 114  # grey used by YOLOv5 for image padding / borders
# centre-aligned nearest neighbour where OpenCV has it: a resized label map gets no new class values and no shift
RESIZE_NEAREST = getattr(cv2, "INTER_NEAREST_EXACT", cv2.INTER_NEAREST)


def to_float(images: torch.Tensor, device: torch.device, half: bool = False) -> torch.Tensor:
    """uint8 RGB batch -> float in [0, 1] on ``device`` (half precision only where asked, i.e. CUDA)."""
    x = images.to(device, non_blocking=True)
    return (x.half() if half else x.float()) / 255.0


@dataclass(frozen=True)
class Letterbox:
    """How an original image of ``orig_shape`` ``(h, w)`` became a network input of ``input_shape``: a point
    maps as ``x' = x * ratio + pad_w``, ``y' = y * ratio + pad_h`` (see :func:`letterbox_image`)."""

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

    def scales(self) -> tuple[float, float]:
        """``(sx, sy)``: the exact per-axis scale of the resized pixels (the resized size over the original),
        which differs from ``ratio`` only by the rounding of the resized size; labels move by it."""
        rows, cols = self.inner()
        return (cols.stop - cols.start) / int(self.orig_shape[1]), (rows.stop - rows.start) / int(self.orig_shape[0])

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


def letterbox_image(image: np.ndarray, new_shape: int | tuple[int, int],
                    color: tuple[int, int, int] = (FILL, FILL, FILL), scaleup: bool = True, auto: bool = False,
                    stride: int = 32, semantic: np.ndarray | None = None, long_side: int | None = None,
                    ) -> tuple[np.ndarray, np.ndarray | None, Letterbox]:
    """Resizes ``image`` keeping the aspect ratio, then pads it to ``new_shape`` (``int`` or ``(h, w)``).

    The image is resized with ``INTER_LINEAR``, the optional ``semantic`` map with (centre-aligned) nearest
    neighbour so no new class values appear; image padding is ``color``, map padding ``IGNORE_INDEX``.
    ``scaleup=False`` only ever shrinks (better val mAP, as in YOLOv5); ``auto=True`` pads only up to
    the next multiple of ``stride`` (minimum rectangle) instead of to ``new_shape``. ``long_side`` caps the
    resized image's longer side: a ``--rect`` validation shape is up to a stride larger than the image size
    (YOLOv5's half-stride pad) and, as in YOLOv5 (which loads at the image size, then pads), only adds padding,
    so objects keep the scale they have in square validation.

    Returns ``(image, semantic, Letterbox(ratio, (pad_w, pad_h), orig_shape, input_shape))``: a point maps as
    ``x' = x * ratio + pad_w`` (same for y), so predictions map back with ``(x' - pad_w) / ratio`` (the
    record's ``*_to_original`` methods). The inputs are not modified.
    """
    h, w = image.shape[:2]
    new_h, new_w = (new_shape, new_shape) if isinstance(new_shape, int) else new_shape
    r = min(new_h / h, new_w / w)
    if not scaleup:
        r = min(r, 1.0)
    if long_side is not None:
        r = min(r, long_side / max(h, w))
    unpad_w, unpad_h = max(1, int(round(w * r))), max(1, int(round(h * r)))
    dw, dh = new_w - unpad_w, new_h - unpad_h
    if auto:
        dw, dh = dw % stride, dh % stride
    left, top = dw // 2, dh // 2
    right, bottom = dw - left, dh - top

    if (unpad_w, unpad_h) != (w, h):
        image = cv2.resize(image, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
        if semantic is not None:
            semantic = cv2.resize(semantic, (unpad_w, unpad_h), interpolation=RESIZE_NEAREST)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=tuple(color))
    if semantic is not None:
        semantic = cv2.copyMakeBorder(semantic, top, bottom, left, right, cv2.BORDER_CONSTANT,
                                      value=IGNORE_INDEX)
    return image, semantic, Letterbox(r, (float(left), float(top)), (h, w), tuple(image.shape[:2]))


def upsample_logits(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinearly resizes ``(B, K, h, w)`` logits to ``size = (H, W)`` (``align_corners=False``).

    Logits (not probabilities or labels) are interpolated so the argmax boundaries fall between pixels
    smoothly; this is the same resize the loss uses, so training and evaluation agree.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
