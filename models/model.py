"""``Model``: the network a cfg describes, returning a small named ``Outputs``; ``fuse()`` for deployment."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.common import Concat, Conv
from models.gelan import RepConvN
from models.implicit import Implicit, fold_into_next_conv
from models.parser import load_cfg, parse_model


@dataclass
class Outputs:
    """One field per task; a task whose head was not built is ``None``."""

    det: Any = None
    inst: Any = None
    sem: Any = None
    cap: Any = None


class Model(nn.Module):
    """A YOLOR-style multi-task network built from a YAML cfg.

    Args:
        cfg: cfg file path (``cfg/yolor-mt-n.yaml`` picks scale ``n`` of ``cfg/yolor-mt.yaml``) or dict.
        nc: number of object classes (overrides the cfg's ``nc``).
        tasks: the heads to build, a subset of ``det inst sem cap``; ``None`` builds every head in the cfg.
        head_kwargs: per-task extra constructor arguments (e.g. ``{"sem": {"num_classes": 183}}``).
    """

    def __init__(self, cfg: str | Path | dict, nc: int | None = None, tasks: Iterable[str] | None = None,
                 ch: int = 3, head_kwargs: dict[str, dict] | None = None):
        super().__init__()
        self.yaml = load_cfg(cfg)
        self.nc = int(nc if nc is not None else self.yaml.get("nc", 80))
        rows = parse_model(self.yaml, self.nc, set(tasks) if tasks is not None else None, ch, head_kwargs)
        self.layers = nn.ModuleList(r.module if r.module is not None else nn.Identity() for r in rows)
        self.sources = [r.source for r in rows]
        self.built = [r.module is not None for r in rows]
        self.head_index = {r.task: r.index for r in rows if r.task and r.module is not None}
        needed = {j for r in rows if r.module is not None for j in r.source}
        self.keep = [i in needed for i in range(len(rows))]
        self.rows_meta = [(r.name, r.c_out, r.stride) for r in rows]
        self.stride = max(r.stride for r in rows if r.module is not None and r.task is None)

    @property
    def tasks(self) -> list[str]:
        """Tasks this model has a head for, in canonical order."""
        return [f.name for f in fields(Outputs) if f.name in self.head_index]

    def head(self, task: str) -> nn.Module:
        return self.layers[self.head_index[task]]

    def forward(self, x: torch.Tensor, **head_inputs: Any) -> Outputs:
        """Runs the body once and every head on it. ``head_inputs`` go to heads that take extra inputs
        (e.g. ``captions=`` token ids for teacher forcing), keyed by task in ``head.extra_inputs``; a head whose
        ``extra_inputs`` has ``det_classes`` also gets the detection head's class maps (``class_maps``) when the
        detection head is built and comes before it in the cfg."""
        cache: list[torch.Tensor | None] = []
        out = Outputs()
        for i, (layer, src) in enumerate(zip(self.layers, self.sources)):
            if not self.built[i]:
                cache.append(None)
                continue
            inp = [x if j == -1 else cache[j] for j in src]
            task = next((t for t, k in self.head_index.items() if k == i), None)
            if task is not None:
                wants = getattr(layer, "extra_inputs", ())
                extra = {k: v for k, v in head_inputs.items() if k in wants}
                if "det_classes" in wants and out.det is not None:  # a head reading the detector's classes
                    extra["det_classes"] = self.head("det").class_maps(out.det)
                setattr(out, task, layer(inp, **extra))
                cache.append(None)
                continue
            y = layer(inp if isinstance(layer, Concat) else inp[0])
            cache.append(y if self.keep[i] else None)
        return out

    @torch.no_grad()
    def fuse(self, verbose: bool = False) -> Model:
        """Folds every BatchNorm and every implicit layer into a neighbouring conv (eval-mode exact).

        After this, no ``BatchNorm2d`` and no ``Implicit`` module is left; outputs are unchanged up to
        float rounding. Call on an eval-mode model (BatchNorm running statistics are what get folded).
        """
        before = module_counts(self)
        for m in self.modules():
            if isinstance(m, Conv):
                m.fuse()
        for m in list(self.modules()):  # after its branches' BatchNorms: a RepConvN becomes one 3x3 conv
            if isinstance(m, RepConvN):
                m.fuse()
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Implicit):
                for j, src in enumerate(self.sources):
                    if i in src and self.built[j]:
                        self.layers[j].conv = fold_into_next_conv(layer, self.layers[j].conv)
                self.layers[i] = nn.Identity()
        for task in self.tasks:
            self.head(task).fuse()
        leftover = [n for n, m in self.named_modules() if isinstance(m, (nn.BatchNorm2d, Implicit))]
        if leftover:
            raise RuntimeError(f"fuse() left unfused modules: {leftover[:5]}")
        if verbose:
            print(f"fuse: before {format_counts(before)}\n      after  {format_counts(module_counts(self))}")
        return self

    def info(self) -> str:
        n_p = sum(p.numel() for p in self.parameters())
        return f"{len(self.layers)} rows, {n_p:,} parameters, tasks {self.tasks}, stride {self.stride:g}"


def module_counts(model: nn.Module) -> dict[str, int]:
    """Counts of the module types ``fuse()`` cares about."""
    counts = {"Conv2d": 0, "BatchNorm2d": 0, "Implicit": 0}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            counts["Conv2d"] += 1
        elif isinstance(m, nn.BatchNorm2d):
            counts["BatchNorm2d"] += 1
        elif isinstance(m, Implicit):
            counts["Implicit"] += 1
    return counts


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items())
