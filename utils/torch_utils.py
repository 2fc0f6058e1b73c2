"""Device selection, seeding and run-folder naming."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch


def select_device(device: str = "") -> torch.device:
    """'' picks CUDA:0 when available, else CPU; 'cpu', '0', 'cuda:1' as YOLOv5. Clear error if absent."""
    device = str(device).strip().lower().replace("cuda:", "")
    if device in ("", None):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available; use --device cpu")
    idx = int(device.split(",")[0])
    if idx >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(f"cuda:{idx}")


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seeds python, numpy and torch; deterministic kernels where they exist (warn-only elsewhere)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def increment_path(path: str | Path, exist_ok: bool = False) -> Path:
    """runs/train/exp -> runs/train/exp2, exp3, ... (the first free one), unless ``exist_ok``."""
    path = Path(path)
    if exist_ok or not path.exists():
        return path
    stem = re.sub(r"\d+$", "", path.name)
    used = [int(m.group(1)) for p in path.parent.glob(f"{stem}*") if (m := re.fullmatch(rf"{re.escape(stem)}(\d+)", p.name))]
    return path.with_name(f"{stem}{max(used + [1]) + 1}")


def latest_run(pattern: str = "runs/train/exp*/weights/last.pt") -> Path | None:
    """The most recently written file matching ``pattern`` (for ``--resume`` with no path)."""
    files = list(Path().glob(pattern))
    return max(files, key=os.path.getmtime) if files else None
