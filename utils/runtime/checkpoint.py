"""Checkpoints: tensors, the cfg and plain metadata only, written atomically, loaded with weights_only=True.

While a run trains, ``last.pt`` holds everything ``--resume`` needs (model, EMA, optimizer, scheduler, RNG, ...);
when it ends, ``best.pt`` and ``last.pt`` are stripped (:func:`strip_checkpoint`) to the EMA weights in FP16,
as Ultralytics' ``strip_optimizer``: about a quarter of the size, the same metrics within FP16 rounding.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.model import Model

# what a finished run's checkpoints drop: the training state, and the FP32 model beside its EMA
TRAINING_KEYS = ("model", "ema", "ema_updates", "optimizer", "scheduler", "scaler", "balancer", "rng", "rank_rng",
                 "progress")


def strip_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A finished run's checkpoint: its EMA weights (or its model's, when it has no EMA) in FP16 as ``model``,
    the cfg, metadata, opt and hyp; no optimizer, scheduler, RNG or FP32 copies (``--resume`` refuses it).

    Integer tensors (BatchNorm's step counters) are kept as they are; loading into the FP32 network casts back.
    A tensor shared by two names (the caption head's tied embedding and output projection) stays one FP16 tensor.
    """
    weights = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt["model"]
    out = {k: v for k, v in ckpt.items() if k not in TRAINING_KEYS}
    halves: dict[tuple, torch.Tensor] = {}  # the same memory viewed the same way: one tensor, converted once
    model = {}
    for k, v in weights.items():
        if v.is_floating_point():
            key = (v.data_ptr(), tuple(v.shape), v.stride()) if v.numel() else (id(v),)
            if key not in halves:
                halves[key] = v.half()
            v = halves[key]
        model[k] = v
    out["model"] = model
    out["stripped"] = True
    return out


def is_stripped(ckpt: dict[str, Any]) -> bool:
    """Whether ``ckpt`` is a finished run's (:func:`strip_checkpoint`; older ones only lack the optimizer)."""
    return bool(ckpt.get("stripped")) or "optimizer" not in ckpt


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Writes ``state`` to a temporary file, fsyncs it, then renames it over ``path``.

    A process killed mid-write leaves the previous checkpoint intact (rename is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # interrupted or failed: leave the old checkpoint and no partial file
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint safely (no arbitrary pickles); a clear error if it is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for foreign or corrupt files
        raise ValueError(f"{path}: not a loadable yolor-mt checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "cfg" not in ckpt:
        raise ValueError(f"{path}: not a yolor-mt checkpoint (needs 'model' and 'cfg' entries)")
    return ckpt


def build_from_checkpoint(ckpt: dict[str, Any], ema: bool = True, tasks: Sequence[str] | None = None):
    """Rebuilds the ``Model`` a checkpoint describes and loads its (EMA) weights.

    ``tasks``: build only these heads of the checkpoint (e.g. an export without the semantic and caption
    heads); the weights of the heads left out are not loaded, those of the others must all be there.
    """

    meta = ckpt.get("meta", {})
    model = Model(ckpt["cfg"], nc=len(meta.get("names", [])) or None,
                  tasks=tasks if tasks is not None else ckpt.get("tasks"), head_kwargs=ckpt.get("head_kwargs"))
    state = ckpt.get("ema") if ema and ckpt.get("ema") is not None else ckpt["model"]
    if tasks is not None:
        have = ckpt.get("tasks") or model.tasks  # the trainer always stores the list; a hand-made checkpoint may not
        absent = [t for t in tasks if t not in have or t not in model.tasks]
        if absent:
            raise ValueError(f"tasks {','.join(absent)}: the checkpoint has no such head (it has {','.join(have)})")
        # rows not built are the heads left out (the parser skips head rows only): their weights stay behind
        dropped = tuple(f"layers.{i}." for i, built in enumerate(model.built) if not built)
        state = {k: v for k, v in state.items() if not k.startswith(dropped)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not match its cfg: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.meta = meta
    return model
