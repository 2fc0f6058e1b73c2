"""train.py as the mid-epoch resume tests run it, in a subprocess.

    python tests/train_driver.py NOMINAL_BATCH KILL_AT TRAIN_ARGS...

NOMINAL_BATCH replaces the trainer's 64 so that the 24-image test set gives several optimizer steps per
epoch (it must be the same for a run and its resume). KILL_AT is ``EPOCH,BATCH`` or ``-``: the process
SIGKILLs itself right after writing that mid-epoch checkpoint, a deterministic ``kill -9``. The last stdout
line counts the training images loaded (``train_items=N``), so a test can tell skipped batches from
batches loaded and discarded.
"""
from __future__ import annotations

import os
import signal
import sys

import train
import utils.engine.trainer as trainer_module
from utils.data.dataset import CocoDataset


def main(argv: list[str]) -> None:
    nominal, kill_at, train_argv = int(argv[0]), argv[1], argv[2:]
    trainer_module.NOMINAL_BATCH = nominal
    kill = None if kill_at == "-" else tuple(int(v) for v in kill_at.split(","))
    loaded = 0
    getitem = CocoDataset.__getitem__

    def counting_getitem(self: CocoDataset, index: int):
        nonlocal loaded
        loaded += self.augment  # the training set augments, validation does not
        return getitem(self, index)

    def kill_after_checkpoint(t: trainer_module.Trainer) -> None:
        if t.mid_epoch_saves and t.mid_epoch_saves[-1] == kill:
            os.kill(os.getpid(), signal.SIGKILL)

    CocoDataset.__getitem__ = counting_getitem
    trainer = trainer_module.Trainer(train.parse_opt(train_argv))
    trainer.on_step.append(kill_after_checkpoint)
    trainer.run()
    print(f"train_items={loaded}")


if __name__ == "__main__":
    main(sys.argv[1:])
