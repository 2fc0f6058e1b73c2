"""Run folders: ``runs/<kind>/exp``, ``exp2``, ... for new runs, and the newest file of earlier runs."""
from __future__ import annotations

import os
import re
from pathlib import Path


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


NEWEST_BEST = "runs/train/exp*/weights/best.pt"  # what test.py, detect.py and export.py use without --weights


def resolve_weights(weights: str | Path | None) -> Path:
    """The scripts' ``--weights``: as given, or the newest ``runs/train/exp*/weights/best.pt`` when empty.

    Raises FileNotFoundError (one clear line through ``run_cli``) when none is given and no run has one.
    """
    if weights:
        return Path(weights)
    found = latest_run(NEWEST_BEST)
    if found is None:
        raise FileNotFoundError(f"no --weights given and no {NEWEST_BEST}; train one with: python train.py")
    return found
