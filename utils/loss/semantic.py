"""Semantic segmentation loss: pixel cross-entropy (ignore 255) plus an optional soft dice term."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils.runtime.distributed import LOCAL, DistInfo
from utils.tasks import IGNORE_INDEX


def upsampled(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``logits`` ``(B, K, h, w)`` in fp32 (softmax / CE over many pixels under AMP) bilinearly resized to the
    target's ``(H, W)``."""
    return F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)


def _ce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(upsampled(logits, target), target, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
    """The summed pixel cross-entropy of ``logits`` ``(B, K, h, w)`` upsampled to ``target`` ``(B, H, W)`` (ignore
    index 255), ``chunk`` images at a time. With gradients on, each chunk is checkpointed: backward recomputes
    its upsampling and softmax rather than keeping them, so the batch's full-resolution tensors never coexist."""
    grad = torch.is_grad_enabled() and logits.requires_grad
    total = logits.new_zeros((), dtype=torch.float32)
    for i in range(0, logits.shape[0], chunk):
        part = (logits[i:i + chunk], target[i:i + chunk])
        total = total + (checkpoint(_ce_sum, *part, use_reentrant=False) if grad else _ce_sum(*part))
    return total


class SemanticLoss:
    """``loss(logits, target, present) -> (loss, {"ce": float, "dice": float})``.

    Hyperparameters read from ``hyp``:
        sem_dice: weight of the soft dice term (default 0 = off; then ``"dice"`` is logged as 0.0 and no
            full-resolution softmax is computed).
        sem_loss_stride: the loss is computed on every ``s``-th pixel of the target (the pixel nearest each
            ``s x s`` cell's centre), with the logits upsampled to that grid (default 1: every pixel). The
            upsampled logits are the loss's cost (time and memory: 171 COCO-Stuff classes at 640 px are 280 MB
            per image in fp32), and they fall as ``s**2``.
        sem_loss_chunk: the cross-entropy is computed ``c`` images at a time, each chunk's upsampling and
            cross-entropy recomputed in backward (activation checkpointing), so only one chunk's upsampled
            logits, log-probabilities and their gradients are ever alive instead of the batch's (default 1; 0: the
            whole batch at once). The same loss and gradient (tested): at 640 px and 171 classes the unchunked
            ones were half a nano step's peak tensor memory (batch 8: 1.6 of 3.0 GiB; 1.7 GiB chunked; README,
            ``profile_step --memory``).
            With the dice term on, the batch is scored at once (dice is a ratio over the whole batch).

    Pixels equal to ``IGNORE_INDEX`` (255) and pixels whose label is outside ``[0, K)`` are ignored, as are
    all pixels of images whose semantic labels are absent (``present`` false).
    """

    def __init__(self, hyp: dict | None = None):
        hyp = hyp or {}
        self.dice_gain = float(hyp.get("sem_dice", 0.0))
        self.eps = 1.0  # dice smoothing: keeps classes with few pixels from giving a 0/0-ish gradient
        self.stride = int(hyp.get("sem_loss_stride", 1))
        if self.stride < 1:
            raise ValueError(f"sem_loss_stride must be an integer >= 1, got {hyp.get('sem_loss_stride')!r}")
        self.chunk = int(hyp.get("sem_loss_chunk", 1))
        if self.chunk < 0:
            raise ValueError(f"sem_loss_chunk must be an integer >= 0, got {hyp.get('sem_loss_chunk')!r}")

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor,
                 sync: DistInfo = LOCAL) -> tuple[torch.Tensor, dict[str, float]]:
        """Args:
            logits: ``(B, K, h, w)`` raw scores (any stride; bilinearly upsampled to the target size).
            target: ``(B, H, W)`` uint8 or integer class indices, 255 = ignore.
            present: ``(B,)`` bool, whether image ``b`` has semantic labels.
            sync: under DDP the labelled-pixel count that normalises the cross-entropy is the mean over ranks
                (the dice term, a ratio over the batch, stays per rank).
        Returns:
            The scalar loss ``ce + sem_dice * dice`` (a differentiable zero when nothing is labelled) and the
            logged parts as floats.
        """
        if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
            raise ValueError(f"SemanticLoss: expected logits (B,K,h,w) and target (B,H,W), got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")
        zero = logits.sum() * 0.0  # keeps the graph (and DDP's used-parameter check) intact
        keep = present.to(device=logits.device, dtype=torch.bool).reshape(-1)
        k = logits.shape[1]
        # select present images before upsampling: full-resolution logits are the memory peak
        target = target.to(logits.device)[keep]
        if self.stride > 1:
            o = self.stride // 2
            target = target[:, o::self.stride, o::self.stride]
        target = target.long()
        valid = (target >= 0) & (target < k)  # 255 and unknown ids alike
        n_valid = float(sync.mean(valid.sum()))  # before any return: every rank joins the collective
        if n_valid == 0 or not bool(valid.any()):
            return zero, {"ce": 0.0, "dice": 0.0}
        target = torch.where(valid, target, torch.full_like(target, IGNORE_INDEX))
        if self.dice_gain <= 0 and self.chunk > 0:
            ce = chunked_cross_entropy(logits[keep], target, self.chunk) / n_valid
            return ce, {"ce": float(ce.detach()), "dice": 0.0}
        logits = upsampled(logits[keep], target)
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum") / n_valid
        loss = ce
        dice_val = 0.0
        if self.dice_gain > 0:
            dice = self.soft_dice(logits, target, valid)
            loss = loss + self.dice_gain * dice
            dice_val = float(dice.detach())
        return loss, {"ce": float(ce.detach()), "dice": dice_val}

    def soft_dice(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``1 - mean_c (2 |P_c . T_c| + eps) / (|P_c| + |T_c| + eps)`` over the batch's valid pixels.

        Averaged over the classes present in the (valid) target only: a class absent from the batch would
        otherwise be rewarded for predicting nothing, which dilutes the term as ``K`` grows.
        """
        k = logits.shape[1]
        prob = logits.softmax(1) * valid.unsqueeze(1)
        onehot = F.one_hot(target.clamp(max=k - 1) * valid, k).permute(0, 3, 1, 2).to(prob.dtype)
        onehot = onehot * valid.unsqueeze(1)
        inter = (prob * onehot).sum((0, 2, 3))
        t_sum = onehot.sum((0, 2, 3))
        denom = prob.sum((0, 2, 3)) + t_sum
        dice = 1.0 - (2.0 * inter + self.eps) / (denom + self.eps)
        cls_present = t_sum > 0
        return dice[cls_present].mean()
