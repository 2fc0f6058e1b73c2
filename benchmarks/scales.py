"""Parameters and GFLOPs of every scale of a cfg, per head, at COCO's counts, beside published peers.

    python -m benchmarks.scales                       # cfg/yolor-mt.yaml, n s m l x, 640 px, COCO's counts
    python -m benchmarks.scales --scales n,m --img 320 --vocab 9487

The model is built as ``train.py`` builds it for COCO (80 classes, 171 COCO-Stuff classes, a ~10k-word vocabulary,
all four heads) with random weights. GFLOPs are ``torch.utils.flop_counter``'s (2 FLOPs per multiply-add) for one
image of ``--img`` px: the body and each head of the vision graph, the caption head teacher-forced over one caption
of ``--tokens`` ids (its memory projection and a decoder pass; what generating that caption with cached keys costs).
Published peers (parameters, GFLOPs at 640 px, as their authors report them) are printed beside for the same letter.
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.model import Model
from models.parser import load_cfg

TASK_ORDER = ("det", "inst", "sem", "cap")
# (params M, GFLOPs at 640) as published; None: not published for that letter.
YOLOV8_SEG = {"n": (3.4, 12.6), "s": (11.8, 42.6), "m": (27.3, 110.2), "l": (46.0, 220.5), "x": (71.8, 344.1)}
YOLO26_SEG = {"n": (2.7, 9.1), "s": (10.4, 34.2), "m": (23.6, 121.5), "l": (28.0, 139.8), "x": (62.8, 313.5)}
GENERALIST_YOLO = (32.5, 122.2)  # one size ("~122.2G"); GYOLO-X's size is not published
SOURCES = {
    "YOLOv8-seg": "docs.ultralytics.com/models/yolov8 (Segmentation (COCO) table)",
    "YOLO26-seg": "docs.ultralytics.com/tasks/segment (YOLO26 Segment table)",
    "GeneralistYOLO": "github.com/WongKinYiu/GeneralistYOLO README (Performance table)",
}


def scale_cfg(cfg: str, scale: str) -> dict:
    """The cfg dict at ``scale`` (body multiples and head sizes both picked by it)."""
    d = copy.deepcopy(load_cfg(cfg))
    d.pop("_file", None)
    if scale not in (d.get("scales") or {}):
        raise SystemExit(f"{cfg} has no scale '{scale}' (scales: {sorted(d.get('scales') or {})})")
    d["scale"] = scale
    return load_cfg(d)


def measure(d: dict, img: int, nc: int, sem: int, vocab: int, tokens: int) -> dict[str, tuple[int, float]]:
    """``part -> (params, GFLOPs)`` for ``body``, each head and ``total`` of cfg dict ``d`` at one ``img`` px image."""
    model = Model(d, nc=nc, head_kwargs={"sem": {"num_classes": sem},
                                          "cap": {"vocab_size": vocab, "max_len": max(tokens, 2)}}).eval()
    captions = torch.ones(1, max(tokens, 2), dtype=torch.long)  # ids only set the length: FLOPs do not read them
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, img, img), captions=captions)
    counts = counter.get_flop_counts()
    total_flops = counter.get_total_flops()
    n_params = sum(p.numel() for p in model.parameters())
    parts: dict[str, tuple[int, float]] = {}
    for task in (t for t in TASK_ORDER if t in model.tasks):
        flops = sum(counts.get(f"Model.layers.{model.head_index[task]}", {}).values())
        parts[task] = (sum(p.numel() for p in model.head(task).parameters()), flops / 1e9)
    head_params = sum(p for p, _ in parts.values())
    head_flops = sum(g for _, g in parts.values())
    return {"body": (n_params - head_params, total_flops / 1e9 - head_flops), **parts,
            "total": (n_params, total_flops / 1e9)}


def head_sizes(d: dict) -> str:
    """The head rows' args at the cfg's scale, as ``Module[args]`` (what the table's head columns were built with)."""
    short = {"InstanceHead": "inst", "SemanticHead": "sem", "CaptionHead": "cap"}
    return " ".join(f"{short[r[2]]}{list(r[3])}" for r in d["heads"] if r[2] in short)


def format_table(rows: dict[str, dict[str, tuple[int, float]]], img: int) -> str:
    """A markdown table: per scale, params (M) / GFLOPs of the body, each head and the total, with the peers."""
    parts = ["body", *TASK_ORDER, "total"]
    head = "| scale | " + " | ".join(parts) + " | YOLOv8-seg (published, 640) | YOLO26-seg (published, 640) |"
    lines = [f"params (M) / GFLOPs at {img} px", head, "|" + "---|" * (len(parts) + 3)]
    for scale, r in rows.items():
        cells = [f"{r[p][0] / 1e6:.2f} / {r[p][1]:.1f}" if p in r else "-" for p in parts]
        peers = [f"{t[scale][0]} / {t[scale][1]}" if scale in t else "-" for t in (YOLOV8_SEG, YOLO26_SEG)]
        lines.append(f"| {scale} | " + " | ".join(cells + peers) + " |")
    lines.append(f"GeneralistYOLO (one size): {GENERALIST_YOLO[0]} / ~{GENERALIST_YOLO[1]}")
    lines += [f"{name}: {src}" for name, src in SOURCES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="cfg/yolor-mt.yaml")
    p.add_argument("--scales", default="n,s,m,l,x", help="comma list of the cfg's scales")
    p.add_argument("--img", type=int, default=640)
    p.add_argument("--nc", type=int, default=80, help="object classes (COCO: 80)")
    p.add_argument("--sem-classes", type=int, default=171, help="semantic classes (COCO-Stuff's things + stuff: 171)")
    p.add_argument("--vocab", type=int, default=10000, help="caption vocabulary (COCO at min count 5: ~10k words)")
    p.add_argument("--tokens", type=int, default=16, help="ids of the caption the decoder's GFLOPs are counted over "
                   "(<bos> + a COCO caption's ~10.5 words + <eos>, rounded up)")
    opt = p.parse_args(argv)
    rows, sizes = {}, {}
    for scale in [s.strip() for s in opt.scales.split(",") if s.strip()]:
        d = scale_cfg(opt.cfg, scale)
        sizes[scale] = head_sizes(d)
        rows[scale] = measure(d, opt.img, opt.nc, opt.sem_classes, opt.vocab, opt.tokens)
    print(f"{opt.cfg}: {opt.nc} classes, {opt.sem_classes} semantic classes, {opt.vocab}-word vocabulary, caption "
          f"GFLOPs over {opt.tokens} ids")
    for scale, s in sizes.items():
        print(f"  {scale}: {s}")
    print(format_table(rows, opt.img))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
