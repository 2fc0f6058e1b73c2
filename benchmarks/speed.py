"""Inference speed of a yolor-mt model: eager (unfused, fused), onnxruntime, OpenVINO and optionally TorchScript.

    python -m benchmarks.speed --quick                  # nano cfg, random weights, 256/320 px, batch 1 and 8
    python -m benchmarks.speed                          # 256/320/640 px
    python -m benchmarks.speed --weights best.pt --torchscript --threads 4
    python -m benchmarks.speed --sizes 640 --batches 1 --nc 5 --sem-classes 10 --ort-profile   # where ORT's time goes

Prints one table of latency (ms per image) and throughput (images/s) per backend, size and batch, then
parameters and GFLOPs per head (torch.utils.flop_counter, 2 FLOPs per multiply-add) and the speed ratios
fused/unfused, onnxruntime/fused and OpenVINO/fused at batch 1, 320 px. OpenVINO (CPU plugin, f32
inference precision, as export.py verifies it) is converted from the same ONNX graph; it is skipped with a
note when the ``openvino`` package is not installed. Timed is the vision graph (every head's outputs,
``cap_memory`` for captions, no NMS or caption decoding); the caption decoder's cost per step is listed with
the FLOPs. Without --weights the model is ``--cfg`` with random weights (no training needed; speed does not
depend on the values), with 13 semantic classes and a 60-word caption vocabulary.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from models.model import Model, format_counts, module_counts
from utils.deploy.backends import openvino_model, ort_session
from utils.deploy.export import export_vision, quiet_export
from utils.deploy.interface import DeployModel, export_metadata
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint
from utils.runtime.device import select_device


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="", help="checkpoint .pt (default: --cfg with random weights)")
    p.add_argument("--cfg", default="cfg/yolor-mt-n.yaml", help="model cfg when no --weights")
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="square input sizes (default 256 320 640)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes")
    p.add_argument("--iters", type=int, default=None, help="timed runs per cell (default 10, --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per cell (default 2, --quick 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads for torch and onnxruntime (1: stable, comparable numbers; 0: library default)")
    p.add_argument("--torchscript", action="store_true", help="also time a traced TorchScript module")
    p.add_argument("--flops-img", type=int, default=640, help="input size of the params/GFLOPs table")
    p.add_argument("--quick", action="store_true", help="sizes 256 320, 3 timed runs: a smoke-test run")
    p.add_argument("--device", default="cpu", help="cpu or cuda device (0, 1, ...)")
    p.add_argument("--half", action="store_true", help="FP16 eager models (CUDA only)")
    p.add_argument("--nc", type=int, default=80, help="classes of the random-weights model (no --weights)")
    p.add_argument("--sem-classes", type=int, default=13, help="semantic classes of the random-weights model")
    p.add_argument("--ort-profile", action="store_true", help="also print where onnxruntime's time goes at the "
                   "first size, batch 1: per cfg row (a head is one row) and the 10 slowest nodes")
    opt = p.parse_args(argv)
    opt.sizes = opt.sizes or ([256, 320] if opt.quick else [256, 320, 640])
    opt.iters = opt.iters or (3 if opt.quick else 10)
    opt.warmup = opt.warmup if opt.warmup is not None else (1 if opt.quick else 2)
    return opt


def build_model(opt: argparse.Namespace):
    """The model to time (eval mode, unfused) and a one-line description."""

    if opt.weights:
        model = build_from_checkpoint(load_checkpoint(opt.weights)).eval()
        return model, f"{opt.weights}"
    model = Model(opt.cfg, nc=opt.nc,
                  head_kwargs={"sem": {"num_classes": opt.sem_classes}, "cap": {"vocab_size": 60}}).eval()
    return model, f"{opt.cfg} (random weights, nc {opt.nc}, {opt.sem_classes} semantic classes, vocab 60)"


def time_fn(fn, x, warmup: int, iters: int, sync=lambda: None) -> float:
    """Median seconds of one call (median: robust to a stray slow run on a shared machine); ``sync`` waits
    for queued GPU work so that a CUDA call is timed to its end, not to its launch."""
    for _ in range(warmup):
        fn(x)
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def flops_table(model, fused_deploy, img: int) -> list[tuple[str, int | None, float]]:
    """``(part, params, GFLOPs)`` rows: body, each head, the caption decoder per step (its parameters are in
    the ``cap`` row), total."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        fused_deploy(torch.rand(1, 3, img, img))
    counts = fc.get_flop_counts()
    total = fc.get_total_flops()

    def flops(name: str) -> int:
        return int(sum(counts.get(name, {}).values()))

    rows, head_flops, head_params = [], 0, 0
    for task in model.tasks:
        i = model.head_index[task]
        f = flops(f"DeployModel.model.layers.{i}")
        p = sum(t.numel() for t in model.head(task).parameters())
        label = "cap (memory)" if task == "cap" else task
        rows.append((label, p, f / 1e9))
        head_flops, head_params = head_flops + f, head_params + p
    n_params = sum(t.numel() for t in model.parameters())
    rows.insert(0, ("body", n_params - head_params, (total - head_flops) / 1e9))
    if "cap" in model.tasks:  # one greedy step at half the longest caption, memory from this image size
        head = model.head("cap")
        memory = torch.rand(1, sum((img // int(s)) ** 2 for s in head.strides), head.d_model)
        tokens = torch.ones(1, max(1, head.max_len // 2), dtype=torch.long)
        with FlopCounterMode(display=False) as fc2, torch.inference_mode():
            head.decode_step(memory, tokens)
        rows.append((f"cap decoder/step (T={tokens.shape[1]})", None, fc2.get_total_flops() / 1e9))
    rows.append(("total (vision graph)", n_params, total / 1e9))
    return rows


def ort_profile(path: Path, x, threads: int, runs: int = 10) -> None:
    """onnxruntime's own profile of ``runs`` calls on ``x`` (the first, with its one-time allocations, among them)
    on the CPU: kernel ms per call by cfg row (``layers.N`` in the node names; a head is one row) and the 10
    slowest nodes with their output shapes. The profile file goes beside ``path``."""
    import json
    from collections import Counter

    sess = ort_session(path, "cpu", threads, profile=path.with_suffix(""))
    for _ in range(runs):
        sess.run(None, {"images": x.numpy()})
    events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    by_row, by_node = Counter(), Counter()
    for e in kernels:
        name = e["name"][: -len("_kernel_time")]
        by_row[next((p for p in name.split("/") if p.startswith("layers.")), "other (layout reorders, ...)")] += e["dur"]
        by_node[name, str(e["args"].get("output_type_shape", ""))] += e["dur"]
    scale = 1e-3 / runs  # microseconds over all calls -> ms per call
    total = sum(by_row.values()) * scale
    print(f"\nonnxruntime profile, {tuple(x.shape)}, {threads} thread(s): {total:.1f} ms of kernels per call")
    for row, us in by_row.most_common(12):
        print(f"  {row:<30}{us * scale:>8.2f} ms {100 * us * scale / total:>5.1f}%")
    print("  slowest nodes:")
    for (name, shape), us in by_node.most_common(10):
        print(f"  {us * scale:>8.2f} ms  {name}  {shape}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    import torch


    if opt.threads > 0:
        torch.set_num_threads(opt.threads)
    threads = torch.get_num_threads()
    device = select_device(opt.device)
    if opt.half and device.type != "cuda":
        raise SystemExit("--half needs a CUDA device")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.float16 if opt.half else torch.float32
    model, desc = build_model(opt)
    fused_model = copy.deepcopy(model).fuse()  # fused on CPU in float32, then moved: as export.py does
    unfused = DeployModel(copy.deepcopy(model).to(device, dtype))
    fused = DeployModel(copy.deepcopy(fused_model).to(device, dtype))
    names = fused.output_names
    print(f"model: {desc}\n       {model.info()}")
    print(f"fuse:  {format_counts(module_counts(model))} -> {format_counts(module_counts(fused_model))}")
    gpu = f"GPU: {torch.cuda.get_device_name(device)}{' FP16' if opt.half else ''}; " if device.type == "cuda" else ""
    print(f"{gpu}CPU: {cpu_name()}, {os.cpu_count()} cores, {threads} thread(s); torch {torch.__version__}; "
          f"{opt.warmup} warm-up + {opt.iters} timed runs per cell (median)")

    backends: dict[str, dict[int, object]] = {}  # name -> size -> callable(x: tensor)

    def eager(deploy):
        def run(x):
            with torch.inference_mode():
                deploy(x.to(device, dtype))
        return run

    backends["eager unfused"] = {s: eager(unfused) for s in opt.sizes}
    backends["eager fused"] = {s: eager(fused) for s in opt.sizes}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speed.onnx"
        x0 = torch.rand(1, 3, opt.sizes[0], opt.sizes[0])
        export_vision(DeployModel(fused_model), x0, path, 17, True,
                      export_metadata(fused_model, (opt.sizes[0],) * 2, 1, None, True, False, "speed"))
        sess = ort_session(path, device, threads)  # CUDA provider when on a GPU and installed, else CPU
        ort_label = f"onnxruntime {sess.get_providers()[0].replace('ExecutionProvider', '')}"

        def ort_run(x):
            sess.run(names, {"images": x.numpy()})

        backends[ort_label] = {s: ort_run for s in opt.sizes}
        ov_label = None
        if importlib.util.find_spec("openvino") is None:
            print("note: no OpenVINO column: the openvino package is not installed (pip install openvino)")
        elif device.type == "cuda":
            print("note: no OpenVINO column on a CUDA device (OpenVINO runs on the CPU here)")
        else:
            # OpenVINO reads the ONNX graph with the frontend export.py's conversion uses (same model as the IR)
            compiled = openvino_model(path, threads)  # CPU plugin, f32 inference precision

            def ov_run(x):
                compiled([x.numpy()])

            ov_label = "openvino CPU f32"
            backends[ov_label] = {s: ov_run for s in opt.sizes}
        if opt.torchscript:
            ts = {}
            with quiet_export():
                for s in opt.sizes:  # one trace per size: Python shape checks are frozen into a trace
                    ts[s] = eager(torch.jit.trace(fused, (torch.rand(1, 3, s, s, device=device, dtype=dtype),),
                                                  check_trace=False, strict=False))
            backends["torchscript"] = ts

        if opt.ort_profile:
            ort_profile(path, x0, threads)
        results: dict[tuple[str, int, int], float] = {}
        for s in opt.sizes:
            for b in opt.batches:
                x = torch.rand(b, 3, s, s)
                for name, fns in backends.items():
                    results[name, s, b] = time_fn(fns[s], x, opt.warmup, opt.iters, sync) / b  # seconds per image

    cols = list(backends)
    head = f"{'size':>5} {'batch':>5} |" + "|".join(f"{c:^21}" for c in cols)
    sub = f"{'':>11} |" + "|".join(f"{'ms/img':>10}{'img/s':>10} " for _ in cols)
    print("\n" + head + "\n" + sub + "\n" + "-" * len(head))
    for s in opt.sizes:
        for b in opt.batches:
            cells = "|".join(f"{1e3 * results[c, s, b]:>10.2f}{1 / results[c, s, b]:>10.1f} " for c in cols)
            print(f"{s:>5} {b:>5} |{cells}")

    rows = flops_table(fused_model, DeployModel(fused_model), opt.flops_img)
    print(f"\n{'part':<26}{'params':>12}{f'GFLOPs@{opt.flops_img}':>14}")
    for part, p, g in rows:
        print(f"{part:<26}{'-' if p is None else f'{p:,}':>12}{g:>14.3f}")

    s_ref = 320 if 320 in opt.sizes else opt.sizes[0]
    b_ref = 1 if 1 in opt.batches else opt.batches[0]
    r = {c: results[c, s_ref, b_ref] for c in cols}
    print(f"\nat batch {b_ref}, {s_ref} px: fused/unfused latency {r['eager fused'] / r['eager unfused']:.2f}x, "
          f"ORT/fused {r[ort_label] / r['eager fused']:.2f}x"
          + (f", OpenVINO/fused {r[ov_label] / r['eager fused']:.2f}x" if ov_label else "")
          + (f", TorchScript/fused {r['torchscript'] / r['eager fused']:.2f}x" if "torchscript" in r else "")
          + "  (< 1: faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
