"""Non-maximum suppression of decoded detections, through torchvision.ops.batched_nms, in eager code
(:func:`non_max_suppression`) and inside an exported graph (:class:`BatchedNMS`, ONNX ``NonMaxSuppression``)."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import batched_nms

from utils.ops.options import PredictOptions


def non_max_suppression(pred: torch.Tensor, options: PredictOptions = PredictOptions(), max_nms: int = 30000,
                        return_indices: bool = False) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Filters ``(B, A, 4 + nc)`` predictions (``x1 y1 x2 y2`` then class probabilities).

    Args:
        options: ``conf_thres`` (minimum class probability kept), ``iou_thres`` (NMS IoU threshold), ``classes``
            (keep only these class indices), ``agnostic`` (suppress across classes), ``max_det`` and
            ``multi_label`` (one box may be kept for several classes: better mAP at low ``conf_thres``);
            ``options.panoptic`` is not used here.
        max_nms: at most this many candidates (the best) enter NMS per image.
        return_indices: also return, per image, the anchor index of each kept box (to look up the
            instance head's mask coefficients of the same anchor).
    Returns: per image a ``(n, 6)`` tensor ``x1 y1 x2 y2 score class``, best first, ``n <= max_det``.
    """
    conf_thres, iou_thres, classes = options.conf_thres, options.iou_thres, options.classes
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres {conf_thres} and iou_thres {iou_thres} must be within [0, 1]")
    out, indices = [], []
    for p in pred:
        boxes, scores = p[:, :4], p[:, 4:]
        if options.multi_label:
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
        group = torch.zeros_like(det[:, 5]) if options.agnostic else det[:, 5]
        keep = batched_nms(det[:, :4].float(), det[:, 4].float(), group, iou_thres)[:options.max_det]
        out.append(det[keep])
        indices.append(i[keep])
    return (out, indices) if return_indices else out


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (multi-class, batched) with a torchvision implementation for eager mode.

    ``boxes (B, N, 4)`` corners, ``scores (B, C, N)`` -> ``(K, 3)`` int64 ``[batch, class, box]`` rows in ONNX
    order: by batch, then class, then score descending; at most ``max_out`` per (batch, class); a box needs
    ``score > score_thr`` and is suppressed by a better box of its class with ``IoU > iou_thr``.

    ONNX's native op is used instead of tracing ``torchvision.ops.batched_nms`` because the latter separates
    classes (and, to batch images, batches) by offsetting coordinates, which costs float precision at large
    offsets; the native op keeps batches and classes apart exactly, with a dynamic batch size.
    """

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, max_out: int, iou_thr: float,
                score_thr: float) -> torch.Tensor:
        rows = []
        for b in range(scores.shape[0]):
            cls, idx = (scores[b] > score_thr).nonzero(as_tuple=True)
            keep = batched_nms(boxes[b, idx], scores[b, cls, idx], cls, iou_thr)  # score-descending
            cls, idx = cls[keep], idx[keep]
            for c in cls.unique().tolist():  # ascending class order, like onnxruntime
                sel = idx[cls == c][:max_out]
                rows.append(torch.stack((torch.full_like(sel, b), torch.full_like(sel, c), sel), 1))
        return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.long, device=boxes.device)

    @staticmethod
    def symbolic(g, boxes, scores, max_out: int, iou_thr: float, score_thr: float):
        return g.op("NonMaxSuppression", boxes, scores,
                    g.op("Constant", value_t=torch.tensor([max_out], dtype=torch.long)),
                    g.op("Constant", value_t=torch.tensor([iou_thr], dtype=torch.float32)),
                    g.op("Constant", value_t=torch.tensor([score_thr], dtype=torch.float32)))


class BatchedNMS(nn.Module):
    """``det_pred (B, A, 4 + nc)`` -> fixed-size, score-sorted detections per image (traceable, dynamic batch).

    Same selection as :func:`utils.ops.nms.non_max_suppression` with ``multi_label=False``: each anchor competes
    with its best class only (``agnostic``: across classes); ``cfg``'s ``conf_thres``, ``iou_thres``, ``max_det`` and
    ``agnostic`` are baked in (``classes`` and ``multi_label`` are not: :func:`~utils.ops.postprocess.postprocess`
    filters classes after it). Returns ``det_boxes (B, max_det, 4)`` in input
    pixels, ``det_scores (B, max_det)``, ``det_classes`` and ``det_anchor_index (B, max_det)`` int64 (the
    anchor row of each detection, to gather instance coefficients) and ``det_count (B,)``; rows past
    ``det_count`` are padding (boxes/scores 0, classes/indices -1).
    """

    def __init__(self, cfg: PredictOptions):
        super().__init__()
        self.cfg = cfg

    def forward(self, pred: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c = self.cfg
        boxes, probs = pred[..., :4].float(), pred[..., 4:].float()  # ONNX NMS takes float32 only
        conf, cls = probs.max(-1)  # (B, A)
        if c.agnostic:
            scores = conf.unsqueeze(1)  # (B, 1, A): one group
        else:  # only the best class of an anchor competes: zero every other class score
            scores = torch.zeros_like(probs).scatter(2, cls.unsqueeze(-1), conf.unsqueeze(-1)).transpose(1, 2)
        sel = _NonMaxSuppression.apply(boxes, scores, int(c.max_det), float(c.iou_thres), float(c.conf_thres))
        b, a = sel[:, 0], sel[:, 2]
        score = conf[b, a]
        # Rank every image's selections by score: a (B, K) table holding each selection's score in its own
        # image's row and -1 elsewhere, padded with max_det columns of -1 so top-k always has max_det entries.
        # Built by broadcasting, not allocated from sizes; sizes that are read (K) become Shape ops, i.e. dynamic.
        own = b.unsqueeze(0) == torch.arange(pred.shape[0], device=pred.device).unsqueeze(1)  # (B, K)
        table = torch.where(own, score.unsqueeze(0), torch.full_like(score.unsqueeze(0), -1.0))
        table = torch.cat((table, (conf[:, :1] * 0 - 1).repeat(1, c.max_det)), 1)
        top, order = table.topk(c.max_det, dim=1)  # (B, max_det)
        valid = top >= 0
        k = sel.shape[0]
        order = torch.where(order < k, order, torch.full_like(order, k))  # padding -> the dummy row k
        pad_i = cls[:1, 0] * 0 - 1  # (1,) int64 -1, also when nothing was selected (k == 0)
        det_boxes = torch.cat((boxes[b, a], boxes[:1, 0] * 0))[order] * valid.unsqueeze(-1)
        det_scores = torch.where(valid, top, torch.zeros_like(top))
        det_classes = torch.where(valid, torch.cat((cls[b, a], pad_i))[order], pad_i)
        det_anchor = torch.where(valid, torch.cat((a, pad_i))[order], pad_i)
        return det_boxes, det_scores, det_classes, det_anchor, valid.sum(1)
