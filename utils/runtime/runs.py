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
