"""Hyperparameter files (data/hyps/*.yaml): the keys the trainer, the losses and the augmentation read."""
from __future__ import annotations

from pathlib import Path

import yaml

HYPS_DIR = Path(__file__).resolve().parents[2] / "data" / "hyps"
HYP_KEYS = {"nbs", "lr0", "lr0_adamw", "momentum_adamw", "lr_fit", "assign_ciou", "assign_min_side", "accumulate_ramp", "lrf", "momentum", "weight_decay", "warmup_epochs",
            "warmup_momentum", "warmup_bias_lr", "grad_clip", "box", "cls", "dfl", "hsv_h", "hsv_s", "hsv_v", "degrees",
            "scst_epochs", "scst_samples", "scst_sampler", "scst_xe", "scst_contrast", "translate", "scale", "shear", "perspective", "flipud", "fliplr", "mosaic",
            "inst", "sem", "cap", "det", "label_smoothing", "max_nonfinite", "mask", "sem_dice", "sem_loss_stride", "sem_loss_chunk", "cap_max_len",
            "cap_min_count", "cap_max_unk", "cap_view", "cap_refs", "mtcp_k", "dwa_temp", "anchor_box", "anchor_obj", "anchor_cls", "anchor_t"}


def load_hyp(path: str | Path) -> dict:
    """Reads a hyp yaml; unknown keys are an error (a typo would otherwise be silently ignored).

    A bare file name that is not found is looked up in data/hyps/ (``--hyp hyp.scratch.yaml`` from anywhere).
    A file may start from another: ``base: hyp.scratch.yaml`` reads that file (relative to this one, or in
    data/hyps/) and this file's keys replace its (detectron2's ``_BASE_``), so a recipe states only what it changes.
    """
    return _load_hyp(Path(path), ())


def _load_hyp(path: Path, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        alt = HYPS_DIR / path.name
        path = alt if alt.is_file() else path
    if path.resolve() in seen:
        raise ValueError(f"{path}: base hyp files form a cycle ({' -> '.join(p.name for p in (*seen, path))})")
    hyp = yaml.safe_load(path.read_text()) or {}
    base = hyp.pop("base", None)
    unknown = set(hyp) - HYP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(HYP_KEYS)}")
    if base is None:
        return hyp
    base_path = path.parent / str(base)
    return _load_hyp(base_path if base_path.is_file() else Path(str(base)), (*seen, path.resolve())) | hyp
