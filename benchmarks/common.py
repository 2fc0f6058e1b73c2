"""Helpers shared by the benchmark scripts: run a training, count params and FLOPs (a run's results.csv is read
with :func:`utils.viz.plots.read_results`, the reader of results.png and report.html)."""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import train as train_script
from utils.loss.balance import DEFAULT_BALANCE


def add_training_args(p: argparse.ArgumentParser, epochs: int, img: int, project: str) -> None:
    """The training-budget flags every benchmark shares (passed through to train.py by :func:`train_args`)."""
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--img", type=int, default=img)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cfg", default="cfg/yolor-mt-n.yaml")
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--hyp", default="data/hyps/hyp.scratch.yaml")
    p.add_argument("--balance", default=DEFAULT_BALANCE, help="task balancing rule (train.py's --balance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--project", default=project)
    p.add_argument("--device", default="cpu", help="cuda device (0) or cpu, as train.py's --device")
    p.add_argument("--noval", action="store_true", help="validate only after the last epoch (what the tables "
                   "read); saves the per-epoch validation time")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier "
                   "on a machine shared with other jobs")


def train_args(opt: argparse.Namespace, tasks: str = "") -> list[str]:
    """train.py arguments for the shared flags (and sets the torch thread count they ask for)."""
    if opt.threads > 0:
        torch.set_num_threads(opt.threads)
    return ["--cfg", opt.cfg, "--data", opt.data, "--epochs", str(opt.epochs), "--img", str(opt.img),
            "--batch-size", str(opt.batch_size), "--seed", str(opt.seed), "--workers", str(opt.workers),
            "--balance", opt.balance, "--hyp", opt.hyp, "--device", str(opt.device)] + (["--tasks", tasks] if tasks else []) + \
        (["--noval"] if opt.noval else [])


def fresh_run_dir(project: Path, name: str) -> None:
    """Removes ``project/name`` before a benchmark (re)trains into it: ``train.py --exist-ok`` would append the
    new epochs to the old run's results.csv, and a table read from it would mix the two runs."""
    shutil.rmtree(Path(project) / name, ignore_errors=True)


def run_training(args: list[str], project: Path, name: str) -> tuple[Path, float]:
    """Trains with ``train.py`` arguments ``args`` into a fresh ``project/name``; returns (run dir, minutes)."""
    fresh_run_dir(project, name)
    t0 = time.time()
    rc = train_script.main(args + ["--project", str(project), "--name", name, "--exist-ok", "--no-progress"])
    if rc != 0:
        raise SystemExit(f"training {name} failed (exit {rc})")
    return project / name, (time.time() - t0) / 60


def run_trainings(runs: dict[str, list[str]], project: Path, jobs: int = 1, threads: int = 0) -> dict[str, float]:
    """Trains each named run (``name -> train.py arguments``) into ``project/name``; returns minutes per run.

    With ``jobs > 1`` up to that many trainings run at once, each in its own process with ``threads``
    torch threads and its output in ``project/name.log`` (a GPU is shared; on a CPU, jobs x threads should
    not exceed the cores, or every run slows down far more than proportionally).
    """
    if jobs <= 1:
        return {name: run_training(args, project, name)[1] for name, args in runs.items()}
    project.mkdir(parents=True, exist_ok=True)
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads > 0 else {})
    pending, running, minutes = list(runs.items()), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name, args = pending.pop(0)
            fresh_run_dir(project, name)
            log = open(project / f"{name}.log", "w")
            cmd = [sys.executable, "train.py", *args, "--project", str(project), "--name", name, "--exist-ok",
                   "--no-progress"]
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time())
            print(f"started {name} (log {project / name}.log)", flush=True)
        time.sleep(1.0)
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                for other, _, _ in running.values():
                    other.kill()
                raise SystemExit(f"training {name} failed (exit {proc.returncode}); see {project / name}.log")
            minutes[name] = (time.time() - t0) / 60
            print(f"finished {name} in {minutes[name]:.1f} min", flush=True)
    return minutes


def params_and_gflops(model: torch.nn.Module, img: int) -> tuple[int, float]:
    """Parameter count and forward GFLOPs (multiply-adds x 2) for one ``img`` x ``img`` image, eval mode."""
    model = model.eval()
    n = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, img, img))
    return n, counter.get_total_flops() / 1e9


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA's ``OutOfMemoryError``, or the CPU allocator's)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err)))


def largest_batch(measure: Callable[[int], dict], start: int, limit: int, recover: Callable[[], None] = lambda: None
                  ) -> tuple[int, dict[int, dict | None]]:
    """``measure(b)`` for ``b = start, 2 start, 4 start ...`` up to ``limit``, until one runs out of memory; returns
    the largest ``b`` that fitted (0: none) and every tried size's result (``None``: out of memory). After an
    out-of-memory error ``recover()`` drops what the failed step held, then the allocator's cache is emptied,
    so the next model measured in this process starts clean."""
    tried: dict[int, dict | None] = {}
    best, b = 0, max(start, 1)
    while b <= limit:
        try:
            tried[b] = measure(b)
        except Exception as err:  # only an allocation failure is expected: any other error re-raises
            if not out_of_memory(err):
                raise
            tried[b] = None
            del err
            recover()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            break
        best, b = b, 2 * b
    return best, tried
