"""Two gloo processes on CPU train the tiny model: parameters stay identical across ranks after every
optimizer step, and only rank 0 writes the run folder and its checkpoint."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

import train as train_script
from tests.conftest import tiny_cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from utils.trainer import Trainer

    trainer = Trainer(train_script.parse_opt(argv))
    checks: list[bool] = []

    def same_params(t: Trainer) -> None:
        flat = torch.cat([p.detach().flatten() for p in t.model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        checks.append(all(torch.equal(gathered[0], g) for g in gathered[1:]))

    trainer.on_step.append(same_params)
    trainer.run()
    Path(out, f"rank{rank}.txt").write_text(f"{len(checks)} {all(checks)}")


@pytest.mark.slow
def test_two_gloo_processes_stay_in_sync(tiny_data, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_cfg()))
    argv = ["--cfg", str(cfg), "--data", str(tiny_data), "--epochs", "2", "--img", "64", "--batch-size", "8",
            "--workers", "0", "--project", str(tmp_path / "runs"), "--name", "ddp", "--no-progress", "--device", "cpu"]
    mp.start_processes(_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        steps, ok = (tmp_path / f"rank{rank}.txt").read_text().split()
        assert int(steps) >= 2 and ok == "True", f"rank {rank}: {steps} steps, in sync: {ok}"
    runs = list((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["ddp"]  # one run folder, not one per rank
    assert (runs[0] / "weights/last.pt").is_file()
    ckpt = torch.load(runs[0] / "weights/last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped: loads without DDP
