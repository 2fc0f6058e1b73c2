"""Helpers shared by the benchmark scripts: run a training, read its results, count params and FLOPs."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import train as train_script


def run_training(args: list[str], project: Path, name: str) -> tuple[Path, float]:
    """Trains with ``train.py`` arguments ``args`` into ``project/name``; returns (run dir, minutes)."""
    t0 = time.time()
    rc = train_script.main(args + ["--project", str(project), "--name", name, "--exist-ok", "--no-progress"])
    if rc != 0:
        raise SystemExit(f"training {name} failed (exit {rc})")
    return project / name, (time.time() - t0) / 60


def read_results(run: Path) -> list[dict[str, float]]:
    """results.csv rows as floats (empty cells skipped)."""
    with open(run / "results.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def params_and_gflops(model: torch.nn.Module, img: int) -> tuple[int, float]:
    """Parameter count and forward GFLOPs (multiply-adds x 2) for one ``img`` x ``img`` image, eval mode."""
    model = model.eval()
    n = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, img, img))
    return n, counter.get_total_flops() / 1e9
