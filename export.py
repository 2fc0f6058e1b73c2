"""Export a trained yolor-mt checkpoint to ONNX (TorchScript, OpenVINO), verified against PyTorch on real images.

    python export.py --weights runs/train/exp/weights/best.pt                  # best.onnx (+ best_cap_decoder.onnx)
    python export.py --weights best.pt --include onnx torchscript --img 640 --dynamic --simplify
    python export.py --weights best.pt --nms --conf-thres 0.25 --iou-thres 0.45  # NMS inside the graph
    python export.py --weights best.pt --include openvino                       # best_openvino_model/ (+ best.onnx)
    python export.py --weights best.pt --tasks det,inst                          # only the box and mask heads

Outputs go next to the weights. The vision graph takes ``images (B, 3, H, W)`` float 0..1 RGB and returns, for
the heads the model has: ``det_pred`` (or with ``--nms``: ``det_boxes det_scores det_classes det_anchor_index
det_count``), ``inst_coeffs inst_protos``, ``sem_logits``, ``cap_memory``. Caption models also get
``<stem>_cap_decoder.onnx``: ``memory, tokens -> logits`` of the next token. Every export is checked: the ONNX
checker, then fused vs unfused PyTorch and onnxruntime vs PyTorch on val images of the checkpoint's data yaml
(see utils/deploy/export.py for the tolerances); any failure exits with ``error: ...`` and code 2. OpenVINO
converts the verified ONNX graphs and is checked the same way (its CPU plugin pinned to f32 inference).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

import torch

from models.model import format_counts, module_counts
from utils.deploy.export import (
    FUSE_TOL,
    ExportJob,
    compare_outputs,
    failures,
    report,
    run_deploy,
    verification_images,
    write_onnx,
    write_openvino,
    write_torchscript,
)
from utils.deploy.interface import DeployModel, export_metadata
from utils.deploy.predictor import check_img_size
from utils.ops.options import PredictOptions
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint
from utils.runtime.cli import run_cli
from utils.runtime.device import select_device, use_half
from utils.runtime.runs import resolve_weights
from utils.tasks import parse_tasks


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="", help="checkpoint .pt (default: newest runs/train/exp*/weights/best.pt)")
    p.add_argument("--include", nargs="+", default=["onnx"], choices=["onnx", "torchscript", "openvino"],
                   help="formats (openvino converts the verified ONNX, so it implies onnx)")
    p.add_argument("--tasks", default="", help="comma list of the heads to export, e.g. det,inst (default: all)")
    p.add_argument("--img", "--img-size", nargs="+", type=int, default=[640], help="input size: one value or h w")
    p.add_argument("--batch", "--batch-size", type=int, default=1, help="batch size of the exported graph")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width axes")
    p.add_argument("--simplify", action="store_true", help="simplify with onnxslim (kept only if parity holds)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (14..20)")
    p.add_argument("--half", action="store_true", help="FP16 graph (CUDA only)")
    p.add_argument("--nms", action="store_true", help="NMS inside the graph (ONNX NonMaxSuppression)")
    p.add_argument("--conf-thres", type=float, default=0.25, help="--nms: confidence threshold baked into the graph")
    p.add_argument("--iou-thres", type=float, default=0.45, help="--nms: IoU threshold baked into the graph")
    p.add_argument("--max-det", type=int, default=300, help="--nms: detections per image (output size)")
    p.add_argument("--agnostic-nms", action="store_true", help="--nms: class-agnostic NMS")
    p.add_argument("--device", default="cpu", help="cpu or cuda device (0, 1, ...)")
    p.add_argument("--data", default="", help="data yaml for the verification images (default: the checkpoint's)")
    return p.parse_args(argv)


def run(opt: argparse.Namespace) -> dict[str, Path]:
    """Exports and verifies; returns the written files by format. Raises ValueError on any failure."""
    weights = resolve_weights(opt.weights)
    device, tasks = _check_options(opt)
    job = _prepare(opt, weights, device, tasks)
    if "onnx" in opt.include:
        verified = write_onnx(job, opt.simplify)
        if "openvino" in opt.include and not verified:
            print("note: OpenVINO conversion skipped: the ONNX graph it would convert failed verification")
        elif "openvino" in opt.include:
            write_openvino(job)
    if "torchscript" in opt.include:
        write_torchscript(job)
    report(job)
    print(f"export success: {', '.join(str(p) for p in job.files.values())}")
    for k in ("onnx", "openvino"):
        if k in job.files:
            print(f"run it: python detect.py --weights {job.files[k]} --source <images|video|0>")
    return job.files


def _check_options(opt: argparse.Namespace) -> tuple[torch.device, list[str] | None]:
    """Refuses impossible option sets before anything loads; returns the device and the heads to export
    (``None``: all). ``opt.half`` and ``opt.include`` are settled here (the shared --half policy; OpenVINO
    converts the ONNX graphs, so it implies onnx)."""
    if not 14 <= opt.opset <= 20:
        raise ValueError(f"--opset {opt.opset}: use 14..20 (attention needs 14, the TorchScript exporter stops at 20)")
    if opt.batch < 1:
        raise ValueError(f"--batch {opt.batch}: must be >= 1")
    device = select_device(opt.device)
    if opt.half and "openvino" in opt.include:
        raise ValueError("--half with --include openvino: the OpenVINO model is FP32 (OpenVINO runs on the CPU here, "
                         "where FP16 graphs gain nothing); export it without --half")
    opt.half = use_half(opt.half, device)
    if "openvino" in opt.include and importlib.util.find_spec("openvino") is None:
        raise ValueError("--include openvino needs the openvino package: pip install openvino")
    if "openvino" in opt.include and "onnx" not in opt.include:
        opt.include = ["onnx", *opt.include]  # OpenVINO converts the ONNX graphs verified just before
    tasks = parse_tasks(opt.tasks) if opt.tasks else None
    if tasks is not None and "inst" in tasks and "det" not in tasks:
        raise ValueError(f"--tasks {opt.tasks}: inst needs det (instance masks are cut out by the detected boxes)")
    return device, tasks


def _prepare(opt: argparse.Namespace, weights: Path, device: torch.device, tasks: list[str] | None) -> ExportJob:
    """The fused model, its PyTorch reference on val images of the data yaml (and the fused-vs-unfused
    column), everything the formats share."""
    ckpt = load_checkpoint(weights)
    model = build_from_checkpoint(ckpt, tasks=tasks).to(device).eval()
    unfused = copy.deepcopy(model)
    print(f"{weights}: {model.info()}")
    before = module_counts(model)
    model.fuse()
    print(f"fuse: before {format_counts(before)}\n      after  {format_counts(module_counts(model))}")
    img_hw = check_img_size(opt.img, model.stride)
    nms = None
    if opt.nms:
        if "det" in model.tasks:
            nms = PredictOptions.from_flags(opt)
        else:
            print("note: --nms ignored, the model has no detection head")
    data_yaml = opt.data or (ckpt.get("opt") or {}).get("data")
    if not data_yaml:
        raise ValueError("the checkpoint names no data yaml; pass --data for the verification images")
    try:
        images = verification_images(data_yaml, img_hw, opt.batch)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"verification images: {e} (pass --data with a data yaml whose val images exist)") from None
    x = images.to(device).float() / 255.0
    print(f"verification: {len(x)} val image(s) of {data_yaml} at {tuple(x.shape)}")
    deploy = DeployModel(model, nms)
    ref = run_deploy(deploy, deploy.output_names, x)
    fuse_diffs = compare_outputs(run_deploy(DeployModel(unfused, nms), deploy.output_names, x), ref, img_hw)
    job = ExportJob(model, deploy, x, ref, img_hw, export_metadata(model, img_hw, opt.batch, nms, opt.dynamic,
                                                                   opt.half, weights.stem),
                    weights.parent, weights.stem, nms, opt.opset, opt.dynamic, opt.half)
    job.columns["fused-unfused"] = fuse_diffs
    job.problems += [f"fused vs unfused PyTorch: {', '.join(f)}" for f in [failures(fuse_diffs, FUSE_TOL)] if f]
    if opt.dynamic:  # another batch size and image shape through the same graph
        hw2 = (img_hw[0] + int(model.stride), img_hw[1])
        x2 = verification_images(data_yaml, hw2, 2 if opt.batch == 1 else 1).to(device).float() / 255.0
        job.second = (x2, run_deploy(deploy, deploy.output_names, x2), hw2)
    return job


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_opt(argv))


if __name__ == "__main__":
    sys.exit(main())
