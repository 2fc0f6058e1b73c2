"""Non-maximum suppression of decoded detections, through torchvision.ops.batched_nms."""
from __future__ import annotations

import torch
from torchvision.ops import batched_nms


def non_max_suppression(pred: torch.Tensor, conf_thres: float = 0.25, iou_thres: float = 0.45,
                        classes: list[int] | None = None, agnostic: bool = False, max_det: int = 300,
                        multi_label: bool = False, max_nms: int = 30000, return_indices: bool = False
                        ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Filters ``(B, A, 4 + nc)`` predictions (``x1 y1 x2 y2`` then class probabilities).

    Args:
        conf_thres: minimum class probability kept. iou_thres: NMS IoU threshold.
        classes: keep only these class indices. agnostic: suppress across classes.
        multi_label: one box may be kept for several classes (better mAP at low ``conf_thres``).
        return_indices: also return, per image, the anchor index of each kept box (to look up the
            instance head's mask coefficients of the same anchor).
    Returns: per image a ``(n, 6)`` tensor ``x1 y1 x2 y2 score class``, best first, ``n <= max_det``.
    """
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres {conf_thres} and iou_thres {iou_thres} must be within [0, 1]")
    out, indices = [], []
    for p in pred:
        boxes, scores = p[:, :4], p[:, 4:]
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((boxes[i], scores[i, j, None], j[:, None].to(p.dtype)), 1)
        else:
            conf, j = scores.max(1, keepdim=True)
            i = (conf.view(-1) > conf_thres).nonzero(as_tuple=True)[0]
            det = torch.cat((boxes, conf, j.to(p.dtype)), 1)[i]
        if classes is not None:
            k = (det[:, 5:6] == torch.tensor(classes, device=det.device, dtype=det.dtype)).any(1)
            det, i = det[k], i[k]
        if det.shape[0] > max_nms:
            k = det[:, 4].argsort(descending=True)[:max_nms]
            det, i = det[k], i[k]
        group = torch.zeros_like(det[:, 5]) if agnostic else det[:, 5]
        keep = batched_nms(det[:, :4].float(), det[:, 4].float(), group, iou_thres)[:max_det]
        out.append(det[keep])
        indices.append(i[keep])
    return (out, indices) if return_indices else out
