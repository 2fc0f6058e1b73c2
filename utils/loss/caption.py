"""Captioning loss: label-smoothed token cross-entropy under teacher forcing, per image, masked by presence.

COCO has ~5 reference captions per image. With ``cap_refs: 1`` each step trains on ONE of them per image; with
``cap_refs: R > 1`` on up to R of them at once: the decoder (cheap next to the body) reads the image's memory once
per reference, and each image's loss is the mean over its references. That is the cross-entropy against the
references' whole distribution instead of one draw from it, R times the caption signal of a body forward pass
(measured in benchmarks/peers.py's ablation). Which references is a pure function of a seed and the image's id
(or position in the batch; or of a passed ``torch.Generator``), so a run and its resumed copy see the same targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.data.vocab import Vocabulary, hyp_max_len
from utils.eval.metrics.caption import CorpusCiderD
from utils.runtime.distributed import LOCAL, DistInfo
from utils.tasks import EOS, PAD


class CaptionLoss:
    """``loss(logits, tokens, present) -> (loss, {"ce": float})``.

    Args:
        vocab: the training vocabulary (ids of :meth:`targets`).
        hyp: hyperparameters; reads ``label_smoothing`` (default 0.1) and ``cap_max_len`` (default 24,
            the longest id sequence with ``<bos>``/``<eos>``; match the head's ``max_len``) and ``cap_refs``
            (default 1: references per image per step; more makes :meth:`targets` ``(B, R, T)``).
    """

    def __init__(self, vocab: Vocabulary, hyp: dict):
        self.vocab = vocab
        self.label_smoothing = float(hyp.get("label_smoothing", 0.1))
        self.max_len = hyp_max_len(hyp)
        self.refs = int(hyp.get("cap_refs", 1))
        if self.refs < 1:
            raise ValueError(f"cap_refs must be >= 1, got {self.refs}")

    def targets(self, captions: list[list[str]], seed: int | torch.Generator = 0,
                keys: list[int] | None = None) -> torch.Tensor:
        """Ids of the reference captions trained on, padded with ``<pad>``: ``(B, T)``, one per image, with
        ``cap_refs`` 1, else ``(B, R, T)``, up to ``R = cap_refs`` per image.

        ``seed``: an int makes reference ``(seed + key_i + r) % len(refs)`` the ``r``-th of image ``i`` (pass
        e.g. the global step so every reference gets used over training); ``keys`` default to the positions
        in the batch, the trainer passes the image ids so the choice does not depend on how images are split
        into batches (one process or many). A ``torch.Generator`` draws the first index from it instead.
        A slot without a caption (an image without captions, or with fewer than R) is ``[<bos>, <eos>]``: the
        loss skips such slots, and ``present`` masks the image out.
        """
        chosen = []
        keys = list(range(len(captions))) if keys is None else keys
        for i, refs in zip(keys, captions):
            if not refs:
                chosen += [""] * self.refs
                continue
            if isinstance(seed, torch.Generator):
                j = int(torch.randint(len(refs), (1,), generator=seed))
            else:
                j = int(seed) + i
            chosen += [refs[(j + r) % len(refs)] if r < len(refs) else "" for r in range(self.refs)]
        tokens = self.vocab.encode_batch(chosen, self.max_len)
        return tokens if self.refs == 1 else tokens.view(len(captions), self.refs, -1)

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor, present: torch.Tensor,
                 sync: DistInfo = LOCAL) -> tuple[torch.Tensor, dict[str, float]]:
        """Args:
            logits: ``(B, T-1, V)`` teacher-forced logits (``CaptionOutput.logits``), or ``(B, R, T-1, V)``
                for R references per image.
            tokens: ``(B, T)`` (or ``(B, R, T)``) the ids the logits were computed from; ``[..., 1:]`` are the
                targets.
            present: ``(B,)`` bool, whether the image has captions.
            sync: under DDP the number of captioned images that normalises the loss is the mean over ranks.
        Returns: the mean over present images of each image's mean token loss (pads ignored; with several
            references, the mean over its captioned slots of each slot's mean token loss), and its value as
            ``{"ce": float}``. With no image present: a zero that still has a graph to ``logits``.
        """
        if logits.dim() == 3:
            logits, tokens = logits[:, None], tokens[:, None]
        b, r, t1, v = logits.shape
        target = tokens[..., 1:].to(logits.device)
        if target.shape != (b, r, t1):
            raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}: "
                             "expected logits for tokens[..., 1:]")
        ce = F.cross_entropy(logits.float().reshape(-1, v), target.reshape(-1), ignore_index=PAD,
                             label_smoothing=self.label_smoothing, reduction="none").view(b, r, t1)
        n_tok = (target != PAD).sum(2).clamp(min=1)
        per_slot = ce.sum(2) / n_tok  # each caption weighs the same, whatever its length
        filled = (target[..., 0] != EOS).to(per_slot.dtype)  # an empty slot is [<bos>, <eos>]
        # each image weighs the same, whatever its number of references; one slot keeps a caption-less image's
        # zero in the graph (it is masked out by ``present`` below)
        filled[:, 0] = torch.where(filled.sum(1) > 0, filled[:, 0], torch.ones_like(filled[:, 0]))
        per_image = (per_slot * filled).sum(1) / filled.sum(1)
        keep = present.to(device=logits.device, dtype=per_image.dtype)
        # masked sum (not indexing) keeps the graph and a finite zero when nothing is present
        images = sync.mean(keep.sum()).clamp(min=1.0 / sync.world).to(keep.device)  # one process: max(n, 1)
        loss = (per_image * keep).sum() / images
        return loss, {"ce": float(loss.detach())}


class SelfCriticalLoss:
    """Self-critical sequence training (Rennie et al. 2017) with the mean of the other samples as baseline
    (Luo 2020, "A better variant of SCST"): the reward is the CIDEr-D the caption is scored by.

    For every captioned image, ``k`` captions are sampled from the decoder (no gradient, dropout off), each is scored by
    CIDEr-D against the image's references with the training set's document frequencies
    (:class:`~utils.eval.metrics.caption.CorpusCiderD`), and the loss raises the log-probability of the
    samples that score above the mean of that image's other samples and lowers it for the rest. Teacher
    forcing trains the decoder on reference prefixes only; this trains it on its own (exposure bias) and for
    the metric itself, which cross-entropy does not (a template that is right on average scores well there).

    CIDEr-D alone rewards what every image's references share: a template that is right for all of them ("three
    shapes on grass") earns about what an exact inventory of the picture does, and is far easier to get right, so
    the samples converge on it. hyp ``scst_contrast: c`` (0: off) subtracts ``c`` times the sample's mean CIDEr-D
    against the references of the batch's other captioned images: a contrastive, discriminative reward (as Dai &
    Lin 2017 and Luo et al. 2018 make captions distinctive), under which a sentence that fits every image gains
    nothing and what tells this image from the others (its objects, their colours, their count) is rewarded.

    hyp ``scst_sampler``: ``sample`` (default) draws the ``k`` captions from the decoder's distribution; ``beam``
    takes the ``k`` beams of a beam search of width ``k`` instead (M2 Transformer's and GRIT's SCST; baseline the
    other beams' mean alike). A drawn inventory of four objects is four chances of a wrong word, so drawn samples
    favour the short template; beams are the decoder's likeliest captions, long ones among them, and the reward
    chooses between them the way decoding will.

    ``loss(head, memory, captions, present, keys) -> (loss, {"reward": mean sample CIDEr-D, "contrast": mean
    CIDEr-D against other images' references})``.
    """

    def __init__(self, vocab: Vocabulary, corpus: list[list[str]], hyp: dict):
        self.vocab = vocab
        self.k = int(hyp.get("scst_samples", 5))
        if self.k < 2:
            raise ValueError(f"scst_samples must be >= 2 (the baseline is the other samples' mean), got {self.k}")
        self.contrast = float(hyp.get("scst_contrast", 0.0))
        self.sampler = str(hyp.get("scst_sampler", "sample"))
        if self.sampler not in ("sample", "beam"):
            raise ValueError(f"scst_sampler must be 'sample' or 'beam', got {self.sampler!r}")
        self.max_len = hyp_max_len(hyp)
        self.corpus = corpus
        self._cider: CorpusCiderD | None = None

    @property
    def cider(self) -> CorpusCiderD:
        """The reward's scorer, built at the first self-critical step (tokenizing COCO's 590k training
        captions takes a while; a run that never reaches its SCST epochs should not pay for it)."""
        if self._cider is None:
            self._cider = CorpusCiderD(self.corpus)
        return self._cider

    def __call__(self, head, memory: torch.Tensor, captions: list[list[str]], present: torch.Tensor,
                 keys: list[int], sync: DistInfo = LOCAL) -> tuple[torch.Tensor, dict[str, float]]:
        idx = [i for i, p in enumerate(present.tolist()) if p and captions[i]]
        images = sync.mean(torch.tensor(float(len(idx)), device=memory.device)).clamp(min=1.0 / sync.world)
        if not idx:  # a zero that still reaches the decoder (DDP needs every parameter in the graph)
            return memory.sum() * 0.0, {}
        mem = memory[idx]
        # Drawn from the decoder as it is deployed, without dropout: the log-probabilities below are a pass of
        # their own anyway, and under dropout attention takes SDPA's unfused path (sampling ~2.5x slower on CPU).
        training = head.training
        head.eval()
        try:
            tokens = (head.beam_search(mem.detach(), self.k, self.max_len, every_beam=True) if self.sampler == "beam"
                      else head.sample(mem.detach(), self.k, self.max_len))  # (n*k, L)
        finally:
            head.train(training)
        words = self.vocab.decode_batch(tokens)
        own, other = self.rewards(words, [captions[i] for i in idx], [keys[i] for i in idx])
        reward = (own - self.contrast * other if self.contrast else own).to(memory.device)
        baseline = (reward.sum(1, keepdim=True) - reward) / (self.k - 1)
        advantage = (reward - baseline).view(-1)
        logp = head.sequence_logprobs(mem, tokens)  # (n*k, L-1)
        n_tok = (tokens[:, 1:] != PAD).sum(1).clamp(min=1)
        per_sample = -(advantage * logp.sum(1) / n_tok)  # mean token log-prob: long and short samples alike
        loss = per_sample.view(len(idx), self.k).mean(1).sum() / images.to(memory.device)
        parts = {"reward": float(own.mean())}
        return loss, parts | ({"contrast": float(other.mean())} if self.contrast else {})

    def rewards(self, words: list[str], refs: list[list[str]], keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, k)`` CIDEr-D of each of the ``n * k`` sampled captions ``words`` (an image's ``k`` adjacent) against
        its image's references ``refs[i]``, and (with ``scst_contrast``; zeros otherwise) its mean CIDEr-D against the
        other images' references (zeros for a batch of one image: nothing to tell it from)."""
        n = len(refs)
        score = lambda w, j: self.cider.score(w, refs[j], keys[j])  # noqa: E731
        own = torch.tensor([score(w, j // self.k) for j, w in enumerate(words)]).view(n, self.k)
        if not self.contrast or n < 2:
            return own, torch.zeros_like(own)
        other = torch.tensor([sum(score(w, o) for o in range(n) if o != j // self.k) / (n - 1)
                              for j, w in enumerate(words)]).view(n, self.k)
        return own, other
