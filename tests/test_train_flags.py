"""train.py's YOLOv5/Ultralytics training habits: --close-mosaic, --cache ram|disk and --multi-scale, seen from
inside real (tiny, CPU) runs through a user hook."""
from __future__ import annotations

import pytest

import train as train_script
import utils.engine.trainer as trainer_module
from tests.conftest import train_args
from utils.data import augment as A
from utils.engine.hooks import Hook

# 24 training images in batches of 8: 3 batches an epoch; a nominal batch of 8: a step after every batch
NOMINAL, NB = 8, 3


class Crash(Exception):
    """Stands in for a killed run (raised after an epoch's last.pt is written)."""


class MosaicLog(Hook):
    """Per epoch: the dataset's mosaic switch at its start and the mosaics built during it; optionally crashes
    after epoch ``crash_after`` (0-based), once its checkpoint is written (user hooks run after the default ones)."""

    def __init__(self, monkeypatch, crash_after: int = -1) -> None:
        self.epochs: dict[int, tuple[bool, int]] = {}
        self.crash_after = crash_after
        self.calls = 0
        real = A.mosaic4

        def counting(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(A, "mosaic4", counting)  # --workers 0: items are made in this process

    def before_epoch(self, trainer):
        self.calls = 0
        self.epochs[trainer.epoch] = (trainer.train_set.mosaic, -1)

    def after_epoch(self, trainer):
        self.epochs[trainer.epoch] = (self.epochs[trainer.epoch][0], self.calls)
        if trainer.epoch == self.crash_after:
            raise Crash


def _opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, epochs: int, *extra: str):
    monkeypatch.setattr(trainer_module, "NOMINAL_BATCH", NOMINAL)
    return train_script.parse_opt(train_args(tiny_cfg_file, tiny_data, tmp_path, epochs, "exp", "--noval", "--noplots",
                                             *extra))


def test_close_mosaic_last_epochs_and_after_resume(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, capsys):
    """--close-mosaic 1 of 3 epochs: mosaics in epochs 1-2, none in epoch 3, said once. A run killed after
    epoch 1 and resumed is in the same state per epoch (the epoch decides) and keeps the flag."""
    opt = _opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 3, "--close-mosaic", "1")
    assert train_script.parse_opt([]).close_mosaic == 0  # default: off, as before
    log = MosaicLog(monkeypatch, crash_after=0)
    with pytest.raises(Crash):
        trainer_module.Trainer(opt, hooks=[log]).run()
    assert log.epochs[0][0] is True and log.epochs[0][1] > 0
    assert "closing mosaic" not in capsys.readouterr().out

    resumed = MosaicLog(monkeypatch)
    trainer = trainer_module.Trainer(train_script.parse_opt(["--resume", str(tmp_path / "exp/weights/last.pt")]),
                                     hooks=[resumed])
    assert trainer.opt.close_mosaic == 1  # from the checkpoint's opt
    trainer.run()
    assert set(resumed.epochs) == {1, 2}
    assert resumed.epochs[1][0] is True and resumed.epochs[1][1] > 0
    assert resumed.epochs[2] == (False, 0)
    out = capsys.readouterr().out
    assert out.count("closing mosaic for the last 1 epochs") == 1
