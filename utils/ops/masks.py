"""Instance-mask math shared by the instance head's loss, inference and COCO export (back to original
pixels: :meth:`utils.ops.letterbox.Letterbox.masks_to_original`).

Masks follow the YOLACT / YOLOv8-seg scheme: an object's mask logits are a linear combination of
``nm`` prototype masks, ``coeffs @ protos``, cropped to the object's box.

Coordinates use the project's continuous pixel convention (see ``utils.data.augment``): pixel
``(col i, row j)`` covers ``[i, i+1) x [j, j+1)``, so a pixel belongs to a box when its centre
``(i + 0.5, j + 0.5)`` lies inside the box, and a resize by ``s`` is exactly ``x -> s * x``.
"""
from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import torch

__all__ = [
    "assemble_masks",
    "bilinear_matrix",
    "box_mask",
    "crop_masks",
    "process_masks",
    "resize_masks_windowed",
    "encode_rle",
    "rasterize_polygons",
]


def assemble_masks(protos: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Linear combination of prototypes: ``(nm, h, w)`` protos, ``(n, nm)`` coeffs -> ``(n, h, w)`` logits."""
    nm, h, w = protos.shape
    if coeffs.shape[-1] != nm:
        raise ValueError(f"coeffs have {coeffs.shape[-1]} entries per mask but there are {nm} prototypes")
    return (coeffs.to(protos.dtype) @ protos.reshape(nm, h * w)).view(-1, h, w)


def box_mask(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(n, h, w)`` bool: which pixels have their centre inside each ``x1 y1 x2 y2`` box (mask pixels)."""
    boxes = boxes.to(torch.float32)
    cx = torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5
    cy = torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5
    x1, y1, x2, y2 = (boxes[:, k, None] for k in range(4))
    in_x = (cx[None] >= x1) & (cx[None] < x2)  # (n, w)
    in_y = (cy[None] >= y1) & (cy[None] < y2)  # (n, h)
    return in_y[:, :, None] & in_x[:, None, :]


def crop_masks(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Zeroes every pixel of ``masks (n, h, w)`` whose centre is outside its box ``(n, 4)`` (mask pixels).

    The crop is what makes the linear prototype model work: coefficients only have to describe the
    object inside its box, not suppress every other object in the image.
    """
    n, h, w = masks.shape
    if boxes.shape != (n, 4):
        raise ValueError(f"expected ({n}, 4) boxes for {n} masks, got {tuple(boxes.shape)}")
    keep = box_mask(boxes.to(masks.device), h, w)
    return masks * keep if masks.dtype != torch.bool else masks & keep


def bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` weights of a 1-D bilinear resize as ``F.interpolate(..., align_corners=False)`` does
    it (source ``(i + 0.5) * n_in / n_out - 0.5``, clamped at 0, the last index repeated at the far edge): a 2-D
    resize of ``x`` is ``Ry @ x @ Rx.T``, and a window of the output is the same product with rows of ``Ry``
    and ``Rx`` sliced, which is what lets masks be resized inside their boxes only."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = (src - i0).clamp(0, 1)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1 - frac, accumulate=True)
    m.index_put_((rows, i1), frac, accumulate=True)
    return m.float()


def _support(weights: np.ndarray, start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per window, the output range ``[a, b)`` whose rows of ``weights`` touch input ``[start, stop)``.

    A bilinear row has its nonzero columns between a first and a last one, both non-decreasing down the rows,
    so the rows touching a window are contiguous and found by two binary searches."""
    nz = weights != 0
    first = nz.argmax(1)
    last = nz.shape[1] - 1 - nz[:, ::-1].argmax(1)
    return np.searchsorted(last, start, "left"), np.searchsorted(first, stop, "left")


def _pixel_ranges(lo: np.ndarray, hi: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``[a, b)`` of a length-``n`` axis whose centre ``i + 0.5`` lies in ``[lo, hi)`` (as box_mask)."""
    a = np.clip(np.ceil(lo - 0.5), 0, n).astype(np.int64)
    return a, np.maximum(a, np.clip(np.ceil(hi - 0.5), 0, n).astype(np.int64))


def _extent(hit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, L)`` bool -> per row the first set index and one past the last (``a == b`` for an empty row)."""
    any_ = hit.any(1)
    a = np.where(any_, hit.argmax(1), 0)
    b = np.where(any_, hit.shape[1] - hit[:, ::-1].argmax(1), 0)
    return a, b


def process_masks(protos: torch.Tensor, coeffs: torch.Tensor, boxes: torch.Tensor,
                  input_shape: tuple[int, int]) -> torch.Tensor:
    """Binary masks of ``n`` detections of one image, at network-input resolution.

    Args:
        protos: ``(nm, h, w)`` prototypes of the image (from :class:`~models.heads.instance.InstOutput`).
        coeffs: ``(n, nm)`` coefficients of the kept detections.
        boxes: ``(n, 4)`` detection boxes ``x1 y1 x2 y2`` in input pixels.
        input_shape: ``(H, W)`` of the network input.
    Returns:
        ``(n, H, W)`` bool. Logits are upsampled bilinearly *before* thresholding and cropping, so mask
        edges and box edges are both resolved at input resolution rather than at the prototype stride. Only
        the pixels inside each box are computed (a mask is empty outside it): 300 boxes of an early epoch
        would otherwise each be upsampled over the whole input.
    """
    H, W = int(input_shape[0]), int(input_shape[1])
    n = coeffs.shape[0]
    if n == 0:
        return torch.zeros((0, H, W), dtype=torch.bool, device=protos.device)
    # one small product per box: numpy on the CPU, where a torch call's overhead would be most of the work
    logits = assemble_masks(protos.float(), coeffs.float()).cpu().numpy()
    ry = bilinear_matrix(logits.shape[1], H).numpy()
    rx = bilinear_matrix(logits.shape[2], W).numpy()
    b = boxes.detach().float().cpu().numpy()
    r0, r1 = _pixel_ranges(b[:, 1], b[:, 3], H)
    c0, c1 = _pixel_ranges(b[:, 0], b[:, 2], W)
    res = np.zeros((n, H, W), bool)
    for k, (y0, y1, x0, x1) in enumerate(zip(r0.tolist(), r1.tolist(), c0.tolist(), c1.tolist())):
        if y1 > y0 and x1 > x0:  # logit > 0 <=> p > 0.5
            res[k, y0:y1, x0:x1] = (ry[y0:y1] @ logits[k] @ rx[x0:x1].T) > 0
    return torch.from_numpy(res).to(protos.device)


def resize_masks_windowed(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(n, h, w)`` bool masks resized bilinearly to ``size`` and thresholded at 0.5, as
    ``F.interpolate(masks.float(), size, mode="bilinear") >= 0.5`` (up to float rounding at exactly 0.5), but
    each mask only over the window its set pixels reach: a detection's mask is small beside the image."""
    n, h, w = masks.shape
    H, W = int(size[0]), int(size[1])
    if n == 0:
        return torch.zeros((0, H, W), dtype=torch.bool, device=masks.device)
    ry = bilinear_matrix(h, H).numpy()
    rx = bilinear_matrix(w, W).numpy()
    src = masks.cpu().numpy()
    a, b = _extent(src.any(2))
    c, d = _extent(src.any(1))
    o0, o1 = _support(ry, a, b)
    p0, p1 = _support(rx, c, d)
    res = np.zeros((n, H, W), bool)
    for k, (y0, y1, x0, x1, ro0, ro1, po0, po1) in enumerate(zip(*(v.tolist() for v in (a, b, c, d, o0, o1, p0, p1)))):
        if y1 > y0:
            window = ry[ro0:ro1, y0:y1] @ src[k, y0:y1, x0:x1].astype(np.float32) @ rx[po0:po1, x0:x1].T
            res[k, ro0:ro1, po0:po1] = window >= 0.5
    return torch.from_numpy(res).to(masks.device)


def encode_rle(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """``(n, h, w)`` bool masks -> COCO RLEs ``{"size": [h, w], "counts": str}`` (JSON-serialisable)."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected (n, h, w) masks, got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    # pycocotools wants (h, w, n) uint8 in Fortran (column-major) order
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
        r["size"] = [int(v) for v in r["size"]]  # numpy uint32 is not JSON-serialisable
    return rles


def rasterize_polygons(segments: list[list[np.ndarray]], shape: tuple[int, int],
                       downsample: int = 1) -> np.ndarray:
    """Per object, the union of its polygons as a mask at ``1 / downsample`` of ``shape``.

    Args:
        segments: per object a list of ``(K, 2)`` polygons ``x y`` in pixels of an image of ``shape``;
            an object with an empty list gets an empty mask.
        shape: ``(H, W)`` of the image the polygons live in.
        downsample: the mask is ``(H // downsample, W // downsample)`` (4 = the prototype stride).
    Returns:
        ``(n, h, w)`` uint8 in {0, 1}.

    Rasterized with pycocotools (COCO's own rasterizer, a pixel is in when its centre is) rather than
    ``cv2.fillPoly``: fillPoly also paints the pixels its outline touches, a half-pixel dilation that at
    stride 4 would fatten every target mask by ~2 input pixels per side; this way training targets match
    the ground truth COCO evaluation builds from the same polygons.
    """
    ds = int(downsample)
    if ds < 1:
        raise ValueError(f"downsample must be a positive int, got {downsample!r}")
    h, w = int(shape[0]) // ds, int(shape[1]) // ds
    out = np.zeros((len(segments), h, w), np.uint8)
    for i, polys in enumerate(segments):
        flat = [(np.asarray(p, np.float64).reshape(-1, 2) / ds).ravel().tolist() for p in polys if len(p) >= 3]
        if not flat or h == 0 or w == 0:
            continue
        rle = mask_util.merge(mask_util.frPyObjects(flat, h, w))
        out[i] = mask_util.decode(rle)
    return out
