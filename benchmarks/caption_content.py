"""Do the captions describe the picture? CIDEr-D beside what the captions say, on a shapes dataset's val split.

    python -m benchmarks.caption_content --weights runs/train/exp/weights/last.pt          # score checkpoints
    python -m benchmarks.caption_content --train --epochs 10 --img 192                # train with / without SCST

CIDEr-D can be earned by a template every image's references share; this prints, beside CIDEr-D and BLEU-4,
what the val captions say about each image's objects (:mod:`utils.eval.metrics.caption_content`): the share that
name an object of the image with its colour (``named``), whose stated count is right (``count``), both, and the
share that name a coloured object the image does not have (``wrong``), the share whose coloured objects are
exactly the image's (``exact``: every kind with its colour, none missing or extra), and the number of distinct
captions.
The ground truth is each image's annotations (categories, and colours from the pixels or an annotation's
``colour``: :func:`utils.data.synthetic.scene_truths`), never its references. Every checkpoint is scored with
greedy decoding and each ``--beam`` width; the constant-caption floor (the most frequent training caption given
to every image) is scored alike.

``--train`` trains the nano joint model twice at the given budget (the benchmarks' shared flags), with the hyp's
self-critical epochs and with ``scst_epochs: 0``, one after another, then scores both ``last.pt``.
"""
from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from benchmarks.common import add_training_args, run_trainings, train_args
from models.heads.caption import DecoderCache
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset, create_dataloader
from utils.data.synthetic import OTHER_COLOURS, PALETTE, scene_truths
from utils.data.vocab import Vocabulary
from utils.engine.hyp import load_hyp
from utils.eval.metrics.caption import caption_scores
from utils.eval.metrics.caption_content import ContentReader
from utils.loss.caption import CaptionLoss, SelfCriticalLoss
from utils.ops.letterbox import to_float
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint


@torch.no_grad()
def val_captions(weights: str | Path, data: str, img: int, beams: list[int], batch_size: int = 16,
                 prompts: Sequence[str] = ()) -> tuple[dict[int | str, dict[int, str]], dict[int, list[str]]]:
    """The checkpoint's caption of every val image with references, per beam width (1: greedy) and per greedy
    ``prompts`` (captions made to start with the prompt: what the decoder says when asked for that kind of
    caption), and the references: ``({beam or prompt: {image id: caption}}, {image id: references})``."""
    ckpt = load_checkpoint(weights)
    model = build_from_checkpoint(ckpt).eval()
    vocab = Vocabulary.from_list(model.meta["vocab"])
    cfg = load_data_config(data)
    dataset = CocoDataset(cfg, cfg.val, img, augment=False)
    captions: dict[int | str, dict[int, str]] = {b: {} for b in [*beams, *prompts]}
    refs: dict[int, list[str]] = {}
    head = model.head("cap")
    prompt_ids = {p: vocab.encode(p, head.max_len)[1:-1] for p in prompts}  # without <bos> / <eos>
    for batch in create_dataloader(dataset, batch_size, False, 0):
        out = model(to_float(batch.images, torch.device("cpu"), False))
        for b in captions:
            tokens = (head.greedy(out.cap.memory, prompt=prompt_ids[b]) if isinstance(b, str)
                      else out.cap.tokens if b <= 1 else head.beam_search(out.cap.memory, beam=b))
            for iid, words in zip(batch.image_ids, vocab.decode_batch(tokens)):
                captions[b][int(iid)] = words
        refs.update({int(i): list(r) for i, r, has in zip(batch.image_ids, batch.captions,
                                                          batch.task_present("cap").tolist()) if has})
    return {b: {i: c for i, c in caps.items() if i in refs} for b, caps in captions.items()}, refs


def val_truths(data: str) -> tuple[dict[int, tuple[tuple[str, str], ...]], ContentReader]:
    """Every val image's ``(colour, name)`` objects and a reader for the data's category names and colour words."""
    cfg = load_data_config(data)
    truths: dict[int, tuple[tuple[str, str], ...]] = {}
    for split in cfg.val:
        if split.instances is None:
            raise SystemExit(f"{cfg.file}: a val split without instances has no objects to check captions against")
        truths |= scene_truths(split.images, split.instances)
    return truths, ContentReader(cfg.names, list(PALETTE) + list(OTHER_COLOURS))


def content_row(captions: dict[int, str], refs: dict[int, list[str]], truths, reader: ContentReader) -> dict:
    """CIDEr-D, BLEU-4, the content shares and the number of distinct captions of one set of captions."""
    scores = caption_scores(captions, refs)
    shares = reader.shares(captions, truths)
    return {"cider": scores["cider"], "bleu4": scores["bleu4"], **shares, "distinct": len(set(captions.values()))}


def print_rows(rows: dict[str, dict], floor: float) -> None:
    """The table: one row per model and decoding, the floor's multiple beside CIDEr-D."""
    print(f"{'model / decoding':<34} {'CIDEr-D':>8} {'x floor':>8} {'BLEU-4':>7} {'named':>6} {'count':>6} "
          f"{'both':>6} {'wrong':>6} {'exact':>6} {'distinct':>8}")
    for name, r in rows.items():
        print(f"{name:<34} {r['cider']:8.3f} {r['cider'] / floor if floor else float('nan'):8.2f} {r['bleu4']:7.3f} "
              f"{r['named']:6.1%} {r['count']:6.1%} {r['both']:6.1%} {r['wrong']:6.1%} {r['exact']:6.1%} {r['distinct']:8d}")


def train_pair(opt: argparse.Namespace) -> dict[str, Path]:
    """Trains the model with the hyp's self-critical epochs and with none; returns name -> last.pt."""
    project = Path(opt.project)
    project.mkdir(parents=True, exist_ok=True)
    hyp = load_hyp(opt.hyp)
    xe_hyp = project / "hyp.no-scst.yaml"
    xe_hyp.write_text(yaml.safe_dump(hyp | {"scst_epochs": 0}, sort_keys=False))
    args = train_args(opt)
    runs = {"scst": args, "no-scst": args[:args.index("--hyp") + 1] + [str(xe_hyp)] + args[args.index("--hyp") + 2:]}
    for name, minutes in run_trainings(runs, project).items():
        print(f"trained {name} in {minutes:.1f} min")
    return {f"{name} (scst_epochs {hyp.get('scst_epochs', 0) if name == 'scst' else 0})":
            project / name / "weights" / "last.pt" for name in runs}


Inputs = tuple[list[torch.Tensor], list[torch.Tensor], list[list[str]], list[int]]  # levels, class maps, refs, ids


@torch.no_grad()
def head_inputs(model: torch.nn.Module, data: str, splits: str, img: int, batch_size: int) -> list[Inputs]:
    """Per batch of the data's ``splits`` (``"train"`` / ``"val"``): what the model's caption head is called with
    (its input levels and the detector's class maps), the images' references and ids."""
    cfg = load_data_config(data)
    seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def record(module, args, kwargs):
        seen.append((list(args[0]), list(kwargs.get("det_classes") or [])))
        raise _Recorded  # the rest of the forward (the caption head's greedy decode) is not needed

    hook = model.head("cap").register_forward_pre_hook(record, with_kwargs=True)
    batches = []
    try:
        dataset = CocoDataset(cfg, getattr(cfg, splits), img, augment=False)
        for batch in create_dataloader(dataset, batch_size, False, 0):
            seen.clear()
            try:
                model(to_float(batch.images, torch.device("cpu"), False))
            except _Recorded:
                pass
            batches.append((*seen[0], [list(r) for r in batch.captions], [int(i) for i in batch.image_ids]))
    finally:
        hook.remove()
    return batches


class _Recorded(Exception):
    """Raised by :func:`head_inputs`' hook once the caption head's inputs are recorded, to end the forward."""


@torch.no_grad()
def memories(model, data: str, split: str, img: int, batch_size: int = 16) -> tuple[torch.Tensor, list[int], list]:
    """The caption head's memory ``(N, S, d)`` (fp32) of every image of ``split`` (``train`` / ``val``, unaugmented:
    the weak view without its colour jitter), their ids and their references."""
    head = model.head("cap")
    batches = head_inputs(model, data, split, img, batch_size)
    mem = torch.cat([head.encode(levels, classes).float() for levels, classes, _, _ in batches])
    return mem, [i for *_, ids in batches for i in ids], [r for _, _, refs, _ in batches for r in refs]


def finetune_scst(weights: str | Path, hyp: dict, train: tuple, epochs: int, total_epochs: int,
                  batch: int = 8, accumulate: int = 4, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """Self-critical epochs on the caption head alone, over fixed training memories ``train`` (from
    :func:`memories`): a proxy of a run's last ``epochs`` SCST epochs (of ``total_epochs``) that costs a minute
    (hyp ``scst_xe`` adds the teacher-forced cross-entropy of ``cap_refs`` references, as the trainer does).
    Batches of ``batch`` captioned images (about the captioned half of a batch of 16), ``accumulate`` of them a
    step (nominal batch 64), AdamW at the linear schedule's learning rate of those epochs. Returns the head and
    the last epoch's mean reward."""
    ckpt = load_checkpoint(weights)
    model = build_from_checkpoint(ckpt)
    head = model.head("cap").train()
    vocab = Vocabulary.from_list(model.meta["vocab"])
    mem, ids, refs = train
    loss_fn, ce_fn, xe = SelfCriticalLoss(vocab, refs, hyp), CaptionLoss(vocab, hyp), float(hyp.get("scst_xe", 0.0))
    lr0, lrf = float(hyp.get("lr0_adamw", 0.002)), float(hyp.get("lrf", 0.01))
    opt = torch.optim.AdamW(head.parameters(), lr=lr0, betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    reward = 0.0
    for e in range(total_epochs - epochs, total_epochs):
        for g in opt.param_groups:
            g["lr"] = lr0 * ((1 - e / total_epochs) * (1 - lrf) + lrf)
        order, rewards = torch.randperm(len(ids), generator=gen).tolist(), []
        for step, start in enumerate(range(0, len(order), batch)):
            rows = order[start:start + batch]
            caps, present = [refs[i] for i in rows], torch.ones(len(rows), dtype=torch.bool)
            loss, parts = loss_fn(head, mem[rows], caps, present, [ids[i] for i in rows])
            if xe > 0:  # the mixed objective, teacher-forced over the same memories as the trainer does
                tokens = ce_fn.targets(caps, step, keys=[ids[i] for i in rows])
                x = head._embed(tokens.reshape(-1, tokens.shape[-1])[:, :-1])
                logits = head.out(DecoderCache.decode_shared(head.decoder, mem[rows], x))
                loss = loss + xe * ce_fn(logits.view(*tokens.shape[:2], -1, logits.shape[-1]), tokens, present)[0]
            (loss / accumulate).backward()
            rewards.append(parts.get("reward", 0.0))
            if (step + 1) % accumulate == 0 or start + batch >= len(order):  # an epoch's tail steps too
                opt.step()
                opt.zero_grad()
        reward = sum(rewards) / max(len(rewards), 1)
        print(f"    epoch {e + 1}/{total_epochs}: mean sample CIDEr-D {reward:.3f}", flush=True)
    return head.eval(), reward


@torch.no_grad()
def head_captions(head, vocab: Vocabulary, val: tuple, beams: list[int]) -> dict[int, dict[int, str]]:
    """The head's captions of the val memories per beam width (1: greedy)."""
    mem, ids, _ = val
    out: dict[int, dict[int, str]] = {}
    for b in beams:
        caps = []
        for start in range(0, len(ids), 32):
            m = mem[start:start + 32]
            caps += vocab.decode_batch(head.greedy(m) if b <= 1 else head.beam_search(m, beam=b))
        out[b] = dict(zip(ids, caps))
    return out


def decoding_label(decoding: int | str) -> str:
    """A table row's decoding: a beam width (1: greedy) or a greedy prompt."""
    if isinstance(decoding, str):
        return f"greedy after {decoding!r}"
    return "greedy" if decoding <= 1 else f"beam {decoding}"


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> ``(name, {key: value})`` (values read as YAML scalars)."""
    name, _, keys = text.partition(":")
    return name, {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in keys.split(",") if kv)}


def finetune_rows(opt: argparse.Namespace, beams: list[int], truths, reader: ContentReader) -> dict[str, dict]:
    """``--finetune``: each variant's SCST epochs on the caption head of the first ``--weights`` (a run without
    SCST, or its last cross-entropy epoch), scored on val."""
    weights = opt.weights[0]
    ckpt = load_checkpoint(weights)
    model = build_from_checkpoint(ckpt).eval()
    vocab = Vocabulary.from_list(model.meta["vocab"])
    train, val = memories(model, opt.data, "train", opt.img), memories(model, opt.data, "val", opt.img)
    refs = {i: r for i, r in zip(val[1], val[2]) if r}
    base = load_hyp(opt.hyp) | {"cap_max_len": int(model.head("cap").max_len)}
    rows = {}
    for text in opt.finetune:
        name, over = parse_variant(text)
        print(f"  fine-tune {name}: {over}", flush=True)
        head, reward = finetune_scst(weights, base | over, train, opt.ft_epochs, opt.ft_total, seed=opt.seed)
        for b, caps in head_captions(head, vocab, val, beams).items():
            label = f"{name}, {decoding_label(b)}"
            rows[label] = content_row({i: c for i, c in caps.items() if i in refs}, refs, truths, reader)
            print(f"    {label}: {list(caps.values())[:3]}", flush=True)
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, epochs=10, img=192, project="runs/benchmarks/caption_content")
    p.add_argument("--weights", nargs="*", default=[], help="checkpoints to score (with --train: also these)")
    p.add_argument("--train", action="store_true", help="train with and without self-critical epochs first")
    p.add_argument("--beam", default="1,5", help="comma list of beam widths (1: greedy)")
    p.add_argument("--prompt", nargs="*", default=[], help="greedy captions that start with these words as well "
                   "(e.g. 'a picture of', the references' inventory opening: what the decoder knows when it must list)")
    p.add_argument("--examples", type=int, default=3, help="captions printed per model and decoding")
    p.add_argument("--finetune", nargs="*", default=[], metavar="NAME:KEY=VALUE,...",
                   help="SCST variants (hyp overrides) to fine-tune the caption head of the first --weights with, "
                        "over fixed body features (a proxy of the SCST epochs; see finetune_scst)")
    p.add_argument("--ft-epochs", type=int, default=3, help="--finetune: SCST epochs (a run's last ones)")
    p.add_argument("--ft-total", type=int, default=10, help="--finetune: the run's epochs (sets their learning rate)")
    return p


def main(argv: list[str] | None = None) -> None:
    opt = parser().parse_args(argv)
    beams = [int(b) for b in opt.beam.split(",")]
    models = {Path(w).parent.parent.name or str(w): Path(w) for w in opt.weights}
    if opt.train:
        models |= train_pair(opt)
    truths, reader = val_truths(opt.data)
    cfg = load_data_config(opt.data)
    train_caps = Counter(c for _, rec in CocoDataset(cfg, cfg.train, augment=False).items for c in rec.captions)
    refs = {int(rec.image_id): list(rec.captions) for _, rec in CocoDataset(cfg, cfg.val, augment=False).items
            if rec.captions}
    rows: dict[str, dict] = {}
    for name, weights in models.items():
        per_beam, _ = val_captions(weights, opt.data, opt.img, beams, prompts=opt.prompt)
        for b, caps in per_beam.items():
            label = f"{name}, {decoding_label(b)}"
            rows[label] = content_row(caps, refs, truths, reader)
            for iid in list(caps)[:opt.examples]:
                print(f"  {label}: image {iid}: {caps[iid]!r}  objects {truths.get(iid)}")
    if opt.finetune:
        rows |= finetune_rows(opt, beams, truths, reader)
    constant = train_caps.most_common(1)[0][0]
    rows["constant caption (the floor)"] = content_row({i: constant for i in refs}, refs, truths, reader)
    floor = rows["constant caption (the floor)"]["cider"]
    print(f"\nval: {len(refs)} images with references; floor: the most frequent training caption {constant!r}")
    print_rows(rows, floor)


if __name__ == "__main__":
    main()
