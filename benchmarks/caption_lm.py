"""What the caption decoder alone reaches on a data yaml's training captions: the bounds a trained joint model's
caption cross-entropy and CIDEr-D sit between.

    python -m benchmarks.caption_lm --data ../shared/coco-val79/data.yaml --epochs 200
    python -m benchmarks.caption_lm --data ../shared/coco-val79/data.yaml --d-model 256 --layers 3 --label-smoothing 0

Trains the cfg's ``CaptionHead`` (its width, depth and heads unless given; the hyp's vocabulary rule, references
per step, label smoothing, maximum length and AdamW lr) on learned inputs instead of the body's features:
- ``language model``: one learned input for every image, so the decoder cannot tell them apart: the lowest
  cross-entropy and the best captions with no image at all;
- ``image identity``: a learned input per image: what a decoder of this size reaches once it can tell the images
  apart (with train = val, the memorisation the joint model is asked for).
A joint model whose caption cross-entropy stays at the language model's is not using the image; one at the
identity's is using all a decoder this size can. Printed per reported epoch: the training cross-entropy (label
smoothed as trained, and plain), greedy CIDEr-D and BLEU-4 against the images' references, and a few captions.
Batches of ``--batch-size`` images in a seeded order, an optimizer step each, warmup and linear decay as train.py.
"""
from __future__ import annotations

import argparse
import math

import torch

from models.heads.caption import CaptionHead
from models.parser import load_cfg
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset
from utils.data.vocab import Vocabulary, resolve_max_len
from utils.engine.hyp import load_hyp
from utils.eval.metrics.caption import caption_scores
from utils.loss.caption import CaptionLoss

LEVELS = ((128, 4), (256, 2))  # (channels, side) of the learned input maps (the head's levels: P4, P5 sized)


class LearnedInputs(torch.nn.Module):
    """Learned feature maps, one set per image (``per_image``) or one set shared by all."""

    def __init__(self, n_images: int, per_image: bool):
        super().__init__()
        n = n_images if per_image else 1
        self.maps = torch.nn.ParameterList(torch.nn.Parameter(0.1 * torch.randn(n, c, s, s)) for c, s in LEVELS)
        self.per_image = per_image

    def forward(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [m[index] if self.per_image else m.expand(len(index), -1, -1, -1) for m in self.maps]


def head_args(cfg: str) -> list:
    """The ``CaptionHead`` row's args of ``cfg`` at its scale (d_model, layers, heads[, tie])."""
    rows = [r for r in load_cfg(cfg)["heads"] if r[2] == "CaptionHead"]
    if not rows:
        raise SystemExit(f"{cfg} has no CaptionHead row")
    return list(rows[0][3])


def train_decoder(opt: argparse.Namespace, captions: list[list[str]], vocab: Vocabulary, hyp: dict,
                  per_image: bool) -> list[dict]:
    """Trains one decoder on learned inputs; returns a row per reported epoch."""
    torch.manual_seed(opt.seed)
    d_model, layers, heads = opt.d_model, opt.layers, opt.heads
    head = CaptionHead(0, [c for c, _ in LEVELS], [16, 32], d_model, layers, heads, opt.tie, vocab_size=len(vocab),
                       max_len=int(hyp["cap_max_len"]))
    inputs = LearnedInputs(len(captions), per_image)
    loss_fn = CaptionLoss(vocab, hyp)
    plain = CaptionLoss(vocab, hyp | {"label_smoothing": 0.0})
    params = list(head.parameters()) + list(inputs.parameters())
    optim = torch.optim.AdamW(params, lr=float(hyp.get("lr0_adamw", 0.002)), betas=(0.9, 0.999), weight_decay=0.0)
    nb = math.ceil(len(captions) / opt.batch_size)
    total, warmup = opt.epochs * nb, max(100, round(float(hyp.get("warmup_epochs", 3)) * nb))
    lrf = float(hyp.get("lrf", 0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warmup) *
                                              (1 - (1 - lrf) * s / max(total - 1, 1)))
    gen, rows, step = torch.Generator().manual_seed(opt.seed), [], 0
    at = {int(e) for e in opt.at.split(",") if e} or {opt.epochs}
    for epoch in range(1, opt.epochs + 1):
        head.train()
        sums = [0.0, 0.0]
        for idx in torch.randperm(len(captions), generator=gen).split(opt.batch_size):
            tokens = loss_fn.targets([captions[i] for i in idx], step, keys=idx.tolist())
            logits = head(inputs(idx), captions=tokens).logits
            present = torch.ones(len(idx), dtype=torch.bool)
            loss, _ = loss_fn(logits, tokens, present)
            optim.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optim.step()
            sched.step()
            step += 1
            sums[0] += float(loss.detach()) * len(idx)
            sums[1] += plain(logits.detach(), tokens, present)[1]["ce"] * len(idx)
        if epoch in at:
            rows.append({"epoch": epoch, "ce": sums[0] / len(captions), "ce_plain": sums[1] / len(captions)}
                        | greedy_scores(head, inputs, captions, vocab))
    return rows


@torch.no_grad()
def greedy_scores(head: CaptionHead, inputs: LearnedInputs, captions: list[list[str]], vocab: Vocabulary) -> dict:
    """Greedy captions of every image, scored against its references (CIDEr-D, BLEU-4), and the first three."""
    head.eval()
    idx = torch.arange(len(captions))
    words = vocab.decode_batch(head.greedy(head.encode(inputs(idx))))
    scores = caption_scores(dict(enumerate(words)), dict(enumerate(captions)))
    return {"cider": scores["cider"], "bleu4": scores["bleu4"], "examples": words[:3],
            "distinct": len(set(words))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/coco-val79/data.yaml")
    p.add_argument("--cfg", default="cfg/yolor-mt-n.yaml", help="the CaptionHead row's sizes unless given below")
    p.add_argument("--hyp", default="data/hyps/hyp.scratch.yaml")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--at", default="50,100,200", help="comma list of epochs to report")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-model", type=int, default=0)
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--heads", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--min-count", type=int, default=None,
                   help="the vocabulary's min count, fixed (hyp cap_min_count without the cap_max_unk rule)")
    opt = p.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    d, n, h, *tie = head_args(opt.cfg)
    opt.d_model, opt.layers, opt.heads = opt.d_model or d, opt.layers or n, opt.heads or h
    opt.tie = bool(tie and tie[0])
    hyp = load_hyp(opt.hyp)
    if opt.label_smoothing is not None:
        hyp["label_smoothing"] = opt.label_smoothing
    if opt.min_count is not None:
        hyp |= {"cap_min_count": opt.min_count, "cap_max_unk": 1.0}
    cfg = load_data_config(opt.data)
    captions = [list(rec.captions) for _, rec in CocoDataset(cfg, cfg.train, augment=False).items if rec.captions]
    vocab = Vocabulary.build((c for refs in captions for c in refs), int(hyp.get("cap_min_count", 2)),
                             float(hyp.get("cap_max_unk", 1.0)))
    hyp["cap_max_len"] = resolve_max_len(hyp.get("cap_max_len"), (c for refs in captions for c in refs))
    print(f"{len(captions)} captioned images, {len(vocab)} tokens (min count {vocab.min_count}, <unk> "
          f"{100 * vocab.unk_share:.1f}% of words); decoder d_model {opt.d_model}, {opt.layers} layers, {opt.heads} "
          f"heads; label smoothing {hyp.get('label_smoothing', 0.1)}; {opt.epochs} epochs of batch {opt.batch_size}")
    print(f"{'inputs':>15} {'epoch':>5} {'CE':>6} {'CE(ls=0)':>8} {'CIDEr-D':>7} {'BLEU-4':>6} {'distinct':>8}  examples")
    for name, per_image in (("language model", False), ("image identity", True)):
        for r in train_decoder(opt, captions, vocab, hyp, per_image):
            print(f"{name:>15} {r['epoch']:>5} {r['ce']:>6.3f} {r['ce_plain']:>8.3f} {r['cider']:>7.3f} "
                  f"{r['bleu4']:>6.3f} {r['distinct']:>8}  {' | '.join(r['examples'])}", flush=True)


if __name__ == "__main__":
    main()
