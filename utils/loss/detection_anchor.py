"""Loss of the anchor-based head (YOLOv5 / YOLOv7): anchor-ratio matching over the object's cell and its two
nearest neighbours, CIoU box loss, BCE objectness towards the IoU, BCE classes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, complete_box_iou_loss

from models.heads.detect_anchor import DetectAnchor, decode_boxes
from utils.loss.detection import Assignment, image_slots
from utils.runtime.distributed import LOCAL, DistInfo

# Gains and matching threshold of this loss, YOLOv5's values (hyp.scratch-low). Not ``box``/``cls``: those
# are the anchor-free loss's gains for a differently normalised loss (7.5 vs 0.05 for the same CIoU term).
# The hyp files set them (data/hyps/*.yaml); these defaults serve a hyp dict without them.
ANCHOR_HYP = {"anchor_box": 0.05, "anchor_obj": 1.0, "anchor_cls": 0.5, "anchor_t": 4.0}
# objectness weight per level, finest first: fine levels have many more (mostly background) cells
BALANCE = {3: [4.0, 1.0, 0.4]}
# the object's own cell, then the neighbours left, up, right, down (in half cells: see build_targets)
OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32) * 0.5


@dataclass
class LevelTargets:
    """The predictions one level trains as positives: one row per (object, anchor, cell) match."""

    image: torch.Tensor   # (n,) image index
    anchor: torch.Tensor  # (n,) anchor index within the level
    gj: torch.Tensor      # (n,) cell row
    gi: torch.Tensor      # (n,) cell column
    box: torch.Tensor     # (n, 4) object centre x y, w h in grid units of the level
    cls: torch.Tensor     # (n,) class
    target: torch.Tensor  # (n,) row of the object in ``targets``


class AnchorDetectionLoss:
    """Loss of :class:`models.heads.detect_anchor.DetectAnchor` outputs against a batch's targets.

    Gains ``anchor_box``, ``anchor_obj``, ``anchor_cls`` and the matching ratio ``anchor_t`` come from the hyp
    (defaults :data:`ANCHOR_HYP`). As in YOLOv5's train.py the class gain is scaled by ``nc / 80`` and the
    objectness gain by ``(img / 640)^2`` (the objectness mean runs over all cells, whose number grows with the
    image area). Images whose detection labels are absent (``present`` false) contribute nothing.
    """

    def __init__(self, head: DetectAnchor, hyp: dict):
        self.nc, self.na, self.nl, self.strides = head.nc, head.na, head.nl, head.strides
        self.level_view = head.level_view
        self.anchors = head.anchors.detach().float().cpu()  # (nl, na, 2) pixels
        self.gains = tuple(float(hyp.get(k, ANCHOR_HYP[k])) for k in ("anchor_box", "anchor_obj", "anchor_cls"))
        self.anchor_t = float(hyp.get("anchor_t", ANCHOR_HYP["anchor_t"]))
        self.balance = BALANCE.get(self.nl, [4.0, 1.0, 0.25, 0.06, 0.02][: self.nl])

    def build_targets(self, shapes: list[tuple[int, int]], targets: torch.Tensor) -> list[LevelTargets]:
        """Which predictions of each level learn which object (YOLOv5's ``build_targets``).

        An anchor matches an object on a level when both its width and height ratios lie within
        ``1 / anchor_t .. anchor_t`` (the range the ``(2 sigmoid)^2`` coding can reach). A match trains the
        cell holding the object's centre and the two neighbours nearest to the centre (left or right, up or
        down), whose ``2 sigmoid - 0.5`` offset still reaches it: three times the positives of one cell.

        Args: shapes: ``(H, W)`` per level. targets: ``(M, 6)`` ``[image, class, x1, y1, x2, y2]`` in pixels.
        """
        device = targets.device
        xywh = box_convert(targets[:, 2:6].float(), "xyxy", "cxcywh")
        off = OFFSETS.to(device)
        out = []
        for (h, w), s, anchors in zip(shapes, self.strides, self.anchors.to(device)):
            g = xywh / s
            r = g[None, :, 2:] / (anchors[:, None] / s)  # (na, M, 2) object / anchor size
            a, t = (torch.max(r, 1 / r).amax(-1) < self.anchor_t).nonzero(as_tuple=True)
            gxy = g[t, :2]
            gxi = torch.tensor([w, h], device=device, dtype=gxy.dtype) - gxy  # distance to the far edges
            near_low = (gxy % 1 < 0.5) & (gxy > 1)  # centre in the left/top half, and a cell exists there
            near_high = (gxi % 1 < 0.5) & (gxi > 1)
            keep = torch.cat((torch.ones_like(near_low[:, :1]), near_low, near_high), 1).T  # (5, n)
            k, j = keep.nonzero(as_tuple=True)
            gij = (gxy[j] - off[k]).long()
            t = t[j]
            out.append(LevelTargets(image=targets[t, 0].long(), anchor=a[j], gj=gij[:, 1].clamp(0, h - 1),
                                    gi=gij[:, 0].clamp(0, w - 1), box=g[t], cls=targets[t, 1].long(), target=t))
        return out

    def __call__(self, feats: list[torch.Tensor], targets: torch.Tensor, present: torch.Tensor,
                 sync: DistInfo = LOCAL) -> tuple[torch.Tensor, dict[str, float], Assignment]:
        """Returns (loss scaled by batch size, {'box','obj','cls'} detached parts, the assignment).

        targets: ``(M, 6)`` ``[image index, class, x1, y1, x2, y2]`` in input pixels; present ``(B,)`` bool.
        sync: under DDP the normalisers (matches per level, labelled images) are means over ranks.
        """
        device, b = feats[0].device, feats[0].shape[0]
        present = present.to(device)
        targets = targets.to(device)
        slots = image_slots(targets[:, 0].long())  # before filtering, so target_gt indexes pad_targets' layout
        labelled = present[targets[:, 0].long()]
        targets, slots = targets[labelled], slots[labelled]
        shapes = [tuple(f.shape[2:]) for f in feats]
        matches = self.build_targets(shapes, targets)
        img = max(shapes[0]) * self.strides[0]
        gain_box, gain_obj, gain_cls = self.gains[0], self.gains[1] * (img / 640) ** 2, self.gains[2] * self.nc / 80

        keep = present.float()
        images = sync.mean(keep.sum()).clamp(min=1.0 / sync.world).to(device)  # one process: max(n, 1)
        zero = feats[0].sum() * 0.0  # keeps a graph when a term has nothing to learn from
        box_loss = obj_loss = cls_loss = zero
        fg = torch.zeros((b, sum(self.na * h * w for h, w in shapes)), dtype=torch.bool, device=device)
        target_gt = torch.zeros(fg.shape, dtype=torch.long, device=device)
        target_boxes = torch.zeros((*fg.shape, 4), device=device)
        anchors = self.anchors.to(device)
        start = 0
        for i, (f, m, s, (h, w)) in enumerate(zip(feats, matches, self.strides, shapes)):
            p = self.level_view(f).float()  # (B, na, H, W, 5 + nc)
            tobj = torch.zeros(p.shape[:4], device=device)
            matched = sync.mean(len(m.image)).to(device)  # every rank joins, matches or not
            if len(m.image):
                ps = p[m.image, m.anchor, m.gj, m.gi]
                cells = torch.stack((m.gi, m.gj), 1).float()
                pbox = decode_boxes(ps[:, :4], cells, anchors[i, m.anchor] / s)
                ciou_loss = complete_box_iou_loss(box_convert(pbox, "cxcywh", "xyxy"),
                                                  box_convert(m.box, "cxcywh", "xyxy"), reduction="none")
                box_loss = box_loss + ciou_loss.sum() / matched
                tobj[m.image, m.anchor, m.gj, m.gi] = (1.0 - ciou_loss.detach()).clamp(0)  # objectness aims at the CIoU
                if self.nc > 1:  # one class: objectness alone says it
                    cls_loss = cls_loss + F.binary_cross_entropy_with_logits(
                        ps[:, 5:], F.one_hot(m.cls, self.nc).float(), reduction="sum") / (matched * self.nc)
                idx = start + (m.anchor * h + m.gj) * w + m.gi
                fg[m.image, idx] = True
                target_gt[m.image, idx] = slots[m.target]
                target_boxes[m.image, idx] = targets[m.target, 2:6].float()
            obj = F.binary_cross_entropy_with_logits(p[..., 4], tobj, reduction="none").mean((1, 2, 3))
            obj_loss = obj_loss + (obj * keep).sum() / images * self.balance[i]
            start += self.na * h * w
        parts = torch.stack((box_loss * gain_box, obj_loss * gain_obj, cls_loss * gain_cls))
        loss = parts.sum() * b
        return loss, dict(zip(("box", "obj", "cls"), parts.detach().tolist())), Assignment(fg, target_gt, target_boxes)
