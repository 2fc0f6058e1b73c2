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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["convert", "train", "score", "latency"])
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
    opt = p.parse_args(argv)
    if opt.action == "convert":
        print(json.dumps({k: str(v) for k, v in convert(opt.data, Path(opt.out)).items()}))
    elif opt.action == "latency":
        print(json.dumps({"ms": latency(opt.model, opt.data_yaml, opt.img, opt.workers)}))
    elif opt.action == "train":
        train(opt.model, opt.data_yaml, Path(opt.run), int(opt.epochs), opt.img, opt.batch_size, opt.seed,
              opt.device, opt.workers, opt.save_period, json.loads(opt.overrides))
    else:
        epochs = [int(e) for e in opt.epochs.split(",")]
        scores = score(Path(opt.run), opt.data, epochs, opt.img, opt.device)
        (Path(opt.run) / "our_scores.json").write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
