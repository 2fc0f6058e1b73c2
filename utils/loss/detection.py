"""Detection loss: task-aligned assignment (TOOD), BCE classification, CIoU + distribution focal loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, complete_box_iou, complete_box_iou_loss

from utils.ops.boxes import bbox2dist, dist2bbox, make_anchors
from utils.runtime.distributed import LOCAL, DistInfo


class TaskAlignedAssigner(nn.Module):
    """Assigns to each object the ``topk`` anchor points inside it with the best ``score^a * iou^b``.

    Args:
        topk: candidates per object. alpha, beta: weights of the classification score and the IoU.
        ciou: the overlap is the complete IoU (clamped at 0), as Ultralytics' assigner, not the plain IoU.
        min_side: for choosing candidates only, a box side shorter than this (input pixels) is widened to it
            about the box centre, as Ultralytics' assigner does with its middle stride: a small object then
            has anchor points to choose from on more than one grid. 0 keeps every box as it is.
    """

    def __init__(self, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9,
                 ciou: bool = False, min_side: float = 0.0):
        super().__init__()
        self.topk, self.alpha, self.beta, self.eps, self.ciou = topk, alpha, beta, eps, ciou
        self.min_side = float(min_side)

    @torch.no_grad()
    def forward(self, scores: torch.Tensor, boxes: torch.Tensor, points: torch.Tensor, gt_cls: torch.Tensor,
                gt_boxes: torch.Tensor, gt_mask: torch.Tensor):
        """Args (B images, A anchors, G padded objects per image):
            scores ``(B, A, C)`` sigmoid class scores; boxes ``(B, A, 4)`` predicted xyxy; points ``(A, 2)``;
            gt_cls ``(B, G)`` long; gt_boxes ``(B, G, 4)``; gt_mask ``(B, G)`` bool (real, not padding).
        Returns: target_boxes ``(B, A, 4)``, target_scores ``(B, A, C)``, fg ``(B, A)`` bool,
            target_gt ``(B, A)`` index of the assigned object.
        """
        b, a, c = scores.shape
        g = gt_boxes.shape[1]
        if g == 0:
            return (torch.zeros_like(boxes), torch.zeros_like(scores),
                    torch.zeros((b, a), dtype=torch.bool, device=scores.device),
                    torch.zeros((b, a), dtype=torch.long, device=scores.device))
        # anchor points strictly inside each object box (small sides widened to min_side)
        region = widen_small_sides(gt_boxes, self.min_side) if self.min_side > 0 else gt_boxes
        lt = points[None, None] - region[:, :, None, :2]
        rb = region[:, :, None, 2:] - points[None, None]
        inside = torch.cat((lt, rb), -1).amin(-1) > self.eps  # (B, G, A)
        valid = inside & gt_mask[..., None]
        idx = gt_cls.clamp(min=0).unsqueeze(-1).expand(b, g, a)
        cls_score = scores.permute(0, 2, 1).gather(1, idx)  # (B, G, A): score of the object's class
        overlap = complete_box_iou if self.ciou else box_iou
        # nan_to_num: CIoU's aspect term is 0/0 for a predicted box of zero size (early steps)
        iou = torch.stack([overlap(gt_boxes[i], boxes[i]) for i in range(b)]).nan_to_num(0.0).clamp(0)  # (B, G, A)
        align = cls_score.pow(self.alpha) * iou.pow(self.beta) * valid
        topk = align.topk(min(self.topk, a), dim=-1).indices
        cand = torch.zeros_like(valid).scatter_(-1, topk, True) & valid  # (B, G, A)
        # an anchor claimed by several objects goes to the one it overlaps most
        many = cand.sum(1) > 1
        if many.any():
            best = (iou * cand).argmax(1)  # (B, A)
            one_hot = F.one_hot(best, g).permute(0, 2, 1).bool()
            cand = torch.where(many[:, None], one_hot & cand, cand)
        fg = cand.any(1)
        target_gt = cand.float().argmax(1)  # (B, A)
        batch_idx = torch.arange(b, device=scores.device)[:, None]
        target_boxes = gt_boxes[batch_idx, target_gt]
        target_cls = gt_cls[batch_idx, target_gt].clamp(min=0)
        target_scores = F.one_hot(target_cls, c).float() * fg[..., None]
        # soft targets: normalized alignment so the best anchor of each object aims at its max IoU
        align = align * cand
        norm = align.amax(-1, keepdim=True) + self.eps
        iou_max = (iou * cand).amax(-1, keepdim=True)
        weight = (align * iou_max / norm).amax(1)  # (B, A)
        return target_boxes, target_scores * weight[..., None], fg, target_gt


def widen_small_sides(boxes: torch.Tensor, min_side: float) -> torch.Tensor:
    """xyxy ``boxes`` with each side shorter than ``min_side`` widened to it about the box centre."""
    centre, size = (boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]
    half = size.clamp(min=min_side) / 2
    return torch.cat((centre - half, centre + half), -1)


@dataclass
class Assignment:
    """Which anchor points are foreground and for which object: reused by the instance mask loss."""

    fg: torch.Tensor            # (B, A) bool, only images whose detection labels are present
    target_gt: torch.Tensor     # (B, A) index into the image's padded objects
    target_boxes: torch.Tensor  # (B, A, 4) assigned object box, input pixels


class DetectionLoss:
    """Loss of :class:`models.heads.detect.Detect` outputs against a batch's targets.

    Gains ``box``, ``cls``, ``dfl`` come from the hyp file. Images whose detection labels are absent
    (``present`` false) contribute nothing, not even background negatives.
    """

    def __init__(self, head: nn.Module, hyp: dict):
        self.nc, self.reg_max, self.strides = head.nc, head.reg_max, head.strides
        self.proj = torch.arange(self.reg_max, dtype=torch.float32)
        self.gains = (hyp.get("box", 7.5), hyp.get("cls", 0.5), hyp.get("dfl", 1.5))
        # assign_min_side: a length in input pixels, or "stride" for the head's middle stride (Ultralytics')
        min_side = hyp.get("assign_min_side", 0)
        if min_side == "stride":
            min_side = self.strides[len(self.strides) // 2]
        self.assigner = TaskAlignedAssigner(topk=10, alpha=0.5, beta=6.0, ciou=bool(hyp.get("assign_ciou", False)),
                                            min_side=float(min_side))

    def __call__(self, feats: list[torch.Tensor], targets: torch.Tensor, present: torch.Tensor,
                 sync: DistInfo = LOCAL) -> tuple[torch.Tensor, dict[str, float], Assignment]:
        """Returns (loss scaled by batch size, {'box','cls','dfl'} detached parts, the assignment).

        targets: ``(M, 6)`` ``[image index, class, x1, y1, x2, y2]`` in input pixels; present ``(B,)`` bool.
        sync: under DDP, the normaliser (the target-score sum) is the mean over ranks (see ``DistInfo.mean``).
        """
        device, b = feats[0].device, feats[0].shape[0]
        x = torch.cat([f.view(b, 4 * self.reg_max + self.nc, -1) for f in feats], 2).transpose(1, 2).float()
        box_logits, cls_logits = x.split((4 * self.reg_max, self.nc), 2)
        points, stride = make_anchors([f.shape[2:] for f in feats], self.strides, device)
        dist = box_logits.view(b, -1, 4, self.reg_max).softmax(-1) @ self.proj.to(device)
        pred_boxes = dist2bbox(dist, points[None])  # grid units

        gt_cls, gt_boxes, gt_mask = pad_targets(targets.to(device), b)
        target_boxes, target_scores, fg, target_gt = self.assigner(
            cls_logits.detach().sigmoid(), (pred_boxes.detach() * stride).to(gt_boxes.dtype),
            points * stride, gt_cls, gt_boxes, gt_mask)
        keep = present.to(device).float()[:, None, None]
        # max(global sum, 1) / world: on one process max(sum, 1), as before
        score_sum = sync.mean((target_scores * keep).sum()).clamp(min=1.0 / sync.world).to(device)
        cls_loss = (F.binary_cross_entropy_with_logits(cls_logits, target_scores, reduction="none") * keep).sum() / score_sum

        fg = fg & present.to(device)[:, None]
        if fg.any():
            weight = target_scores.sum(-1)[fg]
            tb = target_boxes / stride[None]  # grid units, like the predictions
            iou_loss = complete_box_iou_loss(pred_boxes[fg], tb[fg], reduction="none")
            box_loss = (iou_loss * weight).sum() / score_sum
            target_dist = bbox2dist(points[None].expand(b, -1, -1), tb, self.reg_max)[fg]
            dfl_loss = (distribution_focal_loss(box_logits[fg].view(-1, self.reg_max), target_dist.view(-1))
                        .view(-1, 4).mean(-1) * weight).sum() / score_sum
        else:
            box_loss = dfl_loss = pred_boxes.sum() * 0.0
        parts = torch.stack((box_loss * self.gains[0], cls_loss * self.gains[1], dfl_loss * self.gains[2]))
        loss = parts.sum() * b
        return loss, dict(zip(("box", "cls", "dfl"), parts.detach().tolist())), Assignment(fg, target_gt, target_boxes)


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL (Generalized Focal Loss): cross-entropy towards the two bins around a continuous target."""
    left = target.long()
    right = left + 1
    w_left = right.float() - target
    return (F.cross_entropy(logits, left, reduction="none") * w_left
            + F.cross_entropy(logits, right.clamp(max=logits.shape[-1] - 1), reduction="none") * (1 - w_left))


def pad_targets(targets: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M, 6)`` flat targets -> per-image padded ``cls (B, G)``, ``boxes (B, G, 4)``, ``mask (B, G)``."""
    device = targets.device
    img = targets[:, 0].long()
    g = int(torch.bincount(img).max()) if len(targets) else 0
    cls = torch.full((batch_size, g), -1, dtype=torch.long, device=device)
    boxes = torch.zeros((batch_size, g, 4), device=device)
    mask = torch.zeros((batch_size, g), dtype=torch.bool, device=device)
    if g:
        slot = image_slots(img)
        cls[img, slot] = targets[:, 1].long()
        boxes[img, slot] = targets[:, 2:6].float()
        mask[img, slot] = True
    return cls, boxes, mask


def image_slots(img: torch.Tensor) -> torch.Tensor:
    """Each target's index among its own image's targets (in the given order): its slot in :func:`pad_targets`."""
    if not len(img):
        return img.new_zeros(0)
    order = torch.argsort(img, stable=True)
    counts = torch.bincount(img)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(img)
    slot[order] = torch.arange(len(img), device=img.device) - start[img[order]]
    return slot
