"""Captioning loss: label-smoothed token cross-entropy under teacher forcing, per image, masked by presence.

COCO has ~5 reference captions per image; each step trains on ONE of them per image. The choice is a pure
function of a seed and the image's id (or position in the batch; or of a passed ``torch.Generator``), so a run and
its resumed copy see the same targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.data.vocab import Vocabulary
from utils.engine.distributed import LOCAL, DistInfo
from utils.tasks import PAD


class CaptionLoss:
    """``loss(logits, tokens, present) -> (loss, {"ce": float})``.

    Args:
        vocab: the training vocabulary (ids of :meth:`targets`).
        hyp: hyperparameters; reads ``label_smoothing`` (default 0.1) and ``cap_max_len`` (default 24,
            the longest id sequence with ``<bos>``/``<eos>``; match the head's ``max_len``).
    """

    def __init__(self, vocab: Vocabulary, hyp: dict):
        self.vocab = vocab
        self.label_smoothing = float(hyp.get("label_smoothing", 0.1))
        self.max_len = int(hyp.get("cap_max_len", 24))

    def targets(self, captions: list[list[str]], seed: int | torch.Generator = 0,
                keys: list[int] | None = None) -> torch.Tensor:
        """``(B, T)`` ids of one reference caption per image, padded with ``<pad>``.

        ``seed``: an int picks reference ``(seed + key_i) % len(refs)`` for image ``i`` (pass e.g. the global
        step so every reference gets used over training); ``keys`` default to the positions in the batch,
        the trainer passes the image ids so the choice does not depend on how images are split into batches
        (one process or many). A ``torch.Generator`` draws the index from it instead.
        An image without captions gets ``[<bos>, <eos>]`` (mask it out with ``present``).
        """
        chosen = []
        keys = list(range(len(captions))) if keys is None else keys
        for i, refs in zip(keys, captions):
            if not refs:
                chosen.append("")
                continue
            if isinstance(seed, torch.Generator):
                j = int(torch.randint(len(refs), (1,), generator=seed))
            else:
                j = (int(seed) + i) % len(refs)
            chosen.append(refs[j])
        return self.vocab.encode_batch(chosen, self.max_len)

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor, present: torch.Tensor,
                 sync: DistInfo = LOCAL) -> tuple[torch.Tensor, dict[str, float]]:
        """Args:
            logits: ``(B, T-1, V)`` teacher-forced logits (``CaptionOutput.logits``).
            tokens: ``(B, T)`` the ids the logits were computed from; ``tokens[:, 1:]`` are the targets.
            present: ``(B,)`` bool, whether the image has captions.
            sync: under DDP the number of captioned images that normalises the loss is the mean over ranks.
        Returns: the mean over present images of each image's mean token loss (pads ignored), and its value
            as ``{"ce": float}``. With no image present: a zero that still has a graph to ``logits``.
        """
        b, t1, v = logits.shape
        target = tokens[:, 1:].to(logits.device)
        if target.shape != (b, t1):
            raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}: "
                             "expected logits for tokens[:, 1:]")
        ce = F.cross_entropy(logits.float().reshape(-1, v), target.reshape(-1), ignore_index=PAD,
                             label_smoothing=self.label_smoothing, reduction="none").view(b, t1)
        n_tok = (target != PAD).sum(1).clamp(min=1)
        per_image = ce.sum(1) / n_tok  # each image weighs the same, whatever its caption length
        keep = present.to(device=logits.device, dtype=per_image.dtype)
        # masked sum (not indexing) keeps the graph and a finite zero when nothing is present
        images = sync.mean(keep.sum()).clamp(min=1.0 / sync.world).to(keep.device)  # one process: max(n, 1)
        loss = (per_image * keep).sum() / images
        return loss, {"ce": float(loss.detach())}
