"""Evaluate a trained yolor-mt checkpoint on a data yaml's val split.

    python test.py --weights runs/train/exp/weights/best.pt
    python test.py --weights best.pt --data data/coco.yaml --img 640 --save-json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset, create_dataloader
from utils.data.vocab import Vocabulary
from utils.eval.evaluate import COCO_BEAM, EvalSettings, LabelSpace, evaluate
from utils.ops.options import PredictOptions
from utils.ops.panoptic import PanopticSpec
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint
from utils.runtime.cli import run_cli
from utils.runtime.device import select_device, use_half
from utils.runtime.runs import increment_path, resolve_weights


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="", help="checkpoint .pt (default: newest runs/train/exp*/weights/best.pt)")
    p.add_argument("--data", default="", help="data yaml (default: the one the checkpoint was trained on)")
    p.add_argument("--task", default="val", choices=["val", "test"], help="which split of the data yaml")
    p.add_argument("--batch-size", "--batch", type=int, default=16)
    p.add_argument("--img", "--img-size", type=int, default=0, help="image size (default: the training size)")
    p.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.7, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    p.add_argument("--device", default="", help="cuda device or cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--half", action="store_true", help="FP16 inference (CUDA only)")
    p.add_argument("--beam", type=int, default=COCO_BEAM,
                   help=f"caption beam width (default {COCO_BEAM}, as GRIT and GeneralistYOLO score COCO; 1 = greedy)")
    p.add_argument("--sem-input-res", action="store_true",
                   help="faster mIoU at network input resolution on the letterboxed map (default: predictions "
                        "resized to each original image and compared with its original PNG, as COCO-Stuff reports)")
    p.add_argument("--pan-stuff-area", type=int, default=4096,
                   help="panoptic merge: stuff regions under this many original pixels become void")
    p.add_argument("--rect", action="store_true",
                   help="rectangular batches (YOLOv5's val): images sorted by aspect ratio, each batch letterboxed "
                        "to the smallest shape that holds it, less padding to compute")
    p.add_argument("--save-json", action="store_true", help="write COCO-format predictions")
    p.add_argument("--project", default="runs/test")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    return p.parse_args(argv)


def run(opt: argparse.Namespace) -> dict:
    weights = resolve_weights(opt.weights)
    device = select_device(opt.device)
    opt.half = use_half(opt.half, device)
    ckpt = load_checkpoint(weights)
    model = build_from_checkpoint(ckpt).to(device).eval()
    if opt.half:
        model.half()
    data = load_data_config(opt.data or ckpt["opt"]["data"])
    if ckpt["opt"].get("single_cls"):  # trained with --single-cls: scored as one class too
        data = data.single_class()
    meta = model.meta
    if data.category_ids != meta.get("category_ids", data.category_ids):
        raise ValueError(f"{data.file}: its categories differ from the checkpoint's ({len(meta['category_ids'])} classes)")
    img = opt.img or int(meta.get("img_size", 640))
    splits = data.val if opt.task == "val" else data.test
    if not splits:
        raise ValueError(f"{data.file} has no '{opt.task}' split")
    dataset = CocoDataset(data, splits, img, augment=False)
    if opt.rect:
        dataset.rect(opt.batch_size, max(int(model.stride), 32), 0.5)
    loader = create_dataloader(dataset, opt.batch_size, False, opt.workers)
    print(f"{weights}: {model.info()}\n{opt.task}: {len(dataset)} images ({dataset.labels_summary()})")
    vocab = Vocabulary.from_list(meta["vocab"]) if meta.get("vocab") else None
    semantic_ids = meta.get("semantic_ids") or []
    panoptic = (PanopticSpec.from_meta(data.category_ids, semantic_ids, stuff_area=opt.pan_stuff_area)
                if semantic_ids else None)
    res = evaluate(model, loader, dataset, LabelSpace(data.category_ids, len(semantic_ids), vocab=vocab), device,
                   PredictOptions.from_flags(opt, multi_label=True, panoptic=panoptic),
                   EvalSettings(opt.half, beam=opt.beam, semantic_at="input" if opt.sem_input_res else "original"))
    save_dir = increment_path(Path(opt.project) / opt.name, opt.exist_ok)
    save_dir.mkdir(parents=True, exist_ok=True)
    print_report(res, data)
    metrics = {k: round(v, 6) for k, v in res.metrics.items() if not k.startswith("val/")}
    (save_dir / "metrics.json").write_text(json.dumps(metrics | {"images": res.images, "speed_ms": res.speed_ms}, indent=2))
    if opt.save_json:
        (save_dir / "predictions.json").write_text(json.dumps(res.detections))
        if res.masks:
            (save_dir / "predictions_segm.json").write_text(json.dumps(res.masks))
    print(f"results saved to {save_dir}")
    return metrics


def print_report(res, data) -> None:
    m = res.metrics
    if "box_map" in m:
        print(f"{'class':>20} {'AP50-95':>9}")
        print(f"{'all':>20} {m['box_map']:9.4f}   (mAP50 {m['box_map50']:.4f})")
        for cid, name in zip(data.category_ids, data.names):
            print(f"{name:>20} {res.per_class['box'].get(cid, 0.0):9.4f}")
    if "mask_map" in m:
        print(f"{'masks':>20} {m['mask_map']:9.4f}   (mAP50 {m['mask_map50']:.4f})")
    if "sem_miou" in m:
        print(f"semantic: mIoU {m['sem_miou']:.4f}, pixel accuracy {m['sem_pixacc']:.4f}")
    if "cap_bleu4" in m:
        print("captions: " + ", ".join(f"{k[4:]} {m[k]:.4f}" for k in m if k.startswith("cap_")))
        for iid, pred, refs in res.captions[:5]:
            print(f"  image {iid}: '{pred}'  (reference: '{refs[0] if refs else ''}')")
    if "pq" in m:
        print(f"panoptic: PQ {m['pq']:.4f} (things {m['pq_th']:.4f}, stuff {m['pq_st']:.4f}), SQ {m['sq']:.4f}, "
              f"RQ {m['rq']:.4f}")
    s = res.speed_ms
    print(f"speed: {s['pre']:.1f} ms pre-process, {s['inference']:.1f} ms inference, {s['nms']:.1f} ms NMS per image")


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_opt(argv))


if __name__ == "__main__":
    sys.exit(main())
