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
import shutil
import sys
import tempfile
import time
from pathlib import Path

from models.model import format_counts, module_counts
from utils.data.vocab import Vocabulary
from utils.deploy.backends import GraphBackend, OnnxBackend, OpenVINOBackend
from utils.deploy.export import (
    FUSE_TOL,
    RUNTIME_TOL,
    compare_outputs,
    export_caption_decoder,
    export_openvino,
    export_torchscript,
    export_vision,
    failures,
    format_parity,
    graph_nodes,
    load_torchscript,
    run_deploy,
    simplify_onnx,
    verification_images,
)
from utils.deploy.interface import DeployModel, export_metadata
from utils.deploy.predictor import check_img_size
from utils.ops.nms import NMSConfig
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint
from utils.runtime.cli import run_cli
from utils.runtime.device import select_device
from utils.runtime.runs import latest_run
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
    import torch


    weights = Path(opt.weights) if opt.weights else latest_run("runs/train/exp*/weights/best.pt")
    if not weights:
        raise FileNotFoundError("no --weights given and no runs/train/exp*/weights/best.pt; train one with python train.py")
    if not 14 <= opt.opset <= 20:
        raise ValueError(f"--opset {opt.opset}: use 14..20 (attention needs 14, the TorchScript exporter stops at 20)")
    if opt.batch < 1:
        raise ValueError(f"--batch {opt.batch}: must be >= 1")
    device = select_device(opt.device)
    if opt.half and "openvino" in opt.include:
        raise ValueError("--half with --include openvino: the OpenVINO model is FP32 (OpenVINO runs on the CPU here, "
                         "where FP16 graphs gain nothing); export it without --half")
    if opt.half and device.type != "cuda":
        raise ValueError("--half needs a CUDA device (--device 0): FP16 graphs are exported and verified on the GPU")
    if "openvino" in opt.include and importlib.util.find_spec("openvino") is None:
        raise ValueError("--include openvino needs the openvino package: pip install openvino")
    if "openvino" in opt.include and "onnx" not in opt.include:
        opt.include = ["onnx", *opt.include]  # OpenVINO converts the ONNX graphs verified just before
    tasks = parse_tasks(opt.tasks) if opt.tasks else None
    if tasks is not None and "inst" in tasks and "det" not in tasks:
        raise ValueError(f"--tasks {opt.tasks}: inst needs det (instance masks are cut out by the detected boxes)")
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
            nms = NMSConfig(opt.conf_thres, opt.iou_thres, opt.max_det, opt.agnostic_nms)
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
    names = deploy.output_names
    ref = run_deploy(deploy, names, x)
    fuse_diffs = compare_outputs(run_deploy(DeployModel(unfused, nms), names, x), ref, img_hw)
    exp_model, exp_x = (copy.deepcopy(model).half(), x.half()) if opt.half else (model, x)
    exp_deploy = DeployModel(exp_model, nms) if opt.half else deploy
    tol = 1e-2 if opt.half else RUNTIME_TOL  # FP16 against the FP32 reference
    stem, out_dir = weights.stem, weights.parent
    metadata = export_metadata(model, img_hw, opt.batch, nms, opt.dynamic, opt.half, stem)
    columns = {"fused-unfused": fuse_diffs}
    problems = [f"fused vs unfused PyTorch: {', '.join(f)}" for f in [failures(fuse_diffs, FUSE_TOL)] if f]
    files: dict[str, Path] = {}

    cap_msgs: list[str] = []
    x2 = ref2 = hw2 = None
    if opt.dynamic:  # another batch size and image shape through the same graph
        hw2 = (img_hw[0] + int(model.stride), img_hw[1])
        x2 = verification_images(data_yaml, hw2, 2 if opt.batch == 1 else 1).to(device).float() / 255.0
        ref2 = run_deploy(deploy, names, x2)

    def verify(backend: GraphBackend, label: str, column: str) -> list[str]:
        """Parity of one exported backend (and, with --dynamic, at the second shape); adds its table column."""
        diffs, msg, cap_problem = _verify_graph(backend, model, ref, x, img_hw, label)
        columns[column] = diffs
        cap_msgs.append(msg)
        bad = failures(diffs, tol) + _caption_problems(cap_problem, opt.half)
        if opt.dynamic:
            d2, _, cap2 = _verify_graph(backend, model, ref2, x2, hw2, label)
            bad += [f"at {tuple(x2.shape)}: {b}" for b in failures(d2, tol) + _caption_problems(cap2, opt.half)]
            print(f"dynamic: also checked at {tuple(x2.shape)} ({label}): max normalized diff "
                  f"{max(d.normalized for d in d2):.2e}")
        return bad

    if "onnx" in opt.include:
        t0 = time.time()
        files["onnx"] = export_vision(exp_deploy, exp_x, out_dir / f"{stem}.onnx", opt.opset, opt.dynamic, metadata)
        if "cap" in model.tasks:
            memory = torch.from_numpy(ref["cap_memory"]).to(device, exp_x.dtype)
            files["cap_decoder"] = export_caption_decoder(exp_deploy.caption_head, memory,
                                                          out_dir / f"{stem}_cap_decoder.onnx", opt.opset, metadata)
        print(f"ONNX: {', '.join(f'{p.name} ({p.stat().st_size / 1e6:.1f} MB)' for p in files.values())} "
              f"in {time.time() - t0:.1f}s, opset {opt.opset}, tasks {','.join(model.tasks)}, "
              f"{graph_nodes(files['onnx'])} nodes, outputs {', '.join(names)}")
        bad = verify(OnnxBackend(files["onnx"], device), "ORT", "onnxruntime-torch")
        if opt.simplify:
            bad_slim = _simplify(files, model, ref, x, img_hw, device, tol, opt.half) if not bad else ["skipped"]
            if bad_slim:
                print(f"warning: --simplify: keeping the unsimplified model ({'; '.join(bad_slim)})")
        if bad:
            problems.append(f"onnxruntime vs PyTorch: {', '.join(bad)}")
        if "openvino" in opt.include and bad:
            print("note: OpenVINO conversion skipped: the ONNX graph it would convert failed verification")
        elif "openvino" in opt.include:
            t0 = time.time()
            files["openvino"] = export_openvino(files["onnx"], files.get("cap_decoder"), metadata)
            ov_backend = OpenVINOBackend(files["openvino"], device)  # f32 inference precision (its default)
            size = sum(f.stat().st_size for f in files["openvino"].iterdir()) / 1e6
            print(f"OpenVINO: {files['openvino'].name}/ ({size:.1f} MB) in {time.time() - t0:.1f}s, {ov_backend.name}")
            bad = verify(ov_backend, "OpenVINO", "openvino-torch")
            if bad:
                problems.append(f"OpenVINO vs PyTorch: {', '.join(bad)}")

    if "torchscript" in opt.include:
        ts_deploy = DeployModel(exp_model)  # no NMS: a Python autograd op cannot be serialized by TorchScript
        if nms is not None:
            print("note: the TorchScript file returns det_pred (NMS in the graph is ONNX only)")
        ts_names = ts_deploy.output_names
        t0 = time.time()
        files["torchscript"] = export_torchscript(ts_deploy, exp_x, out_dir / f"{stem}.torchscript", metadata | {
            "nms": False, "outputs": ts_names})
        loaded, _ = load_torchscript(files["torchscript"], device)
        ts_ref = ref if nms is None else run_deploy(DeployModel(model), ts_names, x)
        ts_diffs = compare_outputs(ts_ref, run_deploy(loaded, ts_names, exp_x), img_hw)
        print(f"TorchScript: {files['torchscript'].name} ({files['torchscript'].stat().st_size / 1e6:.1f} MB) "
              f"in {time.time() - t0:.1f}s")
        if nms is None:
            columns["torchscript-torch"] = ts_diffs
        else:
            print(format_parity({"torchscript-torch": ts_diffs}, {"torchscript-torch": tol}))
        bad = failures(ts_diffs, tol)
        if bad:
            problems.append(f"TorchScript vs PyTorch: {', '.join(bad)}")

    print(format_parity(columns, {"fused-unfused": FUSE_TOL} | {k: tol for k in columns if k != "fused-unfused"}))
    for msg in cap_msgs:
        if msg:
            print(msg)
    if problems:
        kept = f" (files kept for inspection: {', '.join(p.name for p in files.values())})" if files else ""
        raise ValueError("verification failed: " + "; ".join(problems) + kept)
    print(f"export success: {', '.join(str(p) for p in files.values())}")
    for k in ("onnx", "openvino"):
        if k in files:
            print(f"run it: python detect.py --weights {files[k]} --source <images|video|0>")
    return files


def _verify_graph(backend: GraphBackend, model, ref: dict, x, img_hw: tuple[int, int], label: str):
    """An exported backend on ``x`` vs the PyTorch outputs ``ref``; captions: its greedy decoding vs
    ``CaptionHead.greedy`` (``label`` names the runtime in the summary line).

    Returns (per-output diffs incl. the decoder's logits, a caption summary line, caption problems).
    """
    import numpy as np
    import torch


    out = backend(x.cpu().numpy())
    diffs = compare_outputs(ref, out, img_hw)
    if "cap" not in model.tasks:
        return diffs, "", []
    head = model.head("cap")
    mem = torch.from_numpy(ref["cap_memory"]).to(x.device)
    with torch.inference_mode():
        torch_tokens = head.greedy(mem).cpu().numpy()
        logits_t = head.decode_step(mem, torch.from_numpy(torch_tokens).to(x.device)).float().cpu().numpy()
    logits_o = backend.decode_step(out["cap_memory"], torch_tokens)
    diffs += compare_outputs({"cap_decoder.logits": logits_t}, {"cap_decoder.logits": logits_o}, img_hw)
    got_tokens = backend.caption_tokens(out["cap_memory"])
    vocab = Vocabulary.from_list(model.meta["vocab"]) if model.meta.get("vocab") else None
    words_t = vocab.decode_batch(torch.from_numpy(torch_tokens)) if vocab else [str(r) for r in torch_tokens.tolist()]
    words_g = vocab.decode_batch(torch.from_numpy(got_tokens)) if vocab else [str(r) for r in got_tokens.tolist()]
    same = sum(a == b for a, b in zip(words_t, words_g))
    identical = torch_tokens.shape == got_tokens.shape and bool(np.array_equal(torch_tokens, got_tokens))
    msg = (f"captions: torch greedy == {label} greedy for {same}/{len(words_t)} image(s)"
           f"{' (token ids identical)' if identical else ''}; e.g. '{words_g[0]}'")
    return diffs, msg, ([] if same == len(words_t) else [f"captions differ: '{words_t[0]}' vs '{words_g[0]}'"])


def _caption_problems(problems: list[str], half: bool) -> list[str]:
    """Caption mismatches fail an FP32 export; for FP16 they are a warning (half-precision logits can flip a
    near-tie argmax against the FP32 reference)."""
    if half and problems:
        print(f"warning: FP16 graph: {problems[0]}")
        return []
    return problems


def _simplify(files: dict[str, Path], model, ref: dict, x, img_hw, device, tol: float, half: bool) -> list[str]:
    """onnxslim every written graph into a temporary folder, verify, and move over the originals if parity holds.

    Returns the problems (empty = the simplified graphs were kept).
    """

    with tempfile.TemporaryDirectory(dir=files["onnx"].parent) as tmp:
        slim = {}
        try:
            for k in ("onnx", "cap_decoder"):
                if k in files:
                    slim[k] = simplify_onnx(files[k], Path(tmp) / files[k].name)
            diffs, _, cap_problem = _verify_graph(OnnxBackend(slim["onnx"], device), model, ref, x, img_hw, "ORT")
        except Exception as e:  # onnxslim or onnxruntime failing on the simplified graph: keep the original
            return [f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"]
        bad = failures(diffs, tol) + _caption_problems(cap_problem, half)
        if bad:
            return bad
        for k, p in slim.items():
            shutil.move(str(p), str(files[k]))
    print(f"simplified with onnxslim: {', '.join(f'{files[k].name} ({files[k].stat().st_size / 1e6:.1f} MB)' for k in slim)}"
          f", parity max normalized diff {max(d.normalized for d in diffs):.2e}")
    return []


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_opt(argv))


if __name__ == "__main__":
    sys.exit(main())
