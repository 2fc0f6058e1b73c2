"""What a caption head learns from a trained checkpoint's frozen features, with and without its object tokens.

    python -m benchmarks.caption_frozen --weights runs/train/exp/weights/last.pt --steps 750
    python -m benchmarks.caption_frozen --weights <last.pt> --steps 750 --fresh --grid-only

The body and the detector are the checkpoint's, frozen, in eval mode; each training image's caption-head inputs
(its pyramid levels and the detector's class maps, letterboxed at ``--img``, no augmentation) are computed once.
Then only the caption head trains: the checkpoint's own head, or with ``--fresh`` a new one of the same size (seeded),
``--steps`` AdamW steps of ``--batch-size`` images (the hyp's lr, references per step and label smoothing; warmup
and linear decay), every image captioned. Every ``--report`` steps the val split's greedy captions are read as
:mod:`benchmarks.caption_content` reads them (named, count, both, wrong), and on the val images with one object:
how often the caption names its kind, and its colour. ``--grid-only`` withholds the detector's class maps, so the
head reads the grid without object tokens: the same features, the object tokens' share of what the head learns.
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

from benchmarks.caption_content import Inputs, head_inputs, val_truths
from models.heads.caption import CaptionHead
from utils.data.vocab import Vocabulary
from utils.engine.hyp import load_hyp
from utils.eval.metrics.caption_content import ContentReader
from utils.loss.caption import CaptionLoss
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint


def single_object_reads(captions: dict[int, str], truths, reader: ContentReader) -> dict[str, int]:
    """On the images with one object: how many there are, and how often the caption names its kind and its colour."""
    out = Counter(images=0, kind=0, colour=0)
    for i, caption in captions.items():
        if len(truths.get(i, ())) != 1:
            continue
        (colour, kind), = truths[i]
        phrases = reader.phrases(caption)
        out["images"] += 1
        out["kind"] += any(p.noun == kind for p in phrases)
        out["colour"] += any(p.colour == colour for p in phrases)
    return dict(out)


@torch.no_grad()
def val_row(head: CaptionHead, val: list[Inputs], vocab: Vocabulary, truths, reader: ContentReader,
            grid_only: bool) -> dict:
    """The content shares of the head's greedy val captions, and :func:`single_object_reads`."""
    head.eval()
    captions = {}
    for levels, classes, _, ids in val:
        tokens = head(levels, det_classes=None if grid_only else classes).tokens
        captions.update(zip(ids, vocab.decode_batch(tokens)))
    head.train()
    return {**reader.shares(captions, truths), **single_object_reads(captions, truths, reader)}


def train_head(head: CaptionHead, train: list[Inputs], loss_fn: CaptionLoss, lr: float, steps: int, grid_only: bool,
               report) -> None:
    """``steps`` AdamW steps over the batches of ``train`` (in order, repeated), 50 steps of linear warmup, linear
    decay to 0; calls ``report(step, cross_entropy)`` every step."""
    optim = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    head.train()
    for step in range(steps):
        levels, classes, refs, _ = train[step % len(train)]
        for group in optim.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (1 - step / steps)
        tokens = loss_fn.targets(refs, step)
        out = head(levels, captions=tokens, det_classes=None if grid_only else classes)
        loss, parts = loss_fn(out.logits, tokens, torch.tensor([bool(r) for r in refs]))
        optim.zero_grad()
        loss.backward()
        optim.step()
        report(step + 1, parts["ce"])


def fresh_copy(head: CaptionHead, seed: int) -> CaptionHead:
    """A newly initialized head of ``head``'s size (seeded)."""
    torch.manual_seed(seed)
    nc = head.class_embed.in_features if head.objects else 0
    layer = head.decoder.layers[0]
    return CaptionHead(nc, [t.conv.in_channels for t in head.proj], head.strides, head.d_model,
                       len(head.decoder.layers), layer.self_attn.num_heads, head.tie, head.objects,
                       vocab_size=head.vocab_size, max_len=head.max_len, dropout=layer.dropout.p)


def save_with_head(ckpt: dict, model: torch.nn.Module, head: CaptionHead, path: str) -> None:
    """Writes ``ckpt`` with ``head``'s weights as the model's caption head (in its model and EMA weights)."""
    model.head("cap").load_state_dict(head.state_dict())
    state = model.state_dict()
    for key in ("model", "ema"):
        if ckpt.get(key) is not None:
            ckpt[key] = {k: state[k].to(v.dtype) for k, v in ckpt[key].items()}
    save_checkpoint(ckpt, path)
    print(f"saved {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--img", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=750)
    p.add_argument("--report", type=int, default=250, help="score the val captions every N steps")
    p.add_argument("--fresh", action="store_true", help="a new caption head of the same size instead of the checkpoint's")
    p.add_argument("--grid-only", action="store_true", help="withhold the detector's class maps (no object tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default="", help="write the checkpoint with this caption head to this path "
                                             "(e.g. for caption_content --finetune)")
    opt = p.parse_args(argv)

    torch.manual_seed(opt.seed)
    ckpt = load_checkpoint(opt.weights)
    model = build_from_checkpoint(ckpt).eval()
    head = model.head("cap")
    vocab = Vocabulary.from_list(model.meta["vocab"])
    train = head_inputs(model, opt.data, "train", opt.img, opt.batch_size)
    val = head_inputs(model, opt.data, "val", opt.img, opt.batch_size)
    if opt.fresh:
        head = fresh_copy(head, opt.seed)
    for prm in head.parameters():
        prm.requires_grad_(True)
    hyp = dict(ckpt.get("hyp") or load_hyp("hyp.scratch.yaml")) | {"cap_max_len": head.max_len}  # the run's own hyp
    loss_fn = CaptionLoss(vocab, hyp)
    truths, reader = val_truths(opt.data)
    print(f"{opt.weights}: caption head {'fresh' if opt.fresh else 'continued'}, "
          f"{'grid only' if opt.grid_only or not head.objects else f'grid + {head.objects} object tokens'}, "
          f"{len(train)} batches of "
          f"{opt.batch_size}, {opt.steps} steps")
    print("step  xent   named  count   both  wrong  one object: kind / colour")

    def report(step: int, ce: float) -> None:
        if step % opt.report and step != opt.steps:
            return
        r = val_row(head, val, vocab, truths, reader, opt.grid_only)
        print(f"{step:4d} {ce:6.3f} {r['named']:6.1%} {r['count']:6.1%} {r['both']:6.1%} {r['wrong']:6.1%}"
              f"  {r['kind']} / {r['colour']} of {r['images']}", flush=True)

    report(0, float("nan"))
    train_head(head, train, loss_fn, float(hyp.get("lr0_adamw", 0.002)), opt.steps, opt.grid_only, report)
    if opt.save:
        save_with_head(ckpt, model, head, opt.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
