"""Mid-epoch checkpoints (``--save-period N``: every N batches) and resuming from them.

A run killed with SIGKILL right after a mid-epoch checkpoint and resumed ends bit-identical to an
uninterrupted run; the resumed epoch's batches already trained are skipped by the sampler, not loaded;
with ``--save-period`` off no mid-epoch checkpoint is written.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

import train as train_script
import utils.engine.hooks as hooks_module
import utils.engine.trainer as trainer_module
from tests.conftest import (
    ROOT,
    assert_same_weights,
    results_rows,
    subprocess_env,
    train_args,
)
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset, SkipSampler, collate, create_dataloader
from utils.runtime.checkpoint import build_from_checkpoint

# 24 training images in batches of 4: 6 batches an epoch; a nominal batch of 8 accumulates 2 batches, so
# optimizer steps come after batches 1, 3 and 5 (0-based) of every epoch
NOMINAL, BATCH, NB = 8, 4, 6


def _driver(kill_at: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """tests/train_driver.py with the nominal batch above; ``kill_at`` 'EPOCH,BATCH' or '-'."""
    cmd = [sys.executable, str(ROOT / "tests/train_driver.py"), str(NOMINAL), kill_at, *args]
    return subprocess.run(cmd, env=subprocess_env(), cwd=cwd, capture_output=True, text=True, timeout=600)


def _train_items(proc: subprocess.CompletedProcess) -> int:
    """The driver's count of training images loaded."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("train_items="), last
    return int(last.split("=")[1])


@pytest.mark.slow
def test_kill_mid_epoch_then_resume_equals_uninterrupted_run(tiny_cfg_file, tiny_data, tmp_path):
    """SIGKILL right after the mid-epoch checkpoint at batch 4 of epoch 2 (of 3), ``--resume``: the final model
    and EMA are bit-identical to an uninterrupted run's, and so is every logged train loss and metric."""
    def args(name: str) -> list[str]:
        return train_args(tiny_cfg_file, tiny_data, tmp_path, 3, name, "--batch-size", str(BATCH),
                          "--save-period", "2", "--noval", "--noplots")

    full = _driver("-", args("full"), tmp_path)
    assert _train_items(full) == 3 * 24
    killed = _driver("1,4", args("killed"), tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    last = tmp_path / "killed/weights/last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 4)  # epoch 2 in progress, 4 of its 6 batches trained
    assert ckpt["progress"]["last_step"] == 3 and {"optimizer", "rng", "ema", "scheduler"} <= set(ckpt)
    assert max(ckpt["progress"]["ranks"][0]["counts"].values()) == 4  # the epoch's loss sums so far
    build_from_checkpoint(ckpt)  # test.py / detect.py / export.py load it as weights, as any last.pt
    assert len(results_rows(tmp_path / "killed")) == 1  # only the finished epoch is logged

    resumed = _driver("-", ["--resume", str(last)], tmp_path)
    # the resumed epoch's first 4 batches are skipped, not loaded: 2 batches of it, then all of epoch 3
    assert _train_items(resumed) == (NB - 4) * BATCH + 24
    assert "at epoch 2 after 4 batches" in resumed.stdout

    a = torch.load(tmp_path / "full/weights/last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["batch"] == b["batch"] == -1
    assert "optimizer" not in b and "progress" not in b  # finished: stripped, an epoch-end checkpoint
    assert_same_weights(a, b)
    full_rows = results_rows(tmp_path / "full")
    assert len(full_rows) == 3 and results_rows(tmp_path / "killed") == full_rows  # train loss means of the resumed epoch included


@pytest.mark.parametrize("period, expected", [(-1, []), (0, []), (3, [(0, 4), (0, 6)]), (2, [(0, 2), (0, 4), (0, 6)])])
def test_save_period_writes_mid_epoch_checkpoints(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, period, expected):
    """``--save-period N``: last.pt after the first optimizer step at or after every N batches (steps come every
    2 batches here, so N=3 saves after batches 4 and 6); off (<1): only the epoch-end checkpoints."""
    monkeypatch.setattr(trainer_module, "NOMINAL_BATCH", NOMINAL)
    # a step every 2 batches from the first (no warmup ramp of the accumulation, which starts at 1)
    monkeypatch.setattr(trainer_module.Trainer, "accumulate_at", lambda self, ni, warmup: self.accumulate)
    saves: list[tuple[str, int, int]] = []
    real_save = hooks_module.save_checkpoint

    def spy(state: dict, path: Path) -> None:
        saves.append((Path(path).name, state["epoch"], state["batch"]))
        real_save(state, path)

    monkeypatch.setattr(hooks_module, "save_checkpoint", spy)
    opt = train_script.parse_opt(train_args(tiny_cfg_file, tiny_data, tmp_path, 1, "exp", "--batch-size", str(BATCH),
                                            "--save-period", str(period), "--noval", "--noplots"))
    trainer = trainer_module.Trainer(opt)
    trainer.run()
    assert trainer.mid_epoch_saves == expected
    mid = [(name, epoch, batch) for name, epoch, batch in saves if batch != -1]
    assert mid == [("last.pt", e, b) for e, b in expected]
    assert ("best.pt", 0, -1) in saves and saves[-1] == ("last.pt", 0, -1)  # epoch end, then the final strip
    assert len(results_rows(tmp_path / "exp")) == 1


# --- the skipping sampler --------------------------------------------------------------------------------

def test_create_dataloader_skips_batches_without_loading_them(tiny_data, monkeypatch):
    """``skip`` drops the first batches of the epoch's seeded order; the rest come in the same order and are
    the only images loaded. Without a skip the order is the one DataLoader(shuffle=True) gives."""
    data = load_data_config(tiny_data)
    ds = CocoDataset(data, data.train, 64, augment=False)
    loaded: list[int] = []
    getitem = CocoDataset.__getitem__
    monkeypatch.setattr(CocoDataset, "__getitem__", lambda self, i: loaded.append(i) or getitem(self, i))

    loader = create_dataloader(ds, BATCH, shuffle=True, seed=3)
    loader.generator.manual_seed(10)
    full = [b.image_ids for b in loader]
    plain = DataLoader(ds, batch_size=BATCH, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(10))
    assert [b.image_ids for b in plain] == full  # existing runs keep their data order
    loaded.clear()
    loader.sampler.skip = 2 * BATCH
    loader.generator.manual_seed(10)
    rest = [b.image_ids for b in loader]
    assert rest == full[2:] and len(loaded) == (NB - 2) * BATCH
    assert len(loader) == NB - 2


def test_skip_sampler_random_and_distributed():
    """The remaining indices of a seeded RandomSampler, and of each rank of a DistributedSampler (whose
    skipped parts together are the start of the shared, padded permutation)."""
    n, skip = 11, 3
    g = torch.Generator()
    sampler = SkipSampler(RandomSampler(range(n), generator=g))
    g.manual_seed(5)
    full = list(sampler)
    sampler.skip = skip
    g.manual_seed(5)
    assert list(sampler) == full[skip:] and len(sampler) == n - skip

    world, seed, epoch = 2, 7, 4
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    padded = perm + perm[: world - n % world]  # DistributedSampler pads to a multiple of the world size
    skipped = []
    for rank in range(world):
        base = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        wrapped = SkipSampler(base)
        wrapped.set_epoch(epoch)
        full = list(base)
        assert full == padded[rank::world]
        wrapped.skip = skip
        assert list(wrapped) == full[skip:] and len(wrapped) == len(full) - skip
        skipped += full[:skip]
    assert sorted(skipped) == sorted(padded[: skip * world])
