"""torch.distributed setup for ``torchrun`` (NCCL on GPUs, gloo on CPU) and rank-aware helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
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

    def mean(self, x: torch.Tensor | float) -> torch.Tensor:
        """The mean over ranks of a loss normaliser (a target-score sum, a pixel, token or image count).

        Dividing each rank's loss sum by the *global* normaliser (this mean times the world size) is what
        makes N processes x B/N images give the gradient of one process x B images; a per-rank normaliser
        would weigh every rank's images by its own share. Detached (no gradient flows through a
        normaliser); identity for one process. A collective: every rank calls it, in the same order.
        """
        t = torch.as_tensor(x, dtype=torch.float32).detach()
        if not self.enabled:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a collective; ``flag`` itself for one process): ranks that
        must take the same branch, e.g. skip a step with a non-finite loss, agree through this."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor(1 if flag else 0, dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def average_gradients(self, params) -> None:
        """Averages the gradients of parameters that live outside the DDP wrapper (the learned task weights
        of ``--balance uncertainty``), as DDP does for the model's own; a missing gradient counts as zero,
        so a task absent from one rank's batches still gets one value on every rank."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world


LOCAL = DistInfo()  # one process: every collective above is a no-op


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


def sum_across_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Sums per-rank statistics over the *union* of the ranks' keys (a key one rank lacks, e.g. a task with no
    labels in that rank's share of the epoch, counts as 0 there), in one order on every rank, so every rank
    (and the balancer) sees the same numbers."""
    if not info.enabled:
        return dict(values)
    keys = sorted(set().union(*gather_objects(sorted(values), info)))
    t = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
