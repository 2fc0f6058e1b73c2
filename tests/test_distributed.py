"""Two gloo processes on CPU train the tiny model: parameters stay identical across ranks after every
optimizer step, only rank 0 writes the run folder and its checkpoints (mid-epoch ones included), and a
run resumed from a mid-epoch checkpoint ends bit-identical to the uninterrupted one."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train as train_script
from tests.conftest import assert_same_weights, results_rows, train_args

WORLD = 2
NOMINAL = 8  # with --batch-size 8 (4 per rank): an optimizer step after every batch, 3 an epoch
COPY_AT = (1, 1)  # the mid-epoch checkpoint (epoch, next batch) whose run folder is copied, to resume


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    """One rank: trains, checks the ranks agree after every step, and copies the run folder (rank 0) right
    after the mid-epoch checkpoint ``COPY_AT``, as a kill at that point would leave it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import utils.engine.trainer as trainer_module

    trainer_module.NOMINAL_BATCH = NOMINAL
    trainer = trainer_module.Trainer(train_script.parse_opt(argv))
    checks: list[bool] = []

    def same_params(t: trainer_module.Trainer) -> None:
        flat = torch.cat([p.detach().flatten() for p in t.model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        checks.append(all(torch.equal(gathered[0], g) for g in gathered[1:]))

    def copy_run(t: trainer_module.Trainer) -> None:
        copy = Path(out, "copy")
        if t.mid_epoch_saves[-1:] == [COPY_AT] and not copy.exists():  # right after that save, once
            shutil.copytree(t.save_dir, copy)

    trainer.on_step += [same_params, copy_run]
    trainer.run()
    Path(out, f"rank{rank}.txt").write_text(f"{len(checks)} {all(checks)} {len(trainer.mid_epoch_saves)}")


def _launch(argv: list[str], out: Path) -> None:
    mp.start_processes(_worker, args=(WORLD, _free_port(), argv, str(out)), nprocs=WORLD, join=True,
                       start_method="spawn")


@pytest.fixture(scope="module")
def ddp_run(tiny_cfg_file, tiny_data, tmp_path_factory) -> Path:
    """A 2-epoch run on 2 ranks with a mid-epoch last.pt every 2 batches; returns its output folder."""
    out = tmp_path_factory.mktemp("ddp")
    # every rank joins the gathers of RNG states and loss sums; rank 0 alone writes
    _launch(train_args(tiny_cfg_file, tiny_data, out / "runs", 2, "ddp", "--save-period", "2", "--noplots"), out)
    return out


@pytest.mark.slow
def test_two_gloo_processes_stay_in_sync(ddp_run):
    for rank in range(WORLD):
        steps, ok, mid_saves = (ddp_run / f"rank{rank}.txt").read_text().split()
        assert int(steps) == 2 * 3 and ok == "True", f"rank {rank}: {steps} steps, in sync: {ok}"
        assert int(mid_saves) == (3 if rank == 0 else 0), f"rank {rank}: {mid_saves} mid-epoch saves"
    runs = list((ddp_run / "runs").iterdir())
    assert [r.name for r in runs] == ["ddp"]  # one run folder, not one per rank
    assert (runs[0] / "weights/last.pt").is_file()
    ckpt = torch.load(runs[0] / "weights/last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped: loads without DDP


@pytest.mark.slow
def test_resume_mid_epoch_on_two_ranks_equals_uninterrupted_run(ddp_run, tmp_path):
    """Each rank resumes its own RNG stream and loss sums, and skips its own share of the done batches."""
    last = ddp_run / "copy/weights/last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"]) == COPY_AT and len(ckpt["rank_rng"]) == len(ckpt["progress"]["ranks"]) == WORLD
    _launch(["--resume", str(last)], tmp_path)
    assert_same_weights(torch.load(ddp_run / "runs/ddp/weights/last.pt", weights_only=True),
                        torch.load(last, weights_only=True))
    full = results_rows(ddp_run / "runs/ddp")
    assert len(full) == 2 and results_rows(ddp_run / "copy") == full  # train loss means over both ranks
