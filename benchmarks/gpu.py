"""GPU figures at COCO scale: training img/s and peak memory at the largest batch that fits, beside Ultralytics
YOLOv8-seg of the same letter on the same card in the same run, and each data loader's img/s per CPU core (how
many cores keep one GPU fed).

    python -m benchmarks.gpu --device 0                  # scales n and l of both bodies, 640 px, AMP: the README's GPU table
    python -m benchmarks.gpu --loader-only               # the loaders' img/s per core alone (no GPU needed)
    python -m benchmarks.gpu --device cpu --img 64 --batch 2 --max-batch 2 --steps 1 --warmup 1 --images 8 \\
        --loader-batches 2 --scales n                   # the suite's tiny CPU run of the same code

Data: :mod:`benchmarks.coco_like` (COCO's 80 thing and 171 semantic classes, a 10k-word vocabulary, ~7.3
polygons, a stuffthing map and 5 captions per image, 640x480 JPEGs), converted to Ultralytics' format for the
peer by :func:`benchmarks.ultralytics_peer.convert`.

Training throughput: ours is :class:`utils.engine.trainer.Trainer`'s own ``_train_batch`` (train.py's hyp: AMP,
every task's loss with 5 references per captioned image, scaled backward, unscale, clip, optimizer step, EMA),
an optimizer step every batch; the peer is its trainer's step (:func:`benchmarks.ultralytics_peer.step_throughput`).
Both train one batch drawn from their own training loader, so the loader is not in the figure (it is timed apart):
``--warmup`` untimed steps, then ``--steps`` timed ones. The batch starts at ``--batch`` and doubles until a step
runs out of memory or passes ``--max-batch``; the row is the largest that fitted. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps; on the CPU the peak of live tensor bytes of one more step
(:class:`benchmarks.memtrack.TensorMemory`, the weights, EMA and optimizer state included).

Loader: images per second of each training loader in one process without workers (the rate of one CPU core, torch
at 1 thread): ours (:func:`benchmarks.loader.loader_throughput`: mosaic, every task's labels, the weak caption view
at hyp ``cap_view``) and Ultralytics' (:func:`benchmarks.ultralytics_peer.loader_rate`: mosaic, polygons to masks).
``cores to feed`` = training img/s / loader img/s per core.

The peer runs in a process of its own with Ultralytics from ``--peer-site`` (installed there pinned, as
``benchmarks/peers.py`` does, unless ``--no-install``: then, if it does not import from there, the peer rows are
skipped with a note).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.coco_like import write_coco_like
from benchmarks.common import largest_batch
from benchmarks.loader import loader_throughput
from benchmarks.memtrack import step_memory
from benchmarks.peers import ensure_ultralytics, peer_env, run_peer
from benchmarks.profile_step import build_trainer, state_tensors
from utils.data.dataset import collate
from utils.engine.hyp import load_hyp
from utils.engine.trainer import Trainer

COLUMNS = ("params(M)", "batch", "img/s", "peak MiB", "loader img/s/core", "cores to feed")


def our_throughput(trainer: Trainer, opt: argparse.Namespace) -> dict:
    """:func:`step_memory` of the trainer's ``_train_batch`` at the largest batch that fits (module doc)."""
    trainer.progress = trainer._begin_epoch(0)
    trainer.accumulate, trainer.nb = 1, 1 << 30  # a step every batch; never an epoch's last batch
    ds, items, count = trainer.train_set, [], [0]

    def measure(b: int) -> dict:
        while len(items) < b:
            items.append(ds[len(items) % len(ds)])
        batch = collate(items[:b])
        # on the card before the clock starts, as the peer's batch is (the trainer converts it to float itself)
        batch.images = batch.images.to(trainer.device)
        batch.semantic = batch.semantic.to(trainer.device) if batch.semantic is not None else None

        def step() -> None:
            trainer._train_batch(count[0], batch, -1)  # warmup -1: no lr ramp, no accumulation ramp
            count[0] += 1

        return step_memory(step, trainer.device, opt.steps, opt.warmup, b, lambda: state_tensors(trainer))

    best, tried = largest_batch(measure, opt.batch, opt.max_batch,
                                lambda: trainer.optimizer.zero_grad(set_to_none=True))
    return {"batch": best, "params": sum(p.numel() for p in trainer.model.parameters()),
            **(tried[best] if best else {}), "tried": {b: (r or {}).get("img_s") for b, r in tried.items()}}


def trainer_for(model: str, data: Path, opt: argparse.Namespace) -> Trainer:
    """A Trainer of ``cfg/<model>.yaml`` (``yolor-mt-n``: the default cfg at scale n) on ``data`` exactly as train.py
    builds it (no loader workers: the batches are drawn here)."""
    ns = argparse.Namespace(cfg=f"cfg/{model}.yaml", data=str(data), hyp=opt.hyp, img=opt.img,
                            batch_size=opt.batch, device=opt.device, workers=0, seed=0, project=opt.project,
                            tasks="", weights="")
    return build_trainer(ns)


def peer_rows(opt: argparse.Namespace, data: Path) -> tuple[dict[str, dict], str, float]:
    """The Ultralytics rows (name -> figures; none with ``--loader-only``), a note (why they are missing, or where
    Ultralytics came from) and its loader's img/s per core (NaN when missing)."""
    project = Path(opt.project)
    site = Path(opt.peer_site) if opt.peer_site else project / "_ultralytics"
    env = peer_env(site, project)
    probe = subprocess.run([sys.executable, "-c", "import ultralytics"], env=env, capture_output=True, check=False)
    if probe.returncode != 0 and opt.no_install:
        return {}, f"Ultralytics rows skipped: it does not import from {site} (--no-install)", math.nan
    version = ensure_ultralytics(site, env)
    yamls = json.loads(run_peer(["convert", "--data", str(data), "--out", str(project / "yolo-data")], env)
                       .strip().splitlines()[-1])
    seg = yamls["seg"]
    rate = json.loads(run_peer(["loader", "--data-yaml", seg, "--img", str(opt.img), "--batch-size",
                                str(opt.loader_batch), "--steps", str(opt.loader_batches)], env).strip().splitlines()[-1])
    rows = {}
    for scale in [] if opt.loader_only else opt.scales.split(","):
        name = f"yolov8{scale}-seg"
        out = run_peer(["step", "--model", f"{name}.yaml", "--data-yaml", seg, "--img", str(opt.img), "--batch-size",
                        str(opt.batch), "--max-batch", str(opt.max_batch), "--steps", str(opt.steps), "--warmup",
                        str(opt.warmup), "--device", str(opt.device)], env)
        rows[name] = json.loads(out.strip().splitlines()[-1]) | {"loader": rate["img_per_s"]}
    return rows, f"Ultralytics {version} from {site}", rate["img_per_s"]


def print_table(rows: dict[str, dict], opt: argparse.Namespace, device: str, vocab: int, notes: list[str]) -> None:
    """One row per model: the figures at its largest batch, and the sizes tried."""
    print(f"\ntraining at {opt.img} px, {device}, AMP on CUDA (bf16 autocast for ours / fp32 Ultralytics on CPU), "
          f"{opt.steps} timed steps after {opt.warmup}; COCO counts (80 classes, 171 semantic classes, "
          f"{vocab}-token vocabulary, 5 captions per image)")
    print(f"{'model':<14} " + " ".join(f"{c:>17}" if "loader" in c else f"{c:>9}" for c in COLUMNS))
    for name, r in rows.items():
        feed = r["img_s"] / r["loader"] if r.get("batch") and r.get("loader") else math.nan
        cells = [r["params"] / 1e6, r["batch"], r.get("img_s", math.nan), r.get("peak_mib", math.nan)]
        print(f"{name:<14} {cells[0]:>9.2f} {cells[1]:>9d} {cells[2]:>9.1f} {cells[3]:>9.0f} {r['loader']:>17.1f} "
              f"{feed:>9.1f}")
    for name, r in rows.items():
        tried = ", ".join(f"{b}: {'OOM' if v is None else f'{v:.1f}'}" for b, v in r["tried"].items())
        print(f"{name}: img/s by batch {tried}")
    for note in notes:
        print(note)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="0", help="cuda device (0) or cpu")
    p.add_argument("--scales", default="n,l", help="comma list of scale letters (ours and YOLOv8-seg's)")
    p.add_argument("--bodies", default="yolor-mt,yolor-mt-c2f",
                   help="comma list of our cfgs (cfg/<name>.yaml): the default GELAN body and the C2f one")
    p.add_argument("--img", type=int, default=640)
    p.add_argument("--batch", type=int, default=8, help="the first batch size tried")
    p.add_argument("--max-batch", type=int, default=512, help="doubling stops here")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per batch size")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotuning, allocator)")
    p.add_argument("--images", type=int, default=256, help="synthetic images written (batches reuse them)")
    p.add_argument("--vocab", type=int, default=10_000, help="caption vocabulary size of the synthetic captions")
    p.add_argument("--loader-batch", type=int, default=16)
    p.add_argument("--loader-batches", type=int, default=10, help="timed loader batches after the first")
    p.add_argument("--hyp", default="data/hyps/hyp.scratch.yaml")
    p.add_argument("--project", default="runs/bench/gpu")
    p.add_argument("--peer-site", default="", help="Ultralytics' folder (default <project>/_ultralytics)")
    p.add_argument("--no-install", action="store_true", help="never pip-install Ultralytics: skip the peer rows "
                   "when it does not import from --peer-site")
    p.add_argument("--no-peers", action="store_true", help="our rows only")
    p.add_argument("--loader-only", action="store_true", help="only the two loaders' img/s per core (no GPU needed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Prints the table; returns its rows (name -> figures)."""
    opt = parse(argv)
    project = Path(opt.project)
    h = opt.img * 3 // 4  # COCO's typical 4:3
    data = write_coco_like(project / "coco-like", opt.images, (opt.img, h - h % 2), opt.vocab)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the loader's rate per core
    opt.cap_view = float(load_hyp(opt.hyp).get("cap_view", 0.5))
    rate = loader_throughput(str(data), opt.img, opt.loader_batch, 0, opt.loader_batches,
                             caption_view=opt.cap_view)["img_per_s"]
    torch.set_num_threads(threads)
    rows, device, vocab = {}, "", 0
    ours = {scale: [f"{body}-{scale}" for body in opt.bodies.split(",")] for scale in opt.scales.split(",")}
    for name in [] if opt.loader_only else [n for names in ours.values() for n in names]:
        trainer = trainer_for(name, data, opt)
        device = (torch.cuda.get_device_name(trainer.device) if trainer.cuda else
                  f"cpu ({os.cpu_count()} cores, {threads} torch threads)")
        rows[name] = our_throughput(trainer, opt) | {"loader": rate}
        vocab = len(trainer.vocab)
        trainer.logger.close()
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    notes, peer_rate = [], math.nan
    if not opt.no_peers:
        peers, note, peer_rate = peer_rows(opt, data)
        notes.append(note)
        # our rows of each scale, then the peer of its letter
        order = [name for scale, names in ours.items() for name in names + [f"yolov8{scale}-seg"]]
        rows = {name: r for name in order if (r := rows.get(name, peers.get(name))) is not None}
    print(f"\nloader img/s per CPU core ({opt.img} px, batch {opt.loader_batch}, one process without workers, torch at "
          f"1 thread): ours {rate:.1f} (mosaic, every task's labels, cap_view {opt.cap_view}), Ultralytics "
          f"{peer_rate:.1f} (mosaic, polygons to masks)")
    if not opt.loader_only:
        print_table(rows, opt, device, vocab, notes)
    else:
        print("\n".join(notes))
    return rows


if __name__ == "__main__":
    main()
