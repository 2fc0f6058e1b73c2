"""Instance-mask loss (YOLOv8-seg): per foreground anchor, BCE of ``coeffs @ protos`` against the assigned
object's mask inside the assigned box, normalised by the box area.

The anchors and their objects come from the detection assignment (``TaskAlignedAssigner``), so this loss
adds no assignment of its own.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.heads.instance import InstOutput
from utils.ops.masks import box_mask, rasterize_polygons
from utils.runtime.distributed import LOCAL, DistInfo


class InstanceLoss:
    """Mask loss of :class:`~models.heads.instance.InstanceHead` outputs.

    Args:
        hyp: hyperparameters; gain ``mask`` (default 7.5, YOLOv8-seg reuses its box gain for masks).
        nm: number of prototypes the head predicts (checked against its outputs).
    """

    def __init__(self, hyp: dict, nm: int):
        self.gain = float(hyp.get("mask", 7.5))
        self.nm = int(nm)

    def __call__(self, out: InstOutput, fg: torch.Tensor, target_gt: torch.Tensor, target_boxes: torch.Tensor,
                 gt_masks: list[torch.Tensor], present: torch.Tensor, stride: float = 4.0,
                 sync: DistInfo = LOCAL) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns (loss scaled by batch size, like ``DetectionLoss``; ``{"mask": gained mean loss}``).

        Args:
            out: the head's output; ``protos`` is ``(B, nm, h, w)``.
            fg: ``(B, A)`` bool foreground anchors; target_gt: ``(B, A)`` index of each anchor's object in
                its image's padded target list; target_boxes: ``(B, A, 4)`` its box in input pixels
                (all three as returned by ``TaskAlignedAssigner``).
            gt_masks: per image ``(G_i, h, w)`` float masks in ``pad_targets`` order (see
                :func:`gt_masks_from_batch`). An all-zero mask means "mask unknown" (an object without
                polygons, or one smaller than a prototype pixel) and is left out: training it would
                teach an empty mask inside a real object's box.
            present: ``(B,)`` bool, whether the image has instance labels; other images contribute nothing.
            stride: input pixels per prototype pixel.
            sync: under DDP the object count that normalises the loss is the mean over ranks.
        """
        coeffs, protos = out.coeffs, out.protos
        b, nm, h, w = protos.shape
        if nm != self.nm or coeffs.shape[-1] != nm:
            raise ValueError(f"expected {self.nm} prototypes/coefficients, got protos {tuple(protos.shape)} "
                             f"and coeffs {tuple(coeffs.shape)}")
        if len(gt_masks) != b:
            raise ValueError(f"gt_masks has {len(gt_masks)} entries for a batch of {b}")
        device = protos.device
        fg = fg.to(device) & present.to(device)[:, None]
        total = protos.new_zeros((), dtype=torch.float32)
        count = 0
        for i in range(b):
            idx = fg[i].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            masks = gt_masks[i].to(device=device, dtype=torch.float32)
            if masks.shape[-2:] != (h, w):
                raise ValueError(f"image {i}: gt masks are {tuple(masks.shape[-2:])} but prototypes are {(h, w)}; "
                                 "build them at the prototype resolution (input size / stride)")
            gi = target_gt[i, idx].to(device)
            if int(gi.max()) >= masks.shape[0]:
                raise ValueError(f"image {i}: an anchor is assigned object {int(gi.max())} but only "
                                 f"{masks.shape[0]} masks were given")
            known = masks.flatten(1).amax(1) > 0
            keep = known[gi]
            idx, gi = idx[keep], gi[keep]
            if idx.numel() == 0:
                continue
            pred = (coeffs[i, idx].float() @ protos[i].float().view(nm, -1)).view(-1, h, w)
            inside = box_mask(target_boxes[i, idx].to(device).float() / stride, h, w).float()
            bce = F.binary_cross_entropy_with_logits(pred, masks[gi], reduction="none")
            # mean over the box's own pixels: small objects weigh as much as large ones
            total = total + ((bce * inside).sum((1, 2)) / inside.sum((1, 2)).clamp(min=1.0)).sum()
            count += idx.numel()
        count = sync.mean(count).to(device)  # before any return: every rank joins the collective
        # zero that still reaches every output, so DDP / unused-parameter checks stay happy
        zero = (coeffs.sum() + protos.sum()).float() * 0.0
        if count == 0:
            return zero, {"mask": 0.0}
        mean = (total + zero) / count * self.gain
        return mean * b, {"mask": float(mean.detach())}


def gt_masks_from_batch(segments: list[list[np.ndarray]], targets: torch.Tensor, batch_size: int,
                        shape_hw: tuple[int, int], downsample: int = 4,
                        device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Per image the ``(G_i, H // downsample, W // downsample)`` float masks of its objects.

    Args:
        segments: ``Batch.segments``, per target (row of ``targets``) its polygons in input pixels.
        targets: ``Batch.targets`` ``(M, 6)`` ``[image, class, x1, y1, x2, y2]``.
        batch_size: ``B``. shape_hw: ``(H, W)`` of the network input. downsample: prototype stride.
        device: where the masks go (default: ``targets``' device).
    Returns:
        A list of ``B`` tensors whose object order is that of
        :func:`utils.loss.detection.pad_targets` (targets sorted stably by image index), so row ``g`` of
        image ``i`` is the object ``target_gt == g`` refers to. An object without polygons gets an all-zero
        mask, which :class:`InstanceLoss` skips.
    """
    if len(segments) != len(targets):
        raise ValueError(f"{len(segments)} segment lists for {len(targets)} targets")
    device = targets.device if device is None else device
    h, w = int(shape_hw[0]) // downsample, int(shape_hw[1]) // downsample
    img = targets[:, 0].long().cpu()
    order = torch.argsort(img, stable=True)  # exactly pad_targets' order
    out = []
    for i in range(batch_size):
        rows = order[img[order] == i].tolist()
        m = rasterize_polygons([segments[r] for r in rows], shape_hw, downsample)
        out.append(torch.from_numpy(m).to(device=device, dtype=torch.float32).view(len(rows), h, w))
    return out
