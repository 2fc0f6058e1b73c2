"""One Ultralytics peer of ``benchmarks/peers.py``: converts a data yaml to Ultralytics' formats, trains one of
their models from its yaml (no weights: nothing is downloaded), and scores its checkpoints with *our* evaluators.

Runs in a process of its own with Ultralytics on ``sys.path`` (``peers.py`` installs it into a folder of the
run, never into the project's environment)::

    python -m benchmarks.ultralytics_peer convert --data data/shapes.yaml --out runs/bench/peers/yolo-data
    python -m benchmarks.ultralytics_peer train --model yolov8n-seg.yaml --data-yaml .../seg.yaml --run DIR ...
    python -m benchmarks.ultralytics_peer score --run DIR --data data/shapes.yaml --epochs 5,10

Conversion is :func:`utils.data.convert.coco_to_yolo`: the labels the peer trains on are the ones our loader reads (same crowd handling, same semantic indices), one
YOLO polygon line per instance (several polygons of one instance merged as Ultralytics' COCO converter
does); semantic masks are PNGs of our semantic indices (255 ignored). Scores: each chosen epoch's checkpoint
predicts every val image at ``--img`` with conf 0.001, IoU 0.7, 300 detections (our validation's thresholds),
masks and maps at the original resolution, and our Box / Mask / Semantic evaluators (pycocotools, original
image and category ids) score them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from utils.data.config import load_data_config
from utils.data.convert import coco_to_yolo
from utils.data.dataset import CocoDataset, collate
from utils.eval.evaluate import image_splits
from utils.eval.evaluators import (
    BoxEvaluator,
    InstanceTruth,
    MaskEvaluator,
    SemanticEvaluator,
)
from utils.ops.postprocess import Result


def convert(data: str, out: Path, merge=None) -> dict[str, Path]:
    """:func:`utils.data.convert.coco_to_yolo` with ``merge`` (joining the flat ``[x0, y0, x1, ...]`` polygons of
    one instance into ``(k, 2)`` pieces of one outline) Ultralytics' own ``merge_multi_segment`` by default (the
    rule of its COCO converter), so the peer trains on the outlines its own tools would write."""
    if merge is None:
        from ultralytics.data.converter import merge_multi_segment as merge

    return coco_to_yolo(data, out, lambda polys: np.concatenate(merge([p.reshape(-1).tolist() for p in polys]), 0))


def train(model: str, data_yaml: str, run: Path, epochs: int, img: int, batch: int, seed: int, device: str,
          workers: int, save_period: int = 1, overrides: dict | None = None) -> None:
    """Trains ``model`` (an Ultralytics yaml) from scratch into ``run`` with the peer's defaults otherwise (but
    ``overrides``: hyperparameters by Ultralytics' names), a checkpoint after every ``save_period``-th epoch
    (``weights/epoch{N-1}.pt`` after epoch N; Ultralytics' own ``save_period`` keeps epochs 1, 1 + N, ...), no
    validation of its own (we score its checkpoints), and the seconds of each epoch's training loop in
    ``run/epoch_times.json``."""
    from ultralytics import YOLO

    times: list[float] = []
    state = {}

    def start(_trainer) -> None:
        state["t0"] = time.perf_counter()

    def end(_trainer) -> None:
        times.append(time.perf_counter() - state["t0"])
        (run / "epoch_times.json").write_text(json.dumps(times))

    def keep(trainer) -> None:  # after last.pt of 0-based epoch k is written
        if (trainer.epoch + 1) % save_period == 0:
            shutil.copyfile(trainer.last, trainer.wdir / f"epoch{trainer.epoch}.pt")

    yolo = YOLO(model)
    yolo.add_callback("on_train_epoch_start", start)
    yolo.add_callback("on_train_epoch_end", end)
    yolo.add_callback("on_model_save", keep)
    yolo.train(data=data_yaml, epochs=epochs, imgsz=img, batch=batch, seed=seed, deterministic=True,
               device=device, workers=workers, project=str(run.parent.resolve()), name=run.name, exist_ok=True,
               pretrained=False, plots=False, save_period=-1, val=False, verbose=False,
               **(overrides or {}))


def score(run: Path, data: str, epochs: list[int], img: int, device: str) -> dict[int, dict[str, float]]:
    """Our metrics of ``run``'s checkpoint after each of ``epochs`` (1-based; Ultralytics names the checkpoint
    after epoch N ``weights/epoch{N-1}.pt``; the last epoch falls back to ``last.pt``)."""
    from ultralytics import YOLO

    cfg = load_data_config(data)
    ds = CocoDataset(cfg, cfg.val, img_size=img, augment=False)
    owner = image_splits(ds)
    scores = {}
    for epoch in epochs:
        weights = run / "weights" / f"epoch{epoch - 1}.pt"
        if not weights.is_file() and epoch == max(epochs):
            weights = run / "weights" / "last.pt"
        if not weights.is_file():
            continue
        yolo = YOLO(str(weights))
        (run / "model_info.json").write_text(json.dumps({"params": sum(q.numel() for q in yolo.model.parameters())}))
        truth = InstanceTruth(ds, owner, cfg.category_ids)
        semantic = yolo.task == "semantic"
        evaluators = ([SemanticEvaluator(len(cfg.semantic_ids), ds)] if semantic else
                      [BoxEvaluator(truth, cfg.category_ids), MaskEvaluator(truth, cfg.category_ids)])
        for i in range(len(ds)):
            batch = collate([ds[i]])
            pred = yolo.predict(batch.paths[0], imgsz=img, conf=0.001, iou=0.7, max_det=300, retina_masks=True,
                                device=device, verbose=False)[0]
            lb = batch.letterboxes[0]
            if semantic:
                r = Result(lb, np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                           semantic=pred.semantic_mask.data.cpu().numpy().astype(np.uint8))
            else:
                b = pred.boxes
                masks = pred.masks.data.cpu().numpy() > 0.5 if pred.masks is not None else None
                r = Result(lb, b.xyxy.cpu().numpy().astype(np.float32), b.conf.cpu().numpy().astype(np.float32),
                           b.cls.cpu().numpy().astype(np.int64), masks=masks)
            for e in evaluators:
                e.process(batch, [r])
        metrics: dict[str, float] = {}
        for e in evaluators:
            metrics.update(e.evaluate())
        scores[epoch] = metrics
        print(f"{run.name} epoch {epoch}: {metrics}", flush=True)
    return scores


def latency(model: str, data_yaml: str, img: int, threads: int) -> float:
    """Median onnxruntime ms of one ``img`` x ``img`` image through ``model`` (its yaml, random weights: speed
    does not depend on the values) exported by Ultralytics' own ONNX exporter with ``data_yaml``'s classes."""
    import onnxruntime as ort
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    from benchmarks.speed import time_fn

    spec = yaml_model_load(model)  # the model yaml as a dict, its scale resolved from the name
    spec["nc"] = len(yaml.safe_load(Path(data_yaml).read_text())["names"])  # the data's class count
    sized = Path(data_yaml).parent / model
    sized.write_text(yaml.safe_dump(spec))
    yolo = YOLO(str(sized))
    path = Path(yolo.export(format="onnx", imgsz=img, simplify=True, verbose=False))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = torch.rand(1, 3, img, img)
    return 1e3 * time_fn(lambda t: sess.run(None, {name: t.numpy()}), x, 3, 20)


def _peer_setup(model: str, data_yaml: str, img: int):
    """Ultralytics' segmentation model ``model`` (its yaml, random weights) sized for ``data_yaml``'s classes, its
    default training arguments (loss gains) and its training dataset (mosaic and the rest of its augmentation)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.nn.tasks import SegmentationModel

    args = get_cfg(overrides={"task": "segment", "mode": "train", "imgsz": img, "model": model, "data": data_yaml})
    data = check_det_dataset(data_yaml)
    net = SegmentationModel(model, nc=data["nc"], ch=3, verbose=False)
    net.args = args  # the loss reads its gains from here, as Ultralytics' trainer sets them
    dataset = build_yolo_dataset(args, data["train"], 16, data, mode="train", stride=int(net.stride.max()))
    return net, args, dataset


def step_throughput(model: str, data_yaml: str, img: int, batch: int, max_batch: int, steps: int, warmup: int,
                    device: str) -> dict:
    """Training img/s and peak memory of Ultralytics' model at the largest batch that fits (``batch`` doubled up to
    ``max_batch``), by the step of its own trainer: AMP on CUDA (its default), forward + loss, scaled backward, unscale,
    clip to 10, optimizer step, EMA update, on one batch of its own training loader (the loader is timed apart,
    :func:`loader_rate`); memory as :func:`benchmarks.memtrack.step_memory` measures ours."""
    import torch
    from ultralytics.utils.torch_utils import ModelEMA

    from benchmarks.common import largest_batch
    from benchmarks.memtrack import step_memory

    dev = torch.device("cuda:0" if device.isdigit() else device)
    net, _, dataset = _peer_setup(model, data_yaml, img)
    net = net.to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=0.002, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda")
    ema = ModelEMA(net)
    items: list = []

    def step(b: dict) -> None:
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            loss, _ = net(b)
        scaler.scale(loss.sum()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=10.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema.update(net)

    def measure(b: int) -> dict:
        while len(items) < b:
            items.append(dataset[len(items) % len(dataset)])
        data = dataset.collate_fn(items[:b])
        data = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
        data["img"] = data["img"].float() / 255
        state = [*net.parameters(), *net.buffers(), *ema.ema.state_dict().values()]
        return step_memory(lambda: step(data), dev, steps, warmup, b, lambda: state + [
            v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)])

    best, tried = largest_batch(measure, batch, max_batch, lambda: opt.zero_grad(set_to_none=True))
    return {"batch": best, "params": sum(q.numel() for q in net.parameters()), **(tried[best] if best else {}),
            "tried": {b: (r or {}).get("img_s") for b, r in tried.items()}}


def loader_rate(data_yaml: str, img: int, batch: int, batches: int) -> dict:
    """Images per second of Ultralytics' training loader (its mosaic, random perspective, HSV, flips, polygon to
    mask) in this process alone (no workers: the rate of one CPU core), over ``batches`` batches after the first."""
    import time

    import torch
    from ultralytics.data import build_dataloader

    torch.set_num_threads(1)
    _, _, dataset = _peer_setup("yolov8n-seg.yaml", data_yaml, img)
    loader = build_dataloader(dataset, batch, workers=0, shuffle=True, device="cpu")
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:  # a small dataset: its next epoch (without workers the loader does not repeat)
            it = iter(loader)
            b = next(it)
        n += len(b["img"])
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": seconds, "img_per_s": n / max(seconds, 1e-9)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["convert", "train", "score", "latency", "step", "loader"])
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--out", default="runs/bench/peers/yolo-data")
    p.add_argument("--model", default="yolov8n-seg.yaml")
    p.add_argument("--data-yaml", default="")
    p.add_argument("--run", default="")
    p.add_argument("--epochs", default="10", help="train: the epoch count; score: a comma list of epochs")
    p.add_argument("--img", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--save-period", type=int, default=1, help="train: a checkpoint every N epochs")
    p.add_argument("--overrides", default="{}", help="train: Ultralytics hyperparameters, a JSON object")
    p.add_argument("--max-batch", type=int, default=0, help="step: the largest batch tried (doubling from --batch-size)")
    p.add_argument("--steps", type=int, default=10, help="step: timed steps; loader: timed batches")
    p.add_argument("--warmup", type=int, default=2, help="step: untimed steps first")
    opt = p.parse_args(argv)
    if opt.action == "convert":
        print(json.dumps({k: str(v) for k, v in convert(opt.data, Path(opt.out)).items()}))
    elif opt.action == "latency":
        print(json.dumps({"ms": latency(opt.model, opt.data_yaml, opt.img, opt.workers)}))
    elif opt.action == "step":
        print(json.dumps(step_throughput(opt.model, opt.data_yaml, opt.img, opt.batch_size,
                                         max(opt.max_batch, opt.batch_size), opt.steps, opt.warmup, opt.device)))
    elif opt.action == "loader":
        print(json.dumps(loader_rate(opt.data_yaml, opt.img, opt.batch_size, opt.steps)))
    elif opt.action == "train":
        train(opt.model, opt.data_yaml, Path(opt.run), int(opt.epochs), opt.img, opt.batch_size, opt.seed,
              opt.device, opt.workers, opt.save_period, json.loads(opt.overrides))
    else:
        epochs = [int(e) for e in opt.epochs.split(",")]
        scores = score(Path(opt.run), opt.data, epochs, opt.img, opt.device)
        (Path(opt.run) / "our_scores.json").write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
