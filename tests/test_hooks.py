"""Trainer hooks: a user hook sees every event in order with the loop's counts, and changes a run (an early
stop) through the public API alone, without an edit to the loop."""
from __future__ import annotations

import pytest
import torch

import train as train_script
import utils.engine.trainer as trainer_module
from tests.conftest import results_rows, train_args
from utils.engine.hooks import Hook

# 24 training images in batches of 8: 3 batches an epoch; a nominal batch of 8: a step after every batch
NOMINAL, NB = 8, 3


class Recorder(Hook):
    """Records (event, epoch, batch index) of every event, and what the run had written at each epoch end."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []
        self.rows_at_epoch_end: list[int] = []

    def _record(self, event: str, trainer: trainer_module.Trainer) -> None:
        self.events.append((event, trainer.epoch, trainer.batch_index))

    def before_train(self, trainer):
        self._record("before_train", trainer)

    def before_epoch(self, trainer):
        self._record("before_epoch", trainer)

    def before_batch(self, trainer):
        assert trainer.batch is not None and trainer.batch_inputs is not None
        self._record("before_batch", trainer)

    def after_step(self, trainer):
        assert trainer.progress.last_step == trainer.batch_index  # the step ended at this batch
        self._record("after_step", trainer)

    def after_batch(self, trainer):
        self._record("after_batch", trainer)

    def after_epoch(self, trainer):
        assert trainer.metrics["epoch"] == trainer.epoch + 1 and "train/det_box" in trainer.metrics
        # user hooks run after the default ones: this epoch's row and last.pt are already written
        self.rows_at_epoch_end.append(len(results_rows(trainer.save_dir)))
        assert (trainer.wdir / "last.pt").is_file()
        self._record("after_epoch", trainer)

    def after_train(self, trainer):
        self._record("after_train", trainer)


class StopAfter(Hook):
    """Stops training after epoch ``epoch`` (0-based), as a user's own stopping rule would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def after_epoch(self, trainer):
        if trainer.epoch == self.epoch:
            trainer.request_stop()


def _trainer(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, epochs: int, **kw) -> trainer_module.Trainer:
    monkeypatch.setattr(trainer_module, "NOMINAL_BATCH", NOMINAL)
    opt = train_script.parse_opt(train_args(tiny_cfg_file, tiny_data, tmp_path, epochs, "exp", "--noval", "--noplots"))
    return trainer_module.Trainer(opt, **kw)


def test_user_hook_receives_every_event_in_order(tiny_cfg_file, tiny_data, tmp_path, monkeypatch):
    """Two epochs of three batches, a step after each: the events come in loop order with the loop's epoch and
    batch index, and the on_step callbacks (kept for callers) still run after every step."""
    recorder = Recorder()
    trainer = _trainer(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 2, hooks=[recorder])
    steps: list[tuple[int, int]] = []
    trainer.on_step.append(lambda t: steps.append((t.epoch, t.batch_index)))
    trainer.run()
    expected = [("before_train", 0, 0)]
    for epoch in range(2):
        expected.append(("before_epoch", epoch, 0))  # the epoch's first batch
        for i in range(NB):
            expected += [("before_batch", epoch, i), ("after_step", epoch, i), ("after_batch", epoch, i)]
        expected.append(("after_epoch", epoch, NB - 1))
    expected.append(("after_train", 1, NB - 1))
    assert recorder.events == expected
    assert steps == [(e, i) for e in range(2) for i in range(NB)]
    assert recorder.rows_at_epoch_end == [1, 2]


def test_user_hook_stops_the_run_without_a_loop_edit(tiny_cfg_file, tiny_data, tmp_path, monkeypatch):
    """A hook registered on a built trainer stops a 3-epoch run after its first epoch: one results.csv row, a
    last.pt of epoch 0 stripped as at the end of any run, and after_train still called."""
    trainer = _trainer(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 3)
    recorder = Recorder()
    trainer.register(StopAfter(0), recorder)
    with pytest.raises(TypeError, match="not a utils.engine.hooks.Hook"):
        trainer.register(lambda t: None)
    trainer.run()
    assert [e for e in recorder.events if e[0] in ("after_epoch", "after_train")] == [
        ("after_epoch", 0, NB - 1), ("after_train", 0, NB - 1)]
    assert len(results_rows(tmp_path / "exp")) == 1
    last = torch.load(tmp_path / "exp/weights/last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and "optimizer" not in last
