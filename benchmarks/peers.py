"""The joint model side by side with Ultralytics' single-task models at the same budget, scored the same way.

    python -m benchmarks.peers                                   # 10 epochs, 192 px, CPU (about 2 h on 2 cores)
    python -m benchmarks.peers --epochs 20 --img 256 --at 5,10,15,20 --device 0     # the full table, on a GPU
    python -m benchmarks.peers --only joint                      # retrain ours only; the rest is read back

Trains, one after another with the same data, epochs, image size, batch, seed and device:
- ours: the joint model (all four tasks) and our det + inst model (``--tasks det,inst``), by ``train.py``;
- Ultralytics YOLOv8n-seg and YOLO26n-seg (and YOLO26n-sem where the installed Ultralytics has it), from
  their yaml with their default recipe, no weights. Ultralytics is installed by this script, pinned, into
  ``<project>/_ultralytics`` (``pip --target``, without its dependencies: it would replace our headless
  OpenCV with ``opencv-python``), never into the project's environment; it runs in a process of its own
  (:mod:`benchmarks.ultralytics_peer`) on labels converted from what our loader reads.

Every model is scored by our evaluation (pycocotools on original image and category ids, conf 0.001, IoU 0.7,
300 detections; mIoU at the original resolution): ours by ``train.py``'s validation (``results.csv``), the
peers by :func:`benchmarks.ultralytics_peer.score` on their checkpoint after each epoch of ``--at``. The table
gives box / mask mAP50-95, mIoU and CIDEr-D per epoch, params, train img/s (training loop only) and minutes.
Beside our captions: the constant-caption floor, CIDEr-D of the most frequent training caption given to every
val image. A run whose results are complete is read back, not retrained (``--only`` retrains).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from benchmarks.common import (
    add_training_args,
    params_and_gflops,
    run_trainings,
    train_args,
)
from benchmarks.speed import time_fn
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset
from utils.deploy.backends import ort_session
from utils.deploy.export import export_vision
from utils.deploy.interface import DeployModel, export_metadata
from utils.engine.hyp import load_hyp
from utils.eval.metrics.caption import caption_scores
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint
from utils.viz.plots import read_results

# Pinned so a rerun trains the same peers; installed without dependencies (see the module docstring), so
# the ones Ultralytics imports that the project lacks are listed here.
ULTRALYTICS = ["ultralytics==8.4.190", "ultralytics-thop==2.2.3", "polars==2.1.0", "polars-runtime-32==2.1.0",
               "psutil>=5.8"]
# name -> (Ultralytics model yaml, data yaml kind)
PEERS = {"yolov8n-seg": ("yolov8n-seg.yaml", "seg"), "yolo26n-seg": ("yolo26n-seg.yaml", "seg"),
         "yolo26n-sem": ("yolo26n-sem.yaml", "sem")}
OURS = {"joint": "", "ours-det+inst": "det,inst"}  # run name -> train.py --tasks ("" = all the data has)
COLUMNS = {"box": "box_map", "box50": "box_map50", "mask": "mask_map", "mask50": "mask_map50", "mIoU": "sem_miou",
           "BLEU4": "cap_bleu4", "CIDEr": "cap_cider"}
# --aug off: every augmentation both recipes have, by the name both give it, set to 0 (a memorisation check)
AUG_OFF = {"mosaic": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "degrees": 0.0, "translate": 0.0, "scale": 0.0,
           "shear": 0.0, "perspective": 0.0, "flipud": 0.0, "fliplr": 0.0}


def recipe_overrides(opt: argparse.Namespace) -> dict[str, float]:
    """The hyperparameters every model of the run shares, ours and the peers' alike: the nominal batch
    (``nbs``, the images per optimizer step) and, with ``--aug off``, no augmentation."""
    return {"nbs": opt.nbs} | (AUG_OFF if opt.aug == "off" else {})


def our_hyp(opt: argparse.Namespace, project: Path) -> str:
    """``--hyp`` with :func:`recipe_overrides` applied, written into the project (the file our runs train with)."""
    path = project / "hyp.yaml"
    path.write_text(yaml.safe_dump(load_hyp(opt.hyp) | recipe_overrides(opt), sort_keys=False))
    return str(path)


def peer_env(site: Path, project: Path) -> dict[str, str]:
    """The environment of a peer process: Ultralytics' folder first on the path, its settings in the run."""
    path = os.pathsep.join([str(site.resolve()), str(Path.cwd())] + ([os.environ["PYTHONPATH"]]
                                                                      if os.environ.get("PYTHONPATH") else []))
    return os.environ | {"PYTHONPATH": path, "YOLO_CONFIG_DIR": str((project / "_ultralytics_settings").resolve()),
                         "YOLO_OFFLINE": "1"}


def ensure_ultralytics(site: Path, env: dict[str, str]) -> str:
    """Installs the pinned Ultralytics into ``site`` unless it imports from there; returns its version."""
    probe = [sys.executable, "-c", "import ultralytics; print(ultralytics.__version__)"]
    done = subprocess.run(probe, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"installing {ULTRALYTICS[0]} into {site} (pip --target, no dependencies) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site), "--no-deps",
                        *ULTRALYTICS], check=True)
        done = subprocess.run(probe, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def run_peer(args: list[str], env: dict[str, str], log: Path | None = None) -> str:
    """Runs :mod:`benchmarks.ultralytics_peer` with ``args``; output to ``log`` when given, else returned."""
    cmd = [sys.executable, "-m", "benchmarks.ultralytics_peer", *args]
    if log is None:
        return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    with open(log, "w") as f:
        if subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode != 0:
            raise SystemExit(f"{' '.join(args[:3])} failed; see {log}")
    return ""


def constant_caption_floor(data: str) -> tuple[str, float]:
    """The most frequent training caption and its CIDEr-D when given to every val image with references."""
    cfg = load_data_config(data)
    train = CocoDataset(cfg, cfg.train, augment=False)
    val = CocoDataset(cfg, cfg.val, augment=False)
    counts = Counter(c for _, rec in train.items for c in rec.captions)
    if not counts:
        return "", math.nan
    caption = counts.most_common(1)[0][0]
    refs = {int(rec.image_id): list(rec.captions) for _, rec in val.items if rec.captions}
    return caption, caption_scores({i: caption for i in refs}, refs)["cider"] if refs else math.nan


def ours_row(run: Path, at: list[int], img: int) -> dict:
    """Our run's metrics at the epochs ``at`` (from its ``results.csv``), params and train img/s."""
    results = read_results(run / "results.csv")
    by_epoch = {int(r["epoch"]): r for r in results}
    model = build_from_checkpoint(load_checkpoint(run / "weights/last.pt"))
    n_params, _ = params_and_gflops(model, img)
    train_s = sum(r["time/train_s"] for r in results)
    images = sum(r["time/train_s"] * r["time/img_per_s"] for r in results)
    return {"at": {e: by_epoch.get(e, {}) for e in at}, "params": n_params, "img_s": images / max(train_s, 1e-9),
            "train_min": train_s / 60}


def peer_row(run: Path, at: list[int], n_train: int) -> dict:
    """A peer's scores at ``at`` (``our_scores.json``), params (from its checkpoint) and train img/s."""
    scores = {int(k): v for k, v in json.loads((run / "our_scores.json").read_text()).items()}
    times = json.loads((run / "epoch_times.json").read_text())
    info = json.loads((run / "model_info.json").read_text()) if (run / "model_info.json").is_file() else {}
    return {"at": {e: scores.get(e, {}) for e in at}, "params": info.get("params", math.nan),
            "img_s": n_train * len(times) / max(sum(times), 1e-9), "train_min": sum(times) / 60}


def our_latency(run: Path, img: int, threads: int) -> tuple[Callable[[], float], float]:
    """A timer of our fused vision graph under onnxruntime (every head, no NMS, caption memory only) at one ``img``
    image: ``timer()`` -> median ms of 20 runs; and the greedy caption decoding's ms (eager) on its memory,
    reported separately."""
    torch.set_num_threads(threads)
    model = build_from_checkpoint(load_checkpoint(run / "weights/last.pt")).eval()
    fused = copy.deepcopy(model).fuse()
    x = torch.rand(1, 3, img, img)
    with tempfile.TemporaryDirectory() as tmp:  # the session holds the graph once built
        path = Path(tmp) / "peers.onnx"
        export_vision(DeployModel(fused), x, path, 17, True,
                      export_metadata(fused, (img, img), 1, None, True, False, "peers"))
        sess = ort_session(path, torch.device("cpu"), threads)
    decode_ms = math.nan
    if "cap" in model.tasks:
        with torch.inference_mode():
            memory = model(x).cap.memory
            decode_ms = 1e3 * time_fn(lambda m: model.head("cap").greedy(m), memory, 1, 5)
    return (lambda: 1e3 * time_fn(lambda t: sess.run(None, {"images": t.numpy()}), x, 3, 20)), decode_ms


def latency_rounds(opt: argparse.Namespace, project: Path, peers: list[str], yamls: dict[str, Path],
                   env: dict[str, str]) -> None:
    """Prints onnxruntime latency of our joint graph and each of ``peers``, timed in ``opt.latency_rounds``
    alternating rounds (ours, then every peer, again) and reported as the median over rounds: one machine's speed
    drifts by several percent over minutes, which a single back-to-back pair would fold into the ratio."""
    timer, decode_ms = our_latency(project / "joint", opt.latency, 1)
    times: dict[str, list[float]] = {"joint": [], **{name: [] for name in peers}}
    for _ in range(max(opt.latency_rounds, 1)):
        times["joint"].append(timer())
        for name in peers:
            model, kind = PEERS[name]
            out = run_peer(["latency", "--model", model, "--data-yaml", str(yamls[kind]), "--img", str(opt.latency),
                            "--workers", "1"], env)
            times[name].append(json.loads(out.strip().splitlines()[-1])["ms"])
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"\nonnxruntime, {opt.latency} px, batch 1, 1 thread (median of 20 runs, then the median of "
          f"{len(times['joint'])} alternating rounds): joint (all heads) {med['joint']:.1f} ms "
          f"(rounds {', '.join(f'{t:.1f}' for t in times['joint'])}); its greedy caption decoding {decode_ms:.1f} ms "
          "more (eager)")
    for name in peers:
        print(f"  {name}: {med[name]:.1f} ms (rounds {', '.join(f'{t:.1f}' for t in times[name])}; "
              f"joint / {name}: {med['joint'] / med[name]:.2f}x)")


def print_table(rows: dict[str, dict], at: list[int], floor: tuple[str, float], opt: argparse.Namespace) -> None:
    print(f"\nbudget: {opt.epochs} epochs, {opt.img} px, batch {opt.batch_size}, nominal batch {opt.nbs}, "
          f"augmentation {opt.aug}, seed {opt.seed}, device {opt.device}, data {opt.data}, {os.cpu_count()} CPU "
          "cores; metrics by our evaluation (pycocotools, original pixels)")
    shown = {c: key for c, key in COLUMNS.items()  # the columns some row has a figure in
             if any(isinstance(r["at"][e].get(key), float) for r in rows.values() for e in at)}
    print(f"{'model':>16} {'epoch':>5} " + " ".join(f"{c:>7}" for c in shown) +
          f" {'params(M)':>9} {'img/s':>6} {'train min':>9}")
    for name, r in rows.items():
        for k, e in enumerate(at):
            m = r["at"][e]
            cells = [f"{m[key]:>7.4f}" if isinstance(m.get(key), float) and math.isfinite(m[key]) else f"{'-':>7}"
                     for key in shown.values()]
            tail = (f" {r['params'] / 1e6:>9.2f} {r['img_s']:>6.2f} {r['train_min']:>9.1f}" if k == len(at) - 1
                    else "")
            print(f"{name if k == 0 else '':>16} {e:>5} " + " ".join(cells) + tail)
    caption, cider = floor
    print(f"constant-caption floor: CIDEr-D {cider:.4f} for {caption!r} (the most frequent training caption) on "
          "every val image")


def parser(doc: str = __doc__) -> argparse.ArgumentParser:
    """This benchmark's flags (``benchmarks/real.py`` sets other defaults on them)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, epochs=10, img=192, project="runs/bench/peers")
    p.add_argument("--at", default="", help="comma list of epochs to report (default: half-way and the last)")
    p.add_argument("--only", default="", help="comma list of runs to (re)train and score: "
                   f"{','.join([*OURS, *PEERS])}; the others are read from --project when complete")
    p.add_argument("--peers", default=",".join(PEERS), help="which Ultralytics models to run")
    p.add_argument("--ours", default=",".join(OURS), help="which of our models to run")
    p.add_argument("--latency", type=int, default=640, help="also time onnxruntime at this size, batch 1, "
                   "1 thread, ours (the trained joint model) against each peer's graph (0: skip)")
    p.add_argument("--latency-rounds", type=int, default=3, help="alternating timing rounds (ours, each peer) whose "
                   "median is reported")
    # the settings every model of the table shares besides the training flags (recipe_overrides)
    p.add_argument("--nbs", type=int, default=64, help="nominal batch: images per optimizer step, for every model")
    p.add_argument("--aug", choices=["on", "off"], default="on",
                   help="off: no augmentation for any model (mosaic, HSV, affine, flips all 0)")
    return p


def main(argv: list[str] | None = None) -> None:
    run(parser().parse_args(argv))


def run(opt: argparse.Namespace) -> None:
    """Trains what is not done yet, scores it and prints the table (and the latency rounds)."""
    project = Path(opt.project)
    project.mkdir(parents=True, exist_ok=True)
    at = sorted({int(e) for e in opt.at.split(",") if e and int(e) <= opt.epochs}
                or {max(opt.epochs // 2, 1), opt.epochs})
    only = set(opt.only.split(",")) if opt.only else None

    def wanted(name: str, done: bool) -> bool:
        return (name in only) if only is not None else not done

    ours = {name: OURS[name] for name in opt.ours.split(",") if name}
    period = math.gcd(*at)  # ours validate, and the peers keep a checkpoint, every `period` epochs (and the last)
    shared = argparse.Namespace(**vars(opt) | {"hyp": our_hyp(opt, project)})
    todo = {name: [*train_args(shared, tasks), "--val-period", str(period)] for name, tasks in ours.items()
            if wanted(name, (project / name / "weights/last.pt").is_file())}
    run_trainings(todo, project, threads=opt.threads)

    site = project / "_ultralytics"
    env = peer_env(site, project)
    print(f"Ultralytics {ensure_ultralytics(site, env)} from {site}", flush=True)
    yamls = {k: Path(v) for k, v in json.loads(run_peer(["convert", "--data", opt.data, "--out",
                                                         str(project / "yolo-data")], env)).items()}
    common = ["--img", str(opt.img), "--device", str(opt.device)]
    peers = []  # the asked-for peers the data has labels for
    for name in [n.strip() for n in opt.peers.split(",") if n.strip()]:
        model, kind = PEERS[name]
        run_dir = project / name
        if kind not in yamls:
            print(f"{name}: skipped (the data has no {kind} labels)")
            continue
        peers.append(name)
        if wanted(name, (run_dir / "weights/last.pt").is_file()):
            print(f"training {name} (log {run_dir}.log) ...", flush=True)
            run_peer(["train", "--model", model, "--data-yaml", str(yamls[kind]), "--run", str(run_dir), "--epochs",
                      str(opt.epochs), "--batch-size", str(opt.batch_size), "--seed", str(opt.seed), "--workers",
                      str(opt.workers), "--save-period", str(period), "--overrides",
                      json.dumps(recipe_overrides(opt)), *common], env, project / f"{name}.log")
        if not (run_dir / "our_scores.json").is_file() or (only is not None and name in only):
            print(f"scoring {name} at epochs {at} ...", flush=True)
            run_peer(["score", "--run", str(run_dir), "--data", opt.data, "--epochs", ",".join(map(str, at)), *common],
                     env, project / f"{name}.score.log")

    cfg = load_data_config(opt.data)
    n_train = len(CocoDataset(cfg, cfg.train, augment=False))
    rows = {name: ours_row(project / name, at, opt.img) for name in ours}
    rows |= {name: peer_row(project / name, at, n_train) for name in PEERS if (project / name / "our_scores.json").is_file()}
    print_table(rows, at, constant_caption_floor(opt.data), opt)
    if opt.latency:
        latency_rounds(opt, project, peers, yamls, env)

if __name__ == "__main__":
    main()
