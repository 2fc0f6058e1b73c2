"""torch.distributed setup for ``torchrun`` (NCCL on GPUs, gloo on CPU) and rank-aware helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """This process's place in the run; ``world == 1`` means plain single-process training."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "") -> tuple[DistInfo, torch.device | None]:
    """Joins the process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``, ...).

    Returns the info and, under torchrun, this rank's device (``cuda:LOCAL_RANK``, or CPU with gloo when
    CUDA is absent or ``--device cpu``); ``None`` when not distributed.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo(), None
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), world)
    use_cuda = torch.cuda.is_available() and str(device).lower() != "cpu"
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return info, torch.device(f"cuda:{info.local_rank}" if use_cuda else "cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run folder, decided once)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` when not distributed)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Averages per-rank epoch statistics so every rank (and the balancer) sees the same numbers."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, (t / info.world).tolist()))


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
